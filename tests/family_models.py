"""Tiny random causal LMs of many transformers families, built offline from their configs.

`tiny_family_model(model_type)`: the family's default config cut to 2 decoder layers (keeping one of
each layer kind a hybrid has: attention and Mamba / linear attention / convolution), hidden 64, vocab
128, 4 experts top-2 for MoE families, a sliding window of 16, initializer_range 0.2 (a next-token
distribution far from flat), fp32, SDPA where the family has it, else eager. Each builds in well under
a second. FAST_FAMILIES are swept by the default suite (tests/ops/test_route.py), the rest of
transformers' causal LMs with `pytest -m slow`; SKIPPED says why a model type is not.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SIZES = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=128, max_position_embeddings=512, initializer_range=0.2,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=16,
    # mixture of experts: 4 experts, top-2
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2, moe_k=2, top_k_experts=2,
    moe_intermediate_size=64, shared_expert_intermediate_size=64, shared_intermediate_size=64,
    n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1, n_group=1, topk_group=1, num_expert_group=1,
    # multi-head latent attention
    q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16,
    # linear attention / state-space layers
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_head_dim=16, linear_num_heads=4,
    mamba_d_state=16, mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, state_size=16, time_step_rank=8,
    index_head_dim=16, index_n_heads=2,
    # encoder-decoder decoders
    d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
    encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
    n_inner=128, ffn_dim=128,
)
# per-layer lists and lists of layer indices, cut down to the kept layers
PER_LAYER = ("layer_types", "mlp_layer_types", "layers_block_type", "block_types", "attention_layers",
             "no_rope_layers", "num_attention_heads_per_layer", "layer_rope_theta", "activation_sparsity_pattern",
             "indexer_types", "attn_layers")
LAYER_INDICES = ("full_attn_idxs", "moe_layers", "hybrid_layer_ids", "attn_layer_indices", "mlp_only_layers")

OVERRIDES: dict[str, dict] = {
    "mamba2": dict(num_heads=4, head_dim=32, n_groups=1, chunk_size=16),
    "lfm2": dict(layer_types=["conv", "full_attention"]),  # its default keeps two attention layers
    "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=4, mamba_d_state=16, mamba_chunk_size=16),
    "gemma3n_text": dict(num_kv_shared_layers=0),  # 2 layers leave no layer to share keys/values with
    "gptj": dict(rotary_dim=8), "codegen": dict(rotary_dim=8),  # rotary part of the 16-wide heads
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], num_layers=2, num_heads=4),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
}


def _kept_layers(config) -> list[int]:
    n = config.num_hidden_layers
    keep = []
    for name in PER_LAYER:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            seen = {}
            for i, v in enumerate(values):
                seen.setdefault(str(v), i)
            keep += seen.values()
    keep = sorted(set(keep))
    for i in range(n):
        if len(keep) >= 2:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _fields(config) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def tiny_config(model_type: str):
    default = AutoConfig.for_model(model_type)
    fields = _fields(default)
    kwargs = {}
    for k, v in SIZES.items():
        k = default.attribute_map.get(k, k)
        if k in fields:
            kwargs[k] = v
    try:
        keep = _kept_layers(default)
    except Exception:
        keep = [0, 1]
    n = getattr(default, "num_hidden_layers", None)
    for name in PER_LAYER:
        values = getattr(default, name, None)
        if name in fields and isinstance(values, (list, tuple)) and len(values) == n:
            kwargs[name] = [values[i] for i in keep]
    for name in LAYER_INDICES:
        values = getattr(default, name, None)
        if name in fields and isinstance(values, (list, tuple)):
            kwargs[name] = [j for j, i in enumerate(keep) if i in values]
    if "num_hidden_layers" in kwargs:
        kwargs["num_hidden_layers"] = len(keep)
    kwargs.update(OVERRIDES.get(model_type, {}))
    return type(default)(**kwargs)


def tiny_family_model(model_type: str, seed: int = 0):
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    except ValueError as error:
        if "scaled_dot_product_attention" not in str(error):
            raise
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def save_family_model(model_type: str, path, tokenizer, seed: int = 0, **config) -> str:
    """`tiny_family_model`'s config sized for `tokenizer` (its vocabulary and pad/eos ids), with `config` on top,
    saved with the tokenizer as a Hugging Face directory (what `orpo train --model` takes); returns the path."""
    settings = tiny_config(model_type).to_dict()
    settings.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                    eos_token_id=tokenizer.eos_token_id, **config)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(type(tiny_config(model_type)).from_dict(settings), dtype=torch.float32) \
        .save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# The families the default suite checks (one of each kind: attention-only, MoE, every stateful layer
# kind); the others in tests/ops/test_route.py's EXPECTED_ROUTES run with `pytest -m slow`.
FAST_FAMILIES = (
    # attention-only
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma4_text", "phi", "phi3", "cohere",
    "cohere2", "granite", "starcoder2", "gpt_neox", "gpt2", "olmo2", "smollm3", "stablelm", "falcon", "nemotron",
    # mixture of experts
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss",
    # state along the sequence: Mamba / SSM, linear attention, convolutions, RG-LRU
    "mamba", "mamba2", "falcon_h1", "zamba2", "jamba", "bamba", "granitemoehybrid", "nemotron_h", "recurrent_gemma",
    "lfm2", "qwen3_next", "qwen3_5_text",
)
_MULTIMODAL = ("a vision/audio-language wrapper whose sub-configs this builder does not cut down (too big to build "
               "here); its text model is in the matrix where transformers ships it alone")
_BIDIRECTIONAL = ("an encoder (bidirectional attention without is_decoder=True): no layout reproduces its separate "
                  "forwards, and orpo refuses it in one line, as it should")
_BUILDER = ("this builder's tiny config is invalid for the family, or keeps sub-configs too big to build here "
            "(not a statement about orpo)")
# Causal-LM model types of transformers that the matrix does not check, and why
SKIPPED: dict[str, str] = {
    **dict.fromkeys(("dots3_note", "emu3", "fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified",
                     "gemma4_unified_assistant", "llama4", "mllama", "qwen3_5", "qwen3_5_moe", "qwen4_exp"), _MULTIMODAL),
    **dict.fromkeys(("camembert", "data2vec-text", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl",
                     "xmod", "reformer"), _BIDIRECTIONAL),
    "cpmant": "no layout reproduces its separate forwards (padded rows differ by 0.48 in mean log-prob): orpo "
              "refuses it in one line",
    "prophetnet": "an n-gram-stream decoder: no layout runs it; orpo refuses it in one line",
    **dict.fromkeys(("axk2", "bailing_hybrid", "blt", "cohere_compass_text", "dbrx", "deepseek_v32", "dots3_note_text",
                     "gemma4_assistant", "glm_moe_dsa", "kimi_linear", "longcat_flash", "musicgen", "musicgen_melody",
                     "qwen4_exp_text", "xlnet", "zamba", "zaya"), _BUILDER),
}


def causal_lm_types() -> list[str]:
    """Every causal-LM model type of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


