"""Raw dataset rows → `PreferencePair` (message lists), for every supported shape.

`rows_to_pairs` resolves a dataset's columns once, then detects each row's shape (so one dataset may
mix the chosen/rejected shapes) and counts the rows it drops, by reason. Shapes (SHAPE_* names):

prompt/chosen/rejected strings:
   {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
conversational: a prompt message list ending with a non-assistant turn, and assistant replies
   (a list of assistant messages, one message dict, or a plain string):
   {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "chosen": [{"role": "assistant", ...}], ...}
whole conversations (UltraFeedback-binarized): chosen/rejected repeat the prompt turns; the shared
   leading turns become the prompt (a prompt column, if any, is ignored):
   {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", ...}], ...}
implicit prompt (Human:/Assistant: turns; no prompt column), HH-RLHF: full texts sharing their turns
   {"chosen": "\\n\\nHuman: Hi?\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Hi?\\n\\nAssistant: No."}
implicit prompt (shared prefix; no prompt column): plain texts whose longest common prefix, cut back to a
   whitespace boundary, is the prompt: {"chosen": "Q: my pet is a cat", "rejected": "Q: my pet is a car"}
ShareGPT turns (LLaMA-Factory "sharegpt" preference data): the prompt turns in a `conversations` or
   `messages` column, the replies in chosen/rejected (one message, a list of them, or a string):
   {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello!"}, ...}
chosen_messages/rejected_messages (LLaMA-Factory v1): whole conversations, read as above:
   {"chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "Hi?"}], "loss_weight": 0.0},
                        {"role": "assistant", "content": [...]}], "rejected_messages": [...]}
label-based pairwise (PandaLM, Auto-J; RowFormat.response_columns, label_columns and label_map): each
   label column votes for a response column or "tie"; more than half of all the votes choose, else a tie:
   {"instruction": "Hi?", "response1": "Hello!", "response2": "Go away.", "label": 1}
rated completions (UltraFeedback raw): the best-rated completion (the first of equals) against a lower-rated
   one (RowFormat.binarize); all completions rated alike is a tie:
   {"instruction": "Hi?", "completions": [{"response": "Hello!", "overall_score": 8.0},
                                          {"response": "No.", "overall_score": 3.5}]}

Wherever messages are read:
- a message is {"role", "content"} or ShareGPT {"from", "value"}; roles system, user (or human) and
  assistant (or gpt); any other role (tool, observation, ...) drops the row. Extra keys (name,
  loss_weight, tool ids) are ignored.
- content may be a list of parts, [{"type": "text", "text" (or "value"): ...}, ...]: the text parts
  are joined with no separator, as chat templates that take content parts render consecutive text
  parts; an image part ({"type": "image"}) in a prompt keeps the content as parts (images below); any
  other part (audio, video, reasoning, ...), or an image in an answer, drops the row.
- the loss is on the final assistant turn(s): every earlier turn, assistant turns included, is prompt.
- the prompt column is "prompt", else "instruction" (RowFormat.prompt_columns names others); several
  are joined: their non-empty stripped texts, a blank line between, as one user turn.

Images (vision-language data): an `images` column (a list; or `image`, one) holds the row's images
as file paths (relative to the data file), bytes, {"bytes", "path"} dicts (datasets' Image feature)
or PIL images, in the order of the prompt's image placeholders:
- TRL's shape: {"type": "image"} parts in the prompt messages' content;
- LLaMA-Factory's: "<image>" in the prompt's text, which becomes an image part where it stands;
- no placeholder at all: the images go before the text of the first user turn (as TRL places them).
The prompt's content is then a list of parts, [{"type": "image"}, {"type": "text", "text": ...}], as
vision chat templates take it, and `PreferencePair.images` holds the images as found (read by
images.py). As many placeholders as images, or the row is dropped (IMAGE_COUNT).

Rows that cannot be trained on raise `DroppedPair` with one of the reasons in `orpo.errors`;
`rows_to_pairs` counts them (drops.DropCounts).

The columns each shape reads (`columns_read`): its prompt column(s), chosen and rejected (or the two response
columns and the labels, or the completions; ShareGPT's turns column; whole conversations and implicit prompts
no prompt column), and the images column. Any other column of the source is not read, and the data report
names it (`UnreadColumns`): ids, scores, or a prompt column under a name the defaults do not know, which
rows of a shape without a prompt column would otherwise never see (`--prompt_column NAME` reads it).
"""
from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from orpo.data.drops import DropCounts
from orpo.errors import (EMPTY_RESPONSE, IMAGE_COUNT, LABEL_MISSING, LABEL_TIE, LABEL_UNMAPPED, NON_TEXT,
                         SAME_RESPONSES, TIED_RATINGS, UNKNOWN_ROLE, WRONG_TYPES, DroppedPair, OrpoError)

