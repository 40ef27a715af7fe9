"""Router load balancing (the auxiliary loss of mixture-of-experts models) for orpo's one model call.

A transformers MoE causal LM loaded with `output_router_logits=True` (Mixtral, Qwen2/3-MoE, OLMoE,
gpt-oss, Jamba, GraniteMoE, DBRX, PhiMoE, Qwen3-Next, ...) computes in its forward

    aux_loss = load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)

and adds `router_aux_loss_coef · aux_loss` to its loss only when it gets labels (orpo passes none).
That function reads `attention_mask` as a [rows, T] padding mask, so orpo's 4D masks (the span
layout's all-False [rows, 1, T, T] placeholder, the mask layout's dense mask) crash it. orpo
therefore calls the model with `output_router_logits=False` (the model computes no aux loss) and,
during that one call, takes the router logits from the model's own recorder
(`capture_router_logits`): the inner base model is asked for them through its public
`output_router_logits` argument, and its output's `router_logits` are kept. `router_aux_loss` then
computes the same loss over the tokens `router_token_mask` says count:

- prefix-shared layouts ("spans", "mask"): every real token once: the prompt once, chosen, rejected;
  the padded tail of a row never;
- padded layout: the non-padding tokens, except the prompt of each rejected row, which repeats the
  chosen row's prompt with the same hidden states (causal attention, same positions), so its router
  logits are the same. Each real token counts once in every layout: the loss does not depend on the
  route orpo picks for the model (as the NLL's prompt targets, taken once in the padded layout too).
  The model's own count (prompt twice) is `batch["attention_mask"]`.
"""
from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from orpo.errors import OrpoError
from orpo.ops.packing import REJECTED

# the parameters of the Switch Transformer load-balancing loss in every transformers family that has one
# (Doge's product-key variant takes num_keys as well and is not computed here)
SWITCH_PARAMETERS = ("gate_logits", "num_experts", "top_k", "attention_mask")


@dataclass(frozen=True)
class RouterBalancing:
    """The model's router load-balancing settings: the loss is `coef · router_aux_loss(...)`."""

    coef: float
    num_experts: int
    top_k: int


def router_balancing(lm: torch.nn.Module) -> RouterBalancing | None:
    """The router load-balancing loss `lm` adds in training, or None when it adds none.

    lm: the transformers causal LM itself (`forward.causal_lm(model)`, inside DDP/PEFT wrappers).
    On when its config has `output_router_logits` set (in config.json, or as a keyword of
    `from_pretrained`, e.g. through `model_init_kwargs`, which sets it on the config) and its family
    computes the loss: the values are what its forward passes to its `load_balancing_loss_func`
    (`lm.num_experts`, `lm.num_experts_per_tok`, and the coefficient `lm.router_aux_loss_coef`, JetMoE's
    `lm.aux_loss_coef`; the text config's fields for composite models that do not copy them). None
    for families whose `output_router_logits` only returns the logits (DeepSeek-V3, Llama 4: no such
    function). A family whose loss is not the Switch Transformer one (Doge) is refused in one line.
    """
    if not _router_logits_on(lm.config):
        return None
    text = lm.config.get_text_config()
    family_loss = _family_loss_function(lm)
    if family_loss is None:
        return None
    parameters = tuple(inspect.signature(family_loss).parameters)
    if parameters != SWITCH_PARAMETERS:
        raise OrpoError(
            f"{type(lm).__name__}: its router load-balancing loss ({', '.join(parameters)}) is not the Switch "
            "Transformer loss orpo computes; load the model with output_router_logits=False"
        )
    coef = _first(lm, text, ("router_aux_loss_coef", "aux_loss_coef"))
    num_experts = _first(lm, text, ("num_experts", "num_local_experts"))
    top_k = _first(lm, text, ("num_experts_per_tok",))
    if None in (coef, num_experts, top_k):
        raise OrpoError(f"{type(lm).__name__}: output_router_logits is set but orpo finds no router_aux_loss_coef, "
                        "num_experts or num_experts_per_tok on the model or its config")
    return RouterBalancing(coef=float(coef), num_experts=int(num_experts), top_k=int(top_k))


