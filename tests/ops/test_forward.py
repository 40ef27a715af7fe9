"""forward.py: one batched model call + chunked head == naive per-sequence forwards.

Naive reference: each sequence alone, unpadded, `model(ids).logits.float().log_softmax(-1)`; token t
is scored by the logits at t − 1. Completion sums come from prompt + completion; prompt sums from
the prompt alone. Models are tiny random Llama / Qwen2 models built from configs (no hub access).
"""
import copy

import pytest
import torch
import transformers

from orpo.ops.attention import ATTENTION, use_span_attention
from orpo.errors import OrpoError
from orpo.ops.forward import causal_lm, chunked_head_reason, dense_attention_mask, pair_logps
from orpo.ops.head import neutral_post_head
from orpo.ops.loss import orpo_loss
from orpo.ops.packing import collate_padded, collate_prefix_shared
from orpo.data.render import TokenizedPair

VOCAB = 96
PAD = 0


def tiny_model(arch: str, tied: bool, seed: int = 0) -> transformers.PreTrainedModel:
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=64,
        initializer_range=0.2,  # larger than the default 0.02 so the next-token distribution is far from flat
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    config = transformers.LlamaConfig(**common) if arch == "llama" else transformers.Qwen2Config(**common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    use_span_attention(model)  # SDPA unless a batch carries pair_spans: every layout runs on this model
    return model


def _pair(rng, p, c, r, index):
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=rng).tolist()  # noqa: E731
    return TokenizedPair(prompt_ids=[1] + ids(p - 1), chosen_ids=ids(c), rejected_ids=ids(r), index=index)


def make_pairs(seed=0):
    """Odd lengths, one-token completions, very different completion lengths, a BOS-only prompt."""
    rng = torch.Generator().manual_seed(seed)
    shapes = [(5, 1, 13), (1, 9, 1), (3, 4, 2), (7, 3, 3)]  # (prompt, chosen, rejected)
    return [_pair(rng, *s, i) for i, s in enumerate(shapes)]


def naive_sums(model, pairs):
    """Per pair: chosen/rejected/prompt log-prob sums and counts, one unpadded sequence at a time."""

    def score(seq, first):
        lp = model(input_ids=torch.tensor([seq])).logits.float().log_softmax(-1)[0]
        ids = torch.tensor(seq[first:])
        return lp[first - 1 : len(seq) - 1].gather(1, ids[:, None]).sum(), len(seq) - first

    out = {k: [] for k in ("chosen_sum", "rejected_sum", "prompt_sum", "chosen_tokens", "rejected_tokens",
                           "prompt_targets")}
    for pair in pairs:
        p = len(pair.prompt_ids)
        for kind, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            s, n = score(pair.prompt_ids + completion, p)
            out[f"{kind}_sum"].append(s)
            out[f"{kind}_tokens"].append(n)
        if p > 1:
            s, n = score(pair.prompt_ids, 1)
        else:
            s, n = torch.zeros(()), 0
        out["prompt_sum"].append(s)
        out["prompt_targets"].append(n)
    return {k: torch.stack(v) if k.endswith("sum") else torch.tensor(v) for k, v in out.items()}


def scalar_objective(chosen_sum, rejected_sum, prompt_sum, chosen_tokens, rejected_tokens, nll_tokens):
    """The ORPO loss with nll_scope="full" plus a prompt-only term, so every output gets a gradient."""
    nll = -(chosen_sum.sum() + prompt_sum.sum())
    loss, _, _ = orpo_loss(chosen_sum / chosen_tokens, rejected_sum / rejected_tokens, nll, 0.5, nll_tokens,
                           chosen_sum.shape[0])
    return loss + 0.01 * (rejected_sum * torch.arange(1.0, 1.0 + rejected_sum.shape[0])).sum()


MODELS = [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)]
# the layouts: padded rows; prefix-shared with span attention (all pairs in one row, per-pair SDPA
# calls); prefix-shared with a dense mask and one pair per row (attention_width 1: short rows win)
# or all pairs in one row (attention free: fewest padded tokens win)
LAYOUTS = {
    "padded": lambda pairs: collate_padded(pairs, PAD),
    "spans": lambda pairs: collate_prefix_shared(pairs, PAD, attention="spans"),
    "mask-row-per-pair": lambda pairs: collate_prefix_shared(pairs, PAD, attention="mask", attention_width=1),
    "mask-one-row": lambda pairs: collate_prefix_shared(pairs, PAD, attention="mask", attention_width=10**9),
}


