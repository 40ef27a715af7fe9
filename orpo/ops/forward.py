"""One model call per batch → per-pair completion log-probs and NLL sums.

The model is called through its top-level forward, so DDP/FSDP/DeepSpeed wrappers and PEFT see a
normal call. During that call its output head computes, instead of [rows, T, vocab] logits, the
log-probs of the target tokens only, chunk by chunk (`head.chunked_head`): the head runs once, as
the model's own call of it, so whatever engine shards its weight gathers it as usual.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from orpo.errors import OrpoError
from orpo.ops.attention import sliding_window, use_span_attention
from orpo.ops.head import chunked_head
from orpo.ops.packing import CHOSEN, PROMPT, REJECTED, collate_padded, collate_prefix_shared, segment_sums
from orpo.data.render import TokenizedPair


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside DDP/PEFT/accelerate wrappers."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
            model = model.module
        else:
            return model


def check_supported(model: torch.nn.Module) -> None:
    """Fail clearly on heads this path would compute wrongly (scaled or soft-capped logits)."""
    lm = causal_lm(model)
    config = lm.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise OrpoError(f"{type(lm).__name__}: {name}={value} is not supported by orpo's output head yet")
    head = lm.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise OrpoError(f"{type(lm).__name__}: orpo needs a bias-free linear output head (lm_head)")


def prepare_model(model: torch.nn.Module, packing: bool, attention: str) -> None:
    """Set `model` up for the batch layout, or fail clearly: a supported output head, the span
    attention if `attention` is "spans", and the prefix-sharing check (training and scoring alike)."""
    check_supported(model)
    if packing:
        lm = causal_lm(model)
        if attention == "spans":
            use_span_attention(lm)
        elif (window := sliding_window(lm.config)) is not None:
            raise OrpoError(
                f"{type(lm).__name__} has sliding attention windows ({window} tokens), which one dense mask for all "
                "layers (--packed_attention mask) does not apply; use --packed_attention spans (it does), or --packing false"
            )
        check_prefix_sharing(model, attention)


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a batch goes to: the input embedding's (the first layer's, also under device_map)."""
    return causal_lm(model).get_input_embeddings().weight.device


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: value.to(device) for name, value in batch.items()}


def batch_collator(model: torch.nn.Module, pad_token_id: int, packing: bool, attention: str) -> Callable:
    """TokenizedPairs → one batch of the layout (packing.py), for `model`."""
    if not packing:
        return partial(collate_padded, pad_token_id=pad_token_id)
    # attention costs as much as the linear layers at a row width of about 3 × hidden size
    width = 3 * causal_lm(model).config.hidden_size
    return partial(collate_prefix_shared, pad_token_id=pad_token_id, attention=attention, attention_width=width)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments of the model call for a batch of the layout (packing.py)."""
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=0)
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    else:  # span attention (attention.py) reads the layout from pair_spans
        inputs["pair_spans"] = batch["pair_spans"].tolist()
        inputs["attention_mask"] = no_mask_placeholder(batch["input_ids"])
    return inputs


def no_mask_placeholder(input_ids: torch.Tensor) -> torch.Tensor:
    """A [rows, 1, T, T] all-False boolean view without memory, passed as `attention_mask` with
    span attention: a 4D mask makes transformers skip building a dense mask of its own, and an
    attention that used it anyway (pair_spans dropped on the way) attends to nothing, so its
    scores are far off and `check_prefix_sharing` stops the run."""
    rows, width = input_ids.shape
    return torch.zeros((), dtype=torch.bool, device=input_ids.device).expand(rows, 1, width, width)


@dataclass
class PairLogps:
    """Per-pair sums from one batch. All [pairs] fp32 except the counts (int64)."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    prompt_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    prompt_targets: torch.Tensor

    @property
    def logps_chosen(self) -> torch.Tensor:
        """Mean log-prob per chosen completion token, [pairs]."""
        return self.chosen_sum / self.chosen_tokens

    @property
    def logps_rejected(self) -> torch.Tensor:
        return self.rejected_sum / self.rejected_tokens

    def nll_sum(self, nll_scope: str) -> torch.Tensor:
        """Σ −log p over the NLL tokens: the chosen completion, plus the prompt if scope is "full"."""
        total = self.chosen_sum.sum()
        if nll_scope == "full":
            total = total + self.prompt_sum.sum()
        return -total


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> PairLogps:
    """Completion and prompt log-prob sums per pair for a batch from `packing`, from one call of
    `model` in which its output head computes the target tokens' log-probs (head.py)."""
    head = causal_lm(model).get_output_embeddings()
    with chunked_head(head, batch["target_source"], batch["target_ids"], chunk_size):
        token_logps = model(**model_inputs(batch)).logits
    if token_logps.shape != batch["target_ids"].shape:
        raise OrpoError(
            f"{type(causal_lm(model)).__name__} changes its output head's result before returning it "
            f"(got {tuple(token_logps.shape)}, expected {tuple(batch['target_ids'].shape)}); orpo cannot train it"
        )
    sums, counts = segment_sums(token_logps, batch["target_pair"], batch["target_kind"], int(batch["num_pairs"]))
    return PairLogps(
        chosen_sum=sums[CHOSEN],
        rejected_sum=sums[REJECTED],
        prompt_sum=sums[PROMPT],
        chosen_tokens=counts[CHOSEN],
        rejected_tokens=counts[REJECTED],
        prompt_targets=counts[PROMPT],
    )


def check_prefix_sharing(model: torch.nn.Module, attention: str = "spans") -> None:
    """Fail clearly if `model` does not honour the prefix-shared layout (its position ids, and the
    4D mask or the span attention, per `attention`).

    Two small pairs are scored in one prefix-shared row and in the padded layout; a model family
    that ignores the mask, the spans (then it gets an all-False placeholder mask) or the position
    ids disagrees. Confirmed on Llama, Qwen2, Qwen3, Mistral and Gemma (transformers 5,
    SDPA attention; tests/test_forward.py).
    """
    lm = causal_lm(model)
    vocab = lm.config.vocab_size
    pairs = [
        TokenizedPair([1 % vocab, 7 % vocab, 11 % vocab], [13 % vocab, 17 % vocab], [19 % vocab, 23 % vocab, 29 % vocab]),
        TokenizedPair([31 % vocab, 37 % vocab], [41 % vocab, 43 % vocab, 47 % vocab], [53 % vocab]),
    ]
    was_training = model.training
    model.eval()
    device = input_device(model)
    try:
        with torch.no_grad():
            packed = pair_logps(model, batch_to(collate_prefix_shared(pairs, 0, attention=attention), device), 64)
            padded = pair_logps(model, batch_to(collate_padded(pairs, pad_token_id=0), device), 64)
    except OrpoError:
        raise
    except Exception as err:  # a model that rejects a 4D mask, the spans or position ids
        raise OrpoError(
            f"{type(lm).__name__} cannot run the prefix-shared layout ({type(err).__name__}: {str(err)[:120]}); "
            "use --packing false"
        ) from None
    finally:
        model.train(was_training)
    tolerance = 1e-3 if lm.dtype == torch.float32 else 5e-2
    for name in ("chosen_sum", "rejected_sum"):
        a, b = getattr(packed, name), getattr(padded, name)
        if not torch.isfinite(a).all() or ((a - b).abs() > tolerance * b.abs().clamp(min=1.0)).any():
            raise OrpoError(
                f"{type(lm).__name__} ignores the attention layout or position ids of the prefix-shared layout "
                f"({name}: {a.tolist()} packed vs {b.tolist()} unpacked); use --packing false"
            )
