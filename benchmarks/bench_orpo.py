"""Benchmark orpo's ORPOTrainer against TRL's trl.experimental.orpo.ORPOTrainer.

First the machine's matmul peak at the model's shapes (peak.py) and its CPU; then every measurement
is one fresh `python benchmarks/worker.py ...` subprocess (so peak RSS is per run); runs alternate
between configurations (RUNS). This process watches each child's RSS and kills it above
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

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
POLL_SECONDS = 0.5
LEAN_BUDGET_GB = 3.0
PROFILE_PAIRS = 24  # the profiled orpo run: steps 4 and 5 of 24 pairs (step_profile.py)
# name -> (trainer, config kwargs): each trainer's defaults, TRL without recompute (its fastest), and the
# options issue-by-issue measured for orpo
RUNS = {
    "orpo": ("orpo", {}),
    "trl": ("trl", {}),
    "trl-fastest": ("trl", {"gradient_checkpointing": False}),
    "orpo-recompute": ("orpo", {"activation_checkpointing": True}),
    "orpo-selective": ("orpo", {"activation_checkpointing": True, "selective_checkpointing": True}),
    # a step budget under which the planner recomputes what keeps SmolLM2's whole process near 5 GB
    "orpo-lean": ("orpo", {"memory_budget_gb": LEAN_BUDGET_GB}),
    "orpo-fused-adamw": ("orpo", {"optim": "adamw_torch_fused"}),
    "orpo-compile": ("orpo", {"torch_compile": True}),
}


def rss_gb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def run_worker(args, run, dtype, max_length, pairs, batch, peak, profile_steps=0):
    """One measured run in a fresh subprocess; returns the worker's JSON record or a failure record."""
    trainer, config = RUNS[run]
    config = {**config, **(json.loads(args.orpo_args) if trainer == "orpo" else {})}
    cmd = [sys.executable, str(WORKER), "--trainer", trainer, "--workload", args.workload, "--dtype", dtype,
           "--pairs", str(pairs), "--max_length", str(max_length), "--batch", str(batch),
           "--config", json.dumps(config), "--profile_steps", str(profile_steps)] + (
               ["--peak_gflops", str(peak)] if peak else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    base = {"run": run, "trainer": trainer, "workload": args.workload, "dtype": dtype, "max_length": max_length,
            "pairs": pairs, "batch": batch}
    print(f"[bench] {run} {args.workload} {dtype} max_length={max_length} pairs={pairs} batch={batch}",
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
        return {"run": run, **json.loads(records[-1]), "process_seconds": round(wall, 1),
                "polled_peak_rss_gb": round(peak, 3)}
    return {**base, "status": "crashed", "returncode": proc.returncode,
            "error": err_lines[-1] if err_lines else "(no stderr)"}


def median_of(results, run, key):
    values = [r[key] for r in results if r["run"] == run and r.get("status") == "ok"]
    return statistics.median(values) if values else None


def summarize(results, runs):
    """Per run: the medians of its finished repeats; per TRL run: orpo's pairs/s and peak RSS over it."""
    summary = {"status": {run: [r.get("status") for r in results if r["run"] == run] for run in runs}}
    for run in runs:
        mine = [r for r in results if r["run"] == run and r.get("status") == "ok"]
        if mine:
            summary[run] = {k: median_of(results, run, k) for k in
                            ("pairs_per_second", "useful_gflops", "share_of_peak", "peak_rss_gb", "train_seconds")}
            summary[run]["gradient_checkpointing"] = mine[0]["gradient_checkpointing"]
            summary[run]["checkpointing_every_n_layers"] = mine[0]["checkpointing_every_n_layers"]
    for trl_run in (run for run in runs if RUNS[run][0] == "trl"):
        for key in ("pairs_per_second", "peak_rss_gb"):
            ours, theirs = median_of(results, "orpo", key), median_of(results, trl_run, key)
            if ours is not None and theirs:
                summary[f"{key}_orpo_over_{trl_run}"] = ours / theirs
    return summary


def machine_peak() -> dict:
    """peak.py's JSON (CPU, matmul peaks at SmolLM2's shapes, 2 threads), measured before any trainer runs."""
    out = subprocess.run([sys.executable, str(HERE / "peak.py"), "--threads", "2"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["ultrafeedback", "hh", "context"], required=True)
    p.add_argument("--dtype", default="fp32,bf16", help="fp32 and/or bf16 (autocast), comma-separated")
    p.add_argument("--runs", default="orpo,trl,trl-fastest", help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--pairs", type=int, default=None, help="default 24; 4 for --workload context")
    p.add_argument("--max_length", type=int, default=1024, help="ignored for context (uses --lengths)")
    p.add_argument("--batch", type=int, default=None, help="default 4; 1 for --workload context")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--memory_limit_gb", type=float, default=22.0)
    p.add_argument("--lengths", default="512,1024,2048,4096,8192", help="context workload: max_length values")
    p.add_argument("--out", default="results.json")
    p.add_argument("--orpo_args", default="{}", help="extra ORPOConfig kwargs as JSON (orpo runs only)")
    p.add_argument("--profile", default="true", choices=["true", "false"],
                   help=f"per dtype, one more orpo run ({PROFILE_PAIRS} pairs) that profiles two steps by kind of work")
    args = p.parse_args()
    json.loads(args.orpo_args)  # fail early on bad JSON
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not set(runs) <= set(RUNS) or not set(dtypes) <= {"fp32", "bf16"}:
        p.error(f"--runs takes {', '.join(RUNS)}; --dtype takes fp32 and/or bf16")
    context = args.workload == "context"
    pairs = args.pairs if args.pairs is not None else (4 if context else 24)
    batch = args.batch if args.batch is not None else (1 if context else 4)
    lengths = [int(x) for x in args.lengths.split(",")] if context else [args.max_length]

    peak = machine_peak()
    print(json.dumps({"cpu": peak["cpu"], **{d: peak[d]["mix_gflops"] for d in ("fp32", "bf16")}}), file=sys.stderr)
    groups = []
    for dtype in dtypes:
        for length in lengths:
            results = [run_worker(args, run, dtype, length, pairs, batch, peak[dtype]["mix_gflops"])
                       for _ in range(args.repeats) for run in runs]  # orpo, trl, ..., orpo, trl, ...
            groups.append({"dtype": dtype, "max_length": length, "runs": results, "summary": summarize(results, runs)})
            if args.profile == "true":
                profiled = run_worker(args, "orpo", dtype, length, min(PROFILE_PAIRS, pairs), batch, None, 2)
                groups[-1]["profile"] = profiled.get("profile", profiled)
            print(json.dumps({"dtype": dtype, "max_length": length, **groups[-1]["summary"],
                              "profile": groups[-1].get("profile")}), file=sys.stderr, flush=True)

    report = {"date": time.strftime("%Y-%m-%d"), "machine": peak, "workload": args.workload, "runs": runs,
              "pairs": pairs, "batch": batch, "repeats": args.repeats, "memory_limit_gb": args.memory_limit_gb,
              "orpo_args": json.loads(args.orpo_args), "results": groups}
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
