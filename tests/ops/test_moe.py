"""moe.py: router load balancing from orpo's one model call == the model family's own aux loss.

References: each family's own `load_balancing_loss_func` (transformers), the model's own `aux_loss`
and `router_logits` on a plain call with a 2D padding mask, and, for the prefix-shared layouts,
separate forwards of [prompt | chosen] and [prompt | rejected]: router logits are a function of a
token's hidden state, so the packed row's router logits at its prompt, chosen and rejected positions
are those of the separate forwards, and the aux loss over them counts each real token once.
Models are tiny random MoE models built from configs (no hub access).
"""
import dataclasses
import doctest
import importlib
import inspect

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import orpo.ops.moe as moe
from orpo.data.render import TokenizedPair
from orpo.errors import OrpoError
from orpo.ops.attention import use_span_attention
from orpo.ops.forward import dense_attention_mask, model_inputs
from orpo.ops.moe import (
    SWITCH_PARAMETERS, capture_router_logits, router_aux_loss, router_balancing, router_token_mask,
)
from orpo.ops.packing import collate_padded, collate_prefix_shared

VOCAB = 96
PAD = 0

SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, kv_channels=8, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
    max_position_embeddings=128, initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    router_jitter_noise=0.0, output_router_logits=True,
)
OVERRIDES = {
    # layer 0 attention, layer 1 Mamba with experts (only some layers route)
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                       linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8),
}
# families whose attention is SDPA and whose layers carry no state along the sequence: all three layouts
PREFIX_SHARED = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "granitemoe", "phimoe"]
# with only the padded layout (state-space / linear-attention layers) or eager attention (gpt-oss),
# and JetMoE (two routers per layer: attention experts and MLP experts)
OTHERS = ["gpt_oss", "jamba", "qwen3_next", "jetmoe"]


def tiny_moe(model_type: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random MoE causal LM (2 layers, hidden 32, 4 experts, top-2), output_router_logits on."""
    config_class = type(AutoConfig.for_model(model_type))
    fields = {f.name for f in dataclasses.fields(config_class)}
    kwargs = {k: v for k, v in {**SIZES, **OVERRIDES.get(model_type, {}), **overrides}.items() if k in fields}
    torch.manual_seed(seed)
    config = config_class(**kwargs)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    except ValueError:  # no SDPA (gpt-oss: attention sinks)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def make_pairs(seed=0):
    """Odd lengths, one-token completions, a BOS-only prompt."""
    rng = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=rng).tolist()  # noqa: E731
    shapes = [(5, 1, 6), (1, 4, 1), (3, 4, 2), (7, 3, 3)]  # (prompt, chosen, rejected)
    return [TokenizedPair([1] + ids(p - 1), ids(c), ids(r), index=i) for i, (p, c, r) in enumerate(shapes)]


def own_loss_function(model):
    return importlib.import_module(type(model).__module__).load_balancing_loss_func


def switch_families() -> list[str]:
    """Modeling modules of causal LMs that define the Switch Transformer load_balancing_loss_func."""
    names = set()
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        name = model_type_to_module_name(model_type)
        try:
            module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except Exception:  # a family needing an optional dependency
            continue
        function = getattr(module, "load_balancing_loss_func", None)
        if function is not None and tuple(inspect.signature(function).parameters) == SWITCH_PARAMETERS:
            names.add(name)
    return sorted(names)


SWITCH_FAMILIES = switch_families()


def test_docstring_example():
    results = doctest.testmod(moe, raise_on_error=True)
    assert results.failed == 0 and results.attempted == 3


def test_the_survey_still_finds_the_families():
    # a release that renames or changes the function shows up here first
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "jamba", "granitemoe", "qwen3_next"} <= set(
        SWITCH_FAMILIES)


@pytest.mark.parametrize("family", SWITCH_FAMILIES)
def test_router_aux_loss_equals_each_familys_function(family):
    """Value and gradient, with and without a padding mask, 3 layers, 6 experts, top-2."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    rng = torch.Generator().manual_seed(0)
    logits = [torch.randn(2 * 7, 6, generator=rng).requires_grad_() for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 2:] = 0
    for token_mask in (mask, None):
        ours = router_aux_loss(logits, token_mask if token_mask is not None else torch.ones(2, 7), 6, 2)
        theirs = module.load_balancing_loss_func(tuple(logits), 6, 2, token_mask)
        assert ours.dtype == torch.float32 and ours.shape == ()
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-6)
        ours_grad = torch.autograd.grad(ours, logits)
        theirs_grad = torch.autograd.grad(theirs, logits)
        for a, b in zip(ours_grad, theirs_grad):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_router_aux_loss_refuses_a_mask_of_another_shape():
    # what the model's own loss does with orpo's 4D placeholder mask (T² entries), refused clearly here
    with pytest.raises(ValueError, match="do not match 196 tokens"):
        router_aux_loss([torch.randn(14, 4)], torch.zeros(1, 1, 14, 14, dtype=torch.bool), 4, 2)


