"""Loading preference rows from local files or the Hugging Face hub.

Every problem with the user's input is reported as a one-line `OrpoError`; what the rows mean is
read by `orpo.data.formats`. A UTF-8 byte-order mark at the start of a file (Windows tools write one) is
not part of its text.
"""
from __future__ import annotations

import atexit
import codecs
import contextlib
import gzip
import io
import json
import logging
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa

from orpo.data.drops import DropCounts
from orpo.errors import OrpoError, first_line

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "name" or "owner/name"
ROW_COLUMN = "row"  # EncodedRows: each row pickled, as it was read
_ENCODE_BLOCK = 1000  # rows per Arrow record batch written (what is held in memory while encoding)
_JSON_NAMES = {"list": "array", "str": "string", "int": "number", "float": "number", "bool": "boolean",
               "NoneType": "null"}


def _file_type(path: Path) -> tuple[str, bool]:
    """(extension without .gz, whether gzipped), e.g. "x.jsonl.gz" → (".jsonl", True)."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    return Path(name[:-3] if gz else name).suffix, gz


def _looks_like_path(source: str) -> bool:
    """A source that cannot be a hub id ("owner/name") is reported as a missing file instead."""
    ext, gz = _file_type(Path(source))
    return (gz or ext in _BUILDERS or source.startswith((".", "/", "~")) or not _HUB_ID.match(source))


def is_hub_dataset_id(source: str) -> bool:
    """Whether `load_rows` reads `source` from the Hugging Face hub: no such local path, and shaped like a hub id."""
    return not Path(source).expanduser().exists() and not _looks_like_path(source)


def _reason(error: BaseException) -> str:
    """The innermost cause's first line: datasets wraps the useful pyarrow/hub message."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = first_line(error)
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs its own error before raising; we report a better one-liner instead."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _open(path: Path, gz: bool, mode: str):
    """The file, gunzipped where `gz`; in text mode UTF-8 without a leading byte-order mark ("utf-8-sig")."""
    if "b" in mode:
        return gzip.open(path, mode) if gz else open(path, mode)
    return gzip.open(path, mode, encoding="utf-8-sig") if gz else open(path, mode, encoding="utf-8-sig")


def _is_blank(path: Path, gz: bool) -> bool:
    """Whether the file holds nothing but whitespace (after a byte-order mark)."""
    with _open(path, gz, "rb") as f:
        chunk = _without_bom(f.read(1 << 16))
        while chunk:
            if chunk.strip():
                return False
            chunk = f.read(1 << 16)
    return True


