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

import sys
from typing import Callable

import torch

VISION_TOWERS = ("visual", "vision_tower", "vision_model")  # the image encoder's attribute, by family
VISION_PREFIX = "vision_"  # batch keys of the image inputs: "vision_pixel_values", ...

RopeIndex = Callable[[list[int], dict | None], torch.Tensor]  # ids, a pair's vision inputs → [3, len(ids)]


def concat_vision_inputs(parts: list[dict]) -> dict[str, torch.Tensor]:
    """The image inputs of several prompts, in batch order, as one set, batched as their processors batch
    them: each tensor concatenated along its first dimension (images; image patches for Qwen2-VL's
    flattened `pixel_values`; prompts for Idefics3's [prompts, images, ...]), its other dimensions padded
    with zeros to the largest (Idefics3's image count per prompt, LLaVA-OneVision's crops per image: the
    models drop all-zero padding images or read the real count from `image_sizes`). Keys are prefixed with
    `VISION_PREFIX`. Every part must hold the same keys; [] or no image inputs → {}."""
    parts = [part for part in parts if part]
    if not parts:
        return {}
    keys = sorted(parts[0])
    if any(sorted(part) != keys for part in parts):
        raise ValueError(f"image inputs of one batch must have the same keys, got {[sorted(p) for p in parts]}")
    return {VISION_PREFIX + key: _cat_padded([part[key] for part in parts]) for key in keys}


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0, each tensor's other dimensions zero-padded at the end to the largest."""
    widest = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors))]
    padded = []
    for t in tensors:
        pad = [p for size, most in zip(reversed(t.shape[1:]), reversed(widest)) for p in (0, most - size)]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)


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
    """Keyword arguments, beside `input_ids`, that make `model` read sequences `ids` [rows, L] with the
    images of `vision_inputs` as its processor would have it read them (the model then computes its own
    positions and masks): the image tensors, `mm_token_type_ids` for M-RoPE models, `token_type_ids`
    (1 = image token) for models whose image tokens attend to each other both ways (Gemma 3)."""
    if not vision_inputs:
        return {}
    inputs = dict(vision_inputs)
    if _rope_index_method(model) is not None:
        inputs["mm_token_type_ids"] = mm_token_type_ids(ids, model.config)
    if (token := image_block_token(model)) is not None:
        inputs["token_type_ids"] = (ids == token).long()
    return inputs


def image_block_token(model: torch.nn.Module) -> int | None:
    """The image token id of a model whose image tokens attend to all tokens of their image, both ways
    (Gemma 3: its modeling module builds those blocks from `token_type_ids`, with
    `get_block_sequence_ids_for_mask`); None for causal-only models (Qwen-VL, LLaVA)."""
    inner = getattr(model, "model", model)
    module = sys.modules.get(type(inner).__module__)
    if getattr(module, "get_block_sequence_ids_for_mask", None) is None:
        return None
    token = getattr(model.config, "image_token_id", None)
    return token if isinstance(token, int) else None


def image_blocks(ids: torch.Tensor, token: int) -> torch.Tensor:
    """[rows, T] int64: for each token of `token`, the number of its run of such tokens in the row (0, 1, ...:
    one image each), −1 elsewhere. Tokens of one run attend to each other both ways (`image_block_token`)."""
    is_image = ids == token
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, torch.full_like(ids, -1))


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
        vision_inputs = vision_inputs or {}
        grids = {key: vision_inputs[key].cpu() for key in ("image_grid_thw", "video_grid_thw") if key in vision_inputs}
        if not grids:  # text only: one position per token on all three axes, as the model gives text
            return torch.arange(len(ids)).expand(3, -1)
        row = torch.tensor([ids], dtype=torch.long)
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


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The image encoder of a vision-language model (`VISION_TOWERS` on the model or its inner `.model`:
    Qwen-VL's `visual`, merger included; LLaVA's and Gemma 3's `vision_tower`; Idefics3's `vision_model`),
    or None for a text model."""
    for owner in (model, getattr(model, "model", None)):
        for name in VISION_TOWERS:
            tower = getattr(owner, name, None)
            if isinstance(tower, torch.nn.Module):
                return tower
    return None
