"""A peft adapter directory → one plain model: the adapter merged into its base, saved as safetensors
with the tokenizer, loadable by `AutoModelForCausalLM` without peft (`orpo export ADAPTER_DIR --merged OUT_DIR`).

`orpo train --use_peft` already saves merged models; adapter-only directories come from library use
(`ORPOTrainer(..., peft_config=...)` then `trainer.save_model()`, which peft writes as adapter files).
The merge is peft's own (`PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()`), the base
is loaded by orpo's offline loaders (train/models.py: a hub id in the local cache, a directory, a .gguf file).
"""
from __future__ import annotations

import json
import logging
import os

from orpo.errors import OrpoError, first_line
from orpo.train.models import DTYPES, load_model, load_tokenizer

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"  # peft.utils.CONFIG_NAME (a constant here: importing peft takes a second)
TOKENIZER_CONFIG = "tokenizer_config.json"  # what transformers' tokenizer save_pretrained writes
# peft types that learn prompts or prefixes instead of weight updates: nothing to merge
PROMPT_LEARNING = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT")


def is_adapter_dir(path: str) -> bool:
    """Whether `path` is a directory that peft's `save_pretrained` wrote: it has adapter_config.json
    (and, unlike a model directory, no weights of the whole model)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json of `adapter_dir` as a dict; one OrpoError line when `adapter_dir` is not an
    adapter directory or its config is unreadable."""
    if not os.path.isdir(adapter_dir):
        raise OrpoError(f"{adapter_dir}: no such directory")
    if not is_adapter_dir(adapter_dir):
        raise OrpoError(f"{adapter_dir}: not a peft adapter directory (no {ADAPTER_CONFIG}); a directory saved by "
                        "orpo train --use_peft already holds the merged model")
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise OrpoError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(config, dict):
        raise OrpoError(f"{path}: expected a JSON object")
    return config


def adapter_base(adapter_dir: str) -> str:
    """The base model an adapter was trained on: adapter_config.json's `base_model_name_or_path`."""
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise OrpoError(f"{os.path.join(adapter_dir, ADAPTER_CONFIG)} names no base model "
                        "(base_model_name_or_path); pass the base model explicitly")
    return base


def _adapted_tied_embeddings(peft_model) -> list[str]:
    """Names of the embedding modules (input embedding, output head) that carry an adapter in a model whose
    head is tied to its input embedding. Merging into one of them changes the other too (one shared weight),
    so the merged model would not compute what the adapter model computes."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    model = peft_model.get_base_model()
    if not model.config.get_text_config().tie_word_embeddings:
        return []
    modules = {"the input embedding": model.get_input_embeddings(), "lm_head": model.get_output_embeddings()}
    return [name for name, module in modules.items() if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def merge_adapter(adapter_dir: str, output_dir: str, base: str | None = None, dtype: str = DTYPES[0],
                  trust_remote_code: bool = False, overwrite: bool = False) -> str:
    """Merge the peft adapter in `adapter_dir` into its base model and save the result, with the
    tokenizer, into `output_dir` (safetensors); return `output_dir`.

    base:      the base model (hub id, directory or .gguf file); default: the adapter config's
               `base_model_name_or_path`. Pass it when that path has moved, or when the base was a
               .gguf file (peft records the file's directory, which holds no model of its own).
    dtype:     the dtype the base is loaded, merged and saved in (float32: the merged weights are exact).
    overwrite: write into an `output_dir` that already has files.
    A reward model's adapter (peft task_type SEQ_CLS: `orpo train --objective reward --use_peft`, its score head
    saved whole beside the adapters) is merged into the base loaded as a reward model
    (AutoModelForSequenceClassification).
    The tokenizer is the adapter directory's when it has one (trainer.save_model saves it there), else the
    base's. Problems are one OrpoError line.
    """
    config = read_adapter_config(adapter_dir)
    if os.path.realpath(output_dir) == os.path.realpath(adapter_dir):
        raise OrpoError(f"{output_dir}: the merged model cannot be written over its adapter directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise OrpoError(f"{output_dir} already has files; choose an empty directory")
    if config.get("peft_type") in PROMPT_LEARNING:
        raise OrpoError(f"{adapter_dir}: a {config['peft_type']} adapter has no weights to merge into the model")
    base = base or adapter_base(adapter_dir)

    from peft import PeftModel

    try:
        # a reward model's adapter (task SEQ_CLS, orpo train --objective reward) goes on the base loaded as one
        model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code,
                           reward=config.get("task_type") == "SEQ_CLS")
    except OrpoError as err:
        raise OrpoError(f"{err} (the base model of {adapter_dir}; pass the base model explicitly if it moved)") from None
    has_tokenizer = os.path.isfile(os.path.join(adapter_dir, TOKENIZER_CONFIG))
    tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base, trust_remote_code=trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # missing/mismatched adapter weights
        raise OrpoError(f"{adapter_dir}: cannot apply the adapter to {base}: {first_line(err)}") from None
    tied = _adapted_tied_embeddings(peft_model)
    if tied:
        raise OrpoError(f"{adapter_dir}: the adapter changes {' and '.join(tied)}, and {base} ties lm_head to the "
                        "input embedding (one shared weight): merging it would change both")
    merged = peft_model.merge_and_unload()
    if config.get("task_type") == "SEQ_CLS" and merged.config.pad_token_id is None:
        merged.config.pad_token_id = tokenizer.pad_token_id  # where the reward is read, as training read it
    os.makedirs(output_dir, exist_ok=True)
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info("merged %s into %s: %s", adapter_dir, base, output_dir)
    return output_dir
