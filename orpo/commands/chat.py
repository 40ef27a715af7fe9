"""`orpo chat MODEL`: a small interactive loop for trying a model through its chat template.

Each line typed is a user turn; the answer streams back as it is generated and joins the history,
so the next turn sees the whole conversation. Commands: `/reset` forgets the history, `/system TEXT`
sets a system prompt (and resets), `/exit` or end of input stops. When the conversation no longer
fits the model's context (`max_position_embeddings − max_new_tokens` prompt tokens), the oldest
exchanges are dropped, with a notice. Prompts are encoded as in training and decoding is that of
`orpo generate` (greedy unless `temperature > 0`, stopping at EOS or the end of turn): the same seeded sampler,
answer n of the session (0, 1, ...) sampled from `sample_seed(seed, n, 0)`, so a session replayed with the same
lines and seed answers the same.
"""
from __future__ import annotations

from typing import Iterable, TextIO

import torch
from transformers import TextStreamer

from orpo.commands.generate import generate_kwargs, sample_seed
from orpo.data.render import TEMPLATE_ERRORS, encode_prompt, template_error_message
from orpo.ops.forward import is_encoder_decoder

HELP = "commands: /reset (forget the conversation), /system TEXT (new system prompt), /exit"


def fit_history(tokenizer, messages: list[dict], max_prompt_tokens: int | None) -> tuple[list[dict], list[int], int]:
    """(messages, prompt ids, exchanges dropped): the oldest user/assistant exchanges after an
    optional leading system message are removed until the prompt has ≤ max_prompt_tokens tokens.
    The last user message is never removed, so the prompt can still be too long: the caller checks."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    dropped = 0
    while True:
        ids = encode_prompt(tokenizer, head + turns)
        if max_prompt_tokens is None or len(ids) <= max_prompt_tokens or len(turns) <= 1:
            return head + turns, ids, dropped
        turns, dropped = turns[2:], dropped + 1


class _StreamTo(TextStreamer):
    """transformers' TextStreamer, writing to `out` instead of stdout."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


@torch.no_grad()
def chat_loop(model, tokenizer, lines: Iterable[str], out: TextIO, system: str | None = None,
              max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0, echo: bool = False) -> list[dict]:
    """Answer each line of `lines` in turn (commands in the module docstring); returns the history.
    `echo` writes each line to `out` as `you> line` first (for piped input, which a terminal does not show)."""
    model.eval()
    context = getattr(model.config, "max_position_embeddings", None)
    max_prompt_tokens = context - max_new_tokens if context else None
    answered = 0
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if echo:
            out.write(f"you> {text}\n")
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            out.write("(conversation reset)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip()
            start = [{"role": "system", "content": system}] if system else []
            messages = list(start)
            out.write(f"(system prompt {'set' if system else 'removed'}; conversation reset)\n")
            continue
        if text.startswith("/"):
            out.write(f"(unknown command {text.split()[0]}; {HELP})\n")
            continue
        try:
            fitted, ids, dropped = fit_history(tokenizer, messages + [{"role": "user", "content": text}],
                                               max_prompt_tokens)
        except TEMPLATE_ERRORS as err:  # e.g. a template that refuses system messages
            out.write(f"(the chat template refused the conversation: {template_error_message(err)}; "
                      "try /reset or /system)\n")
            continue
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:  # the history stays as it was
            out.write(f"(message not sent: {len(ids)} prompt tokens, the model takes {max_prompt_tokens} "
                      f"with max_new_tokens {max_new_tokens})\n")
            continue
        if dropped:
            out.write(f"(dropped the {dropped} oldest exchange{'s' * (dropped > 1)} to fit the context)\n")
        messages = fitted
        kwargs = generate_kwargs(model, tokenizer, temperature, [sample_seed(seed, answered, 0)])
        output = model.generate(torch.tensor([ids], device=model.device),
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                                max_new_tokens=max_new_tokens, streamer=_StreamTo(tokenizer, out), **kwargs)
        new = output[0] if is_encoder_decoder(model) else output[0, len(ids):]  # T5, BART: the decoder's tokens
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        answered += 1
    return messages
