"""Vision-language ORPO: the prefix-shared route (each image prompt computed once) against the padded one
(prompt + chosen and prompt + rejected as separate rows: the prompt and its images computed twice).

    .venv/bin/python benchmarks/vlm_bench.py                    # 16 pairs, 4 per step, one run per layout
    .venv/bin/python benchmarks/vlm_bench.py --pairs 4 --batch 2 --image 224 --out /tmp/vlm.json   # a smoke run

A random Qwen2-VL built offline from its config (no download): a 4-layer language model (hidden 512, 8 heads,
2 key/value heads, vocabulary 8,192) and a 4-block vision tower (width 256), frozen as orpo freezes it by
default. Each pair: a 32-token question and one `--image`-pixel square random image (448: 1,024 patches, 256
image tokens after the 2 × 2 merge) in the prompt, a chosen and a rejected answer of 64 to 128 tokens. The
same pairs, seed and settings for every layout; each layout runs in a fresh process (`--worker LAYOUT`) so
its peak RSS is its own, and the layouts alternate over `--repeats`. `trainer.train()` is timed (wall
clock); model building and the pairs' image processing are not. Prints one JSON object (CPU and flags,
per layout: seconds, pairs/s, peak RSS, the route the trainer logged) and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository's orpo

LAYOUTS = {"spans": dict(packing=True, packed_attention="spans"), "mask": dict(packing=True, packed_attention="mask"),
           "padded": dict(packing=False)}
VOCAB, IMAGE, VIDEO, VISION_START, VISION_END = 8192, 8190, 8191, 8188, 8189


def build_model():
    import torch
    import transformers

    text = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_scaling={"rope_type": "default", "mrope_section": [16, 8, 8]})
    vision = dict(depth=4, embed_dim=256, hidden_size=512, num_heads=4, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                        video_token_id=VIDEO, vision_start_token_id=VISION_START,
                                        vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(config)


def build_pairs(count: int, image: int):
    import numpy as np
    import torch
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from orpo.data.render import TokenizedPair

    processor = Qwen2VLImageProcessorPil(min_pixels=image * image, max_pixels=image * image)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(count):
        picture = Image.fromarray(rng.integers(0, 256, (image, image, 3), dtype=np.uint8))
        inputs = dict(processor(images=[picture], return_tensors="pt"))
        tokens = int(inputs["image_grid_thw"][0].prod()) // 4

        def text(n):
            return torch.randint(3, VISION_START, (n,), generator=generator).tolist()

        prompt = text(16) + [VISION_START] + [IMAGE] * tokens + [VISION_END] + text(16)
        lengths = torch.randint(64, 129, (2,), generator=generator).tolist()
        pairs.append(TokenizedPair(prompt, text(lengths[0]), text(lengths[1]), i, vision_inputs=inputs))
    return pairs


def pad_tokenizer():
    """The pairs are ids already: the trainer only reads the pad and end-of-turn tokens of a tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2}, unk_token="<pad>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    return tokenizer


def worker(args) -> None:
    import logging

    import torch

    from machine import cpu_description
    from orpo import ORPOConfig, ORPOTrainer

    model = build_model()
    pairs = build_pairs(args.pairs, args.image)
    routes = []

    class RouteLog(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("route: "):
                routes.append(record.getMessage()[len("route: "):])

    logging.getLogger("orpo.run.trainer").addHandler(RouteLog())
    logging.getLogger("orpo.run.trainer").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        config = ORPOConfig(output_dir=tmp, per_device_train_batch_size=args.batch, num_train_epochs=1,
                            learning_rate=1e-6, report_to="none", save_strategy="no", report=False, disable_tqdm=True,
                            use_cpu=True, seed=0, logging_steps=max(1, args.pairs // args.batch), bf16=args.bf16,
                            dataloader_pin_memory=False, **LAYOUTS[args.worker])
        trainer = ORPOTrainer(model, args=config, train_dataset=pairs, processing_class=pad_tokenizer())
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = sum(pair.shared_length for pair in pairs)
    print(json.dumps({"layout": args.worker, "route": routes[-1] if routes else "", "seconds": round(seconds, 2),
                      "pairs_per_second": round(args.pairs / seconds, 3), "pair_tokens": tokens,
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                      "cpu": cpu_description(), "torch": torch.__version__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--image", type=int, default=448, help="image side in pixels (448: 256 image tokens)")
    parser.add_argument("--layouts", default="spans,padded")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--bf16", type=lambda v: v.lower() == "true", default=False,
                        help="bf16 autocast (default fp32)")
    parser.add_argument("--out", default="vlm_bench.json")
    parser.add_argument("--worker", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    runs = []
    for _ in range(args.repeats):
        for layout in args.layouts.split(","):
            command = [sys.executable, __file__, "--worker", layout, "--pairs", str(args.pairs), "--batch",
                       str(args.batch), "--image", str(args.image), "--bf16", str(args.bf16).lower()]
            done = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
            if done.returncode != 0:
                error = (done.stderr.strip().splitlines() or [""])[-1]
                runs.append({"layout": layout, "status": "crashed", "error": error})
            else:
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), file=sys.stderr)
    result = {"pairs": args.pairs, "batch": args.batch, "image": args.image, "bf16": args.bf16, "runs": runs}
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
