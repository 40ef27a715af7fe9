"""prepare.py: formats + render drops are added up, strict turns any drop into an error."""
import pytest

from orpo.errors import OrpoError
from orpo.prepare import tokenize_rows
from tiny import chatml_tokenizer

ROWS = [
    {"prompt": "why is the sky blue", "chosen": "the sky is blue", "rejected": "no"},  # kept
    {"prompt": "what", "chosen": "ok", "rejected": "ok"},  # chosen == rejected (formats)
    {"prompt": "a b c a b c a b c a b c", "chosen": "yes", "rejected": "no"},  # too long (render)
    {"prompt": "what", "chosen": 7, "rejected": "no"},  # wrong types (formats)
    {"prompt": "a", "chosen": "good", "rejected": "bad"},  # kept
]


def test_drops_are_counted_by_reason_with_their_first_row():
    prepared = tokenize_rows(ROWS, chatml_tokenizer(), max_length=14, max_prompt_length=None,
                             max_completion_length=None, source="prefs.jsonl")
    assert [p.index for p in prepared.pairs] == [0, 4]
    assert dict(prepared.drops) == {"chosen == rejected": 1, "too long": 1, "wrong types": 1}
    assert prepared.first_rows == {"chosen == rejected": 1, "too long": 2, "wrong types": 3}
    assert prepared.report().startswith("kept 2 of 5 pairs; dropped 3")


def test_strict_names_the_first_dropped_row():
    with pytest.raises(OrpoError, match=r"^prefs\.jsonl, row 1: pair dropped \(chosen == rejected\) and --strict"):
        tokenize_rows(ROWS, chatml_tokenizer(), 14, None, None, strict=True, source="prefs.jsonl")


def test_zero_usable_pairs_is_an_error():
    with pytest.raises(OrpoError, match=r"^prefs\.jsonl: zero usable pairs; kept 0 of 2 pairs"):
        tokenize_rows(ROWS[1:3], chatml_tokenizer(), 14, None, None, source="prefs.jsonl")
