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
