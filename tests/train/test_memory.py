"""train/memory.py: the activation estimate against what a forward really keeps for backward, worked
examples of the formula, and the choice it leads to."""
import random

import pytest
import torch
import transformers
from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

from orpo.data.render import TokenizedPair
from orpo.ops.attention import use_span_attention
from orpo.ops.forward import batch_collator, pair_logps
from orpo.train.memory import (DecoderShape, LayerShape, choose_checkpointing, decoder_shape, estimate_step,
                               free_memory, kept_activation_bytes, largest_micro_batch, layer_activation_bytes,
                               plan_checkpointing, plan_head_probs, recomputed_layers, step_bytes)

SMALL = DecoderShape.uniform(layers=4, hidden=4, intermediate=8, kv_width=2, vocab=10, norms_per_layer=2, params=1000,
                             trainable=1000, weight_bytes=4)

SIZES = dict(vocab_size=300, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32)
# Gemma 4 (a heterogeneous config: its full-attention layers override head_dim): sliding and full layers alternate
# as gemma-4-E2B/E4B: per-layer inputs, the last layers reuse earlier keys/values, with double-wide MLPs
GEMMA4_E = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
    head_dim=16, global_head_dim=32, num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=16,
    vocab_size_per_layer_input=300)
GEMMA4 = dict(  # as gemma-4-31B: keys as values and one key/value head in the full layers, no per-layer inputs
    hidden_size=64, intermediate_size=176, layer_types=["sliding_attention", "full_attention"], head_dim=16,
    global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=1, hidden_size_per_layer_input=0)
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {}),  # + q/k norms
    "gemma3": (transformers.Gemma3TextConfig, {}),  # + q/k norms, pre/post feed-forward norms, GELU
    "gemma4-e": (transformers.Gemma4TextConfig, GEMMA4_E),  # + v norms, per-layer widths
    "gemma4": (transformers.Gemma4TextConfig, GEMMA4),
}


