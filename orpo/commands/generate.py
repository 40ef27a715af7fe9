"""`orpo generate`: answers of one or two models to the same prompts, side by side (jsonl + HTML).

Prompts come from a JSON-lines file: `{"prompt": "..."}`, `{"prompt": [messages]}`, or MT-Bench's
`{"question_id": 81, "turns": ["...", ...]}` (the first turn); for a vision-language model a prompt may
have `images` (paths relative to the file, placed as in training data: formats.py). Each prompt is
encoded exactly as training encodes it (`render.encode_prompt`, with its images the processor's
`render.encode_image_prompt`); an answer ends at EOS or the chat template's end of turn
(`render.stop_token_ids`); decoding is greedy unless `temperature > 0`.

Sampling is seeded per answer: each prompt dict's `"seed"` (default `sample_seed(seed, i, 0)` for the prompt at
position i) alone decides its tokens, whatever prompts share its batch and wherever it sits in it. `model.generate`
runs its greedy loop and `SeededGumbelSampler` turns it into sampling: argmax(logits / T + Gumbel noise) is a sample
of softmax(logits / T) (the Gumbel-max trick), the noise of each row drawn from that row's own `torch.Generator`.
Only the temperature shapes the distribution (no top-k / top-p, the model's generation_config sampling settings
are not applied), as in the ORPO paper's evaluation (T = 1.0).
"""
from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from orpo.data.formats import IMAGE_COLUMNS, IMAGE_PART, prompt_images
from orpo.data.images import is_processor, read_image_files, text_tokenizer
from orpo.data.render import encode_image_prompt, encode_prompt, stop_token_ids
from orpo.errors import DroppedPair, OrpoError
from orpo.ops.forward import is_encoder_decoder
from orpo.ops.vision import reference_inputs
from orpo.train.precision import bf16_autocast
from orpo.train.progress import CountProgress

logger = logging.getLogger("orpo")


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


class SeededGumbelSampler(LogitsProcessor):
    """A logits processor that makes `model.generate`'s greedy step (argmax) sample, row by row from its own seed.

    scores [batch, vocab] → scores / T + G, G[b, v] = −log(−log U[b, v]), U uniform in (0, 1) drawn from row b's
    `torch.Generator` (seeded with `seeds[b]`, on the scores' device, `vocab` numbers per step). argmax over v of
    logits / T + G is distributed as softmax(logits / T) (Gumbel-max), so row b's sampled tokens depend on its seed,
    its prompt and the model only: not on its batch-mates or its place in the batch. The temperature is
    transformers' own `TemperatureLogitsWarper`; processors the model's generation_config adds (a repetition
    penalty, ...) run before this one, as they run before the temperature when sampling."""

    def __init__(self, seeds: list[int], temperature: float):
        self.seeds = list(seeds)
        self.temperature = TemperatureLogitsWarper(temperature)
        self.generators: list[torch.Generator] | None = None  # made at the first step, on the scores' device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if len(self.seeds) != scores.shape[0]:
            raise ValueError(f"{len(self.seeds)} seeds for a batch of {scores.shape[0]} rows")
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float32)
                               for g in self.generators])
        tiny = torch.finfo(torch.float32).tiny  # rand can return 0: keep log(0) out
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=tiny)))
        return self.temperature(input_ids, scores.float()) + gumbel


