"""Tests for orpo.data.load: loading every file type, one-line errors, the real data files read into pairs
(rows_to_pairs), the drop report."""
import gzip
import json
import re
from collections import Counter

import datasets
import pandas as pd
import pytest

import orpo.data.load as data
from orpo.data.drops import DropCounts
from orpo.data.load import EncodedRows, is_hub_dataset_id, load_rows, stream_rows
from orpo.errors import EMPTY_RESPONSE, SAME_RESPONSES, UNKNOWN_ROLE, WRONG_TYPES, OrpoError
from orpo.data.formats import SHAPE_HH, SHAPE_STRINGS, rows_to_pairs

ROWS = [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
ULTRAFEEDBACK = "/work/shared/data/ultrafeedback_1k_train.jsonl"
HH_RLHF = "/work/shared/data/hh_rlhf_harmless_test.jsonl.gz"


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- load_rows: file types -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.parquet", "rows.csv", "rows.jsonl.gz",
                                  "rows.csv.gz", "rows.parquet.gz"])
def test_load_rows_file_types(tmp_path, name):
    path = tmp_path / name
    if ".jsonl" in name:
        text = "".join(json.dumps(r) + "\n" for r in ROWS)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    elif name == "rows.json":  # a JSON list, not JSON lines
        path.write_text(json.dumps(ROWS))
    elif ".parquet" in name:
        pd.DataFrame(ROWS).to_parquet(tmp_path / "plain.parquet")
        raw = (tmp_path / "plain.parquet").read_bytes()
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    else:
        text = pd.DataFrame(ROWS).to_csv(index=False)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    rows = load_rows(str(path), work_dir=tmp_path)
    # JSON is read by orpo into EncodedRows (on disk, each row as it was); the others by datasets
    assert isinstance(rows, EncodedRows if ".json" in name else datasets.Dataset)
    assert list(rows) == ROWS and len(rows) == len(ROWS)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "rows.json", "rows.json.gz", "rows.csv", "rows.csv.gz"])
def test_a_utf8_byte_order_mark_is_read_past(tmp_path, name):
    """Files that Windows tools write start with a UTF-8 byte-order mark (Python's "utf-8-sig"): load_rows and
    stream_rows read their rows, the first column's name and the first line's JSON without it."""
    if ".jsonl" in name:
        text = "".join(json.dumps(r) + "\n" for r in ROWS)
    elif ".json" in name:
        text = json.dumps(ROWS, indent=1)  # a JSON list
    else:
        text = pd.DataFrame(ROWS).to_csv(index=False)
    raw = text.encode("utf-8-sig")
    assert raw.startswith(b"\xef\xbb\xbf")
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    assert list(load_rows(str(path), work_dir=tmp_path)) == ROWS
    assert list(stream_rows(str(path))) == list(enumerate(ROWS))


def test_a_file_of_a_byte_order_mark_alone_has_no_rows(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(OrpoError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: no rows"


def test_load_rows_mixed_types_across_rows(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        json.dumps({"prompt": "Hi?", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": [{"role": "user", "content": "Yo"}], "chosen": "c", "rejected": "d"})])
    got = rows_to_pairs(load_rows(str(path)))
    assert [p.prompt for p in got.pairs] == [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "Yo"}]]
    assert not got.drops


def test_jsonl_is_read_without_the_datasets_json_builder(tmp_path, monkeypatch):
    """JSON lines are read line by line by orpo (line numbers, UTF-8 checks, skippable lines)."""
    path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps(r) for r in ROWS])

    def failing(*args, **kwargs):
        raise AssertionError("datasets.load_dataset must not be used for JSON files")

    monkeypatch.setattr(data.datasets, "load_dataset", failing)
    assert list(load_rows(str(path))) == ROWS
    # a field whose type changes from row to row: plain dicts, checked row by row later
    bad = write_jsonl(tmp_path / "bad_types.jsonl", ['{"a": 1}', '{"a": "x"}'])
    assert list(load_rows(str(bad))) == [{"a": 1}, {"a": "x"}]


def test_json_rows_are_written_to_disk_a_block_at_a_time(tmp_path, monkeypatch):
    """The JSON reader hands rows on as it reads them: a block of rows is in memory, never the file."""
    monkeypatch.setattr(data, "_ENCODE_BLOCK", 2)
    path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps({"i": i, "x": "a" * i}) for i in range(5)])
    seen = []
    real = data._parse_line

    def parse(raw):  # rows parsed so far when each block is written
        seen.append(raw)
        return real(raw)

    writes = []
    real_batch = data.pa.record_batch
    monkeypatch.setattr(data, "_parse_line", parse)
    monkeypatch.setattr(data.pa, "record_batch", lambda *a, **k: writes.append(len(seen)) or real_batch(*a, **k))
    rows = load_rows(str(path), work_dir=tmp_path)
    assert writes == [2, 4, 5]  # written after rows 2, 4 and at the end: never all held first
    assert (tmp_path / "rows.arrow").is_file() and rows.column_names == ["i", "x"]
    assert list(rows) == [{"i": i, "x": "a" * i} for i in range(5)]


