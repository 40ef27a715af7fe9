"""train/recompute.py: selective recompute gives the gradients of no recompute, runs no matmul twice, and
keeps what memory.py's estimate says."""
import random

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from orpo.data.render import TokenizedPair
from orpo.ops.attention import use_span_attention
from orpo.ops.forward import batch_collator, pair_logps
from orpo.train.memory import decoder_shape, largest_micro_batch, layer_activation_bytes
from orpo.train.recompute import KEPT_OPS, selective_checkpoint_kwargs
from tiny import OpCounter

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
FAMILIES = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,  # + q/k norms
            "gemma3": transformers.Gemma3TextConfig}  # + pre/post feed-forward norms, GELU


def model_and_batch(config_class, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SIZES), attn_implementation="sdpa")
    use_span_attention(model)
    rng = random.Random(seed)
    pairs = [TokenizedPair(*[[rng.randrange(3, 300) for _ in range(rng.randint(5, 40))] for _ in range(3)])
             for _ in range(3)]
    return model, pairs, batch_collator(model, 0, "spans")(pairs)


def gradients(model, batch, recompute: str | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair summed log-probs and every weight's gradient of their sum, with `recompute` None, "full" or "selective"."""
    model.zero_grad()
    if recompute is None:
        model.activation_checkpointing_disable()
    else:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=selective_checkpoint_kwargs() if recompute == "selective" else None)
    model.train()
    logps = pair_logps(model, batch, 1024)
    sums = torch.cat([logps.chosen_sum, logps.rejected_sum])
    sums.sum().backward()
    return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_selective_recompute_gives_the_gradients_of_no_recompute(family):
    model, _, batch = model_and_batch(FAMILIES[family])
    logps, grads = gradients(model, batch, None)
    logps_selective, grads_selective = gradients(model, batch, "selective")
    assert torch.equal(logps, logps_selective)
    for name, grad in grads.items():
        assert torch.equal(grads_selective[name], grad), name


def test_selective_recompute_runs_no_matmul_twice_and_recomputes_the_element_wise_work():
    """Two layers' forward and backward: full recompute runs each layer's projections again but the last (torch's
    recompute stops once it has what backward needs, and down_proj's output is only added to the residual: 12 more
    mm/addmm); selective runs exactly the matmuls of no recompute, and more element-wise ops (the norms' again)."""
    model, _, batch = model_and_batch(FAMILIES["llama"])
    counts = {}
    for recompute in (None, "selective", "full"):
        with OpCounter() as counter:
            gradients(model, batch, recompute)
        counts[recompute] = counter
    matmuls = {k: c.matmuls() for k, c in counts.items()}
    assert matmuls["selective"] == matmuls[None]
    assert matmuls["full"] == matmuls[None] + 2 * 6  # q, k, v, o, gate, up per layer
    rsqrt = {k: c.counts.get(torch.ops.aten.rsqrt.default, 0) for k, c in counts.items()}  # RMSNorm: one per norm call
    assert rsqrt["selective"] == rsqrt["full"] == rsqrt[None] + 2 * 2  # each layer's two norms again


class KeptBytes(TorchDispatchMode):
    """Bytes of the outputs of `KEPT_OPS` while `inside` is set (the decoder layers' forward)."""

    def __init__(self):
        super().__init__()
        self.inside, self.bytes = False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside and func in KEPT_OPS:
            self.bytes += sum(t.nbytes for t in (out if isinstance(out, tuple) else (out,))
                              if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_estimate_of_a_selective_layer_is_what_the_policy_keeps(family):
    """memory.layer_activation_bytes(selective=True) against the outputs of the kept ops in the decoder layers of
    one forward: equal up to the attention kernels' small extras (log-sum-exp per head and token)."""
    model, pairs, batch = model_and_batch(FAMILIES[family])
    tokens, pair_lengths = largest_micro_batch(
        [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], 3, True, "spans")
    estimate = sum(layer_activation_bytes(decoder_shape(model, model.config), tokens, pair_lengths, 4, selective=True))
    counter = KeptBytes()
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: setattr(counter, "inside", True))
        layer.register_forward_hook(lambda *_: setattr(counter, "inside", False))
    with counter, torch.no_grad():
        pair_logps(model, batch, 1024)
    assert estimate <= counter.bytes <= 1.05 * estimate, (counter.bytes, estimate)
