"""evaluate.py: the reference path's records, and the choice between the fast and reference paths.

(The fast path's agreement with the reference on tiny models: tests/ops/test_scoring.py; on
SmolLM2 and UltraFeedback: tests/train/test_models.py.)
"""
import pytest
import transformers
import torch

from orpo.commands.evaluate import evaluate_model, reference_records
from orpo.data.render import TokenizedPair
from orpo.errors import OrpoError


def tiny():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(config)


PAIRS = [TokenizedPair([1, 5, 6], [7, 8], [9], index=4), TokenizedPair([1], [3, 4, 5], [6, 7], index=9)]


def test_reference_records_count_tokens_and_respect_nll_scope():
    """Pair 4: prompt 3, chosen 2 → full NLL targets 2 + 2 = 4; pair 9: prompt 1 → 0 + 3."""
    model = tiny()
    full = reference_records(model, PAIRS, pad_token_id=0, nll_scope="full", batch_size=1)
    completion = reference_records(model, PAIRS, pad_token_id=0, nll_scope="completion", batch_size=2)
    assert [(r["index"], r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]) for r in full] == [
        (4, 3, 2, 1), (9, 1, 3, 2)]
    assert [r["nll_tokens"] for r in full] == [4, 3]
    assert [r["nll_tokens"] for r in completion] == [2, 3]
    for f, c in zip(full, completion):
        assert c["nll_sum"] == pytest.approx(-c["chosen_logp_mean"] * c["chosen_tokens"], rel=1e-5)
        assert f["nll_sum"] > c["nll_sum"] or f["prompt_tokens"] == 1
        assert f["log_odds"] == pytest.approx(c["log_odds"], abs=1e-5)  # batch size does not matter


def test_evaluate_model_fast_and_reference_agree_and_bf16_is_for_the_fast_path():
    model = tiny()
    reference = evaluate_model(model, PAIRS, 0, reference=True)
    fast = evaluate_model(model, PAIRS, 0)
    assert [r["index"] for r in fast] == [4, 9]
    assert [r["log_odds"] for r in fast] == pytest.approx([r["log_odds"] for r in reference], abs=1e-5)
    # bf16 autocast: the same pairs, values close to fp32 (bf16 keeps ~3 significant digits)
    bf16 = evaluate_model(model, PAIRS, 0, bf16=True)
    assert [r["chosen_logp_mean"] for r in bf16] == pytest.approx([r["chosen_logp_mean"] for r in fast], rel=0.05)
    with pytest.raises(OrpoError, match="--reference runs the model in its own dtype"):
        evaluate_model(model, PAIRS, 0, reference=True, bf16=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3"])
def test_image_pairs_score_alike_on_the_fast_and_the_reference_path(family):
    """The reference path batches each sequence with its images as a processor would (padded rows, the model's
    own positions and masks: M-RoPE for Qwen2-VL, image blocks for Gemma 3); the fast path lays each image
    prompt out once."""
    from vision_models import image_pair, tiny_vision_model

    model = tiny_vision_model(family)
    size = (56, 84) if family == "qwen2_vl" else (28, 28)
    pairs = [image_pair(family, [size], (5, 7, 4), seed=1, index=0),
             image_pair(family, [size, size], (3, 1, 6), seed=2, index=1)]
    reference = evaluate_model(model, pairs, 0, reference=True, batch_size=2)
    fast = evaluate_model(model, pairs, 0)
    for field in ("chosen_logp_mean", "rejected_logp_mean", "log_odds", "nll_sum"):
        assert [r[field] for r in fast] == pytest.approx([r[field] for r in reference], rel=1e-6, abs=1e-5), field
