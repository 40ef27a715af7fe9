"""PreferencePair + tokenizer → TokenizedPair through the chat template.

(helper: to be completed)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair in the prefix-shared layout [prompt | chosen | rejected].

    prompt_ids:   the rendered prompt up to and including the generation prompt (BOS once, at the start
                  if the tokenizer uses one).
    chosen_ids:   the chosen assistant turn up to and including its end-of-turn token; never empty.
    rejected_ids: the same for the rejected turn; never empty.
    index:        the source row (0-based).
    Every chosen/rejected token is a training target; prompt tokens are NLL targets only when
    nll_scope == "full".
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = 0
