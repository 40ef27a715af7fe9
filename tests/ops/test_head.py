"""head.py: the chunked head as the head module's own call — plain, LoRA on the head, peft
modules_to_save, FSDP2 with the head sharded in its own unit (the ZeRO-3 situation), and each
family's transform of its head's output (POST_HEAD: Gemma softcap, Cohere / Granite scales; Phi's bias).

Reference: the model's own forward, full logits, `log_softmax(-1)` in fp32, gathered at the
target positions; gradients by autograd through it.
"""
import pytest
import torch
import torch.distributed as dist
import transformers

from orpo.errors import OrpoError
from orpo.ops.forward import causal_lm, model_inputs, pair_logps
from orpo.ops.head import (POST_HEAD, HeadTransform, _is_shard, chunked_head, neutral_post_head, post_head_transform,
                           unsupported_reason)
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
    with chunked_head(causal_lm(model), batch["target_source"], batch["target_ids"], chunk_size):
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
    with chunked_head(model, batch["target_source"], batch["target_ids"], 4):
        hidden = torch.zeros(batch["input_ids"].shape + (32,))
        with pytest.raises(OrpoError, match="not gathered"):
            model.lm_head.forward(hidden)  # .forward: without the module's hooks
    assert not _is_shard(tiny(False).lm_head.weight)


# ---- each family's transform of its head's output ----

SOFTCAP, SCALE = 2.0, 0.25  # values that matter on logits of O(1–3): a missed transform is far off
FAMILIES = {  # *ForCausalLM → (config class, its transform set to the values above)
    "Gemma2ForCausalLM": (transformers.Gemma2Config, dict(head_dim=8, final_logit_softcapping=SOFTCAP)),
    "Gemma3ForCausalLM": (transformers.Gemma3TextConfig, dict(head_dim=8, final_logit_softcapping=SOFTCAP)),
    "VaultGemmaForCausalLM": (transformers.VaultGemmaConfig, dict(head_dim=8, final_logit_softcapping=SOFTCAP)),
    "NanoChatForCausalLM": (transformers.NanoChatConfig, dict(final_logit_softcapping=SOFTCAP)),
    "CohereForCausalLM": (transformers.CohereConfig, dict(logit_scale=SCALE)),
    "Cohere2ForCausalLM": (transformers.Cohere2Config, dict(head_dim=8, logit_scale=SCALE)),
    "Cohere2MoeForCausalLM": (transformers.Cohere2MoeConfig, dict(head_dim=8, logit_scale=SCALE, num_local_experts=4,
                                                                  num_experts_per_tok=2, moe_intermediate_size=32)),
    "GraniteForCausalLM": (transformers.GraniteConfig, dict(logits_scaling=1 / SCALE)),
    "GraniteSWAForCausalLM": (transformers.GraniteSWAConfig, dict(logits_scaling=1 / SCALE)),
    "GraniteMoeForCausalLM": (transformers.GraniteMoeConfig, dict(logits_scaling=1 / SCALE, num_local_experts=4,
                                                                  num_experts_per_tok=2)),
    "GraniteMoeSharedForCausalLM": (transformers.GraniteMoeSharedConfig, dict(
        logits_scaling=1 / SCALE, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32)),
    "GraniteMoeHybridForCausalLM": (transformers.GraniteMoeHybridConfig, dict(
        logits_scaling=1 / SCALE, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32,
        layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1)),
    "GraniteMoeSWAForCausalLM": (transformers.GraniteMoeSWAConfig, dict(logits_scaling=1 / SCALE, num_local_experts=4,
                                                                        num_experts_per_tok=2)),
    "PhiForCausalLM": (transformers.PhiConfig, {}),  # no transform; its head has a bias
}


def expected_transform(family: str) -> HeadTransform:
    """What post_head_transform must read from the family's model: the value set in FAMILIES."""
    transform = FAMILIES[family][1]
    if "final_logit_softcapping" in transform:
        return HeadTransform(softcap=SOFTCAP)
    if "logit_scale" in transform or "logits_scaling" in transform:
        return HeadTransform(scale=SCALE)  # Cohere multiplies by 0.25, Granite divides by 4
    return HeadTransform()


