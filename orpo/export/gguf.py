"""A Hugging Face model directory (safetensors + tokenizer) → one GGUF file that llama.cpp and Ollama run.

What llama.cpp needs, each in its own function:

* the hyperparameters under llama.cpp's key names (`hyperparameters`);
* the tensors under llama.cpp's names (the gguf package's name map), the query and key rows of
  Llama-layout models reordered for llama.cpp's rotary embedding, which rotates adjacent pairs of a
  head where transformers rotates its two halves (`interleave_rotary_rows`; transformers undoes this
  when it loads a GGUF); a tied output head is not written (llama.cpp reuses the embedding);
* the tokenizer as lists (tokens, token types, merges, scores), the special token ids, whether BOS/EOS
  are added, and the name of the pre-tokenizer, which picks llama.cpp's built-in splitting rules
  (`vocabulary`);
* the chat template, verbatim, so llama.cpp formats a conversation as the model was trained on it.

Tensors with one dimension (norms, biases) stay f32, as in llama.cpp's own conversions; a matrix whose
rows do not split into q8_0 blocks of 32 values is written in f16. Weights are read, converted and
written one tensor at a time (the header is planned from the shapes first), so an export holds one
tensor in memory beyond the tokenizer, whatever the model's size. The file appears under its name only
once complete.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orpo.errors import OrpoError
from orpo.export.merge import is_adapter_dir
from orpo.train.models import GGUF_OUTTYPES

logger = logging.getLogger(__name__)


ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""transformers' model_type → llama.cpp's architecture. llama.cpp runs Mistral models as Llama."""

INTERLEAVED_ROTARY = {"llama", "mistral"}
"""Model types whose query/key rows llama.cpp's architecture expects in interleaved-pair order
(Qwen2's rotary embedding in llama.cpp rotates halves, like transformers)."""

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""The regex Llama 3's tokenizer.json splits text with before byte-level BPE."""
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen2's (one digit at a time where Llama 3 takes up to three)."""
SPLIT_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
"""A Split regex followed by byte-level BPE → the name llama.cpp knows that splitting by."""

BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")  # sentencepiece's byte-fallback pieces


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as GGUF stores it (`tokenizer.ggml.*`); lists are indexed by token id and as long as
    the model's embedding (ids the tokenizer does not use are `[PAD<id>]`, type UNUSED)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece BPE)
    pre: str | None  # the pre-tokenizer's name in llama.cpp (byte-level BPE only)
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right", best first
    scores: list[float] | None  # sentencepiece only: llama.cpp merges the best-scored pair first
    add_space_prefix: bool
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos", "eos", "unk", "pad" → id
    add_bos: bool = False
    add_eos: bool = False


@dataclass(frozen=True)
class ExportedGGUF:
    """What `export_gguf` wrote."""

    path: Path
    size: int  # bytes
    outtype: str
    architecture: str  # llama.cpp's name
    tensors: int
    chat_template: bool  # whether the file carries one


def export_gguf(model_dir: str | Path, gguf_path: str | Path, outtype: str = "f16") -> ExportedGGUF:
    """Write the model in `model_dir` (a Hugging Face directory with safetensors weights, config and
    tokenizer, e.g. the output_dir of `orpo train`) as a GGUF file at `gguf_path`, its matrices in
    `outtype` (one of GGUF_OUTTYPES, train/models.py). Raises OrpoError for a directory this cannot export."""
    from transformers import AutoConfig

    from orpo.train.models import load_tokenizer

    if outtype not in GGUF_OUTTYPES:
        raise OrpoError(f"--outtype {outtype}: choose one of {', '.join(GGUF_OUTTYPES)}")
    model_dir = Path(model_dir).expanduser().resolve()
    files = weight_files(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir).get_text_config()
    except (OSError, ValueError) as err:
        raise OrpoError(f"{model_dir}: cannot read its config.json: {(str(err).strip().splitlines() or [''])[0]}") from None
    check_decoder_only(config)
    architecture = gguf_architecture(config.model_type)
    check_uniform_layers(config, architecture)
    tokenizer = load_tokenizer(str(model_dir))
    vocab = vocabulary(tokenizer, config.vocab_size)
    template = tokenizer.chat_template
    if not template:
        logger.warning("warning: %s has no chat template; the GGUF carries none (llama.cpp will guess one)", model_dir)
    plan = tensor_plan(files, config, architecture, outtype)

    gguf_path = Path(gguf_path)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf_path.with_name(gguf_path.name + ".partial")
    write_gguf(partial, architecture, hyperparameters(config, architecture), vocab, template, plan,
               name=model_dir.name, outtype=outtype)
    partial.replace(gguf_path)
    return ExportedGGUF(gguf_path, gguf_path.stat().st_size, outtype, architecture, len(plan), bool(template))


