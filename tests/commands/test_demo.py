"""demo.py: the generated preference set is what the demo claims (verifiable JSON vs sentence)."""
import json

from orpo.commands.demo import answers_as_json, make_pairs


def test_pairs_are_json_answers_over_sentences_and_split_by_question():
    train, held_out = make_pairs(seed=0)
    assert len(train) == 96 and len(held_out) == 24
    for row in train + held_out:
        assert row["prompt"][0] == {"role": "system", "content": "Answer the question."}
        assert answers_as_json(row["chosen"][0]["content"])
        assert not answers_as_json(row["rejected"][0]["content"])
        answer = json.loads(row["chosen"][0]["content"])["answer"]
        assert answer in row["rejected"][0]["content"]  # same answer, different format
    questions = lambda rows: {r["prompt"][-1]["content"] for r in rows}  # noqa: E731
    assert not questions(train) & questions(held_out)
    assert make_pairs(seed=0) == (train, held_out)  # reproducible


def test_answers_as_json_is_strict_about_the_shape():
    assert answers_as_json(' {"answer": "Paris"} ')
    assert not answers_as_json('{"answer": "Paris", "x": 1}')
    assert not answers_as_json('["Paris"]')
    assert not answers_as_json("The capital of France is Paris.")


def test_sft_baseline_adds_a_column_trained_with_beta_zero(tmp_path, monkeypatch, capsys):
    """The demo's flow on a tiny model (one step per run): before, SFT (beta 0) and ORPO columns, from
    runs that differ only in beta; --export_gguf ends it with the aligned model as a GGUF file."""
    import orpo.train.models
    from orpo.commands import demo
    from orpo.train.trainer import ORPOTrainer
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
    assert (tmp_path / "demo" / "sft").is_dir() and (tmp_path / "demo" / "model").is_dir()
    assert f"{gguf}: " in printed and ", q8_0, llama, " in printed and (gguf.parent / "Modelfile").is_file()
