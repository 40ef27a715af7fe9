"""prepare.py: the one data path. Formats + render drops are added up once, with the first row and
its problem; strict turns any drop into an error; every kind of source gives the same pairs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orpo.errors import OrpoError
from orpo.data.formats import RowFormat, UnreadColumns
from orpo.data.prepare import PreparedData, prepare_dataset
from orpo.data.render import LengthLimits
from tiny import byte_level_chatml_tokenizer, chatml_tokenizer

ROWS = [
    {"prompt": "why is the sky blue", "chosen": "the sky is blue", "rejected": "no"},  # kept
    {"prompt": "what", "chosen": "ok", "rejected": "ok"},  # chosen == rejected (formats)
    {"prompt": "a b c a b c a b c a b c", "chosen": "yes", "rejected": "no"},  # too long (render)
    {"prompt": "what", "chosen": 7, "rejected": "no"},  # wrong types (formats)
    {"prompt": "a", "chosen": "good", "rejected": "bad"},  # kept
]


def test_drops_are_counted_by_reason_with_their_first_row():
    prepared = prepare_dataset(ROWS, chatml_tokenizer(), limits=LengthLimits(14, None, None), name="prefs.jsonl")
    assert [p.index for p in prepared.pairs] == [0, 4]
    assert dict(prepared.drops) == {"chosen == rejected": 1, "too long": 1, "wrong types": 1}
    assert prepared.drops.first_rows == {"chosen == rejected": 1, "too long": 2, "wrong types": 3}
    assert prepared.report().startswith("kept 2 of 5 pairs; dropped 3")


def test_strict_names_the_first_dropped_row():
    with pytest.raises(OrpoError, match=r"^prefs\.jsonl, row 1: pair dropped \(chosen == rejected\) and --strict"):
        prepare_dataset(ROWS, chatml_tokenizer(), limits=LengthLimits(14, None, None), strict=True, name="prefs.jsonl")


def test_zero_usable_pairs_is_an_error():
    with pytest.raises(OrpoError, match=r"^prefs\.jsonl: zero usable pairs; kept 0 of 2 pairs"):
        prepare_dataset(ROWS[1:3], chatml_tokenizer(), limits=LengthLimits(14, None, None), name="prefs.jsonl")


def test_a_50_mb_line_is_cheap(tmp_path):
    """One 50 MB answer among normal rows: read, rendered and truncated in bounded memory and time
    (its text is cut before tokenization), in a fresh process so the peak RSS is its own."""
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(ROWS[0]) + "\n")
        f.write(json.dumps({"prompt": "why", "chosen": "the sky " * 6_250_000, "rejected": "no"}) + "\n")
    script = (
        "import json, sys, time; sys.path.insert(0, sys.argv[2]); "
        "from orpo.data.prepare import PreparedData, format_drop_report, prepare_dataset; from orpo.data.render import "
        "LengthLimits; from tiny import chatml_tokenizer; t = time.time(); "
        "p = prepare_dataset(sys.argv[1], chatml_tokenizer(), limits=LengthLimits(64, 32, None)); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print(json.dumps({'lengths': [len(x.chosen_ids) for x in p.pairs], 'seconds': time.time() - t, "
        "'peak_gb': int(hwm) / 2**20}))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path), str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert os.path.getsize(path) > 50_000_000
    short = prepare_dataset([{"prompt": "why", "chosen": "the sky", "rejected": "no"}], chatml_tokenizer(), limits=LengthLimits(64, 32, None))
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
    from_list = prepare_dataset(rows, tok, limits=LengthLimits(14, None, None))
    from_file = prepare_dataset(str(path), tok, limits=LengthLimits(14, None, None))
    from_dataset = prepare_dataset(datasets.Dataset.from_list(rows), tok, limits=LengthLimits(14, None, None))
    assert from_list.pairs == from_file.pairs == from_dataset.pairs and len(from_list.pairs) == 2
    assert prepare_dataset(from_list, tok) is from_list  # prepared data passes through
    assert prepare_dataset(from_list.pairs, tok).pairs == from_list.pairs


def test_prepared_data_counts_shapes():
    prepared = prepare_dataset(ROWS, chatml_tokenizer(), limits=LengthLimits(14, None, None))
    assert sum(prepared.shapes.values()) >= 4  # every row whose shape was recognised (row 3 has a number)
    assert isinstance(prepared, PreparedData)


def test_a_source_of_another_type_is_one_line():
    with pytest.raises(OrpoError, match=r"^dataset: expected a file path, a hub dataset id, a prepared set's directory, a datasets.Dataset"):
        prepare_dataset(42, chatml_tokenizer())
    import datasets

    stream = datasets.Dataset.from_list(ROWS[:1]).to_iterable_dataset()
    with pytest.raises(OrpoError, match=r"^dataset: a datasets.IterableDataset is read as a stream: set streaming=True"):
        prepare_dataset(stream, chatml_tokenizer())


# --- preparation in several processes, the cache, prepared sets ------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path("/work/shared/data")
# every fixture shape with the options it is read with (tests/data/test_formats.py), the shared real files,
# and ROWS (a list whose fields change type between rows: rows kept as they are, not as Arrow columns)
SOURCES = {
    "autoj_pairwise.jsonl": dict(response_columns=("response 1", "response 2"),
                                 label_map={"0": "response 1", "1": "response 2", "2": "tie"}),
    "llamafactory_openai_tags.jsonl": {}, "llamafactory_sharegpt_dpo.json": {}, "llamafactory_v1_dpo.jsonl": {},
    "pandalm_testset.json": dict(prompt_columns=("instruction", "input"), response_columns=("response1", "response2"),
                                 label_columns=("annotator1", "annotator2", "annotator3"),
                                 label_map={"0": "tie", "1": "response1", "2": "response2"}),
    "trl_content_parts.jsonl": {}, "ultrafeedback_raw.jsonl": {},
    "ultrafeedback_1k_train.jsonl": {}, "hh_rlhf_harmless_test.jsonl.gz": {}, "ROWS": {},
}


def one_process_reference(rows, tokenizer, row_format, max_length, max_prompt_length):
    """Today's single-process path written out from the pure functions: rows → pairs → ids, drops counted."""
    from orpo.data.formats import rows_to_pairs
    from orpo.data.render import render_pair
    from orpo.errors import DroppedPair

    read = rows_to_pairs(rows, row_format)
    pairs = []
    for pair in read.pairs:
        try:
            pairs.append(render_pair(pair, tokenizer, LengthLimits(max_length, max_prompt_length, None)))
        except DroppedPair as drop:
            read.drops.count(drop.reason, pair.index, drop.detail)
    return pairs, read


