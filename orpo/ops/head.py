"""The output head at target positions only, computed as the head module's own call.

Reading `lm_head.weight` outside the head's call is wrong wherever an engine shards the weights:
FSDP2 with the head in a unit of its own (reshard after forward) and DeepSpeed ZeRO-3 hold only
this rank's shard there between calls, and gather the full weight only while the module runs (for
its forward, and again for its backward). So `chunked_head` swaps the head module's `forward`, for
one model call, for the chunked log-prob computation (`logprobs.token_logprobs`): the model calls
its head as always (with `logits_to_keep=0`: hidden states of every position), every engine hook
on the module runs (gather before, reshard after, the gradient reduce in backward), and the head
returns [N] target log-probs in place of [rows, T, vocab] logits, which are never kept.

A peft LoRA adapter on the head (`lora.Linear`) is part of the same computation: for each active
adapter a, the logits gain s_a · B_a · A_a · dropout_a(h), passed as the low-rank term of
`token_logprobs` (u = concat_a s_a · A_a · dropout_a(h), B = concat_a B_a), so the adapter trains.
The peft members read here (`get_base_layer`, `lora_A`, `lora_B`, `scaling`, `lora_dropout`,
`active_adapters`, `merged`, `disable_adapters`, `lora_variant`; `ModulesToSaveWrapper`'s
`modules_to_save` and `original_module`) are checked by tests/ops/test_head.py.

Some families change what their head returns before they return it as logits (Gemma 2/3 soft-cap
it, Cohere multiplies it by `logit_scale`, Granite divides it by `logits_scaling`); applied to our
[N] log-probs that would silently give wrong numbers. `POST_HEAD` names, per family, where its
forward reads that transform (the one place that contract with transformers is written down,
checked per family by tests/ops/test_head.py). During the call `neutral_post_head` sets it to its
neutral value and the chunked head applies it itself, once, before the log-softmax
(`post_head_transform` → `token_logprobs(scale=, softcap=)`). A head's bias (Phi) is read from
its Linear. A model whose head or transform is not known here is refused (`unsupported_reason`);
its own logits (forward.pair_logps(head="logits")) are exact for it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from orpo.errors import OrpoError
from orpo.ops.logprobs import autocast_dtype, token_logprobs


@dataclass(frozen=True)
class PostHead:
    """How one family's *ForCausalLM.forward changes its head's output a into logits z.

    owner: "config" (`lm.config.<name>`, read at every forward) or "module" (`lm.<name>`, copied
      from the config at construction and read at every forward).
    kind: "softcap" z = v · tanh(a / v) (v None: z = a); "multiply" z = a · v; "divide" z = a / v."""

    owner: str
    name: str
    kind: str

    @property
    def neutral(self) -> float | None:
        """The value that makes the family's forward return its head's output unchanged."""
        return None if self.kind == "softcap" else 1.0


# The transformers contract: which attribute each family's forward applies after `self.lm_head(h)`
# (read in transformers 5.24's modeling_*.py; tests/ops/test_head.py checks each on a tiny model).
# Looked up along the class's MRO, so FSDP2's FSDP<Name> subclasses match.
POST_HEAD: dict[str, PostHead] = {
    "Gemma2ForCausalLM": PostHead("config", "final_logit_softcapping", "softcap"),
    "Gemma3ForCausalLM": PostHead("config", "final_logit_softcapping", "softcap"),
    "VaultGemmaForCausalLM": PostHead("config", "final_logit_softcapping", "softcap"),
    "NanoChatForCausalLM": PostHead("config", "final_logit_softcapping", "softcap"),
    "CohereForCausalLM": PostHead("module", "logit_scale", "multiply"),
    "Cohere2ForCausalLM": PostHead("module", "logit_scale", "multiply"),
    "Cohere2MoeForCausalLM": PostHead("module", "logit_scale", "multiply"),
    "GraniteForCausalLM": PostHead("config", "logits_scaling", "divide"),
    "GraniteSWAForCausalLM": PostHead("config", "logits_scaling", "divide"),
    "GraniteMoeForCausalLM": PostHead("config", "logits_scaling", "divide"),
    "GraniteMoeSharedForCausalLM": PostHead("config", "logits_scaling", "divide"),
    "GraniteMoeHybridForCausalLM": PostHead("config", "logits_scaling", "divide"),
    "GraniteMoeSWAForCausalLM": PostHead("config", "logits_scaling", "divide"),
}
# Attributes by which a family outside POST_HEAD may change its head's output (looked for on the
# model, its config and its text config; names from transformers 5.24's causal LMs): a value other
# than None / 1 there makes the chunked head unsupported for it.
TRANSFORM_NAMES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "logit_softcap",
                   "lm_head_multiplier", "final_logits_bias", "unpadded_vocab_size")


@dataclass(frozen=True)
class HeadTransform:
    """z = softcap · tanh(scale · a / softcap), or z = scale · a without a softcap (logprobs.py)."""

    scale: float = 1.0
    softcap: float | None = None


def _family(lm: torch.nn.Module) -> PostHead | None:
    return next((POST_HEAD[c.__name__] for c in type(lm).__mro__ if c.__name__ in POST_HEAD), None)


def _owner(lm: torch.nn.Module, spec: PostHead):
    return lm.config if spec.owner == "config" else lm


def _read(lm: torch.nn.Module, spec: PostHead):
    owner = _owner(lm, spec)
    if not hasattr(owner, spec.name):
        where = "config." if spec.owner == "config" else ""
        raise OrpoError(f"{type(lm).__name__} has no {where}{spec.name}, which orpo reads its logits' transform "
                        "from: this transformers release changed the model (orpo/ops/head.py: POST_HEAD)")
    return getattr(owner, spec.name)


def post_head_transform(lm: torch.nn.Module) -> HeadTransform:
    """The transform `lm` (a transformers *ForCausalLM) applies to its head's output, as a HeadTransform.
    OrpoError for a model that transforms it in a way POST_HEAD does not describe."""
    spec = _family(lm)
    if spec is None:
        if reason := _unknown_transform(lm):
            raise OrpoError(reason)
        return HeadTransform()
    value = _read(lm, spec)
    if value is None:
        return HeadTransform()
    if spec.kind == "softcap":
        return HeadTransform(softcap=float(value))
    return HeadTransform(scale=float(value) if spec.kind == "multiply" else 1.0 / float(value))


def _unknown_transform(lm: torch.nn.Module) -> str | None:
    text_config = lm.config.get_text_config()
    for owner in (lm, lm.config) if text_config is lm.config else (lm, lm.config, text_config):
        for name in TRANSFORM_NAMES:
            value = getattr(owner, name, None)
            if value is not None and not (isinstance(value, (int, float)) and value == 1):
                where = "" if owner is lm else "config."
                shown = f" (a {list(value.shape)} tensor)" if isinstance(value, torch.Tensor) else f"={value!r:.40}"
                return (f"{type(lm).__name__} has {where}{name}{shown}: its forward may change its head's "
                        "output in a way orpo's chunked head does not know")
    return None


@contextmanager
def neutral_post_head(lm: torch.nn.Module):
    """While active, `lm`'s forward returns its head's output without its family's transform (POST_HEAD);
    the previous value is restored on exit, also on an exception."""
    spec = _family(lm)
    if spec is None:
        yield
        return
    owner, value = _owner(lm, spec), _read(lm, spec)
    setattr(owner, spec.name, spec.neutral)
    try:
        yield
    finally:
        setattr(owner, spec.name, value)


def unsupported_reason(lm: torch.nn.Module) -> str | None:
    """None if the chunked head computes `lm`'s logits (a Linear head, a known or no transform), else why not."""
    head = lm.get_output_embeddings()
    if head is None:
        return f"{type(lm).__name__} has no output head (get_output_embeddings() is None)"
    try:
        _head_parts(head)
    except OrpoError as err:
        return f"{type(lm).__name__}: {err}"
    try:
        post_head_transform(lm)
    except OrpoError as err:
        return str(err)
    return None


