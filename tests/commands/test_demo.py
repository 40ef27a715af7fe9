"""demo.py: the generated preference set is what the demo claims (verifiable JSON vs sentence, right vs wrong
answer), and the printout counts the facts the base model knew that training kept and lost."""
import json

from orpo.commands.demo import answers_as_json, make_pairs, states_fact


def test_pairs_teach_the_format_and_keep_the_content_and_are_split_by_question():
    """Per training question a format pair (the JSON over the same sentence) and a content pair (the right
    JSON over the same JSON with a wrong answer); per held-out question its format pair."""
    train, held_out = make_pairs(seed=0)
    assert len(train) == 2 * 96 and len(held_out) == 24
    kinds = {"format": 0, "content": 0}
    for row in train + held_out:
        assert row["prompt"][0] == {"role": "system", "content": "Answer the question."}
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert answers_as_json(chosen)
        answer = json.loads(chosen)["answer"]
        if answers_as_json(rejected):  # content: the same shape, another answer
            kinds["content"] += 1
            assert json.loads(rejected)["answer"] != answer and not states_fact(rejected, answer)
        else:  # format: the statement alone
            kinds["format"] += 1
            assert rejected == json.loads(chosen)["statement"] and states_fact(rejected, answer)
    assert kinds == {"format": 96 + 24, "content": 96}
    questions = lambda rows: {r["prompt"][-1]["content"] for r in rows}  # noqa: E731
    assert not questions(train) & questions(held_out)
    assert make_pairs(seed=0) == (train, held_out)  # reproducible


def test_answers_as_json_is_strict_about_the_shape():
    assert answers_as_json(' {"statement": "The capital of France is Paris.", "answer": "Paris"} ')
    assert not answers_as_json('{"answer": "Paris"}')
    assert not answers_as_json('["Paris"]')
    assert not answers_as_json("The capital of France is Paris.")


def test_states_fact_finds_the_answer_as_a_whole_word_or_number():
    assert states_fact("The capital of Greece is Athens.", "Athens") and states_fact('{"answer": "athens"}', "Athens")
    assert not states_fact('{"answer": "Macedonia"}', "Athens")
    assert not states_fact("152", "52") and states_fact("it is 52.", "52") and not states_fact("5.2", "2")


def test_sft_baseline_adds_a_column_trained_with_beta_zero(tmp_path, monkeypatch, capsys):
    """The demo's flow on a tiny model (one step per run): before, SFT (beta 0) and ORPO columns, from
    runs that differ only in beta; --export_gguf ends it with the aligned model as a GGUF file."""
    import orpo.train.models
    from orpo.commands import demo
    from orpo.run.trainer import ORPOTrainer
    from tiny import byte_level_chatml_tokenizer, save_tiny_chat_model

    train, held_out = demo.make_pairs(seed=0)
    corpus = [m["content"] for row in train + held_out for key in ("prompt", "chosen", "rejected") for m in row[key]]
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tokenizer=byte_level_chatml_tokenizer(corpus, 400))
    monkeypatch.setattr(orpo.train.models, "fetch_smollm2", lambda: model_dir)
    betas = []
    original_train = ORPOTrainer.train
    monkeypatch.setattr(ORPOTrainer, "train", lambda self, *a, **k: betas.append(self.args.beta) or original_train(self))
    gguf = tmp_path / "gguf" / "demo.gguf"
    result = demo.run_demo(output_dir=str(tmp_path / "demo"), max_steps=1, sft_baseline=True, export_gguf=str(gguf),
                           export_outtype="q8_0")
    assert betas == [0.0, demo.BETA]
    assert list(result)[:3] == ["before", "SFT (beta 0)", "ORPO"]
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "before" in line and "ORPO" in line)
    assert header.split() == ["before", "SFT", "(beta", "0)", "ORPO"]
    for column in ("before", "SFT (beta 0)", "ORPO"):
        assert 0.0 <= result[column]["accuracy"] <= 1.0
    facts = next(line for line in printed.splitlines() if line.startswith("=== facts: the base model states"))
    known = int(facts.split("right answer to ")[1].split(" of ")[0])
    for column in ("SFT (beta 0)", "ORPO"):  # every fact the base knew is counted kept or lost
        assert result[column]["facts_kept"] + result[column]["facts_lost"] == known
    assert (tmp_path / "demo" / "sft").is_dir() and (tmp_path / "demo" / "model").is_dir()
    assert f"{gguf}: " in printed and ", q8_0, llama, " in printed and (gguf.parent / "Modelfile").is_file()
