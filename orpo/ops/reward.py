"""A reward model's rewards of each pair's two answers, from one model call on the training layouts.

A reward model is a transformers *ForSequenceClassification with one output (`num_labels=1`): a score head
(`score`, a Linear hidden → 1) on a decoder, which scores a sequence at its last token that is not the pad token
(packing.last_token_index). orpo trains it with the Bradley-Terry loss (loss.bradley_terry_loss; `--objective
reward`) on the same batches as ORPO: the prefix-shared layouts compute the prompt once for both answers, the
padded layout takes a row per sequence (packing.py). The reward of [prompt | chosen] is read at the hidden state
of its last token, where that sequence alone would put it (it attends to the prompt and the chosen answer only);
that of [prompt | rejected] at its own (which never sees the chosen answer): the batch's `reward_source`.

The model is called through its top-level forward, as forward.pair_logps calls a causal LM (DDP, FSDP, DeepSpeed
and peft see a normal call). During the call the score head's own call (`reward_head`) computes the score at the
2·B read positions only, never at every position, and returns [rows, T, 1] scores that are those values at
their positions and zeros elsewhere (no matmul); the rewards are read back from that output, so their gradient
passes through the head's output, where FSDP2, ZeRO-3 and DDP hook it. The model's own pooling (its last non-pad
token of each packed row, meaningless here) picks values nobody reads. A peft adapter or modules_to_save copy of
the head is part of that call.

The definition the routes are held to (route.py's probe, the tests): `separate_rewards`, the model's own call on
each [prompt | chosen] and [prompt | rejected] alone.

Records (`reward_records`): index, prompt/chosen/rejected token counts, reward_chosen, reward_rejected;
`summarize_rewards` turns them into the logged means.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from orpo.data.render import TokenizedPair
from orpo.errors import OrpoError
from orpo.ops.forward import causal_lm, dense_attention_mask, input_device, model_inputs
from orpo.ops.moe import router_logits_off
from orpo.ops.packing import CHOSEN, PROMPT, REJECTED, segment_sums


@dataclass
class PairRewards:
    """The rewards of one batch's pairs: chosen, rejected [pairs] fp32."""

    chosen: torch.Tensor
    rejected: torch.Tensor


