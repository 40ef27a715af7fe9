"""GPU checks: orpo's paths on a CUDA device, in one short run.

    python benchmarks/gpu_smoke.py [--out gpu_smoke.json] [--quick]

Without a CUDA device it says so and exits 0 (`--device cpu --quick` runs the same checks on the
CPU, to try the script). On a random Llama-architecture model (~155M parameters, untied head,
GQA; no download) and random token pairs of chat-like lengths, it checks and measures:

1. exactness, fp32 (TF32 off): per-pair log-probs of the packed layouts ("spans", "mask") against
   the unpacked one; the same under bf16 autocast;
2. the attention kernels: the span route with SDPA restricted to the fused kernels (flash,
   memory-efficient) — it fails if any call needs the math kernel — and the bf16 scoring speed
   with cuDNN attention allowed against orpo's choice; a sliding-window model packed vs unpacked;
3. training: a few ORPO steps in bf16 per layout, with and without activation checkpointing, and with
   both left to orpo: tokens/s (all tokens of the layout, from orpo's own metric), peak GPU memory,
   and the step's memory beside train/memory.py's estimate;
4. fp16 with the GradScaler and `max_grad_norm 0` (overflow steps are the scaler's), LoRA with
   `lm_head` among the targets (its adapter must move), the prefix-sharing probe on a model already
   on the GPU, and `orpo eval`'s scoring speed (pairs/s, fp32 and bf16);
5. FSDP2 as accelerate sets it up on a GPU (one process under torchrun, lm_head a unit of its own
   that reshards after forward, sharded checkpoints, a consolidated final model loaded back).

Prints one line per check and writes all figures as JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from orpo.data.render import TokenizedPair  # noqa: E402
from orpo.ops import attention  # noqa: E402
from orpo.ops.forward import batch_to, pair_logps  # noqa: E402
from orpo.ops.route import choose_route  # noqa: E402
from orpo.ops.packing import collate_prefix_shared  # noqa: E402
from orpo.ops.scoring import score_pairs  # noqa: E402
from orpo.train.memory import decoder_shape, largest_micro_batch, recomputed_layers, step_bytes  # noqa: E402

PAD = 0


def model_config(quick: bool) -> transformers.LlamaConfig:
    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=2048) if quick else \
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)
    return transformers.LlamaConfig(**size, max_position_embeddings=4096, tie_word_embeddings=False,
                                    initializer_range=0.02, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def make_pairs(n: int, vocab: int, quick: bool, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    top = 48 if quick else 512

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    def length(low):
        return int(torch.randint(low, top, (1,), generator=g))

    return [TokenizedPair([1] + ids(length(4)), ids(length(2)), ids(length(2)), index=i) for i in range(n)]


def tokenizer_for(config):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, config.vocab_size)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "t5 t9" -> [5, 9] (gpu_bench.py's text rows)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                                               bos_token="<s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    return tok


def fresh_model(config, state, device, dtype=torch.float32):
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(state)
    return model.to(device)


def max_diff(records, reference, key):
    return max(abs(a[key] - b[key]) for a, b in zip(records, reference))


def check_exactness(config, state, pairs, device, results):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for bf16 in (False, True):
        scores = {}
        for layout in ("padded", "spans", "mask"):
            model = fresh_model(config, state, device)
            route = choose_route(model, packing=layout != "padded", attention=None if layout == "padded" else layout)
            scores[layout] = score_pairs(model, pairs, PAD, route=route, batch_tokens=8192, bf16=bf16)
        for layout in ("spans", "mask"):
            figures = {key: max_diff(scores[layout], scores["padded"], key)
                       for key in ("chosen_logp_mean", "rejected_logp_mean", "log_odds")}
            name = f"exactness_{'bf16' if bf16 else 'fp32'}_{layout}_vs_padded"
            results[name] = figures
            print(f"{name}: " + ", ".join(f"max|Δ{k}| {v:.2e}" for k, v in figures.items()), flush=True)


def check_fused_attention(config, state, pairs, device, results):
    """The span route with SDPA's math kernel disallowed (attention.FUSED_FIRST is the backend list
    span attention runs under): it runs only if every call has a fused kernel. Then the bf16 scoring
    speed with cuDNN attention allowed, the backend SDPA would pick by itself."""
    from torch.nn.attention import SDPBackend

    model = fresh_model(config, state, device)
    choose_route(model, attention="spans")
    batch = batch_to(collate_prefix_shared(pairs[:8], PAD, attention="spans"), device)
    chosen = attention.FUSED_FIRST
    try:
        attention.FUSED_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logps = pair_logps(model, batch, 1024)
            (logps.chosen_sum.sum() - logps.rejected_sum.sum()).backward()
        results["spans_fused_kernels_only"] = True
    except RuntimeError as err:
        results["spans_fused_kernels_only"] = f"no: {str(err).splitlines()[0][:160]}"
    finally:
        attention.FUSED_FIRST = chosen
    print(f"span attention with flash + memory-efficient kernels only (no math): {results['spans_fused_kernels_only']}",
          flush=True)
    if device.type == "cuda":
        for name, backends in (("cudnn_allowed", [SDPBackend.CUDNN_ATTENTION] + chosen), ("orpo_default", chosen)):
            attention.FUSED_FIRST = backends
            try:
                results[f"eval_pairs_per_second_bf16_{name}"] = scoring_rate(model, pairs[:32], device, True)
            finally:
                attention.FUSED_FIRST = chosen
            print(f"scoring, bf16, {name}: {results[f'eval_pairs_per_second_bf16_{name}']:.1f} pairs/s", flush=True)


def scoring_rate(model, pairs, device, bf16):
    route = choose_route(model)
    score_pairs(model, pairs[:4], PAD, route=route, bf16=bf16)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    score_pairs(model, pairs, PAD, route=route, bf16=bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(pairs) / (time.perf_counter() - start)


def check_sliding_window(pairs, device, results):
    """A Mistral-style model whose every layer slides (window 64, shorter than most pairs): spans vs unpacked."""
    config = transformers.MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, vocab_size=2048,
                                        sliding_window=64, max_position_embeddings=4096, pad_token_id=PAD)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).to(device)
    small = [TokenizedPair([t % 2048 for t in p.prompt_ids], [t % 2048 for t in p.chosen_ids],
                           [t % 2048 for t in p.rejected_ids], p.index) for p in pairs]
    reference = score_pairs(model, small, PAD, route=choose_route(model, packing=False))
    packed = score_pairs(model, small, PAD, route=choose_route(model, attention="spans"))
    results["exactness_sliding_window_fp32_spans_vs_padded"] = max_diff(packed, reference, "log_odds")
    print(f"sliding window 64, fp32, spans vs padded: max|Δlog_odds| {max_diff(packed, reference, 'log_odds'):.2e}",
          flush=True)


def train_run(config, state, pairs, tokenizer, device, out, name, steps, **overrides):
    model = fresh_model(config, state, "cpu")
    args = dict(output_dir=str(out / name), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-5,
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, report=False,
                bf16=True, use_cpu=device.type == "cpu")
    args.update(overrides)
    peft_config = args.pop("peft_config", None)
    trainer = ORPOTrainer(model=model, args=ORPOConfig(**args), train_dataset=pairs, processing_class=tokenizer,
                          peft_config=peft_config)
    if device.type == "cuda":
        gc.collect()  # the previous run's trainer, model and optimizer states: not this run's memory
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    in_use = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # the weights, once on the device
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    steps_logged = [r for r in trainer.state.log_history if "tokens_per_second" in r and "loss" in r]
    warm = steps_logged[1:] or steps_logged  # the first step includes warm-up
    figures = {
        "steps": len(steps_logged),
        "tokens_per_second": sum(r["tokens"] for r in warm) / sum(r["tokens"] / r["tokens_per_second"] for r in warm),
        # pairs/s compares layouts (their token counts differ: the padded layout holds each prompt twice)
        "pairs_per_second": args["per_device_train_batch_size"] * len(warm)
        / sum(r["tokens"] / r["tokens_per_second"] for r in warm),
        "losses": [round(r["loss"], 4) for r in steps_logged],
        "seconds": round(seconds, 1),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "step_memory_gib": (torch.cuda.max_memory_allocated() - in_use) / 2**30 if device.type == "cuda" else None,
        "estimated_step_gib": estimated_step_bytes(trainer, pairs) / 2**30,
        "bf16": trainer.args.bf16, "precision": trainer.plan.choice("precision").reason,
        "checkpointing": trainer.plan.choice("activation checkpointing").reason,
        "nonfinite_skipped": trainer.nonfinite_skipped,
    }
    return trainer, figures


def estimated_step_bytes(trainer, pairs) -> int:
    """train/memory.py's estimate of what a step of the largest micro-batch allocates beyond the weights,
    with the trainer's checkpointing (every n-th layer, selective or full, or none), for comparison with the
    measured peak."""
    lm = trainer.model
    shape = decoder_shape(lm, lm.config.get_text_config())
    args = trainer.args
    tokens, pair_lengths = largest_micro_batch([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids))
                                                for p in pairs], args.per_device_train_batch_size, trainer.plan.route.packing,
                                               trainer.plan.route.attention)
    every = (args.activation_checkpointing_kwargs or {}).get("every_n_layers", 1)
    checkpointed = recomputed_layers(shape.layers, every) if args.activation_checkpointing else ()
    return step_bytes(shape, tokens, pair_lengths, 2 if args.bf16 or args.fp16 else 4, checkpointed,
                      args.logprob_chunk_size, True, selective=bool(args.selective_checkpointing))


def check_training(config, state, pairs, tokenizer, device, out, steps, results):
    """Training per layout, with and without activation checkpointing, and with precision and
    checkpointing left to orpo (`auto`: no --bf16, no --activation_checkpointing); the step's measured
    memory beside memory.py's estimate."""
    for layout, packing, checkpointing in (("spans", True, True), ("spans", True, False), ("spans", True, None),
                                           ("mask", True, True), ("padded", False, True)):
        name = f"train_bf16_{layout}_{ {True: 'ckpt', False: 'nockpt', None: 'auto'}[checkpointing]}"
        overrides = {} if checkpointing is None else {"activation_checkpointing": checkpointing}
        if checkpointing is None:
            overrides["bf16"] = None  # orpo chooses
        _, figures = train_run(config, state, pairs, tokenizer, device, out, name, steps, packing=packing,
                               packed_attention=layout if packing else "spans", **overrides)
        results[name] = figures
        print(f"{name}: {figures['pairs_per_second']:.1f} pairs/s, {figures['tokens_per_second']:.0f} tok/s, "
              f"peak {figures['peak_memory_gib'] or 0:.2f} GiB, step {figures['step_memory_gib'] or 0:.2f} GiB "
              f"(estimate {figures['estimated_step_gib']:.2f}), losses {figures['losses']}", flush=True)
        if checkpointing is None:
            print(f"  auto: precision {figures['precision']}; activation checkpointing {figures['checkpointing']}",
                  flush=True)


