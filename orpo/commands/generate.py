"""`orpo generate`: answers of one or two models to the same prompts, side by side (jsonl + HTML).

Prompts come from a JSON-lines file: `{"prompt": "..."}`, `{"prompt": [messages]}`, or MT-Bench's
`{"question_id": 81, "turns": ["...", ...]}` (the first turn); for a vision-language model a prompt may
have `images` (paths relative to the file, placed as in training data: formats.py). Each prompt is
encoded exactly as training encodes it (`render.encode_prompt`, with its images the processor's
`render.encode_image_prompt`); an answer ends at EOS or the chat template's end of turn
(`render.stop_token_ids`); decoding is greedy unless `temperature > 0`.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from orpo.data.formats import IMAGE_COLUMNS, IMAGE_PART, prompt_images
from orpo.data.images import is_processor, read_image_files, text_tokenizer
from orpo.data.render import encode_image_prompt, encode_prompt, stop_token_ids
from orpo.errors import DroppedPair, OrpoError
from orpo.ops.forward import is_encoder_decoder
from orpo.ops.vision import reference_inputs


def read_prompts(path: str) -> list[dict]:
    """[{"id": ..., "messages": [...]}] from a JSON-lines file (shapes in the module docstring)."""
    prompts = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as err:
        raise OrpoError(f"{path}: cannot open ({err.strerror})") from None
    with f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise OrpoError(f"{path}, line {n}: invalid JSON ({err.msg})") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if prompt is None and isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
                prompt = row["turns"][0]
            if isinstance(prompt, str):
                messages = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
                messages = prompt
            else:
                raise OrpoError(f"{path}, line {n}: expected a 'prompt' (text or messages) or MT-Bench 'turns'")
            try:
                messages, images = prompt_images(messages, row, next((c for c in IMAGE_COLUMNS if c in row), None))
                images = read_image_files(images, Path(path).resolve().parent)
            except DroppedPair as problem:
                raise OrpoError(f"{path}, line {n}: {problem.detail}") from None
            prompts.append({"id": row.get("question_id", row.get("id", n - 1)), "messages": messages, "images": images})
    if not prompts:
        raise OrpoError(f"{path}: no prompts")
    return prompts


def sample_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The sampling seed of one answer: sample `sample` (0, 1, ...) of the prompt at `prompt_index` in its prompts
    file, under the run's `seed`. It depends on nothing else (not the model, the batch or the other prompts), so two
    models and two runs sample each (prompt, sample) from the same seed; mixed by numpy's SeedSequence, so nearby
    triples give unrelated seeds. In [0, 2**63)."""
    return int(np.random.SeedSequence([seed, prompt_index, sample]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def expand_samples(prompts: list[dict], samples: int, seed: int) -> list[dict]:
    """Each prompt `samples` times, in order (prompt 0's samples first), each copy with its "sample" index and its
    "seed" (`sample_seed` of its position in `prompts`)."""
    return [{**prompt, "sample": s, "seed": sample_seed(seed, i, s)}
            for i, prompt in enumerate(prompts) for s in range(samples)]


def generate_kwargs(model, tokenizer, temperature: float) -> dict:
    """`model.generate` arguments shared by generate and chat: stop at EOS or the end of turn,
    pad with the pad token, greedy at temperature 0 and sampling above."""
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    words = text_tokenizer(tokenizer)
    return dict(eos_token_id=stop_token_ids(words, model.generation_config), pad_token_id=words.pad_token_id,
                **sampling)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[dict], max_new_tokens: int, temperature: float,
                     seed: int, batch_size: int) -> list[str]:
    """One answer per prompt (left-padded batches; only the new tokens are decoded). A prompt with images
    (`tokenizer`: the model's processor) is generated alone, with its images' inputs. An encoder-decoder model
    (T5, BART) reads the prompt with its encoder (right-padded) and returns only its decoder's tokens."""
    torch.manual_seed(seed)
    model.eval()
    kwargs = generate_kwargs(model, tokenizer, temperature)
    words = text_tokenizer(tokenizer)
    answers = [None] * len(prompts)
    text_only = [i for i, p in enumerate(prompts) if not p.get("images")]
    encoder_decoder = is_encoder_decoder(model)
    side = "right" if encoder_decoder else "left"  # a decoder-only model continues the prompt's last token
    for start in range(0, len(text_only), batch_size):
        chunk = text_only[start : start + batch_size]
        batch = [{"input_ids": encode_prompt(tokenizer, prompts[i]["messages"])} for i in chunk]
        inputs = words.pad(batch, padding_side=side, return_tensors="pt").to(model.device)  # own side untouched
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        new = words.batch_decode(output if encoder_decoder else output[:, inputs["input_ids"].shape[1] :],
                                 skip_special_tokens=True)
        for i, text in zip(chunk, new):
            answers[i] = text.strip()
    for i, prompt in enumerate(prompts):
        if prompt.get("images"):
            if not is_processor(tokenizer):
                raise OrpoError(f"prompt {prompt['id']} has images, and the model is text-only (its tokenizer has no "
                                "image processor)")
            ids, vision_inputs = encode_image_prompt(tokenizer, prompt["messages"], prompt["images"])
            input_ids = torch.tensor([ids])
            inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                      **reference_inputs(model, input_ids, vision_inputs)}  # as its processor would batch it
            inputs = {key: value.to(model.device) for key, value in inputs.items()}
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
            answers[i] = words.decode(output[0, len(ids):], skip_special_tokens=True).strip()
    return answers


def prompt_text(messages: list[dict]) -> str:
    """The last message's text for the side-by-side table, an image part shown as <image>."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join("<image>" if part == IMAGE_PART else part.get("text", "") for part in content)


def write_side_by_side(records: list[dict], models: list[str], jsonl_path: str, html_path: str) -> None:
    """records: {"id", "prompt", "answers": {model: text}} → one JSON line each, and an HTML table."""
    with open(jsonl_path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows = "".join(
        f"<tr><td>{html.escape(str(r['id']))}</td><td>{html.escape(r['prompt'])}</td>"
        + "".join(f"<td>{html.escape(r['answers'][m])}</td>" for m in models) + "</tr>"
        for r in records
    )
    with open(html_path, "w") as f:
        f.write(f"""<!doctype html><html><head><meta charset="utf-8"><title>orpo generations</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:6px;
vertical-align:top;white-space:pre-wrap;max-width:45em}}</style></head><body>
<table><tr><th>id</th><th>prompt</th>{head}</tr>{rows}</table></body></html>
""")
