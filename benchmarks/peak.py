"""The machine's matmul peak at a model's shapes, in fp32 and bf16; prints one JSON object.

For every linear layer of the model (a decoder layer's q, k, v, o, gate, up, down, and the output head)
at `--tokens` tokens, the three matmuls of training are timed: forward [T, in] x [in, out], the input
gradient [T, out] x [out, in] and the weight gradient [out, T] x [T, in]. `mix_gflops` is their total
FLOPs over their total time, with the decoder's matmuls counted once per layer and the head's once:
what a training step's matmuls reach if they all ran as fast as torch.matmul runs them alone, the
ceiling a trainer's useful FLOP/s is measured against. `best_gflops` is the fastest single matmul.

    python benchmarks/peak.py [--model DIR] [--tokens 1024] [--threads 2]

The JSON also names the CPU and its matmul-relevant flags (machine.py).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's orpo (see worker.py)
from machine import cpu_description  # noqa: E402
from orpo.train.models import fetch_smollm2  # noqa: E402


def linear_shapes(config) -> list[tuple[int, int, int]]:
    """(in, out, times per step) of each linear layer of a decoder-only transformer `config`."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    i = config.intermediate_size
    return [(h, q, layers), (h, kv, 2 * layers), (q, h, layers), (h, i, 2 * layers), (i, h, layers),
            (h, config.vocab_size, 1)]


def gflops_of(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """GFLOP/s of a @ b: the median of repeated timings, after a warm-up, for about `seconds`."""
    for _ in range(3):
        a @ b
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / statistics.median(times) / 1e9


def matmul_peak(config, tokens: int, dtype: torch.dtype, seconds: float = 0.5) -> dict:
    flops = time_total = 0.0
    per_shape, best = {}, 0.0
    for n_in, n_out, times in linear_shapes(config):
        x, w, g = (torch.randn(*s, dtype=dtype) for s in ((tokens, n_in), (n_in, n_out), (tokens, n_out)))
        rates = [gflops_of(x, w, seconds), gflops_of(g, w.T.contiguous(), seconds),
                 gflops_of(g.T.contiguous(), x, seconds)]
        step_flops = 3 * 2 * tokens * n_in * n_out * times
        flops += step_flops
        time_total += sum(2 * tokens * n_in * n_out * times / (r * 1e9) for r in rates)
        per_shape[f"{n_in}x{n_out}"] = [round(r, 1) for r in rates]
        best = max(best, *rates)
    return {"mix_gflops": round(flops / time_total / 1e9, 1), "best_gflops": round(best, 1),
            "per_shape_fwd_dgrad_wgrad": per_shape}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model directory whose config.json gives the shapes "
                   "(default: SmolLM2-135M-Instruct, the benchmark's model)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = AutoConfig.from_pretrained(a.model or str(fetch_smollm2())).get_text_config()
    print(json.dumps({"cpu": cpu_description(), "tokens": a.tokens, "threads": a.threads,
                      **{name: matmul_peak(config, a.tokens, dtype)
                         for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}}))


if __name__ == "__main__":
    main()
