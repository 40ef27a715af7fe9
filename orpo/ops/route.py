"""Which batch layout each model is computed with, and why: the one home of that decision.

A route is a batch layout (packing.py) and an output head (forward.py), for one model:

    layout  "spans"   prefix-shared, span attention (attention.py): the prompt once, no dense mask (fastest)
            "mask"    prefix-shared, one dense 4D mask for the model's own attention (any attention
                      implementation that honours a 4D mask: eager, sinks, ...)
            "padded"  prompt+chosen and prompt+rejected as separate right-padded rows (the prompt twice)
            "encoder-decoder"  T5, BART (config.is_encoder_decoder): each prompt through the encoder once,
                      chosen and rejected as two decoder rows reading their pair's encoder states
    head    "chunked" the chunked head at target positions only (logprobs.py), no [T, vocab] logits
            "logits"  the model's own logits, gathered at the targets (exact for any head, more memory)
            "score"   a reward model's score head at each sequence's last token only (reward.py)

`choose_route` decides from the model's structure where it can be read, then confirms the choice
at start: the probe scores a few pairs on the route and compares their per-pair mean log-probs with
separate, unpadded forwards of [prompt + chosen] and [prompt + rejected] (the definition of the
ORPO quantities; an encoder-decoder model's: `model(input_ids=prompt, labels=completion)`); a reward model's
route is probed the same way with its rewards (reward.separate_rewards: the model's own call on each sequence).
A route that disagrees is not used: the next one is probed and the log says why.

Why structure first: prefix sharing lays chosen and rejected out in one row, so a layer whose state
runs along the sequence (Mamba/SSM, linear attention such as gated DeltaNet, short causal
convolutions, RG-LRU) would carry the chosen answer's state into the rejected one. Such a leak can
be small on a random model and larger on a trained one, so a model with such layers never gets a
prefix-shared route, whatever a probe says; the probe is the second line, for anything the
structure does not show (a model that ignores position ids, a head the chunked head misses).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from orpo.data.render import TokenizedPair
from orpo.errors import OrpoError
from orpo.ops.attention import ATTENTION, sliding_window, use_span_attention
from orpo.ops.forward import (batch_collator, batch_to, causal_lm, chunked_head_reason, input_device,
                              is_encoder_decoder, is_reward_model, pair_logps)
from orpo.ops.reward import pair_rewards, separate_rewards
from orpo.ops.vision import reference_inputs

LAYOUTS = ("spans", "mask", "padded", "encoder-decoder")
HEADS = ("chunked", "logits")
REWARD_HEAD = "score"  # a reward model's head: its score at each sequence's last token (reward.py)


@dataclass(frozen=True)
class Route:
    """How one model's batches are laid out and its target log-probs computed (module docstring)."""

    layout: str = "spans"
    head: str = "chunked"
    reason: str = ""

    @property
    def packing(self) -> bool:
        """True for the prefix-shared layouts (a decoder-only model's prompt computed once)."""
        return self.layout in ("spans", "mask")

    @property
    def attention(self) -> str:
        """The prefix-shared attention ("spans" or "mask"); "spans" (unused) for the padded layout."""
        return self.layout if self.packing else "spans"

    def describe(self) -> str:
        name = {"spans": "prefix-shared spans", "mask": "prefix-shared mask", "padded": "padded",
                "encoder-decoder": "encoder-decoder"}[self.layout]
        head = {"chunked": "", "logits": ", the model's own logits",
                "score": ", the score head at each answer's last token"}[self.head]
        return f"{name}{head}: {self.reason}" if self.reason else f"{name}{head}"


# Layer kinds whose output at a position depends on a state carried along the sequence (not only on
# attention, which the layouts control): config.layer_types values and module class names.
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention", "global",
                          "local", "hybrid", "mlp", "moe"}  # and layers with no sequence mixing at all
_STATEFUL_CLASS = re.compile(r"Rglru|Rwkv|Lstm|DeltaNet|LinearAttention|ShortConv|SSM|Mixer$")