def _router_logits_on(config) -> bool:
    """config.output_router_logits, or its text config's (composite models)."""
    flag = getattr(config, "output_router_logits", None)
    return bool(flag if flag is not None else getattr(config.get_text_config(), "output_router_logits", False))


def _family_loss_function(lm: torch.nn.Module):
    """The `load_balancing_loss_func` of the modeling module that defines `lm`'s class (or a base class)."""
    for cls in type(lm).__mro__:
        function = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if callable(function):
            return function
    return None


def _first(lm, text_config, names: Sequence[str]):
    for source in (lm, text_config):
        for name in names:
            value = getattr(source, name, None)
            if value is not None and not isinstance(value, torch.nn.Module):
                return value
    return None


def router_logits_off(lm: torch.nn.Module) -> dict:
    """Keyword arguments that keep `lm` from computing router outputs of its own in a call:
    {"output_router_logits": False} when its forward takes that argument and its config turns it on,
    else {}. Every orpo call of such a model needs it (training, scoring, the route probe): the
    model's own aux loss reads orpo's 4D attention mask as a padding mask and fails (and a family
    that only returns the logits, AFMoE, would keep them for nothing). `capture_router_logits` takes
    them for orpo's own loss."""
    if _router_logits_on(lm.config) and "output_router_logits" in inspect.signature(lm.forward).parameters:
        return {"output_router_logits": False}
    return {}


@dataclass
class CapturedRouterLogits:
    """What `capture_router_logits` collected: one entry per call of the base model (orpo makes one)."""

    calls: list[tuple[torch.Tensor, ...]] = field(default_factory=list)

    @property
    def router_logits(self) -> tuple[torch.Tensor, ...]:
        """The router logits of the one call, in the order the model records them: one per router
        (Jamba: only its MoE layers; JetMoE: two per layer, attention and MLP experts), each
        [rows · T, num_experts] in the model's dtype, part of the autograd graph."""
        if len(self.calls) != 1:
            raise OrpoError(f"expected the router logits of one model call, got {len(self.calls)}")
        return self.calls[0]


