"""Tiny random vision-language models and their image inputs, built offline (no hub access).

`tiny_vision_model(family)`: 2 text decoder layers (hidden 32), a 1-2 layer vision tower, fp32,
SDPA, initializer_range 0.2. `image_pair(family, model, ...)`: a TokenizedPair whose prompt holds
one image placeholder per image, expanded to the number of image tokens the model's image processor
gives that image (the processor's own rule), with `vision_inputs` from that processor (PIL backend:
no torchvision). Images are small seeded random RGB arrays.
"""
from __future__ import annotations

import json

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
BOI, EOI = 74, 75  # Gemma 3's begin/end of image
FAKE, GLOBAL = 76, 77  # Idefics3's <fake_token_around_image>, <global-img>
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "gemma3", "idefics3", "smolvlm", "llava_onevision")
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]  # LLaVA-OneVision's crop grids, in pixels


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


def _gemma3_config():
    """Gemma 3: a sliding layer and a global one (window 8, shorter than the prompts), 56-pixel images
    pooled to 4 tokens that attend to each other both ways."""
    text = {**TEXT, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=56, patch_size=14)
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                     boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE,
                                     initializer_range=0.2)


def _idefics3_config(family: str):
    """Idefics3 / SmolVLM: 56-pixel images (crops), 16 patches each, pixel-shuffled by 2 to 4 tokens."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
                  patch_size=14, initializer_range=0.2)
    config_class = transformers.Idefics3Config if family == "idefics3" else transformers.SmolVLMConfig
    return config_class(text_config={**TEXT, "model_type": "llama"}, vision_config=vision, image_token_id=IMAGE,
                        scale_factor=2)


def _llava_onevision_config():
    """LLaVA-OneVision: 28-pixel crops of an any-resolution grid (1 to 4 crops plus the whole image)."""
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.LlavaOnevisionConfig(text_config={**TEXT, "model_type": "qwen2"}, vision_config=vision,
                                             image_token_index=IMAGE, video_token_index=VIDEO,
                                             image_grid_pinpoints=PINPOINTS)


def tiny_vision_model(family: str, seed: int = 0) -> torch.nn.Module:
    configs = {"llava": _llava_config, "gemma3": _gemma3_config, "idefics3": lambda: _idefics3_config("idefics3"),
               "smolvlm": lambda: _idefics3_config("smolvlm"), "llava_onevision": _llava_onevision_config}
    config = configs[family]() if family in configs else _qwen_config(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    if family == "gemma3":  # its projection starts at zero: every image token would be the same vector
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    return model.eval()


def image_processor(family: str):
    if family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)
        return LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28},
                                               image_grid_pinpoints=PINPOINTS)
    if family in ("idefics3", "smolvlm"):  # one 56-pixel crop per image (no splitting)
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
        return Idefics3ImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 56},
                                         do_image_splitting=False)
    if family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
        return Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
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
    if family == "gemma3":
        return [BOI] + [IMAGE] * 4 + [EOI]
    if family in ("idefics3", "smolvlm"):
        return [FAKE, GLOBAL] + [IMAGE] * 4 + [FAKE]
    if family == "llava_onevision":  # its token count depends on the image's crops: the model's own count
        one = {key: vision_inputs[key][image:image + 1] for key in ("pixel_values", "image_sizes")}
        with torch.no_grad():
            features = tiny_vision_model(family).model.get_image_features(**one).pooler_output
        return [IMAGE] * sum(len(f) for f in features)
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
    nested = family in ("idefics3", "smolvlm")  # these take one list of images per prompt
    vision_inputs = dict(processor(images=[images] if nested else images, return_tensors="pt"))
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


def save_tiny_llava(path, seed=0):
    """A tiny random LLaVA sized for `llava_processor()`'s tokenizer, saved with that processor as a Hugging
    Face directory (what `orpo train --model` takes); returns the path."""
    processor = llava_processor()
    tokenizer = processor.tokenizer
    text = {**TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id}
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    config = transformers.LlavaConfig(text_config=transformers.LlamaConfig(**text), vision_config=vision,
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=4)
    torch.manual_seed(seed)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def vision_training_data(tmp_path):
    """A tiny LLaVA directory and a JSON-lines file of six image pairs (TRL's shape) and one text pair, with
    prompts.jsonl beside it (two image prompts for `orpo generate`)."""
    rows = []
    for i in range(6):
        write_image(tmp_path / "data" / "pics" / f"{i}.png", 20 + i, 30, seed=i)
        rows.append({"images": [f"pics/{i}.png"], "chosen": "A dog on a beach.",
                     "rejected": "A cat." if i % 2 else "no",
                     "prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": "what is in the picture?"}]}]})
    rows.append({"prompt": "what is blue?", "chosen": "the sky", "rejected": "a cat"})
    path = tmp_path / "data" / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = [{"id": i, "prompt": "what is in the picture?", "images": [f"pics/{i}.png"]} for i in range(2)]
    (tmp_path / "data" / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    return save_tiny_llava(tmp_path / "model"), str(path)


# --- processors: each family's own processor over a word-level tokenizer whose special ids are the tiny models' ---

SPECIAL_STRINGS = {  # ids IMAGE, VIDEO, VISION_START, VISION_END, BOI, EOI, FAKE, GLOBAL (70..77) by family
    "llava": ["<image>"],
    "qwen": ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"],
    "gemma3": ["<image_soft_token>", "<unused1>", "<unused2>", "<unused3>", "<start_of_image>", "<end_of_image>"],
    "idefics3": ["<image>", "<unused1>", "<unused2>", "<unused3>", "<unused4>", "<unused5>",
                 "<fake_token_around_image>", "<global-img>"],
    "llava_onevision": ["<image>", "<video>"],
}
IMAGE_IN_TEMPLATE = {"llava": "<image>", "qwen": "<|vision_start|><|image_pad|><|vision_end|>",
                     "gemma3": "<start_of_image>", "idefics3": "<image>", "llava_onevision": "<image>"}


PROCESSOR_FAMILIES = ("llava", "gemma3", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")
SAVED_PROCESSORS = ("llava", "gemma3", "idefics3")  # the others save and load only beside torchvision


def image_tokens(family: str, vision_inputs: dict) -> int:
    """How many image tokens the family's processor gives the (first) image of `vision_inputs`."""
    if family.startswith("qwen"):
        return int(vision_inputs["image_grid_thw"][0].prod()) // 4
    if family == "llava_onevision":
        return len(image_placeholder(family, vision_inputs, 0))
    return 4


def _kind(family: str) -> str:
    return "qwen" if family.startswith("qwen") else family


def family_tokenizer(family: str):
    """A word-level ChatML tokenizer of VOCAB ids: the tests' words, fillers, then the family's special tokens
    at the tiny models' ids (70...) and <|im_start|>, <|im_end|> at 78, 79; its chat template writes an image
    part as the family's processor expects it."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from tiny import WORDS

    specials = SPECIAL_STRINGS[_kind(family)]
    specials = specials + [f"<unused{i}>" for i in range(len(specials), 8)]
    words = list(dict.fromkeys(WORDS + "picture dog cat beach on in".split()))
    words += [f"w{i}" for i in range(IMAGE - len(words))]
    vocab = {word: i for i, word in enumerate(words + specials + ["<|im_start|>", "<|im_end|>"])}
    assert len(vocab) == VOCAB and vocab[specials[0]] == IMAGE
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                     pre_tokenizers.Split("\n", "isolated"),
                                                     pre_tokenizers.Punctuation("isolated")])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + ["<|im_start|>",
                                                                                                  "<|im_end|>"]])
    extra = ({"boi_token": specials[4], "eoi_token": specials[5], "image_token": specials[0]}
             if family == "gemma3" else {})
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                     pad_token="<pad>", unk_token="<unk>", extra_special_tokens=extra)
    tokenizer.chat_template = PARTS_CHATML.replace("'<image>'", repr(IMAGE_IN_TEMPLATE[_kind(family)]))
    return tokenizer


def family_processor(family: str):
    """The family's own processor (PIL image processing, the tiny models' sizes) over `family_tokenizer`.
    Qwen-VL and LLaVA-OneVision processors also want a video processor, which needs torchvision (not installable
    beside this project's CPU torch): they get none, and these tests pass no video. (SmolVLM's processor reads
    its video processor even for images, and needs num2words: SmolVLM is checked with Idefics3's processing in
    tests/ops/test_vision.py.)"""
    tokenizer = family_tokenizer(family)
    images = image_processor(family)
    template = tokenizer.chat_template
    if family == "llava":
        return transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                           chat_template=template)
    if family == "gemma3":
        return transformers.Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=4,
                                            chat_template=template)
    if family == "idefics3":
        return transformers.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                              chat_template=template)
    processor_class = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
                       "qwen3_vl": transformers.Qwen3VLProcessor,
                       "llava_onevision": transformers.LlavaOnevisionProcessor}[family]

    class WithoutVideo(processor_class):
        def check_argument_for_proper_class(self, name, argument):
            if name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(name, argument)

        def save_pretrained(self, directory, **kwargs):  # what there is: the tokenizer and the image processor
            self.tokenizer.save_pretrained(directory)
            self.image_processor.save_pretrained(directory)

    extra = {"llava_onevision": dict(num_image_tokens=4, vision_feature_select_strategy="full")}.get(family, {})
    return WithoutVideo(image_processor=images, tokenizer=tokenizer, video_processor=None, chat_template=template,
                        **extra)


def image_rows_files(tmp_path) -> tuple[str, str]:
    """Two JSON-lines files of image pairs, image paths relative to them: TRL's shape ({"type": "image"} parts;
    three image pairs and a text pair) and LLaMA-Factory's ("<image>" in ShareGPT turns; two image pairs)."""
    trl, llamafactory = [], []
    for i in range(5):
        write_image(tmp_path / "pics" / f"{i}.png", 40 + 8 * i, 60, seed=i)
        if i >= 3:
            llamafactory.append({"conversations": [{"from": "human", "value": "<image>what is in the picture?"}],
                                 "chosen": {"from": "gpt", "value": "a dog on the beach"},
                                 "rejected": {"from": "gpt", "value": "a cat"}, "images": [f"pics/{i}.png"]})
        else:
            trl.append({"images": [f"pics/{i}.png"], "chosen": "a dog", "rejected": "the sky is blue",
                        "prompt": [{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": "what is in the picture?"}]}]})
    trl.append({"prompt": "what is blue?", "chosen": "the sky", "rejected": "a cat"})
    paths = tmp_path / "trl.jsonl", tmp_path / "llamafactory.jsonl"
    for path, rows in zip(paths, (trl, llamafactory)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(paths[0]), str(paths[1])


if __name__ == "__main__":  # the README's vision example: python tests/vision_models.py DIR
    import sys
    from pathlib import Path

    model, data = vision_training_data(Path(sys.argv[1]))
    print(f"tiny vision-language model: {model}\nimage pairs: {data}")
