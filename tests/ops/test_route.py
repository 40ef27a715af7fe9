"""route.py: the route each model gets, why, and that a route is never used where it is wrong.

The reference is the definition: each sequence (prompt + chosen, prompt + rejected) alone, batch 1,
no padding, the model's own logits (`separate_logp_means`). Models are tiny random ones built from
configs (no hub access).
"""
from pathlib import Path

import pytest
import torch
import transformers

from orpo.errors import OrpoError
from orpo.ops.attention import ATTENTION, use_span_attention
from orpo.ops.route import (Route, candidate_routes, choose_route, probe_pairs, probe_route, probe_tolerance,
                            route_logp_means, separate_logp_means, sequence_state_layers)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
ATTENTION_FAMILIES = {
    "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
    "mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig,
}


def attention_model(family="llama", attn="sdpa", **overrides):
    torch.manual_seed(0)
    config = ATTENTION_FAMILIES[family](**{**COMMON, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def mamba_model():
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2,
                                      expand=2, conv_kernel=4, initializer_range=0.2, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


class Leak(torch.nn.Module):
    """Adds a running mean of the hidden states along the sequence to a decoder layer's output: state
    that crosses from the chosen answer into the rejected one in a shared row, invisible to the
    structure check (a forward hook, no module of a stateful kind)."""

    @staticmethod
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        steps = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)[None, :, None]
        leaked = hidden + 0.5 * hidden.cumsum(1) / steps
        return (leaked, *output[1:]) if isinstance(output, tuple) else leaked


def leaky_model():
    model = attention_model()
    model.model.layers[0].register_forward_hook(Leak.hook)
    return model


def test_attention_only_models_get_prefix_shared_spans():
    for family in ATTENTION_FAMILIES:
        model = attention_model(family)
        route = choose_route(model)
        assert route == Route("spans", "chunked", "attention-only model with SDPA"), family
        assert model.config._attn_implementation == ATTENTION  # set up for it
        assert route.describe() == "prefix-shared spans: attention-only model with SDPA"


def test_eager_attention_gets_the_mask_layout():
    route = choose_route(attention_model(attn="eager"))
    assert route.layout == "mask"
    assert route.reason.startswith("the model runs 'eager' attention, which takes the prefix-shared layout")


def test_models_whose_layers_carry_state_get_the_padded_layout_without_a_probe_of_packing():
    model = mamba_model()
    assert "MambaMixer" in sequence_state_layers(model)
    assert [(r.layout, r.head) for r in candidate_routes(model, None, None)] == [("padded", "chunked"),
                                                                                  ("padded", "logits")]
    route = choose_route(model)
    assert route.layout == "padded"
    assert route.describe().startswith(f"padded: the model's {', '.join(sequence_state_layers(model))} layers carry "
                                       "state along the sequence")


def test_attention_only_models_have_no_state_layers():
    assert sequence_state_layers(attention_model()) == []
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert sequence_state_layers(gpt2) == []  # GPT-2's Conv1D is a linear layer


def test_prefix_sharing_forced_on_a_stateful_model_is_refused_in_one_line():
    for packing, attention, flag in ((True, None, "--packing true"), (None, "spans", "--packed_attention spans")):
        with pytest.raises(OrpoError, match=rf"^MambaForCausalLM: {flag} lays chosen and rejected out in one row, "
                                            r"but the model's .*MambaMixer.* layers carry state .*unset"):
            choose_route(mamba_model(), packing, attention)


def test_a_leak_the_structure_does_not_show_is_caught_and_the_padded_layout_used():
    """The running-mean hook leaks chosen into rejected in a shared row: both prefix-shared layouts
    disagree with separate forwards, so the route is padded, and the reason says why."""
    model = leaky_model()
    pairs = probe_pairs(model)
    expected = separate_logp_means(model, pairs)
    use_span_attention(model)
    for layout in ("spans", "mask"):
        problem = probe_route(model, Route(layout), pairs, expected)
        assert problem is not None and problem.startswith("per-pair mean log-probs differ from separate forwards")
    assert probe_route(model, Route("padded"), pairs, expected) is None
    route = choose_route(model)
    assert route.layout == "padded" and route.head == "chunked"
    assert "not prefix-shared spans: per-pair mean log-probs differ" in route.reason


def test_a_forced_route_that_is_wrong_for_the_model_is_refused_in_one_line():
    with pytest.raises(OrpoError, match=r"^LlamaForCausalLM: the forced route \(--packing true\) does not reproduce "
                                        r"the model's separate forwards \(prefix-shared spans: per-pair mean .*unset"):
        choose_route(leaky_model(), packing=True)
    assert choose_route(leaky_model(), packing=False) == Route("padded", "chunked", "--packing false")


def test_a_model_that_ignores_the_layout_falls_back_to_padded():
    """A model that drops the 4D mask, the spans and the position ids (here: a wrapper that pops them)
    computes the prefix-shared row as one causal sequence: caught, padded instead."""
    model = attention_model()
    original = model.forward

    def forward_without(**kwargs):
        for name in ("attention_mask", "position_ids", "pair_spans"):
            kwargs.pop(name, None)
        return original(**kwargs)

    model.forward = forward_without
    assert choose_route(model).layout == "padded"


@pytest.mark.parametrize("family,window", [("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
                                           ("mistral", dict(sliding_window=6))])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_window_models_are_exact_on_their_route_and_on_the_mask_layout(family, window, attn):
    """The probe pairs cross the window (6 tokens): spans give each layer its window, the mask layout
    a mask per layer type (Qwen2: one sliding layer, one full) or a windowed mask (Mistral: all slide),
    additive for eager attention."""
    model = attention_model(family, attn=attn, **window)
    assert min(len(p.prompt_ids) + len(p.chosen_ids) for p in probe_pairs(model)) > 6
    assert choose_route(model).layout == ("spans" if attn == "sdpa" else "mask")
    assert choose_route(model, attention="mask") == Route("mask", "chunked", "--packed_attention mask")


def test_probe_pairs_cross_a_long_window_and_fit_the_positions():
    model = attention_model("mistral", sliding_window=40)
    pairs = probe_pairs(model)
    assert max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs) > 40 + 8
    assert min(len(p.chosen_ids) for p in pairs) == 1
    assert all(3 <= t < VOCAB for p in pairs for t in p.prompt_ids + p.chosen_ids + p.rejected_ids)


def test_exact_routes_are_far_inside_the_tolerance_and_the_leak_far_outside():
    """fp32 noise of the exact routes is ≥ 10x below the tolerance; the leak is ≥ 10x above it."""
    tolerance = probe_tolerance(torch.float32)
    for family in ATTENTION_FAMILIES:
        model = attention_model(family)
        pairs = probe_pairs(model)
        expected = separate_logp_means(model, pairs)
        for route in (Route("spans"), Route("mask"), Route("padded")):
            if route.layout == "spans":
                use_span_attention(model)
            error = ((route_logp_means(model, pairs, route) - expected).abs() / expected.abs().clamp(min=1)).max()
            assert error < tolerance / 10, (family, route.layout, error)
    model = leaky_model()
    pairs = probe_pairs(model)
    expected = separate_logp_means(model, pairs)
    error = ((route_logp_means(model, pairs, Route("mask")) - expected).abs() / expected.abs().clamp(min=1)).max()
    assert error > 10 * tolerance


def test_route_properties():
    assert Route("spans").packing and Route("mask").attention == "mask"
    assert not Route("padded").packing
    assert Route("padded", "logits", "x").describe() == "padded, the model's own logits: x"


def test_the_model_keeps_its_mode():
    model = attention_model().train()
    choose_route(model)
    assert model.training


def test_a_head_the_chunked_head_cannot_compute_gets_the_models_own_logits():
    model = attention_model()
    model.config.final_logit_softcapping = 30.0  # unknown to head.POST_HEAD for Llama (and ignored by it)
    assert [r.head for r in candidate_routes(model, None, None)] == ["logits"] * 3
    route = choose_route(model)
    assert (route.layout, route.head) == ("spans", "logits")
    assert "the model's own logits: LlamaForCausalLM has config.final_logit_softcapping=30.0" in route.reason


# The family matrix: tiny random models of every causal-LM family of transformers that builds offline
# (tests/family_models.py), each on the route orpo chooses by itself; FAST_FAMILIES by default, the others
# with `pytest -m slow`. EXPECTED_ROUTES is docs/models.md's family table (test_family_table_page).
EXPECTED_ROUTES = {
    **dict.fromkeys((
        "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "beam", "biogpt", "bitnet", "codegen",
        "cohere", "cohere2", "cohere2_moe", "ctrl", "cwm", "deepseek_v2", "deepseek_v3", "diffllama", "dory",
        "dots1", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "flex_olmo", "gemma",
        "gemma3_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text", "glm", "glm4", "glm4_moe",
        "glm4_moe_lite", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neox", "gptj", "granite", "granitemoe",
        "granitemoeshared", "helium", "hrm_text", "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "hyperclovax",
        "internlm3", "iquestcoder", "jais2", "jetmoe", "kolibri1", "laguna", "llama", "llama4_text", "mellum",
        "minicpm3", "minimax_m2", "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral",
        "modernbert-decoder", "moshi", "nanochat", "olmo", "olmo2", "olmo3", "olmoe", "opt", "persimmon", "phi",
        "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "sarvam_mla", "sarvam_moe", "seed_oss", "smollm3",
        "solar_open", "starcoder2", "whisper", "youtu",
    ), "spans"),
    **dict.fromkeys((
        "doge", "falcon", "flint", "gemma2", "git", "got_ocr2", "gpt_neo", "gpt_neox_japanese", "gpt_oss",
        "granite_swa", "granitemoe_swa", "mimo_v2_flash", "nemotron", "phimoe", "stablelm", "vaultgemma", "xglm",
    ), "mask"),
    **dict.fromkeys((
        "bamba", "bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus", "blenderbot",
        "blenderbot-small", "bloom", "deepseek_v4", "electra", "ernie", "falcon_h1", "falcon_mamba",
        "granitemoehybrid", "hy_v4", "inkling2_loop_text", "inkling2_text", "inkling_text", "jamba", "lara_mini",
        "lfm2", "lfm2_moe", "lfm3", "mamba", "mamba2", "marian", "mbart", "megatron-bert", "minimax",
        "moss_transcribe_diarize", "mpt", "mvp", "nemotron_h", "olmo_hybrid", "openai-gpt", "pegasus",
        "phi4_multimodal", "plbart", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next", "recurrent_gemma",
        "rembert", "roc_bert", "roformer", "rwkv", "trocr", "xlm", "xlstm", "zamba2",
    ), "padded"),
}


def fresh_pairs(vocab, seed=7):
    """Pairs other than the probe's (other seed and lengths), so the check is not the probe again."""
    from orpo.data.render import TokenizedPair

    rng = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=rng).tolist()  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r), i) for i, (p, c, r) in enumerate([(37, 23, 41), (9, 52, 6), (20, 3, 30)])]


