"""OUTPUT_DIR/metrics.jsonl → PNG plots and report.html (`orpo report OUTPUT_DIR`, and at the end of training).

Plots (x = optimizer step; eval records, when there are any, as a second series):
  loss.png      loss, nll and or_loss
  logps.png     mean log-prob per completion token of chosen and rejected: ORPO's picture, do they separate?
  log_odds.png  log_odds and accuracy (two axes; a reward model's: its accuracy)
  rewards.png   a reward model's (--objective reward) mean rewards of chosen and rejected
  speed.png     tokens/s
Training series of SMOOTH_FROM or more logs are drawn faintly with a trailing mean on top.
A run judged with `orpo judge --output OUTPUT_DIR[/NAME]` (judge.json, judge.html there) gets a section per
judgement: its win rate with CI, W/T/L, sign test, length-controlled win rate, and a link to its judge.html.
"""
from __future__ import annotations

import html
import json
import os

from orpo.errors import OrpoError

METRICS_FILE = "metrics.jsonl"
JUDGE_FILE = "judge.json"  # `orpo judge --output` (commands/judge.py); judge.html beside it
PLAN_FILE = "orpo_plan.json"  # what the run decided and why (orpo/run/plan.py), written when training starts
SMOOTH_FROM = 20  # logged training points from which plots add a trailing mean
REPORT_FILE = "report.html"
# file → (title, [(metric, label)], y-label, [(metric, label)] on a second axis)
PLOTS = {
    "loss.png": ("Loss", [("loss", "loss"), ("nll", "nll"), ("or_loss", "or_loss")], "loss", []),
    "logps.png": ("Completion log-probs per token",
                  [("logps/chosen", "chosen"), ("logps/rejected", "rejected")], "mean log p", []),
    "log_odds.png": ("Log odds ratio and accuracy", [("log_odds", "log_odds")], "log odds",
                     [("accuracy", "accuracy")]),
    "rewards.png": ("Rewards (a reward model)", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")],
                    "mean reward", []),
    "speed.png": ("Throughput", [("tokens_per_second", "tokens/s")], "tokens per second", []),
}


