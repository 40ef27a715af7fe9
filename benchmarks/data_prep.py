"""Data at scale: preparation rows/s for 1 and N processes, cold and warm; `orpo data inspect` from the cache;
`orpo train`'s peak memory on many pairs against few; streaming rows/s and memory.

    .venv/bin/python benchmarks/data_prep.py                                   # 100k rows, every phase
    .venv/bin/python benchmarks/data_prep.py --rows 5000 --workers 1,2 --phases prepare   # a smoke run
    .venv/bin/python benchmarks/data_prep.py --rows 1000000 --phases stream    # 1M rows through the stream

Builds a synthetic set of `--rows` rows from the shared UltraFeedback file (its 1,000 rows repeated, each
copy's prompt suffixed with its copy number, so no two rows are alike). Every measurement is a fresh process
(SmolLM2-135M-Instruct's tokenizer and model, the defaults of `orpo train`: max_length 1024, max_prompt_length
512). Phases (`--phases`, comma-separated):
  prepare  for each worker count, a cold `prepare_dataset` into an empty cache and a warm one reading it back
  inspect  `orpo data inspect -n 1` of the whole set, the cache warm: the command's wall time
  train    `orpo train` (2 steps of the first 4 pairs) on the first 2,000 rows and on all of them, each cold (empty
           cache) and warm: the peak RSS of the training process (workers that prepare are processes of their own)
  stream   `orpo train --streaming` (2 steps of the first 4 pairs) on the first 2,000 rows and on all: peak RSS; then
           `PairStream` (what it reads) over every row: rows/s, and the RSS after a tenth of the rows and the last
Prints one JSON line per measurement, with the CPU; RSS is the process's VmHWM (peak) or VmRSS (now).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ultrafeedback_1k_train.jsonl"
ORPO = Path(sys.executable).parent / "orpo"
PEAK = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 2**20"
PREPARE = f"""
import json, sys, time
from orpo.data.prepare import prepare_dataset
from orpo.train.models import fetch_smollm2, load_tokenizer
tok = load_tokenizer(str(fetch_smollm2()))
start = time.perf_counter()
prepared = prepare_dataset(sys.argv[1], tok, num_proc=int(sys.argv[2]), cache_dir=sys.argv[3])
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": round(seconds, 2), "pairs": len(prepared.pairs), "origin": prepared.origin.split(",")[0],
                  "peak_rss_gb": round({PEAK}, 3)}}))
"""
TRAIN = f"""
import json, sys
from orpo.commands.cli import main
code = main(["train", *sys.argv[1:]])
print(json.dumps({{"rc": code, "peak_rss_gb": round({PEAK}, 3)}}))
"""
STREAM = """
import json, sys, time
from orpo.data.stream import PairStream
from orpo.train.models import fetch_smollm2, load_tokenizer
def rss(): return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 2**20
stream = PairStream(sys.argv[1], load_tokenizer(str(fetch_smollm2())), passes=1)
rows, start, marks = int(sys.argv[2]), time.perf_counter(), {}
for n, pair in enumerate(stream, 1):
    if stream.rows in (rows // 10, rows) and stream.rows not in marks:
        marks[stream.rows] = round(rss(), 3)
marks[stream.rows] = round(rss(), 3)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": round(seconds, 1), "rows_read": stream.rows, "pairs": stream.kept,
                  "rss_gb_at_rows": marks, "report": stream.report().splitlines()[0]}))
"""


def synthetic_set(rows: int, path: Path) -> Path:
    source = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    with open(path, "w") as f:
        for i in range(rows):
            row = dict(source[i % len(source)])
            row["prompt"] = f"{row['prompt']} ({i // len(source)})"
            f.write(json.dumps(row) + "\n")
    return path


def run(command: list[str]) -> tuple[dict, float]:
    """The command's last stdout line as JSON, and its wall time."""
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    lines = out.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]), wall
    except (IndexError, json.JSONDecodeError):
        return {"stdout_tail": lines[-3:]}, wall


def train_flags(model: str, source: Path, tmp: Path, streaming: bool = False) -> list[str]:
    """`orpo train` for 2 steps of 2 pairs, fp32, nothing saved, the first pairs of the file in order (the
    same 4 pairs whatever the file's size, so the steps cost the same): what the data costs, not the run."""
    order = ["--streaming", "--streaming_shuffle_buffer", "0"] if streaming else ["--train_sampling_strategy", "sequential"]
    return ["--model", model, "--dataset", str(source), "--output_dir", str(tmp / "run"), "--overwrite_output_dir",
            "true", "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to",
            "none", "--report", "false", "--disable_tqdm", "true", "--bf16", "false", *order]


def emit(**fields) -> None:
    print(json.dumps({"cpu": cpu_description(), **fields}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", default=f"1,{len(os.sched_getaffinity(0))}")
    parser.add_argument("--phases", default="prepare,inspect,train,stream")
    args = parser.parse_args()
    phases = args.phases.split(",")
    from orpo.train.models import fetch_smollm2

    model = str(fetch_smollm2())
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_set(args.rows, Path(tmp) / "rows.jsonl")
        if "prepare" in phases:
            for workers in dict.fromkeys(int(w) for w in args.workers.split(",")):
                cache = Path(tmp) / f"cache-{workers}"
                for phase in ("cold", "warm"):
                    result, _ = run([sys.executable, "-c", PREPARE, str(data), str(workers), str(cache)])
                    emit(phase=f"prepare {phase}", rows=args.rows, workers=workers, **result,
                         rows_per_s=round(args.rows / result["seconds"], 1))
        if "inspect" in phases:
            cache = Path(tmp) / "cache-inspect"
            flags = ["data", "inspect", "--model", model, "--dataset", str(data), "--dataset_cache_dir", str(cache), "-n", "1"]
            run([str(ORPO), *flags])  # fills the cache
            _, wall = run([str(ORPO), *flags])
            emit(phase="inspect warm", rows=args.rows, wall_seconds=round(wall, 2))
        if "train" in phases:
            few = synthetic_set(min(2000, args.rows), Path(tmp) / "few.jsonl")
            for name, source in (("2000 rows", few), (f"{args.rows} rows", data)):
                cache = Path(tmp) / f"cache-train-{name.split()[0]}"
                for phase in ("cold", "warm"):
                    flags = [*train_flags(model, source, Path(tmp)), "--dataset_cache_dir", str(cache)]
                    result, wall = run([sys.executable, "-c", TRAIN, *flags])
                    emit(phase=f"train {phase}", rows=name, wall_seconds=round(wall, 1), **result)
        if "stream" in phases:
            few = synthetic_set(min(2000, args.rows), Path(tmp) / "few.jsonl")
            for name, source in (("2000 rows", few), (f"{args.rows} rows", data)):
                result, wall = run([sys.executable, "-c", TRAIN, *train_flags(model, source, Path(tmp), streaming=True)])
                emit(phase="train --streaming", rows=name, wall_seconds=round(wall, 1), **result)
            result, _ = run([sys.executable, "-c", STREAM, str(data), str(args.rows)])
            emit(phase="stream", rows=args.rows, **result, rows_per_s=round(result["rows_read"] / result["seconds"], 1))


if __name__ == "__main__":
    main()