def _json_type(value) -> str:
    return _JSON_NAMES.get(type(value).__name__, "value")


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """(row, None) or (None, what is wrong with this line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "JSON nested too deeply"
    if not isinstance(row, dict):
        return None, f"a JSON {_json_type(row)} where an object was expected"
    return row, None


class EncodedRows:
    """Rows exactly as they were read, each pickled into one column of an Arrow file on disk, memory-mapped:
    fields whose type changes from row to row stay as they are (Arrow would unify or refuse them), and memory
    does not grow with the number of rows. Iterating gives the row dicts.

    table:        a `datasets.Dataset` with one column ROW_COLUMN (`decode_rows` reads a batch of it)
    column_names: the union of the rows' keys, in order of first appearance
    """

    def __init__(self, table: datasets.Dataset, column_names: list[str]):
        self.table, self.column_names = table, column_names

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.iter(batch_size=_ENCODE_BLOCK):
            yield from decode_rows(batch)


def decode_rows(batch: dict) -> list[dict]:
    """A batch of EncodedRows.table (column ROW_COLUMN) → its row dicts."""
    return [pickle.loads(row) for row in batch[ROW_COLUMN]]


def encode_rows(rows: Iterable[dict], work_dir: str | Path | None = None) -> EncodedRows:
    """`rows` (any iterable of dicts, read once) → EncodedRows in `work_dir`/rows.arrow, written a block of
    _ENCODE_BLOCK rows at a time (None: a temporary directory, removed at exit)."""
    if work_dir is None:
        work_dir = tempfile.mkdtemp(prefix="orpo-rows-")
        atexit.register(shutil.rmtree, work_dir, True)
    path = Path(work_dir) / "rows.arrow"
    schema = pa.schema([(ROW_COLUMN, pa.binary())])
    names: dict[str, None] = {}
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        block = []
        for row in rows:
            names.update(dict.fromkeys(row))
            block.append(pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL))
            if len(block) == _ENCODE_BLOCK:
                writer.write_batch(pa.record_batch([pa.array(block, pa.binary())], schema=schema))
                block = []
        if block:
            writer.write_batch(pa.record_batch([pa.array(block, pa.binary())], schema=schema))
    return EncodedRows(datasets.Dataset.from_file(str(path)), list(names))


def _json_list(path: Path, gz: bool) -> list[dict]:
    """A whole-file JSON list of objects (read whole: JSON lines are the form for large sets)."""
    try:
        with _open(path, gz, "rt") as f:
            items = json.load(f)
    except json.JSONDecodeError as e:
        raise OrpoError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                        "expected a JSON list of objects or one JSON object per line") from None
    except RecursionError:
        raise OrpoError(f"{path}: JSON nested too deeply") from None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise OrpoError(f"{path}: item {i} of the JSON list is a JSON {_json_type(item)}, expected an object")
    return items


def _is_json_list(path: Path, gz: bool) -> bool:
    """Whether a .json/.jsonl file holds one JSON list rather than JSON lines."""
    with _open(path, gz, "rb") as f:
        return _without_bom(f.read(1 << 16)).lstrip().startswith(b"[")


def _without_bom(raw: bytes) -> bytes:
    """The bytes a file starts with, less a UTF-8 byte-order mark."""
    return raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw


def _json_lines(path: Path, gz: bool, skip_bad_rows: bool, drops: DropCounts | None) -> Iterator[dict]:
    """The rows of a JSON-lines file, one at a time, read by orpo: each bad line is an error naming it, or,
    with `skip_bad_rows`, skipped and counted in `drops` (`DropCounts.skip_line`; None: in one warning at the end)."""
    skipped = DropCounts() if drops is None else drops
    with _open(path, gz, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = _without_bom(raw)
            if not raw.strip():
                continue
            row, problem = _parse_line(raw)
            if problem is None:
                yield row
            elif skip_bad_rows:
                skipped.skip_line(n, problem)
            else:
                raise OrpoError(f"{path}, line {n}: {problem}; expected one JSON object per line "
                                "(--skip_bad_rows skips bad lines)")
    if drops is None and skipped.skipped_lines:
        logger.warning("%s: %s", path, skipped.skipped_text())


def _load_local(path: Path, ext: str, gz: bool, skip_bad_rows: bool, work_dir: str | Path | None,
                drops: DropCounts | None, streaming: bool = False):
    builder = _BUILDERS[ext]
    if builder == "json":
        # Read ourselves: line numbers in errors, per-line UTF-8 checks, bad lines skippable; onto disk as read.
        rows = _json_rows(path, gz, skip_bad_rows, drops)
        return rows if streaming else encode_rows(rows, work_dir)
    if builder == "parquet" and gz:  # datasets does not decompress parquet itself
        import pyarrow.parquet as pq

        with _open(path, True, "rb") as f:
            table = datasets.Dataset(pq.read_table(io.BytesIO(f.read())))
        return table.to_iterable_dataset() if streaming else table
    with _quiet_datasets():
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)


def _json_rows(path: Path, gz: bool, skip_bad_rows: bool, drops: DropCounts | None) -> Iterator[dict]:
    """The rows of a .json/.jsonl file: JSON lines one at a time, a whole-file JSON list read whole."""
    yield from _json_list(path, gz) if _is_json_list(path, gz) else _json_lines(path, gz, skip_bad_rows, drops)


def _load_file(path: Path, skip_bad_rows: bool, work_dir: str | Path | None, drops: DropCounts | None,
               streaming: bool = False):
    ext, gz = _file_type(path)
    if not path.is_file():
        raise OrpoError(f"{path}: not a file; expected a .jsonl, .json, .parquet or .csv file")
    if ext not in _BUILDERS:
        raise OrpoError(f"{path}: unknown file type {ext or '(no extension)'!r}; "
                        "expected .jsonl, .json, .parquet or .csv (optionally .gz)")
    try:
        if _is_blank(path, gz):
            raise OrpoError(f"{path}: no rows")
        rows = _load_local(path, ext, gz, skip_bad_rows, work_dir, drops, streaming)
    except Exception as e:
        raise _read_error(path, ext, e) from (None if isinstance(e, (OSError, EOFError, UnicodeDecodeError)) else e)
    if not streaming and len(rows) == 0:
        raise OrpoError(f"{path}: no rows")
    return rows


def _read_error(path, ext: str, e: Exception) -> OrpoError:
    """The one line for an exception raised while reading `path`."""
    if isinstance(e, OrpoError):
        return e
    if isinstance(e, UnicodeDecodeError):
        return OrpoError(f"{path}: not UTF-8 text")
    if isinstance(e, (OSError, EOFError)):  # e.g. a truncated or corrupt gzip file
        return OrpoError(f"{path}: could not read it ({_reason(e)})")
    if "corresponds to no data" in _reason(e):  # datasets' words for an empty split (e.g. a bare csv header)
        return OrpoError(f"{path}: no rows")
    return OrpoError(f"{path}: could not read it{' as ' + ext[1:] if ext else ''} ({_reason(e)})")


def load_rows(source: str, split: str = "train", skip_bad_rows: bool = False,
              work_dir: str | Path | None = None, drops: DropCounts | None = None) -> datasets.Dataset | EncodedRows:
    """Rows from a local .jsonl/.json/.parquet/.csv file (optionally .gz) or a hub dataset id.

    The hub is only tried when `source` is not an existing path and does not look like one.
    Raises `OrpoError` (one line) for every problem with the input; with `skip_bad_rows`, JSON
    lines that cannot be read are skipped and counted instead, into `drops` (DropCounts.skip_line; None:
    a warning says how many). JSON rows come back as EncodedRows (in `work_dir`, default a temporary
    directory), each exactly as read (a field whose type changes from row to row is then checked row by
    row, and such rows dropped as "wrong types"); the others as a Dataset.
    """
    path = Path(source).expanduser()
    if path.exists():
        return _load_file(path, skip_bad_rows, work_dir, drops)
    if _looks_like_path(source):
        raise OrpoError(f"{source}: no such file")
    try:
        with _quiet_datasets():
            rows = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise OrpoError(f"{source}: not a local file, and loading it from the Hugging Face hub failed: "
                        f"{_reason(e)}") from e
    if len(rows) == 0:
        raise OrpoError(f"{source}: no rows in split {split!r}")
    return rows


def stream_rows(source: str, split: str = "train", skip_bad_rows: bool = False,
                drops: DropCounts | None = None) -> Iterator[tuple[int, dict]]:
    """(row number, row) of `source` one at a time, never all in memory; the rows `load_rows` reads, in the
    same order and numbered the same (0-based), skipped lines counted alike. JSON lines are read by orpo, a
    JSON list whole, parquet/csv and hub datasets by `datasets` with `streaming=True`. A problem met while
    reading is one `OrpoError`."""
    path = Path(source).expanduser()
    if path.exists():
        rows, ext = _load_file(path, skip_bad_rows, None, drops, streaming=True), _file_type(path)[0]
    elif _looks_like_path(source):
        raise OrpoError(f"{source}: no such file")
    else:
        path, ext = source, ""
        try:
            with _quiet_datasets():
                rows = datasets.load_dataset(source, split=split, streaming=True)
        except Exception as e:
            raise OrpoError(f"{source}: not a local file, and streaming it from the Hugging Face hub failed: "
                            f"{_reason(e)}") from e
    try:
        yield from enumerate(rows)
    except Exception as e:
        raise _read_error(path, ext, e) from None
