"""Loading preference rows from local files or the Hugging Face hub.

Every problem with the user's input is reported as a one-line `OrpoError`; what the rows mean is
read by `orpo.data.formats`.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import re
from pathlib import Path

import datasets

from orpo.errors import OrpoError

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "name" or "owner/name"
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
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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
    if "b" in mode:
        return gzip.open(path, mode) if gz else open(path, mode)
    return gzip.open(path, mode, encoding="utf-8") if gz else open(path, mode, encoding="utf-8")


def _is_blank(path: Path, gz: bool) -> bool:
    with _open(path, gz, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
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


def _json_list(path: Path, gz: bool) -> list[dict]:
    """A whole-file JSON list of objects."""
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


def _json_rows(path: Path, gz: bool, skip_bad_rows: bool) -> list[dict]:
    """Read a JSON-lines (or JSON list) file ourselves: each bad line is an error naming it, or,
    with `skip_bad_rows`, skipped and counted in one warning."""
    with _open(path, gz, "rb") as f:
        if f.read(1 << 16).lstrip().startswith(b"["):  # a whole-file JSON list, not JSON lines
            return _json_list(path, gz)
    rows, bad = [], []
    with _open(path, gz, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            row, problem = _parse_line(raw)
            if problem is None:
                rows.append(row)
            elif skip_bad_rows:
                bad.append(f"line {n}: {problem}")
            else:
                raise OrpoError(f"{path}, line {n}: {problem}; expected one JSON object per line "
                                "(--skip_bad_rows skips bad lines)")
    if bad:
        logger.warning("%s: skipped %d bad line%s (first: %s)", path, len(bad), "s" * (len(bad) > 1), bad[0])
    return rows


def _load_local(path: Path, ext: str, gz: bool, skip_bad_rows: bool):
    builder = _BUILDERS[ext]
    if builder == "json":
        # Read ourselves: line numbers in errors, per-line UTF-8 checks, bad lines skippable.
        rows = _json_rows(path, gz, skip_bad_rows)
        try:
            return datasets.Dataset.from_list(rows)
        except Exception:  # a field with different types in different rows: rows are checked one by one later
            return rows
    if builder == "parquet" and gz:  # datasets does not decompress parquet itself
        import pyarrow.parquet as pq

        with _open(path, True, "rb") as f:
            return datasets.Dataset(pq.read_table(io.BytesIO(f.read())))
    with _quiet_datasets():
        return datasets.load_dataset(builder, data_files=str(path), split="train")


def _load_file(path: Path, skip_bad_rows: bool):
    ext, gz = _file_type(path)
    if not path.is_file():
        raise OrpoError(f"{path}: not a file; expected a .jsonl, .json, .parquet or .csv file")
    if ext not in _BUILDERS:
        raise OrpoError(f"{path}: unknown file type {ext or '(no extension)'!r}; "
                        "expected .jsonl, .json, .parquet or .csv (optionally .gz)")
    try:
        if _is_blank(path, gz):
            raise OrpoError(f"{path}: no rows")
        rows = _load_local(path, ext, gz, skip_bad_rows)
    except OrpoError:
        raise
    except UnicodeDecodeError:
        raise OrpoError(f"{path}: not UTF-8 text") from None
    except (OSError, EOFError) as e:  # e.g. a truncated or corrupt gzip file
        raise OrpoError(f"{path}: could not read it ({_reason(e)})") from None
    except Exception as e:
        if "corresponds to no data" in _reason(e):  # datasets' words for an empty split (e.g. a bare csv header)
            raise OrpoError(f"{path}: no rows") from None
        raise OrpoError(f"{path}: could not read it as {ext[1:]} ({_reason(e)})") from e
    if len(rows) == 0:
        raise OrpoError(f"{path}: no rows")
    return rows


def load_rows(source: str, split: str = "train", skip_bad_rows: bool = False) -> datasets.Dataset | list[dict]:
    """Rows from a local .jsonl/.json/.parquet/.csv file (optionally .gz) or a hub dataset id.

    The hub is only tried when `source` is not an existing path and does not look like one.
    Raises `OrpoError` (one line) for every problem with the input; with `skip_bad_rows`, JSON
    lines that cannot be read are skipped and counted instead. JSON rows whose fields change type
    from row to row come back as a list of dicts (the bad rows are then dropped as "wrong types").
    """
    path = Path(source).expanduser()
    if path.exists():
        return _load_file(path, skip_bad_rows)
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