Message = dict  # {"role": "system" | "user" | "assistant", "content": str, or parts with an image}
IMAGE_PART = {"type": "image"}
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's image placeholder in text

SHAPE_STRINGS = "prompt/chosen/rejected strings"
SHAPE_CONVERSATIONAL = "conversational"
SHAPE_CONVERSATIONS = "whole conversations"
SHAPE_HH = "implicit prompt (Human:/Assistant: turns; no prompt column)"
SHAPE_PREFIX = "implicit prompt (shared prefix; no prompt column)"
SHAPE_SHAREGPT = "ShareGPT turns"
SHAPE_MESSAGES = "chosen_messages/rejected_messages"
SHAPE_LABELS = "label-based pairwise"
SHAPE_RATED = "rated completions"
SHAPES = (SHAPE_STRINGS, SHAPE_CONVERSATIONAL, SHAPE_CONVERSATIONS, SHAPE_HH, SHAPE_PREFIX, SHAPE_SHAREGPT,
          SHAPE_MESSAGES, SHAPE_LABELS, SHAPE_RATED)
SHAPES_WITHOUT_PROMPT = (SHAPE_HH, SHAPE_PREFIX)  # shapes whose prompt is taken from the answers: no prompt column


@dataclass(frozen=True)
class PreferencePair:
    """One preference example as chat messages.

    prompt:   the conversation up to the answer (system/user/earlier assistant turns), ends with a
              non-assistant turn.
    chosen:   the preferred assistant turn(s).
    rejected: the dispreferred assistant turn(s).
    index:    the row number in the source dataset (0-based), for error messages and per-pair output.
    shape:    the row's detected shape (one of SHAPES).
    images:   the images of the prompt's image parts, in order, as the row holds them (paths, bytes,
              {"bytes", "path"} dicts or PIL images); () for a text-only pair.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    index: int = 0
    shape: str = ""
    images: tuple = ()


BINARIZE = ("best_vs_random", "best_vs_worst")  # rated completions → one pair per row


@dataclass(frozen=True)
class RowFormat:
    """How the columns of a dataset map to a preference pair: the data-shape fields of ORPOConfig
    (`prompt_column`, `chosen_column`, ...), as plain values. None = the default names and per-row
    shape detection.

    prompt_columns:   one or more prompt columns; several are joined (non-empty parts, blank line between).
    chosen_column, rejected_column: the preferred and dispreferred answer columns.
    response_columns: (A, B), two answer columns of label-based pairwise data, with
    label_columns:    one or more label columns (several: annotators, a strict majority decides) and
    label_map:        label value (as a string) → the name of the preferred column in response_columns, or "tie".
    rating_key:       the key of each rated completion's score (UltraFeedback raw: "overall_score").
    binarize:         rated completions → best vs a seeded random lower-rated one, or best vs worst.
    seed:             the seed of that random choice (per row, so a row's pair does not depend on the others).
    """

    prompt_columns: tuple[str, ...] | None = None
    chosen_column: str | None = None
    rejected_column: str | None = None
    response_columns: tuple[str, str] | None = None
    label_columns: tuple[str, ...] | None = None
    label_map: dict[str, str] | None = None
    rating_key: str = "overall_score"
    binarize: str = "best_vs_random"
    seed: int = 0


@dataclass
class PairsFromRows:
    """What `rows_to_pairs` made of a dataset.

    pairs:  the usable pairs, in row order.
    drops:  the rows dropped, by reason, with each reason's first row and its `DroppedPair` detail.
    shapes: shape name → rows detected in that shape (kept, or dropped after detection).
    """

    pairs: list[PreferencePair] = field(default_factory=list)
    drops: DropCounts = field(default_factory=DropCounts)
    shapes: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class _Columns:
    """Where one dataset keeps each part of a pair, resolved once from its column names."""

    prompt: tuple[str, ...] = ()  # () = no prompt column: the prompt is implicit, or in `turns`
    chosen: str = "chosen"
    rejected: str = "rejected"
    turns: str | None = None  # ShareGPT turns: the column of the prompt turns
    labels: tuple[str, ...] = ()  # label-based pairwise: the label columns
    responses: tuple[str, ...] = ()  # label-based pairwise: the two response columns
    completions: str | None = None  # rated completions
    images: str | None = None  # the row's images (vision-language data)


_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_PROMPTS = ("prompt", "instruction")  # the default prompt column: the first of these a dataset has
_TURNS = ("conversations", "messages")  # ShareGPT turns: the first of these a dataset has
IMAGE_COLUMNS = ("images", "image")  # the images column: the first of these a dataset has
ACCEPTED_SHAPES = ("prompt (or instruction) + chosen + rejected, as strings or message lists; chosen + rejected alone "
             "(whole conversations, or texts sharing their start); conversations or messages + chosen + rejected "
             "(ShareGPT); chosen_messages + rejected_messages; instruction + completions (rated); two answer "
             "columns with labels (--response_columns, --label_column, --label_map); "
             "--prompt_column/--chosen_column/--rejected_column map other names")
# "\n\nHuman:" / "\n\nAssistant:" start a turn; the first one may also open the text without "\n\n".
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def rows_to_pairs(rows, row_format: RowFormat = RowFormat(), source: str = "dataset") -> PairsFromRows:
    """Rows (a `datasets.Dataset` or a list of dicts) → the usable pairs, and the others counted by reason.

    Row indices are 0-based positions in `rows`. Raises `OrpoError` (one line, naming `source`, the
    columns found and the accepted shapes) when a column the format needs is missing.
    """
    names = getattr(rows, "column_names", None)
    if names is None:  # list of dicts: the union of keys, in order of first appearance
        names = dict.fromkeys(key for row in rows for key in row)
    columns = resolve_columns(list(names), row_format, source)
    out = PairsFromRows()
    for index, row in enumerate(rows):
        shape, pair = read_row(row, index, columns, row_format)
        if shape is not None:
            out.shapes[shape] += 1
        if isinstance(pair, DroppedPair):
            out.drops.count(pair.reason, index, pair.detail)
        else:
            out.pairs.append(pair)
    return out


def read_row(row: dict, index: int, columns: _Columns, fmt: RowFormat) -> tuple[str | None, PreferencePair | DroppedPair]:
    """(shape, pair) of row `index`, or (shape, the DroppedPair saying why not); shape None when the row
    fits none. A row's outcome depends on it, its index and the columns only, never on other rows."""
    try:
        shape = _row_shape(row, columns)
    except DroppedPair as drop:
        return None, drop
    try:
        return shape, _pair(row, index, shape, columns, fmt)
    except DroppedPair as drop:
        return shape, drop


def resolve_columns(names: list[str], fmt: RowFormat, source: str) -> _Columns:
    """Resolve the columns of every shape the dataset can have; `OrpoError` for a missing one."""
    def need(*wanted):
        for name in wanted:
            if name not in names:
                raise OrpoError(f"{source}: missing column {name!r}; columns found: {names}; "
                                f"accepted shapes: {ACCEPTED_SHAPES}")

    need(*(fmt.prompt_columns or ()))  # only names the user asked for must exist
    prompt = tuple(fmt.prompt_columns or next(((c,) for c in _PROMPTS if c in names), ()))
    images = next((c for c in IMAGE_COLUMNS if c in names), None)
    if fmt.response_columns:
        labels = tuple(fmt.label_columns or ("label",))
        need(*(prompt or _PROMPTS[:1]), *fmt.response_columns, *labels)
        return _Columns(prompt, labels=labels, responses=tuple(fmt.response_columns), images=images)
    if "completions" in names and "chosen" not in names and not (fmt.chosen_column or fmt.rejected_column):
        need(*(prompt or _PROMPTS[:1]))
        return _Columns(prompt, completions="completions", images=images)
    messages = "chosen" not in names and {"chosen_messages", "rejected_messages"} <= set(names)
    chosen = fmt.chosen_column or ("chosen_messages" if messages else "chosen")
    rejected = fmt.rejected_column or ("rejected_messages" if messages else "rejected")
    need(chosen, rejected)
    turns = None if fmt.prompt_columns else next((c for c in _TURNS if c in names), None)
    return _Columns(prompt, chosen, rejected, turns, images=images)


def columns_read(shape: str, columns: _Columns) -> tuple[str, ...]:
    """The columns a row of `shape` is read from: its prompt column(s) where the shape has them (whole
    conversations take the prompt from the answers, and ignore a prompt column), its answers or what chooses
    them, and the images column."""
    if shape == SHAPE_LABELS:
        read = (*columns.prompt, *columns.responses, *columns.labels)
    elif shape == SHAPE_RATED:
        read = (*columns.prompt, columns.completions)
    elif shape in (SHAPE_STRINGS, SHAPE_CONVERSATIONAL):
        read = (*columns.prompt, columns.chosen, columns.rejected)
    elif shape == SHAPE_SHAREGPT:
        read = (columns.turns, columns.chosen, columns.rejected)
    else:  # whole conversations, chosen_messages/rejected_messages, SHAPES_WITHOUT_PROMPT
        read = (columns.chosen, columns.rejected)
    return read + ((columns.images,) if columns.images else ())


def prompt_candidates(row: dict, shape: str | None, columns: _Columns) -> list[str]:
    """The columns of a row of a shape without a prompt column (SHAPES_WITHOUT_PROMPT) that its shape does not
    read and that hold text (a string with more than whitespace, or messages): each could be its prompt.
    [] for a row of any other shape."""
    if shape not in SHAPES_WITHOUT_PROMPT:
        return []
    read = columns_read(shape, columns)
    return [name for name, value in row.items() if name not in read and _is_text(value)]


def _is_text(value) -> bool:
    """A string with more than whitespace, a message dict or a list of them (what a prompt column holds)."""
    if isinstance(value, str):
        return bool(value.strip())
    first = value[0] if isinstance(value, list) and value else value
    return isinstance(first, dict) and _get(first, "role", "from") is not None


@dataclass(frozen=True)
class UnreadColumns:
    """The columns of a source that no detected row shape read (`columns_read`), in the source's order.

    names:               those columns (ids, scores, sources, a prompt column under another name, ...).
    prompt_candidates:   those of them that held text in rows of a shape without a prompt column
                         (`prompt_candidates`): each could be those rows' prompt (`--prompt_column NAME`).
    rows_without_prompt: the rows of those shapes.
    """

    names: tuple[str, ...] = ()
    prompt_candidates: tuple[str, ...] = ()
    rows_without_prompt: int = 0

    def text(self) -> str:
        """What the data report says of them, e.g. "columns not read: id, question (1000 rows have an implicit
        prompt: --prompt_column question reads it as the prompt)"; "" when every column was read."""
        if not self.names:
            return ""
        text = "columns not read: " + ", ".join(self.names)
        if not self.prompt_candidates:
            return text
        rows = f"{self.rows_without_prompt} row{' has' if self.rows_without_prompt == 1 else 's have'}"
        reads = (f"--prompt_column {self.prompt_candidates[0]} reads it" if len(self.prompt_candidates) == 1 else
                 "--prompt_column reads one of " + ", ".join(self.prompt_candidates))
        return f"{text} ({rows} an implicit prompt: {reads} as the prompt)"

    def to_meta(self) -> dict:
        """Its fields as a prepared set's prepared.json holds them (`from_meta` reads them back)."""
        return {"names": list(self.names), "prompt_candidates": list(self.prompt_candidates),
                "rows_without_prompt": self.rows_without_prompt}

    @classmethod
    def from_meta(cls, meta: dict | None) -> UnreadColumns:
        """The UnreadColumns of `to_meta`; None (a set prepared before they were recorded) reads as none."""
        if meta is None:
            return cls()
        return cls(tuple(meta["names"]), tuple(meta["prompt_candidates"]), meta["rows_without_prompt"])


def unread_columns(names, columns: _Columns, shapes: Counter, candidates) -> UnreadColumns:
    """The UnreadColumns of a source with columns `names` resolved as `columns`, whose rows were detected in
    `shapes` (shape → rows) and whose rows without a prompt column held text in `candidates` (the union of
    their `prompt_candidates`). Nothing is named where no row's shape was detected (each row was dropped
    before its shape said what it reads)."""
    read = {name for shape in shapes for name in columns_read(shape, columns)}
    unread = tuple(name for name in names if name not in read) if shapes else ()
    return UnreadColumns(unread, tuple(name for name in unread if name in set(candidates)),
                         sum(shapes.get(shape, 0) for shape in SHAPES_WITHOUT_PROMPT))


def _row_shape(row: dict, columns: _Columns) -> str:
    """The shape of one row (one of SHAPES); raises `DroppedPair` when it fits none."""
    if columns.labels:
        return SHAPE_LABELS
    if columns.completions:
        return SHAPE_RATED
    chosen, rejected = row.get(columns.chosen), row.get(columns.rejected)
    if not (columns.prompt or columns.turns) and isinstance(chosen, str) and isinstance(rejected, str):
        return SHAPE_HH if _hh_turns(chosen) and _hh_turns(rejected) else SHAPE_PREFIX
    whole = _opens_conversation(chosen), _opens_conversation(rejected)
    if all(whole):
        return SHAPE_MESSAGES if columns.chosen == "chosen_messages" else SHAPE_CONVERSATIONS
    if any(whole):
        raise DroppedPair(WRONG_TYPES, f"one of {columns.chosen}/{columns.rejected} is a whole conversation "
                                       "and the other is not")
    if columns.prompt:
        values = [row.get(c) for c in (*columns.prompt, columns.chosen, columns.rejected)]
        return SHAPE_CONVERSATIONAL if any(isinstance(v, (list, dict)) for v in values) else SHAPE_STRINGS
    if columns.turns:
        return SHAPE_SHAREGPT
    raise DroppedPair(WRONG_TYPES, "no prompt column, and chosen/rejected are assistant replies "
                                   "without the prompt turns")


def _pair(row: dict, index: int, shape: str, columns: _Columns, fmt: RowFormat) -> PreferencePair:
    """Read one row in its detected shape; raises `DroppedPair` for rows that cannot be trained on."""
    if shape in (SHAPE_HH, SHAPE_PREFIX):
        prompt, chosen, rejected = _implicit(row[columns.chosen], row[columns.rejected], shape)
    elif shape == SHAPE_LABELS:
        prompt, chosen, rejected = _labelled(row, columns, fmt)
    elif shape == SHAPE_RATED:
        prompt, chosen, rejected = _rated(row, index, columns, fmt)
    else:
        chosen = _messages(row.get(columns.chosen), columns.chosen, "assistant")
        rejected = _messages(row.get(columns.rejected), columns.rejected, "assistant")
        if shape in (SHAPE_CONVERSATIONS, SHAPE_MESSAGES):
            prompt, chosen, rejected = _split_conversations(chosen, rejected)
        elif shape == SHAPE_SHAREGPT:
            prompt = _messages(row.get(columns.turns), columns.turns, "user")
        else:
            prompt = _prompt(row, columns.prompt)
    prompt, images = prompt_images(prompt, row, columns.images)
    if not "".join(message_text(m) for m in prompt).strip() and not images:
        raise DroppedPair(WRONG_TYPES, "prompt is empty")
    if prompt[-1]["role"] == "assistant":
        raise DroppedPair(WRONG_TYPES, "prompt ends with an assistant turn, expected a user or system turn")
    _check_replies(chosen, rejected)
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, index=index, shape=shape, images=images)


