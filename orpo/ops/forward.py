"""One model call per batch → per-pair completion log-probs and NLL sums.

The model is called through its top-level forward, so DDP/FSDP/DeepSpeed wrappers and PEFT see a
normal call (an encoder-decoder model too: its encoder reads each pair's prompt once, and its decoder, given
chosen and rejected rows, reads each row's pair's encoder states: `encoder_states_per_row`). During that call its
output head computes, instead of [rows, T, vocab] logits, the
log-probs of the target tokens only, chunk by chunk (`head.chunked_head`): the head runs once, as
the model's own call of it, so whatever engine shards its weight gathers it as usual.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from orpo.errors import OrpoError
from orpo.ops.attention import ATTENTION, sliding_window
from orpo.ops.head import chunked_head, unsupported_reason
from orpo.ops.moe import (RouterBalancing, capture_router_logits, router_aux_loss, router_balancing,
                          router_logits_off, router_token_mask)
from orpo.ops.packing import (CHOSEN, PROMPT, REJECTED, collate_encoder_decoder, collate_padded, collate_prefix_shared,
                              last_token_index, segment_sums)
from orpo.ops.vision import image_block_token, rope_index_of, vision_model_inputs


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM (or *ForConditionalGeneration) inside DDP/PEFT/accelerate wrappers."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
            model = model.module
        else:
            return model


def chunked_head_reason(model: torch.nn.Module) -> str | None:
    """None if the chunked head reproduces the model's logits (a Linear head, with or without a bias, and
    no transform after it or one head.POST_HEAD knows: Gemma 2/3 softcap, Cohere / Granite scales);
    else a short reason why not. Reads attributes only: no model call."""
    return unsupported_reason(causal_lm(model))


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a batch goes to: the input embedding's (the first layer's, also under device_map)."""
    return causal_lm(model).get_input_embeddings().weight.device


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: value.to(device) for name, value in batch.items()}


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """Whether `model` is an encoder-decoder model (T5, BART), as its config says."""
    return bool(getattr(causal_lm(model).config, "is_encoder_decoder", False))


