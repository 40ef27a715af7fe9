"""`orpo generate`: answers of one or two models to the same prompts, side by side (jsonl + HTML).

Prompts come from a JSON-lines file: `{"prompt": "..."}`, `{"prompt": [messages]}`, or MT-Bench's
`{"question_id": 81, "turns": ["...", ...]}` (the first turn). Each prompt is encoded exactly as
training encodes it (`render.encode_prompt`); an answer ends at EOS or the chat template's end of
turn (`render.stop_token_ids`); decoding is greedy unless `temperature > 0`.
"""
from __future__ import annotations

import html
import json

import torch

from orpo.data.render import encode_prompt, stop_token_ids
from orpo.errors import OrpoError


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
            prompts.append({"id": row.get("question_id", row.get("id", n - 1)), "messages": messages})
    if not prompts:
        raise OrpoError(f"{path}: no prompts")
    return prompts


def generate_kwargs(model, tokenizer, temperature: float) -> dict:
    """`model.generate` arguments shared by generate and chat: stop at EOS or the end of turn,
    pad with the pad token, greedy at temperature 0 and sampling above."""
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    return dict(eos_token_id=stop_token_ids(tokenizer, model.generation_config),
                pad_token_id=tokenizer.pad_token_id, **sampling)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[dict], max_new_tokens: int, temperature: float,
                     seed: int, batch_size: int) -> list[str]:
    """One answer per prompt (left-padded batches; only the new tokens are decoded)."""
    torch.manual_seed(seed)
    model.eval()
    kwargs = generate_kwargs(model, tokenizer, temperature)
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = [{"input_ids": encode_prompt(tokenizer, p["messages"])} for p in prompts[start : start + batch_size]]
        inputs = tokenizer.pad(batch, padding_side="left", return_tensors="pt").to(model.device)  # own side untouched
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        new = output[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


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