def test_layouts_really_differ():
    pairs = make_pairs()
    assert LAYOUTS["padded"](pairs)["input_ids"].shape[0] == 8
    assert LAYOUTS["spans"](pairs)["input_ids"].shape == (1, sum(p.shared_length for p in pairs))
    assert "attention_mask" not in LAYOUTS["spans"](pairs)
    assert LAYOUTS["mask-row-per-pair"](pairs)["input_ids"].shape[0] == 4
    assert LAYOUTS["mask-one-row"](pairs)["input_ids"].shape[0] == 1
    assert tiny_model("llama", True).config._attn_implementation == ATTENTION


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch,tied", MODELS)
@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_pair_logps_matches_naive_values(arch, tied, chunk_size, layout):
    model = tiny_model(arch, tied)
    pairs = make_pairs()
    with torch.no_grad():
        got = pair_logps(model, LAYOUTS[layout](pairs), chunk_size=chunk_size)
        ref = naive_sums(model, pairs)
    assert got.chosen_tokens.tolist() == [1, 9, 4, 3] == ref["chosen_tokens"].tolist()
    assert got.rejected_tokens.tolist() == [13, 1, 2, 3] == ref["rejected_tokens"].tolist()
    assert got.prompt_targets.tolist() == [4, 0, 2, 6] == ref["prompt_targets"].tolist()
    for key in ("chosen_sum", "rejected_sum", "prompt_sum"):
        value = getattr(got, key)
        assert value.dtype == torch.float32 and value.shape == (4,), key
        # sums of up to 13 fp32 log-probs of magnitude ~5: allow fp32 rounding relative to the sum
        torch.testing.assert_close(value, ref[key], rtol=1e-6, atol=1e-5, msg=key)
    # the distribution is not flat (a near-uniform model would hide position/mask mistakes)
    assert (ref["chosen_sum"] / ref["chosen_tokens"]).std() > 0.05
    torch.testing.assert_close(got.logps_chosen, ref["chosen_sum"] / ref["chosen_tokens"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got.logps_rejected, ref["rejected_sum"] / ref["rejected_tokens"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got.nll_sum("full"), -(ref["chosen_sum"].sum() + ref["prompt_sum"].sum()),
                               rtol=0, atol=5e-5)
    torch.testing.assert_close(got.nll_sum("completion"), -ref["chosen_sum"].sum(), rtol=0, atol=5e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch,tied", MODELS)
def test_pair_logps_matches_naive_gradients(arch, tied, layout):
    model = tiny_model(arch, tied, seed=1)
    pairs = make_pairs(seed=1)
    nll_tokens = sum(len(p.prompt_ids) - 1 + len(p.chosen_ids) for p in pairs)

    got = pair_logps(model, LAYOUTS[layout](pairs), chunk_size=7)
    value = scalar_objective(got.chosen_sum, got.rejected_sum, got.prompt_sum, got.chosen_tokens,
                             got.rejected_tokens, nll_tokens)
    grads = torch.autograd.grad(value, list(model.parameters()))

    ref = naive_sums(model, pairs)
    ref_value = scalar_objective(ref["chosen_sum"], ref["rejected_sum"], ref["prompt_sum"], ref["chosen_tokens"],
                                 ref["rejected_tokens"], nll_tokens)
    ref_grads = torch.autograd.grad(ref_value, list(model.parameters()))

    torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-5)
    names = [n for n, _ in model.named_parameters()]
    assert any("lm_head" in n for n in names) != tied  # the tied head is the embedding parameter
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)
    head = dict(zip(names, grads))["lm_head.weight" if not tied else "model.embed_tokens.weight"]
    assert head.abs().max() > 1e-3  # the head gradient is really there


def test_chunked_head_reason_names_only_what_the_chunked_head_cannot_compute():
    """Plain heads, and scaled, soft-capped and biased heads of known families (FAMILIES below) are
    computed by the chunked head; a head that is not a Linear, or a transform attribute on a family
    head.POST_HEAD does not know, gets a reason (the route then uses the model's own logits)."""
    assert chunked_head_reason(tiny_model("llama", True)) is None and chunked_head_reason(tiny_model("qwen2", False)) is None
    for family in FAMILIES:
        assert chunked_head_reason(family_model(family)) is None
    model = tiny_model("llama", False)
    model.config.final_logit_softcapping = 30.0
    assert chunked_head_reason(model).startswith("LlamaForCausalLM has config.final_logit_softcapping=30.0")
    model = tiny_model("llama", False)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert "the output head is a Sequential, not a Linear" in chunked_head_reason(_DDPLike(model))
    with pytest.raises(ValueError, match="head must be"):
        pair_logps(model, collate_padded(make_pairs(), PAD), chunk_size=4, head="full")


# Tiny random models of the families whose head is changed after lm_head (Gemma: final softcap;
# Cohere: logit_scale; Granite: 1 / logits_scaling) or has a bias (Phi), at values that matter.
FAMILIES = {
    "gemma2": (transformers.Gemma2Config, dict(head_dim=8, final_logit_softcapping=2.0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(head_dim=8, final_logit_softcapping=2.0)),
    "cohere": (transformers.CohereConfig, dict(logit_scale=0.25)),
    "cohere2": (transformers.Cohere2Config, dict(head_dim=8, logit_scale=0.25)),
    "granite": (transformers.GraniteConfig, dict(logits_scaling=4.0)),
    "granitemoe": (transformers.GraniteMoeConfig, dict(logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2)),
    "phi": (transformers.PhiConfig, {}),
}


def family_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_class, head = FAMILIES[family]
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **head)
    torch.manual_seed(seed)
    attention = "eager" if family == "gemma2" else "sdpa"  # Gemma 2 has no SDPA path in transformers
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).float().eval()
    if model.lm_head.bias is not None:  # initialised to 0: make it matter
        with torch.no_grad():
            model.lm_head.bias.copy_(torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.mark.parametrize("head", ["chunked", "logits"])
@pytest.mark.parametrize("chunk_size", [5, 1024])
@pytest.mark.parametrize("family", FAMILIES)
def test_pair_logps_per_family_matches_naive_values(family, chunk_size, head):
    """The padded layout, both heads, against separate full-logits forwards (the model's own transform
    included); the same weights without the transform (Phi: without the bias) give other sums, so a
    missed or doubled one fails."""
    model = family_model(family)
    pairs = make_pairs()
    with torch.no_grad():
        got = pair_logps(model, collate_padded(pairs, PAD), chunk_size=chunk_size, head=head)
        ref = naive_sums(model, pairs)
        with neutral_post_head(model):
            unchanged = naive_sums(model, pairs)
        if family == "phi":
            bias = model.lm_head.bias.clone()
            model.lm_head.bias.zero_()
            unchanged = naive_sums(model, pairs)
            model.lm_head.bias.copy_(bias)
    for key in ("chosen_sum", "rejected_sum", "prompt_sum"):
        torch.testing.assert_close(getattr(got, key), ref[key], rtol=1e-6, atol=1e-5, msg=key)
    assert (unchanged["chosen_sum"] - ref["chosen_sum"]).abs().max() > 0.1


@pytest.mark.parametrize("family", ["gemma2", "cohere", "phi"])
def test_pair_logps_per_family_matches_naive_gradients(family):
    """One ORPO objective through pair_logps (chunked head, padded layout): the gradient of every
    parameter equals the naive path's, with a softcap (Gemma 2), a scale (Cohere), a bias (Phi)."""
    model = family_model(family, seed=1)
    pairs = make_pairs(seed=1)
    nll_tokens = sum(len(p.prompt_ids) - 1 + len(p.chosen_ids) for p in pairs)
    got = pair_logps(model, collate_padded(pairs, PAD), chunk_size=7)
    value = scalar_objective(got.chosen_sum, got.rejected_sum, got.prompt_sum, got.chosen_tokens,
                             got.rejected_tokens, nll_tokens)
    grads = torch.autograd.grad(value, list(model.parameters()))
    ref = naive_sums(model, pairs)
    ref_value = scalar_objective(ref["chosen_sum"], ref["rejected_sum"], ref["prompt_sum"], ref["chosen_tokens"],
                                 ref["rejected_tokens"], nll_tokens)
    ref_grads = torch.autograd.grad(ref_value, list(model.parameters()))
    torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)
    head = dict(zip([id(p) for p in model.parameters()], grads))
    assert head[id(model.lm_head.weight)].abs().max() > 1e-3  # the head's gradient is really there
    if model.lm_head.bias is not None:
        assert head[id(model.lm_head.bias)].abs().max() > 1e-3