def generate_kwargs(model, tokenizer, temperature: float, seeds: list[int] | None = None) -> dict:
    """`model.generate` arguments shared by generate and chat: stop at EOS or the end of turn, pad with the pad
    token, greedy at temperature 0; above it, row b sampled from `seeds[b]` (`SeededGumbelSampler`, in
    generate's greedy loop: `do_sample=False` is the argmax over the sampler's scores)."""
    words = text_tokenizer(tokenizer)
    kwargs = dict(eos_token_id=stop_token_ids(words, model.generation_config), pad_token_id=words.pad_token_id,
                  do_sample=False)
    if temperature > 0:
        if seeds is None:
            raise ValueError("sampling (temperature > 0) needs one seed per row")
        kwargs["logits_processor"] = LogitsProcessorList([SeededGumbelSampler(seeds, temperature)])
    return kwargs


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[dict], max_new_tokens: int, temperature: float,
                     seed: int, batch_size: int, bf16: bool = False,
                     progress: str | Callable[[int, int], None] | None = None) -> list[str]:
    """One answer per prompt dict, in order. Text prompts are batched `batch_size` at a time in order of their
    encoded length, longest first (left-padded; only the new tokens are decoded). A prompt with images
    (`tokenizer`: the model's processor) is generated alone, with its images' inputs. An encoder-decoder model
    (T5, BART) reads the prompt with its encoder (right-padded) and returns only its decoder's tokens.

    At `temperature > 0` prompt i is sampled from its `"seed"` (default `sample_seed(seed, i, 0)`), the same
    answer whatever the batch (see the module docstring). `bf16`: generate under bf16 autocast on the model's
    device type (fp32 weights kept). `progress`: a label to log progress under (`train/progress.CountProgress`), or a
    callable(done, total) called after each batch."""
    model.eval()
    words = text_tokenizer(tokenizer)
    seeds = [p["seed"] if "seed" in p else sample_seed(seed, i, 0) for i, p in enumerate(prompts)]
    answers = [None] * len(prompts)
    encoder_decoder = is_encoder_decoder(model)
    side = "right" if encoder_decoder else "left"  # a decoder-only model continues the prompt's last token
    for i, prompt in enumerate(prompts):  # before the first batch: a whole run is not lost to the last prompt
        if prompt.get("images") and not is_processor(tokenizer):
            raise OrpoError(f"prompt {prompt.get('id', i)} has images, and the model is text-only (its tokenizer has no "
                            "image processor)")
    encoded = {i: encode_prompt(tokenizer, p["messages"]) for i, p in enumerate(prompts) if not p.get("images")}
    # similar lengths share a batch (little padding); longest first, so a batch that does not fit memory fails early
    by_length = sorted(encoded, key=lambda i: -len(encoded[i]))
    report = CountProgress(progress, "answers") if isinstance(progress, str) else progress
    done = 0
    autocast = bf16_autocast(model.device, bf16)
    for start in range(0, len(by_length), batch_size):
        chunk = by_length[start : start + batch_size]
        batch = [{"input_ids": encoded[i]} for i in chunk]
        inputs = words.pad(batch, padding_side=side, return_tensors="pt").to(model.device)  # own side untouched
        kwargs = generate_kwargs(model, tokenizer, temperature, [seeds[i] for i in chunk])
        with autocast:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        new = words.batch_decode(output if encoder_decoder else output[:, inputs["input_ids"].shape[1] :],
                                 skip_special_tokens=True)
        for i, text in zip(chunk, new):
            answers[i] = text.strip()
        done += len(chunk)
        if report:
            report(done, len(prompts))
    for i, prompt in enumerate(prompts):
        if prompt.get("images"):
            ids, vision_inputs = encode_image_prompt(tokenizer, prompt["messages"], prompt["images"])
            input_ids = torch.tensor([ids])
            inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                      **reference_inputs(model, input_ids, vision_inputs)}  # as its processor would batch it
            inputs = {key: value.to(model.device) for key, value in inputs.items()}
            with autocast:
                output = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                        **generate_kwargs(model, tokenizer, temperature, [seeds[i]]))
            answers[i] = words.decode(output[0, len(ids):], skip_special_tokens=True).strip()
            done += 1
            if report:
                report(done, len(prompts))
    return answers


def prompt_text(messages: list[dict]) -> str:
    """The last message's text for the side-by-side table, an image part shown as <image>."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join("<image>" if part == IMAGE_PART else part.get("text", "") for part in content)


def write_side_by_side(records: list[dict], models: list[str], jsonl_path: str, html_path: str) -> None:
    """records: {"id", "sample", "seed", "prompt" (the last message's text), "messages" (the whole prompt), "answers":
    {model: text}} → one JSON line each, and an HTML
    table (a sample column where a prompt has more than one). Missing directories are made (the command checked
    that the nearest existing one takes files)."""
    for path in (jsonl_path, html_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl_path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    samples = any(r.get("sample", 0) > 0 for r in records)
    head = "<th>sample</th>" * samples + "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows = "".join(
        f"<tr><td>{html.escape(str(r['id']))}</td><td>{html.escape(r['prompt'])}</td>"
        + f"<td>{r.get('sample', 0)}</td>" * samples
        + "".join(f"<td>{html.escape(r['answers'][m])}</td>" for m in models) + "</tr>"
        for r in records
    )
    with open(html_path, "w") as f:
        f.write(f"""<!doctype html><html><head><meta charset="utf-8"><title>orpo generations</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:6px;
vertical-align:top;white-space:pre-wrap;max-width:45em}}</style></head><body>
<table><tr><th>id</th><th>prompt</th>{head}</tr>{rows}</table></body></html>
""")
