"""judge.py / `orpo judge`: answers of two models (sampled or from orpo generate files) judged pair by pair; every
number in judge.json follows from records.jsonl; bad input is one line before any model loads."""
import json

import pytest
import transformers

from orpo.commands.cli import main
from orpo.commands.generate import sample_seed
from orpo.commands.judge import JudgeOptions, build_records, judge_kind, outcome, plan_sides
from orpo.errors import OrpoError
from orpo.stats import pairwise_outcome, reward_outcome, win_stats
from tiny import chatml_tokenizer, save_tiny_chat_model

PROMPTS = [{"prompt": "why is the sky blue", "reference": "blue"}, {"prompt": "what is a", "reference": 12},
           {"id": "c", "prompt": [{"role": "system", "content": "ok"}, {"role": "user", "content": "good or bad"}],
            "answer": "good"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def save_tiny_reward_model(path, seed=0, num_labels=1):
    """A random tiny LlamaForSequenceClassification with the ChatML word-level tokenizer; returns the path."""
    tokenizer = chatml_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, num_labels=num_labels)
    transformers.set_seed(seed)
    transformers.LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge-models")
    return {"a": save_tiny_chat_model(root / "a", 0), "b": save_tiny_chat_model(root / "b", 1),
            "rm": save_tiny_reward_model(root / "rm", 2)}


def read_outputs(out):
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return records, json.loads((out / "judge.json").read_text())


def recompute(kind, records, seed):
    """Every number of judge.json from the records alone: each outcome again from the judge's raw evidence through
    the stats functions, then win_stats and the judge's counts, written out here."""
    comparisons = [c for r in records for c in r["comparisons"]]
    for c in comparisons:
        if kind == "reward":
            assert c["outcome"] == reward_outcome(c["score_a"], c["score_b"])
        elif kind == "pairwise":
            assert c["outcome"] == pairwise_outcome(c["verdict_a_first"], c["verdict_b_first"])
        else:
            assert c["outcome"] == (0.5 if c["correct_a"] == c["correct_b"] else 1.0 if c["correct_a"] else 0.0)
        assert (c["length_a"], c["length_b"]) == (len(c["answer_a"]), len(c["answer_b"]))
    n = len(comparisons)
    if kind == "reward":
        judge = {"mean_score_a": sum(c["score_a"] for c in comparisons) / n,
                 "mean_score_b": sum(c["score_b"] for c in comparisons) / n,
                 "truncated": sum(c["truncated_a"] + c["truncated_b"] for c in comparisons)}
    elif kind == "pairwise":
        judge = {f"verdicts_{order}": {v: sum(c[f"verdict_{order}"] == v for c in comparisons)
                                       for v in ("first", "second", "tie")} for order in ("a_first", "b_first")}
        judge["unparsed"] = sum((not c["parsed_a_first"]) + (not c["parsed_b_first"]) for c in comparisons)
        judge["judge_replies"] = 2 * n
    else:
        judge = {"accuracy_a": sum(c["correct_a"] for c in comparisons) / n,
                 "accuracy_b": sum(c["correct_b"] for c in comparisons) / n}
    stats = json.loads(json.dumps(win_stats(records, seed=seed).as_dict()))  # tuples as JSON lists
    return stats, judge


def test_every_number_in_judge_json_follows_from_the_records(tiny_models, tmp_path, capsys):
    """The key test: sampled answers of two models judged by a reward model; judge.json recomputed from records."""
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    args = ["judge", "--model_a", tiny_models["a"], "--model_b", tiny_models["b"], "--prompts", prompts,
            "--samples", "2", "--max_new_tokens", "5", "--seed", "7", "--reward_model", tiny_models["rm"],
            "--batch_size", "3", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "win rate of A" in printed and "3 x 2 = 6 comparisons" in printed
    records, summary = read_outputs(out)
    assert [r["id"] for r in records] == [0, 1, "c"]
    assert [[(c["sample"], c["seed"]) for c in r["comparisons"]] for r in records] == [
        [(s, sample_seed(7, i, s)) for s in range(2)] for i in range(3)]
    stats, judge = recompute("reward", records, seed=7)
    assert summary["stats"] == stats and summary["judge"] == judge
    assert summary["settings"]["samples"] == 2 and summary["settings"]["temperature"] == 1.0
    assert summary["settings"]["seed"] == 7 and summary["settings"]["judge_kind"] == "reward"
    scores = {c["score_a"] for r in records for c in r["comparisons"]} | {
        c["score_b"] for r in records for c in r["comparisons"]}
    assert len(scores) > 2  # different answers, different scores
    page = (out / "judge.html").read_text()
    assert "data:image/png;base64," in page and "why is the sky blue" in page
    assert main(args) == 0  # each (prompt, sample) from its own seed: a rerun is the same
    assert read_outputs(out)[0] == records


def test_answer_files_pairwise_local_judge_and_reference(tiny_models, tmp_path, capsys):
    """Answers from orpo generate files (one with two models, named by :MODEL), judged by a local LLM in both orders
    and by reference answers; judge.json recomputed from the records each time."""
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    rows_a = [{"id": 0, "sample": 0, "prompt": "why is the sky blue", "answers": {"m": " Blue\n"}},
              {"id": 1, "sample": 0, "prompt": "what is a", "answers": {"m": "a is 12."}},
              {"id": "c", "sample": 0, "prompt": "good or bad", "answers": {"m": "bad"}}]
    rows_b = [{"id": r["id"], "prompt": r["prompt"], "answers": {"x": "no", "y": "Good" if r["id"] == "c" else "no"}}
              for r in rows_a]  # no "sample": sample 0
    a, b = write_jsonl(tmp_path / "a.jsonl", rows_a), write_jsonl(tmp_path / "b.jsonl", rows_b)
    out = tmp_path / "ref"
    assert main(["judge", "--answers_a", a, "--answers_b", f"{b}:y", "--prompts", prompts, "--reference",
                 "--output", str(out)]) == 0
    records, summary = read_outputs(out)
    assert [c["outcome"] for r in records for c in r["comparisons"]] == [1.0, 1.0, 0.0]
    assert summary["judge"] == {"accuracy_a": 2 / 3, "accuracy_b": 1 / 3}
    assert (summary["stats"], summary["judge"]) == recompute("reference", records, seed=0)
    assert "accuracy               A 0.667, B 0.333" in capsys.readouterr().out

    out = tmp_path / "pairwise"
    assert main(["judge", "--answers_a", a, "--answers_b", f"{b}:x", "--judge_model", tiny_models["a"],
                 "--judge_max_tokens", "4", "--output", str(out)]) == 0
    records, summary = read_outputs(out)
    assert (summary["stats"], summary["judge"]) == recompute("pairwise", records, seed=0)
    assert summary["judge"]["unparsed"] == 6  # a random tiny model writes no verdict: all ties, counted
    assert all(c["outcome"] == 0.5 for r in records for c in r["comparisons"])
    assert "[[1]]" in summary["settings"]["judge_prompt"]
    page = (out / "judge.html").read_text()
    assert "<tr><th>A's answer first</th><td>0</td><td>0</td><td>3</td></tr>" in page
    assert "<td>0.50 (0.5)</td>" in page


def test_outcomes_from_evidence_by_hand():
    assert outcome("reward", {"score_a": 0.3, "score_b": -1.0}) == 1.0
    assert outcome("pairwise", {"verdict_a_first": "first", "verdict_b_first": "second"}) == 1.0
    assert outcome("pairwise", {"verdict_a_first": "first", "verdict_b_first": "first"}) == 0.5  # position bias
    assert outcome("pairwise", {"verdict_a_first": "tie", "verdict_b_first": "first"}) == 0.5
    assert outcome("reference", {"correct_a": False, "correct_b": True}) == 0.0
    assert outcome("reference", {"correct_a": True, "correct_b": True}) == 0.5
    items = [{"id": 5, "prompt": "p"}, {"id": 6, "prompt": "q"}, {"id": 5, "prompt": "p"}]
    assert build_records(items, ["x", "y", "z"]) == [{"id": 5, "prompt": "p", "comparisons": ["x", "z"]},
                                                      {"id": 6, "prompt": "q", "comparisons": ["y"]}]


@pytest.mark.parametrize("flags, message", [
    ([], "no judge; name exactly one judge"),
    (["--reward_model", "x", "--reference"], "--reward_model and --reference together"),
    (["--reference", "--samples", "2", "--temperature", "0"], "--samples 2 with --temperature 0: greedy decoding"),
    (["--reference", "--model_b", None], "side B needs exactly one of --model_b"),
    (["--reward_model", "./nowhere"], "--reward_model ./nowhere: no such model file or directory"),
    (["--judge_url", "ftp://x"], "--judge_url ftp://x: expected an http:// or https:// URL"),
    (["--judge_model", "./j", "--judge_model_name", "m"], "--judge_model_name names the model of --judge_url"),
])
def test_refusals_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, flags, message):
    import orpo.train.models

    monkeypatch.setattr(orpo.train.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = ["judge", "--model_a", str(tmp_path / "a"), "--model_b", str(tmp_path / "b"), "--prompts", prompts]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if flags[-1:] == [None]:
        flags = flags[:-1] + [str(tmp_path / "b")]
        args += ["--answers_b", str(tmp_path / "b.jsonl")]
    assert main(args + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_reward_model_with_two_outputs_is_refused(tiny_models, tmp_path, capsys):
    two = save_tiny_reward_model(tmp_path / "rm2", num_labels=2)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    capsys.readouterr()
    assert main(["judge", "--model_a", tiny_models["a"], "--model_b", tiny_models["b"], "--prompts", prompts,
                 "--reward_model", two, "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (f"orpo: error: --reward_model {two}: 2 outputs (num_labels); a reward "
                                               "model has one (a score)")
    assert not (tmp_path / "o").exists()
    assert main(["judge", "--model_a", tiny_models["a"], "--model_b", tiny_models["b"], "--prompts", prompts,
                 "--reward_model", tiny_models["a"]]) == 2
    assert "a LlamaForCausalLM; a reward model is a sequence classifier" in capsys.readouterr().err


def test_missing_reference_field_is_one_line(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "reference": "x"}, {"prompt": "b"}])
    options = JudgeOptions(model_a="a", model_b="b", prompts=prompts, reference=True)
    with pytest.raises(OrpoError, match=r"p.jsonl, line 2: --reference needs a 'reference' \(or 'answer'\) field"):
        plan_sides(options)


def test_answer_files_that_do_not_match_are_one_line(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    row = {"id": 0, "prompt": "why is the sky blue", "answers": {"m": "x"}}
    a = write_jsonl(tmp_path / "a.jsonl", [row, {**row, "id": 1, "prompt": "what is a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [row])
    two = write_jsonl(tmp_path / "two.jsonl", [{**row, "answers": {"m": "x", "n": "y"}}])
    other = write_jsonl(tmp_path / "other.jsonl", [{**row, "prompt": "what is b"}])
    cases = [
        (dict(answers_a=a, answers_b=b),
         r"side A has prompt '1' sample 0, which the other side \(.*b.jsonl\) does not"),
        (dict(answers_a=b, answers_b=two), r"two.jsonl, line 1: answers of 2 models \(m, n\); name one: "
                                           r"--answers_b .*two.jsonl:MODEL"),
        (dict(answers_a=b, answers_b=f"{two}:z"), r"two.jsonl, line 1: no answer of 'z'; it has m, n"),
        (dict(answers_a=b, answers_b=other), r"prompt '0': its text differs between side A"),
        (dict(answers_a=b, answers_b=other, prompts=prompts), r"other.jsonl, line 1: prompt 0 differs from --prompts'"),
        (dict(model_a="m", answers_b=b, prompts=prompts, samples=1), r"side A has prompt '1' sample 0"),
        (dict(model_a="m", answers_b=b, prompts=prompts), r"side A has prompt '0' sample 1"),
        (dict(answers_a=str(tmp_path / "none.jsonl"), answers_b=b), r"--answers_a .*none.jsonl: cannot open"),
    ]
    for fields, message in cases:
        with pytest.raises(OrpoError, match=message):
            plan_sides(JudgeOptions(reward_model="rm", **fields))


def test_a_model_side_and_a_file_side_from_the_same_seed_match(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    rows = [{"id": i, "sample": s, "seed": sample_seed(3, i, s), "prompt": p["prompt"], "answers": {"m": "x"}}
            for i, p in enumerate(PROMPTS[:2]) for s in range(2)]
    b = write_jsonl(tmp_path / "b.jsonl", rows)
    side_a, side_b = plan_sides(JudgeOptions(model_a="m", answers_b=b, prompts=prompts, samples=2, seed=3,
                                             reward_model="rm"))
    assert [(i["id"], i["sample"], i["seed"]) for i in side_a.items] == [(r["id"], r["sample"], r["seed"])
                                                                         for r in rows]
    assert side_b.items[1]["messages"] == [{"role": "user", "content": "why is the sky blue"}]


def test_judge_kind():
    assert judge_kind(JudgeOptions(judge_url="http://x")) == "pairwise"
    assert judge_kind(JudgeOptions(reference=True)) == "reference"


def test_help_prints(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["judge", "--help"])
    assert exit_info.value.code == 0 and "--reward_model" in capsys.readouterr().out


def test_limit_keeps_the_first_prompts_of_answer_files(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    rows = [{"id": i, "prompt": p, "answers": {"m": "x"}} for i, p in (("c", "good or bad"), (1, "what is a"),
                                                                       (0, "why is the sky blue"))]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    with_prompts = plan_sides(JudgeOptions(answers_a=a, answers_b=a, prompts=prompts, limit=2, reward_model="rm"))
    assert [i["id"] for i in with_prompts[0].items] == [1, 0]  # the prompts file's first two
    alone = plan_sides(JudgeOptions(answers_a=a, answers_b=a, limit=2, reward_model="rm"))
    assert [i["id"] for i in alone[0].items] == ["c", 1]  # the answer file's first two
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "sample": "1"}])
    with pytest.raises(OrpoError, match=r"bad.jsonl, line 1: sample '1'; expected a sample index, an integer >= 0"):
        plan_sides(JudgeOptions(answers_a=bad, answers_b=bad, reward_model="rm"))
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{**rows[0], "id": "zz"}])
    with pytest.raises(OrpoError, match=r"unknown.jsonl, line 1: prompt id 'zz' is not in --prompts .*p.jsonl"):
        plan_sides(JudgeOptions(answers_a=unknown, answers_b=a, prompts=prompts, reward_model="rm"))


def test_an_answers_file_gives_the_judge_the_whole_prompt_it_was_generated_from(tmp_path):
    """orpo generate writes each prompt's messages; without --prompts the judge sees them (a multi-turn prompt, a
    system message), not only the last message's text. A line without them (an older file) is one user message."""
    from orpo.commands.judge import read_answers

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "why is the sky blue"}]
    path = tmp_path / "gen.jsonl"
    path.write_text(json.dumps({"id": 3, "sample": 0, "seed": 1, "prompt": "why is the sky blue",
                                "messages": messages, "answers": {"m": "air"}}) + "\n"
                    + json.dumps({"id": 4, "prompt": "old line", "answers": {"m": "ok"}}) + "\n")
    items = read_answers(str(path), None, None, "--answers_a")
    assert [item["messages"] for item in items] == [messages, [{"role": "user", "content": "old line"}]]
    path.write_text(json.dumps({"id": 3, "prompt": "x", "messages": "x", "answers": {"m": "air"}}) + "\n")
    with pytest.raises(OrpoError, match=r'line 1: "messages" is not a list of \{"role", "content"\} messages'):
        read_answers(str(path), None, None, "--answers_a")
