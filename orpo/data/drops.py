"""What a source lost on its way to pairs, counted once each, and the line that reports it.

`DropCounts` is the one record of it, used alike by a prepared set (`prepare.PreparedData`, its prepared.json),
a stream's running totals (`stream.PairStream`) and the model card: the pairs dropped by reason, each reason's
first row and what was wrong with it, and the lines of a JSON-lines file skipped as unreadable
(`--skip_bad_rows`, counted by load.py as it reads them) with the first one. Its `report` is the data report
that `orpo train` logs as "train data: ...", `orpo eval` logs and `orpo data inspect` / `orpo data prepare` print.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class DropCounts(Mapping):
    """Dropped pairs by reason (read as a mapping reason → count, in the order reasons were first met) and
    skipped unreadable lines.

    counts:                reason → the pairs dropped for it (what the mapping reads);
    first_rows:            reason → the first row (0-based) dropped for it (first met, for a shuffled stream);
    first_details:         reason → what was wrong with that row ("" where nothing more is known).
    skipped_lines:         lines skipped as unreadable (`--skip_bad_rows`): not rows, so not in the row count;
    first_skipped_line:    the first one's line number (1-based), and
    first_skipped_problem: what was wrong with it ("invalid JSON (...)").
    Counting adds to it (`count`, `skip_line`): a stream's totals grow as it is read.
    """

    counts: dict[str, int] = field(default_factory=dict)
    first_rows: dict[str, int] = field(default_factory=dict)
    first_details: dict[str, str] = field(default_factory=dict)
    skipped_lines: int = 0
    first_skipped_line: int | None = None
    first_skipped_problem: str = ""

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def __iter__(self):
        return iter(self.counts)

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        """Pairs dropped, all reasons together (skipped lines are not pairs: not in it)."""
        return sum(self.counts.values())

    def count(self, reason: str, row: int, detail: str = "") -> None:
        """Count one pair of row `row` dropped for `reason`; the first row of each reason keeps its detail."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if reason not in self.first_rows:
            self.first_rows[reason], self.first_details[reason] = row, detail

    def skip_line(self, line: int, problem: str) -> None:
        """Count line `line` (1-based) of the file as skipped for `problem`; the first one is kept."""
        self.skipped_lines += 1
        if self.first_skipped_line is None:
            self.first_skipped_line, self.first_skipped_problem = line, problem

    def skipped_text(self) -> str:
        """E.g. "skipped 2 bad lines (first: line 3: invalid JSON (Expecting value at column 1))"; "" for none."""
        if not self.skipped_lines:
            return ""
        return (f"skipped {self.skipped_lines} bad line{'s' * (self.skipped_lines > 1)} "
                f"(first: line {self.first_skipped_line}: {self.first_skipped_problem})")

    def report(self, rows: int, kept: int, columns: str = "") -> str:
        """The data report of `rows` source rows of which `kept` pairs were kept, with `columns` (what the
        columns not read say, formats.UnreadColumns.text; "" for none) in it. E.g.
        "kept 995 of 1000 pairs; dropped 5: chosen == rejected 5 (first at row 17)".

        After the kept pairs, in this order: the skipped lines, `columns`, the drops. Several drop reasons get
        one indented line each, most frequent first; a reason's first detail, where known, follows its row
        ("first at row 3: Conversation roles must alternate"). Only the reasons' lines break the line, each as
        "\\n  ", so a caller that wants one line can join them with "; "."""
        clauses = [f"kept {kept} of {rows} pairs", self.skipped_text(), columns]
        head = "; ".join(clause for clause in clauses if clause)
        if not self.counts:
            return head

        def where(reason):
            if reason not in self.first_rows:
                return ""
            detail = self.first_details.get(reason, "")
            return f" (first at row {self.first_rows[reason]}{': ' + detail if detail else ''})"

        by_count = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        parts = [f"{reason} {n}{where(reason)}" for reason, n in by_count]
        head += f"; dropped {self.total}:"
        return f"{head} {parts[0]}" if len(parts) == 1 else "\n  ".join([head, *parts])

    def to_meta(self) -> dict:
        """Its fields as a prepared set's prepared.json holds them (`from_meta` reads them back)."""
        return {"drops": dict(self.counts), "first_rows": dict(self.first_rows),
                "first_details": dict(self.first_details), "skipped_lines": self.skipped_lines,
                "first_skipped_line": self.first_skipped_line, "first_skipped_problem": self.first_skipped_problem}

    @classmethod
    def from_meta(cls, meta: dict) -> DropCounts:
        """The DropCounts of a prepared set's prepared.json (`to_meta`); a set prepared before skipped lines
        were recorded reads as none skipped."""
        return cls(dict(meta["drops"]), dict(meta["first_rows"]), dict(meta["first_details"]),
                   meta.get("skipped_lines", 0), meta.get("first_skipped_line"), meta.get("first_skipped_problem", ""))


def format_drop_report(n_rows: int, n_kept: int, drops: Mapping[str, int], first_rows: dict[str, int],
                       first_details: dict[str, str] | None = None) -> str:
    """`DropCounts.report` of the drops `drops` (reason → count) with their first rows and details, e.g.
    "kept 995 of 1000 pairs; dropped 5: chosen == rejected 5 (first at row 17)"."""
    return DropCounts(dict(drops), dict(first_rows), dict(first_details or {})).report(n_rows, n_kept)
