"""One measured ORPO training run (orpo or TRL) in this process; prints ONE JSON line to stdout.

Started by bench_orpo.py in a fresh subprocess per run; see README.md for the definitions.
"""
import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

# The venv's editable-install finder resolves `orpo` as a namespace package when the script's
# directory (not the repo root) is sys.path[0], which hides orpo.ORPOConfig; put the repo first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from orpo.data.formats import rows_to_pairs  # noqa: E402
from orpo.data.load import load_rows  # noqa: E402
from orpo.train.models import fetch_smollm2  # noqa: E402
from orpo.data.prepare import prepare_dataset  # noqa: E402
from orpo.data.render import LengthLimits, ensure_chat_template  # noqa: E402

DATA = "/work/shared/data"
ULTRAFEEDBACK = f"{DATA}/ultrafeedback_1k_train.jsonl"
HH = f"{DATA}/hh_rlhf_harmless_test.jsonl.gz"
CONTEXT_COMPLETION_TOKENS = 100  # completion length of the synthetic long-context pairs
CONTEXT_MARGIN = 128  # prompt fills about max_length - CONTEXT_MARGIN tokens


def read_jsonl(path):
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
        return [json.loads(line) for line in f if line.strip()]


def conversation(prompt_messages, chosen, rejected):
    return {"prompt": prompt_messages,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def ultrafeedback_candidates():
    for r in read_jsonl(ULTRAFEEDBACK):
        if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]:
            yield conversation([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"])


def hh_candidates():
    pairs = rows_to_pairs(load_rows(HH)).pairs  # implicit prompt -> explicit message lists
    for p in pairs:
        yield {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}


def context_candidates(tokenizer, length):
    """Synthetic pairs: UltraFeedback prompts concatenated into one user message of about
    length - CONTEXT_MARGIN tokens (template included), completions cut to ~100 tokens."""
    rows = read_jsonl(ULTRAFEEDBACK)
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True)
    budget = length - CONTEXT_MARGIN - len(tokenizer(empty, add_special_tokens=False)["input_ids"])

    def cut(text, n):
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n])

    for i in range(len(rows)):
        parts, j, n = [], i, 0
        while n < budget:
            parts.append(rows[j % len(rows)]["prompt"])
            n += len(tokenizer(parts[-1], add_special_tokens=False)["input_ids"]) + 2
            j += 1
        chosen, rejected = (cut(rows[i][k], CONTEXT_COMPLETION_TOKENS) for k in ("chosen", "rejected"))
        if chosen.strip() and rejected.strip() and chosen != rejected:
            yield conversation([{"role": "user", "content": cut("\n\n".join(parts), budget)}], chosen, rejected)


def select_rows(candidates, tokenizer, n, max_length):
    """The first n candidate rows that orpo keeps at this max_length with no prompt limit (TRL 1.16
    has none), and orpo's tokenization of them (for the real-token count)."""
    rows, pairs = [], []
    for row in candidates:
        try:
            pair = prepare_dataset([row], tokenizer, limits=LengthLimits(max_length, None)).pairs[0]
        except Exception:  # dropped (too long, ...): not a usable pair
            continue
        rows.append(row)
        pairs.append(pair)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} usable pairs for max_length={max_length}, wanted {n}")
    return rows, pairs


def useful_flops(pairs, trainer, n_params, layers, attention_width):
    """FLOPs of one training pass over `pairs` that the trainer must compute, no recompute counted:
    6 x parameters per computed token (forward 2, backward 4) plus attention, 12 x layers x query
    width per attended key (QK and AV, forward and backward). Computed tokens: orpo's prefix-shared
    [prompt | chosen | rejected] (the rejected tokens attend to the prompt and to themselves); TRL's two
    sequences prompt+chosen and prompt+rejected, padding not counted."""
    def causal(n):  # keys attended by n tokens of one causal sequence
        return n * (n + 1) // 2

    tokens = attended = 0
    for pair in pairs:
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        if trainer == "orpo":
            tokens += p + c + r
            attended += causal(p + c) + r * p + causal(r)
        else:
            tokens += 2 * p + c + r
            attended += causal(p + c) + causal(p + r)
    return 6 * n_params * tokens + 12 * layers * attention_width * attended, tokens


def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