@contextmanager
def chunked_head(lm: torch.nn.Module, target_source: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                 keep_probs: bool = False):
    """While active, `lm` (a transformers *ForCausalLM) called with `logits_to_keep=0` returns as its
    logits the [N] fp32 log-probs of `targets` [N] predicted at the flat positions `target_source` [N]
    (indices into rows·T): its head (`get_output_embeddings()`, possibly wrapped by peft or sharded
    by FSDP2/ZeRO-3), called with hidden states [rows, T, H], computes them, with the family's
    transform of the logits (POST_HEAD) applied inside and neutralised in the model's forward.
    keep_probs: logprobs.token_logprobs' (the softmax kept for backward instead of recomputed)."""
    head = lm.get_output_embeddings()
    transform = post_head_transform(lm)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_source)
        return _chunked_forward(head, selected, targets, chunk_size, transform, keep_probs)

    with neutral_post_head(lm):
        head.forward = forward  # an instance attribute: nn.Module.__call__ runs it between the hooks
        try:
            yield
        finally:
            del head.forward  # the class's forward again


def _chunked_forward(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                     transform: HeadTransform, keep_probs: bool):
    linear, adapters = _head_parts(head)
    weight = linear.weight
    if _is_shard(weight):
        raise OrpoError(
            f"the output head's weight is not gathered while its module runs ({type(weight).__name__} of shape "
            f"{tuple(weight.shape)}); shard lm_head as one unit (FSDP2: fully_shard(lm_head), or leave it in the root)"
        )
    dtype = autocast_dtype(hidden.device, weight.dtype)
    post = dict(bias=linear.bias, scale=transform.scale, softcap=transform.softcap, keep_probs=keep_probs)
    if not adapters:
        return token_logprobs(hidden, weight, targets, chunk_size, compute_dtype=dtype, **post)
    low_rank_in = torch.cat([scaling * (dropout(hidden).to(a.dtype) @ a.T) for a, _, scaling, dropout in adapters], 1)
    low_rank_out = torch.cat([b for _, b, _, _ in adapters], 1)
    return token_logprobs(hidden, weight, targets, chunk_size, low_rank_in, low_rank_out, compute_dtype=dtype, **post)


