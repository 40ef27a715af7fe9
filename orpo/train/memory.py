"""Whether a run recomputes activations, when `activation_checkpointing` is left to orpo (the default).

Activation checkpointing costs about a fifth of each step (the forward runs twice) and saves
memory the step may not need: SmolLM2-135M at 4 pairs of up to 1024 tokens keeps about 8 GB of
activations in fp32. So orpo estimates what the largest micro-batch of the data keeps for
backward, adds what training allocates besides (gradients, optimizer states, autocast weight
copies, one chunk of the output head), and compares it with a budget (`--memory_budget_gb`, else
`BUDGET_SHARE` of the device's free memory):

| fits | choice |
| --- | --- |
| every layer's activations | off |
| every n-th layer keeping only its matmul and attention outputs | selective, `every_n_layers = n` (transformers checkpoints layers 0, n, 2n, ...; train/recompute.py) |
| neither | full recompute, every layer |

Selective recompute keeps about half of a layer's activations and recomputes only its element-wise work,
so it goes first; full recompute keeps only each layer's input. `--selective_checkpointing true/false`
restricts the choice to one kind (false: every n-th layer fully recomputed).

The estimate sums the decoder layers, each with its own widths: layers can differ (Gemma 4's full-attention
layers have wider heads and other key/value heads than its sliding ones, its kv-shared layers reuse an earlier
layer's keys and values, and with use_double_wide_mlp have twice the MLP). Bytes a layer saves for backward, with
`a` = bytes of an activation (2 in bf16 or fp16 autocast, else the weights'), h = hidden size, and the layer's
q = query width (heads · head dim), kv = key/value width, i = MLP width, n = the widths its norms normalize:

    per token:  a · (4i + 2kv + 3q + c·h) + 8n
                4i: the gated MLP's gate, up, activation and product; 2kv: keys and values (none in a
                layer that reuses another's); 3q: the query and the attention output; c·h: the
                projections' inputs (c = 2; 5 in autocast, which keeps low-precision copies of the fp32
                values that feed matmuls); 8n: each norm's fp32 input and output, n = h per norm of the
                hidden state (Llama: 2, Gemma 3/4: 4) + q per query norm + kv per key or value norm
                (Qwen3, Gemma 3/4)
                + a·h + 12e with Gemma 3n/4's per-layer input of width e (the gate's input, its output
                and activation, their product with the fp32 per-layer input)
    per pair:   a · (p + r) · (2kv + r)    span attention's rejected part: its keys/values with the
                                           prompt's, and its r × (p + r) mask (p, r: prompt, rejected)
    per model:  h · (8 + a) per token (final norm, head input) + 12 · Σe (Gemma 4's per-layer inputs)

Where the query is as wide as the hidden state (Llama, Mistral, Qwen2, Gemma 3 at their usual shapes) 3q + c·h
is 5h (8h in autocast). Measured against the saved-tensor bytes of one forward (tests/train/test_memory.py):
0.998-1.002 on SmolLM2-135M, within 15% on Llama, Mistral, Qwen2/3, Gemma 3 and Gemma 4 blocks, fp32 and bf16
autocast. Against a whole step's measured peak on an H100 (benchmarks/gpu_smoke.py) the estimate is 1.2-1.5x:
allocator and optimizer transients are covered with room to spare.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

BUDGET_SHARE = 0.8  # of the free memory at start: room for the allocator's fragmentation and other processes
OPTIMIZER_BYTES = 8  # per trainable parameter: AdamW's two fp32 moments
ATTENTION_NAMES = ("self_attn", "attention", "attn")  # a decoder layer's attention module in transformers
MLP_NAMES = ("mlp", "feed_forward")


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's widths per token: its query (heads · head dim, also the attention output's width),
    the keys (= values) its attention reads, its MLP, the sum of what its norms normalize, Gemma 3n/4's
    per-layer input (0 without), and whether it reuses another layer's keys and values (then it keeps none
    of its own)."""

    query: int
    kv_width: int
    intermediate: int
    norm_width: int
    per_layer_input: int = 0
    shares_kv: bool = False


