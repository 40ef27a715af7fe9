"""Training progress: a live bar (loss, log_odds, accuracy, tokens/s, ETA) on a terminal, one plain
line per log otherwise (CI, log files). Replaces the Trainer's own progress/printer callbacks."""
from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm
from transformers import TrainerCallback

SHOWN = (("loss", "loss", ".4f"), ("log_odds", "log_odds", ".3f"), ("accuracy", "acc", ".2f"),
         ("tokens_per_second", "tok/s", ".0f"))


def format_duration(seconds: float) -> str:
    """e.g. 3725 → "1h02m05s", 65 → "1m05s", 7 → "7s"."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class CountProgress:
    """Progress of counted work (answers generated, pairs judged): `progress(done, total)` after each batch logs
    "label: 32/200 answers  1.45 answers/s  eta 1m56s" (logger "orpo", stderr under the CLI) at most every `every`
    seconds, and always at the end."""

    def __init__(self, label: str, unit: str, every: float = 5.0, clock=time.monotonic):
        self.label, self.unit, self.every, self.clock = label, unit, every, clock
        self.started = self.logged = clock()

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if now - self.logged < self.every and done < total:
            return
        self.logged = now
        rate = done / max(now - self.started, 1e-9)
        eta = format_duration((total - done) / rate) if rate > 0 else "?"
        logging.getLogger("orpo").info("%s: %d/%d %s  %.2f %s/s  eta %s", self.label, done, total, self.unit, rate,
                                       self.unit, eta)


def format_line(step: int, max_steps: int, logs: dict, eta_seconds: float | None) -> str:
    """"step 10/100  loss 2.3100  log_odds 0.120  acc 0.62  tok/s 101  eta 3m20s"; eval logs
    ("eval_" keys) are shown as "eval step 10  loss ...". Missing metrics are left out."""
    evaluating = any(key.startswith("eval_") for key in logs)
    prefix = "eval_" if evaluating else ""
    parts = [f"eval step {step}" if evaluating else f"step {step}/{max_steps}"]
    parts += [f"{label} {logs[prefix + key]:{spec}}" for key, label, spec in SHOWN
              if isinstance(logs.get(prefix + key), (int, float))]
    if eta_seconds is not None and not evaluating:
        parts.append(f"eta {format_duration(eta_seconds)}")
    return "  ".join(parts)


class ProgressReporter(TrainerCallback):
    def __init__(self, live: bool | None = None):
        self.live = live
        self.bar = None
        self.started = 0.0
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.started, self.first_step = time.perf_counter(), state.global_step  # resumed runs start later
        live = self.live if self.live is not None else (sys.stderr.isatty() and not args.disable_tqdm)
        if live:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def eta(self, state) -> float | None:
        done = state.global_step - self.first_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (state.max_steps - state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or not any(k in logs for k in ("loss", "eval_loss")):
            return
        # the bar shows its own ETA
        line = format_line(state.global_step, state.max_steps, logs, None if self.bar else self.eta(state))
        if self.bar is not None:
            self.bar.set_postfix_str(line.split("  ", 1)[1] if "  " in line else "", refresh=True)
            if "eval_loss" in logs:
                self.bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