def score_module(lm: torch.nn.Module) -> torch.nn.Module:
    """The score head of a *ForSequenceClassification `lm` (`score`, as transformers names it on every decoder
    family), checked to give one output per sequence; one line where it has none or more outputs."""
    head = getattr(lm, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise OrpoError(f"{type(lm).__name__} has no score head (`score`), which orpo reads a reward model's rewards "
                        "from")
    labels = getattr(lm.config, "num_labels", 1)
    if labels != 1:
        raise OrpoError(f"{type(lm).__name__} has {labels} outputs (num_labels); a reward model has one")
    return head


@contextmanager
def reward_head(lm: torch.nn.Module, reward_source: torch.Tensor):
    """While active, the score head of `lm` called with hidden states [rows, T, H] computes the scores at the flat
    positions `reward_source` [K] (indices into rows·T) only, each position once, and returns [rows, T, 1] to the
    model's forward: those scores at their positions, zeros elsewhere; `read.rewards` [K, 1] (the yielded namespace)
    are the scores read back from that output at `reward_source` (module docstring)."""
    head = score_module(lm)
    own_forward = head.forward  # the class's forward, bound: a peft wrapper's dispatch to its adapted copy included
    read = SimpleNamespace(rewards=None)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        # each position once (a pair whose answers are both read at its prompt's last token shares it)
        positions = torch.unique(reward_source.to(flat.device))
        selected = flat.index_select(0, positions)
        # in the weights' dtype, not autocast's: fp32 rewards from fp32 weights under bf16 autocast (2·B rows: free)
        with torch.autocast(flat.device.type, enabled=False):
            picked = own_forward(selected.to(next(head.parameters()).dtype))
        scores = picked.new_zeros(flat.shape[0], picked.shape[-1]).index_copy(0, positions, picked)
        return scores.view(*hidden.shape[:-1], -1)

    def read_back(module, args, output: torch.Tensor) -> None:
        # The rewards are read from the head's output as its call returns it, after the engines' hooks: so the loss's
        # gradient flows through that output, where FSDP2 and ZeRO-3 gather the head's weight again for its backward
        # and DDP finds the step's parameters. What the model pools from it is never read.
        flat = output.reshape(-1, output.shape[-1])
        read.rewards = flat.index_select(0, reward_source.to(flat.device))

    head.forward = forward  # an instance attribute: nn.Module.__call__ runs it between the engines' hooks
    handle = head.register_forward_hook(read_back)  # registered last: runs after the engines' own
    try:
        yield read
    finally:
        handle.remove()
        del head.forward


def pair_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> PairRewards:
    """The rewards of a batch's pairs (a reward model's batch from forward.batch_collator: `reward_source` [B, 2]),
    from one call of `model`, the score head run at 2·B positions."""
    if "reward_source" not in batch:
        raise OrpoError("a reward model's batch says where each answer's reward is read (reward_source): build it with "
                        "the reward model's own collator (forward.batch_collator); an encoder-decoder model cannot be "
                        "trained as a reward model")
    lm = causal_lm(model)
    inputs = model_inputs(batch)
    inputs.pop("logits_to_keep")  # a causal LM's argument; the score head runs at the read positions only
    if "attention_mask" in batch:
        config = lm.config.get_text_config()
        inputs["attention_mask"] = dense_attention_mask(config, batch["attention_mask"], batch["position_ids"], lm.dtype)
    inputs.update(router_logits_off(lm))
    with reward_head(lm, batch["reward_source"].reshape(-1)) as read:
        model(**inputs)
    rewards = read.rewards.float().view(-1, 2)
    return PairRewards(chosen=rewards[:, 0], rejected=rewards[:, 1])


@torch.no_grad()
def separate_rewards(model: torch.nn.Module, pairs: list[TokenizedPair]) -> torch.Tensor:
    """[pairs, 2] fp32 rewards of [prompt | chosen] and [prompt | rejected], each in a model call of its own (batch
    1, no padding, no mask: the model's own pooling at its last non-pad token). The definition the routes are held
    to."""
    device = input_device(model)
    rewards = [[model(input_ids=torch.tensor([pair.prompt_ids + completion], device=device), use_cache=False)
                .logits.reshape(-1)[0].float() for completion in (pair.chosen_ids, pair.rejected_ids)]
               for pair in pairs]
    return torch.tensor([[value.item() for value in row] for row in rewards])


REWARD_RECORD_FIELDS = ("index", "prompt_tokens", "chosen_tokens", "rejected_tokens", "reward_chosen",
                        "reward_rejected")
_COUNTS = {"index", "prompt_tokens", "chosen_tokens", "rejected_tokens"}


def reward_record_tensor(rewards: PairRewards, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[pairs, len(REWARD_RECORD_FIELDS)] float32 on the batch's device, one row of record fields per pair (a
    tensor, so that ranks can gather it)."""
    ones = torch.ones_like(batch["target_pair"], dtype=torch.float32)
    _, counts = segment_sums(ones, batch["target_pair"], batch["target_kind"], int(batch["num_pairs"]))
    prompt_tokens = counts[PROMPT] + 1  # every prompt token but the first is a target
    columns = (batch["pair_index"], prompt_tokens, counts[CHOSEN], counts[REJECTED], rewards.chosen, rewards.rejected)
    return torch.stack([c.detach().to(torch.float32) for c in columns], dim=1)


def reward_records(rows: torch.Tensor) -> list[dict]:
    """The records of a `reward_record_tensor` (counts back to int)."""
    return [{name: int(v) if name in _COUNTS else v for name, v in zip(REWARD_RECORD_FIELDS, row)}
            for row in rows.cpu().tolist()]


def summarize_rewards(records: list[dict]) -> dict:
    """Means over pairs, in the metric names of a reward model's training logs: loss (the Bradley-Terry loss,
    −log σ(r_chosen − r_rejected)), accuracy (share of pairs with r_chosen > r_rejected: on held-out pairs, the
    held-out pair accuracy), margin (r_chosen − r_rejected), rewards/chosen, rewards/rejected, pairs."""
    n = len(records)
    margins = [r["reward_chosen"] - r["reward_rejected"] for r in records]
    # −log σ(x) = softplus(−x), written to not overflow for very negative x
    loss = sum(max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins) / n
    return {
        "pairs": n,
        "accuracy": sum(m > 0 for m in margins) / n,
        "margin": sum(margins) / n,
        "rewards/chosen": sum(r["reward_chosen"] for r in records) / n,
        "rewards/rejected": sum(r["reward_rejected"] for r in records) / n,
        "loss": loss,
    }
