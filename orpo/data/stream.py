"""Streaming: pairs read, shaped and tokenized while training consumes them, for data that does not fit.

`PairStream` is the training data of `--streaming`: a torch `IterableDataset` (what transformers' Trainer
and accelerate take for data without a length). It reads the source's rows one at a time (`load.stream_rows`:
a file or a hub dataset; or a `datasets.IterableDataset` given in Python), shuffles them in a buffer of
`shuffle_buffer` rows (datasets' seeded buffer shuffle), turns each row into its pair with
`prepare.prepare_row` (the shapes, rendering, truncation and drop reasons of a prepared set) and yields the
kept `TokenizedPair`s. Nothing is written to disk and memory is bounded by the buffer.

For training the stream is endless (`passes=None`): when the source ends it starts again, each pass
shuffled anew (datasets' `set_epoch`), so the Trainer (which needs `max_steps` for it) sees one epoch, and
a resume that skips the batches a checkpoint trained lands where the run was, whichever pass that is. A
pass that keeps no pair is an error, not an endless loop.

Drops are counted as rows are read: `rows`, `kept`, `drops` (drops.DropCounts: by reason with each one's
first row and detail, and the lines skipped as unreadable), `shapes` are running totals since the stream was
made (every pass, and a resume's re-read rows, included), `report()` the line the trainer logs, the report of
a prepared set with "read N rows (pass P): " before it. Row numbers are positions in the source (0-based), as
in a prepared set.

The columns are resolved from the first `COLUMN_PEEK_ROWS` rows (a prepared set resolves them from all
rows): a column that first appears after them is not read, nor named among the columns not read.
"""
from __future__ import annotations

from collections import Counter

import datasets
import torch

from orpo.data.drops import DropCounts
from orpo.data.formats import RowFormat, UnreadColumns, prompt_candidates, resolve_columns, unread_columns
from orpo.data.load import stream_rows
from orpo.data.prepare import image_root, prepare_row, text_only_model_error
from orpo.data.render import LengthLimits
from orpo.data.store import is_prepared_dir
from orpo.errors import TEXT_ONLY_MODEL, DroppedPair, OrpoError

COLUMN_PEEK_ROWS = 1000


class PairStream(torch.utils.data.IterableDataset):
    """The kept pairs of `source`, tokenized as they are read (module docstring).

    source:         a file path or hub dataset id (`split` of it), or a `datasets.IterableDataset` of rows.
    shuffle_buffer: rows held for shuffling (0 or 1: source order); seed: the shuffle's seed (reseeded each pass).
    passes:         how many passes over the source to yield (None: endless, what training reads).
    The other arguments are `prepare_dataset`'s. Raises `OrpoError` (one line) for a source it cannot read
    or whose first rows lack the columns `row_format` needs.
    """

    def __init__(self, source, tokenizer, row_format: RowFormat = RowFormat(), limits: LengthLimits = LengthLimits(),
                 skip_bad_rows: bool = False, split: str = "train", name: str | None = None,
                 shuffle_buffer: int = 10_000, seed: int = 0, passes: int | None = None):
        if not isinstance(source, (str, datasets.IterableDataset)):
            raise OrpoError(f"streaming reads a file, a hub dataset id or a datasets.IterableDataset, got "
                            f"{type(source).__name__}: data already in memory is prepared as usual (streaming off)")
        if isinstance(source, str) and is_prepared_dir(source):
            raise OrpoError(f"{source}: a prepared set (orpo data prepare), read memory-mapped; train from it "
                            "without --streaming")
        self.source, self.split, self.skip_bad_rows = source, split, skip_bad_rows
        self.name = name or (source if isinstance(source, str) else "stream")
        self.tokenizer, self.row_format = tokenizer, row_format
        self.limits = limits
        self.image_root = image_root(source)
        self.shuffle_buffer, self.seed, self.passes = shuffle_buffer, seed, passes
        self.rows, self.kept, self.pass_number = 0, 0, 0
        self.drops, self.shapes = DropCounts(), Counter()
        self.prompt_candidates: set[str] = set()  # formats.prompt_candidates of the rows read
        names: dict[str, None] = {}
        peeked = DropCounts()  # lines skipped before the first pass: each pass counts its own
        for _, row in zip(range(COLUMN_PEEK_ROWS), _numbered(source, split, skip_bad_rows, peeked)):
            names.update(dict.fromkeys(row["row"]))
        if not names:
            raise OrpoError(f"{self.name}: no rows")
        self.names = list(names)
        self.columns = resolve_columns(self.names, row_format, self.name)

    def __iter__(self):
        pass_number = 0
        while self.passes is None or pass_number < self.passes:
            self.pass_number, kept_before = pass_number + 1, self.kept
            yield from self._one_pass(pass_number)
            if self.kept == kept_before:
                raise OrpoError(f"{self.name}: zero usable pairs in a pass over it; {self.report()}")
            pass_number += 1

    def _one_pass(self, pass_number: int):
        rows = datasets.IterableDataset.from_generator(_numbered, gen_kwargs={
            "source": self.source, "split": self.split, "skip_bad_rows": self.skip_bad_rows, "drops": self.drops})
        if self.shuffle_buffer > 1:
            rows = rows.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            rows.set_epoch(pass_number)  # datasets reseeds the buffer for each epoch
        for item in rows:
            shape, pair = prepare_row(item["row"], item["index"], self.columns, self.row_format, self.tokenizer,
                                      self.limits, self.image_root)
            if isinstance(pair, DroppedPair) and pair.reason == TEXT_ONLY_MODEL:
                raise text_only_model_error(self.name, item["index"], "the pair has images")
            self.rows += 1
            if shape is not None:
                self.shapes[shape] += 1
                self.prompt_candidates.update(prompt_candidates(item["row"], shape, self.columns))
            if isinstance(pair, DroppedPair):
                self.drops.count(pair.reason, item["index"], pair.detail)
                continue
            self.kept += 1
            yield pair

    @property
    def unread_columns(self) -> UnreadColumns:
        """The columns resolved from the first rows that no shape of the rows read so far read."""
        return unread_columns(self.names, self.columns, self.shapes, self.prompt_candidates)

    def report(self) -> str:
        """E.g. "read 1000 rows (pass 1): kept 995 of 1000 pairs; dropped 5: ..." (drops.DropCounts.report)."""
        return (f"read {self.rows} rows (pass {max(self.pass_number, 1)}): "
                + self.drops.report(self.rows, self.kept, self.unread_columns.text()))


def _numbered(source, split: str, skip_bad_rows: bool, drops: DropCounts):
    """{"index": row number, "row": row} of `source` (a path or hub id, or a datasets.IterableDataset); lines
    skipped as unreadable are counted into `drops`."""
    rows = stream_rows(source, split, skip_bad_rows, drops) if isinstance(source, str) else enumerate(source)
    for index, row in rows:
        yield {"index": index, "row": row}
