"""`orpo judge`: did training help? Model A's answers against model B's on the same prompts, judged, with a win rate.

Answers come from models (generated here through the one generator, `generate.generate_answers`: each prompt
`samples` times, each (prompt, sample) from its own seed `generate.sample_seed(seed, prompt index, sample)`, so A,
B and reruns sample each answer from the same seed) or from files of `orpo generate` (one line per (prompt,
sample): {"id", "sample", "seed", "prompt", "messages", "answers": {model: text}}; a file without "sample" holds
sample 0, one without "messages" a prompt of one user message, its "prompt" text).
The two sides are matched on (id, sample); one judge (commands/judges.py) gives each pair an outcome for A (1 win,
0.5 tie, 0 loss) through `stats.reward_outcome` / `stats.pairwise_outcome` / the reference rule, and
`stats.win_stats` turns the per-prompt records into the reported numbers.

Output (`--output DIR`):
  records.jsonl  one line per prompt: {"id", "prompt", "comparisons": [{"sample", "seed", "answer_a", "answer_b",
                 "outcome", "length_a", "length_b", + the judge's evidence}]}; the evidence is "score_a",
                 "score_b" (reward model), "verdict_a_first", "verdict_b_first", "judge_a_first", "judge_b_first",
                 "parsed_a_first", "parsed_b_first" (pairwise judge), "correct_a", "correct_b" (reference);
  judge.json     {"settings": ..., "stats": win_stats(records).as_dict(), "judge": the judge's own counts}: every
                 number in it is a function of records.jsonl (`judge_counts`, `stats.win_stats`);
  judge.html     the summary, the judge's picture (score histograms / verdict counts / accuracy) and every prompt.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from orpo.commands.generate import expand_samples, generate_answers, prompt_text, read_prompts
from orpo.commands.judges import (API_KEY_VARIABLES, JUDGE_PROMPT, JUDGE_SYSTEM, ChatEndpoint, PairwiseJudge,
                                  RewardJudge, check_reward_model, is_correct, load_reward_model, local_completion)
from orpo.errors import OrpoError
from orpo.stats import comparison_record, pairwise_outcome, reward_outcome, win_stats
from orpo.train.precision import choose_precision
from orpo.train.progress import CountProgress

logger = logging.getLogger("orpo")

RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "judge.json"
HTML_FILE = "judge.html"
REFERENCE_FIELDS = ("reference", "answer")


@dataclass
class JudgeOptions:
    """The flags of `orpo judge` (cli.py), as values."""

    model_a: str | None = None
    model_b: str | None = None
    answers_a: str | None = None
    answers_b: str | None = None
    prompts: str | None = None
    samples: int = 3
    temperature: float = 1.0
    seed: int = 0
    max_new_tokens: int = 256
    batch_size: int = 4
    limit: int | None = None
    dtype: str = "float32"
    bf16: bool | None = None  # None: where the device computes bf16 natively (train/precision.py, as training)
    reward_model: str | None = None
    judge_model: str | None = None
    judge_url: str | None = None
    judge_model_name: str = "default"
    judge_max_tokens: int = 32
    reference: bool = False
    output: str = "judge-out"


@dataclass
class Side:
    """One side's answers-to-be: `name` (the model or FILE[:MODEL]), `generate` (a model to sample from) and the
    items (each {"id", "sample", "seed", "messages", "prompt", and "answer" for a file's side})."""

    name: str
    generate: bool
    items: list[dict] = field(default_factory=list)


def judge_kind(options: JudgeOptions) -> str:
    """"reward", "pairwise" or "reference": exactly one judge, else one line."""
    chosen = [flag for flag, on in (("--reward_model", options.reward_model), ("--judge_model", options.judge_model),
                                    ("--judge_url", options.judge_url), ("--reference", options.reference)) if on]
    if len(chosen) != 1:
        problem = "no judge" if not chosen else f"{' and '.join(chosen)} together"
        raise OrpoError(f"orpo judge: {problem}; name exactly one judge: --reward_model PATH, --judge_model PATH, "
                        "--judge_url URL or --reference")
    return {"--reward_model": "reward", "--reference": "reference"}.get(chosen[0], "pairwise")


def plan_sides(options: JudgeOptions) -> tuple[Side, Side]:
    """Both sides checked and their items listed, before any model loads: flag combinations, the prompts file, the
    answer files, (id, sample) and prompts matching between the sides, references where --reference judges."""
    for side in ("a", "b"):
        model, answers = getattr(options, f"model_{side}"), getattr(options, f"answers_{side}")
        if bool(model) == bool(answers):
            raise OrpoError(f"orpo judge: side {side.upper()} needs exactly one of --model_{side} (a model to sample "
                            f"answers from) and --answers_{side} (an orpo generate file)")
    generating = bool(options.model_a or options.model_b)
    if generating and options.temperature == 0 and options.samples > 1:
        raise OrpoError(f"--samples {options.samples} with --temperature 0: greedy decoding gives one answer per "
                        "prompt; use --samples 1, or a temperature > 0 (the paper: 3 samples at 1.0)")
    if (generating or options.reference) and not options.prompts:
        raise OrpoError("orpo judge: --prompts FILE is needed"
                        + (" to sample answers from a model" if generating else " for --reference (its rows "
                           "carry the references)"))
    every_prompt = read_prompts(options.prompts) if options.prompts else None
    if every_prompt is not None:
        _check_unique_ids(options.prompts, every_prompt)
    if options.reference:
        for prompt, reference in zip(every_prompt, read_references(options.prompts)):
            prompt["reference"] = reference
    prompts = every_prompt[: options.limit] if every_prompt is not None else None
    sides = []
    for side in ("a", "b"):
        model, answers = getattr(options, f"model_{side}"), getattr(options, f"answers_{side}")
        if model:
            items = [{**p, "prompt": prompt_text(p["messages"])}
                     for p in expand_samples(prompts, options.samples, options.seed)]
            sides.append(Side(model, True, items))
        else:
            prompts_file = None if prompts is None else (options.prompts, prompts, {str(p["id"]) for p in every_prompt})
            sides.append(Side(answers, False, read_answers(answers, prompts_file, options.limit, f"--answers_{side}")))
    match_sides(*sides)
    return sides[0], sides[1]


def _check_unique_ids(path: str, prompts: list[dict]) -> None:
    seen = Counter(str(p["id"]) for p in prompts)
    repeated = [i for i, n in seen.items() if n > 1]
    if repeated:
        raise OrpoError(f"{path}: prompt id {repeated[0]!r} appears {seen[repeated[0]]} times; answers are matched "
                        "on (id, sample), so ids must be unique")


def read_references(path: str) -> list:
    """The "reference" (or "answer") of each prompt row, in read_prompts' order; one line for a row without one."""
    references = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)  # read_prompts has read this file: valid JSON objects
            reference = next((row[k] for k in REFERENCE_FIELDS if row.get(k) is not None), None)
            if reference is None or isinstance(reference, (dict, list)):
                raise OrpoError(f"{path}, line {n}: --reference needs a 'reference' (or 'answer') field, a text or "
                                "a number, on every prompt row")
            references.append(reference)
    return references


def split_answers_spec(spec: str) -> tuple[str, str | None]:
    """"FILE" or "FILE:MODEL" → (file, model or None); a FILE that exists as named is never split."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, model = spec.rsplit(":", 1)
    return path, model


def read_answers(spec: str, prompts_file: tuple[str, list[dict], set[str]] | None, limit: int | None,
                 flag: str) -> list[dict]:
    """The items of an `orpo generate` file (`spec`: FILE or FILE:MODEL; the model may be left out when the file
    holds one). `prompts_file`: (the --prompts path, its prompts after --limit, the ids of all its prompts), or
    None. With it, each line's id must be one of the file's prompts and its "prompt" text that prompt's (its
    messages are then the prompt's), and lines of prompts past --limit are left out; without, the prompt is the
    line's "messages" (a file of an older orpo generate has none: its "prompt" text as one user message), and
    `limit` keeps the lines of the file's first N prompt ids."""
    path, model = split_answers_spec(spec)
    prompts_path, prompts, known = prompts_file if prompts_file is not None else (None, None, None)
    by_id = {str(p["id"]): p for p in prompts} if prompts is not None else None
    try:
        f = open(path, encoding="utf-8")
    except OSError as err:
        raise OrpoError(f"{flag} {path}: cannot open ({err.strerror})") from None
    items, ids = [], set()
    with f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{flag} {path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise OrpoError(f"{where}: invalid JSON ({err.msg})") from None
            answers = row.get("answers") if isinstance(row, dict) else None
            if not isinstance(answers, dict) or not answers or "id" not in row or "prompt" not in row:
                raise OrpoError(f"{where}: expected an orpo generate line, {{\"id\", \"prompt\", \"answers\": "
                                "{model: text}}")
            if model is None:
                if len(answers) != 1:
                    raise OrpoError(f"{where}: answers of {len(answers)} models ({', '.join(answers)}); name one: "
                                    f"{flag} {path}:MODEL")
                model = next(iter(answers))
            if model not in answers:
                raise OrpoError(f"{where}: no answer of {model!r}; it has {', '.join(answers)}")
            sample = row.get("sample", 0)
            if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
                raise OrpoError(f"{where}: sample {sample!r}; expected a sample index, an integer >= 0")
            key = str(row["id"])
            if by_id is None and key not in ids:
                if limit is not None and len(ids) == limit:
                    continue
                ids.add(key)
            item = {"id": row["id"], "sample": sample, "seed": row.get("seed"), "prompt": row["prompt"],
                    "answer": answers[model]}
            if by_id is not None:
                if key not in known:
                    raise OrpoError(f"{where}: prompt id {row['id']!r} is not in --prompts {prompts_path}")
                if key not in by_id:
                    continue  # past --limit
                expected = prompt_text(by_id[key]["messages"])
                if expected != row["prompt"]:
                    raise OrpoError(f"{where}: prompt {row['id']!r} differs from --prompts' ({row['prompt'][:40]!r} "
                                    f"against {expected[:40]!r}): answers to other prompts")
                item["messages"] = by_id[key]["messages"]
                item.update({k: by_id[key][k] for k in ("reference",) if k in by_id[key]})
            elif "messages" in row:  # the whole prompt, as the model was asked it (several turns, a system message)
                messages = row["messages"]
                if not (isinstance(messages, list) and messages
                        and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
                    raise OrpoError(f"{where}: \"messages\" is not a list of {{\"role\", \"content\"}} messages")
                item["messages"] = messages
            else:
                item["messages"] = [{"role": "user", "content": row["prompt"]}]
            items.append(item)
    if not items:
        raise OrpoError(f"{flag} {path}: no answers")
    return items


def answer_key(item: dict) -> tuple[str, int]:
    """What matches an answer of A with one of B: (its prompt's id as text, its sample index)."""
    return str(item["id"]), int(item["sample"])


def match_sides(side_a: Side, side_b: Side) -> None:
    """One line unless both sides hold the same (id, sample) keys, each once, for the same prompts."""
    keyed = []
    for label, side in (("A", side_a), ("B", side_b)):
        keys = {}
        for item in side.items:
            key = answer_key(item)
            if key in keys:
                raise OrpoError(f"side {label} ({side.name}): prompt {item['id']!r} sample {item['sample']} appears "
                                "twice")
            keys[key] = item
        keyed.append(keys)
    keys_a, keys_b = keyed
    for (label, mine, theirs, name) in (("A", keys_a, keys_b, side_b.name), ("B", keys_b, keys_a, side_a.name)):
        missing = [key for key in mine if key not in theirs]
        if missing:
            raise OrpoError(f"side {label} has prompt {missing[0][0]!r} sample {missing[0][1]}, which the other side "
                            f"({name}) does not ({len(missing)} such); both sides must answer the same prompts and "
                            "samples (same --prompts, --limit, --samples)")
    for key, item in keys_a.items():
        if keys_b[key]["prompt"] != item["prompt"]:
            raise OrpoError(f"prompt {key[0]!r}: its text differs between side A ({side_a.name}) and side B "
                            f"({side_b.name}); they answered other prompts")


def pair_items(side_a: Side, side_b: Side, answers_a: list[str], answers_b: list[str]) -> list[dict]:
    """A's items in order, each with "answer_a" and "answer_b" (B's answer to the same (id, sample))."""
    b_by_key = {answer_key(item): answer for item, answer in zip(side_b.items, answers_b)}
    return [{**item, "answer_a": answer, "answer_b": b_by_key[answer_key(item)]}
            for item, answer in zip(side_a.items, answers_a)]


def judge_pairs(items: list[dict], kind: str, judge, chunk: int) -> list[dict]:
    """One comparison per item, in order: {"sample", "seed", "answer_a", "answer_b", "outcome", "length_a",
    "length_b", + the judge's evidence}. `judge`: a RewardJudge ("reward"), a PairwiseJudge ("pairwise") or None
    ("reference"); `chunk` pairs at a time, with progress."""

    progress = CountProgress("judged", "pairs")
    comparisons = []
    for start in range(0, len(items), chunk):
        batch = items[start : start + chunk]
        messages = [item["messages"] for item in batch]
        answers_a, answers_b = [item["answer_a"] for item in batch], [item["answer_b"] for item in batch]
        if kind == "reward":
            scores, cut = judge.score(messages + messages, answers_a + answers_b)
            n = len(batch)
            evidence = [{"score_a": a, "score_b": b, "truncated_a": ta, "truncated_b": tb}
                        for a, b, ta, tb in zip(scores[:n], scores[n:], cut[:n], cut[n:])]
        elif kind == "pairwise":
            evidence = judge.judge(messages, answers_a, answers_b)
        else:
            evidence = [{"correct_a": is_correct(item["answer_a"], item["reference"]),
                         "correct_b": is_correct(item["answer_b"], item["reference"])} for item in batch]
        for item, proof in zip(batch, evidence):
            comparisons.append({"sample": item["sample"], "seed": item.get("seed"),
                                **comparison_record(outcome(kind, proof), item["answer_a"], item["answer_b"]), **proof})
        progress(start + len(batch), len(items))
    return comparisons


def outcome(kind: str, evidence: dict) -> float:
    """A's outcome from a judge's evidence: stats.reward_outcome of the scores, stats.pairwise_outcome of the two
    verdicts, or for references 1 if only A is correct, 0 if only B, 0.5 if both or neither."""
    if kind == "reward":
        return reward_outcome(evidence["score_a"], evidence["score_b"])
    if kind == "pairwise":
        return pairwise_outcome(evidence["verdict_a_first"], evidence["verdict_b_first"])
    a, b = evidence["correct_a"], evidence["correct_b"]
    return 0.5 if a == b else 1.0 if a else 0.0


def build_records(items: list[dict], comparisons: list[dict]) -> list[dict]:
    """Per prompt, in first-appearance order: {"id", "prompt", "comparisons": [its comparisons in order]}."""
    records = {}
    for item, comparison in zip(items, comparisons):
        key = str(item["id"])
        if key not in records:
            records[key] = {"id": item["id"], "prompt": item["prompt"], "comparisons": []}
        records[key]["comparisons"].append(comparison)
    return list(records.values())


def judge_counts(kind: str, records: list[dict]) -> dict:
    """The judge's own numbers, from the records: reward model: mean scores of A and B; pairwise judge: the
    verdict counts of each order and how many replies were unparseable (read as ties); reference: each model's
    accuracy (correct answers / comparisons)."""
    comparisons = [c for r in records for c in r["comparisons"]]
    n = len(comparisons)
    if kind == "reward":
        return {"mean_score_a": sum(c["score_a"] for c in comparisons) / n,
                "mean_score_b": sum(c["score_b"] for c in comparisons) / n,
                "truncated": sum(c["truncated_a"] + c["truncated_b"] for c in comparisons)}
    if kind == "pairwise":
        counts = {order: dict(Counter(c[f"verdict_{order}"] for c in comparisons)) for order in ("a_first", "b_first")}
        return {"verdicts_a_first": {v: counts["a_first"].get(v, 0) for v in ("first", "second", "tie")},
                "verdicts_b_first": {v: counts["b_first"].get(v, 0) for v in ("first", "second", "tie")},
                "unparsed": sum((not c["parsed_a_first"]) + (not c["parsed_b_first"]) for c in comparisons),
                "judge_replies": 2 * n}
    return {"accuracy_a": sum(c["correct_a"] for c in comparisons) / n,
            "accuracy_b": sum(c["correct_b"] for c in comparisons) / n}


def summarize(kind: str, records: list[dict], settings: dict, seed: int) -> dict:
    """judge.json's content: settings, win_stats of the records (its bootstrap seeded with `seed`), judge_counts."""
    return {"settings": settings, "stats": win_stats(records, seed=seed).as_dict(),
            "judge": judge_counts(kind, records)}


def summary_table(summary: dict) -> str:
    """The few lines printed at the end (stdout)."""
    s, settings = summary["stats"], summary["settings"]
    low, high = s["win_rate_ci"]
    lines = [
        f"A: {settings['a']}",
        f"B: {settings['b']}",
        f"judge: {settings['judge']}",
        f"prompts x samples      {s['prompts']} x {settings['samples']} = {s['comparisons']} comparisons",
        f"win rate of A          {s['win_rate']:.3f}  ({s['confidence']:.0%} CI {low:.3f} .. {high:.3f}, "
        "bootstrap over prompts)",
        f"wins / ties / losses   {s['wins']} / {s['ties']} / {s['losses']}",
        f"prompts won / lost     {s['prompts_won']} / {s['prompts_lost']}  (sign test p = {s['sign_test_p']:.3g})",
        f"length-controlled      {s['lc_win_rate']:.3f}",
        f"mean length (chars)    A {s['mean_length_a']:.0f}, B {s['mean_length_b']:.0f}",
    ]
    judge = summary["judge"]
    if "accuracy_a" in judge:
        lines.append(f"accuracy               A {judge['accuracy_a']:.3f}, B {judge['accuracy_b']:.3f}")
    if "unparsed" in judge:
        lines.append(f"unparseable verdicts   {judge['unparsed']} of {judge['judge_replies']} (read as ties)")
    if "mean_score_a" in judge:
        lines.append(f"mean reward            A {judge['mean_score_a']:.4g}, B {judge['mean_score_b']:.4g}"
                     + (f"  ({judge['truncated']} conversations truncated to the reward model's context)"
                        if judge["truncated"] else ""))
    return "\n".join(lines)


def write_outputs(output_dir: str, kind: str, records: list[dict], summary: dict) -> list[str]:
    """records.jsonl, judge.json and judge.html into `output_dir`; their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, name) for name in (RECORDS_FILE, SUMMARY_FILE, HTML_FILE)]
    with open(paths[0], "w") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with open(paths[1], "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with open(paths[2], "w") as f:
        f.write(judge_html(kind, records, summary))
    return paths


def judge_section(kind: str, records: list[dict], summary: dict) -> str:
    """The HTML section (no page around it): summary table, the judge's picture, the per-prompt table."""
    s, settings, judge = summary["stats"], summary["settings"], summary["judge"]
    low, high = s["win_rate_ci"]
    rows = [("A", settings["a"]), ("B", settings["b"]), ("judge", settings["judge"]),
            ("prompts × samples", f"{s['prompts']} × {settings['samples']} ({s['comparisons']} comparisons)"),
            ("win rate of A", f"{s['win_rate']:.3f} ({s['confidence']:.0%} CI {low:.3f} – {high:.3f})"),
            ("wins / ties / losses", f"{s['wins']} / {s['ties']} / {s['losses']}"),
            ("prompts won / tied / lost", f"{s['prompts_won']} / {s['prompts_tied']} / {s['prompts_lost']}"),
            ("sign test p", f"{s['sign_test_p']:.3g}"),
            ("length-controlled win rate", f"{s['lc_win_rate']:.3f} (length coefficient {s['length_coef']:.3g})"),
            ("mean answer length (chars)", f"A {s['mean_length_a']:.0f}, B {s['mean_length_b']:.0f}")]
    if kind == "reward":
        rows += [("mean reward score", f"A {judge['mean_score_a']:.4g}, B {judge['mean_score_b']:.4g}"),
                 ("conversations truncated", str(judge["truncated"]))]
    elif kind == "reference":
        rows += [("accuracy", f"A {judge['accuracy_a']:.3f}, B {judge['accuracy_b']:.3f}")]
    else:
        rows += [("unparseable replies (read as ties)", f"{judge['unparsed']} of {judge['judge_replies']}")]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    picture = ""
    if kind == "reward":
        comparisons = [c for r in records for c in r["comparisons"]]
        png = score_histogram([c["score_a"] for c in comparisons], [c["score_b"] for c in comparisons])
        picture = f'<figure><img alt="reward scores of A and B" src="data:image/png;base64,{png}"></figure>'
    elif kind == "pairwise":
        counts = "".join(
            f"<tr><th>{label}</th>" + "".join(f"<td>{judge[key][v]}</td>" for v in ("first", "second", "tie")) + "</tr>"
            for label, key in (("A's answer first", "verdicts_a_first"), ("B's answer first", "verdicts_b_first")))
        picture = ("<h3>The judge's verdicts, by order</h3><table><tr><th></th><th>first is better</th>"
                   f"<th>second is better</th><th>tie or unparseable</th></tr>{counts}</table>")
    per_prompt = "".join(_prompt_row(r) for r in records)
    return (f"<section class=judge><h2>Judged: A against B</h2><table>{table}</table>{picture}"
            "<h3>Per prompt (A's outcomes: their mean, then each sample's; the first sample's answers)</h3>"
            f"<table><tr><th>id</th><th>prompt</th><th>A's outcomes</th><th>A (first sample)</th>"
            "<th>B (first sample)</th></tr>"
            f"{per_prompt}</table></section>")


def _prompt_row(record: dict) -> str:
    outcomes = [c["outcome"] for c in record["comparisons"]]
    first = record["comparisons"][0]
    cells = [str(record["id"]), record["prompt"],
             f"{sum(outcomes) / len(outcomes):.2f} ({', '.join(f'{o:g}' for o in outcomes)})",
             first["answer_a"], first["answer_b"]]
    return "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"


def judge_html(kind: str, records: list[dict], summary: dict) -> str:
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>orpo judge</title>
<style>body{{font-family:sans-serif;max-width:1500px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;vertical-align:top;white-space:pre-wrap;max-width:40em;text-align:left}}
</style></head><body>
{judge_section(kind, records, summary)}
</body></html>
"""


def score_histogram(scores_a: list[float], scores_b: list[float]) -> str:
    """The two score distributions as one PNG (overlaid histograms, shared bins), base64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    low, high = min(scores_a + scores_b), max(scores_a + scores_b)
    bins = 20 if high > low else 1
    ax.hist(scores_a, bins=bins, range=(low, high if high > low else low + 1), alpha=0.55, label="A")
    ax.hist(scores_b, bins=bins, range=(low, high if high > low else low + 1), alpha=0.55, label="B")
    ax.set_xlabel("reward score")
    ax.set_ylabel("answers")
    ax.legend()
    ax.set_title("Reward scores")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def check_output(output: str) -> None:
    from orpo.run.checks import check_writable_dir

    check_writable_dir("output", output)
    for name in (RECORDS_FILE, SUMMARY_FILE, HTML_FILE):
        path = Path(output) / name
        if path.exists() and not os.access(path, os.W_OK):
            raise OrpoError(f"--output {output}: {name} exists and is not writable")


def check_model_path(flag: str, name: str) -> None:
    """One line for a local model path (a .gguf file, a directory) that does not exist; hub ids pass."""
    from orpo.train.models import is_hub_model_id

    if not is_hub_model_id(name) and not Path(name).expanduser().exists():
        raise OrpoError(f"{flag} {name}: no such model file or directory")


def check_judge(options: JudgeOptions):
    """The judge's inputs before any model loads: its model's path (a reward model's config: one output), the
    endpoint answering; returns the ChatEndpoint of --judge_url (else None)."""
    if options.judge_model_name != "default" and not options.judge_url:
        raise OrpoError("--judge_model_name names the model of --judge_url's server; without --judge_url, "
                        "--judge_model is the judge")
    if options.reward_model:
        check_model_path("--reward_model", options.reward_model)
        check_reward_model(options.reward_model)
    if options.judge_model:
        check_model_path("--judge_model", options.judge_model)
    if options.judge_url:
        if not options.judge_url.startswith(("http://", "https://")):
            raise OrpoError(f"--judge_url {options.judge_url}: expected an http:// or https:// URL of an "
                            "OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1")
        key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
        endpoint = ChatEndpoint(options.judge_url, options.judge_model_name, key, options.judge_max_tokens)
        endpoint.check()
        return endpoint
    return None


def judge_name(options: JudgeOptions, kind: str) -> str:
    if kind == "reward":
        return f"reward model {options.reward_model}"
    if kind == "reference":
        return f"reference answers in {options.prompts}"
    if options.judge_url:
        return f"pairwise judge {options.judge_model_name} at {options.judge_url}"
    return f"pairwise judge {options.judge_model}"


def run_judge(options: JudgeOptions, load_model, load_tokenizer) -> tuple[dict, list[str]]:
    """The whole command: checks (nothing loaded yet), answers (generated or read), judging, the three files.
    `load_model(name, dtype)`, `load_tokenizer(name)`: how the CLI loads a model onto its device. Returns
    (judge.json's content, the paths written)."""

    kind = judge_kind(options)
    side_a, side_b = plan_sides(options)
    check_output(options.output)
    for flag, name in (("--model_a", options.model_a), ("--model_b", options.model_b)):
        if name:
            check_model_path(flag, name)
    endpoint = check_judge(options)

    answers = []
    for side in (side_a, side_b):
        if side.generate:
            tokenizer, model = load_tokenizer(side.name), load_model(side.name, options.dtype)
            bf16, precision = choose_precision(options.bf16, False, model.device)
            logger.info("sampling %d answers (%d prompts x %d) from %s; %s", len(side.items),
                        len(side.items) // options.samples, options.samples, side.name, precision)
            answers.append(generate_answers(model, tokenizer, side.items, options.max_new_tokens, options.temperature,
                                            options.seed, options.batch_size, bf16=bf16, progress=side.name))
            del model
        else:
            answers.append([item["answer"] for item in side.items])
    items = pair_items(side_a, side_b, *answers)

    chunk = options.batch_size
    if kind == "reward":
        model, tokenizer = load_reward_model(options.reward_model, options.dtype)
        bf16, precision = choose_precision(options.bf16, False, model.device)
        logger.info("the reward model scores under %s", precision)
        judge = RewardJudge(model, tokenizer, options.batch_size, bf16=bf16)
    elif kind == "pairwise" and endpoint is not None:
        judge, chunk = PairwiseJudge(endpoint), 1
    elif kind == "pairwise":
        tokenizer, model = load_tokenizer(options.judge_model), load_model(options.judge_model, options.dtype)
        bf16, _ = choose_precision(options.bf16, False, model.device)
        judge = PairwiseJudge(local_completion(model, tokenizer, options.judge_max_tokens, options.batch_size, bf16))
    else:
        judge = None
    logger.info("judging %d pairs with the %s", len(items), judge_name(options, kind))
    comparisons = judge_pairs(items, kind, judge, chunk)
    records = build_records(items, comparisons)
    generating = side_a.generate or side_b.generate
    settings = {"a": side_a.name, "b": side_b.name, "a_answers": "sampled" if side_a.generate else "file",
                "b_answers": "sampled" if side_b.generate else "file", "judge": judge_name(options, kind),
                "judge_kind": kind, "prompts": options.prompts,
                "samples": options.samples if generating else max(len(r["comparisons"]) for r in records),
                "temperature": options.temperature if generating else None, "seed": options.seed,
                "max_new_tokens": options.max_new_tokens if generating else None}
    if kind == "pairwise":

        settings.update(judge_max_tokens=options.judge_max_tokens, judge_system=JUDGE_SYSTEM,
                        judge_prompt=JUDGE_PROMPT)
    summary = summarize(kind, records, settings, options.seed)
    if summary["judge"].get("truncated"):
        logger.warning("warning: %d conversations were longer than the reward model's context: their last tokens "
                       "were scored (records.jsonl: truncated_a, truncated_b)", summary["judge"]["truncated"])
    return summary, write_outputs(options.output, kind, records, summary)