README_BEGIN = "<!-- family table: generated by `python tests/family_models.py docs/models.md` from tests/ops/test_route.py -->"
README_END = "<!-- end of family table -->"
ROUTE_NAMES = {"spans": "prefix-shared, span attention", "mask": "prefix-shared, dense mask (eager attention / own attention code)",
               "padded": "padded rows (state along the sequence)"}


def family_table(routes: dict[str, str]) -> str:
    """The block of docs/models.md: for each route, the model types orpo puts on it (those of the default suite in
    bold), then the model types not checked and why."""
    lines = [README_BEGIN, "", "| route orpo chooses | model types (**bold**: in the default test suite) |", "| --- | --- |"]
    for layout, name in ROUTE_NAMES.items():
        names = ", ".join(f"**`{t}`**" if t in FAST_FAMILIES else f"`{t}`" for t, r in routes.items() if r == layout)
        lines.append(f"| {name} | {names} |")
    lines += ["", "Not checked (transformers' other causal-LM model types):", ""]
    for reason in dict.fromkeys(SKIPPED.values()):
        names = ", ".join(f"`{t}`" for t, r in SKIPPED.items() if r == reason)
        lines.append(f"- {names}: {reason}.")
    return "\n".join(lines + ["", README_END])


if __name__ == "__main__":  # rewrite the family table of docs/models.md
    import re
    import sys

    sys.path.insert(0, "tests")
    from ops.test_route import EXPECTED_ROUTES

    path = sys.argv[1]
    text = open(path).read()
    block = re.escape(README_BEGIN) + ".*?" + re.escape(README_END)
    open(path, "w").write(re.sub(block, lambda _: family_table(EXPECTED_ROUTES), text, flags=re.S))
    print(f"updated the family table in {path}")