@dataclass(frozen=True)
class DecoderShape:
    """What the estimate needs of a model: its decoder layers (one `LayerShape` each), hidden size,
    vocabulary, parameter counts (all, trainable, and the bytes of one weight element)."""

    per_layer: tuple[LayerShape, ...]
    hidden: int
    vocab: int
    params: int
    trainable: int
    weight_bytes: int

    @property
    def layers(self) -> int:
        return len(self.per_layer)

    @classmethod
    def uniform(cls, layers: int, hidden: int, intermediate: int, kv_width: int, vocab: int, norms_per_layer: int,
                params: int, trainable: int, weight_bytes: int, query: int | None = None) -> DecoderShape:
        """`layers` alike layers, each with `norms_per_layer` norms of the hidden state and a query as wide
        as the hidden state unless `query` says otherwise (Llama's shape)."""
        layer = LayerShape(query or hidden, kv_width, intermediate, norms_per_layer * hidden)
        return cls((layer,) * layers, hidden, vocab, params, trainable, weight_bytes)


def decoder_shape(model: torch.nn.Module, config) -> DecoderShape:
    """`DecoderShape` of a causal LM `model` with text config `config` (transformers' names).

    Each layer's widths are read from its built modules where transformers' names find them (the attention's
    o_proj input and k_proj or fused qkv_proj output, the MLP's down_proj input, the norms by their names),
    which holds under DeepSpeed ZeRO-3 too (its empty weights keep their modules' in/out_features); else from
    that layer's config: `config.per_layer_config[i]` where the config varies per layer (transformers'
    heterogeneous configs: Gemma 4's full-attention layers override head_dim and num_key_value_heads, which
    the global config then refuses to answer), else the config itself."""
    hidden = config.hidden_size
    count = config.num_hidden_layers
    blocks = _decoder_layers(model, count)
    per_layer = tuple(_layer_shape(None if blocks is None else blocks[i], _layer_config(config, i), hidden)
                      for i in range(count))
    params = list(model.parameters())
    return DecoderShape(
        per_layer=per_layer, hidden=hidden, vocab=config.vocab_size, params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad), weight_bytes=params[0].element_size(),
    )


def _decoder_layers(model: torch.nn.Module, count: int) -> torch.nn.ModuleList | None:
    """The model's `count` decoder layers: its decoder's `layers` (transformers' get_decoder: the language
    model of a vision-language model, not its vision tower), else its first list of `count` modules."""
    try:
        layers = getattr(model.get_decoder(), "layers", None)
    except Exception:  # get_decoder is best-effort: it raises for models without a rule
        layers = None
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == count:
        return layers
    return next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count), None)


def _layer_config(config, index: int):
    """Layer `index`'s config: transformers' per-layer view of a heterogeneous config, else `config`."""
    return config.per_layer_config[index] if getattr(config, "is_heterogeneous", False) else config


def _child(module: torch.nn.Module | None, names: tuple[str, ...]) -> torch.nn.Module | None:
    return next((child for name in names if (child := getattr(module, name, None)) is not None), None)


def _width(module: torch.nn.Module | None, name: str, side: str) -> int | None:
    """`side` (in_features/out_features) of `module`'s submodule `name`: a Linear, a peft LoRA wrapper or a
    quantized Linear alike."""
    return getattr(getattr(module, name, None), side, None)


