"""The one data path: a source (file, hub id, `datasets.Dataset` or rows) → TokenizedPairs ready to train.

`prepare_dataset` is what `orpo train`, `ORPOTrainer`, `orpo eval`, `orpo data inspect`, `orpo data
prepare`, the demo and the benchmarks call. It loads rows (load.py), reads each row's shape (formats.py),
renders and truncates it (render.py) in `datasets.map` (`num_proc` processes, each a contiguous block
of rows; a row's outcome depends on it and its index only, so any number of processes gives the same
pairs), counts every dropped pair once, by reason, with the lines skipped as unreadable (drops.DropCounts),
names the columns no row's shape read (formats.UnreadColumns), and writes the kept pairs as a prepared set
(store.py): into the cache, keyed by everything that changes the ids, and read memory-mapped. What was
counted is recorded with the set, so a set read back (from the cache or `--output`) reports the same.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from orpo.data.drops import DropCounts, format_drop_report  # noqa: F401 (format_drop_report: imported from here)
from orpo.data.formats import RowFormat, UnreadColumns, prompt_candidates, read_row, resolve_columns, unread_columns
from orpo.data.images import file_stamp, image_files, is_processor
from orpo.data.load import EncodedRows, decode_rows, encode_rows, load_rows
from orpo.data.render import LengthLimits, TokenizedPair, render_pair
from orpo.data.store import (META_FILE, PAIR_COLUMNS, PAIRS_FILE, PairTable, cache_key, dataset_fingerprint,
                             file_fingerprint, is_prepared_dir, publish, read_prepared, tokenizer_fingerprint)
from orpo.errors import TEXT_ONLY_MODEL, DroppedPair, OrpoError

logger = logging.getLogger(__name__)

# Below this many rows one process prepares them (measured: starting workers costs more than it gains).
PARALLEL_MIN_ROWS = 2000
PROGRESS_MIN_ROWS = 10_000  # datasets' progress bar (rows/s, ETA) from this many rows
_OUTCOME_FEATURES = datasets.Features({
    "prompt_ids": datasets.Sequence(datasets.Value("int32")),
    "chosen_ids": datasets.Sequence(datasets.Value("int32")),
    "rejected_ids": datasets.Sequence(datasets.Value("int32")),
    "index": datasets.Value("int64"),
    "images": datasets.Sequence(datasets.Value("binary")),  # the prompt's image files, [] for text
    "image_files": datasets.Sequence(datasets.Value("string")),  # the files its images column names (the cache)
    "shape": datasets.Value("string"),  # "" where the row fits no shape
    "drop": datasets.Value("string"),  # the drop reason, "" for a kept pair
    "detail": datasets.Value("string"),
    "prompt_candidates": datasets.Sequence(datasets.Value("string")),  # formats.prompt_candidates of the row
})


@dataclass
class PreparedData:
    """The pairs kept from `rows` source rows, and what happened to the others.

    drops:          the dropped pairs by reason (each reason's first row, 0-based, and what was wrong with it)
                    and the lines skipped as unreadable.
    shapes:         detected row shape → rows read in that shape.
    unread_columns: the source's columns that no row's shape read.
    pairs:          a PairTable (memory-mapped) for prepared rows; a list where the source was TokenizedPairs.
    seconds:        how long preparing (or reading the prepared set) took; origin: where the pairs came from
                    ("prepared ...", "read from the cache ...", "read from the prepared set ...").
    name:           how messages name the source; fingerprint: a hash of its content and of everything that
                    made its ids (the cache key), which a checkpoint's stamp compares on resume.
    """

    pairs: PairTable | list[TokenizedPair]
    rows: int
    drops: DropCounts = field(default_factory=DropCounts)
    shapes: Counter = field(default_factory=Counter)
    unread_columns: UnreadColumns = UnreadColumns()
    seconds: float = 0.0
    origin: str = ""
    name: str = ""
    fingerprint: str = ""

    @property
    def kept(self) -> int:
        return len(self.pairs)

    def report(self) -> str:
        """The data report (drops.DropCounts.report), e.g. "kept 995 of 1000 pairs; columns not read: id;
        dropped 5: chosen == rejected 5 (first at row 17)"."""
        return self.drops.report(self.rows, self.kept, self.unread_columns.text())


def default_cache_dir() -> Path:
    """Where prepared sets are cached unless told: `orpo` in the datasets cache ($HF_DATASETS_CACHE)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "orpo"


def default_num_proc(rows: int) -> int:
    """The CPU cores this process may use, for `rows` >= PARALLEL_MIN_ROWS; else 1."""
    if rows < PARALLEL_MIN_ROWS:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_dataset(
    source,
    tokenizer,
    row_format: RowFormat = RowFormat(),
    limits: LengthLimits = LengthLimits(),
    strict: bool = False,
    skip_bad_rows: bool = False,
    split: str = "train",
    name: str | None = None,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    output_dir: str | Path | None = None,
) -> PreparedData:
    """Read, shape, render and truncate every row of `source`.

    source:     a file path or hub dataset id (read by `load_rows`, `split` of a hub dataset), a prepared set's
                directory (`orpo data prepare --output`), a `datasets.Dataset`, a list of row dicts, or a list
                of `TokenizedPair`s or a PairTable (kept as they are).
    tokenizer:  the model's tokenizer, or a vision-language model's processor (pairs with images need one;
                image paths are relative to the data file's directory).
    name:       how messages name the data (default: the path, or "dataset").
    num_proc:   processes preparing the rows (None: `default_num_proc`).
    cache_dir:  the cache of prepared sets (None: `default_cache_dir()`); use_cache False: neither read nor
                written (the set is prepared into a temporary file, still memory-mapped).
    output_dir: also (or only) keep the prepared set there, for `--dataset output_dir` later.
    Raises `OrpoError` (one line) when nothing usable is left, or on any drop when `strict`.
    """
    if isinstance(source, PreparedData):
        return source
    if isinstance(source, PairTable):
        return PreparedData(source, len(source), name=name or "pairs",
                            fingerprint="table:" + dataset_fingerprint(source.table))
    processor = tokenizer if is_processor(tokenizer) else None
    if isinstance(source, list) and source and all(isinstance(p, TokenizedPair) for p in source):
        ids = [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.images) for p in source]
        return PreparedData(list(source), len(source), name=name or "pairs", fingerprint="pairs:" + Hasher.hash(ids))
    start = time.perf_counter()
    name = name or (str(source) if isinstance(source, (str, Path)) else "dataset")
    fields = {"row_format": dataclasses.asdict(row_format), **dataclasses.asdict(limits),
              "skip_bad_rows": skip_bad_rows, "split": split}
    # as prepared.json will hold them (tuples as lists), so a set read back compares equal
    key_parts = json.loads(json.dumps({"tokenizer": tokenizer_fingerprint(tokenizer), "fields": fields}, default=str))
    root = image_root(source)
    if isinstance(source, (str, Path)) and is_prepared_dir(source):
        prepared = _read_set(source, key_parts, start, processor)
    else:
        rows, skipped = None, DropCounts()  # skipped: the lines load_rows skips (--skip_bad_rows)
        if isinstance(source, (str, Path)) and Path(source).expanduser().is_file():
            key_parts["source"] = file_fingerprint(Path(source).expanduser())  # before reading it: a hit skips that
        else:
            rows = load_rows(str(source), split, skip_bad_rows, drops=skipped) if isinstance(source, (str, Path)) \
                else source
            key_parts["source"] = _rows_fingerprint(rows, name)
        entry = Path(cache_dir or default_cache_dir()) / cache_key(key_parts) if use_cache else None
        prepared = None
        if entry is not None and is_prepared_dir(entry):
            prepared = _read_set(entry, key_parts, start, processor, cached=True)
        if prepared is None:
            work = _work_dir(entry)
            try:
                if rows is None:  # JSON rows go onto disk as they are read (work/rows.arrow)
                    rows = load_rows(str(source), split, skip_bad_rows, work_dir=work, drops=skipped)
                prepared = _prepare_rows(rows, skipped, tokenizer, row_format, limits, name, num_proc, work, entry,
                                         key_parts, start, root)
            finally:
                if entry is not None:  # published (renamed away), or failed half-way
                    shutil.rmtree(work, ignore_errors=True)
        if output_dir is not None:
            _copy_set(prepared, entry, Path(output_dir), key_parts)
    if TEXT_ONLY_MODEL in prepared.drops:
        raise text_only_model_error(name, prepared.drops.first_rows[TEXT_ONLY_MODEL],
                                    f"{prepared.drops[TEXT_ONLY_MODEL]} pair(s) have images")
    if strict and prepared.drops:
        reason, row = min(prepared.drops.first_rows.items(), key=lambda item: item[1])
        raise OrpoError(f"{name}, row {row}: pair dropped ({reason}) and --strict is set; {prepared.report()}")
    if not len(prepared.pairs):
        raise OrpoError(f"{name}: zero usable pairs; {prepared.report()}")
    return dataclasses.replace(prepared, name=name, fingerprint=cache_key(key_parts))


def image_root(source) -> Path | None:
    """The directory image paths in `source`'s rows are relative to: a data file's own directory; None for
    other sources (paths then relative to the working directory)."""
    if isinstance(source, (str, Path)) and Path(source).expanduser().is_file():
        return Path(source).expanduser().resolve().parent
    return None


def text_only_model_error(name: str, row: int, what: str) -> OrpoError:
    """The one line for image pairs given to a text-only model (`what`: how many pairs have images)."""
    return OrpoError(f"{name}, row {row}: {what}, and the model is text-only (its tokenizer has no image processor); "
                     "train a vision-language model (loaded with its processor), or leave out the rows with images")


def _rows_fingerprint(rows, name: str) -> str:
    if isinstance(rows, datasets.Dataset):
        return "dataset:" + dataset_fingerprint(rows)
    if isinstance(rows, list):
        return "rows:" + Hasher.hash(rows)
    if isinstance(rows, datasets.IterableDataset):
        raise OrpoError(f"{name}: a datasets.IterableDataset is read as a stream: set streaming=True (--streaming)")
    raise OrpoError(f"{name}: expected a file path, a hub dataset id, a prepared set's directory, a datasets.Dataset "
                    f"or a list of rows, got {type(rows).__name__}")


def _read_set(path, key_parts: dict, start: float, processor, cached: bool = False) -> PreparedData | None:
    """A prepared set; one that was prepared with another tokenizer or other data fields is one line. A cache
    entry whose image files changed since (size or modification time) is removed: None, prepare again."""
    if cached and (changed := _changed_image_files(path)):
        logger.info("%s: %d image file(s) changed since the set was prepared (first: %s); preparing it again",
                    path, len(changed), changed[0])
        shutil.rmtree(path, ignore_errors=True)
        return None
    pairs, meta = read_prepared(path, processor)
    made = meta.get("key_parts", {})
    changed = [part for part in ("tokenizer", "fields") if made.get(part) != key_parts[part]]
    if changed:
        what = " and ".join({"tokenizer": "another tokenizer", "fields": "other data options"}[c] for c in changed)
        detail = "" if "fields" not in changed else ": " + ", ".join(
            f"{k} {made['fields'].get(k)!r} (now {v!r})" for k, v in key_parts["fields"].items()
            if made.get("fields", {}).get(k) != v)
        raise OrpoError(f"{path}: prepared with {what}{detail}; prepare it again with this tokenizer and these "
                        "options (orpo data prepare)")
    origin = f"read from the cache ({path})" if cached else f"read from the prepared set {path}"
    return PreparedData(pairs, meta["rows"], DropCounts.from_meta(meta), Counter(meta["shapes"]),
                        UnreadColumns.from_meta(meta.get("unread_columns")), time.perf_counter() - start, origin)


def _changed_image_files(path) -> list[str]:
    """The image files a prepared set read whose size or modification time is not what it was then."""
    meta = json.loads((Path(path) / META_FILE).read_text())
    return [file for file, stamp in meta.get("image_files", {}).items() if file_stamp(file) != stamp]


def _work_dir(entry: Path | None) -> Path:
    """Where a set is prepared: beside its cache entry (published by one rename), or, with the cache off, a
    temporary directory removed at exit (the set stays mapped there, readable by dataloader workers)."""
    if entry is not None:
        return Path(tempfile.mkdtemp(prefix=f"{entry.name}.incomplete-", dir=_mkdir(entry.parent)))
    work = Path(tempfile.mkdtemp(prefix="orpo-prepared-"))
    atexit.register(shutil.rmtree, work, True)
    return work


def _prepare_rows(rows, drops: DropCounts, tokenizer, row_format, limits: LengthLimits, name: str,
                  num_proc: int | None, work: Path, entry: Path | None, key_parts: dict, start: float,
                  image_root: Path | None) -> PreparedData:
    """`rows` prepared into `work` (`drops`: the lines skipped reading them; the rows' drops are added to it)."""
    if isinstance(rows, list):  # each row as it is: Arrow would unify (or refuse) fields whose type changes
        rows = encode_rows(rows, work)
    names = list(rows.column_names)
    columns = resolve_columns(names, row_format, name)
    pickled = isinstance(rows, EncodedRows)
    if pickled:
        rows = rows.table
    workers = max(1, min(num_proc or default_num_proc(len(rows)), len(rows)))
    with _progress(len(rows) >= PROGRESS_MIN_ROWS):
        outcomes = rows.map(
            _prepare_batch, batched=True, with_indices=True, num_proc=workers if workers > 1 else None,
            remove_columns=rows.column_names, features=_OUTCOME_FEATURES,
            cache_file_name=str(work / "outcomes.arrow"), new_fingerprint=cache_key({**key_parts, "step": "rows"}),
            desc=f"preparing {name} ({workers} process{'es' * (workers > 1)})",
            fn_kwargs=dict(pickled=pickled, columns=columns, row_format=row_format, tokenizer=tokenizer,
                           limits=limits, image_root=image_root),
        )
        shapes, candidates = _count(outcomes, drops)
        unread = unread_columns(names, columns, shapes, candidates)
        files = sorted({file for row in outcomes.with_format("arrow")["image_files"].to_pylist() for file in row})
        if drops.total == len(rows):  # nothing to keep (zero usable pairs: an error below)
            return PreparedData([], len(rows), drops, shapes, unread)
        kept = outcomes.filter(lambda drop: [not d for d in drop], input_columns="drop", batched=True,
                               cache_file_name=str(work / "kept.indices.arrow"))
        kept.select_columns(list(PAIR_COLUMNS)).flatten_indices(cache_file_name=str(work / PAIRS_FILE))
    del outcomes, kept
    for path in work.iterdir():
        if path.name != PAIRS_FILE:
            path.unlink()
    meta = {**_counted_meta(len(rows), drops, shapes, unread), "key_parts": key_parts, "source": name,
            "image_files": {file: file_stamp(file) for file in files}}
    processor = tokenizer if is_processor(tokenizer) else None
    if entry is not None:
        publish(work, entry, meta)
        pairs, _ = read_prepared(entry, processor)
        origin = f"prepared with {workers} process{'es' * (workers > 1)}, cached at {entry}"
    else:
        pairs = PairTable(datasets.Dataset.from_file(str(work / PAIRS_FILE)), processor)
        origin = f"prepared with {workers} process{'es' * (workers > 1)} (cache off)"
    return PreparedData(pairs, len(rows), drops, shapes, unread, time.perf_counter() - start, origin)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _progress(show: bool):
    """datasets' progress bars (rows/s, ETA) for large sets only; restored after."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def prepare_row(row: dict, index: int, columns, row_format: RowFormat, tokenizer, limits: LengthLimits,
                image_root: Path | None = None
                ) -> tuple[str | None, TokenizedPair | DroppedPair]:
    """One source row → (its shape or None, its TokenizedPair or the DroppedPair saying why not): shaped
    (formats.read_row), rendered and truncated (render.render_pair; image paths relative to `image_root`).
    Every path from rows to ids runs this."""
    shape, pair = read_row(row, index, columns, row_format)
    if not isinstance(pair, DroppedPair):
        try:
            pair = render_pair(pair, tokenizer, limits, image_root)
        except DroppedPair as drop:  # rendering drops join the same counts
            pair = drop
    return shape, pair


def _prepare_batch(batch: dict, indices: list[int], pickled: bool, columns, row_format: RowFormat, tokenizer,
                   limits: LengthLimits, image_root: Path | None) -> dict:
    """One block of rows → one outcome per row (`_OUTCOME_FEATURES`): the pair's ids, or why it was dropped."""
    if pickled:
        rows = decode_rows(batch)
    else:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out = {name: [] for name in _OUTCOME_FEATURES}
    for index, row in zip(indices, rows):
        shape, pair = prepare_row(row, index, columns, row_format, tokenizer, limits, image_root)
        dropped = isinstance(pair, DroppedPair)
        for column in ("prompt_ids", "chosen_ids", "rejected_ids", "images"):
            out[column].append([] if dropped else list(getattr(pair, column)))
        out["index"].append(index)
        out["image_files"].append(image_files(row.get(columns.images), image_root) if columns.images else [])
        out["shape"].append(shape or "")
        out["drop"].append(pair.reason if dropped else "")
        out["detail"].append(pair.detail if dropped else "")
        out["prompt_candidates"].append(prompt_candidates(row, shape, columns))
    return out


def _count(outcomes: datasets.Dataset, drops: DropCounts) -> tuple[Counter, set[str]]:
    """The outcomes' drops added to `drops` in row order; (rows per shape in order of first row, the union of
    the rows' prompt candidates)."""
    table = outcomes.with_format("arrow")[:]
    shapes = Counter(shape for shape in table["shape"].to_pylist() if shape)
    dropped = table.filter(pc.not_equal(table["drop"], ""))
    for index, reason, detail in zip(*(dropped[c].to_pylist() for c in ("index", "drop", "detail"))):
        drops.count(reason, index, detail)
    return shapes, set(pc.unique(pc.list_flatten(table["prompt_candidates"])).to_pylist())


def _counted_meta(rows: int, drops: DropCounts, shapes: Counter, unread: UnreadColumns) -> dict:
    """What preparation counted, as prepared.json holds it (`_read_set` reads it back)."""
    return {"rows": rows, **drops.to_meta(), "shapes": dict(shapes), "unread_columns": unread.to_meta()}


def _copy_set(prepared: PreparedData, entry: Path | None, output_dir: Path, key_parts: dict) -> None:
    """Keep the prepared set at `output_dir` too (`orpo data prepare --output`)."""
    if is_prepared_dir(output_dir) and output_dir.resolve() == (entry or output_dir).resolve():
        return
    if output_dir.exists() and any(output_dir.iterdir()):
        raise OrpoError(f"--output {output_dir}: exists and is not empty; name a new directory")
    work = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.incomplete-", dir=_mkdir(output_dir.parent)))
    with _progress(False):
        prepared.pairs.table.flatten_indices(cache_file_name=str(work / PAIRS_FILE))
    if output_dir.exists():
        output_dir.rmdir()
    publish(work, output_dir, {**_counted_meta(prepared.rows, prepared.drops, prepared.shapes, prepared.unread_columns),
                               "key_parts": key_parts, "source": prepared.origin})
