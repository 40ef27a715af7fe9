"""Speed of `orpo generate`'s sampling: batched against one prompt at a time, fp32 against bf16 autocast.

    .venv/bin/python benchmarks/generation_speed.py                   # 32 UltraFeedback eval prompts, 128 new tokens
    .venv/bin/python benchmarks/generation_speed.py --prompts 4 --max_new_tokens 8 --batch_size 2   # a smoke run

Loads SmolLM2-135M-Instruct (offline, `orpo fetch-model`'s copy) in fp32 and times `generate_answers` only
(wall clock; loading excluded) on the first `--prompts` prompts of the eval set, sampled at `--temperature`
(1.0, the paper's), each prompt from its own seed, one mode after the other: `batched-fp32` (`--batch_size`
prompts per `model.generate` call, batched by length), `single-fp32` (batch size 1), and the same two under bf16
autocast (`batched-bf16`, `single-bf16`). A warm-up call of one prompt in each precision comes first. Per mode: seconds, answers/s,
answer tokens/s (the answers re-tokenized), and how many answers equal the first mode of the same precision
(sampling is seeded per answer, so batching should change none in fp32: tokens differ only where batching's
float noise flips a choice). Prints one JSON object (and writes it to --out) with the machine
(benchmarks/machine.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from machine import cpu_description
from orpo.commands.generate import generate_answers, read_prompts
from orpo.train.models import fetch_smollm2, load_model, load_tokenizer

PROMPTS = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrafeedback_200_eval.jsonl")
MODES = ("batched-fp32", "single-fp32", "batched-bf16", "single-bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=PROMPTS, help="prompts file (orpo generate's shapes)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="generation_speed.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # each mode's progress and ETA on stderr

    model_dir = str(fetch_smollm2())
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    prompts = read_prompts(args.data)[: args.prompts]
    result = {"cpu": cpu_description(), "torch": torch.__version__, "device": str(model.device),
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "batch_size": args.batch_size, "modes": {}}
    modes = args.modes.split(",")
    for bf16 in sorted({mode.endswith("bf16") for mode in modes}):  # warm-up: one prompt in each precision timed
        generate_answers(model, tokenizer, prompts[:1], args.max_new_tokens, args.temperature, args.seed, 1, bf16=bf16)
    first = {}  # precision → the answers of its first mode
    for mode in modes:
        batching, precision = mode.split("-")
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.seed,
                                   args.batch_size if batching == "batched" else 1, bf16=precision == "bf16",
                                   progress=mode)
        seconds = time.perf_counter() - start
        tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        reference = first.setdefault(precision, answers)
        entry = {"seconds": round(seconds, 2), "answers_per_second": round(len(answers) / seconds, 3),
                 "answer_tokens_per_second": round(tokens / seconds, 1), "answer_tokens": tokens,
                 "same_answers_as_first_" + precision: sum(a == b for a, b in zip(answers, reference))}
        result["modes"][mode] = entry
        print(mode, json.dumps(entry), flush=True)
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
