"""An Ollama `Modelfile` for an exported GGUF: `FROM ./model.gguf`, the chat template in Ollama's Go
template syntax, the default system prompt and `PARAMETER stop` lines for the end-of-turn tokens.

Ollama cannot run a Jinja chat template, so the template is recognised, not translated: a chat format
(ChatML for SmolLM2 and Qwen, Llama 3's headers) is taken only if the tokenizer's own template renders
probe conversations (with and without a system message, several turns) to exactly what the format
renders, so the Go template that Ollama fills is known to produce the prompts the model was trained on.
A default system prompt the template adds when a conversation has none (SmolLM2's) becomes `SYSTEM`,
which Ollama uses the same way. A template of no known format gets no TEMPLATE line, and the caller is
told so (Ollama then picks a template itself from the one stored in the GGUF).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orpo.data.render import TEMPLATE_ERRORS, adds_bos, stop_token_ids


@dataclass(frozen=True)
class ChatFormat:
    """A chat format both sides can express: `render` is what Ollama's `go_template` produces for a
    conversation (messages, then the assistant's turn opened), `end_of_turn` the token closing a turn."""

    name: str
    render: Callable[[list[dict]], str]
    go_template: str
    end_of_turn: str


CHATML = ChatFormat(
    name="ChatML",
    render=lambda messages: "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    + "<|im_start|>assistant\n",
    go_template=("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n"),
    end_of_turn="<|im_end|>",
)

LLAMA3 = ChatFormat(
    name="Llama 3",
    render=lambda messages: "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                                    for m in messages) + "<|start_header_id|>assistant<|end_header_id|>\n\n",
    go_template=("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
                 "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    end_of_turn="<|eot_id|>",
)

CHAT_FORMATS = (CHATML, LLAMA3)

PROBES = (
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "What is 2 + 2?"}],
)
"""Conversations the tokenizer's template and a format must render alike (the generation prompt on)."""


@dataclass(frozen=True)
class Recognised:
    """The chat format a tokenizer's template is, and what Ollama needs besides: the default system
    prompt (None: the template adds none) and the BOS text the template writes itself where the
    tokenizer does not add it (then the Go template writes it too)."""

    format: ChatFormat
    default_system: str | None
    bos_text: str


def recognise_chat_format(tokenizer) -> Recognised | None:
    """The format of CHAT_FORMATS that `tokenizer.chat_template` renders every probe exactly like, or None.

    A leading BOS is compared apart: when the tokenizer adds BOS itself (llama.cpp does too, from the
    GGUF's add_bos flag) the template's BOS text is left out of the comparison, and otherwise the Go
    template has to write it."""
    if not tokenizer.chat_template:
        return None
    try:
        rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROBES]
    except TEMPLATE_ERRORS:
        return None
    bos = tokenizer.bos_token or ""
    for chat_format in CHAT_FORMATS:
        for bos_text in dict.fromkeys(["", bos]):
            if not all(text.startswith(bos_text) for text in rendered):
                continue
            texts = [text[len(bos_text):] for text in rendered]
            default = default_system_prompt(chat_format, texts[1], PROBES[1])
            if default is False:
                continue
            with_default = [p if p[0]["role"] == "system" or default is None
                            else [{"role": "system", "content": default}, *p] for p in PROBES]
            if all(chat_format.render(p) == text for p, text in zip(with_default, texts)):
                return Recognised(chat_format, default, "" if bos_text and adds_bos(tokenizer) else bos_text)
    return None


def default_system_prompt(chat_format: ChatFormat, rendered: str, messages: list[dict]) -> str | None | bool:
    """The system prompt a template inserted into `rendered` (its rendering of `messages`, which have none):
    None if it inserted none, False if `rendered` is not this format with or without one."""
    if rendered == chat_format.render(messages):
        return None
    marker = "\x00system\x00"
    before, after = chat_format.render([{"role": "system", "content": marker}, *messages]).split(marker)
    if rendered.startswith(before) and rendered.endswith(after) and len(rendered) >= len(before) + len(after):
        return rendered[len(before):len(rendered) - len(after)]
    return False


def modelfile_text(gguf_name: str, tokenizer) -> tuple[str, list[str]]:
    """The Modelfile for `gguf_name` (a file in the Modelfile's directory) and notes for the user (why
    there is no TEMPLATE). Stop lines: the tokenizer's end-of-turn and EOS tokens (`stop_token_ids`)."""
    lines = ["# Ollama Modelfile written by `orpo export`: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    notes = []
    recognised = recognise_chat_format(tokenizer)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    if recognised is None:
        notes.append("no TEMPLATE in the Modelfile: the chat template is none that orpo writes in Ollama's syntax "
                     f"({', '.join(f.name for f in CHAT_FORMATS)}); Ollama picks one from the GGUF's chat template")
    else:
        lines.append(f'TEMPLATE """{recognised.bos_text}{recognised.format.go_template}"""')
        if recognised.default_system is not None:
            lines.append(f'SYSTEM """{recognised.default_system}"""')
        stops.insert(0, recognised.format.end_of_turn)
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops) if stop]
    return "\n".join(lines) + "\n", notes


def write_modelfile(gguf_path: str | Path, tokenizer) -> tuple[Path, list[str]]:
    """Write `Modelfile` beside the GGUF file (its FROM is relative to it); return its path and the notes."""
    gguf_path = Path(gguf_path)
    text, notes = modelfile_text(gguf_path.name, tokenizer)
    path = gguf_path.parent / "Modelfile"
    path.write_text(text)
    return path, notes


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def export_for_llama_cpp(model_dir: str | Path, gguf: str | Path, outtype: str = "f16",
                         modelfile: bool = True) -> tuple[list[str], list[str]]:
    """The model in `model_dir` written as the GGUF file `gguf` (gguf.export_gguf; matrices in `outtype`) and,
    unless `modelfile` is False, the Ollama Modelfile beside it: what `orpo export --gguf` and the end of
    `orpo train --export_gguf` do. Returns (one line per file written, the Modelfile's notes)."""
    from orpo.export.gguf import export_gguf
    from orpo.train.models import load_tokenizer

    exported = export_gguf(Path(model_dir).expanduser().resolve(), gguf, outtype)
    lines = [f"{exported.path}: {megabytes(exported.size)}, {exported.outtype}, {exported.architecture}, "
             f"{exported.tensors} tensors" + ("" if exported.chat_template else ", no chat template")]
    notes = []
    if modelfile:
        path, notes = write_modelfile(exported.path, load_tokenizer(str(model_dir)))
        lines.append(f"{path}: ollama create NAME -f {path}")
    return lines, notes
