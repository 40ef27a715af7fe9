"""Prepared pairs on disk, memory-mapped, and the cache key of a prepared set.

A prepared set is a directory (written by `prepare_dataset`, into the cache or where `orpo data prepare
--output` says):
    pairs.arrow     one row per kept pair: prompt_ids, chosen_ids, rejected_ids (int32 lists), index (the
                    source row), images (the prompt's image files' bytes, [] for text); an Arrow file
                    written and memory-mapped by `datasets`
    prepared.json   what preparation counted (rows read, drops by reason with their first rows and
                    details and the lines skipped as unreadable: drops.DropCounts; row shapes; the columns
                    not read: formats.UnreadColumns), so a set read back reports what its preparation did,
                    and the parts of its key (`key_parts`)
`PairTable` reads one pair at a time from the mapped file: the pairs are not held as Python objects, so
a process's memory does not grow with their number, and every rank of a job maps the same pages. Given
a vision-language model's processor, it also turns a pair's stored images into the model's image inputs
(images.image_inputs) as it reads the pair.

The cache key hashes everything that changes the ids: the source's content, the tokenizer (vocabulary,
special tokens, chat template), every data field, and the code that turns rows into ids (`CODE_VERSION`:
the data layer's own source, so an edit to it, released or not, never reads a stale set). Image files the
rows name are not in the key (it is computed before the rows are read): prepared.json stamps each with its
size and modification time, and prepare.py prepares an entry again when a stamp changed.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from orpo.data.images import image_inputs, is_processor
from orpo.data.render import TokenizedPair

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "index", "images")
PAIRS_FILE = "pairs.arrow"
META_FILE = "prepared.json"
_DATA_LAYER = ("drops.py", "load.py", "formats.py", "images.py", "render.py", "prepare.py", "store.py")
CODE_VERSION = hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes() for name in _DATA_LAYER)).hexdigest()[:16]


class PairTable(Sequence):
    """TokenizedPairs of a `datasets.Dataset` with PAIR_COLUMNS (memory-mapped from a prepared set), read
    one at a time. `table[i]` is a TokenizedPair, `table[a:b]` a PairTable of those pairs, `lengths()`
    their token counts without reading the ids. `processor`: a vision-language model's, which makes a
    pair's image inputs from its stored images as the pair is read (None: the pairs carry no inputs)."""

    def __init__(self, table: datasets.Dataset, processor=None):
        self.table = table
        self.processor = processor

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PairTable(self.table.select(range(*i.indices(len(self)))), self.processor)
        return self._pair(self.table[operator.index(i)])  # ints and numpy ints (samplers); 1.5 is a TypeError

    def __iter__(self):
        for row in self.table:
            yield self._pair(row)

    def _pair(self, row: dict) -> TokenizedPair:
        images = tuple(row.get("images") or ())
        inputs = image_inputs(self.processor, list(images)) if images and self.processor is not None else None
        return TokenizedPair(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], row["index"], images, inputs)

    def __eq__(self, other) -> bool:  # the same pairs in the same order, as a list of them would be
        return isinstance(other, (PairTable, list)) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def lengths(self) -> np.ndarray:
        """[n, 3] int64: the prompt, chosen and rejected token counts of each pair, from the Arrow list offsets."""
        arrow = self.table.with_format("arrow")[:]
        return np.stack([pc.list_value_length(arrow[name]).to_numpy(zero_copy_only=False).astype(np.int64)
                         for name in PAIR_COLUMNS[:3]], axis=1).reshape(-1, 3)


def pair_lengths(pairs) -> np.ndarray:
    """[n, 3] int64 (prompt, chosen, rejected) token counts of `pairs`: a PairTable or a list of TokenizedPairs."""
    if isinstance(pairs, PairTable):
        return pairs.lengths()
    return np.array([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs],
                    dtype=np.int64).reshape(-1, 3)


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
    """The fingerprint `datasets` keeps for `dataset` (a content hash for in-memory data, the builder's
    config and split for a loaded one, updated by every transform): `Dataset._fingerprint`, a private
    member, read here only (tests/data/test_store.py fails loudly if a datasets release renames it)."""
    return dataset._fingerprint


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's bytes (about 1 s per GB here), with its size."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return f"{os.path.getsize(path)}:{digest}"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer makes of text: its class, vocabulary and rules (datasets' Hasher, as
    `datasets.map` hashes a tokenizer it is given), special tokens and chat template. For a processor:
    its tokenizer's, its chat template and its image processor's settings (which decide image token counts)."""
    if is_processor(tokenizer):
        return Hasher.hash((type(tokenizer).__name__, tokenizer_fingerprint(tokenizer.tokenizer),
                            getattr(tokenizer, "chat_template", None), tokenizer.image_processor.to_json_string()))
    return Hasher.hash((type(tokenizer).__name__, tokenizer, getattr(tokenizer, "chat_template", None),
                        str(tokenizer.special_tokens_map)))


def cache_key(parts: dict) -> str:
    """The cache entry's name: sha256 of `parts` (JSON, sorted keys) and CODE_VERSION."""
    text = json.dumps({**parts, "code_version": CODE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def is_prepared_dir(path: str | Path) -> bool:
    """Whether `path` is a complete prepared set (its META_FILE is written last)."""
    path = Path(path)
    return (path / META_FILE).is_file() and (path / PAIRS_FILE).is_file()


def read_prepared(path: str | Path, processor=None) -> tuple[PairTable, dict]:
    """The pairs of the prepared set at `path`, memory-mapped (`processor`: PairTable's), and its prepared.json."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    return PairTable(datasets.Dataset.from_file(str(path / PAIRS_FILE)), processor), meta


def publish(work_dir: Path, entry: Path, meta: dict) -> None:
    """Write `meta` into `work_dir` (holding PAIRS_FILE) and move it to `entry` in one rename, so a reader
    sees a whole set or none; when another process published the same entry first, theirs is kept."""
    (work_dir / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(work_dir, entry)
    except OSError:  # the entry exists (the same key, prepared by another process): same content
        if not is_prepared_dir(entry):
            shutil.rmtree(entry, ignore_errors=True)
            os.rename(work_dir, entry)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
