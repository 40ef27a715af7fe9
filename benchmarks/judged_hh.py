"""The ORPO paper's protocol at small scale (section 6, Table 2): do ORPO's sampled answers beat SFT's and the
base's, as judged by a reward model trained for the purpose?

    .venv/bin/python benchmarks/judged_hh.py             # the default sizes (see --help), written to benchmarks/results/judged_hh
    .venv/bin/python benchmarks/judged_hh.py --prompts 8 --policy_pairs 16 --rm_pairs 16 --max_new_tokens 8 \\
        --samples 2 --out /tmp/judged-smoke   # a smoke run

HH-RLHF harmless (../shared/data, offline) is split by prompt, with a seeded shuffle, into three disjoint parts:
held-out prompts, reward-model pairs and policy pairs; no prompt occurs in two parts. From SmolLM2-135M-Instruct
(the "base"):
- the policies: SFT (beta 0: the NLL of the chosen answers alone) and ORPO at each `--betas` λ (default the
  paper's 0.1 and 1.0, the authors' advice for small models), one epoch over the same policy pairs in the same
  order, with the same learning rate and schedule;
- the reward model: a Bradley-Terry reward model (`orpo train --objective reward`'s run) from the same base on the
  reward-model pairs, one epoch, as the paper's authors trained theirs (their OPT-1.3B reward model, one epoch);
  its accuracy on the held-out prompts' pairs says how far to trust it.
Each model answers every held-out prompt `--samples` times at `--temperature` (the paper: 3 at 1.0), sample s of
prompt i from its own seed (`generate.sample_seed`), so every model samples each (prompt, sample) from the same
seed. The reward model scores every answer once (`judges.RewardJudge`, as `orpo judge --reward_model` does); each
pair of models is compared answer against answer of the same (prompt, sample) (`stats.reward_outcome`), and
`stats.win_stats` gives the win rate with its 95% bootstrap CI over prompts, the sign test on prompts won and lost,
the length-controlled win rate and the mean lengths. Beside it, each policy's held-out Δlog_odds against the same
opponent on the held-out prompts' pairs (`orpo eval --compare`'s statistics), as benchmarks/alignment.py measures.

Writes into --out: data/ (the three parts as JSON lines, and the held-out prompts as `orpo generate` / `orpo
judge` read them), answers/ (each model's answers, `orpo generate --samples` lines), records/ (per-prompt records
of each comparison, as `orpo judge` writes them), results.json (everything, with each phase's seconds) and
results.md (the table).
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import time
from pathlib import Path

import torch

from machine import cpu_description
from orpo.commands.compare import compare_records
from orpo.commands.evaluate import evaluate_model
from orpo.commands.judge import build_records
from orpo.commands.generate import expand_samples, generate_answers, prompt_text, read_prompts
from orpo.commands.judges import RewardJudge, load_reward_model
from orpo.data.formats import rows_to_pairs
from orpo.run.trainer import ORPOTrainer
from orpo.stats import comparison_record, reward_outcome, win_stats
from orpo.train.config import ORPOConfig, prepare_data
from orpo.train.models import fetch_smollm2, load_model, load_tokenizer
from orpo.train.precision import choose_precision

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_test.jsonl.gz"
# The paper's Table 2, HH-RLHF: ORPO's win rate against SFT judged by its reward model (OPT policies).
PAPER_VS_SFT = {"OPT-125M": 84.0, "OPT-350M": 82.7, "OPT-1.3B": 78.0}


def read_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_by_prompt(rows: list[dict], prompts: int, rm_pairs: int, policy_pairs: int, seed: int
                    ) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(held-out prompts as {"id", "prompt": messages}, their pairs' rows, reward-model rows, policy rows): rows
    grouped by their prompt (orpo's row formats read it), groups shuffled with `seed`, then dealt out in that order:
    the first `prompts` groups are held out, the next groups give the reward model `rm_pairs` rows, the next the
    policies `policy_pairs`. No prompt is in two parts."""
    groups: dict[str, list[int]] = {}
    messages: dict[str, list[dict]] = {}
    for pair in rows_to_pairs(rows, source=str(DATA)).pairs:  # rows no format can read are left out
        key = json.dumps(pair.prompt, sort_keys=True)
        groups.setdefault(key, []).append(pair.index)
        messages[key] = pair.prompt
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held_out, rest = keys[:prompts], keys[prompts:]
    parts: list[list[dict]] = [[], []]
    wanted = (rm_pairs, policy_pairs)
    part = 0
    for key in rest:
        if part == 2:
            break
        parts[part] += [rows[i] for i in groups[key]]
        if len(parts[part]) >= wanted[part]:
            parts[part] = parts[part][: wanted[part]]
            part += 1
    if len(held_out) < prompts or part < 2:
        raise SystemExit(f"{DATA.name}: too few prompts for {prompts} held-out prompts, {rm_pairs} reward-model "
                         f"pairs and {policy_pairs} policy pairs")
    prompts_out = [{"id": i, "prompt": messages[key]} for i, key in enumerate(held_out)]
    held_out_rows = [rows[i] for key in held_out for i in groups[key]]
    return prompts_out, held_out_rows, parts[0], parts[1]


