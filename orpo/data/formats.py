"""Raw dataset rows → `PreferencePair` (message lists), for every supported shape.

Shapes, detected per row (so one dataset may mix them):

a. prompt/chosen/rejected strings:
   {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
b. conversational: a prompt message list ending with a non-assistant turn, and assistant replies
   (a list of assistant messages, one message dict, or a plain string):
   {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "chosen": [{"role": "assistant", ...}], ...}
c. whole conversations (UltraFeedback-binarized): chosen/rejected repeat the prompt turns; the shared
   leading turns become the prompt (a prompt column, if any, is ignored):
   {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", ...}], ...}
d. implicit prompt (no prompt column): full texts sharing their beginning, HH-RLHF style
   {"chosen": "\\n\\nHuman: Hi?\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Hi?\\n\\nAssistant: No."}
   or plain texts whose longest common prefix (cut back to a whitespace boundary) is the prompt.

Rows that cannot be trained on raise `DroppedPair` with one of the reasons in `orpo.errors`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from orpo.errors import EMPTY_RESPONSE, SAME_RESPONSES, WRONG_TYPES, DroppedPair, OrpoError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class PreferencePair:
    """One preference example as chat messages.

    prompt:   the conversation up to the answer (system/user/earlier assistant turns), ends with a
              non-assistant turn.
    chosen:   the preferred assistant turn(s).
    rejected: the dispreferred assistant turn(s).
    index:    the row number in the source dataset (0-based), for error messages and per-pair output.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    index: int = 0


ROLES = ("system", "user", "assistant")
_SHAPES = ("prompt/chosen/rejected strings, conversational message lists, or chosen/rejected only "
           "(implicit shared prompt); use --prompt_column/--chosen_column/--rejected_column for other names")
# "\n\nHuman:" / "\n\nAssistant:" start a turn; the first one may also open the text without "\n\n".
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def detect_columns(column_names: list[str], prompt_column: str | None = None,
                   chosen_column: str | None = None, rejected_column: str | None = None,
                   source: str = "dataset") -> tuple[str | None, str, str]:
    """Return (prompt column or None for implicit-prompt data, chosen column, rejected column).

    Raises `OrpoError` (one line) when a user-given column or the chosen/rejected column is missing.
    """
    columns = list(column_names)
    wanted = [chosen_column or "chosen", rejected_column or "rejected"]
    if prompt_column is not None:  # only a name the user asked for must exist
        wanted.insert(0, prompt_column)
    for name in wanted:
        if name not in columns:
            raise OrpoError(f"{source}: missing column {name!r}; columns found: {columns}; "
                            f"accepted shapes: {_SHAPES}")
    prompt = prompt_column or ("prompt" if "prompt" in columns else None)
    return prompt, wanted[-2], wanted[-1]


def _kind(value) -> str:
    return "None" if value is None else type(value).__name__


def _messages(value, field: str, role: str) -> list[Message]:
    """A string → one `role` message; a message dict or a list of them → normalised {role, content}."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise DroppedPair(WRONG_TYPES, f"{field} is {_kind(value)}, expected a string or a list of messages")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or "role" not in m:
            raise DroppedPair(WRONG_TYPES, f"{field}[{i}] is {_kind(m)}, expected a message with role and content")
        if m["role"] not in ROLES:
            raise DroppedPair(WRONG_TYPES, f"{field}[{i}] has role {m['role']!r}, expected system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise DroppedPair(WRONG_TYPES, f"{field}[{i}] content is {_kind(m.get('content'))}, expected a string")
        out.append({"role": m["role"], "content": m["content"]})  # drop extra keys (name, tool ids...)
    return out


def _is_conversation(messages: list[Message]) -> bool:
    """A reply list that starts with a non-assistant turn repeats the prompt (shapes c, d)."""
    return bool(messages) and messages[0]["role"] != "assistant"


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


def _common_prefix_split(chosen: str, rejected: str) -> tuple[list, list, list]:
    """Plain implicit-prompt texts: the longest common prefix, cut back after whitespace, is the prompt."""
    prefix = os.path.commonprefix([chosen, rejected])
    # Cut back so a word shared only partly ("ca" of "cat"/"car") stays in the replies.
    cut = max((i + 1 for i, ch in enumerate(prefix) if ch.isspace()), default=0)
    prompt = prefix[:cut].strip()
    if not prompt:
        raise DroppedPair(WRONG_TYPES, "no prompt column, and chosen and rejected share no leading text "
                                       "or \\n\\nHuman:/\\n\\nAssistant: turns to use as the prompt")
    return ([{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen[cut:].strip()}],
            [{"role": "assistant", "content": rejected[cut:].strip()}])


def _check_replies(chosen: list[Message], rejected: list[Message]) -> None:
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not "".join(m["content"] for m in msgs).strip():
            raise DroppedPair(EMPTY_RESPONSE, f"{field} is empty")
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                raise DroppedPair(WRONG_TYPES, f"{field} reply {i} is a {m['role']} turn, expected assistant turns only")
    if chosen == rejected:
        raise DroppedPair(SAME_RESPONSES)


def row_to_pair(row: dict, index: int, prompt_col: str | None, chosen_col: str,
                rejected_col: str) -> PreferencePair:
    """Turn one row into a `PreferencePair`; raises `DroppedPair` for rows that cannot be trained on."""
    chosen_raw, rejected_raw = row.get(chosen_col), row.get(rejected_col)
    if prompt_col is None and isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        if not chosen_raw.strip() or not rejected_raw.strip():
            raise DroppedPair(EMPTY_RESPONSE, f"{'chosen' if not chosen_raw.strip() else 'rejected'} is empty")
        if chosen_raw.strip() == rejected_raw.strip():
            raise DroppedPair(SAME_RESPONSES)
        hh_chosen, hh_rejected = _hh_turns(chosen_raw), _hh_turns(rejected_raw)
        if hh_chosen is None or hh_rejected is None:
            prompt, chosen, rejected = _common_prefix_split(chosen_raw, rejected_raw)
        else:
            prompt, chosen, rejected = _split_conversations(hh_chosen, hh_rejected)
    else:
        chosen = _messages(chosen_raw, "chosen", "assistant")
        rejected = _messages(rejected_raw, "rejected", "assistant")
        if _is_conversation(chosen) and _is_conversation(rejected):
            prompt, chosen, rejected = _split_conversations(chosen, rejected)
        elif _is_conversation(chosen) or _is_conversation(rejected):
            raise DroppedPair(WRONG_TYPES, "one of chosen/rejected is a whole conversation and the other is not")
        elif prompt_col is None:
            raise DroppedPair(WRONG_TYPES, "no prompt column, and chosen/rejected are assistant replies "
                                           "without the prompt turns")
        else:
            prompt = _messages(row.get(prompt_col), "prompt", "user")
    if not "".join(m["content"] for m in prompt).strip():
        raise DroppedPair(WRONG_TYPES, "prompt is empty")
    if prompt[-1]["role"] == "assistant":
        raise DroppedPair(WRONG_TYPES, "prompt ends with an assistant turn, expected a user or system turn")
    _check_replies(chosen, rejected)
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, index=index)