class TrainingClock(TrainerCallback):
    """Seconds from the Trainer's on_train_begin to its on_train_end: the training loop of either trainer, without
    what follows it (orpo saves the model and its card after it; TRL does not)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start


def peak_rss_gb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", choices=["orpo", "trl"], required=True)
    p.add_argument("--workload", choices=["ultrafeedback", "hh", "context"], required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--config", default="{}", help="extra config kwargs as JSON (this trainer's ORPOConfig)")
    p.add_argument("--profile_steps", type=int, default=0, help="profile this many steps from step 4 on (the "
                   "first steps also fault in the process's memory; step_profile.py) and report seconds per step by "
                   "kind of work")
    p.add_argument("--peak_gflops", type=float, default=None, help="the matmul peak of this dtype (peak.py)")
    a = p.parse_args()

    model_dir = str(fetch_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_chat_template(tokenizer)  # no-op for SmolLM2; same tokenizer state for both trainers
    candidates = {"ultrafeedback": ultrafeedback_candidates, "hh": hh_candidates,
                  "context": lambda: context_candidates(tokenizer, a.max_length)}[a.workload]()
    rows, pairs = select_rows(candidates, tokenizer, a.pairs, a.max_length)
    real_tokens = sum(2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in pairs)
    dataset = Dataset.from_list(rows)

    # Same for both: fp32 weights; --dtype bf16 = bf16 autocast mixed precision (TrainingArguments bf16=True).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_params = model.num_parameters()  # tied embeddings counted once
    steps = -(-len(rows) // a.batch)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{a.trainer}-"), per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=1e-6, max_length=a.max_length,
        bf16=a.dtype == "bf16",  # explicit: TRL's configs default to bf16=True
        report_to="none", save_strategy="no", logging_strategy="steps", logging_steps=steps,  # one log, at the end
        seed=0, use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, remove_unused_columns=False,
    )
    if a.trainer == "orpo":
        from orpo import ORPOConfig, ORPOTrainer
        extra = {"max_prompt_length": None, **json.loads(a.config)}  # no prompt limit, as TRL 1.16
        config = ORPOConfig(**common, **extra)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        config = ORPOConfig(**common, **json.loads(a.config))  # max_completion_length None, no prompt limit in 1.16
    trainer = ORPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    profiler = None
    if a.profile_steps:
        from step_profile import StepProfiler
        profiler = StepProfiler(model.config.get_text_config().vocab_size, first=4, steps=a.profile_steps)
        trainer.add_callback(profiler)

    clock = TrainingClock()  # the training loop alone: orpo's train() also saves the model and its card after it
    trainer.add_callback(clock)
    trainer.train()
    seconds = clock.seconds

    shutil.rmtree(config.output_dir, ignore_errors=True)  # orpo writes metrics.jsonl there
    trained = len(trainer.train_dataset)
    gflops = 6 * n_params * real_tokens / seconds / 1e9
    text = model.config.get_text_config()
    width = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    flops, computed_tokens = useful_flops(pairs, a.trainer, n_params, text.num_hidden_layers, width)
    useful = flops / seconds / 1e9
    loss = next((log["loss"] for log in reversed(trainer.state.log_history) if "loss" in log), None)
    print(json.dumps({
        "status": "ok", "trainer": a.trainer, "dtype": a.dtype, "workload": a.workload,
        "max_length": a.max_length, "batch": a.batch, "steps": trainer.state.global_step,
        "pairs": trained, "train_seconds": round(seconds, 3), "pairs_per_second": trained / seconds,
        "real_tokens": real_tokens, "real_tokens_per_second": real_tokens / seconds,
        "n_params": n_params, "model_gflops": gflops, "computed_tokens": computed_tokens, "useful_gflops": useful,
        "share_of_peak": useful / a.peak_gflops if a.peak_gflops else None,
        "peak_rss_gb": round(peak_rss_gb(), 3), "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "checkpointing_every_n_layers": (trainer.args.gradient_checkpointing_kwargs or {}).get("every_n_layers", 1)
        if trainer.args.gradient_checkpointing else None,
        "checkpointing_reason": trainer.plan.choice("activation checkpointing").reason
        if hasattr(trainer, "plan") else None,
        "precision": trainer.plan.choice("precision").reason if hasattr(trainer, "plan") else None,
        "loss_logged": loss, "config": a.config,
        **({"profile": profiler.table(top=6)} if profiler else {}),
        "versions": {k: version(k) for k in ("torch", "transformers", "trl", "orpo")},
    }), flush=True)


if __name__ == "__main__":
    main()