def _layer_shape(block: torch.nn.Module | None, config, hidden: int) -> LayerShape:
    """`LayerShape` of decoder layer `block` (None: not found, the config's figures and two norms). A config
    without attention heads (Mamba) is read as one head as wide as the hidden state: its layers are then
    estimated as Llama-shaped ones of the same widths, which the probe-chosen padded route runs."""
    heads = getattr(config, "num_attention_heads", None) or 1
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention, mlp = _child(block, ATTENTION_NAMES), _child(block, MLP_NAMES)
    query = (_width(attention, "o_proj", "in_features") or _width(attention, "q_proj", "out_features")
             or heads * head_dim)
    fused = _width(attention, "qkv_proj", "out_features")
    kv = _width(attention, "k_proj", "out_features") or (fused and (fused - query) // 2)
    kv = kv or (getattr(config, "num_key_value_heads", None) or heads) * (query // heads)
    intermediate = (_width(mlp, "down_proj", "in_features") or _width(mlp, "up_proj", "out_features")
                    or getattr(config, "intermediate_size", None) or 4 * hidden)
    if block is None:
        norm_width = 2 * hidden
    else:
        norm_width = sum(_norm_width(name.rsplit(".", 1)[-1], hidden, query, kv) for name, m in block.named_modules()
                         if "norm" in type(m).__name__.lower())
    return LayerShape(query=query, kv_width=kv, intermediate=intermediate, norm_width=norm_width,
                      per_layer_input=_width(block, "per_layer_input_gate", "out_features") or 0,
                      shares_kv=bool(getattr(attention, "is_kv_shared_layer", False)))


def _norm_width(name: str, hidden: int, query: int, kv: int) -> int:
    """What a layer's norm called `name` normalizes per token: a query norm (q_norm, q_layernorm) the
    query, a key or value norm (k_norm, v_norm) the keys or values, any other the hidden state."""
    first = name.split("_", 1)[0]
    return query if first in ("q", "query") else kv if first in ("k", "key", "v", "value") else hidden


def layer_activation_bytes(shape: DecoderShape, tokens: int, pair_lengths: list[tuple[int, int]],
                           activation_bytes: int, selective: bool = False) -> list[int]:
    """Bytes each decoder layer keeps for backward (module formula), in layer order, for `tokens` tokens in one
    call, `pair_lengths` the (prompt, rejected) lengths of its pairs in the span layout ([] otherwise).

    `selective`: what a layer under selective recompute keeps (train/recompute.py), its matmul and fused
    attention outputs only, per token a · (2q + 2kv + 2i + 2h): the query, key and value projections, the
    attention output, its o_proj, the MLP's gate and up, its down projection (+ a · (h + e) for Gemma 3n/4's
    per-layer input gate and projection); the span layout's per-pair keys, values and mask are recomputed."""
    a, h = activation_bytes, shape.hidden
    c = 5 if a < 4 else 2
    result = []
    for layer in shape.per_layer:
        kv = 0 if layer.shares_kv else 2 * layer.kv_width
        if selective:
            per_token = a * (2 * layer.query + kv + 2 * layer.intermediate + 2 * h)
            result.append(tokens * (per_token + (a * (h + layer.per_layer_input) if layer.per_layer_input else 0)))
            continue
        per_token = a * (4 * layer.intermediate + kv + 3 * layer.query + c * h) + 8 * layer.norm_width
        if layer.per_layer_input:
            per_token += a * h + 12 * layer.per_layer_input
        per_pair = sum(a * (p + r) * (2 * layer.kv_width + r) for p, r in pair_lengths)
        result.append(tokens * per_token + per_pair)
    return result


def recomputed_layers(layers: int, every_n_layers: int | None) -> range:
    """The layers transformers checkpoints with `every_n_layers` (activation_checkpointing_kwargs): 0, n, 2n, ...;
    none for None (no checkpointing)."""
    return range(0) if every_n_layers is None else range(0, layers, every_n_layers)


def head_probs_bytes(shape: DecoderShape, tokens: int) -> int:
    """The output head's softmax kept from the forward for `tokens` tokens (logprobs.token_logprobs(keep_probs=True)):
    tokens × vocabulary × 4 bytes, fp32."""
    return tokens * shape.vocab * 4


def kept_activation_bytes(shape: DecoderShape, tokens: int, pair_lengths: list[tuple[int, int]],
                          activation_bytes: int, recomputed: int | Collection[int] = (), selective: bool = False) -> int:
    """Activation bytes a forward keeps for backward, the `recomputed` layers checkpointed: they keep their fp32
    input, and nothing else (full recompute) or their matmul and attention outputs (`selective`); backward
    recomputes one layer at a time, so the largest of them adds what it does not keep.

    Which layers are recomputed matters where layers differ, and is known: `recomputed` is their indices
    (`recomputed_layers`), and the sum is exact per layer. A bare count (as older callers pass) is bounded
    from above: the smallest layers are taken for the recomputed ones, and the largest layer's recompute."""
    per_layer = layer_activation_bytes(shape, tokens, pair_lengths, activation_bytes)
    partial = (layer_activation_bytes(shape, tokens, pair_lengths, activation_bytes, selective=True) if selective
               else [0] * len(per_layer))
    if isinstance(recomputed, int):
        chosen = set(sorted(range(len(per_layer)), key=per_layer.__getitem__)[:recomputed])
        transient = range(len(per_layer)) if recomputed else ()
    else:
        chosen = transient = set(recomputed)
    count = len(chosen)
    kept = (sum(per_layer[i] if i not in chosen else partial[i] for i in range(len(per_layer)))
            + max((per_layer[i] - partial[i] for i in transient), default=0))
    per_layer_inputs = 12 * sum(layer.per_layer_input for layer in shape.per_layer)  # Gemma 3n/4, fp32
    return (kept + count * tokens * shape.hidden * 4
            + tokens * (shape.hidden * (8 + activation_bytes) + per_layer_inputs))  # final norm, head input


def step_bytes(shape: DecoderShape, tokens: int, pair_lengths: list[tuple[int, int]], activation_bytes: int,
               checkpointed_layers: int | Collection[int], chunk_size: int, weights_on_device: bool,
               selective: bool = False) -> int:
    """Memory a training step allocates on its device beyond what is in use before training, with
    `checkpointed_layers` recomputed (`selective`ly or fully): their indices, or their number
    (`kept_activation_bytes`)."""
    kept = kept_activation_bytes(shape, tokens, pair_lengths, activation_bytes, checkpointed_layers, selective)
    head_chunk = min(chunk_size, tokens) * shape.vocab * (8 + activation_bytes)  # fp32 logits and probs, one chunk
    autocast_copies = shape.params * activation_bytes if activation_bytes < shape.weight_bytes else 0
    training_state = shape.trainable * (shape.weight_bytes + OPTIMIZER_BYTES)  # gradients, optimizer
    weights = 0 if weights_on_device else shape.params * shape.weight_bytes
    return kept + head_chunk + autocast_copies + training_state + weights


def checkpointing_options(layers: int, selective: bool | None) -> list[tuple[int | None, bool]]:
    """(every_n_layers, selective) choices from the most memory and the least recompute to the least memory:
    none; then every n-th layer, n = layers .. 1, recomputed selectively (`selective` None or True) or fully
    (`selective` False); with `selective` None (orpo decides) last full recompute of every layer."""
    everies = range(layers, 0, -1)
    if selective is None:
        return [(None, False)] + [(every, True) for every in everies] + [(1, False)]
    return [(None, False)] + [(every, selective) for every in everies]


def choose_checkpointing(shape: DecoderShape, tokens: int, pair_lengths: list[tuple[int, int]],
                         activation_bytes: int, chunk_size: int, weights_on_device: bool,
                         budget: int, selective: bool | None = None) -> tuple[int | None, bool, int]:
    """(every_n_layers, selective, estimated bytes) of the first of `checkpointing_options` whose step fits
    `budget`: every_n_layers None = no checkpointing, n = transformers' every n-th layer (the last option,
    every layer, also when nothing fits)."""
    options = checkpointing_options(shape.layers, selective)
    for index, (every, selective_) in enumerate(options):
        need = step_bytes(shape, tokens, pair_lengths, activation_bytes, recomputed_layers(shape.layers, every),
                          chunk_size, weights_on_device, selective_)
        if need <= budget or index == len(options) - 1:
            return every, selective_, need


def largest_micro_batch(lengths: list[tuple[int, int, int]], batch_size: int, packing: bool,
                        attention: str) -> tuple[int, list[tuple[int, int]]]:
    """(tokens of one model call, (prompt, rejected) lengths for the per-pair term) for the largest
    micro-batch the data can form: the `batch_size` longest pairs, `lengths` = (prompt, chosen,
    rejected) per pair. Packed: all pairs in one row; padded: chosen and rejected rows of the
    longest sequence; the dense-mask route counts its [T, T] mask as one pair with r = T."""
    longest = sorted(lengths, key=sum, reverse=True)[:batch_size]
    if not packing:
        return 2 * len(longest) * max(p + max(c, r) for p, c, r in longest), []
    tokens = sum(sum(pair) for pair in longest)
    if attention == "spans":
        return tokens, [(p, r) for p, _, r in longest]
    return tokens, [(0, tokens)]


def free_memory(device: torch.device, local_processes: int) -> int | None:
    """Bytes free on `device` for this process (a CPU's available memory shared by the processes of
    this machine), or None where orpo cannot tell (then it keeps checkpointing on)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil  # an accelerate dependency

        return psutil.virtual_memory().available // max(local_processes, 1)
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def step_budget(device: torch.device, local_processes: int, budget_gb: float | None) -> tuple[int | None, str]:
    """(bytes a training step may allocate on `device`, where that figure comes from): `budget_gb`, else
    `BUDGET_SHARE` of the free memory (a CPU's shared by the machine's processes); None where orpo cannot
    read the free memory."""
    if budget_gb is not None:
        return int(budget_gb * 1e9), "--memory_budget_gb"
    free = free_memory(device, local_processes)
    if free is None:
        return None, f"orpo cannot read the free memory of {device.type}"
    shared = f", shared by {local_processes} processes" if device.type == "cpu" and local_processes > 1 else ""
    return int(BUDGET_SHARE * free), f"{BUDGET_SHARE:.0%} of the {_gb(free)} free on {device.type}{shared}"


def plan_checkpointing(shape: DecoderShape, lengths: list[tuple[int, int, int]], batch_size: int, packing: bool,
                       attention: str, activation_bytes: int, chunk_size: int, weights_on_device: bool,
                       device: torch.device, local_processes: int, budget_gb: float | None,
                       selective: bool | None = None) -> tuple[int | None, bool, str]:
    """(every_n_layers or None for no checkpointing, selective recompute?, the reason for the run log) for a run
    on `device` whose training pairs have `lengths` (prompt, chosen, rejected), each process taking
    `batch_size` pairs per micro-batch; `budget_gb` None = `BUDGET_SHARE` of the free memory; `selective`
    None = orpo decides (`checkpointing_options`), True/False = the user's `selective_checkpointing`."""
    budget, where = step_budget(device, local_processes, budget_gb)
    if budget is None:
        return 1, bool(selective), f"on: {where}; --activation_checkpointing false turns it off"
    tokens, pair_lengths = largest_micro_batch(lengths, batch_size, packing, attention)
    every, selective, need = choose_checkpointing(shape, tokens, pair_lengths, activation_bytes, chunk_size,
                                                  weights_on_device, budget, selective)
    step = f"a step of the largest micro-batch ({tokens} tokens) needs about {_gb(need)}"
    if every is None:
        return None, False, f"off: {step}, within the budget of {_gb(budget)} ({where})"
    how = ("selective (matmul and attention outputs kept, the element-wise work recomputed)" if selective
           else "full recompute")
    if every > 1:
        return every, selective, (f"every {every} layers, {how} (activation_checkpointing_kwargs "
                                  f"every_n_layers={every}): {step} that way, within the budget of {_gb(budget)} "
                                  f"({where}); without recompute it would not fit")
    fits = "within" if need <= budget else "over"
    return 1, selective, f"on, every layer, {how}: {step} that way, {fits} the budget of {_gb(budget)} ({where})"


def plan_head_probs(shape: DecoderShape, lengths: list[tuple[int, int, int]], batch_size: int, packing: bool,
                    attention: str, activation_bytes: int, chunk_size: int, weights_on_device: bool,
                    device: torch.device, local_processes: int, budget_gb: float | None) -> tuple[bool, str]:
    """(keep the output head's softmax for backward?, the reason for the run log): yes where the largest
    micro-batch's step without recompute, plus that softmax (its tokens × vocabulary × 4 bytes, fp32;
    logprobs.token_logprobs(keep_probs=True)), fits the budget (`plan_checkpointing`'s arguments). Backward
    then skips the head's second matmul and log-softmax over the vocabulary."""
    budget, where = step_budget(device, local_processes, budget_gb)
    if budget is None:
        return False, f"recomputed in backward: {where}"
    tokens, pair_lengths = largest_micro_batch(lengths, batch_size, packing, attention)
    need = step_bytes(shape, tokens, pair_lengths, activation_bytes, (), chunk_size, weights_on_device)
    probs = head_probs_bytes(shape, tokens)
    if need + probs <= budget:
        return True, (f"kept from the forward ({_gb(probs)} for {tokens} tokens; the step then needs about "
                      f"{_gb(need + probs)}, within the budget of {_gb(budget)} ({where}))")
    return False, (f"recomputed in backward (keeping it, {_gb(probs)}, would bring the step to {_gb(need + probs)}, "
                   f"over the budget of {_gb(budget)} ({where}))")


def estimate_step(shape: DecoderShape, lengths: list[tuple[int, int, int]], batch_size: int, packing: bool,
                  attention: str, activation_bytes: int, chunk_size: int, weights_on_device: bool,
                  device: torch.device, local_processes: int, budget_gb: float | None,
                  every_n_layers: int | None, selective: bool, keep_head_probs: bool) -> tuple[int, int | None, str]:
    """(bytes, budget or None, one line) for the largest micro-batch's step as the run is set up (`plan_checkpointing`'s
    arguments, then its recompute: every n-th layer or None, selective or full; the head's softmax kept or not):
    what `orpo train --dry_run` prints, per device."""
    budget, where = step_budget(device, local_processes, budget_gb)
    tokens, pair_lengths = largest_micro_batch(lengths, batch_size, packing, attention)
    need = step_bytes(shape, tokens, pair_lengths, activation_bytes, recomputed_layers(shape.layers, every_n_layers),
                      chunk_size, weights_on_device, selective)
    if keep_head_probs:
        need += head_probs_bytes(shape, tokens)
    step = f"a step of the largest micro-batch ({tokens} tokens) needs about {_gb(need)} on {device.type}"
    if budget is None:
        return need, None, f"{step}; {where}, so whether it fits is not known"
    fits = "fits" if need <= budget else "does not fit"
    return need, budget, f"{step}: it {fits} the budget of {_gb(budget)} ({where})"