def sequence_state_layers(lm: torch.nn.Module) -> list[str]:
    """Names of the kinds of layer in `lm` that carry state along the sequence (sorted; [] for an
    attention-only model): non-attention `layer_types` of the config, and the classes of modules
    named like SSM / linear-attention / recurrent / short-convolution blocks or holding a
    torch.nn.Conv1d (a convolution over the sequence; GPT-2's Conv1D is a linear layer, not one)."""
    found = set()
    config = lm.config.get_text_config()
    for name in ("layer_types", "layers_block_type", "block_types"):
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)):
            found |= {v for v in values if isinstance(v, str) and v not in _ATTENTION_LAYER_TYPES}
    for module in lm.modules():
        convolves = any(isinstance(child, torch.nn.Conv1d) for child in module.children())
        if convolves or _STATEFUL_CLASS.search(type(module).__name__):
            found.add(type(module).__name__)
    return sorted(found)


def candidate_routes(lm: torch.nn.Module, packing: bool | None, attention: str | None) -> list[Route]:
    """The routes to probe for `lm`, in order of preference, each with its reason.

    packing / attention: the config fields (`packing`, `packed_attention`); None = orpo chooses.
    Forced (either given), only the layouts they name are candidates; a prefix-shared layout forced
    on a model whose layers carry state along the sequence is refused here, before any probe.
    Each layout is tried with the chunked head, then with the model's own logits; only with those
    where the chunked head cannot reproduce the model's head (forward.chunked_head_reason). An encoder-decoder
    model has one layout, "encoder-decoder"; --packing or --packed_attention set for it is refused here."""
    encoder_decoder = is_encoder_decoder(lm)
    stateful = [] if encoder_decoder else sequence_state_layers(lm)
    kinds = ", ".join(stateful)
    if encoder_decoder:
        if packing is not None or attention is not None:
            flag = f"--packing {str(packing).lower()}" if packing is not None else f"--packed_attention {attention}"
            raise OrpoError(f"{type(lm).__name__}: {flag} chooses a decoder-only layout, and this is an "
                            "encoder-decoder model (its prompt goes through the encoder once per pair, chosen and "
                            "rejected through the decoder); leave --packing and --packed_attention unset")
        layouts = [("encoder-decoder", "encoder-decoder model: each prompt through the encoder once, chosen and "
                                       "rejected as two decoder rows reading its states")]
    elif packing is False:
        layouts = [("padded", "--packing false")]
    elif stateful:
        if packing or attention:
            flag = "--packing true" if packing else f"--packed_attention {attention}"
            raise OrpoError(f"{type(lm).__name__}: {flag} lays chosen and rejected out in one row, but the model's "
                            f"{kinds} layers carry state along the sequence (the chosen answer would leak into the "
                            "rejected one); leave --packing and --packed_attention unset and orpo picks a route that "
                            "keeps each sequence apart")
        layouts = [("padded", f"the model's {kinds} layers carry state along the sequence, so each sequence gets a "
                              "row of its own (in a shared row the chosen answer's state would reach the rejected one)")]
    elif attention is not None:
        layouts = [(attention, f"--packed_attention {attention}")]
    elif (impl := lm.config.get_text_config()._attn_implementation) not in ("sdpa", ATTENTION):
        layouts = [("mask", f"the model runs {impl!r} attention, which takes the "
                            "prefix-shared layout as a dense mask")]
    else:
        layouts = [("spans", "attention-only model with SDPA"), ("mask", "attention-only model")]
    if packing is None and attention is None and not stateful and not encoder_decoder:
        layouts.append(("padded", "no prefix-shared layout reproduced the model's separate forwards"))
    elif packing is True and attention is None and not stateful:
        layouts = [(layout, "--packing true") for layout, _ in layouts]
    if is_reward_model(lm):
        return [Route(layout, REWARD_HEAD, reason) for layout, reason in layouts]
    head_problem = chunked_head_reason(lm)  # None: the chunked head reproduces the model's logits
    heads = HEADS if head_problem is None else ("logits",)
    extra = "" if head_problem is None else f"; the model's own logits: {head_problem}"
    return [Route(layout, head, reason + extra) for head in heads for layout, reason in layouts]


_MULTIMODAL_WORDS = ("image", "video", "vision", "audio", "boi", "eoi", "boa", "eoa")