@pytest.mark.parametrize("source", SOURCES)
def test_any_number_of_processes_gives_todays_pairs_and_drops(source, tmp_path):
    from orpo.data.formats import RowFormat
    from orpo.data.load import load_rows

    fmt = RowFormat(**SOURCES[source])
    tok = byte_level_chatml_tokenizer()  # every text its own ids (the word-level one reads most words as <unk>)
    if source == "ROWS":
        data, rows = ROWS, ROWS
    else:
        data = str(FIXTURES / source if (FIXTURES / source).exists() else SHARED / source)
        rows = load_rows(data)
    pairs, read = one_process_reference(rows, tok, fmt, 256, 128)
    for num_proc in (1, 2, 3):
        got = prepare_dataset(data, tok, fmt, LengthLimits(256, 128), num_proc=num_proc,
                              cache_dir=tmp_path / f"cache{num_proc}")
        assert got.pairs == pairs, num_proc
        assert (got.rows, got.drops, dict(got.shapes)) == (len(rows), read.drops, dict(read.shapes)), num_proc


def test_the_second_preparation_reads_the_cache_and_any_change_misses_it(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok, cache = chatml_tokenizer(), tmp_path / "cache"
    first = prepare_dataset(str(path), tok, limits=LengthLimits(14, None, None), cache_dir=cache)
    assert first.origin.startswith("prepared with 1 process, cached at " + str(cache))
    again = prepare_dataset(str(path), tok, limits=LengthLimits(14, None, None), cache_dir=cache)
    assert again.origin.startswith("read from the cache") and again.pairs == first.pairs
    assert (again.rows, again.drops, again.shapes, again.unread_columns) == (
        first.rows, first.drops, first.shapes, first.unread_columns)
    assert len(list(cache.iterdir())) == 1
    # another length limit, another template, other content: each a new entry
    prepare_dataset(str(path), tok, limits=LengthLimits(15, None, None), cache_dir=cache)
    other = chatml_tokenizer()
    other.chat_template = other.chat_template.replace("m['content']", "m['content'] | trim")  # same text, new key
    prepare_dataset(str(path), other, limits=LengthLimits(14, None, None), cache_dir=cache)
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[::-1]))
    changed = prepare_dataset(str(path), tok, limits=LengthLimits(14, None, None), cache_dir=cache)
    assert changed.origin.startswith("prepared") and [p.index for p in changed.pairs] == [0, 4]
    assert len(list(cache.iterdir())) == 4
    # turned off: nothing read or written
    off = prepare_dataset(str(path), tok, limits=LengthLimits(14, None, None), cache_dir=cache, use_cache=False)
    assert off.origin == "prepared with 1 process (cache off)" and off.pairs == changed.pairs
    assert len(list(cache.iterdir())) == 4