def message_text(message: Message) -> str:
    """The text of a message: its content string, or its text parts joined (image parts left out)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def read_images(value, column: str) -> tuple:
    """The images of a row's images column `column`: a list of them, or one; None or [] → (). Raises
    DroppedPair(WRONG_TYPES) for an entry that is no path, bytes, {"bytes", "path"} or PIL image."""
    if _missing(value):
        return ()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for i, item in enumerate(items):
        is_pil = type(item).__module__.startswith("PIL.")
        is_file = isinstance(item, dict) and (item.get("bytes") is not None or item.get("path") is not None)
        if not (isinstance(item, (str, bytes)) or is_file or is_pil):
            raise DroppedPair(WRONG_TYPES, f"{column}[{i}] is {_kind(item)}, expected a file path, bytes, "
                                           "{'bytes', 'path'} or a PIL image")
    return tuple(items)


def prompt_images(prompt: list[Message], row: dict, column: str | None) -> tuple[list[Message], tuple]:
    """(the prompt with one image part per image, the row's images): the images of its column `column` (None:
    the row has no images column) placed in the prompt (`read_images`, `place_images`; their DroppedPairs)."""
    images = read_images(row.get(column), column) if column else ()
    return place_images(prompt, len(images)), images


def place_images(prompt: list[Message], images: int) -> list[Message]:
    """The prompt with one image part per image: its {"type": "image"} parts, else its "<image>"
    placeholders turned into parts, else the images before the first user turn's text. Raises
    IMAGE_COUNT where the placeholders are not as many as the images."""
    parts = sum(isinstance(m["content"], list) and m["content"].count(IMAGE_PART) for m in prompt)
    if not images:
        if parts:
            raise DroppedPair(IMAGE_COUNT, f"the prompt has {parts} image part(s) and the row no images")
        return prompt
    if not parts:
        marked = sum(message_text(m).count(IMAGE_PLACEHOLDER) for m in prompt)
        if marked:
            prompt, parts = [{**m, "content": _split_placeholders(m["content"])} for m in prompt], marked
        else:
            first = next((i for i, m in enumerate(prompt) if m["role"] == "user"), 0)
            text = _as_parts(prompt[first]["content"])
            prompt = [*prompt[:first], {**prompt[first], "content": [IMAGE_PART] * images + text},
                      *prompt[first + 1:]]
            parts = images
    if parts != images:
        raise DroppedPair(IMAGE_COUNT, f"the prompt has {parts} image placeholder(s) and the row {images} image(s)")
    return prompt


def _as_parts(content) -> list[dict]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def _split_placeholders(content):
    """Text with "<image>" placeholders → parts, each placeholder an image part where it stands."""
    if isinstance(content, list) or IMAGE_PLACEHOLDER not in content:
        return content
    parts = []
    for i, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append(IMAGE_PART)
        if text:
            parts.append({"type": "text", "text": text})
    return parts


def _kind(value) -> str:
    return "None" if value is None else type(value).__name__


def _missing(value) -> bool:
    """None, or NaN (what pandas-written files hold for an empty cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _get(d: dict, *keys):
    """The value of the first of `keys` that `d` has a value for: {role, content} or ShareGPT {from, value}
    messages, {text} or {value} parts. In Arrow datasets a struct's absent keys read as None."""
    return next((d[key] for key in keys if d.get(key) is not None), None)


def _opens_conversation(value) -> bool:
    """A reply list whose first message is not an assistant turn repeats the prompt (whole conversations)."""
    first = value[0] if isinstance(value, list) and value else None
    role = _get(first, "role", "from") if isinstance(first, dict) else None
    return role is not None and _ROLES.get(str(role)) != "assistant"


def _messages(value, field: str, role: str) -> list[Message]:
    """A string → one `role` message; a message dict or a list of them → normalised {role, content}."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise DroppedPair(WRONG_TYPES, f"{field} is {_kind(value)}, expected a string or a list of messages")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(items)]


def _message(message, where: str) -> Message:
    raw_role = _get(message, "role", "from") if isinstance(message, dict) else None
    if raw_role is None:
        raise DroppedPair(WRONG_TYPES, f"{where} is {_kind(message)}, expected a message with role and content")
    role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        raise DroppedPair(UNKNOWN_ROLE, f"{where} has role {raw_role!r}, expected system, user (human) "
                                        "or assistant (gpt)")
    return {"role": role, "content": _text(_get(message, "content", "value"), f"{where} content")}


def _text(content, where: str) -> str | list[dict]:
    """A string, or content parts: the text parts joined with no separator (as chat templates do); with
    image parts, the parts: images and the text runs between them, [{"type": "image"}, {"type": "text",
    "text": ...}, ...]."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DroppedPair(WRONG_TYPES, f"{where} is {_kind(content)}, expected a string or a list of text parts")
    runs = [""]
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = _get(part, "text", "value") if kind == "text" else None
        if isinstance(text, str):
            runs[-1] += text
        elif kind == "image":
            runs += [IMAGE_PART, ""]
        elif isinstance(kind, str) and kind != "text":
            raise DroppedPair(NON_TEXT, f"{where} part {j} is {kind!r}, expected text or image parts")
        else:
            raise DroppedPair(WRONG_TYPES, f"{where} part {j} is {part!r:.60}, expected "
                                           "{'type': 'text', 'text': a string}")
    if len(runs) == 1:
        return runs[0]
    return [run if run == IMAGE_PART else {"type": "text", "text": run} for run in runs if run]


def _prompt(row: dict, columns: tuple[str, ...]) -> list[Message]:
    """One prompt column: a string or messages. Several: their non-empty stripped texts, a blank line
    between, as one user turn ("instruction" + "input" → "Translate.\\n\\nBonjour")."""
    if len(columns) == 1:
        return _messages(row.get(columns[0]), columns[0], "user")
    parts = []
    for column in columns:
        value = row.get(column)
        if _missing(value):
            continue
        if not isinstance(value, str):
            raise DroppedPair(WRONG_TYPES, f"{column} is {_kind(value)}, expected a string "
                                           "(several prompt columns are joined as text)")
        if value.strip():
            parts.append(value.strip())
    return [{"role": "user", "content": "\n\n".join(parts)}]


def _split_conversations(chosen: list[Message], rejected: list[Message]) -> tuple[list, list, list]:
    """Shared leading turns → prompt (cut back to end on a non-assistant turn); the rest → replies."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # A shared assistant turn right before the divergence belongs to the replies, not the prompt.
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    if n == 0:
        raise DroppedPair(WRONG_TYPES, "chosen and rejected conversations do not start with the same prompt turns")
    return chosen[:n], chosen[n:], rejected[n:]


def _hh_turns(text: str) -> list[Message] | None:
    """Parse "\\n\\nHuman: ...\\n\\nAssistant: ..." into messages; None if the text is not in that format."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": _HH_ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _implicit(chosen: str, rejected: str, shape: str) -> tuple[list, list, list]:
    """No prompt column: HH-RLHF turns, or plain texts whose shared start is the prompt."""
    if not chosen.strip() or not rejected.strip():
        raise DroppedPair(EMPTY_RESPONSE, f"{'chosen' if not chosen.strip() else 'rejected'} is empty")
    if chosen.strip() == rejected.strip():
        raise DroppedPair(SAME_RESPONSES)
    if shape == SHAPE_HH:
        return _split_conversations(_hh_turns(chosen), _hh_turns(rejected))
    prefix = os.path.commonprefix([chosen, rejected])
    # Cut back so a word shared only partly ("ca" of "cat"/"car") stays in the replies.
    cut = max((i + 1 for i, ch in enumerate(prefix) if ch.isspace()), default=0)
    prompt = prefix[:cut].strip()
    if not prompt:
        raise DroppedPair(WRONG_TYPES, "no prompt column, and chosen and rejected share no leading text "
                                       "or \\n\\nHuman:/\\n\\nAssistant: turns to use as the prompt")
    return ([{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen[cut:].strip()}],
            [{"role": "assistant", "content": rejected[cut:].strip()}])


def _labelled(row: dict, columns: _Columns, fmt: RowFormat) -> tuple[list, list, list]:
    """Label-based pairwise: each label column votes for a response column or "tie" (through the
    label map); a response that gets more than half of ALL the votes is chosen, otherwise it is a tie."""
    votes = [_vote(row.get(c), c, fmt.label_map or {}) for c in columns.labels]
    a, b = columns.responses
    winner = next((side for side in (a, b) if 2 * votes.count(side) > len(votes)), None)
    if winner is None:
        labels = ", ".join(f"{c}={row.get(c)!r}" for c in columns.labels)
        majority = "" if len(votes) == 1 else f": no strict majority of the {len(votes)} votes"
        raise DroppedPair(LABEL_TIE, f"{labels} → {', '.join(votes)}{majority}")
    loser = b if winner == a else a
    return (_prompt(row, columns.prompt), _messages(row.get(winner), winner, "assistant"),
            _messages(row.get(loser), loser, "assistant"))


def _vote(label, column: str, label_map: dict[str, str]) -> str:
    """A label value → the response column it prefers, or "tie". 1, "1" and 1.0 all read as "1"."""
    if _missing(label):
        raise DroppedPair(LABEL_MISSING, f"{column} is {label!r}, expected a label")
    keys = [str(label)] + ([str(int(label))] if isinstance(label, float) and label.is_integer() else [])
    for key in keys:
        if key in label_map:
            return label_map[key]
    raise DroppedPair(LABEL_UNMAPPED, f"{column} is {label!r}, expected one of the label_map keys {list(label_map)}")


def _rated(row: dict, index: int, columns: _Columns, fmt: RowFormat) -> tuple[list, list, list]:
    """Rated completions: the best-rated one (the first, if several share the best rating) against a
    lower-rated one: seeded per row by (seed, index) for best_vs_random, the (first) worst for best_vs_worst."""
    name, completions = columns.completions, row.get(columns.completions)
    if not isinstance(completions, list):
        raise DroppedPair(WRONG_TYPES, f"{name} is {_kind(completions)}, expected a list of completions "
                                       f"with response and {fmt.rating_key}")
    scores = [_rating(c, f"{name}[{i}]", fmt.rating_key) for i, c in enumerate(completions)]
    if len(set(scores)) < 2:
        raise DroppedPair(TIED_RATINGS, f"all {len(scores)} completions have {fmt.rating_key} {scores[0]}"
                          if len(scores) > 1 else f"{name} has {len(scores)}, expected 2 or more rated completions")
    best = scores.index(max(scores))
    lower = [i for i, score in enumerate(scores) if score < scores[best]]
    if fmt.binarize == "best_vs_worst":
        worse = min(lower, key=lambda i: scores[i])
    else:  # a row's pair depends only on the seed and the row, not on the rows before it
        worse = random.Random(f"{fmt.seed}:{index}").choice(lower)
    chosen, rejected = (_messages(completions[i].get("response"), f"{name}[{i}].response", "assistant")
                        for i in (best, worse))
    return _prompt(row, columns.prompt), chosen, rejected


def _rating(completion, where: str, key: str) -> float:
    if not isinstance(completion, dict):
        raise DroppedPair(WRONG_TYPES, f"{where} is {_kind(completion)}, expected a completion with "
                                       f"response and {key}")
    score = completion.get(key)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
        raise DroppedPair(WRONG_TYPES, f"{where}.{key} is {score!r}, expected a number")
    return score


def _check_replies(chosen: list[Message], rejected: list[Message]) -> None:
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if any(not isinstance(m["content"], str) for m in msgs):
            raise DroppedPair(NON_TEXT, f"{field} has an image part: an answer is text")
        if not "".join(m["content"] for m in msgs).strip():
            raise DroppedPair(EMPTY_RESPONSE, f"{field} is empty")
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                raise DroppedPair(WRONG_TYPES, f"{field} reply {i} is a {m['role']} turn, "
                                               "expected assistant turns only")
    if chosen == rejected:
        raise DroppedPair(SAME_RESPONSES)
