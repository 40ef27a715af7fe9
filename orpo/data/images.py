"""Images of vision-language pairs: a row's image entries → image file bytes → the model's image inputs.

A row names its images as file paths (relative to the data file's directory), bytes, datasets'
{"bytes", "path"} dicts or PIL images (formats.py). `read_image` turns one into the bytes of an image
file, what a prepared set stores (a file as it is on disk, a PIL image as PNG), after checking that
PIL decodes it: a missing file or bytes that are no image raise DroppedPair(UNREADABLE_IMAGE) naming
the entry. `image_inputs` runs a processor's image processor on stored images: the tensors the model
takes beside the ids (pixel_values, image_grid_thw, ...), the same the processor made when the
prompt's image tokens were counted (render.py), since the image processor is deterministic.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from orpo.errors import UNREADABLE_IMAGE, DroppedPair

TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")  # a processor's text outputs


def is_processor(tokenizer) -> bool:
    """Whether `tokenizer` is a multimodal processor (a tokenizer plus an image processor), not a tokenizer."""
    return getattr(tokenizer, "image_processor", None) is not None and hasattr(tokenizer, "tokenizer")


def text_tokenizer(tokenizer):
    """The tokenizer of a processor; a tokenizer itself."""
    return tokenizer.tokenizer if is_processor(tokenizer) else tokenizer


def _file(entry, root: Path | None) -> Path | None:
    """The file an image entry names: a path (relative to `root` when not absolute), or a {"bytes", "path"}
    dict without bytes; None for bytes and PIL images."""
    if isinstance(entry, dict) and entry.get("bytes") is None:
        entry = entry.get("path")
    if not isinstance(entry, str):
        return None
    path = Path(entry).expanduser()
    return path if path.is_absolute() or root is None else root / path


def read_image(entry, root: Path | None, where: str) -> bytes:
    """The bytes of the image file `entry` names (a path, relative to `root` when not absolute; bytes; a
    {"bytes", "path"} dict; a PIL image, saved as PNG). Raises DroppedPair(UNREADABLE_IMAGE) where there
    is no such file or PIL cannot decode it."""
    if isinstance(entry, dict):
        entry = entry["bytes"] if entry.get("bytes") is not None else entry.get("path")
    path = _file(entry, root)
    if path is not None:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DroppedPair(UNREADABLE_IMAGE, f"{where} {entry!r}: {err.strerror or err}") from None
    elif isinstance(entry, bytes):
        data = entry
    else:  # a PIL image
        buffer = io.BytesIO()
        entry.save(buffer, format="PNG")
        data = buffer.getvalue()
    try:
        decode_image(data)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DroppedPair(UNREADABLE_IMAGE, f"{where}: not an image PIL can read ({err})") from None
    return data


def read_image_files(entries, root: Path | None) -> tuple[bytes, ...]:
    """`read_image` of each of a row's image entries, named `images[i]` in its DroppedPair."""
    return tuple(read_image(entry, root, f"images[{i}]") for i, entry in enumerate(entries))


def image_files(value, root: Path | None) -> list[str]:
    """The files a row's images column names (`value`: one entry or a list; paths resolved against `root`,
    {"path"} dicts without bytes), for the prepared-data cache to notice an image edited in place."""
    entries = value if isinstance(value, (list, tuple)) else [value]
    return [str(path) for entry in entries if (path := _file(entry, root)) is not None]


def file_stamp(path: str) -> list[int] | None:
    """[size, modification time in ns] of a file, None where there is none: what the cache compares."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def decode_image(data: bytes) -> Image.Image:
    """An RGB PIL image from image file bytes (what image processors expect)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def image_inputs(processor, images: list[bytes]) -> dict:
    """The image processor's tensors for `images` (stored bytes), as a batch of one prompt."""
    output = processor.image_processor(images=[decode_image(data) for data in images], return_tensors="pt")
    return {key: value for key, value in output.items() if key not in TEXT_KEYS}