def check_fp16_and_lora(config, state, pairs, tokenizer, device, out, results):
    if device.type == "cuda":
        _, figures = train_run(config, state, pairs, tokenizer, device, out, "fp16_scaler", 4, bf16=False, fp16=True,
                               max_grad_norm=0.0, on_nonfinite="stop")
        results["fp16_gradscaler_max_grad_norm_0"] = figures
        print(f"fp16 + GradScaler, max_grad_norm 0, on_nonfinite stop: ran {figures['steps']} steps, "
              f"losses {figures['losses']}", flush=True)
    import peft

    lora = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "lm_head"])
    trainer, figures = train_run(config, state, pairs, tokenizer, device, out, "lora_head", 2, peft_config=lora,
                                 learning_rate=1e-3)
    head_b = [p for n, p in trainer.model.named_parameters() if "lm_head" in n and "lora_B" in n]
    moved = bool(head_b) and float(head_b[0].detach().abs().max()) > 0
    results["lora_lm_head_adapter_moved"] = moved
    print(f"LoRA with lm_head: adapter lora_B moved from zero: {moved}", flush=True)


FSDP_RUN = r'''
import json, sys
import torch, transformers
sys.path.insert(0, sys.argv[3])
from orpo import ORPOConfig, ORPOTrainer
from gpu_smoke import make_pairs, model_config, tokenizer_for

out, fsdp_config = sys.argv[1], sys.argv[2]
config = model_config(quick=False)
torch.manual_seed(0)
trainer = ORPOTrainer(model=transformers.LlamaForCausalLM(config), train_dataset=make_pairs(16, config.vocab_size, False),
                      processing_class=tokenizer_for(config),
                      args=ORPOConfig(output_dir=out, max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                                      save_steps=2, report_to="none", disable_tqdm=True, report=False,
                                      bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                                      fsdp=True, fsdp_config=fsdp_config))
trainer.train()  # and the model saved (run/finish.py)
head = trainer.accelerator.unwrap_model(trainer.model_wrapped).lm_head
print(json.dumps({"distributed_type": str(trainer.accelerator.distributed_type),
                  "lm_head_weight": type(head.weight).__name__,
                  "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r and "nll" in r]}))
trainer.accelerator.end_training()
'''