def check_exportable(config, tokenizer) -> None:
    """Raise the OrpoError `export_gguf` would raise for a model with this (text) config and tokenizer,
    before anything is trained: `orpo train --export_gguf` checks at start."""
    check_decoder_only(config)
    architecture = gguf_architecture(config.model_type)
    check_uniform_layers(config, architecture)
    hyperparameters(config, architecture)
    vocabulary(tokenizer, config.vocab_size)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Every weight's name → the safetensors file holding it (one file or an index of shards).

    A directory with only a LoRA adapter (peft's adapter_config.json) has no model to export: it must
    be merged into its base model first."""
    if not model_dir.is_dir():
        raise OrpoError(f"{model_dir}: no such model directory")
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, "np") as f:
            return {name: single for name in f.keys()}
    if is_adapter_dir(str(model_dir)):
        raise OrpoError(f"{model_dir}: holds a LoRA adapter (adapter_config.json) without the full model's weights; "
                        "merge it into its base model first (use --merge)")
    raise OrpoError(f"{model_dir}: no model.safetensors (or model.safetensors.index.json) to export")


def check_decoder_only(config) -> None:
    """The one-line refusal for an encoder-decoder model (T5, BART): GGUF export does not apply to it."""
    if getattr(config, "is_encoder_decoder", False):
        raise OrpoError(f"GGUF export does not apply to encoder-decoder models ({config.model_type}): llama.cpp runs "
                        "decoder-only ones; the saved safetensors model is the result (transformers loads it)")


def gguf_architecture(model_type: str) -> str:
    """llama.cpp's architecture for transformers' `model_type`, or a one-line refusal."""
    if model_type not in ARCHITECTURES:
        raise OrpoError(f"cannot export model type {model_type!r} to GGUF; supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def check_uniform_layers(config, architecture: str) -> None:
    """A one-line refusal for a config whose layers differ (transformers' per_layer_config, read per layer:
    the global config then refuses per-layer attributes): a GGUF of `architecture` has one shape for all."""
    if getattr(config, "is_heterogeneous", False):
        differ = ", ".join(sorted(config.per_layer_attributes or ())) or "skipped modules"
        raise OrpoError(f"cannot export a {config.model_type} model whose layers differ ({differ}: per_layer_config) "
                        f"to GGUF; llama.cpp's {architecture} gives every layer one shape")


def hyperparameters(config, architecture: str) -> dict[str, int | float]:
    """The model's shape under llama.cpp's key names (`{architecture}.*`): ints are stored as uint32,
    floats as float32. Only the default rotary embedding is supported (scaled variants such as
    Llama 3.1's need extra tensors and are refused)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise OrpoError(f"cannot export rotary scaling {rope_type!r} to GGUF yet; only the default rotary "
                        "embedding is supported")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    values = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "attention.head_count": heads,
        "attention.head_count_kv": kv_heads,
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "rope.dimension_count": head_dim,
    }
    if theta is not None:
        values["rope.freq_base"] = float(theta)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden_size / heads otherwise
        values["attention.key_length"] = values["attention.value_length"] = head_dim
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings and getattr(config, "use_sliding_window", True):
        logger.warning("warning: llama.cpp runs %s without its %d-token sliding attention window: answers past "
                       "that length differ", config.model_type, window)
    return {f"{architecture}.{key}": value for key, value in values.items()}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: where its weight is, and how it is written."""

    gguf_name: str
    hf_name: str
    file: Path
    shape: tuple[int, ...]  # numpy order (rows, columns)
    ggml_type: int  # gguf.GGMLQuantizationType value
    interleave_heads: int | None  # rotary row reordering over this many heads, or None


def tensor_plan(files: dict[str, Path], config, architecture: str, outtype: str) -> list[PlannedTensor]:
    """The file's tensors in llama.cpp's order (embedding, blocks in order, output), each with its GGUF
    name and storage type. A weight the name map does not know is an error, never silently dropped;
    the output head of a model with tied embeddings is left out (llama.cpp then reuses the embedding)."""
    import gguf
    from safetensors import safe_open

    arch_enum = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    interleave = config.model_type in INTERLEAVED_ROTARY
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    plan = []
    for hf_name, file in files.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise OrpoError(f"{file.parent}: weight {hf_name} has no place in a GGUF {architecture} model")
        with safe_open(file, "np") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        rows = None
        if interleave and re.search(r"\.attn_(q|k)\.", gguf_name):
            rows = heads if ".attn_q." in gguf_name else kv_heads
        plan.append(PlannedTensor(gguf_name, hf_name, file, shape, storage_type(shape, outtype), rows))
    if not tied and not any(t.gguf_name == "output.weight" for t in plan):
        raise OrpoError("the model's config says its output head is not tied to the embedding, but there is no "
                        "lm_head.weight among its weights")
    return sorted(plan, key=lambda t: tensor_order(t.gguf_name))


def tensor_order(gguf_name: str) -> tuple:
    """Embedding first, then the blocks by number, then the final norm and output head."""
    block = re.match(r"blk\.(\d+)\.", gguf_name)
    if block:
        return (1, int(block.group(1)), gguf_name)
    return (0 if gguf_name.startswith("token_embd") else 2, 0, gguf_name)


def storage_type(shape: tuple[int, ...], outtype: str) -> int:
    """The ggml type a tensor of `shape` is stored in for `outtype`: vectors (norms, biases) in f32;
    matrices in the outtype, except q8_0 for rows that are not whole 32-value blocks (then f16)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) < 2 or outtype == "f32":
        return Q.F32
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    block = GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a query/key projection's output rows (or bias) from transformers' rotary layout, which
    pairs dimension i of a head with dimension i + head_dim/2, to llama.cpp's Llama layout, which pairs
    dimensions 2i and 2i+1: within each head, row i of the first half and row i of the second half
    become rows 2i and 2i+1."""
    head_dim = weight.shape[0] // heads
    by_half = weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:])
    return by_half.swapaxes(1, 2).reshape(weight.shape)


def encode(weight: np.ndarray, ggml_type: int) -> np.ndarray:
    """`weight` (float32) in the bytes of `ggml_type` (f32, f16, bf16 or q8_0)."""
    from gguf import GGMLQuantizationType as Q, quants

    if ggml_type == Q.F32:
        return np.ascontiguousarray(weight, dtype=np.float32)
    if ggml_type == Q.F16:
        return np.ascontiguousarray(weight, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(weight, dtype=np.float32), Q(ggml_type))


def read_weight(tensor: PlannedTensor) -> np.ndarray:
    """The tensor's weight as float32, its rotary rows reordered where the architecture wants that."""
    from safetensors import safe_open

    with safe_open(tensor.file, "pt") as f:  # "pt": bf16 checkpoints have no numpy dtype
        weight = f.get_tensor(tensor.hf_name).float().numpy()
    if tensor.interleave_heads:
        weight = interleave_rotary_rows(weight, tensor.interleave_heads)
    return weight


def vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """`tokenizer` (a transformers fast tokenizer) as GGUF lists for a model with `vocab_size` embeddings.

    Two kinds of tokenizer have a GGUF form: byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2), whose
    pre-tokenizer must be one llama.cpp knows by name (`pre_tokenizer_name`), and sentencepiece BPE with
    byte fallback (Llama 2, TinyLlama, Mistral), whose merge order becomes token scores (a merged token
    scores minus its merge's rank, so llama.cpp's best-score-first merging follows the merges' order).
    Anything else is refused in one line."""
    from gguf import TokenType

    from orpo.data.render import adds_bos, adds_eos

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE":
        raise OrpoError(f"cannot write a {model.get('type')} tokenizer to GGUF; llama.cpp reads byte-level BPE "
                        "(GPT-2, SmolLM2, Llama 3, Qwen2) and sentencepiece BPE (Llama 2, Mistral) tokenizers")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    sentencepiece = bool(model.get("byte_fallback")) or _has_metaspace(backend)
    pre = None if sentencepiece else pre_tokenizer_name(backend.get("pre_tokenizer"))
    if not sentencepiece and pre is None:
        raise OrpoError("cannot write this tokenizer to GGUF: its pre-tokenizer "
                        f"{json.dumps(backend.get('pre_tokenizer'))[:200]} is not one llama.cpp knows "
                        "(GPT-2 byte-level, digits + byte-level, Llama 3, Qwen2)")

    ids = tokenizer.get_vocab()
    if max(ids.values()) >= vocab_size:
        raise OrpoError(f"the tokenizer has ids up to {max(ids.values())} but the model only {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        types[i] = int(TokenType.BYTE if sentencepiece and BYTE_TOKEN.match(token) else TokenType.NORMAL)
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    if sentencepiece and tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = int(TokenType.UNKNOWN)

    scores = None
    if sentencepiece:
        rank = {}
        for r, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), r)
        scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]

    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    return Vocabulary(
        model="llama" if sentencepiece else "gpt2", pre=pre, tokens=tokens, token_types=types, merges=merges,
        scores=scores, add_space_prefix=sentencepiece and _prepends_space(backend),
        special_ids={k: v for k, v in special.items() if v is not None},
        add_bos=adds_bos(tokenizer), add_eos=adds_eos(tokenizer),
    )