@contextmanager
def capture_router_logits(lm: torch.nn.Module) -> Iterator[CapturedRouterLogits]:
    """Collect the router logits of the model call(s) made inside the block.

        with capture_router_logits(causal_lm(model)) as captured:
            out = model(**inputs, output_router_logits=False)   # the top-level call, as usual
        loss = router_aux_loss(captured.router_logits, router_token_mask(batch), s.num_experts, s.top_k)

    The top-level call must pass `output_router_logits=False`: the model then computes no aux loss of
    its own (which would read orpo's 4D attention mask as a padding mask and fail). Meanwhile the inner
    base model (`lm.base_model`, called by the causal LM's forward) is asked for its router logits
    through its `output_router_logits` keyword (a forward pre-hook), so transformers' own recorder
    collects them (the router module and output index each family declares), and a forward hook keeps
    them from its output. Both hooks are removed on exit; nothing else is changed. With activation
    checkpointing (non-reentrant, transformers' default) the recomputation in backward records nothing.
    """
    inner = lm.base_model
    if inner is lm:
        raise OrpoError(f"{type(lm).__name__}: no inner base model to take router logits from")
    captured = CapturedRouterLogits()

    def ask(module, args, kwargs):
        if kwargs.get("output_router_logits") is True:
            raise OrpoError("call the model with output_router_logits=False inside capture_router_logits: "
                            "its own aux loss would read orpo's attention mask as a padding mask")
        return args, {**kwargs, "output_router_logits": True}

    def keep(module, args, output):
        logits = getattr(output, "router_logits", None) if not isinstance(output, tuple) else None
        if not logits:
            raise OrpoError(f"{type(module).__name__} returned no router_logits; orpo cannot add its router loss")
        captured.calls.append(tuple(logits))

    handles = [inner.register_forward_pre_hook(ask, with_kwargs=True), inner.register_forward_hook(keep)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def router_aux_loss(
    router_logits: Sequence[torch.Tensor], token_mask: torch.Tensor, num_experts: int, top_k: int
) -> torch.Tensor:
    """The Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4–6) over the counted tokens.

    router_logits: per MoE layer, [N, num_experts] (or [rows, T, num_experts]), N = rows · T, any dtype.
    token_mask: [rows, T] (or [N]), True / 1 where a token counts; the same for every layer.
    Returns a scalar fp32:

        loss = E · Σ_e f_e · P_e
        f_e = (1 / (L·n)) Σ_layers Σ_counted tokens [e ∈ top-k(p)]   (fraction routed to e; top-k: Σ_e f_e = k)
        P_e = (1 / (L·n)) Σ_layers Σ_counted tokens p_e              (mean router probability of e)

    with p = softmax(router logits) in fp32, E experts, L layers, n counted tokens; f carries no
    gradient, P does. Equal to transformers' `load_balancing_loss_func(router_logits, E, k, mask)` given
    the equivalent 2D mask (without a mask: every token counts). It is k when routing and router
    probabilities are uniform over the experts, and grows as they concentrate on fewer experts.
    Computed on the first layer's device (layers under a device map are moved there).

    Example: 2 experts, top-1, 2 tokens, one layer, with router probabilities [0.75, 0.25] and
    [0.6, 0.4]: both tokens go to expert 0, so f = [1, 0], P = [0.675, 0.325] and the loss is
    2 · (1 · 0.675 + 0 · 0.325) = 1.35; counting only the first token, f = [1, 0], P = [0.75, 0.25]
    and the loss is 1.5.

    >>> logits = torch.tensor([[0.75, 0.25], [0.6, 0.4]]).log()
    >>> round(router_aux_loss([logits], torch.tensor([True, True]), num_experts=2, top_k=1).item(), 6)
    1.35
    >>> round(router_aux_loss([logits], torch.tensor([True, False]), num_experts=2, top_k=1).item(), 6)
    1.5
    """
    if len(router_logits) == 0:
        raise ValueError("router_aux_loss needs the router logits of at least one layer")
    device = router_logits[0].device
    weight = token_mask.reshape(-1).to(device=device, dtype=torch.float32)
    routed = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probability = torch.zeros(num_experts, dtype=torch.float32, device=device)
    for layer in router_logits:
        layer = layer.to(device).reshape(-1, layer.shape[-1])
        if layer.shape != (weight.shape[0], num_experts):
            raise ValueError(f"router logits of shape {tuple(layer.shape)} do not match {weight.shape[0]} tokens "
                             f"(the token mask) and {num_experts} experts")
        p = layer.float().softmax(-1)
        with torch.no_grad():  # elementwise products and sums, not matmuls: autocast leaves them in fp32
            chosen = torch.zeros_like(p).scatter_(1, p.topk(top_k, dim=-1).indices, 1.0)
            routed += (chosen * weight[:, None]).sum(0)
        probability = probability + (p * weight[:, None]).sum(0)
    counted = weight.sum() * len(router_logits)
    return num_experts * torch.sum((routed / counted) * (probability / counted))


def router_token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows, T] bool: the tokens of a packing.py batch whose routing counts (module docstring).

    Prefix-shared batches (with `pair_spans`: row, offset, p, c, r per pair): the p + c + r tokens of
    each pair. Padded batches: `attention_mask`, less the prompt positions of each rejected row (its
    first rejected target is predicted by the hidden state at p − 1; chosen rows keep their prompt).
    """
    rows, width = batch["input_ids"].shape
    device = batch["input_ids"].device
    if "pair_spans" in batch:
        spans = batch["pair_spans"].to(device)
        row, start = spans[:, 0], spans[:, 1]
        end = start + spans[:, 2:].sum(1)
        edges = torch.zeros(rows, width + 1, dtype=torch.long, device=device)
        edges.index_put_((row, start), torch.ones_like(row), accumulate=True)
        edges.index_put_((row, end), -torch.ones_like(row), accumulate=True)
        return edges.cumsum(1)[:, :width] > 0
    source = batch["target_source"][batch["target_kind"] == REJECTED].to(device)
    prompt_end = torch.zeros(rows, dtype=torch.long, device=device).scatter_reduce(
        0, source // width, source % width + 1, reduce="amin", include_self=False
    )
    return batch["attention_mask"].bool() & (torch.arange(width, device=device)[None, :] >= prompt_end[:, None])
