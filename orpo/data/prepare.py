"""Dataset rows → TokenizedPairs ready to train on, with every dropped pair counted by reason.

formats (rows → message pairs) and render (messages → ids, truncation) each drop what they
cannot use; this module runs both, adds up the drops and applies `strict`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from orpo.data.load import dataset_to_pairs, format_drop_report
from orpo.errors import DroppedPair, OrpoError
from orpo.data.render import TokenizedPair, render_pair


@dataclass
class PreparedData:
    pairs: list[TokenizedPair]
    rows: int
    drops: Counter = field(default_factory=Counter)
    first_rows: dict[str, int] = field(default_factory=dict)

    def report(self) -> str:
        return format_drop_report(self.rows, len(self.pairs), self.drops, self.first_rows)


def tokenize_rows(
    rows,
    tokenizer,
    max_length: int | None,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    prompt_column: str | None = None,
    chosen_column: str | None = None,
    rejected_column: str | None = None,
    strict: bool = False,
    source: str = "dataset",
) -> PreparedData:
    """Normalise, render and truncate every row; raise OrpoError if nothing usable is left, or on
    any drop when `strict`."""
    pairs, drops, first_rows = dataset_to_pairs(rows, prompt_column, chosen_column, rejected_column, source=source)
    tokenized = []
    for pair in pairs:
        try:
            tokenized.append(render_pair(pair, tokenizer, max_length, max_prompt_length, max_completion_length))
        except DroppedPair as drop:
            drops[drop.reason] += 1
            first_rows.setdefault(drop.reason, pair.index)
    prepared = PreparedData(tokenized, len(rows), drops, first_rows)
    if strict and drops:
        reason, row = min(first_rows.items(), key=lambda item: item[1])
        raise OrpoError(f"{source}, row {row}: pair dropped ({reason}) and --strict is set; {prepared.report()}")
    if not tokenized:
        raise OrpoError(f"{source}: zero usable pairs; {prepared.report()}")
    return prepared
