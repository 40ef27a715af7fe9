"""prepare.py: the one data path. Formats + render drops are added up once, with the first row and
its problem; strict turns any drop into an error; every kind of source gives the same pairs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orpo.errors import OrpoError
from orpo.data.prepare import PreparedData, format_drop_report, prepare_dataset
from tiny import chatml_tokenizer

ROWS = [
    {"prompt": "why is the sky blue", "chosen": "the sky is blue", "rejected": "no"},  # kept
    {"prompt": "what", "chosen": "ok", "rejected": "ok"},  # chosen == rejected (formats)
    {"prompt": "a b c a b c a b c a b c", "chosen": "yes", "rejected": "no"},  # too long (render)
    {"prompt": "what", "chosen": 7, "rejected": "no"},  # wrong types (formats)
    {"prompt": "a", "chosen": "good", "rejected": "bad"},  # kept
]


def test_drops_are_counted_by_reason_with_their_first_row():
    prepared = prepare_dataset(ROWS, chatml_tokenizer(), max_length=14, max_prompt_length=None,
                               max_completion_length=None, name="prefs.jsonl")
    assert [p.index for p in prepared.pairs] == [0, 4]
    assert dict(prepared.drops) == {"chosen == rejected": 1, "too long": 1, "wrong types": 1}
    assert prepared.first_rows == {"chosen == rejected": 1, "too long": 2, "wrong types": 3}
    assert prepared.report().startswith("kept 2 of 5 pairs; dropped 3")


def test_strict_names_the_first_dropped_row():
    with pytest.raises(OrpoError, match=r"^prefs\.jsonl, row 1: pair dropped \(chosen == rejected\) and --strict"):
        prepare_dataset(ROWS, chatml_tokenizer(), max_length=14, max_prompt_length=None, strict=True, name="prefs.jsonl")


def test_zero_usable_pairs_is_an_error():
    with pytest.raises(OrpoError, match=r"^prefs\.jsonl: zero usable pairs; kept 0 of 2 pairs"):
        prepare_dataset(ROWS[1:3], chatml_tokenizer(), max_length=14, max_prompt_length=None, name="prefs.jsonl")


def test_a_50_mb_line_is_cheap(tmp_path):
    """One 50 MB answer among normal rows: read, rendered and truncated in bounded memory and time
    (its text is cut before tokenization), in a fresh process so the peak RSS is its own."""
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(ROWS[0]) + "\n")
        f.write(json.dumps({"prompt": "why", "chosen": "the sky " * 6_250_000, "rejected": "no"}) + "\n")
    script = (
        "import json, sys, time; sys.path.insert(0, sys.argv[2]); "
        "from orpo.data.prepare import PreparedData, format_drop_report, prepare_dataset; from tiny import chatml_tokenizer; t = time.time(); "
        "p = prepare_dataset(sys.argv[1], chatml_tokenizer(), max_length=64, max_prompt_length=32); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print(json.dumps({'lengths': [len(x.chosen_ids) for x in p.pairs], 'seconds': time.time() - t, "
        "'peak_gb': int(hwm) / 2**20}))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path), str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert os.path.getsize(path) > 50_000_000
    short = prepare_dataset([{"prompt": "why", "chosen": "the sky", "rejected": "no"}], chatml_tokenizer(),
                            max_length=64, max_prompt_length=32)
    assert result["lengths"][1] == 64 - len(short.pairs[0].prompt_ids)  # cut to fit max_length
    print(result)
    assert result["peak_gb"] < 1.5, result


def test_every_kind_of_source_gives_the_same_pairs(tmp_path):
    """A file path, a datasets.Dataset, a list of rows: one path, identical TokenizedPairs."""
    import datasets

    rows = [ROWS[0], ROWS[4]]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = chatml_tokenizer()
    from_list = prepare_dataset(rows, tok, max_length=14, max_prompt_length=None)
    from_file = prepare_dataset(str(path), tok, max_length=14, max_prompt_length=None)
    from_dataset = prepare_dataset(datasets.Dataset.from_list(rows), tok, max_length=14, max_prompt_length=None)
    assert from_list.pairs == from_file.pairs == from_dataset.pairs and len(from_list.pairs) == 2
    assert prepare_dataset(from_list, tok) is from_list  # prepared data passes through
    assert prepare_dataset(from_list.pairs, tok).pairs == from_list.pairs


def test_prepared_data_counts_shapes():
    prepared = prepare_dataset(ROWS, chatml_tokenizer(), max_length=14, max_prompt_length=None)
    assert sum(prepared.shapes.values()) >= 4  # every row whose shape was recognised (row 3 has a number)
    assert isinstance(prepared, PreparedData)


def test_a_source_of_another_type_is_one_line():
    with pytest.raises(OrpoError, match=r"^dataset: expected a file path, a hub dataset id, a datasets.Dataset"):
        prepare_dataset(42, chatml_tokenizer())


def test_drop_report_worked_by_hand():
    """5 dropped of 1000: one reason → one line; several → one indented line each, most frequent first,
    with the first row and, where known, its problem."""
    from collections import Counter

    assert format_drop_report(1000, 995, Counter({"chosen == rejected": 5}), {"chosen == rejected": 17}) == (
        "kept 995 of 1000 pairs; dropped 5: chosen == rejected 5 (first at row 17)")
    assert format_drop_report(3, 3, Counter(), {}) == "kept 3 of 3 pairs"
    assert format_drop_report(10, 6, Counter({"too long": 1, "chat template error": 3}),
                              {"too long": 4, "chat template error": 2},
                              {"chat template error": "roles must alternate"}) == (
        "kept 6 of 10 pairs; dropped 4:\n"
        "  chat template error 3 (first at row 2: roles must alternate)\n"
        "  too long 1 (first at row 4)")