@pytest.mark.parametrize("family", PREFIX_SHARED + OTHERS)
def test_captured_logits_and_loss_equal_the_models_own_on_the_padded_layout(family):
    model = tiny_moe(family)
    settings = router_balancing(model)
    assert settings is not None and settings.num_experts == 4 and settings.top_k == 2
    assert settings.coef == (model.config.aux_loss_coef if family == "jetmoe" else model.config.router_aux_loss_coef)
    batch = collate_padded(make_pairs(), PAD)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    own = model(**inputs)
    with capture_router_logits(model) as captured:
        out = model(**inputs, output_router_logits=False)
    assert out.aux_loss is None  # the model computed none of its own
    assert len(captured.router_logits) == len(own.router_logits) > 0
    for ours, theirs in zip(captured.router_logits, own.router_logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    loss = router_aux_loss(captured.router_logits, batch["attention_mask"], settings.num_experts, settings.top_k)
    torch.testing.assert_close(loss, own.aux_loss.float(), rtol=1e-6, atol=1e-6)
    # the same gradient on every parameter (the routers', and the layers below them through the hidden states)
    parameters = list(model.parameters())
    ours_grad = torch.autograd.grad(loss, parameters, allow_unused=True)
    theirs_grad = torch.autograd.grad(own.aux_loss, parameters, allow_unused=True)
    assert sum(g is not None for g in ours_grad) > len(captured.router_logits)
    for a, b in zip(ours_grad, theirs_grad):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def separate_router_logits(model, pair):
    """Per layer [p + c + r, E]: prompt and chosen tokens from [prompt | chosen], rejected tokens from
    [prompt | rejected], each its own unpadded forward."""
    p = len(pair.prompt_ids)
    chosen = model(input_ids=torch.tensor([pair.prompt_ids + pair.chosen_ids]), output_router_logits=True)
    rejected = model(input_ids=torch.tensor([pair.prompt_ids + pair.rejected_ids]), output_router_logits=True)
    return [torch.cat([a, b[p:]]) for a, b in zip(chosen.router_logits, rejected.router_logits)]


@pytest.mark.parametrize("attention", ["spans", "mask"])
@pytest.mark.parametrize("family", PREFIX_SHARED)
def test_prefix_shared_layouts_count_each_token_once(family, attention):
    model = tiny_moe(family)
    use_span_attention(model)
    settings = router_balancing(model)
    pairs = make_pairs()
    batch = collate_prefix_shared(pairs, PAD, attention=attention, attention_width=16)
    inputs = model_inputs(batch)
    if attention == "mask":
        assert batch["input_ids"].shape[0] > 1  # several rows with padded tails
        inputs["attention_mask"] = dense_attention_mask(model.config, batch["attention_mask"], batch["position_ids"],
                                                        model.dtype)
    # the problem: the model's own aux loss reads the 4D mask as a padding mask (should a release stop
    # raising here, capture_router_logits stays right; router_logits_off is then optional)
    with pytest.raises(RuntimeError, match="must match the size"):
        model(**inputs)
    with capture_router_logits(model) as captured:
        model(**inputs, output_router_logits=False)
    rows, width = batch["input_ids"].shape
    mask = router_token_mask(batch)
    assert mask.shape == (rows, width) and int(mask.sum()) == int(batch["num_tokens"])
    # the packed rows' router logits at each pair's positions == separate forwards'
    expected = [[] for _ in captured.router_logits]
    for row, offset, p, c, r in batch["pair_spans"].tolist():
        assert mask[row, offset : offset + p + c + r].all()
        tokens = batch["input_ids"][row, offset : offset + p + c + r].tolist()
        (pair,) = [pair for pair in pairs if pair.prompt_ids + pair.chosen_ids + pair.rejected_ids == tokens]
        for layer, (packed, alone) in enumerate(zip(captured.router_logits, separate_router_logits(model, pair))):
            at = packed.view(rows, width, -1)[row, offset : offset + p + c + r]
            torch.testing.assert_close(at, alone, rtol=1e-5, atol=1e-5)
            expected[layer].append(alone)
    loss = router_aux_loss(captured.router_logits, mask, settings.num_experts, settings.top_k)
    by_hand = own_loss_function(model)(tuple(torch.cat(e) for e in expected), settings.num_experts, settings.top_k)
    torch.testing.assert_close(loss, by_hand.float(), rtol=1e-5, atol=1e-6)
    # the padded layout counts the same tokens (the rejected rows' prompts are the chosen rows')
    padded = collate_padded(pairs, PAD)
    with capture_router_logits(model) as captured_padded:
        model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], output_router_logits=False)
    padded_mask = router_token_mask(padded)
    assert int(padded_mask.sum()) == sum(pair.shared_length for pair in pairs)
    torch.testing.assert_close(
        router_aux_loss(captured_padded.router_logits, padded_mask, settings.num_experts, settings.top_k),
        loss, rtol=1e-5, atol=1e-6,
    )


