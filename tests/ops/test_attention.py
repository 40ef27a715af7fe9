"""attention.py: span attention == SDPA with the dense prefix-shared mask, values and gradients.

The reference is one SDPA call per row with `packing.prefix_shared_mask` (key/value heads repeated
for GQA); padding rows of the output are not compared (span attention writes zeros there, the
dense mask lets a padding token see itself).
"""
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from orpo.ops.attention import ATTENTION, causal_mask, span_attention, use_span_attention
from orpo.errors import OrpoError
from orpo.ops.packing import CHOSEN, PROMPT, REJECTED, prefix_shared_mask

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


class _Module(torch.nn.Module):
    """What transformers' SDPA reads from the attention module."""

    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def layout(rows_of_pairs, width):
    """pair_spans, owner and branch [rows, width] for rows of (p, c, r) pairs laid out back to back."""
    spans = []
    owner = torch.full((len(rows_of_pairs), width), -1)
    branch = torch.zeros((len(rows_of_pairs), width), dtype=torch.long)
    pair = 0
    for row, pairs in enumerate(rows_of_pairs):
        offset = 0
        for p, c, r in pairs:
            spans.append([row, offset, p, c, r])
            owner[row, offset : offset + p + c + r] = pair
            branch[row, offset + p : offset + p + c] = CHOSEN
            branch[row, offset + p + c : offset + p + c + r] = REJECTED
            offset += p + c + r
            pair += 1
    return spans, owner, branch


def dense_reference(query, key, value, mask, scaling):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling).transpose(1, 2)


# rows of (prompt, chosen, rejected): one-token branches, a one-token prompt, several pairs in a
# row, a padded tail in the second row
ROWS = [[(3, 1, 4), (1, 5, 2), (6, 2, 1)], [(2, 3, 3)]]
WIDTH = 8 + 8 + 9


@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS])
def test_span_attention_equals_the_dense_masked_sdpa(kv_heads):
    spans, owner, branch = layout(ROWS, WIDTH)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, HEADS, WIDTH, HEAD_DIM, generator=g, requires_grad=True)
    key = torch.randn(2, kv_heads, WIDTH, HEAD_DIM, generator=g, requires_grad=True)
    value = torch.randn(2, kv_heads, WIDTH, HEAD_DIM, generator=g, requires_grad=True)
    weights = torch.randn(2, WIDTH, HEADS, HEAD_DIM, generator=g)
    real = (owner >= 0)[:, :, None, None]  # padding outputs predict nothing

    out, none = span_attention(_Module(), query, key, value, None, scaling=0.3, pair_spans=spans)
    assert none is None and out.shape == (2, WIDTH, HEADS, HEAD_DIM)
    assert (out[~real.expand_as(out)] == 0).all()
    grads = torch.autograd.grad((out * weights * real).sum(), (query, key, value))

    ref = dense_reference(query, key, value, prefix_shared_mask(owner, branch), 0.3)
    ref_grads = torch.autograd.grad((ref * weights * real).sum(), (query, key, value))
    torch.testing.assert_close(out * real, ref * real, rtol=0, atol=1e-6)
    for name, got, want in zip(("query", "key", "value"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)


def test_rejected_never_sees_chosen():
    """Changing the chosen keys/values changes prompt+chosen outputs only, never rejected ones."""
    spans, _, _ = layout([[(2, 3, 3)]], 8)
    g = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, HEADS, 8, HEAD_DIM, generator=g) for _ in range(3))
    out, _ = span_attention(_Module(), query, key, value, None, pair_spans=spans)
    key2, value2 = key.clone(), value.clone()
    key2[:, :, 2:5] += 1.0
    value2[:, :, 2:5] += 1.0
    out2, _ = span_attention(_Module(), query, key2, value2, None, pair_spans=spans)
    assert torch.equal(out[:, :2], out2[:, :2])  # prompt: before chosen
    assert not torch.allclose(out[:, 2:5], out2[:, 2:5])  # chosen sees itself
    assert torch.equal(out[:, 5:], out2[:, 5:])  # rejected


def test_without_spans_it_is_transformers_sdpa():
    g = torch.Generator().manual_seed(2)
    query = torch.randn(2, HEADS, 6, HEAD_DIM, generator=g)
    key, value = (torch.randn(2, KV_HEADS, 6, HEAD_DIM, generator=g) for _ in range(2))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False
    mask[1, 0, 0, 0] = True  # no empty rows
    got, _ = span_attention(_Module(), query, key, value, mask, scaling=0.5)
    want, _ = sdpa_attention_forward(_Module(), query, key, value, mask, scaling=0.5)
    assert torch.equal(got, want)


def test_causal_mask_worked_example():
    """Queries at positions 2, 3, 4 over keys 0..4 (the rejected part of a pair with a 2-token prompt
    and 3 rejected tokens). Causal: key j ≤ query i. Window 2: also i − j < 2, so each query sees
    itself and one key before it."""
    T, F_ = True, False
    assert causal_mask(2, 3, 5, None, torch.device("cpu")).tolist() == [
        [T, T, T, F_, F_],
        [T, T, T, T, F_],
        [T, T, T, T, T],
    ]
    assert causal_mask(2, 3, 5, 2, torch.device("cpu")).tolist() == [
        [F_, T, T, F_, F_],
        [F_, F_, T, T, F_],
        [F_, F_, F_, T, T],
    ]


@pytest.mark.parametrize("window", [2, 3, 5, 6, 20])
def test_sliding_window_equals_the_dense_mask_with_the_window(window):
    """Span attention with a layer's sliding_window == SDPA with the prefix-shared mask restricted
    to i − j < window in pair positions (prompt and chosen at 0.., rejected continuing the prompt)."""
    pairs = [(4, 3, 2), (1, 5, 4)]
    width = sum(map(sum, pairs))
    spans, owner, branch = layout([pairs], width)
    position = torch.cat([torch.cat([torch.arange(p + c), torch.arange(p, p + r)]) for p, c, r in pairs])[None]
    mask = prefix_shared_mask(owner, branch) & ((position[:, :, None] - position[:, None, :]) < window)[:, None]
    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, HEADS, width, HEAD_DIM, generator=g)
    key, value = (torch.randn(1, KV_HEADS, width, HEAD_DIM, generator=g) for _ in range(2))
    got, _ = span_attention(_Module(), query, key, value, None, pair_spans=spans, sliding_window=window)
    want, _ = sdpa_attention_forward(_Module(), query, key, value, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if window < 6:  # the window changes the result: it is really applied
        unwindowed, _ = span_attention(_Module(), query, key, value, None, pair_spans=spans)
        assert (unwindowed - got).abs().max() > 1e-3


def tiny_llama(attn_implementation):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def test_use_span_attention_switches_sdpa_models_and_generation_is_unchanged():
    model = tiny_llama("sdpa").eval()
    ids = torch.tensor([[0, 5, 9, 3], [7, 7, 1, 2]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left padding: the model's own mask path
    before = model(input_ids=ids, attention_mask=mask).logits
    use_span_attention(model)
    use_span_attention(model)  # idempotent
    assert model.config._attn_implementation == ATTENTION
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_use_span_attention_refuses_other_attention_implementations():
    with pytest.raises(OrpoError, match=r"replaces SDPA attention, but the model uses 'eager'.*--packed_attention mask"):
        use_span_attention(tiny_llama("eager"))
