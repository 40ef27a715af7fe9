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
| activations of the layers not in every n-th | `every_n_layers = n` (transformers checkpoints layers 0, n, 2n, ...) |
| neither | on, every layer |

The estimate (bytes a decoder layer saves for backward, `a` = bytes of an activation: 2 in bf16
or fp16 autocast, else the weights'; h = hidden size, i = MLP width, kv = key/value width):

    per token:  a · (4i + 2kv + c·h) + 8h · norms
                4i: the gated MLP's gate, up, activation and product; 2kv: keys and values;
                c·h: query, attention output and the projections' inputs (c = 5; 8 in autocast,
                which keeps low-precision copies of the fp32 values that feed matmuls);
                8h per norm: its fp32 input and output (Llama: 2 norms, Gemma 3: 6)
    per pair:   a · (p + r) · (2kv + r)    span attention's rejected part: its keys/values with the
                                           prompt's, and its r × (p + r) mask (p, r: prompt, rejected)

Measured against the saved-tensor bytes of one forward (tests/train/test_memory.py): 0.998-1.002 on
SmolLM2-135M, within 15% on Llama, Mistral, Qwen2/3 and Gemma 3 blocks, fp32 and bf16 autocast. Against
a whole step's measured peak on an H100 (benchmarks/gpu_smoke.py) the estimate is 1.2-1.5x: allocator
and optimizer transients are covered with room to spare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BUDGET_SHARE = 0.8  # of the free memory at start: room for the allocator's fragmentation and other processes
OPTIMIZER_BYTES = 8  # per trainable parameter: AdamW's two fp32 moments


@dataclass(frozen=True)
class DecoderShape:
    """What the estimate needs of a model: layers, hidden size, MLP width, key/value width, vocabulary,
    norms per layer, parameter counts (all, trainable, and the bytes of one weight element)."""

    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    norms_per_layer: int
    params: int
    trainable: int
    weight_bytes: int


def decoder_shape(model: torch.nn.Module, config) -> DecoderShape:
    """`DecoderShape` of a causal LM `model` with text config `config` (transformers' names)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layer = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == config.num_hidden_layers),
                 None)
    norms = 2 if layer is None else sum(1 for m in layer[0].modules() if "norm" in type(m).__name__.lower())
    params = list(model.parameters())
    return DecoderShape(
        layers=config.num_hidden_layers, hidden=hidden,
        intermediate=getattr(config, "intermediate_size", None) or 4 * hidden, kv_width=kv_heads * head_dim,
        vocab=config.vocab_size, norms_per_layer=norms, params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad), weight_bytes=params[0].element_size(),
    )


def layer_activation_bytes(shape: DecoderShape, tokens: int, pair_lengths: list[tuple[int, int]],
                           activation_bytes: int) -> int:
    """Bytes one decoder layer keeps for backward (module formula) for `tokens` tokens in one call,
    `pair_lengths` the (prompt, rejected) lengths of its pairs in the span layout ([] otherwise)."""
    a, h = activation_bytes, shape.hidden
    c = 8 if a < 4 else 5
    per_token = a * (4 * shape.intermediate + 2 * shape.kv_width + c * h) + 8 * h * shape.norms_per_layer
    per_pair = sum(a * (p + r) * (2 * shape.kv_width + r) for p, r in pair_lengths)
    return tokens * per_token + per_pair


def step_bytes(shape: DecoderShape, tokens: int, pair_lengths: list[tuple[int, int]], activation_bytes: int,
               checkpointed_layers: int, chunk_size: int, weights_on_device: bool) -> int:
    """Memory a training step allocates on its device beyond what is in use before training, with
    `checkpointed_layers` of the layers recomputed (they keep only their fp32 input, and backward
    recomputes one layer at a time)."""
    layer = layer_activation_bytes(shape, tokens, pair_lengths, activation_bytes)
    kept = (shape.layers - checkpointed_layers) * layer + tokens * shape.hidden * (8 + activation_bytes)  # final norm, head input
    if checkpointed_layers:
        kept += checkpointed_layers * tokens * shape.hidden * 4 + layer
    head_chunk = min(chunk_size, tokens) * shape.vocab * (8 + activation_bytes)  # fp32 logits and probs, one chunk
    autocast_copies = shape.params * activation_bytes if activation_bytes < shape.weight_bytes else 0
    training_state = shape.trainable * (shape.weight_bytes + OPTIMIZER_BYTES)  # gradients, optimizer
    weights = 0 if weights_on_device else shape.params * shape.weight_bytes
    return kept + head_chunk + autocast_copies + training_state + weights


def choose_checkpointing(shape: DecoderShape, tokens: int, pair_lengths: list[tuple[int, int]],
                         activation_bytes: int, chunk_size: int, weights_on_device: bool,
                         budget: int) -> tuple[int | None, int]:
    """(every_n_layers, estimated bytes) of the fewest checkpointed layers whose step fits `budget`:
    None = no checkpointing, n = transformers' every n-th layer (1 = every layer, also when nothing fits)."""
    options = [(None, 0)] + [(every, math.ceil(shape.layers / every)) for every in range(shape.layers, 0, -1)]
    for every, checkpointed in options:  # fewest checkpointed layers first; the last, every == 1, always returns
        need = step_bytes(shape, tokens, pair_lengths, activation_bytes, checkpointed, chunk_size, weights_on_device)
        if need <= budget or every == 1:
            return every, need


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


def plan_checkpointing(shape: DecoderShape, lengths: list[tuple[int, int, int]], batch_size: int, packing: bool,
                       attention: str, activation_bytes: int, chunk_size: int, weights_on_device: bool,
                       device: torch.device, local_processes: int, budget_gb: float | None) -> tuple[int | None, str]:
    """(every_n_layers or None for no checkpointing, the reason for the run log) for a run on
    `device` whose training pairs have `lengths` (prompt, chosen, rejected), each process taking
    `batch_size` pairs per micro-batch; `budget_gb` None = `BUDGET_SHARE` of the free memory."""
    if budget_gb is not None:
        budget, where = int(budget_gb * 1e9), "--memory_budget_gb"
    else:
        free = free_memory(device, local_processes)
        if free is None:
            return 1, (f"on: orpo cannot read the free memory of {device.type}; "
                       "--activation_checkpointing false turns it off")
        budget = int(BUDGET_SHARE * free)
        shared = f", shared by {local_processes} processes" if device.type == "cpu" and local_processes > 1 else ""
        where = f"{BUDGET_SHARE:.0%} of the {_gb(free)} free on {device.type}{shared}"
    tokens, pair_lengths = largest_micro_batch(lengths, batch_size, packing, attention)
    every, need = choose_checkpointing(shape, tokens, pair_lengths, activation_bytes, chunk_size, weights_on_device,
                                       budget)
    step = f"a step of the largest micro-batch ({tokens} tokens) needs about {_gb(need)}"
    if every is None:
        return None, f"off: {step}, within the budget of {_gb(budget)} ({where})"
    if every > 1:
        return every, (f"every {every} layers (activation_checkpointing_kwargs every_n_layers={every}): {step} "
                       f"that way, within the budget of {_gb(budget)} ({where}); without recompute it would not fit")
    fits = "within" if need <= budget else "over"
    return 1, f"on, every layer: {step} that way, {fits} the budget of {_gb(budget)} ({where})"
