"""Benchmark orpo's ORPOTrainer against TRL's trl.experimental.orpo.ORPOTrainer.

Every measurement is one fresh `python benchmarks/worker.py ...` subprocess (so peak RSS is per run);
runs alternate between trainers. This process watches each child's RSS and kills it above
--memory_limit_gb. See README.md for what is measured and how.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "worker.py"
POLL_SECONDS = 0.5


def rss_gb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def run_worker(args, trainer, max_length, pairs, batch):
    """One measured run in a fresh subprocess; returns the worker's JSON record or a failure record."""
    cmd = [sys.executable, str(WORKER), "--trainer", trainer, "--workload", args.workload, "--dtype", args.dtype,
           "--pairs", str(pairs), "--max_length", str(max_length), "--batch", str(batch),
           "--orpo_args", args.orpo_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    base = {"trainer": trainer, "workload": args.workload, "dtype": args.dtype, "max_length": max_length,
            "pairs": pairs, "batch": batch}
    print(f"[bench] {trainer} {args.workload} {args.dtype} max_length={max_length} pairs={pairs} batch={batch}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        peak = 0.0
        while proc.poll() is None:
            rss = rss_gb(proc.pid)
            peak = max(peak, rss)
            if rss > args.memory_limit_gb:
                proc.kill()
                proc.wait()
                return {**base, "status": "oom", "killed_at_gb": round(rss, 3)}
            time.sleep(POLL_SECONDS)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        records = [line for line in out.read().splitlines() if line.startswith("{")]
        err_lines = [line for line in err.read().splitlines() if line.strip()]
    if proc.returncode == 0 and records:
        return {**json.loads(records[-1]), "process_seconds": round(wall, 1), "polled_peak_rss_gb": round(peak, 3)}
    return {**base, "status": "crashed", "returncode": proc.returncode,
            "error": err_lines[-1] if err_lines else "(no stderr)"}


def ratio(results, key):
    """median(orpo) / median(trl) of `key` over the finished runs, or None."""
    medians = {}
    for trainer in ("orpo", "trl"):
        values = [r[key] for r in results if r["trainer"] == trainer and r.get("status") == "ok"]
        medians[trainer] = statistics.median(values) if values else None
    if medians["orpo"] is None or not medians["trl"]:
        return None
    return medians["orpo"] / medians["trl"]


def summarize(results):
    ok = [r for r in results if r.get("status") == "ok"]
    summary = {
        "pairs_per_second_ratio_orpo_over_trl": ratio(results, "pairs_per_second"),
        "peak_rss_ratio_orpo_over_trl": ratio(results, "peak_rss_gb"),
        "status": {t: [r.get("status") for r in results if r["trainer"] == t] for t in ("orpo", "trl")},
    }
    for trainer in ("orpo", "trl"):
        mine = [r for r in ok if r["trainer"] == trainer]
        if mine:
            summary[trainer] = {k: statistics.median(r[k] for r in mine) for k in
                                ("pairs_per_second", "real_tokens_per_second", "model_gflops", "share_of_peak",
                                 "peak_rss_gb", "train_seconds")}
            summary[trainer]["gradient_checkpointing"] = mine[0]["gradient_checkpointing"]
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["ultrafeedback", "hh", "context"], required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], required=True)
    p.add_argument("--trainers", default="orpo,trl")
    p.add_argument("--pairs", type=int, default=None, help="default 24; 4 for --workload context")
    p.add_argument("--max_length", type=int, default=1024, help="ignored for context (uses --lengths)")
    p.add_argument("--batch", type=int, default=None, help="default 4; 1 for --workload context")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--memory_limit_gb", type=float, default=22.0)
    p.add_argument("--lengths", default="512,1024,2048,4096,8192", help="context workload: max_length values")
    p.add_argument("--out", default="results.json")
    p.add_argument("--orpo_args", default="{}", help="extra ORPOConfig kwargs as JSON (orpo runs only)")
    args = p.parse_args()
    json.loads(args.orpo_args)  # fail early on bad JSON
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if not set(trainers) <= {"orpo", "trl"}:
        p.error("--trainers takes orpo and/or trl")
    context = args.workload == "context"
    pairs = args.pairs if args.pairs is not None else (4 if context else 24)
    batch = args.batch if args.batch is not None else (1 if context else 4)
    lengths = [int(x) for x in args.lengths.split(",")] if context else [args.max_length]

    groups = []
    for length in lengths:
        results = [run_worker(args, trainer, length, pairs, batch)
                   for _ in range(args.repeats) for trainer in trainers]  # orpo, trl, orpo, trl, ...
        groups.append({"max_length": length, "runs": results, "summary": summarize(results)})
        print(json.dumps({"max_length": length, **groups[-1]["summary"]}), file=sys.stderr, flush=True)

    report = {"workload": args.workload, "dtype": args.dtype, "trainers": trainers, "pairs": pairs, "batch": batch,
              "repeats": args.repeats, "memory_limit_gb": args.memory_limit_gb, "orpo_args": json.loads(args.orpo_args),
              "results": groups}
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