def check_fsdp2(results, out):
    """`orpo`'s FSDP2 path on the GPU as accelerate sets it up there (one process under torchrun): the
    docs/distributed.md's fsdp.json with the head's Linear a unit of its own that reshards after forward, a sharded
    checkpoint, and the consolidated final model, loaded back."""
    import subprocess

    config = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "Linear"],
              "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}
    (out / "fsdp.json").write_text(json.dumps(config))
    (out / "fsdp_run.py").write_text(FSDP_RUN)
    here = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             str(out / "fsdp_run.py"), str(out / "fsdp"), str(out / "fsdp.json"), str(here)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": f"{here}:{here.parent}:{os.environ.get('PYTHONPATH', '')}"})
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "Error" in line and "elastic" not in line]
        raise RuntimeError(" | ".join(errors[-3:]) or result.stderr[-1500:])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    saved = transformers.AutoModelForCausalLM.from_pretrained(out / "fsdp")
    summary["checkpoint_2"] = sorted(p.name for p in (out / "fsdp" / "checkpoint-2").iterdir())
    summary["final_model_parameters"] = sum(p.numel() for p in saved.parameters())
    results["fsdp2_one_gpu"] = summary
    print(f"FSDP2 on one GPU: {summary}", flush=True)


def check_probe_and_eval(config, state, pairs, device, results):
    model = fresh_model(config, state, device)
    route = choose_route(model)  # the route probe, with the model already on the GPU
    results["probe_on_device"] = route.describe()
    print(f"route probe on a model already on the device: {route.describe()}", flush=True)
    for bf16 in (False, True):
        rate = scoring_rate(model, pairs, device, bf16)
        results[f"eval_pairs_per_second_{'bf16' if bf16 else 'fp32'}"] = rate
        print(f"orpo eval scoring ({'bf16' if bf16 else 'fp32'}): {rate:.1f} pairs/s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few pairs (to try the script)")
    parser.add_argument("--out", default="gpu_smoke.json")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="run only these checks (names as printed in FAILED lines)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU checks skipped")
        return 0
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(results), flush=True)
    config = model_config(args.quick)
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(config).state_dict()
    results["parameters"] = sum(v.numel() for v in state.values())
    pairs = make_pairs(16 if args.quick else 64, config.vocab_size, args.quick)
    results["pair_tokens_mean"] = sum(p.shared_length for p in pairs) / len(pairs)
    tokenizer = tokenizer_for(config)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        steps = [("exactness", lambda: check_exactness(config, state, pairs[:16], device, results)),
                 ("sliding window", lambda: check_sliding_window(pairs[:16], device, results)),
                 ("fused attention", lambda: check_fused_attention(config, state, pairs, device, results)),
                 ("probe and eval", lambda: check_probe_and_eval(config, state, pairs, device, results)),
                 ("training", lambda: check_training(config, state, pairs, tokenizer, device, out, args.steps, results)),
                 ("fp16 and LoRA", lambda: check_fp16_and_lora(config, state, pairs, tokenizer, device, out, results))]
        if device.type == "cuda" and not args.quick:
            steps.append(("fsdp2", lambda: check_fsdp2(results, out)))
        for name, step in steps:  # one failing check does not hide the others
            if args.only and name not in args.only:
                continue
            try:
                step()
            except Exception as err:  # noqa: BLE001 - reported, and the script exits 1
                results[f"FAILED {name}"] = f"{type(err).__name__}: {str(err)[:400]}"
                print(f"FAILED {name}: {type(err).__name__}: {err}", flush=True)
                import traceback

                traceback.print_exc()
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 1 if any(key.startswith("FAILED") for key in results) else 0


if __name__ == "__main__":
    sys.exit(main())
