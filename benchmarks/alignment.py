"""Does ORPO align beyond SFT? Base vs SFT (beta 0) vs ORPO at λ = beta ∈ {0.1, 0.5, 1.0}, on held-out pairs.

    .venv/bin/python benchmarks/alignment.py                 # both datasets, ~60 min on 2 CPU cores
    .venv/bin/python benchmarks/alignment.py --quick         # fewer pairs and steps, ~15 min
    .venv/bin/python benchmarks/alignment.py --datasets hh --train_pairs 16 --eval_pairs 8   # a smoke run

For each dataset (HH-RLHF harmless, UltraFeedback; ../shared/data, offline) the pairs are split by a
seeded shuffle into training pairs and held-out pairs, and no held-out prompt occurs among the
training pairs. SmolLM2-135M-Instruct (the "base") is trained once per method, every run with the same
pairs in the same order, the same steps, learning rate and schedule; only beta differs (beta 0 is SFT:
the NLL on the chosen answers alone). During training the held-out pairs are scored every
`--eval_every` steps (the paper's Fig. 3 quantities: mean log-prob per token of the chosen and the
rejected answers). After training, each model is scored on the held-out pairs and on the first
`--in_sample_pairs` training pairs, and compared pair by pair (orpo.commands.compare) with SFT and
with the base: fixed/broken pairs, sign test p, mean Δlog_odds with a bootstrap 95% CI, Δlogp of
chosen and rejected.

Writes into --out (default benchmarks/results/alignment[-quick]): results.json (everything), results.md
(the tables) and one PNG per dataset (held-out log-probs and log-odds against steps).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

from machine import cpu_description
from orpo.commands.compare import compare_records
from orpo.commands.evaluate import evaluate_model
from orpo.data.render import TokenizedPair
from orpo.ops.scoring import summarize
from orpo.train.config import ORPOConfig, prepare_data
from orpo.train.models import fetch_smollm2, load_model, load_tokenizer
from orpo.run.trainer import ORPOTrainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "hh": {"name": "HH-RLHF harmless", "train": DATA / "hh_rlhf_harmless_test.jsonl.gz", "eval": None},
    "uf": {"name": "UltraFeedback", "train": DATA / "ultrafeedback_1k_train.jsonl",
           "eval": DATA / "ultrafeedback_200_eval.jsonl"},
}
METHODS = [("SFT", 0.0), ("ORPO λ=0.1", 0.1), ("ORPO λ=0.5", 0.5), ("ORPO λ=1.0", 1.0)]
# per dataset: training pairs, held-out pairs, max_length (HH turns are short, UltraFeedback answers long)
DEFAULTS = {"hh": (288, 64, 256), "uf": (80, 48, 384)}
QUICK = {"hh": (64, 32, 256), "uf": (32, 24, 320)}
EVALUATIONS = 4  # held-out evaluations during each run (with --eval_every unset)




def split_pairs(train: list[TokenizedPair], held_out: list[TokenizedPair] | None, n_train: int, n_eval: int,
                seed: int) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """(training pairs, held-out pairs): a seeded shuffle; without a separate held-out file the
    held-out pairs come first from the shuffled pairs; training pairs never share a held-out prompt."""
    rng = random.Random(seed)
    train = list(train)
    rng.shuffle(train)
    if held_out is None:
        held_out, train = train[:n_eval], train[n_eval:]
    else:
        held_out = list(held_out)
        rng.shuffle(held_out)
        held_out = held_out[:n_eval]
    prompts = {tuple(p.prompt_ids) for p in held_out}
    return [p for p in train if tuple(p.prompt_ids) not in prompts][:n_train], held_out


def score(model, pairs, tokenizer) -> list[dict]:
    return evaluate_model(model, pairs, tokenizer.pad_token_id)


def train_one(model_dir: str, tokenizer, train: list[TokenizedPair], held_out: list[TokenizedPair], beta: float,
              args, out: Path) -> tuple[torch.nn.Module, list[dict], float]:
    """Train one model; returns it, its held-out curve (one point per evaluation) and the training seconds."""
    steps = int(-(-len(train) // args.batch) * args.epochs)
    eval_every = args.eval_every or max(1, steps // EVALUATIONS)
    config = ORPOConfig(
        output_dir=str(out), overwrite_output_dir=True, beta=beta, learning_rate=args.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=0.1, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=16, num_train_epochs=args.epochs, logging_steps=eval_every,
        eval_strategy="steps", eval_steps=eval_every, save_strategy="no", report_to="none",
        seed=args.seed, disable_tqdm=True, activation_checkpointing=False, report=False,
        bf16=False,  # the published results are fp32 (orpo's default picks bf16 on CPUs that have it)
    )
    trainer = ORPOTrainer(model=load_model(model_dir), args=config, train_dataset=train, eval_dataset=held_out,
                          processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    curve = [{"step": r["step"], "logps/chosen": r["eval_logps/chosen"], "logps/rejected": r["eval_logps/rejected"],
              "log_odds": r["eval_log_odds"], "accuracy": r["eval_accuracy"]}
             for r in trainer.state.log_history if "eval_logps/chosen" in r]
    return trainer.model, curve, seconds


def comparison(a: list[dict], b: list[dict], seed: int) -> dict:
    return compare_records(a, b, seed=seed)[1]


def run_dataset(key: str, model_dir: str, tokenizer, sizes, args, out: Path) -> dict:
    n_train, n_eval, max_length = sizes
    spec = DATASETS[key]
    with_length = ORPOConfig(output_dir=str(out), max_length=max_length, max_prompt_length=max_length // 2,
                             report_to="none")
    train_all = prepare_data(with_length, str(spec["train"]), tokenizer, name=spec["train"].name).pairs
    eval_all = prepare_data(with_length, str(spec["eval"]), tokenizer, name=spec["eval"].name).pairs if spec["eval"] else None
    train, held_out = split_pairs(train_all, eval_all, n_train, n_eval, args.seed)
    in_sample = train[: args.in_sample_pairs]
    print(f"== {spec['name']}: {len(train)} training pairs ({sum(p.shared_length for p in train)} tokens), "
          f"{len(held_out)} held-out pairs, max_length {max_length}", flush=True)

    base = load_model(model_dir)
    records = {"base": {"held_out": score(base, held_out, tokenizer), "in_sample": score(base, in_sample, tokenizer)}}
    del base
    base_point = summarize(records["base"]["held_out"], 0.0)
    curves, seconds = {}, {}
    for name, beta in METHODS:
        model, curve, seconds[name] = train_one(model_dir, tokenizer, train, held_out, beta, args, out / "runs" / key)
        curves[name] = [{"step": 0, **{k: base_point[k] for k in ("logps/chosen", "logps/rejected", "log_odds", "accuracy")}}] + curve
        records[name] = {"held_out": score(model, held_out, tokenizer), "in_sample": score(model, in_sample, tokenizer)}
        print(f"   {name}: {seconds[name]:.0f} s, held-out {json.dumps(_short(summarize(records[name]['held_out'], beta)))}",
              flush=True)
        del model

    result = {"dataset": spec["name"], "train_pairs": len(train), "held_out_pairs": len(held_out),
              "max_length": max_length, "train_seconds": seconds, "curves": curves, "models": {}}
    for name in ["base"] + [m for m, _ in METHODS]:
        entry = {split: summarize(records[name][split], 0.0) for split in ("held_out", "in_sample")}
        for other in ("base", "SFT"):
            if other != name and not (name == "base"):
                entry[f"vs_{other}"] = {split: comparison(records[name][split], records[other][split], args.seed)
                                        for split in ("held_out", "in_sample")}
        result["models"][name] = entry
    plot(result, out / f"alignment_{key}.png")
    return result


def _short(summary: dict) -> dict:
    return {k: round(summary[k], 4) for k in ("accuracy", "log_odds", "logps/chosen", "logps/rejected")}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip([m for m, _ in METHODS], ("tab:gray", "tab:blue", "tab:orange", "tab:red")))
    for name, curve in result["curves"].items():
        steps = [p["step"] for p in curve]
        left.plot(steps, [p["logps/chosen"] for p in curve], "-o", color=colors[name], ms=3, label=f"{name} chosen")
        left.plot(steps, [p["logps/rejected"] for p in curve], "--", color=colors[name], label=f"{name} rejected")
        right.plot(steps, [p["log_odds"] for p in curve], "-o", color=colors[name], ms=3, label=name)
    left.set(title=f"{result['dataset']}: held-out log-prob per token (solid chosen, dashed rejected)",
             xlabel="optimizer step", ylabel="mean log p per token")
    right.set(title="held-out mean log odds ratio (chosen over rejected)", xlabel="optimizer step", ylabel="log_odds")
    left.title.set_fontsize(9)
    right.title.set_fontsize(9)
    left.legend(fontsize=7, ncol=2)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines += [f"### {result['dataset']}: {result['train_pairs']} training pairs, {result['held_out_pairs']} "
                  f"held-out pairs, max_length {result['max_length']}", "",
                  "| model | held-out accuracy | mean log_odds | logp chosen | logp rejected | vs SFT: fixed / broken, "
                  "sign p | vs SFT: Δlog_odds [95% CI] | vs SFT: Δlogp chosen / rejected | vs base: Δlog_odds [95% CI] "
                  "| in-sample vs SFT: Δlog_odds [95% CI] |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, entry in result["models"].items():
            h = entry["held_out"]
            row = [name, f"{h['accuracy']:.3f}", f"{h['log_odds']:.3f}", f"{h['logps/chosen']:.3f}",
                   f"{h['logps/rejected']:.3f}"]
            sft, base = entry.get("vs_SFT"), entry.get("vs_base")
            if sft:
                s = sft["held_out"]
                row += [f"{s['fixed']} / {s['broken']}, p = {s['sign_test_p']:.3g}", _delta(s),
                        f"{s['delta_logp_chosen']:+.3f} / {s['delta_logp_rejected']:+.3f}"]
            else:
                row += ["", "", ""]
            row.append(_delta(base["held_out"]) if base else "")
            row.append(_delta(sft["in_sample"]) if sft else "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _delta(summary: dict) -> str:
    low, high = summary["delta_log_odds_ci95"]
    return f"{summary['delta_log_odds']:+.3f} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and steps (~15 min on 2 cores)")
    parser.add_argument("--datasets", default="hh,uf")
    parser.add_argument("--train_pairs", type=int, help="override the training pairs of every dataset")
    parser.add_argument("--eval_pairs", type=int, help="override the held-out pairs of every dataset")
    parser.add_argument("--in_sample_pairs", type=int, default=None,
                        help="training pairs scored after training (default 48; 24 with --quick)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--eval_every", type=int, default=None,
                        help=f"optimizer steps between held-out evaluations (default: {EVALUATIONS} per run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.in_sample_pairs = args.in_sample_pairs or (24 if args.quick else 48)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    out = Path(args.out or f"benchmarks/results/alignment{'-quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = str(fetch_smollm2())
    tokenizer = load_tokenizer(model_dir)
    start = time.perf_counter()
    results = []
    for key in args.datasets.split(","):
        n_train, n_eval, max_length = (QUICK if args.quick else DEFAULTS)[key]
        sizes = (args.train_pairs or n_train, args.eval_pairs or n_eval, max_length)
        results.append(run_dataset(key, model_dir, tokenizer, sizes, args, out))
    total = time.perf_counter() - start
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = {"cpu": cpu_description(), "torch": torch.__version__, "seconds": round(total), "settings": settings,
              "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(f"{cpu_description()}; torch {torch.__version__}; {total / 60:.1f} min\n\n{table}")
    print(table)
    print(f"finished in {total / 60:.1f} min; {out}/results.json, results.md, alignment_*.png")


if __name__ == "__main__":
    main()
