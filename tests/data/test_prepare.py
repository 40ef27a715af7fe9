"""prepare.py: formats + render drops are added up, strict turns any drop into an error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orpo.errors import OrpoError
from orpo.data.prepare import tokenize_rows
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


def test_a_50_mb_line_is_cheap(tmp_path):
    """One 50 MB answer among normal rows: read, rendered and truncated in bounded memory and time
    (its text is cut before tokenization), in a fresh process so the peak RSS is its own."""
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(ROWS[0]) + "\n")
        f.write(json.dumps({"prompt": "why", "chosen": "the sky " * 6_250_000, "rejected": "no"}) + "\n")
    script = (
        "import json, sys, time; sys.path.insert(0, sys.argv[2]); from orpo.data.load import load_rows; "
        "from orpo.data.prepare import tokenize_rows; from tiny import chatml_tokenizer; t = time.time(); "
        "p = tokenize_rows(load_rows(sys.argv[1]), chatml_tokenizer(), 64, 32, None); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print(json.dumps({'lengths': [len(x.chosen_ids) for x in p.pairs], 'seconds': time.time() - t, "
        "'peak_gb': int(hwm) / 2**20}))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path), str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert os.path.getsize(path) > 50_000_000
    short = tokenize_rows([{"prompt": "why", "chosen": "the sky", "rejected": "no"}], chatml_tokenizer(), 64, 32, None)
    assert result["lengths"][1] == 64 - len(short.pairs[0].prompt_ids)  # cut to fit max_length
    print(result)
    assert result["peak_gb"] < 1.5, result
