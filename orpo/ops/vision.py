"""Images in a batch: each pair's image inputs in layout order, and the multimodal rotary positions.

A vision-language model (transformers' image-text-to-text models: Qwen2-VL, LLaVA, ...) takes,
beside `input_ids`, the image processor's tensors for the images whose placeholder tokens the ids
hold (`pixel_values` and, per family, `image_grid_thw`, `image_sizes`, ...). It encodes the images
and writes their embeddings into the placeholder positions in the order the placeholders appear,
row by row. So a batch holds the image inputs of its pairs concatenated in the order the pairs'
prompts appear in it (`concat_vision_inputs`): in the prefix-shared layout each prompt appears once,
so each image is encoded once per pair; the padded layout lays a prompt out twice, its images too.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and GLM-4V) rotate with M-RoPE: three position ids per token (time,
height, width); image tokens take their grid coordinates, and text after an image continues from the
largest position before it. `rope_index_of` wraps the model's own `get_rope_index`, and
`pair_rope_positions` asks it for [prompt | chosen] and for [prompt | rejected], each as a full
sequence, and lays those out as the pair's [prompt | chosen | rejected]: the positions the model
gives each sequence, by construction.
"""
from __future__ import annotations

from typing import Callable

import torch

VISION_PREFIX = "vision_"  # batch keys of the image inputs: "vision_pixel_values", ...

RopeIndex = Callable[[list[int], dict | None], torch.Tensor]  # ids, a pair's vision inputs → [3, len(ids)]


def concat_vision_inputs(parts: list[dict]) -> dict[str, torch.Tensor]:
    """The image inputs of several prompts, in batch order, as one set: each tensor concatenated along
    its first dimension (images, or image patches for Qwen2-VL's flattened `pixel_values`). Keys are
    prefixed with `VISION_PREFIX`. Every part must hold the same keys; [] or no image inputs → {}."""
    parts = [part for part in parts if part]
    if not parts:
        return {}
    keys = sorted(parts[0])
    if any(sorted(part) != keys for part in parts):
        raise ValueError(f"image inputs of one batch must have the same keys, got {[sorted(p) for p in parts]}")
    return {VISION_PREFIX + key: torch.cat([part[key] for part in parts], dim=0) for key in keys}


def vision_model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model-call keyword arguments of a batch's image inputs (the prefix removed)."""
    return {key[len(VISION_PREFIX):]: value for key, value in batch.items() if key.startswith(VISION_PREFIX)}


def mm_token_type_ids(ids: torch.Tensor, config) -> torch.Tensor:
    """Per token 0 (text), 1 (image placeholder) or 2 (video placeholder), from the model config's
    `image_token_id` / `video_token_id`: what Qwen-VL processors return as `mm_token_type_ids`."""
    types = torch.zeros_like(ids, dtype=torch.int32)
    for kind, name in ((1, "image_token_id"), (2, "video_token_id")):
        token = getattr(config, name, None)
        if token is not None:
            types[ids == token] = kind
    return types


def reference_inputs(model: torch.nn.Module, ids: torch.Tensor, vision_inputs: dict | None) -> dict:
    """Keyword arguments, beside `input_ids`, that make `model` read a batch-of-one sequence `ids`
    [1, L] with the images of `vision_inputs` as its processor would have it read them (the model then
    computes its own positions): the image tensors, and `mm_token_type_ids` for M-RoPE models."""
    if not vision_inputs:
        return {}
    inputs = dict(vision_inputs)
    if _rope_index_method(model) is not None:
        inputs["mm_token_type_ids"] = mm_token_type_ids(ids, model.config)
    return inputs


def _rope_index_method(model: torch.nn.Module):
    """The model's `get_rope_index` (on the model or its inner `.model`), or None: no M-RoPE."""
    for owner in (model, getattr(model, "model", None)):
        method = getattr(owner, "get_rope_index", None)
        if callable(method):
            return method
    return None


def rope_index_of(model: torch.nn.Module) -> RopeIndex | None:
    """For an M-RoPE model (a `get_rope_index` method), a function (ids, vision inputs) → [3, len(ids)]
    int64 position ids of that one sequence, computed by the model's own method; None otherwise
    (one position per token, 0..len−1, as text models)."""
    method = _rope_index_method(model)
    if method is None:
        return None
    config = model.config

    def rope_index(ids: list[int], vision_inputs: dict | None) -> torch.Tensor:
        row = torch.tensor([ids], dtype=torch.long)
        vision_inputs = vision_inputs or {}
        grids = {key: vision_inputs[key].cpu() for key in ("image_grid_thw", "video_grid_thw") if key in vision_inputs}
        positions, _ = method(row, mm_token_type_ids=mm_token_type_ids(row, config), **grids)
        return positions[:, 0].long()

    return rope_index


def pair_rope_positions(rope_index: RopeIndex, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
                        vision_inputs: dict | None) -> torch.Tensor:
    """[3, p + c + r] M-RoPE positions of a pair laid out as [prompt | chosen | rejected]: prompt and
    chosen as the model positions [prompt | chosen], rejected as it positions the rejected tokens of
    [prompt | rejected] (which restart where chosen started, as in the text layout)."""
    with_chosen = rope_index(prompt_ids + chosen_ids, vision_inputs)
    with_rejected = rope_index(prompt_ids + rejected_ids, vision_inputs)
    return torch.cat([with_chosen, with_rejected[:, len(prompt_ids):]], dim=1)
