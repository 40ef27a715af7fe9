"""Where one training step's time goes, by kind of work (torch.profiler, CPU).

`StepProfiler` is a TrainerCallback: it profiles optimizer steps `first`..`first + steps − 1` (after
warm-up: the first steps of a process also page in the memory it will reuse) and `table()` splits
their wall time into

| kind | profiled ops (self time) |
| --- | --- |
| large matmuls | mm / addmm / bmm / linear of the decoder layers (and their gradients) |
| attention | SDPA kernels (flash / math, forward and backward) |
| output head | every op with the vocabulary in one of its input shapes (the head's matmul, log-softmax, gather) |
| optimizer | ops inside `Optimizer.step` / `zero_grad` and every `_foreach_` op (AdamW, gradient clipping) |
| casts and copies | `_to_copy` / `copy_` / `to` / `clone` / `contiguous` outside the head and the optimizer (autocast's weight casts, layouts) |
| norms and element-wise | every other op outside the head and the optimizer (RMSNorm, SiLU, rotary, adds, masks, cat, index) |
| Python and dispatch | the steps' wall time minus the ops' self time: interpreter, hooks, the data loader, the Trainer loop |

Self time is an op's time minus its child ops', so the kinds add up to the ops' total; profiling
adds overhead (mostly to "Python and dispatch"), so the shares, not the seconds, are what to read.
"""
from __future__ import annotations

import time

from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

KINDS = ("large matmuls", "attention", "output head", "optimizer", "casts and copies", "norms and element-wise",
         "Python and dispatch")
_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mkldnn_matmul",
           "aten::mkldnn_linear"}
_COPY = {"aten::_to_copy", "aten::copy_", "aten::to", "aten::clone", "aten::contiguous", "aten::_copy_from",
         "aten::_copy_from_and_resize"}


def op_kind(name: str, input_shapes, ancestors: list[str], vocab_size: int) -> str:
    """The kind (KINDS) of one profiled op: its name, input shapes and the names of the ranges around it."""
    if name.startswith("aten::_foreach_") or any("Optimizer." in a for a in ancestors + [name]):
        return "optimizer"  # AdamW's foreach kernels and the gradient clipping's norms
    if any(vocab_size in shape for shape in input_shapes or () if isinstance(shape, (list, tuple))):
        return "output head"
    if "scaled_dot_product" in name or "flash_attention" in name or "attention_math" in name:
        return "attention"
    if name in _MATMUL:
        return "large matmuls"
    if name in _COPY:
        return "casts and copies"
    return "norms and element-wise"


class StepProfiler(TrainerCallback):
    """Profiles optimizer steps first..first+steps−1 of a Trainer run (see the module docstring)."""

    def __init__(self, vocab_size: int, first: int = 2, steps: int = 2):
        self.vocab_size, self.first, self.last = vocab_size, first, first + steps - 1
        self.prof = None
        self.wall = 0.0
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first <= state.global_step + 1 <= self.last and self.prof is None:
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.prof.__enter__()
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == self.last:
            self.wall = time.perf_counter() - self._start
            self.steps = self.last - self.first + 1
            self.prof.__exit__(None, None, None)

    def table(self, top: int = 0) -> dict:
        """{kind: seconds per step} plus "step seconds" (profiled wall time per step); with `top`, also
        "top ops": per kind its `top` most costly ops (name: seconds per step)."""
        seconds = dict.fromkeys(KINDS, 0.0)
        by_op: dict[tuple[str, str], float] = {}
        if self.prof is None or not self.steps:
            return {}
        for event in self.prof.events():
            if event.device_type.name != "CPU" or event.name.startswith(("ProfilerStep", "## ")):
                continue
            ancestors, parent = [], event.cpu_parent
            while parent is not None:
                ancestors.append(parent.name)
                parent = parent.cpu_parent
            if not event.name.startswith("aten::") and "Optimizer" not in event.name:
                continue  # ranges (autograd nodes, record_function) hold no work of their own
            kind = op_kind(event.name, event.input_shapes, ancestors, self.vocab_size)
            seconds[kind] += event.self_cpu_time_total / 1e6
            by_op[kind, event.name] = by_op.get((kind, event.name), 0.0) + event.self_cpu_time_total / 1e6
        ops = sum(seconds.values())
        seconds["Python and dispatch"] = max(self.wall - ops, 0.0)
        per_step = {kind: round(value / self.steps, 3) for kind, value in seconds.items()}
        table = {"step seconds": round(self.wall / self.steps, 3), **per_step}
        if top:
            ranked = sorted(by_op.items(), key=lambda item: -item[1])
            table["top ops"] = {kind: dict([(name, round(value / self.steps, 3))
                                            for (k, name), value in ranked if k == kind][:top])
                                for kind in KINDS[:-1]}
        return table
