"""orpo, TRL and Liger's ORPO loss side by side on one GPU: same model, pairs and settings, bf16.

    python benchmarks/gpu_bench.py [--out gpu_bench.json]          # about 5 minutes on an H100
    python benchmarks/gpu_bench.py --device cpu --quick            # to try the script (a tiny model)

The model is gpu_smoke.py's random Llama (~155M parameters, untied head, GQA; no download) with fp32
weights, trained under bf16 autocast with AdamW (fused), learning rate 1e-6, `--batch` pairs per step;
the pairs are random token pairs of chat-like lengths, given to every run as the same text rows
(word-level tokenizer: one word, one token). Runs, each on a fresh copy of the same weights:

| run | what trains |
| --- | --- |
| `orpo` | `orpo.ORPOTrainer`, its defaults (the route and activation checkpointing it chooses) |
| `trl` | `trl.experimental.orpo.ORPOTrainer` with `gradient_checkpointing=False` (its fastest) |
| `liger` | a plain loop: padded chosen and rejected rows through the decoder, Liger-Kernel's `LigerFusedLinearORPOLoss` on the hidden states (its chunked head and ORPO loss) |

A run whose package is not installed is reported as skipped. Per run: seconds of the steps after
the first (warm-up), pairs/s, tokens/s (real tokens: Σ prompt+chosen + prompt+rejected, the prompt
twice for every run), MFU = 6 × parameters × real tokens/s ÷ the device's bf16 matmul peak measured
here (an 8192² × 8192 matmul; so MFU ratios are pairs/s ratios: a run that computes the prompt once
does less work for the same figure), and peak memory (CUDA: `max_memory_allocated`; CPU: not measured).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_smoke import PAD, fresh_model, make_pairs, model_config, tokenizer_for  # noqa: E402

LEARNING_RATE = 1e-6


def bf16_peak_tflops(device: torch.device, size: int) -> float:
    """The device's bf16 matmul rate (TFLOP/s) at [size, size] × [size, size], median of 10 after warm-up."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_rows(pairs) -> list[dict]:
    """The pairs as conversational text rows (tokens are words "t<id>"; the prompt's leading BOS dropped)."""
    def text(ids):
        return " ".join(f"t{i}" for i in ids if i > 2)

    return [{"prompt": [{"role": "user", "content": text(p.prompt_ids)}],
             "chosen": [{"role": "assistant", "content": text(p.chosen_ids)}],
             "rejected": [{"role": "assistant", "content": text(p.rejected_ids)}]} for p in pairs]


class StepTimer(transformers.TrainerCallback):
    """Wall time of each optimizer step (device synchronised)."""

    def __init__(self, device):
        self.device, self.seconds = device, []

    def on_step_begin(self, args, state, control, **kwargs):
        _sync(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        self.seconds.append(time.perf_counter() - self._start)


def common_args(out: Path, name: str, steps: int, batch: int, device: torch.device) -> dict:
    return dict(output_dir=str(out / name), max_steps=steps, per_device_train_batch_size=batch,
                learning_rate=LEARNING_RATE, bf16=True, max_length=1024, logging_steps=steps, save_strategy="no",
                report_to="none", disable_tqdm=True, seed=0, remove_unused_columns=False,
                use_cpu=device.type == "cpu", optim="adamw_torch_fused")


def run_orpo(model, rows, tokenizer, device, out, steps, batch):
    from orpo import ORPOConfig, ORPOTrainer

    config = ORPOConfig(**common_args(out, "orpo", steps, batch, device), max_prompt_length=None, report=False)
    trainer = ORPOTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    timer = StepTimer(device)
    trainer.add_callback(timer)
    trainer.train()
    return timer.seconds, trainer.plan.choice("activation checkpointing").reason


def run_trl(model, rows, tokenizer, device, out, steps, batch):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config = ORPOConfig(**common_args(out, "trl", steps, batch, device), gradient_checkpointing=False)
    trainer = ORPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    timer = StepTimer(device)
    trainer.add_callback(timer)
    trainer.train()
    return timer.seconds, "gradient_checkpointing=False"


def run_liger(model, pairs, device, steps, batch):
    """Liger's fused linear ORPO loss in a plain loop (it ships a loss, not a trainer)."""
    from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss

    loss_fn = LigerFusedLinearORPOLoss(beta=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
    model.train()
    seconds = []
    for step in range(steps):
        chunk = [pairs[(step * batch + i) % len(pairs)] for i in range(batch)]
        # Liger's layout: the chosen rows, then the rejected rows
        sequences = [p.prompt_ids + p.chosen_ids for p in chunk] + [p.prompt_ids + p.rejected_ids for p in chunk]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), PAD, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, (seq, pair) in enumerate(zip(sequences, chunk + chunk)):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(pair.prompt_ids) : len(seq)] = ids[row, len(pair.prompt_ids) : len(seq)]
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = loss_fn(model.lm_head.weight, hidden[:, :-1], labels[:, 1:])
            loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds, "no recompute"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few pairs (to try the script)")
    parser.add_argument("--runs", default="orpo,trl,liger")
    parser.add_argument("--steps", type=int, default=None, help="default 12 (3 with --quick)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="gpu_bench.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (--device cpu --quick tries the script on the CPU)")
        return 0
    steps = args.steps or (3 if args.quick else 12)
    config = model_config(args.quick)
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(config).state_dict()
    params = sum(v.numel() for v in state.values())
    pairs = make_pairs(steps * args.batch, config.vocab_size, args.quick)
    real_tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    tokenizer = tokenizer_for(config)
    peak = bf16_peak_tflops(device, 1024 if args.quick else 8192)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "parameters": params,
              "pairs_per_step": args.batch, "steps": steps, "bf16_peak_tflops": round(peak, 1), "runs": {}}
    print(json.dumps(report), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
            model = fresh_model(config, state, device)
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                if name == "orpo":
                    seconds, note = run_orpo(model, text_rows(pairs), tokenizer, device, Path(tmp), steps, args.batch)
                elif name == "trl":
                    seconds, note = run_trl(model, text_rows(pairs), tokenizer, device, Path(tmp), steps, args.batch)
                elif name == "liger":
                    seconds, note = run_liger(model, pairs, device, steps, args.batch)
                else:
                    parser.error(f"unknown run {name!r}")
            except ImportError as err:
                report["runs"][name] = {"status": f"skipped: {err}"}
                print(name, json.dumps(report["runs"][name]), flush=True)
                continue
            timed = seconds[1:] or seconds  # the first step warms up
            step_tokens = real_tokens / steps
            rate = len(timed) * step_tokens / sum(timed)
            report["runs"][name] = {
                "status": "ok", "note": note, "step_seconds": round(sum(timed) / len(timed), 4),
                "pairs_per_second": round(len(timed) * args.batch / sum(timed), 2),
                "tokens_per_second": round(rate, 1), "mfu": round(6 * params * rate / (peak * 1e12), 4),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if device.type == "cuda" else None,
            }
            print(name, json.dumps(report["runs"][name]), flush=True)
            del model
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
