"""Tiny random vision-language models and their image inputs, built offline (no hub access).

`tiny_vision_model(family)`: 2 text decoder layers (hidden 32), a 1-2 layer vision tower, fp32,
SDPA, initializer_range 0.2. `image_pair(family, model, ...)`: a TokenizedPair whose prompt holds
one image placeholder per image, expanded to the number of image tokens the model's image processor
gives that image (the processor's own rule), with `vision_inputs` from that processor (PIL backend:
no torchvision). Images are small seeded random RGB arrays.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers
from PIL import Image

from orpo.data.render import TokenizedPair

VOCAB = 80
IMAGE, VIDEO, VISION_START, VISION_END = 70, 71, 72, 73  # special ids of the tiny models
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, initializer_range=0.2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
QWEN_VISION = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, in_chans=3, in_channels=3, intermediate_size=64,
                   out_hidden_size=32, fullatt_block_indexes=[0], window_size=56, deepstack_visual_indexes=[0],
                   num_position_embeddings=64, initializer_range=0.2)
QWEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                vision_end_token_id=VISION_END)
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")


def _qwen_config(family: str):
    text = {**TEXT, "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1]}}
    if family == "qwen3_vl":
        text["rope_scaling"]["mrope_interleaved"] = True
    config_class = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig,
                    "qwen3_vl": transformers.Qwen3VLConfig}[family]
    vision = {**QWEN_VISION, "patch_size": 16} if family == "qwen3_vl" else QWEN_VISION
    return config_class(text_config=text, vision_config=vision, **QWEN_IDS)


def _llava_config():
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    return transformers.LlavaConfig(text_config=transformers.LlamaConfig(**TEXT), vision_config=vision,
                                    image_token_index=IMAGE, image_seq_length=4)


def tiny_vision_model(family: str, seed: int = 0) -> torch.nn.Module:
    config = _llava_config() if family == "llava" else _qwen_config(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    return model.eval()


def image_processor(family: str):
    if family == "llava":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
        return LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    patch = 16 if family == "qwen3_vl" else 14
    return Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=2,
                                    min_pixels=(2 * patch) ** 2, max_pixels=(8 * patch) ** 2)


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_placeholder(family: str, vision_inputs: dict, image: int) -> list[int]:
    """The ids the processor writes for image number `image` of `vision_inputs`."""
    if family == "llava":
        return [IMAGE] * 4
    t, h, w = vision_inputs["image_grid_thw"][image].tolist()
    return [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END]


def image_pair(family: str, sizes: list[tuple[int, int]], lengths: tuple[int, int, int], seed: int = 0,
               index: int = 0) -> TokenizedPair:
    """A pair whose prompt is text, then one placeholder per image of `sizes` (height, width), each
    followed by text; `lengths` = text tokens of the prompt and of the chosen and rejected answers."""
    rng = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(3, IMAGE, (n,), generator=rng).tolist()

    images = [random_image(h, w, seed * 10 + i) for i, (h, w) in enumerate(sizes)]
    processor = image_processor(family)
    vision_inputs = dict(processor(images=images, return_tensors="pt"))
    p, c, r = lengths
    prompt = text(p)
    for i in range(len(images)):
        prompt += image_placeholder(family, vision_inputs, i) + text(2)
    return TokenizedPair(prompt, text(c), text(r), index=index, vision_inputs=vision_inputs)


PARTS_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML whose messages may hold content parts, an image part written as LLaVA's "<image>"."""


def llava_processor():
    """A LLaVA processor over a byte-level ChatML tokenizer with an "<image>" token: each "<image>" of a
    prompt becomes 4 image tokens (a 28 × 28 crop in 14-pixel patches); PIL image processing."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from tiny import byte_level_chatml_tokenizer

    tokenizer = byte_level_chatml_tokenizer(
        corpus=("the sky is blue, what is in the picture? A dog on a beach. A cat. Describe it.",))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = PARTS_CHATML
    processor = transformers.LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=PARTS_CHATML)
    return processor


def write_image(path, height=20, width=30, seed=0):
    """A seeded random RGB PNG at `path` (parent directories made); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(height, width, seed).save(path)
    return path
