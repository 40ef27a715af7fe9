"""The one data path: a source (file, hub id, `datasets.Dataset` or rows) → TokenizedPairs ready to train.

`prepare_dataset` is what `orpo train`, `ORPOTrainer`, `orpo eval`, `orpo data inspect`, the demo
and the benchmarks call. It loads rows (load.py), reads each row's shape (formats.py), renders and
truncates it (render.py), and counts every dropped pair once, by reason, here.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import datasets

from orpo.data.formats import RowFormat, rows_to_pairs
from orpo.data.load import load_rows
from orpo.data.render import TokenizedPair, render_pair
from orpo.errors import DroppedPair, OrpoError


@dataclass
class PreparedData:
    """The pairs kept from `rows` source rows, and what happened to the others.

    drops:         reason → dropped pairs; first_rows / first_details: reason → the first such row
                   (0-based) and what was wrong with it.
    shapes:        detected row shape → rows read in that shape.
    """

    pairs: list[TokenizedPair]
    rows: int
    drops: Counter = field(default_factory=Counter)
    first_rows: dict[str, int] = field(default_factory=dict)
    first_details: dict[str, str] = field(default_factory=dict)
    shapes: Counter = field(default_factory=Counter)

    def report(self) -> str:
        return format_drop_report(self.rows, len(self.pairs), self.drops, self.first_rows, self.first_details)


def format_drop_report(n_rows: int, n_kept: int, drops: Counter, first_rows: dict[str, int],
                       first_details: dict[str, str] | None = None) -> str:
    """E.g. "kept 995 of 1000 pairs; dropped 5: chosen == rejected 5 (first at row 17)".

    Several reasons get one indented line each, most frequent first; a reason's first detail, where
    known, follows its row ("first at row 3: Conversation roles must alternate").
    """
    first_details = first_details or {}
    head = f"kept {n_kept} of {n_rows} pairs"
    if not drops:
        return head

    def where(reason):
        if reason not in first_rows:
            return ""
        detail = first_details.get(reason, "")
        return f" (first at row {first_rows[reason]}{': ' + detail if detail else ''})"

    parts = [f"{reason} {count}{where(reason)}" for reason, count in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0]))]
    head += f"; dropped {sum(drops.values())}:"
    return f"{head} {parts[0]}" if len(parts) == 1 else "\n  ".join([head, *parts])


def prepare_dataset(
    source,
    tokenizer,
    row_format: RowFormat = RowFormat(),
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    max_completion_length: int | None = None,
    strict: bool = False,
    skip_bad_rows: bool = False,
    split: str = "train",
    name: str | None = None,
) -> PreparedData:
    """Read, shape, render and truncate every row of `source`.

    source: a file path or hub dataset id (read by `load_rows`, `split` of a hub dataset), a
            `datasets.Dataset`, a list of row dicts, or a list of `TokenizedPair`s (kept as they are).
    name:   how messages name the data (default: the path, or "dataset").
    Raises `OrpoError` (one line) when nothing usable is left, or on any drop when `strict`.
    """
    if isinstance(source, PreparedData):
        return source
    if isinstance(source, list) and source and all(isinstance(p, TokenizedPair) for p in source):
        return PreparedData(list(source), len(source))
    name = name or (source if isinstance(source, str) else "dataset")
    rows = load_rows(source, split, skip_bad_rows) if isinstance(source, str) else source
    if not isinstance(rows, (list, datasets.Dataset)):
        raise OrpoError(f"{name}: expected a file path, a hub dataset id, a datasets.Dataset or a list of rows, "
                        f"got {type(rows).__name__}")
    read = rows_to_pairs(rows, row_format, source=name)
    tokenized = []
    for pair in read.pairs:
        try:
            tokenized.append(render_pair(pair, tokenizer, max_length, max_prompt_length, max_completion_length))
        except DroppedPair as drop:
            read.count_drop(drop, pair.index)  # rendering drops join the same counts
    prepared = PreparedData(tokenized, len(rows), read.drops, read.first_rows, read.first_details, read.shapes)
    if strict and prepared.drops:
        reason, row = min(prepared.first_rows.items(), key=lambda item: item[1])
        raise OrpoError(f"{name}, row {row}: pair dropped ({reason}) and --strict is set; {prepared.report()}")
    if not prepared.pairs:
        raise OrpoError(f"{name}: zero usable pairs; {prepared.report()}")
    return prepared