def _steps(component: dict | None) -> list[dict]:
    """A normalizer's or pre-tokenizer's steps (a Sequence flattened; None → [])."""
    if not component:
        return []
    key = "normalizers" if "normalizers" in component else "pretokenizers"
    if component.get("type") == "Sequence":
        return [step for part in component[key] for step in _steps(part)]
    return [component]


def _has_metaspace(backend: dict) -> bool:
    """Sentencepiece's "▁" for spaces, from a Metaspace pre-tokenizer or a Replace(" " → "▁") normalizer."""
    steps = _steps(backend.get("pre_tokenizer")) + _steps(backend.get("normalizer"))
    return any(s.get("type") == "Metaspace" or (s.get("type") == "Replace" and s.get("content") == "\u2581")
               for s in steps)


def _prepends_space(backend: dict) -> bool:
    """Whether the sentencepiece tokenizer puts "▁" before the text (llama.cpp's add_space_prefix)."""
    for step in _steps(backend.get("normalizer")) + _steps(backend.get("pre_tokenizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") != "never"
    return False


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before merging, read from its
    tokenizer.json structure: GPT-2's regex ("gpt-2", llama.cpp's spelling), single digits then GPT-2's regex ("smollm"),
    Llama 3's or Qwen2's Split regex ("llama-bpe", "qwen2"). None for any other."""
    steps = _steps(pre_tokenizer)
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def write_gguf(path: Path, architecture: str, hparams: dict, vocab: Vocabulary, chat_template,
               plan: list[PlannedTensor], name: str, outtype: str) -> None:
    """Write the GGUF file: metadata (general, `hparams`, tokenizer, chat template), then the tensors of
    `plan` one at a time."""
    import gguf
    from gguf import GGMLQuantizationType as Q, LlamaFileType

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer announces the file's endianness
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_type("model")
    writer.add_name(name)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                 "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(int(file_type))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in hparams.items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    add_vocabulary(writer, vocab)
    if chat_template:
        writer.add_chat_template(chat_template if isinstance(chat_template, str)
                                 else [{"name": k, "template": v} for k, v in chat_template.items()])

    for tensor in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, Q(tensor.ggml_type))
        writer.add_tensor_info(tensor.gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=Q(tensor.ggml_type))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in plan:
            writer.write_tensor_data(encode(read_weight(tensor), tensor.ggml_type))
    finally:
        writer.close()


def add_vocabulary(writer, vocab: Vocabulary) -> None:
    """The `tokenizer.ggml.*` keys of `vocab`."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for kind, token_id in vocab.special_ids.items():
        adders[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