def test_token_masks_by_layout():
    pairs = [TokenizedPair([1, 5, 6], [7, 8], [9], 0), TokenizedPair([1], [4], [20, 21], 1)]
    spans = collate_prefix_shared(pairs, PAD)
    assert router_token_mask(spans).tolist() == [[True] * 10]
    rows = collate_prefix_shared(pairs, PAD, attention="mask", attention_width=1)  # one pair per row
    assert router_token_mask(rows).int().tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    padded = collate_padded(pairs, PAD)
    assert router_token_mask(padded).int().tolist() == [
        [1, 1, 1, 1, 1],  # prompt + chosen
        [0, 0, 0, 1, 0],  # rejected only (its prompt is the chosen row's), padding never
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
    ]


def test_router_balancing_settings(tmp_path):
    assert router_balancing(tiny_moe("mixtral", output_router_logits=False)) is None
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    assert router_balancing(dense) is None
    # set at load time (from_pretrained's keyword, e.g. through model_init_kwargs)
    tiny_moe("mixtral", output_router_logits=False, router_aux_loss_coef=0.02).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, output_router_logits=True)
    assert router_balancing(loaded) == moe.RouterBalancing(coef=0.02, num_experts=4, top_k=2)
    # output_router_logits that only returns the logits (no aux loss in the family's forward)
    glm = AutoModelForCausalLM.from_config(transformers.Glm4MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=0, output_router_logits=True))
    assert router_balancing(glm) is None
    # a load-balancing loss that is not Switch Transformer's (product-key experts)
    doge = AutoModelForCausalLM.from_config(transformers.DogeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, is_moe=True, num_experts=16, num_experts_per_tok=2, output_router_logits=True))
    with pytest.raises(OrpoError, match="DogeForCausalLM: its router load-balancing loss"):
        router_balancing(doge)


def test_capture_is_for_the_block_only_and_refuses_the_models_own_loss():
    model = tiny_moe("mixtral")
    ids = torch.tensor([[1, 5, 6, 7]])
    with capture_router_logits(model) as captured:
        with pytest.raises(OrpoError, match="output_router_logits=False"):
            model(input_ids=ids)  # config.output_router_logits: the model would compute its own loss
    with pytest.raises(OrpoError, match="one model call, got 0"):
        captured.router_logits
    with capture_router_logits(model) as captured:
        model(input_ids=ids, output_router_logits=False)
    model(input_ids=ids, output_router_logits=False)  # after the block: not collected
    assert len(captured.router_logits) == 2
    model(input_ids=ids)  # and the model is as before: its own aux loss
    with capture_router_logits(model) as captured:
        model(input_ids=ids, output_router_logits=False)
        model(input_ids=ids, output_router_logits=False)
    with pytest.raises(OrpoError, match="one model call, got 2"):
        captured.router_logits


def test_gradient_through_activation_checkpointing():
    """transformers' (non-reentrant) activation checkpointing: the captured logits keep their graph and the
    recomputation in backward records nothing."""
    grads = []
    batch = collate_padded(make_pairs(), PAD)
    for checkpointing in (False, True):
        model = tiny_moe("qwen3_moe").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        settings = router_balancing(model)
        with capture_router_logits(model) as captured:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=False,
                  use_cache=False)
        loss = router_aux_loss(captured.router_logits, router_token_mask(batch), settings.num_experts, settings.top_k)
        loss.backward()
        assert len(captured.calls) == 1
        grads.append([p.grad.clone() for name, p in model.named_parameters() if name.endswith("gate.weight")])
    assert grads[0] and all(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_router_logits_off_for_every_orpo_call():
    model = tiny_moe("olmoe")
    use_span_attention(model)
    assert moe.router_logits_off(model) == {"output_router_logits": False}
    assert moe.router_logits_off(tiny_moe("olmoe", output_router_logits=False)) == {}
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    assert moe.router_logits_off(dense) == {}
    # scoring without the aux loss (no capture): the spans layout's call runs
    batch = collate_prefix_shared(make_pairs(), PAD)
    with torch.no_grad():
        out = model(**model_inputs(batch), **moe.router_logits_off(model))
    assert out.aux_loss is None


def test_router_aux_loss_stays_fp32_under_autocast():
    rng = torch.Generator().manual_seed(0)
    logits = [torch.randn(300, 8, generator=rng).bfloat16() for _ in range(2)]
    mask = torch.rand(300, generator=rng) > 0.3
    exact = router_aux_loss(logits, mask, 8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = router_aux_loss(logits, mask, 8, 2)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1e-6, atol=0)