def family_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random model of the family, SDPA where it has it (Gemma 2 and the SWA variants: eager)."""
    config_class, transform = FAMILIES[name]
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **transform)
    torch.manual_seed(seed)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError:  # "does not support ... scaled_dot_product_attention"
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert type(model).__name__ == name
    if model.lm_head.bias is not None:  # initialised to 0: make it matter
        with torch.no_grad():
            model.lm_head.bias.copy_(torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)))
    return model.float().eval()


def apply(transform: HeadTransform, head_output: torch.Tensor) -> torch.Tensor:
    """z = softcap · tanh(scale · a / softcap), or scale · a (logprobs.py)."""
    z = head_output * transform.scale
    return transform.softcap * torch.tanh(z / transform.softcap) if transform.softcap is not None else z


def test_every_post_head_family_is_checked():
    assert set(POST_HEAD) <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_post_head_contract_with_transformers(family):
    """The contract POST_HEAD writes down, on this transformers release: the attribute is where POST_HEAD
    says; the model's logits are the read transform of its head's output; neutralised, they are the head's
    output itself (so the chunked head's [N] log-probs pass through unchanged); the value comes back after
    the call, also after an exception. Phi: no transform, a head with a bias (read from the Linear)."""
    model = family_model(family)
    spec = POST_HEAD.get(family)
    if spec is not None:
        owner = model.config if spec.owner == "config" else model
        assert hasattr(owner, spec.name), f"{family}: {spec.owner} attribute {spec.name} is gone"
    else:
        assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.bias is not None
    transform = post_head_transform(model)
    assert transform == expected_transform(family)
    assert unsupported_reason(model) is None
    head_outputs = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: head_outputs.append(out))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with neutral_post_head(model):
            neutral = model(input_ids=ids).logits
    hook.remove()
    torch.testing.assert_close(logits, apply(transform, head_outputs[0]), rtol=1e-6, atol=1e-6)
    assert torch.equal(neutral, head_outputs[1])
    if spec is not None:
        assert (logits - neutral).abs().max() > 0.5  # the transform matters at these values
    assert post_head_transform(model) == transform  # restored
    with pytest.raises(RuntimeError, match="inside"):
        with neutral_post_head(model):
            assert post_head_transform(model) == HeadTransform()
            raise RuntimeError("inside")
    assert post_head_transform(model) == transform


@pytest.mark.parametrize("family", ["Gemma2ForCausalLM", "CohereForCausalLM", "GraniteForCausalLM", "PhiForCausalLM"])
def test_chunked_head_with_the_family_transform_equals_full_logits(family):
    """Values and gradients of every parameter (the head's weight and bias included) equal the model's
    own full logits; the model's attribute is back afterwards."""
    model = family_model(family, seed=1)
    batch = collate_padded(PAIRS, 0)
    upstream = torch.randn(batch["target_ids"].shape[0], generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]
    got = grads_of(model, names, chunked_token_logps, batch, upstream)
    ref = grads_of(model, names, reference_token_logps, batch, upstream)
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_logps(model, batch), reference_token_logps(model, batch),
                                   rtol=0, atol=1e-5)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
    if family == "PhiForCausalLM":
        assert got["lm_head.bias"].abs().max() > 1e-3
    assert post_head_transform(model) == expected_transform(family) and "forward" not in vars(model.lm_head)


def test_lora_on_a_head_with_bias():
    """Phi: a LoRA adapter on a head with a bias; the frozen bias is part of the logits, the adapter trains."""
    import peft

    model = peft.get_peft_model(family_model("PhiForCausalLM"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    model.eval()
    batch = collate_padded(PAIRS, 0)
    upstream = torch.randn(batch["target_ids"].shape[0], generator=torch.Generator().manual_seed(1))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2
    got = grads_of(model, names, chunked_token_logps, batch, upstream)
    ref = grads_of(model, names, reference_token_logps, batch, upstream)
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_logps(model, batch), reference_token_logps(model, batch),
                                   rtol=0, atol=1e-5)
    for n in names:
        assert got[n].abs().max() > 0, n
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fsdp2_class_names_find_their_family():
    """fully_shard makes the model an instance of FSDP<Name>, a subclass: looked up along the MRO."""
    model = family_model("CohereForCausalLM")
    model.__class__ = type("FSDPCohereForCausalLM", (type(model),), {})
    assert post_head_transform(model) == HeadTransform(scale=SCALE)


def test_unknown_transform_or_head_is_refused():
    """A family outside POST_HEAD with a transform attribute, or a head that is not a Linear: the chunked
    head says why instead of computing numbers the model does not produce."""
    model = tiny(False)
    assert unsupported_reason(model) is None
    model.config.final_logit_softcapping = 30.0
    reason = unsupported_reason(model)
    assert reason.startswith("LlamaForCausalLM has config.final_logit_softcapping=30.0")
    batch = collate_padded(PAIRS, 0)
    with pytest.raises(OrpoError, match="final_logit_softcapping"):
        chunked_token_logps(model, batch)
    assert "forward" not in vars(model.lm_head)
    model = tiny(False)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert unsupported_reason(model) == "LlamaForCausalLM: the output head is a Sequential, not a Linear: orpo's " \
                                        "chunked head cannot compute it"