def _family_params():
    from family_models import FAST_FAMILIES

    return [pytest.param(t, marks=() if t in FAST_FAMILIES else pytest.mark.slow) for t in EXPECTED_ROUTES]


def test_the_matrix_names_every_causal_lm_family_of_transformers():
    """A model type transformers adds (a new release) must get a route here, or a reason to be skipped."""
    from family_models import FAST_FAMILIES, SKIPPED, causal_lm_types

    assert set(FAST_FAMILIES) <= set(EXPECTED_ROUTES) and not set(SKIPPED) & set(EXPECTED_ROUTES)
    assert set(causal_lm_types()) - set(EXPECTED_ROUTES) - set(SKIPPED) == set()


@pytest.mark.parametrize("model_type", _family_params())
def test_every_family_trains_exactly_on_the_route_orpo_chooses(model_type, tmp_path):
    """No flags: the route is the expected one; on other pairs than the probe's, per-pair mean log-probs
    equal separate forwards (fp32, 1e-5 relative); one training step gives a finite loss and changes
    the weights."""
    from family_models import causal_lm_types, tiny_family_model
    from orpo.train.config import ORPOConfig
    from orpo.run.trainer import ORPOTrainer
    from tiny import chatml_tokenizer

    if model_type not in causal_lm_types():
        pytest.skip(f"{model_type} is not in transformers {transformers.__version__}")
    model = tiny_family_model(model_type)
    route = choose_route(model)
    assert route.layout == EXPECTED_ROUTES[model_type], route.describe()
    pairs = fresh_pairs(model.config.get_text_config().vocab_size)
    expected = separate_logp_means(model, pairs)
    got = route_logp_means(model, pairs, route)
    assert ((got - expected).abs() / expected.abs().clamp(min=1)).max() < 1e-5
    before = [p.detach().clone() for p in model.parameters()]
    args = ORPOConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                      bf16=False, max_steps=1, per_device_train_batch_size=3, learning_rate=1e-3, logging_steps=1)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=chatml_tokenizer())
    assert trainer.plan.route == route
    output = trainer.train()
    assert torch.isfinite(torch.tensor(output.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_family_table_page():
    """docs/models.md's family table lists exactly EXPECTED_ROUTES (regenerate: python tests/family_models.py docs/models.md)."""
    from family_models import README_BEGIN, family_table

    page = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    start = page.index(README_BEGIN)
    assert page[start:].startswith(family_table(EXPECTED_ROUTES))


# ---- encoder-decoder models ---------------------------------------------------------------------------

def _encoder_decoder(family):
    from tiny import tiny_bart, tiny_t5

    return {"t5": tiny_t5, "flan-t5": lambda: tiny_t5(flan=True), "bart": tiny_bart}[family]()


@pytest.mark.parametrize("family,head", [("t5", "chunked"), ("flan-t5", "chunked"), ("bart", "logits")])
def test_encoder_decoder_route_equals_separate_forwards(family, head):
    """T5 (tied head behind its d_model**-0.5 scale), Flan-T5 (untied, gated-GELU) and BART (final_logits_bias after
    its head, so its own logits): the encoder-decoder route's per-pair mean log-probs equal
    model(input_ids=prompt, labels=completion) of each sequence alone, to fp32 rounding."""
    model = _encoder_decoder(family)
    route = choose_route(model)
    assert (route.layout, route.head) == ("encoder-decoder", head)
    assert not route.packing
    pairs = probe_pairs(model)
    expected = separate_logp_means(model, pairs)
    torch.testing.assert_close(route_logp_means(model, pairs, route), expected, rtol=1e-6, atol=2e-6)
    if head == "logits":  # BART: the chunked head would miss final_logits_bias; the route says why
        assert "final_logits_bias" in route.reason


def test_encoder_decoder_route_refuses_a_decoder_only_layout_in_one_line():
    model = _encoder_decoder("t5")
    for packing, attention in ((True, None), (False, None), (None, "spans")):
        with pytest.raises(OrpoError, match="encoder-decoder model") as err:
            choose_route(model, packing, attention)
        assert "\n" not in str(err.value)