class _DDPLike(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def _lora(model, seed=2):
    import peft

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at 0 (adapter = identity); give it weights so it matters
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return lora.eval()


def test_causal_lm_unwraps_peft_and_ddp():
    model = tiny_model("llama", False)
    lora = _lora(model)
    assert causal_lm(lora) is model
    assert causal_lm(_DDPLike(lora)) is model
    assert causal_lm(_DDPLike(model)) is model
    assert causal_lm(model) is model
    assert chunked_head_reason(_DDPLike(lora)) is None


@pytest.mark.parametrize("tied", [False, True])
def test_pair_logps_on_lora_model(tied):
    model = tiny_model("llama", tied, seed=3)
    lora = _lora(model)
    pairs = make_pairs(seed=3)
    nll_tokens = sum(len(p.prompt_ids) - 1 + len(p.chosen_ids) for p in pairs)
    trainable = [(n, p) for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert not model.lm_head.weight.requires_grad

    got = pair_logps(lora, collate_padded(pairs, PAD), chunk_size=4)
    value = scalar_objective(got.chosen_sum, got.rejected_sum, got.prompt_sum, got.chosen_tokens,
                             got.rejected_tokens, nll_tokens)
    value.backward()
    assert model.lm_head.weight.grad is None
    assert model.get_input_embeddings().weight.grad is None
    grads = {n: p.grad.clone() for n, p in trainable}
    for n, p in trainable:
        p.grad = None

    ref = naive_sums(lora, pairs)  # the adapted model, one sequence at a time
    for key in ("chosen_sum", "rejected_sum", "prompt_sum"):
        torch.testing.assert_close(getattr(got, key), ref[key].detach(), rtol=0, atol=1e-5, msg=key)
    ref_value = scalar_objective(ref["chosen_sum"], ref["rejected_sum"], ref["prompt_sum"], ref["chosen_tokens"],
                                 ref["rejected_tokens"], nll_tokens)
    ref_value.backward()
    for n, p in trainable:
        assert grads[n].abs().max() > 0, n
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    # the adapter changes the scores: the LoRA path is really the one being evaluated
    with torch.no_grad(), lora.disable_adapter():
        base = pair_logps(lora, collate_padded(pairs, PAD), chunk_size=4)
    assert (base.chosen_sum - got.chosen_sum.detach()).abs().max() > 1e-3


SLIDING = {
    "mistral": (transformers.MistralConfig, dict(sliding_window=6)),  # every layer slides
    "gemma3": (transformers.Gemma3TextConfig, dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"])),
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
}


def sliding_model(family):
    config_class, window = SLIDING[family]
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **window)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_models_keep_their_window_when_packed(family):
    """Pairs longer than the window (6): the span layout gives each layer its window (Mistral: all
    layers; Gemma 3 and Qwen2: one sliding layer, one global), so the packed per-pair log-probs equal
    transformers' own unpacked forward with its sliding masks."""
    model = sliding_model(family)
    rng = torch.Generator().manual_seed(4)
    pairs = [_pair(rng, 7, 9, 11, 0), _pair(rng, 3, 8, 2, 1), _pair(rng, 9, 1, 6, 2)]
    use_span_attention(model)
    got = pair_logps(model, collate_prefix_shared(pairs, PAD, attention="spans"), chunk_size=8)
    ref = naive_sums(model, pairs)
    for key in ("chosen_sum", "rejected_sum", "prompt_sum"):
        torch.testing.assert_close(getattr(got, key), ref[key].detach(), rtol=0, atol=1e-4, msg=key)
    # the window matters on these pairs: the same weights with a window wider than any pair differ
    wide = copy.deepcopy(model)
    wide.config.sliding_window = 64
    for module in wide.modules():
        if getattr(module, "sliding_window", None) is not None:
            module.sliding_window = 64
    assert (naive_sums(wide, pairs)["chosen_sum"] - ref["chosen_sum"]).abs().max() > 1e-3


def test_dense_attention_mask_per_layer_type_and_implementation():
    """One pair, p=2, c=2, r=2: row [P0 P1 C0 C1 R0 R1] at positions [0 1 2 3 2 3]. With a window of 2
    a sliding layer's query R1 (position 3) sees R0 (position 2) and itself, not P0, P1 (3 − 1 = 2 is
    not < 2); C1 sees C0 and itself; the full layer sees all of its pair's visible tokens."""
    batch = collate_prefix_shared([TokenizedPair([5, 6], [7, 8], [9, 10])], PAD, attention="mask")
    config = transformers.Qwen2Config(use_sliding_window=True, sliding_window=2, max_window_layers=1,
                                      num_hidden_layers=2)
    config._attn_implementation = "sdpa"
    masks = dense_attention_mask(config, batch["attention_mask"], batch["position_ids"], torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert torch.equal(masks["full_attention"], batch["attention_mask"])
    visible = lambda m, q: m[0, 0, q].nonzero().flatten().tolist()  # noqa: E731
    assert visible(masks["full_attention"], 5) == [0, 1, 4, 5] and visible(masks["sliding_attention"], 5) == [4, 5]
    assert visible(masks["full_attention"], 3) == [0, 1, 2, 3] and visible(masks["sliding_attention"], 3) == [2, 3]
    config._attn_implementation = "eager"
    additive = dense_attention_mask(config, batch["attention_mask"], batch["position_ids"], torch.float32)
    assert additive["sliding_attention"][0, 0, 5].tolist() == [torch.finfo(torch.float32).min] * 4 + [0.0, 0.0]
    mistral = transformers.MistralConfig(sliding_window=2)  # every layer slides: one mask
    mistral._attn_implementation = "sdpa"
    single = dense_attention_mask(mistral, batch["attention_mask"], batch["position_ids"], torch.float32)
    assert torch.equal(single, masks["sliding_attention"])
    padded = collate_padded([TokenizedPair([5, 6], [7, 8], [9, 10])], PAD)["attention_mask"]
    assert dense_attention_mask(config, padded, None, torch.float32) is padded