# --- load_rows: errors ---------------------------------------------------------------------------

def test_malformed_line_reported_with_its_number(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), "", '{"prompt": "x", "chosen": }'])
    with pytest.raises(OrpoError) as info:
        load_rows(str(path))
    assert str(info.value) == (f"{path}, line 3: invalid JSON (Expecting value at column 27); "
                               "expected one JSON object per line (--skip_bad_rows skips bad lines)")


def test_malformed_line_in_gzipped_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n{"a" 3}\n'))
    with pytest.raises(OrpoError) as info:
        load_rows(str(path))
    assert str(info.value) == (f"{path}, line 3: invalid JSON (Expecting ':' delimiter at column 6); "
                               "expected one JSON object per line (--skip_bad_rows skips bad lines)")


def test_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [json.dumps(ROWS[0]), "[1, 2]"])
    with pytest.raises(OrpoError) as info:
        load_rows(str(path))
    assert str(info.value) == (f"{path}, line 2: a JSON array where an object was expected; "
                               "expected one JSON object per line (--skip_bad_rows skips bad lines)")


def test_missing_file_unknown_extension_empty_file(tmp_path):
    with pytest.raises(OrpoError) as info:
        load_rows(str(tmp_path / "nope.jsonl"))
    assert str(info.value) == f"{tmp_path / 'nope.jsonl'}: no such file"

    txt = tmp_path / "rows.txt"
    txt.write_text("hello")
    with pytest.raises(OrpoError) as info:
        load_rows(str(txt))
    assert str(info.value) == f"{txt}: unknown file type '.txt'; expected .jsonl, .json, .parquet or .csv (optionally .gz)"

    for name, content in [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("empty.json", b"[]"),
                          ("empty.jsonl.gz", gzip.compress(b"")), ("header_only.csv", b"prompt,chosen,rejected\n")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(OrpoError) as info:
            load_rows(str(path))
        assert str(info.value) == f"{path}: no rows"


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(OrpoError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(f"{path}: could not read it as parquet (")
    assert "\n" not in str(info.value)


def test_hub_dataset_ids_are_what_load_rows_takes_from_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "prefs").write_text("")
    assert is_hub_dataset_id("trl-lib/ultrafeedback_binarized") and is_hub_dataset_id("imdb")
    for local in ("someone/prefs", "prefs.jsonl", "x/y.parquet", "./data", "/abs/data", "a/b/c"):
        assert not is_hub_dataset_id(local), local


def test_hub_failure_is_one_line(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'someone/prefs' on the Hub (OfflineModeIsEnabled)\nmore details")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(OrpoError) as info:
        load_rows("someone/prefs", split="test")
    assert str(info.value) == ("someone/prefs: not a local file, and loading it from the Hugging Face hub failed: "
                               "Couldn't reach 'someone/prefs' on the Hub (OfflineModeIsEnabled)")
    assert calls == [(("someone/prefs",), {"split": "test"})]


# --- the drop report ---------------------------------------------------------------------------

def test_drop_report_of_rows_to_pairs():
    rows = [ROWS[0], {"prompt": "p", "chosen": "same", "rejected": "same"}, ROWS[1],
            {"prompt": "p", "chosen": "", "rejected": "r"}, {"prompt": "p", "chosen": "x", "rejected": "x"},
            {"prompt": "p", "chosen": 3, "rejected": "r"}]
    got = rows_to_pairs(rows)
    assert got.drops.report(len(rows), len(got.pairs)) == (
        "kept 2 of 6 pairs; dropped 4:\n"
        "  chosen == rejected 2 (first at row 1)\n"
        "  empty response 1 (first at row 3: chosen is empty)\n"
        "  wrong types 1 (first at row 5: chosen is int, expected a string or a list of messages)")


def test_real_ultrafeedback():
    rows = load_rows(ULTRAFEEDBACK)
    assert len(rows) == 1000
    got = rows_to_pairs(rows, source=ULTRAFEEDBACK)
    assert dict(got.drops) == {SAME_RESPONSES: 4, EMPTY_RESPONSE: 2}
    assert got.drops.first_rows == {SAME_RESPONSES: 306, EMPTY_RESPONSE: 478}
    assert got.drops.first_details == {SAME_RESPONSES: "", EMPTY_RESPONSE: "rejected is empty"}
    assert got.shapes == Counter({SHAPE_STRINGS: 1000})
    assert len(got.pairs) == 994
    assert got.drops.report(len(rows), len(got.pairs)) == (
        "kept 994 of 1000 pairs; dropped 6:\n  chosen == rejected 4 (first at row 306)\n"
        "  empty response 2 (first at row 478: rejected is empty)")


def test_real_hh_rlhf():
    rows = load_rows(HH_RLHF)
    assert len(rows) == 2312
    got = rows_to_pairs(rows, source=HH_RLHF)
    assert dict(got.drops) == {EMPTY_RESPONSE: 4} and got.drops.first_rows == {EMPTY_RESPONSE: 86}
    assert got.shapes == Counter({SHAPE_HH: 2312})
    pairs = got.pairs
    assert len(pairs) == 2308
    for p in pairs:
        assert p.prompt and p.prompt[-1]["role"] == "user" and p.prompt[-1]["content"].strip()
        assert all(m["role"] == "assistant" and m["content"].strip() for m in p.chosen + p.rejected)
    assert pairs[0].prompt[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert pairs[0].chosen == [{"role": "assistant", "content": "No, sorry!  All of these involve a pen, the point "
                                "is that you can get funny results by doing pranks with pens."}]


# --- a hostile input corpus: every file gets one clear line or a counted skip ---------------------

GOOD = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]


def _lines(*middle: bytes) -> bytes:
    """Two good rows, the hostile bytes, two more good rows: the bad line is line 3."""
    good = [json.dumps(r).encode() + b"\n" for r in GOOD]
    return b"".join(good[:2] + [m + b"\n" for m in middle] + good[2:])


def _row(**fields) -> bytes:
    return json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", **fields}).encode()


# name → (file bytes, the error when the file is fatal, or (pairs kept, the drop reason) when usable)
CORPUS = {
    "truncated.jsonl.gz": (gzip.compress(_lines() * 40)[:150], r"could not read it \(Compressed file ended before"),
    "invalid_utf8.jsonl": (_lines(b'{"prompt": "x\xff", "chosen": "a", "rejected": "b"}'),
                           r", line 3: not UTF-8 text \(byte 0xff at column 14\)"),
    "deeply_nested.jsonl": (_lines(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                            r", line 3: JSON nested too deeply"),
    "one_bad_line.jsonl": (_lines(b'{"prompt": "x", "chosen": '), r", line 3: invalid JSON \(Expecting value"),
    "empty.jsonl": (b"", r": no rows$"),
    "nested_list.json": (b"[" * 100_000 + b"]" * 100_000, r": JSON nested too deeply$"),
    "null_fields.jsonl": (_lines(_row(prompt=None), _row(chosen=None)), (4, WRONG_TYPES)),
    "numbers_for_text.jsonl": (_lines(_row(prompt=5, chosen=1.5)), (4, WRONG_TYPES)),
    "unknown_role.jsonl": (_lines(_row(prompt=[{"role": "wizard", "content": "hi"}])), (4, UNKNOWN_ROLE)),
    "prompt_only_row.jsonl": (_lines(b'{"prompt": "only a prompt"}'), (4, WRONG_TYPES)),
}


@pytest.mark.parametrize("name", CORPUS)
def test_hostile_input(tmp_path, name):
    content, expected = CORPUS[name]
    path = tmp_path / name
    path.write_bytes(content)
    if isinstance(expected, str):
        with pytest.raises(OrpoError) as info:
            rows_to_pairs(load_rows(str(path)))
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
        assert re.search(expected, str(info.value)), str(info.value)
    else:
        kept, reason = expected
        got = rows_to_pairs(load_rows(str(path)))
        assert len(got.pairs) == kept and set(got.drops) == {reason} and got.drops.first_rows[reason] == 2


@pytest.mark.parametrize("name", ["invalid_utf8.jsonl", "deeply_nested.jsonl", "one_bad_line.jsonl"])
def test_skip_bad_rows_skips_and_counts_the_bad_line(tmp_path, name, caplog):
    path = tmp_path / name
    path.write_bytes(CORPUS[name][0])
    with caplog.at_level("WARNING", logger="orpo.data.load"):
        rows = load_rows(str(path), skip_bad_rows=True)
    assert list(rows) == GOOD
    assert f"{path}: skipped 1 bad line (first: line 3: " in caplog.text


def test_skipped_lines_are_counted_into_drop_counts_instead_of_a_warning(tmp_path, caplog):
    """What prepare_dataset and PairStream do: the skipped lines go into the data report (and a prepared set)."""
    path = tmp_path / "one_bad_line.jsonl"
    path.write_bytes(CORPUS["one_bad_line.jsonl"][0] + b"[1, 2]\n")
    expected = DropCounts(skipped_lines=2, first_skipped_line=3,
                          first_skipped_problem="invalid JSON (Expecting value at column 1)")
    read, streamed = DropCounts(), DropCounts()
    with caplog.at_level("WARNING", logger="orpo.data.load"):
        assert list(load_rows(str(path), skip_bad_rows=True, work_dir=tmp_path, drops=read)) == GOOD
        assert [row for _, row in stream_rows(str(path), skip_bad_rows=True, drops=streamed)] == GOOD
    assert read == streamed == expected and caplog.text == ""


def test_prompt_only_file_is_one_line():
    """Rows that never have answers: the missing column is named (tested in detail in test_formats)."""
    with pytest.raises(OrpoError, match=r"missing column 'chosen'; columns found: \['prompt'\]"):
        rows_to_pairs([{"prompt": "p"}, {"prompt": "q"}], source="prompts.jsonl")
