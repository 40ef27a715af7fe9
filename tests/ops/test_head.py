"""head.py: the chunked head as the head module's own call — plain, LoRA on the head, peft
modules_to_save, and FSDP2 with the head sharded in its own unit (the ZeRO-3 situation).

Reference: the model's own forward, full logits, `log_softmax(-1)` in fp32, gathered at the
target positions; gradients by autograd through it.
"""
import pytest
import torch
import torch.distributed as dist
import transformers

from orpo.errors import OrpoError
from orpo.ops.forward import model_inputs, pair_logps
from orpo.ops.head import _is_shard, chunked_head
from orpo.ops.packing import collate_padded
from orpo.data.render import TokenizedPair

VOCAB = 80
PAIRS = [TokenizedPair([1, 7, 11, 5], [13, 17], [19, 23, 29], index=0),
         TokenizedPair([31, 37], [41, 43, 47, 3], [53], index=1)]


def tiny(tied: bool, seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, initializer_range=0.2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def reference_token_logps(model, batch) -> torch.Tensor:
    """[N] target log-probs from the model's full logits (the naive computation)."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "logits_to_keep"}
    logits = model(**inputs).logits.float()
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["target_source"])
    return flat.log_softmax(-1).gather(1, batch["target_ids"][:, None]).squeeze(1)


def chunked_token_logps(model, batch, chunk_size=3) -> torch.Tensor:
    head = model.get_output_embeddings()
    with chunked_head(head, batch["target_source"], batch["target_ids"], chunk_size):
        out = model(**model_inputs(batch)).logits
    return out


def grads_of(model, names, fn, batch, upstream):
    for p in model.parameters():
        p.grad = None
    (fn(model, batch) * upstream).sum().backward()
    params = dict(model.named_parameters())
    return {n: params[n].grad.clone() for n in names}


@pytest.mark.parametrize("tied", [False, True])
def test_plain_head_equals_full_logits_and_restores_forward(tied):
    model = tiny(tied)
    batch = collate_padded(PAIRS, 0)
    upstream = torch.randn(batch["target_ids"].shape[0], generator=torch.Generator().manual_seed(1))
    names = ["lm_head.weight" if not tied else "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    got = grads_of(model, names, chunked_token_logps, batch, upstream)
    ref = grads_of(model, names, reference_token_logps, batch, upstream)
    torch.testing.assert_close(chunked_token_logps(model, batch), reference_token_logps(model, batch), rtol=0, atol=1e-5)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
    assert "forward" not in vars(model.lm_head)  # the class's forward is back: logits again
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == VOCAB


def _lora_model(tied, targets, **lora_kw):
    import peft

    model = peft.get_peft_model(tiny(tied), peft.LoraConfig(r=4, target_modules=targets, **lora_kw))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # lora_B starts at zero (adapter = identity): give it weights so it matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_lora_on_the_head_is_computed_and_trained(tied):
    """With lm_head among the LoRA targets, the head's adapter changes the log-probs and gets the
    gradient of the full-logits computation (before, the head read base_layer.weight: no gradient)."""
    model = _lora_model(tied, ["lm_head", "q_proj"])
    head = model.get_base_model().lm_head
    assert hasattr(head, "lora_A"), "peft did not wrap lm_head"
    batch = collate_padded(PAIRS, 0)
    upstream = torch.randn(batch["target_ids"].shape[0], generator=torch.Generator().manual_seed(1))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head_names = [n for n in names if "lm_head" in n]
    assert len(head_names) == 2  # lora_A, lora_B of the head
    got = grads_of(model, names, chunked_token_logps, batch, upstream)
    ref = grads_of(model, names, reference_token_logps, batch, upstream)
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_logps(model, batch), reference_token_logps(model, batch),
                                   rtol=0, atol=1e-5)
        with model.disable_adapter():
            base = chunked_token_logps(model, batch)
        assert (base - chunked_token_logps(model, batch)).abs().max() > 1e-2  # the adapters matter
    for n in names:
        assert got[n].abs().max() > 0, n
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lora_on_the_head_merged_and_variants():
    """A merged adapter is inside the base weight (no second addition); DoRA on the head is refused."""
    model = _lora_model(False, ["lm_head"])
    batch = collate_padded(PAIRS, 0)
    with torch.no_grad():
        before = chunked_token_logps(model, batch)
        model.get_base_model().lm_head.merge()
        torch.testing.assert_close(chunked_token_logps(model, batch), before, rtol=0, atol=1e-5)
    dora = _lora_model(False, ["lm_head"], use_dora=True)
    with pytest.raises(OrpoError, match="DoRA"):
        chunked_token_logps(dora, batch)


def test_modules_to_save_head_trains_its_copy():
    import peft

    model = peft.get_peft_model(tiny(False), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    batch = collate_padded(PAIRS, 0)
    chunked_token_logps(model, batch).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lm_head" in n}
    trained = [n for n, g in grads.items() if g is not None]
    assert trained and all("modules_to_save" in n for n in trained), grads.keys()


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp2_head_in_its_own_unit(one_rank_group, tied):
    """FSDP2 with lm_head in a unit of its own (with the embedding, when tied), resharded after
    forward: between calls the head's weight is a shard (a DTensor), which the chunked head must not
    read. Values and gradients equal the unsharded model's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    reference, model = tiny(tied), tiny(tied)
    fully_shard([model.model.embed_tokens, model.lm_head] if tied else model.lm_head, mesh=mesh,
                reshard_after_forward=True)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batch = collate_padded(PAIRS, 0)
    model(**{k: v for k, v in model_inputs(batch).items() if k != "logits_to_keep"})
    assert _is_shard(model.lm_head.weight)  # the situation is real: after a forward, only a shard

    got, ref = pair_logps(model, batch, chunk_size=3), pair_logps(reference, batch, chunk_size=3)
    torch.testing.assert_close(got.chosen_sum, ref.chosen_sum, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.rejected_sum, ref.rejected_sum, rtol=0, atol=1e-5)
    (got.chosen_sum.sum() - got.rejected_sum.sum()).backward()
    (ref.chosen_sum.sum() - ref.rejected_sum.sum()).backward()
    for get in (lambda m: m.lm_head.weight, lambda m: m.model.layers[1].self_attn.q_proj.weight):
        sharded = get(model).grad
        assert sharded is not None
        torch.testing.assert_close(sharded.full_tensor(), get(reference).grad, rtol=1e-5, atol=1e-6)


def test_a_sharded_head_weight_is_refused(one_rank_group):
    """Called outside its engine's hooks (here: FSDP2's, by a head call that bypasses them), the head
    stops with one line instead of computing with a shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny(False)
    fully_shard(model.lm_head, mesh=init_device_mesh("cpu", (1,)), reshard_after_forward=True)
    batch = collate_padded(PAIRS, 0)
    with chunked_head(model.lm_head, batch["target_source"], batch["target_ids"], 4):
        hidden = torch.zeros(batch["input_ids"].shape + (32,))
        with pytest.raises(OrpoError, match="not gathered"):
            model.lm_head.forward(hidden)  # .forward: without the module's hooks
    assert not _is_shard(tiny(False).lm_head.weight)