def test_a_prepared_set_is_trained_from_and_refuses_other_options(tmp_path):
    tok = chatml_tokenizer()
    out = tmp_path / "prepared"
    made = prepare_dataset(ROWS, tok, limits=LengthLimits(14, None, None), cache_dir=tmp_path / "c", output_dir=out)
    read = prepare_dataset(str(out), tok, limits=LengthLimits(14, None, None))
    assert read.origin == f"read from the prepared set {out}" and read.pairs == made.pairs
    assert read.report() == made.report() == "kept 2 of 5 pairs; dropped 3:\n  chosen == rejected 1 (first at row 1)\n" \
        "  too long 1 (first at row 2: prompt of 20 tokens leaves no room for the completion within max_length=14)\n" \
        "  wrong types 1 (first at row 3: chosen is int, expected a string or a list of messages)"
    with pytest.raises(OrpoError, match=r"prepared with other data options: max_length 14 \(now 20\)"):
        prepare_dataset(str(out), tok, limits=LengthLimits(20, None, None))
    other = chatml_tokenizer()
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(OrpoError, match=r"prepared with another tokenizer; prepare it again"):
        prepare_dataset(str(out), other, limits=LengthLimits(14, None, None))
    with pytest.raises(OrpoError, match=r"--output .*: exists and is not empty"):
        prepare_dataset(ROWS, tok, limits=LengthLimits(15, None, None), cache_dir=tmp_path / "c", output_dir=out)


QUESTIONS = [  # a prompt column whose name the defaults do not know: the answers' shared start is the prompt
    {"id": 0, "question": "why is the sky blue", "chosen": "the sky is blue", "rejected": "the sky is green"},
    {"id": 1, "question": "what is good", "chosen": "good is kind", "rejected": "good is bad"},
    {"id": 2, "question": "what", "chosen": "ok", "rejected": "ok"},  # chosen == rejected
]


def test_the_columns_no_shape_read_are_named_and_the_prompt_column_suggested(tmp_path):
    tok = chatml_tokenizer()
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS))
    prepared = prepare_dataset(str(path), tok, cache_dir=tmp_path / "cache")
    assert dict(prepared.shapes) == {"implicit prompt (shared prefix; no prompt column)": 3}
    assert prepared.report() == (
        "kept 2 of 3 pairs; columns not read: id, question (3 rows have an implicit prompt: --prompt_column question "
        "reads it as the prompt); dropped 1: chosen == rejected 1 (first at row 2)")
    assert prepare_dataset(str(path), tok, cache_dir=tmp_path / "cache").report() == prepared.report()  # the cache
    named = prepare_dataset(str(path), tok, RowFormat(prompt_columns=("question",)), cache_dir=tmp_path / "cache")
    assert dict(named.shapes) == {"prompt/chosen/rejected strings": 3}
    assert named.report() == "kept 2 of 3 pairs; columns not read: id; dropped 1: chosen == rejected 1 (first at row 2)"
    assert prepare_dataset(ROWS, tok, limits=LengthLimits(14, None, None)).unread_columns == UnreadColumns()


