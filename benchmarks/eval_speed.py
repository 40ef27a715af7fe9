"""Speed of `orpo eval`'s fast path against `--reference`, on the same pairs, in one process.

    .venv/bin/python benchmarks/eval_speed.py                      # 48 UltraFeedback eval pairs, max_length 1024
    .venv/bin/python benchmarks/eval_speed.py --pairs 8 --max_length 256 --modes reference,fast   # a smoke run

Loads SmolLM2-135M-Instruct (offline, as `orpo demo` does) in fp32 and prepares the pairs once, then
times scoring only (wall clock; model loading and data preparation excluded), one mode after the
other: `reference` (plain unpacked forwards, full fp32 logits, `--batch_size` pairs per call),
`fast` (the training path without gradients, fp32) and `fast-bf16` (the same under bf16 autocast).
Each fast mode also reports how far its per-pair log_odds are from the reference's. Prints one JSON
object (and writes it to --out): the CPU, torch version, per mode seconds, pairs/s, tokens/s (the
pairs' distinct tokens), speed-up over the reference and max/mean |Δlog_odds|.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from machine import cpu_description
from orpo.commands.evaluate import evaluate_model
from orpo.train.config import ORPOConfig, prepare_data
from orpo.train.allocator import keep_freed_memory
from orpo.train.models import fetch_smollm2, load_model, load_tokenizer

DATA = "../shared/data/ultrafeedback_200_eval.jsonl"




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--modes", default="reference,fast,fast-bf16")
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per call of the reference path")
    parser.add_argument("--out", default="eval_speed.json")
    args = parser.parse_args()

    keep_freed_memory()  # as `orpo eval` does on the CPU, for every mode
    model_dir = str(fetch_smollm2())
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        config = ORPOConfig(output_dir=tmp, max_length=args.max_length, report_to="none")
        pairs = prepare_data(config, args.data, tokenizer).pairs[: args.pairs]
    tokens = sum(p.shared_length for p in pairs)
    result = {"cpu": cpu_description(), "torch": torch.__version__, "pairs": len(pairs), "tokens": tokens,
              "max_length": args.max_length, "modes": {}}
    records = {}
    for mode in args.modes.split(","):
        start = time.perf_counter()
        records[mode] = evaluate_model(model, pairs, tokenizer.pad_token_id, reference=mode == "reference",
                                       batch_size=args.batch_size, bf16=mode == "fast-bf16")
        seconds = time.perf_counter() - start
        entry = {"seconds": round(seconds, 2), "pairs_per_second": round(len(pairs) / seconds, 3),
                 "tokens_per_second": round(tokens / seconds, 1)}
        if "reference" in records and mode != "reference":
            entry["speedup"] = round(result["modes"]["reference"]["seconds"] / seconds, 2)
            gaps = [abs(a["log_odds"] - b["log_odds"]) for a, b in zip(records[mode], records["reference"])]
            entry["max_abs_delta_log_odds"] = max(gaps)
            entry["mean_abs_delta_log_odds"] = sum(gaps) / len(gaps)
        result["modes"][mode] = entry
        print(mode, json.dumps(entry), flush=True)
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
