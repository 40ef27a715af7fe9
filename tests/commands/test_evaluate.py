"""evaluate.py: per-pair records and their summary.

summarize, worked by hand for two pairs with log_odds ln 4 and −ln 4:
    or_loss = (log(1 + 1/4) + log(1 + 4)) / 2 = (0.22314 + 1.60944) / 2 = 0.91629
    accuracy = 1/2; nll = (3 + 5) / (2 + 2) = 2.0; loss = 2.0 + 0.1 · 0.91629
"""
import math

import pytest
import torch
import transformers

from orpo.commands.evaluate import evaluate_pairs, summarize
from orpo.data.render import TokenizedPair


def test_summarize_hand_worked():
    records = [
        {"log_odds": math.log(4), "chosen_logp_mean": -1.0, "rejected_logp_mean": -2.0, "nll_sum": 3.0, "nll_tokens": 2},
        {"log_odds": -math.log(4), "chosen_logp_mean": -3.0, "rejected_logp_mean": -1.0, "nll_sum": 5.0, "nll_tokens": 2},
    ]
    summary = summarize(records, beta=0.1)
    or_loss = (math.log(1.25) + math.log(5)) / 2
    assert summary["or_loss"] == pytest.approx(or_loss)
    assert summary["accuracy"] == 0.5 and summary["pairs"] == 2
    assert summary["log_odds"] == pytest.approx(0.0)
    assert summary["nll"] == 2.0
    assert summary["loss"] == pytest.approx(2.0 + 0.1 * or_loss)
    assert summary["logps/chosen"] == -2.0 and summary["logps/rejected"] == -1.5


def test_summarize_does_not_overflow_for_very_negative_log_odds():
    record = {"log_odds": -1000.0, "chosen_logp_mean": -9.0, "rejected_logp_mean": -0.1, "nll_sum": 1.0, "nll_tokens": 1}
    assert summarize([record], beta=1.0)["or_loss"] == pytest.approx(1000.0)


def test_records_count_tokens_and_respect_nll_scope():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    pairs = [TokenizedPair([1, 5, 6], [7, 8], [9], index=4), TokenizedPair([1], [3, 4, 5], [6, 7], index=9)]
    full = evaluate_pairs(model, pairs, pad_token_id=0, nll_scope="full", batch_size=1)
    completion = evaluate_pairs(model, pairs, pad_token_id=0, nll_scope="completion", batch_size=2)
    assert [(r["index"], r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]) for r in full] == [
        (4, 3, 2, 1), (9, 1, 3, 2)]
    assert [r["nll_tokens"] for r in full] == [4, 3]  # prompt tokens after the first + chosen
    assert [r["nll_tokens"] for r in completion] == [2, 3]
    for f, c in zip(full, completion):
        assert c["nll_sum"] == pytest.approx(-c["chosen_logp_mean"] * c["chosen_tokens"], rel=1e-5)
        assert f["nll_sum"] > c["nll_sum"] or f["prompt_tokens"] == 1
        assert f["log_odds"] == pytest.approx(c["log_odds"], abs=1e-5)  # batch size does not matter