def read_metric_lines(path: str) -> tuple[list[dict], int]:
    """(the records of a metrics.jsonl, in order; how many partial last lines were dropped: 0 or 1). A last line
    that is not JSON is what a kill during a log write leaves: it is dropped. A bad line before it is one line."""
    if not os.path.isfile(path):
        raise OrpoError(f"{path}: no such file; `orpo report` needs the output_dir of an orpo training run")
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return records, 1
            raise OrpoError(f"{path}, line {n}: invalid JSON") from None
    return records, 0


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl; eval keys lose their `eval_` prefix."""
    train, evals = [], []
    for record in read_metric_lines(path)[0]:
        if any(key.startswith("eval_") for key in record):
            evals.append({k.removeprefix("eval_"): v for k, v in record.items()})
        elif "margin" in record:  # a training step's record (ORPO's, or a reward model's)
            train.append(record)
    return train, evals


def write_pair_records(path: str, records: list[dict], summary: dict, **extra) -> None:
    """Per-pair records (ops/scoring.py), one JSON line each, then a line with their `summary` (and `extra`, e.g.
    the step): the file of `orpo eval --output` and of `save_eval_pairs`."""
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
        f.write(json.dumps({"summary": summary, **extra}) + "\n")


def read_plan(output_dir: str) -> list[dict]:
    """The choices of the run's plan (PLAN_FILE: name, value, reason each), [] for a run without one."""
    path = os.path.join(output_dir, PLAN_FILE)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            return json.load(f)["choices"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise OrpoError(f"{path}: not a plan orpo wrote (invalid JSON or no choices)") from None


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the up to `window − 1` values before it (the first ones average fewer)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(points: int) -> int:
    """1 (no smoothing) below SMOOTH_FROM logged points, else a tenth of them: per-batch metrics are noisy."""
    return 1 if points < SMOOTH_FROM else points // 10


def _draw(axis, records: list[dict], evals: list[dict], metrics: list[tuple[str, str]], styles: tuple[str, str],
          mark_points: bool = False, **style) -> None:
    """One line per metric for the training records (styles[0]) and the eval records (styles[1]);
    `mark_points` marks the points of series shorter than 30. A long training series is drawn faintly,
    with its trailing mean over smoothing_window(points) logs on top."""
    for key, label in metrics:
        for data, line, suffix in ((records, styles[0], ""), (evals, styles[1], " (eval)")):
            x, y = _series(data, key)
            if not x:
                continue
            window = smoothing_window(len(x)) if data is records else 1
            if window > 1:
                (raw,) = axis.plot(x, y, line, alpha=0.25, linewidth=0.8, **style)
                axis.plot(x, trailing_mean(y, window), line, color=raw.get_color(),
                          label=f"{label} (mean of {window} logs)")
                continue
            marks = dict(marker="o", markersize=3) if mark_points and len(x) < 30 else {}
            axis.plot(x, y, line, label=label + suffix, **marks, **style)


def plot(records: list[dict], evals: list[dict], name: str, path: str) -> bool:
    """Write one PNG of PLOTS[name]; False (nothing written) if no record has its metrics."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; imported here: pyplot costs ~1 s at start-up
    import matplotlib.pyplot as plt

    title, left, ylabel, right = PLOTS[name]
    if not any(_series(records, key)[0] for key, _ in left + right):
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    _draw(ax, records, evals, left, ("-", "--"), mark_points=True)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        twin = ax.twinx()
        _draw(twin, records, evals, right, (":", "-."), color="tab:red")
        twin.set_ylabel(", ".join(label for _, label in right))
        twin.set_ylim(-0.05, 1.05)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _summary_rows(records: list[dict]) -> list[tuple[str, str, str]]:
    keys = ("loss", "nll", "or_loss", "log_odds", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected",
            "accuracy", "tokens_per_second")
    first, last = records[0], records[-1]
    return [(k, f"{first[k]:.4g}", f"{last[k]:.4g}") for k in keys if k in first and k in last]


def find_judgements(output_dir: str) -> list[str]:
    """The judge.json files of `orpo judge` runs written into output_dir or one of its subdirectories, sorted."""
    found = [os.path.join(output_dir, JUDGE_FILE)] + sorted(
        os.path.join(output_dir, name, JUDGE_FILE) for name in os.listdir(output_dir)
        if os.path.isdir(os.path.join(output_dir, name)))
    return [path for path in found if os.path.isfile(path)]


def judge_sections(output_dir: str) -> str:
    """One HTML section per judgement of the run (find_judgements): its numbers and a link to its judge.html."""
    sections = []
    for path in find_judgements(output_dir):
        try:
            with open(path) as f:
                summary = json.load(f)
            stats, settings = summary["stats"], summary["settings"]
            low, high = stats["win_rate_ci"]
            rows = [("A", settings["a"]), ("B", settings["b"]), ("judge", settings["judge"]),
                    ("win rate of A", f"{stats['win_rate']:.3f} ({stats['confidence']:.0%} CI {low:.3f} – "
                     f"{high:.3f}), {stats['prompts']} prompts, {stats['comparisons']} comparisons"),
                    ("wins / ties / losses", f"{stats['wins']} / {stats['ties']} / {stats['losses']}"),
                    ("sign test p (prompts)", f"{stats['sign_test_p']:.3g}"),
                    ("length-controlled win rate", f"{stats['lc_win_rate']:.3f}")]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise OrpoError(f"{path}: not a judge.json that orpo judge wrote") from None
        page = os.path.relpath(os.path.join(os.path.dirname(path), "judge.html"), output_dir)
        table = "".join(f"<tr><td class=reason>{html.escape(k)}</td><td class=reason>{html.escape(str(v))}</td></tr>"
                        for k, v in rows)
        sections.append(f'<h2>Judged: <a href="{html.escape(page)}">{html.escape(page)}</a></h2><table>{table}</table>')
    return "".join(sections)


def write_report(output_dir: str) -> str:
    """Write the PNGs and report.html into `output_dir` from its metrics.jsonl; return the HTML path."""
    train, evals = read_metrics(os.path.join(output_dir, METRICS_FILE))
    if not train:
        raise OrpoError(f"{os.path.join(output_dir, METRICS_FILE)}: no training records to plot")
    images = [name for name in PLOTS if plot(train, evals, name, os.path.join(output_dir, name))]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{a}</td><td>{b}</td></tr>" for k, a, b in _summary_rows(train))
    choices = "".join(f"<tr><td>{html.escape(c['name'])}</td><td>{html.escape(str(c['value']))}</td>"
                      f"<td class=reason>{html.escape(c['reason'])}</td></tr>" for c in read_plan(output_dir))
    plan = (f"<h2>What orpo chose for this run, and why</h2><table><tr><th>choice</th><th>value</th><th>reason</th></tr>"
            f"{choices}</table>") if choices else ""
    figures = "".join(f'<figure><img src="{name}" alt="{html.escape(PLOTS[name][0])}"></figure>' for name in images)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>orpo report: {html.escape(output_dir)}</title>
<style>body{{font-family:sans-serif;max-width:1500px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 10px;text-align:right}} td.reason{{text-align:left}}
figure{{display:inline-block;margin:8px}}</style>
</head><body>
<h1>orpo training report</h1>
<p>{html.escape(output_dir)}: {len(train)} logged training steps (last: step {train[-1]["step"]}),
{len(evals)} evaluations. ORPO is working when chosen and rejected log-probs separate and log_odds rises.</p>
<table><tr><th>metric</th><th>first log</th><th>last log</th></tr>{rows}</table>
{figures}
{plan}
{judge_sections(output_dir)}
</body></html>
"""
    path = os.path.join(output_dir, REPORT_FILE)
    with open(path, "w") as f:
        f.write(page)
    return path
