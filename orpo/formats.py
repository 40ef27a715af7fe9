"""Raw dataset rows → `PreferencePair` (message lists), for every supported shape.

(helper: to be completed)
"""
from __future__ import annotations

from dataclasses import dataclass

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