def saved_bytes(model, pairs, autocast: bool) -> int:
    """Bytes of the distinct tensors (by storage) one forward saves for backward, weights excluded."""
    batch = batch_collator(model, 0, "spans")(pairs)
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autocast("cpu", torch.bfloat16, enabled=autocast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pair_logps(model, batch, 1024)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in weights)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_is_within_15_percent_of_what_a_forward_saves(family, autocast):
    """Four pairs of 10-200 tokens per part through the span route. Measured here: the estimate is
    0.97-1.01 of the saved bytes (0.998 on SmolLM2-135M, 4 UltraFeedback pairs, 3180 tokens). Under
    autocast the saved bytes include bf16 copies of the layers' weights, which the step counts
    separately (`step_bytes`), so they are added here."""
    config_class, extra = FAMILIES[family]
    config = config_class(**{**SIZES, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    use_span_attention(model)
    rng = random.Random(0)
    pairs = [TokenizedPair(*[[rng.randrange(3, 300) for _ in range(rng.randint(10, 200))] for _ in range(3)])
             for _ in range(4)]
    tokens, pair_lengths = largest_micro_batch(
        [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], 4, True, "spans")
    assert tokens == sum(p.shared_length for p in pairs)
    a = 2 if autocast else 4
    shape = decoder_shape(model, config)
    estimate = kept_activation_bytes(shape, tokens, pair_lengths, a)
    if autocast:
        estimate += 2 * sum(p.numel() for name, p in model.named_parameters() if ".layers." in name)
    measured = saved_bytes(model, pairs, autocast)
    assert 0.85 * measured <= estimate <= 1.15 * measured, (estimate / measured, shape)


def test_decoder_shape_reads_the_config_and_counts_norms():
    config = transformers.Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.model.embed_tokens.weight.requires_grad_(False)
    shape = decoder_shape(model, config)
    assert (shape.layers, shape.hidden, shape.vocab) == (2, 64, 300)
    # norms: input, post-attention, pre- and post-feed-forward (4 · 64), query (4 heads · 16), key (1 · 16)
    assert shape.per_layer == (LayerShape(query=64, kv_width=16, intermediate=96, norm_width=4 * 64 + 64 + 16),) * 2
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.trainable == shape.params - 300 * 64 and shape.weight_bytes == 4


def test_decoder_shape_reads_each_gemma4_layer_from_its_modules():
    """Gemma 4's config holds head_dim per layer (transformers raises AmbiguousGlobalPerLayerAttributeError on
    config.head_dim): the full-attention layers (1, 3) have heads twice as wide, layers 2 and 3 reuse the keys
    and values of layers 0 and 1 (no k/v projections or norms of their own) and have double-wide MLPs."""
    config = transformers.Gemma4TextConfig(**{**SIZES, **GEMMA4_E})
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        _ = config.head_dim
    model = transformers.AutoModelForCausalLM.from_config(config)
    shape = decoder_shape(model, config)
    hidden_norms = 5 * 64  # input, post-attention, pre-/post-feed-forward, post-per-layer-input
    assert shape.per_layer == (
        LayerShape(query=64, kv_width=32, intermediate=176, norm_width=hidden_norms + 64 + 32 + 32,
                   per_layer_input=16),
        LayerShape(query=128, kv_width=64, intermediate=176, norm_width=hidden_norms + 128 + 64 + 64,
                   per_layer_input=16),
        LayerShape(query=64, kv_width=32, intermediate=352, norm_width=hidden_norms + 64, per_layer_input=16,
                   shares_kv=True),
        LayerShape(query=128, kv_width=64, intermediate=352, norm_width=hidden_norms + 128, per_layer_input=16,
                   shares_kv=True),
    )
    # without layer modules to read (a model orpo cannot look into): each layer's own config, two norms
    config_only = decoder_shape(torch.nn.Linear(2, 2), config).per_layer
    assert [(layer.query, layer.kv_width, layer.intermediate) for layer in config_only] == [(64, 32, 176),
                                                                                           (128, 64, 176)] * 2
    # the 31B-like shape: full layers read keys as values, with one key/value head
    config = transformers.Gemma4TextConfig(**{**SIZES, **GEMMA4})
    shape = decoder_shape(transformers.AutoModelForCausalLM.from_config(config), config)
    assert [(layer.query, layer.kv_width) for layer in shape.per_layer] == [(64, 32), (128, 32)]


def test_decoder_shape_of_a_model_without_attention_heads():
    """Mamba's config has no num_attention_heads: each layer is read as one query as wide as the hidden state,
    its MLP width from config.intermediate_size (the mixer's inner width), and its norm found by name."""
    config = transformers.MambaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      state_size=8)
    assert not hasattr(config, "num_attention_heads")
    shape = decoder_shape(transformers.AutoModelForCausalLM.from_config(config), config)
    assert shape.per_layer == (LayerShape(query=64, kv_width=64, intermediate=128, norm_width=64),) * 2


def test_layer_activation_bytes_worked_example():
    """Four alike layers, h=4, q=4, i=8, kv=2, 2 norms of the hidden state (n = 8), 10 tokens, one pair with p=2, r=3:
    fp32 (a=4, c=2):      per token 4·(4·8 + 2·2 + 3·4 + 2·4) + 8·8 = 4·56 + 64 = 288;
                          per pair 4·(2+3)·(2·2+3) = 140 → 10·288 + 140 = 3020
    autocast (a=2, c=5):  per token 2·(32 + 4 + 12 + 20) + 64 = 200; per pair 2·5·7 = 70 → 2070"""
    assert layer_activation_bytes(SMALL, 10, [(2, 3)], 4) == [3020] * 4
    assert layer_activation_bytes(SMALL, 10, [(2, 3)], 2) == [2070] * 4
    assert layer_activation_bytes(SMALL, 10, [], 4) == [2880] * 4


def test_selective_layer_bytes_worked_example():
    """SMALL's layers under selective recompute keep their matmul and attention outputs only, per token
    a·(2q + 2kv + 2i + 2h): fp32 4·(8 + 4 + 16 + 8) = 144 → 1440 for 10 tokens (half of 2880); the pair's
    keys, values and mask are recomputed. Every layer selective: 4·1440 kept + 10·4·4·4 fp32 inputs + one
    layer's recompute of what it does not keep (2880 − 1440) + final norm and head input 480 = 8320."""
    assert layer_activation_bytes(SMALL, 10, [(2, 3)], 4, selective=True) == [1440] * 4
    assert layer_activation_bytes(SMALL, 10, [], 2, selective=True) == [720] * 4
    assert kept_activation_bytes(SMALL, 10, [], 4, recomputed_layers(4, 1), selective=True) == 8320
    assert kept_activation_bytes(SMALL, 10, [], 4, 4, selective=True) == 8320  # a count: alike layers, the same
    assert step_bytes(SMALL, 10, [], 4, range(4), 4, True, selective=True) == 8320 + 480 + 12000


def test_step_bytes_worked_example():
    """fp32, 10 tokens, no pair term, chunk 4 (of 10 tokens), weights on the device:
    layers 4·2880 + final norm and head input 10·4·(8+4) = 11520 + 480 = 12000
    head chunk 4·10·(8+4) = 480; gradients + AdamW 1000·(4+8) = 12000      → 24480
    every layer checkpointed: 4·10·4·4 (fp32 inputs) + 480 + 2880 (one layer recomputed) = 4000 for activations
    → 4000 + 480 + 12000 = 16480; weights not yet on the device: + 1000·4."""
    assert step_bytes(SMALL, 10, [], 4, 0, 4, True) == 24480
    assert step_bytes(SMALL, 10, [], 4, 4, 4, True) == 16480
    assert step_bytes(SMALL, 10, [], 4, 4, 4, False) == 16480 + 4000
    # bf16 autocast of fp32 weights: + a bf16 copy of every weight
    # layers 4·(10·200), final norm + head input 10·4·10, head chunk 4·10·10, the copy 1000·2, state 12000
    assert step_bytes(SMALL, 10, [], 2, 0, 4, True) == 8000 + 400 + 400 + 2000 + 12000


def test_layers_of_different_widths_are_summed_each_and_recomputed_where_transformers_does():
    """SMALL's layer (2880 bytes for 10 fp32 tokens) alternating with one whose query is twice as wide:
    per token 4·(4·8 + 2·2 + 3·8 + 2·4) + 8·8 = 336 → 3360. Layers [2880, 3360, 2880, 3360], final norm and
    head input 480; a recomputed layer keeps its fp32 input, 10·4·4 = 160.
    none recomputed:          2·2880 + 2·3360 + 480                           = 12960
    every 2nd (layers 0, 2):  2·3360 + 2·160 + 2880 (the larger recompute) + 480 = 10400
    every 3rd (layers 0, 3):  2880 + 3360 + 2·160 + 3360 + 480                 = 10400
    a count of 2 (which ones unknown): the two smallest recomputed, the largest recompute:
                              2·3360 + 2·160 + 3360 + 480                     = 10880 (a bound)"""
    small = SMALL.per_layer[0]
    wide = LayerShape(query=8, kv_width=2, intermediate=8, norm_width=8)
    mixed = DecoderShape((small, wide) * 2, hidden=4, vocab=10, params=1000, trainable=1000, weight_bytes=4)
    assert layer_activation_bytes(mixed, 10, [], 4) == [2880, 3360] * 2
    assert list(recomputed_layers(4, 2)) == [0, 2] and list(recomputed_layers(4, 3)) == [0, 3]
    assert kept_activation_bytes(mixed, 10, [], 4) == 12960
    assert kept_activation_bytes(mixed, 10, [], 4, recomputed_layers(4, 2)) == 10400
    assert kept_activation_bytes(mixed, 10, [], 4, recomputed_layers(4, 3)) == 10400
    assert kept_activation_bytes(mixed, 10, [], 4, 2) == 10880
    assert step_bytes(mixed, 10, [], 4, [0, 2], 4, True) == 10400 + 480 + 12000
    assert kept_activation_bytes(SMALL, 10, [], 4, 2) == kept_activation_bytes(SMALL, 10, [], 4, [0, 2])  # alike layers


def test_choose_checkpointing_takes_the_fewest_recomputed_layers_that_fit():
    args = (SMALL, 10, [], 4, 4, True)
    assert choose_checkpointing(*args, budget=10**9) == (None, False, 24480)
    # full recompute only (selective_checkpointing false):
    # every 4th layer = layer 0 only: 3·2880 + 10·4·4 + 2880 (recompute) + 480 + 480 + 12000 = 24640 > off
    # every 3rd = layers 0 and 3: 2·2880 + 2·160 + 2880 + 480 + 480 + 12000 = 21920 (every 2nd checkpoints two too)
    assert choose_checkpointing(*args, budget=22000, selective=False) == (3, False, 21920)
    assert choose_checkpointing(*args, budget=17000, selective=False) == (1, False, 16480)
    assert choose_checkpointing(*args, budget=1, selective=False) == (1, False, 16480)  # nothing fits: every layer
    # orpo decides: selective first (a layer keeps 1440 of 2880), full recompute of every layer last
    # selective every 3rd: 2·2880 + 2·1440 + 2·160 + 1440 (one recompute) + 480 + 480 + 12000 = 23360
    # selective every layer: 4·1440 + 4·160 + 1440 + 480 + 480 + 12000 = 20800
    assert choose_checkpointing(*args, budget=23500) == (3, True, 23360)
    assert choose_checkpointing(*args, budget=21000) == (1, True, 20800)
    assert choose_checkpointing(*args, budget=17000) == (1, False, 16480)
    assert choose_checkpointing(*args, budget=1) == (1, False, 16480)
    assert choose_checkpointing(*args, budget=17000, selective=True) == (1, True, 20800)  # the user's kind only


def test_largest_micro_batch_per_layout():
    lengths = [(5, 3, 2), (10, 1, 1), (2, 2, 2), (4, 6, 1)]  # shared lengths 10, 12, 6, 11
    assert largest_micro_batch(lengths, 2, True, "spans") == (23, [(10, 1), (4, 1)])
    assert largest_micro_batch(lengths, 2, True, "mask") == (23, [(0, 23)])
    # padded: a chosen and a rejected row per pair, as long as the longest sequence (10 + 1)
    assert largest_micro_batch(lengths, 2, False, "spans") == (2 * 2 * 11, [])


def test_plan_checkpointing_says_why():
    lengths = [(300, 200, 200)] * 8
    big = DecoderShape.uniform(layers=30, hidden=576, intermediate=1536, kv_width=192, vocab=49152, norms_per_layer=2,
                               params=134_515_008, trainable=134_515_008, weight_bytes=4)
    plan = lambda gb: plan_checkpointing(big, lengths, 4, True, "spans", 4, 1024, True, torch.device("cpu"), 1, gb)
    every, selective, reason = plan(100)
    assert every is None and not selective
    assert reason.startswith("off: a step of the largest micro-batch (2800 tokens) needs about")
    assert reason.endswith("within the budget of 100.0 GB (--memory_budget_gb)")
    every, selective, reason = plan(6.0)  # no recompute: 6.3 GB, selective every layer: 4.4 GB
    assert every is not None and 1 < every < 30 and selective and f"every_n_layers={every}" in reason
    assert f"every {every} layers, selective (matmul and attention outputs kept" in reason
    every, selective, reason = plan(4.5)
    assert (every, selective) == (1, True) and reason.startswith("on, every layer, selective")
    every, selective, reason = plan(0.5)
    assert (every, selective) == (1, False) and reason.startswith("on, every layer, full recompute:")
    assert "over the budget of 0.5 GB" in reason
    every, selective, reason = plan_checkpointing(big, lengths, 4, True, "spans", 4, 1024, True, torch.device("meta"),
                                                  1, None)
    assert (every, selective) == (1, False) and "cannot read the free memory of meta" in reason


def test_plan_head_probs_keeps_the_softmax_only_where_the_step_still_fits():
    """4 pairs of 300 + 200 + 200 tokens in one call: 2800 tokens, so the kept softmax is
    2800 × 49152 × 4 = 550,502,400 bytes on top of the step without recompute."""
    lengths = [(300, 200, 200)] * 8
    big = DecoderShape.uniform(layers=30, hidden=576, intermediate=1536, kv_width=192, vocab=49152, norms_per_layer=2,
                               params=134_515_008, trainable=134_515_008, weight_bytes=4)
    need = step_bytes(big, 2800, [(300, 200)] * 4, 4, (), 1024, True)
    plan = lambda budget: plan_head_probs(big, lengths, 4, True, "spans", 4, 1024, True, torch.device("cpu"), 1, budget)
    keep, reason = plan((need + 550_502_400) / 1e9)
    assert keep and reason.startswith("kept from the forward (0.6 GB for 2800 tokens")
    keep, reason = plan((need + 550_502_400 - 1000) / 1e9)
    assert not keep and reason.startswith("recomputed in backward (keeping it, 0.6 GB")
    keep, reason = plan_head_probs(big, lengths, 4, True, "spans", 4, 1024, True, torch.device("meta"), 1, None)
    assert not keep and "cannot read the free memory of meta" in reason


def test_estimate_step_is_the_step_as_set_up_against_the_budget():
    """The dry run's line: the same bytes as step_bytes for the run's recompute (every 2nd layer, selective:
    layers 0, 2, ... of 30), plus the kept head softmax (2800 × 49152 × 4 = 550,502,400 bytes) when kept."""
    lengths = [(300, 200, 200)] * 8
    big = DecoderShape.uniform(layers=30, hidden=576, intermediate=1536, kv_width=192, vocab=49152, norms_per_layer=2,
                               params=134_515_008, trainable=134_515_008, weight_bytes=4)
    args = (big, lengths, 4, True, "spans", 4, 1024, True, torch.device("cpu"), 1)
    need, budget, line = estimate_step(*args, 100.0, 2, True, False)
    assert need == step_bytes(big, 2800, [(300, 200)] * 4, 4, range(0, 30, 2), 1024, True, True)
    assert budget == 100e9 and line == (f"a step of the largest micro-batch (2800 tokens) needs about {need / 1e9:.1f} "
                                        "GB on cpu: it fits the budget of 100.0 GB (--memory_budget_gb)")
    kept, _, _ = estimate_step(*args, 100.0, None, False, True)
    assert kept == step_bytes(big, 2800, [(300, 200)] * 4, 4, (), 1024, True) + 550_502_400
    assert estimate_step(*args, 0.5, None, False, False)[2].endswith("it does not fit the budget of 0.5 GB "
                                                                     "(--memory_budget_gb)")
    meta = estimate_step(big, lengths, 4, True, "spans", 4, 1024, True, torch.device("meta"), 1, None, 1, False, False)
    assert meta[1] is None and meta[2].endswith("orpo cannot read the free memory of meta, so whether it fits is "
                                                "not known")


def test_free_memory_of_the_cpu_is_shared_by_its_processes():
    one = free_memory(torch.device("cpu"), 1)
    assert one > 0 and free_memory(torch.device("cpu"), 4) == pytest.approx(one / 4, rel=0.05)