def _is_shard(weight: torch.Tensor) -> bool:
    """True for a weight that is only this rank's part: ZeRO-3 leaves an empty tensor, FSDP2 a DTensor."""
    if weight.numel() == 0:
        return True
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        return isinstance(weight, DTensor)
    return False


def _linear(module: torch.nn.Module) -> torch.nn.Linear:
    if not isinstance(module, torch.nn.Linear):
        raise OrpoError(f"the output head is a {type(module).__name__}, not a Linear: "
                        "orpo's chunked head cannot compute it")
    return module


def _head_parts(head: torch.nn.Module):
    """(the Linear whose weight [and bias] maps hidden → vocab, [(A [r, H], B [V, r], scaling, dropout)]
    of the active LoRA adapters) of a plain, peft-LoRA or peft modules_to_save head."""
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # peft ModulesToSaveWrapper
        active = head.active_adapters
        module = head.modules_to_save[active[0]] if active and not head.disable_adapters else head.original_module
        return _linear(module), []
    if not hasattr(head, "lora_A"):
        return _linear(head), []
    base = _linear(head.get_base_layer())
    if head.disable_adapters or head.merged:  # merged: the adapter is inside the base weight
        return base, []
    adapters = []
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}):
            raise OrpoError(f"LoRA variant {type(head.lora_variant[name]).__name__} (e.g. DoRA) on the output head "
                            "is not supported; leave lm_head out of the target modules")
        if head.lora_B[name].bias is not None:
            raise OrpoError("LoRA with a bias on the output head is not supported (lora_bias=False)")
        adapters.append((head.lora_A[name].weight, head.lora_B[name].weight, head.scaling[name], head.lora_dropout[name]))
    return base, adapters