def probe_pairs(lm: torch.nn.Module) -> list[TokenizedPair]:
    """Three seeded random pairs, long enough to cross a sliding window of up to 1000 tokens (and
    any short convolution or recurrent state), with unequal prompt/chosen/rejected lengths and a
    one-token chosen answer; no sequence is longer than the model's positions; text only (no image or
    video placeholder ids)."""
    config = lm.config.get_text_config()
    vocab = config.vocab_size
    windows = [w for w in (sliding_window(config), getattr(config, "attention_window_size", None)) if w]
    window = min(windows) if windows else 0
    n = max(48, window + 16) if window <= 1000 else 48
    n = min(n, getattr(config, "max_position_embeddings", None) or n)  # the longest sequence is n tokens
    rng = torch.Generator().manual_seed(0)
    # a vision-language model's image/video placeholder ids would ask for images the probe does not have
    multimodal = {value for key, value in vars(lm.config).items() if isinstance(value, int)
                  and key.endswith(("_token_id", "_token_index")) and any(w in key for w in _MULTIMODAL_WORDS)}
    plain = next(i for i in range(3, max(vocab, 4) + len(multimodal) + 1) if i not in multimodal)

    def ids(k: int) -> list[int]:
        return [plain if i in multimodal else i for i in torch.randint(3, max(vocab, 4), (k,), generator=rng).tolist()]

    shapes = [(n // 2, n // 2 - 3, n // 2 - 7), (5, n // 3, n // 2), (n // 3, 1, 4)]
    return [TokenizedPair(ids(p), ids(c), ids(r), index=i) for i, (p, c, r) in enumerate(shapes)]


def image_probe_pairs(pairs, count: int = 2, scan: int = 64, answer_tokens: int = 16) -> list[TokenizedPair]:
    """Up to `count` pairs with images among the first `scan` of `pairs` (a PairTable or a list), their
    answers cut to `answer_tokens` (the prompt, image tokens and all, as it is): what the route is probed
    with for images, cheaply."""
    found = []
    for i in range(min(scan, len(pairs))):
        pair = pairs[i]
        if pair.vision_inputs:
            found.append(TokenizedPair(pair.prompt_ids, pair.chosen_ids[:answer_tokens],
                                       pair.rejected_ids[:answer_tokens], pair.index, pair.images, pair.vision_inputs))
            if len(found) == count:
                break
    return found


@torch.no_grad()
def separate_logp_means(model: torch.nn.Module, pairs: list[TokenizedPair]) -> torch.Tensor:
    """[pairs, 2] fp32 mean log-prob of the chosen and the rejected completion tokens, each sequence
    (prompt + completion) in a model call of its own: batch 1, no padding, no mask, the model's logits
    with an fp32 log-softmax; a pair's images as its processor gives them, the model computing its own
    positions; an encoder-decoder model called as `model(input_ids=prompt, labels=completion)`, its own shift of
    the labels into the decoder's input. The definition the routes are held to."""
    device = input_device(model)
    lm = causal_lm(model)
    means = []
    for pair in pairs:
        if is_encoder_decoder(lm):
            prompt = torch.tensor([pair.prompt_ids], device=device)
            row = []
            for completion in (pair.chosen_ids, pair.rejected_ids):
                labels = torch.tensor([completion], device=device)
                logp = model(input_ids=prompt, labels=labels, use_cache=False).logits[0].float().log_softmax(-1)
                row.append(logp.gather(1, labels[0, :, None]).mean())
            means.append(torch.stack(row))
            continue
        p = len(pair.prompt_ids)
        row = []
        for completion in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([pair.prompt_ids + completion], device=device)
            extra = batch_to(reference_inputs(lm, ids, pair.vision_inputs), device)
            logp = model(input_ids=ids, use_cache=False, **extra).logits[0, p - 1 : -1].float().log_softmax(-1)
            row.append(logp.gather(1, ids[0, p:, None]).mean())
        means.append(torch.stack(row))
    return torch.stack(means).cpu()


@torch.no_grad()
def route_logp_means(model: torch.nn.Module, pairs: list[TokenizedPair], route: Route) -> torch.Tensor:
    """[pairs, 2] the same quantities as `separate_logp_means`, computed on `route` (one call)."""
    batch = batch_collator(model, 0, route.layout)(pairs)  # the collator training and scoring use
    logps = pair_logps(model, batch_to(batch, input_device(model)), 64, head=route.head)
    return torch.stack([logps.logps_chosen, logps.logps_rejected], dim=1).float().cpu()


def reference_values(model: torch.nn.Module, pairs: list[TokenizedPair]) -> torch.Tensor:
    """[pairs, 2] what a route must reproduce: the mean log-probs of each pair's answers (`separate_logp_means`), a
    reward model's rewards (`reward.separate_rewards`)."""
    return separate_rewards(model, pairs) if is_reward_model(model) else separate_logp_means(model, pairs)


@torch.no_grad()
def route_values(model: torch.nn.Module, pairs: list[TokenizedPair], route: Route) -> torch.Tensor:
    """[pairs, 2] the same quantities as `reference_values`, computed on `route` (one call)."""
    if not is_reward_model(model):
        return route_logp_means(model, pairs, route)
    batch = batch_collator(model, 0, route.layout)(pairs)
    rewards = pair_rewards(model, batch_to(batch, input_device(model)))
    return torch.stack([rewards.chosen, rewards.rejected], dim=1).float().cpu()


def probe_tolerance(dtype: torch.dtype) -> float:
    """Largest |Δ mean log-prob| per token, relative to max(1, |mean log-prob|), that counts as the
    same result for a model in `dtype`. Exact routes differ from separate forwards by kernel and
    summation order only: ≤ 2e-7 in fp32 on tiny Llama, Qwen2/3, Mistral and Gemma
    (tests/ops/test_route.py); leaks of state across sequences measured 1e-4 and more. bf16/fp16
    models round every activation (2^-8 / 2^-11 relative), so their bound is that much wider."""
    return {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 3e-3}.get(dtype, 2e-2)


def probe_route(model: torch.nn.Module, route: Route, pairs: list[TokenizedPair], expected: torch.Tensor) -> str | None:
    """None if `route` reproduces `expected` (reference_values of `pairs`) within the tolerance of
    the model's dtype; else why not, in a few words."""
    try:
        got = route_values(model, pairs, route)
    except OrpoError as err:
        return str(err)
    except Exception as err:  # a model that rejects a 4D mask, the spans or position ids
        return f"{type(err).__name__}: {str(err)[:120]}"
    lm = causal_lm(model)
    tolerance = probe_tolerance(lm.dtype)
    if not torch.isfinite(got).all():
        return f"non-finite values {got.tolist()}"
    error = ((got - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
    if error > tolerance:
        what = "rewards" if is_reward_model(model) else "mean log-probs"
        return f"per-pair {what} differ from separate forwards by {error:.1e} (tolerance {tolerance:.0e})"
    return None


def choose_route(model: torch.nn.Module, packing: bool | None = None, attention: str | None = None,
                 image_pairs: list[TokenizedPair] = ()) -> Route:
    """The first candidate route (`candidate_routes`) that reproduces separate forwards of the probe
    pairs, with the model set up for it (span attention switched on for "spans"). A forced route
    (`packing` False, or `attention` given) that does not is refused in one line; so is a model no
    route reproduces. The model's train/eval mode is restored. `image_pairs`: a vision-language model's
    pairs with images (a few of the data's: `image_probe_pairs`), probed beside the text pairs."""
    lm = causal_lm(model)
    name = type(lm).__name__
    candidates = candidate_routes(lm, packing, attention)
    pairs = probe_pairs(lm) + list(image_pairs)
    was_training = model.training
    model.eval()
    failures = []
    try:
        expected = reference_values(model, pairs)
        for route in candidates:
            if route.layout == "spans":
                use_span_attention(lm)
            problem = probe_route(model, route, pairs, expected)
            if problem is None:
                reason = route.reason
                if image_pairs:
                    reason += f" (probed with {len(image_pairs)} of the data's image pairs too)"
                if failures:
                    reason += f" (not {'; not '.join(failures)})"
                return Route(route.layout, route.head, reason)
            failures.append(f"{Route(route.layout, route.head).describe()}: {problem}")
    finally:
        model.train(was_training)
    if packing is not None or attention is not None:
        raise OrpoError(f"{name}: the forced route ({candidates[0].reason}) does not reproduce the model's separate "
                        f"forwards ({failures[0]}); leave --packing and --packed_attention unset and orpo picks a route "
                        "that does")
    raise OrpoError(f"{name}: no batch layout reproduces the model's separate forwards ({'; '.join(failures)})")
