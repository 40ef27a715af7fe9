"""stream.py: streamed pairs are the pairs, drops and first rows of a prepared set, read one row at a time;
the shuffle buffer permutes them reproducibly; memory does not grow with the rows read; bad input is one line."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest

from orpo.data.formats import RowFormat
from orpo.data.prepare import prepare_dataset
from orpo.data.stream import PairStream
from orpo.errors import OrpoError
from orpo.data.render import LengthLimits
from test_prepare import FIXTURES, ROWS, SHARED, SOURCES
from tiny import byte_level_chatml_tokenizer, chatml_tokenizer


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("source", SOURCES)
def test_streamed_pairs_and_drops_equal_the_prepared_sets(source, tmp_path):
    fmt = RowFormat(**SOURCES[source])
    tok = byte_level_chatml_tokenizer()
    if source == "ROWS":
        data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    else:
        data = str(FIXTURES / source if (FIXTURES / source).exists() else SHARED / source)
    prepared = prepare_dataset(data, tok, fmt, LengthLimits(256, 128), use_cache=False, num_proc=1)
    stream = PairStream(data, tok, fmt, LengthLimits(256, 128), shuffle_buffer=0, passes=1)
    assert list(stream) == list(prepared.pairs)
    assert (stream.rows, stream.kept, stream.drops, dict(stream.shapes), stream.unread_columns) \
        == (prepared.rows, len(prepared.pairs), prepared.drops, dict(prepared.shapes), prepared.unread_columns)
    assert stream.report() == f"read {prepared.rows} rows (pass 1): {prepared.report()}"


def test_the_stream_counts_skipped_lines_in_every_pass_as_a_prepared_set_does(tmp_path):
    tok = chatml_tokenizer()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:2]) + "{not json\n")
    prepared = prepare_dataset(str(data), tok, skip_bad_rows=True, use_cache=False)
    one = PairStream(str(data), tok, skip_bad_rows=True, shuffle_buffer=0, passes=1)
    assert len(list(one)) == 1 and one.report() == f"read 2 rows (pass 1): {prepared.report()}"
    two = PairStream(str(data), tok, skip_bad_rows=True, shuffle_buffer=0, passes=2)  # running totals: each pass
    assert len(list(two)) == 2 and two.report() == (
        "read 4 rows (pass 2): kept 2 of 4 pairs; skipped 2 bad lines (first: line 3: invalid JSON (Expecting "
        "property name enclosed in double quotes at column 2)); dropped 2: chosen == rejected 2 (first at row 1)")


def test_the_stream_names_the_columns_not_read_as_a_prepared_set_does(tmp_path):
    from test_prepare import QUESTIONS

    tok = chatml_tokenizer()
    data = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    prepared = prepare_dataset(data, tok, use_cache=False)
    one = PairStream(data, tok, shuffle_buffer=0, passes=1)
    assert len(list(one)) == 2 and one.report() == f"read 3 rows (pass 1): {prepared.report()}"
    two = PairStream(data, tok, shuffle_buffer=0, passes=2)
    assert len(list(two)) == 4 and two.report() == (
        "read 6 rows (pass 2): kept 4 of 6 pairs; columns not read: id, question (6 rows have an implicit prompt: "
        "--prompt_column question reads it as the prompt); dropped 2: chosen == rejected 2 (first at row 2)")


def test_parquet_csv_and_a_datasets_stream_are_read_as_their_rows(tmp_path):
    rows = [r for r in ROWS if isinstance(r["chosen"], str)]  # one type per column: what parquet/csv hold
    tok = chatml_tokenizer()
    expected = list(prepare_dataset(rows, tok, limits=LengthLimits(14, None, None), use_cache=False).pairs)
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    for source in (str(tmp_path / "rows.parquet"), str(tmp_path / "rows.csv"),
                   datasets.Dataset.from_list(rows).to_iterable_dataset()):
        stream = PairStream(source, tok, limits=LengthLimits(14, None, None), shuffle_buffer=0, passes=1)
        assert list(stream) == expected, source
        assert [p.index for p in expected] == [0, 3]  # source row numbers, drops between them


def test_the_shuffle_buffer_permutes_the_pairs_by_seed_and_pass(tmp_path):
    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(50)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    stream = PairStream(data, chatml_tokenizer(), shuffle_buffer=10, seed=3, passes=2)
    order = [p.index for p in stream]
    first, second = order[:50], order[50:]
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != list(range(50)) and second != first  # the seed and the pass decide the order
    assert [p.index for p in stream] == order  # each iteration starts again from pass 1
    assert [p.index for p in PairStream(data, chatml_tokenizer(), shuffle_buffer=10, seed=3, passes=1)] == first
    assert [p.index for p in PairStream(data, chatml_tokenizer(), shuffle_buffer=10, seed=4, passes=1)] != first
    assert (stream.rows, stream.kept, stream.pass_number) == (200, 200, 2)  # running totals over both iterations
    assert stream.report() == "read 200 rows (pass 2): kept 200 of 200 pairs"


def test_the_training_stream_is_endless_and_a_pass_without_pairs_is_an_error(tmp_path):
    rows = [{"prompt": "what", "chosen": "good", "rejected": "bad"}, {"prompt": "why", "chosen": "ok", "rejected": "ok"}]
    endless = iter(PairStream(write_jsonl(tmp_path / "rows.jsonl", rows), chatml_tokenizer(), shuffle_buffer=0))
    assert [next(endless).index for _ in range(5)] == [0, 0, 0, 0, 0]  # row 1 dropped in every pass
    nothing = PairStream(write_jsonl(tmp_path / "same.jsonl", rows[1:] * 3), chatml_tokenizer(), shuffle_buffer=0)
    with pytest.raises(OrpoError, match=r"same\.jsonl: zero usable pairs in a pass over it; read 3 rows \(pass 1\): "
                                        r"kept 0 of 3 pairs; dropped 3: chosen == rejected 3 \(first at row 0\)"):
        next(iter(nothing))


def test_bad_input_is_one_line(tmp_path):
    tok = chatml_tokenizer()
    with pytest.raises(OrpoError, match=r"streaming reads a file, a hub dataset id or a datasets.IterableDataset, "
                                        r"got list"):
        PairStream(ROWS, tok)
    with pytest.raises(OrpoError, match=r"nope\.jsonl: no such file"):
        PairStream(str(tmp_path / "nope.jsonl"), tok)
    with pytest.raises(OrpoError, match=r"^orpo-tests/no-such-set: not a local file, and streaming it from the "
                                        r"Hugging Face hub failed: "):
        PairStream("orpo-tests/no-such-set", tok)  # offline in the tests (HF_HUB_OFFLINE=1)
    with pytest.raises(OrpoError, match=r"missing column 'rejected'; columns found: \['prompt', 'chosen'\]"):
        PairStream(write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "a", "chosen": "b"}]), tok)
    out = tmp_path / "prepared"
    prepare_dataset(ROWS, tok, limits=LengthLimits(14, None, None), use_cache=False, output_dir=out)
    with pytest.raises(OrpoError, match=r"a prepared set \(orpo data prepare\), read memory-mapped; train from it "
                                        r"without --streaming"):
        PairStream(str(out), tok)
    # a bad line far into the file: met while training reads it, still one line with its number
    good = json.dumps(ROWS[0]) + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good * 1500 + "{not json\n")
    stream = PairStream(str(bad), tok, limits=LengthLimits(14, None, None), shuffle_buffer=0, passes=1)
    with pytest.raises(OrpoError, match=r"bad\.jsonl, line 1501: invalid JSON"):
        list(stream)
    skipping = PairStream(str(bad), tok, limits=LengthLimits(14, None, None), shuffle_buffer=0, skip_bad_rows=True,
                          passes=1)
    assert len(list(skipping)) == 1500
    # a gzip file cut short
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress((good * 3000).encode())[:-40])
    with pytest.raises(OrpoError, match=r"cut\.jsonl\.gz: could not read it \("):
        list(PairStream(str(cut), tok, limits=LengthLimits(14, None, None), shuffle_buffer=0, passes=1))


def test_memory_does_not_grow_with_the_rows_read(tmp_path):
    """20,000 rows streamed with a 1,000-row shuffle buffer: the process's anonymous memory after the last
    row is within 20 MB of what it was after 2,000 (the rows' ids as Python lists alone are ~75 MB)."""
    row = {"prompt": "why is the sky blue " * 10, "chosen": "the sky is blue " * 20, "rejected": "no " * 15}
    data = write_jsonl(tmp_path / "rows.jsonl", [row] * 20_000)
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[2]); from orpo.data.stream import PairStream; "
        "from tiny import chatml_tokenizer\n"
        "def anon(): return int([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1]) * 1024\n"
        "s = PairStream(sys.argv[1], chatml_tokenizer(), shuffle_buffer=1000, passes=1)\n"
        "tokens, marks = 0, {}\n"
        "for n, p in enumerate(s, 1):\n"
        "    tokens += len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)\n"
        "    if n in (2000, 20000): marks[n] = anon()\n"
        "print(json.dumps({'n': n, 'tokens': tokens, 'grew': marks[20000] - marks[2000]}))"
    )
    out = subprocess.run([sys.executable, "-c", script, data, str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 20_000 and result["tokens"] > 3_000_000
    assert result["grew"] < 20 * 2**20, result


def test_streamed_image_pairs_are_the_prepared_ones_and_a_text_only_model_is_one_line(tmp_path):
    import torch

    from test_prepare import image_rows
    from vision_models import llava_processor

    processor = llava_processor()
    path = str(image_rows(tmp_path))
    streamed = PairStream(path, processor, limits=LengthLimits(256, 128, None), passes=1, shuffle_buffer=0)
    pairs = list(streamed)
    prepared = prepare_dataset(path, processor, limits=LengthLimits(256, 128, None), cache_dir=tmp_path / "cache")
    assert pairs == list(prepared.pairs) and dict(streamed.drops) == dict(prepared.drops) == {"unreadable image": 1}
    assert torch.equal(pairs[0].vision_inputs["pixel_values"], prepared.pairs[0].vision_inputs["pixel_values"])
    with pytest.raises(OrpoError, match=r", row 0: the pair has images, and the model is text-only"):
        list(PairStream(path, byte_level_chatml_tokenizer(), passes=1))