def test_a_cache_hit_and_a_prepared_set_report_what_the_first_run_did_skipped_lines_included(tmp_path):
    tok = chatml_tokenizer()
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(row) for row in ROWS]
    path.write_text("\n".join([*lines[:2], "{not json", *lines[2:], "[1, 2]"]) + "\n")
    report = ("kept 2 of 5 pairs; skipped 2 bad lines (first: line 3: invalid JSON (Expecting property name enclosed "
              "in double quotes at column 2)); dropped 3:\n"
              "  chosen == rejected 1 (first at row 1)\n"
              "  too long 1 (first at row 2: prompt of 20 tokens leaves no room for the completion within max_length=14)\n"
              "  wrong types 1 (first at row 3: chosen is int, expected a string or a list of messages)")
    prepare = lambda **kw: prepare_dataset(str(path), tok, **kw, limits=LengthLimits(14, None, None),  # noqa: E731
                                           skip_bad_rows=True, cache_dir=tmp_path / "cache")
    first = prepare(num_proc=2)
    assert first.origin.startswith("prepared with 2 processes") and first.report() == report
    again = prepare()
    assert again.origin.startswith("read from the cache") and again.report() == first.report()
    assert (again.drops.skipped_lines, again.drops.first_skipped_line) == (2, 3)
    written = prepare(output_dir=tmp_path / "prepared")  # orpo data prepare --output, then --dataset DIR
    read = prepare_dataset(str(tmp_path / "prepared"), tok, limits=LengthLimits(14, None, None), skip_bad_rows=True)
    assert read.origin == f"read from the prepared set {tmp_path / 'prepared'}"
    assert written.report() == read.report() == report and read.drops == first.drops