def is_reward_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a reward model: a transformers *ForSequenceClassification (a score head on a decoder, one
    score per sequence, read at its last non-pad token), which orpo trains with --objective reward (ops/reward.py)."""
    return type(causal_lm(model)).__name__.endswith("ForSequenceClassification")


def decoder_start_token_id(lm: torch.nn.Module) -> int:
    """The id an encoder-decoder model's decoder input starts with (its config's, else its generation config's)."""
    start = getattr(lm.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(lm, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise OrpoError(f"{type(lm).__name__} has no decoder_start_token_id (config or generation config): orpo cannot "
                        "build its decoder's input")
    return start


def batch_collator(model: torch.nn.Module, pad_token_id: int, layout: str) -> Callable:
    """TokenizedPairs → one batch of `layout` ("spans", "mask", "padded" or "encoder-decoder"; packing.py), for
    `model`; a reward model's batches also say where each sequence's reward is read (`reward_source`: its last
    token that is not the model's pad token, as the model reads it)."""
    lm = causal_lm(model)
    if layout == "encoder-decoder":
        start = decoder_start_token_id(lm)
        return partial(collate_encoder_decoder, pad_token_id=pad_token_id, decoder_start_token_id=start)
    # vision-language models: M-RoPE positions, image tokens that attend both ways (vision.py)
    options = dict(rope_index=rope_index_of(lm), image_token=image_block_token(lm))
    if is_reward_model(lm):
        options["last_token"] = partial(last_token_index, pad_token_id=lm.config.get_text_config().pad_token_id)
    if layout == "padded":
        return partial(collate_padded, pad_token_id=pad_token_id, **options)
    # attention costs as much as the linear layers at a row width of about 3 × hidden size
    width = 3 * lm.config.get_text_config().hidden_size
    return partial(collate_prefix_shared, pad_token_id=pad_token_id, attention=layout, attention_width=width, **options)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments of the model call for a batch of the layout (packing.py): with images, their
    inputs, and M-RoPE positions where the batch has them (vision.py); an encoder-decoder batch's prompts and
    decoder rows."""
    if "decoder_input_ids" in batch:
        names = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
        return dict({name: batch[name] for name in names}, use_cache=False)
    positions = batch.get("rope_position_ids", batch["position_ids"])
    inputs = dict(input_ids=batch["input_ids"], position_ids=positions, use_cache=False, logits_to_keep=0,
                  **vision_model_inputs(batch))
    if "token_type_ids" in batch:  # padded rows of a model that builds its image attention itself (Gemma 3)
        inputs["token_type_ids"] = batch["token_type_ids"]
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    else:  # span attention (attention.py) reads the layout from pair_spans
        inputs["pair_spans"] = batch["pair_spans"].tolist()
        inputs["attention_mask"] = no_mask_placeholder(batch["input_ids"])
    return inputs


def dense_attention_mask(config, mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """The mask layout's boolean [rows, 1, T, T] mask (packing.prefix_shared_mask) as the model takes it.

    Sliding-window layers (`attention.sliding_window`) get it narrowed to their window in pair
    positions (query at position i sees key j only if i − j < window, as transformers' sliding
    masks): one mask when every layer slides (Mistral), else one per layer type
    ({"full_attention": ..., "sliding_attention": ...}, which transformers models with `layer_types`
    take in place of building their own). SDPA and span attention take boolean masks; every other
    implementation gets them additive (0 / the dtype's minimum): eager attention adds the mask to its
    scores. A 2D padding mask (the padded layout) is returned as is."""
    if mask.dim() != 4:
        return mask
    impl = config._attn_implementation

    def as_input(allowed: torch.Tensor) -> torch.Tensor:
        if impl in ("sdpa", ATTENTION):
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)

    window = sliding_window(config)
    if window is None:
        return as_input(mask)
    windowed = mask & ((position_ids[:, :, None] - position_ids[:, None, :]) < window)[:, None]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return as_input(windowed)
    masks = {"full_attention": as_input(mask), "sliding_attention": as_input(windowed)}
    if unknown := sorted(set(layer_types) - set(masks)):
        raise OrpoError(f"the mask layout has no mask for the model's {', '.join(unknown)} layers")
    return masks


def no_mask_placeholder(input_ids: torch.Tensor) -> torch.Tensor:
    """A [rows, 1, T, T] all-False boolean view without memory, passed as `attention_mask` with
    span attention: a 4D mask makes transformers skip building a dense mask of its own, and an
    attention that used it anyway (pair_spans dropped on the way) attends to nothing, so its
    scores are far off and `check_prefix_sharing` stops the run."""
    rows, width = input_ids.shape
    return torch.zeros((), dtype=torch.bool, device=input_ids.device).expand(rows, 1, width, width)


@contextmanager
def encoder_states_per_row(lm: torch.nn.Module, encoder_row: torch.Tensor):
    """While active, the decoder of the encoder-decoder model `lm` (`get_decoder()`) reads, for its row r, the
    encoder states and encoder attention mask of encoder row `encoder_row[r]` ([decoder rows] int64): the encoder
    runs once over B prompts, the decoder over 2·B rows (chosen, rejected), and the index_select gives each row
    its pair's states without computing them again (autograd sums both rows' gradients into them)."""

    def per_row(module, args, kwargs):
        for name in ("encoder_hidden_states", "encoder_attention_mask"):
            if kwargs.get(name) is not None:
                kwargs[name] = kwargs[name].index_select(0, encoder_row.to(kwargs[name].device))
        return args, kwargs

    handle = lm.get_decoder().register_forward_pre_hook(per_row, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class PairLogps:
    """Per-pair sums from one batch. All [pairs] fp32 except the counts (int64)."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    prompt_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    prompt_targets: torch.Tensor
    # router load balancing (moe.py), for a MoE model with output_router_logits on; else None
    router_aux_loss: torch.Tensor | None = None  # [] fp32, over the batch's counted tokens
    router_tokens: torch.Tensor | None = None  # [] int64, the tokens it counts (router_token_mask)

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


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int, head: str = "chunked",
               keep_probs: bool = False) -> PairLogps:
    """Completion and prompt log-prob sums per pair for a batch from `packing`, from one call of `model`.

    head="chunked": during the call the output head computes the target tokens' log-probs only, with
    the family's transform of its logits (head.py). head="logits": the model returns its own
    [rows, T, vocab] logits, whatever its head does to them, and the targets' log-probs are gathered
    from an fp32 log-softmax (more memory). keep_probs (chunked head): the head's softmax is kept from the
    forward for backward instead of recomputed there (logprobs.token_logprobs; memory.plan_head_probs)."""
    if head not in ("chunked", "logits"):
        raise ValueError(f"head must be 'chunked' or 'logits', got {head!r}")
    lm = causal_lm(model)
    inputs = model_inputs(batch)
    encoder_decoder = "decoder_input_ids" in batch
    if "attention_mask" in batch and not encoder_decoder:
        config = lm.config.get_text_config()
        inputs["attention_mask"] = dense_attention_mask(config, batch["attention_mask"], batch["position_ids"], lm.dtype)
    balancing = router_balancing(lm)
    inputs.update(router_logits_off(lm))  # the model's own aux loss would read the 4D mask as padding
    rows = encoder_states_per_row(lm, batch["encoder_row"]) if encoder_decoder else nullcontext()
    with rows, capture_router_logits(lm) if balancing else nullcontext() as captured:
        if head == "logits":
            logits = model(**inputs).logits
            target_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["target_source"])
            token_logps = target_logits.float().log_softmax(-1).gather(1, batch["target_ids"][:, None]).squeeze(1)
        else:
            with chunked_head(lm, batch["target_source"], batch["target_ids"], chunk_size, keep_probs):
                token_logps = model(**inputs).logits
    if token_logps.shape != batch["target_ids"].shape:
        raise OrpoError(
            f"{type(lm).__name__} changes its output head's result before returning it "
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
        **(_router_loss(captured.router_logits, batch, balancing) if balancing else {}),
    )


def _router_loss(router_logits, batch: dict[str, torch.Tensor], balancing: RouterBalancing) -> dict:
    """PairLogps' router fields: the load-balancing loss over the tokens moe.router_token_mask counts
    (each real token once: the prompt once, padding never)."""
    mask = router_token_mask(batch)
    aux = router_aux_loss(router_logits, mask, balancing.num_experts, balancing.top_k)
    return {"router_aux_loss": aux, "router_tokens": mask.sum()}
