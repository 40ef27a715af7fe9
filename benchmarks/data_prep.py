"""Data preparation speed and memory: rows/s for 1 and N processes, cold (empty cache) and warm (cached).

    .venv/bin/python benchmarks/data_prep.py                              # 100k rows, 1 and all-core processes
    .venv/bin/python benchmarks/data_prep.py --rows 5000 --workers 1,2    # a smoke run

Builds a synthetic set of `--rows` rows from the shared UltraFeedback file (its 1,000 rows repeated, each
copy's prompt suffixed with its copy number, so no two rows are alike), then, for each worker count, in a
fresh process each: a cold `prepare_dataset` into an empty cache (SmolLM2-135M-Instruct's tokenizer, the
defaults of `orpo train`: max_length 1024, max_prompt_length 512) and a warm one that reads it back.
Prints one JSON line per run: the CPU, rows, workers, cold/warm, seconds, rows/s, pairs kept and the
process's peak RSS (VmHWM of the main process; workers are processes of their own).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_description

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ultrafeedback_1k_train.jsonl"
ONE_RUN = r"""
import json, sys, time
from orpo.data.prepare import prepare_dataset
from orpo.train.models import fetch_smollm2, load_tokenizer
tok = load_tokenizer(str(fetch_smollm2()))
start = time.perf_counter()
prepared = prepare_dataset(sys.argv[1], tok, num_proc=int(sys.argv[2]), cache_dir=sys.argv[3])
seconds = time.perf_counter() - start
peak = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 2**20
print(json.dumps({"seconds": round(seconds, 2), "pairs": len(prepared.pairs), "origin": prepared.origin.split(",")[0],
                  "peak_rss_gb": round(peak, 3)}))
"""


def synthetic_set(rows: int, path: Path) -> Path:
    source = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    with open(path, "w") as f:
        for i in range(rows):
            row = dict(source[i % len(source)])
            row["prompt"] = f"{row['prompt']} ({i // len(source)})"
            f.write(json.dumps(row) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", default=f"1,{len(os.sched_getaffinity(0))}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_set(args.rows, Path(tmp) / "rows.jsonl")
        for workers in dict.fromkeys(int(w) for w in args.workers.split(",")):
            cache = Path(tmp) / f"cache-{workers}"
            for phase in ("cold", "warm"):
                out = subprocess.run([sys.executable, "-c", ONE_RUN, str(data), str(workers), str(cache)],
                                     capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                result = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps({"cpu": cpu_description(), "rows": args.rows, "workers": workers, "phase": phase,
                                  **result, "rows_per_s": round(args.rows / result["seconds"], 1)}), flush=True)


if __name__ == "__main__":
    main()