def test_prepared_pairs_are_memory_mapped_not_held(tmp_path):
    """20,000 pairs (6M tokens) prepared, then every pair read: the process's anonymous memory (RssAnon: not
    the file's pages, which the kernel shares between ranks and can drop) grows by under a tenth of what the
    ids take as Python lists (about 25 bytes per token)."""
    script = (
        "import gc, json, sys; sys.path.insert(0, sys.argv[2]); from orpo.data.prepare import prepare_dataset; "
        "from orpo.data.render import LengthLimits; "
        "from orpo.data.store import pair_lengths; from tiny import chatml_tokenizer\n"
        "rows = [{'prompt': 'why is the sky blue ' * 20, 'chosen': 'the sky is blue ' * 40, 'rejected': 'no ' * 30}] * 20000\n"
        "p = prepare_dataset(rows, chatml_tokenizer(), limits=LengthLimits(1024, 512, None), cache_dir=sys.argv[1])\n"
        "del rows; gc.collect()\n"
        "def anon(): return int([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1]) * 1024\n"
        "before = anon(); read = sum(len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids) for x in p.pairs)\n"
        "print(json.dumps({'tokens': int(pair_lengths(p.pairs).sum()), 'read': read, 'grew': anon() - before, 'n': len(p.pairs)}))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 20000 and result["tokens"] == result["read"] > 2_000_000
    assert result["grew"] < 0.1 * 25 * result["tokens"], result


# --- images -----------------------------------------------------------------------------------------------

def image_rows(tmp_path):
    """A JSON-lines file in TRL's vision shape whose image paths are relative to it; row 1's file is missing,
    row 2 is text only."""
    from vision_models import write_image

    write_image(tmp_path / "pics" / "dog.png", seed=1)
    write_image(tmp_path / "pics" / "cat.png", 40, 16, seed=2)
    rows = [
        {"images": ["pics/dog.png", "pics/cat.png"], "chosen": "A dog and a cat.", "rejected": "Two dogs.",
         "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "What is in the picture?"}]}]},
        {"images": ["pics/none.png"], "prompt": "Describe it.", "chosen": "A cat.", "rejected": "A dog."},
        {"images": [], "prompt": "what is blue?", "chosen": "the sky", "rejected": "a cat"},
    ]
    path = tmp_path / "vision.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("num_proc", [1, 2])
def test_image_pairs_are_prepared_with_their_images_and_a_missing_one_is_a_counted_drop(tmp_path, num_proc):
    import torch

    from orpo.data.formats import PreferencePair
    from orpo.data.render import render_pair
    from vision_models import llava_processor

    processor = llava_processor()
    path = image_rows(tmp_path)
    prepared = prepare_dataset(str(path), processor, limits=LengthLimits(256, 128, None), num_proc=num_proc,
                               cache_dir=tmp_path / "cache")
    assert dict(prepared.drops) == {"unreadable image": 1}
    assert prepared.drops.first_details == {"unreadable image": "images[0] 'pics/none.png': No such file or directory"}
    first, text = prepared.pairs
    assert (first.index, text.index) == (0, 2)
    expected = render_pair(PreferencePair(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "What is in the picture?"}]}],
        [{"role": "assistant", "content": "A dog and a cat."}], [{"role": "assistant", "content": "Two dogs."}],
        images=((tmp_path / "pics" / "dog.png").read_bytes(), (tmp_path / "pics" / "cat.png").read_bytes())),
        processor, LengthLimits(256, 128, None))
    assert first == expected  # ids and the stored image files
    assert torch.equal(first.vision_inputs["pixel_values"], expected.vision_inputs["pixel_values"])  # made on read
    assert text.images == () and text.vision_inputs is None
    again = prepare_dataset(str(path), processor, limits=LengthLimits(256, 128, None), cache_dir=tmp_path / "cache")
    assert again.origin.startswith("read from the cache") and list(again.pairs) == list(prepared.pairs)
    assert torch.equal(again.pairs[0].vision_inputs["pixel_values"], expected.vision_inputs["pixel_values"])


def test_image_pairs_for_a_text_only_model_are_one_line(tmp_path):
    path = image_rows(tmp_path)
    with pytest.raises(OrpoError) as err:
        prepare_dataset(str(path), byte_level_chatml_tokenizer(), cache_dir=tmp_path / "cache")
    assert str(err.value) == (f"{path}, row 0: 2 pair(s) have images, and the model is text-only (its tokenizer has "
                              "no image processor); train a vision-language model (loaded with its processor), or "
                              "leave out the rows with images")


def test_an_image_edited_in_place_is_prepared_again_not_read_from_the_cache(tmp_path, caplog):
    """The cache keys on the data file; the image files it names are stamped (size, modification time) when
    the set is prepared, and a changed stamp (or a missing file that appears) is a miss."""
    import logging
    import os

    from vision_models import llava_processor, write_image

    processor = llava_processor()
    path = image_rows(tmp_path)
    prepare = lambda: prepare_dataset(str(path), processor, limits=LengthLimits(256, 128, None),  # noqa: E731
                                      cache_dir=tmp_path / "cache")
    first = prepare()
    assert prepare().origin.startswith("read from the cache")
    dog = tmp_path / "pics" / "dog.png"
    write_image(dog, 30, 30, seed=9)  # another picture in the same file
    os.utime(dog, ns=(1, 1))
    with caplog.at_level(logging.INFO, logger="orpo.data.prepare"):
        again = prepare()
    assert again.origin.startswith("prepared with") and "image file(s) changed" in caplog.text
    assert again.pairs[0].images[0] == dog.read_bytes() != first.pairs[0].images[0]
    write_image(tmp_path / "pics" / "none.png", seed=3)  # row 1's missing file appears
    assert dict(prepare().drops) == {} and len(prepare().pairs) == 3