def write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train(model_dir: str, tokenizer, pairs, held_out, args, out: Path, beta: float | None):
    """One epoch over `pairs` from the base: a policy at `beta`, or the reward model (beta None). Returns the
    trained model as saved in `out` and loaded again, the run's seconds and the final held-out metrics (the reward
    model's: its pair accuracy)."""
    reward = beta is None
    config = ORPOConfig(
        output_dir=str(out), overwrite_output_dir=True, learning_rate=args.rm_learning_rate if reward else
        args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.1, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=16, num_train_epochs=1, logging_steps=10, save_strategy="no", report_to="none",
        seed=args.seed, disable_tqdm=True, report=False, eval_strategy="no",
        **({"objective": "reward"} if reward else {"beta": beta}),
    )
    # a reward model by name: the trainer loads it and draws its new score head from the run's seed (run/setup.py);
    # loaded here, the head would come from whatever the global generator's state is (a different judge each run)
    model = model_dir if reward else load_model(model_dir)
    trainer = ORPOTrainer(model=model, args=config, train_dataset=pairs, eval_dataset=held_out if reward else None,
                          processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    # the run's final evaluation (run/finish.py) of the reward model on the held-out pairs
    metrics = next((r for r in reversed(trainer.state.log_history) if "eval_accuracy" in r), {}) if reward else {}
    # loaded again from what the run saved, as `orpo generate / eval / judge` load it: the trainer's own model keeps
    # accelerate's mixed-precision wrapper on its forward, so it would score in bf16 (the base, loaded, in fp32)
    del trainer
    return (load_reward_model(str(out))[0] if reward else load_model(str(out))), seconds, metrics


def answer_lines(prompts: list[dict], answers: list[str], name: str) -> list[dict]:
    return [{"id": p["id"], "sample": p["sample"], "seed": p["seed"], "prompt": prompt_text(p["messages"]),
             "messages": p["messages"],
             "answers": {name: text}} for p, text in zip(prompts, answers)]


def comparison(prompts: list[dict], answers: dict, scores: dict, a: str, b: str, seed: int) -> tuple[list, dict]:
    """(per-prompt records as `orpo judge` writes them, win_stats as a dict) of model a against model b."""
    comparisons = [{"sample": p["sample"], "seed": p["seed"],
                    **comparison_record(reward_outcome(scores[a][i], scores[b][i]), answers[a][i], answers[b][i]),
                    "score_a": scores[a][i], "score_b": scores[b][i]} for i, p in enumerate(prompts)]
    records = build_records([{**p, "prompt": prompt_text(p["messages"])} for p in prompts], comparisons)
    return records, win_stats(records, seed=seed).as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200,
                        help="held-out prompts (200: the whole run fits in 90 min on 2 CPU cores, with win-rate CI "
                        "half-widths near 4 points; 300 took 94 min)")
    parser.add_argument("--rm_pairs", type=int, default=1200,
                        help="reward-model training pairs (640 at 2e-5, one epoch, gave a held-out accuracy of 0.53; "
                        "at 5e-5, two epochs, 0.60, memorising them)")
    parser.add_argument("--policy_pairs", type=int, default=640, help="policy training pairs")
    parser.add_argument("--betas", default="0.1,1.0", help="ORPO's λ values (SFT, beta 0, is always trained)")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--rm_learning_rate", type=float, default=5e-5)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--generation_batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/judged_hh")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("orpo.run", "orpo.train", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(args.out)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    model_dir = str(fetch_smollm2())
    tokenizer = load_tokenizer(model_dir)
    prompts, held_out_rows, rm_rows, policy_rows = split_by_prompt(read_rows(DATA), args.prompts, args.rm_pairs,
                                                                   args.policy_pairs, args.seed)
    data = out / "data"
    for name, rows in (("prompts", prompts), ("held_out_pairs", held_out_rows), ("rm_pairs", rm_rows),
                       ("policy_pairs", policy_rows)):
        write_lines(data / f"{name}.jsonl", rows)
    limits = ORPOConfig(output_dir=str(out), max_length=args.max_length, max_prompt_length=args.max_length // 2,
                        report_to="none", dataset_cache=False)
    pairs = {name: prepare_data(limits, str(data / f"{name}.jsonl"), tokenizer, name=name).pairs
             for name in ("held_out_pairs", "rm_pairs", "policy_pairs")}
    print(f"== HH-RLHF harmless by prompt: {len(prompts)} held-out prompts ({len(pairs['held_out_pairs'])} pairs), "
          f"{len(pairs['rm_pairs'])} reward-model pairs, {len(pairs['policy_pairs'])} policy pairs", flush=True)

    # the reward model first: its held-out accuracy is known before any answer is judged
    reward_model, seconds["train reward model"], rm_metrics = train(model_dir, tokenizer, pairs["rm_pairs"],
                                                                   pairs["held_out_pairs"], args, out / "runs" / "rm",
                                                                   None)
    print(f"   reward model: {seconds['train reward model']:.0f} s, held-out pair accuracy "
          f"{rm_metrics.get('eval_accuracy', float('nan')):.3f}", flush=True)
    # in the precision it trained and was evaluated in (the planner's: bf16 autocast where the device has bf16)
    judge = RewardJudge(reward_model, tokenizer, batch_size=16,
                        bf16=choose_precision(None, False, reward_model.device)[0])

    sampled = expand_samples(read_prompts(str(data / "prompts.jsonl")), args.samples, args.seed)
    methods = [("SFT", 0.0)] + [(f"ORPO λ={float(b):g}", float(b)) for b in args.betas.split(",")]
    answers, scores, eval_records = {}, {}, {}
    for name, beta in [("base", None)] + methods:
        if beta is None:
            model = load_model(model_dir)
        else:
            model, seconds[f"train {name}"], _ = train(model_dir, tokenizer, pairs["policy_pairs"], None, args,
                                                      out / "runs" / name.replace(" ", "_"), beta)
        bf16, _ = choose_precision(None, False, model.device)
        start = time.perf_counter()
        answers[name] = generate_answers(model, tokenizer, sampled, args.max_new_tokens, args.temperature,
                                         args.seed, args.generation_batch, bf16=bf16, progress=name)
        seconds[f"generate {name}"] = time.perf_counter() - start
        write_lines(out / "answers" / f"{name.replace(' ', '_')}.jsonl", answer_lines(sampled, answers[name], name))
        eval_records[name] = evaluate_model(model, pairs["held_out_pairs"], tokenizer.pad_token_id)
        del model
        start = time.perf_counter()
        scores[name], _ = judge.score([p["messages"] for p in sampled], answers[name])
        seconds[f"judge {name}"] = time.perf_counter() - start
        print(f"   {name}: answers {seconds[f'generate {name}']:.0f} s, mean reward "
              f"{sum(scores[name]) / len(scores[name]):+.3f}", flush=True)

    rows = []
    for a, _ in methods:
        for b in ("SFT", "base"):
            if a == b:
                continue
            records, stats = comparison(sampled, answers, scores, a, b, args.seed)
            write_lines(out / "records" / f"{a.replace(' ', '_')}_vs_{b}.jsonl", records)
            held_out = compare_records(eval_records[a], eval_records[b], seed=args.seed)[1]
            rows.append({"a": a, "b": b, "stats": stats, "held_out_log_odds": held_out})
    total = time.perf_counter() - started
    result = {"cpu": cpu_description(), "torch": torch.__version__, "minutes": round(total / 60, 1),
              "settings": vars(args), "seconds": {k: round(v) for k, v in seconds.items()},
              "reward_model": rm_metrics, "split": {"prompts": len(prompts), "held_out_pairs": len(pairs["held_out_pairs"]),
                                                    "rm_pairs": len(pairs["rm_pairs"]),
                                                    "policy_pairs": len(pairs["policy_pairs"])},
              "mean_reward": {k: sum(v) / len(v) for k, v in scores.items()}, "comparisons": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "results.md").write_text(table)
    print(table)
    print(f"finished in {total / 60:.1f} min; {out}/results.json, results.md")


def markdown(result: dict) -> str:
    split, rm = result["split"], result["reward_model"]
    lines = [f"{result['cpu']}; torch {result['torch']}; {result['minutes']} min", "",
             f"HH-RLHF harmless split by prompt: {split['policy_pairs']} policy pairs, {split['rm_pairs']} reward-model "
             f"pairs, {split['prompts']} held-out prompts ({split['held_out_pairs']} pairs); reward model's held-out "
             f"pair accuracy {rm.get('eval_accuracy', float('nan')):.3f}", "",
             "| A vs B | win rate of A [95% CI] | wins / ties / losses | prompts won / lost, sign p | LC win rate "
             "| mean length A / B (chars) | held-out Δlog_odds A − B [95% CI] |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["comparisons"]:
        s, h = row["stats"], row["held_out_log_odds"]
        low, high = s["win_rate_ci"]
        dl, dh = h["delta_log_odds_ci95"]
        lines.append(f"| {row['a']} vs {row['b']} | {100 * s['win_rate']:.1f} [{100 * low:.1f}, {100 * high:.1f}] "
                     f"| {s['wins']} / {s['ties']} / {s['losses']} | {s['prompts_won']} / {s['prompts_lost']}, "
                     f"p = {s['sign_test_p']:.3g} | {100 * s['lc_win_rate']:.1f} | {s['mean_length_a']:.0f} / "
                     f"{s['mean_length_b']:.0f} | {h['delta_log_odds']:+.3f} [{dl:+.3f}, {dh:+.3f}] |")
    paper = ", ".join(f"{k} {v}" for k, v in PAPER_VS_SFT.items())
    lines += ["", f"The paper's Table 2 (HH-RLHF, ORPO vs SFT, its reward model): {paper}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
