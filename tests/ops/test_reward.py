"""reward.py: a reward model's rewards on every layout equal the model's own call on each sequence alone, and the
Bradley-Terry loss through them has the gradients of the naive separate forwards.

Models: tiny random *ForSequenceClassification (one output) of Llama-like and Qwen2-like families, and Mistral with
a sliding window shorter than the pairs. Pairs hold answers that end in the pad token (pad = EOS, as with many
tokenizers): transformers then reads the token before it, and so must the layouts.
"""
import pytest
import torch
import transformers

from orpo.data.render import TokenizedPair
from orpo.errors import OrpoError
from orpo.ops.attention import use_span_attention
from orpo.ops.forward import batch_collator, is_reward_model
from orpo.ops.loss import bradley_terry_loss
from orpo.ops.reward import pair_rewards, reward_record_tensor, reward_records, separate_rewards, summarize_rewards
from orpo.ops.route import Route, choose_route

VOCAB, PAD = 96, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2,
              pad_token_id=PAD, bos_token_id=1, eos_token_id=PAD, num_labels=1)
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "mistral-window": (transformers.MistralConfig, {"sliding_window": 4}),
}


def reward_model(family="llama", attn="sdpa", seed=0):
    config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **extra})
    return transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation=attn).eval()


def make_pairs():
    """Unequal lengths; answers ending in PAD (read one token earlier), a one-token answer, a pad-only answer."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [
        TokenizedPair(ids(7), ids(5) + [PAD], ids(3) + [PAD], index=0),
        TokenizedPair(ids(3), ids(9), ids(1), index=1),
        TokenizedPair(ids(11), ids(1) + [PAD, PAD], ids(6), index=2),
        TokenizedPair(ids(2), ids(4), [PAD], index=3),  # read at the prompt's last token
    ]


def layout_rewards(model, pairs, layout):
    if layout == "spans":
        use_span_attention(model)
    rewards = pair_rewards(model, batch_collator(model, 0, layout)(pairs))
    return torch.stack([rewards.chosen, rewards.rejected], dim=1)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("layout", ["spans", "mask", "padded"])
def test_rewards_on_each_layout_equal_the_models_own_call_on_each_sequence(family, layout):
    model = reward_model(family, attn="sdpa")
    pairs = make_pairs()
    expected = separate_rewards(model, pairs)
    got = layout_rewards(model, pairs, layout)
    assert got.dtype == torch.float32 and got.shape == (4, 2)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)
    assert expected[3, 1] != expected[3, 0]  # the pad-only answer is read at the prompt's end, not the chosen one's


def test_eager_attention_mask_layout_is_exact_too():
    model = reward_model("llama", attn="eager")
    pairs = make_pairs()
    torch.testing.assert_close(layout_rewards(model, pairs, "mask").detach(), separate_rewards(model, pairs),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["spans", "mask", "padded"])
def test_bradley_terry_gradients_through_the_layout_equal_separate_forwards(layout):
    pairs = make_pairs()
    model = reward_model("qwen2")
    rewards = layout_rewards(model, pairs, layout)
    loss, _, _ = bradley_terry_loss(rewards[:, 0], rewards[:, 1], len(pairs))
    loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}

    naive = reward_model("qwen2")  # the same weights (same seed), each sequence alone
    separate = torch.stack([torch.stack([naive(input_ids=torch.tensor([pair.prompt_ids + answer])).logits[0, 0]
                                         for answer in (pair.chosen_ids, pair.rejected_ids)]) for pair in pairs])
    naive_loss = torch.nn.functional.softplus(-(separate[:, 0] - separate[:, 1])).mean()
    naive_loss.backward()
    assert loss.item() == pytest.approx(naive_loss.item(), rel=1e-5)
    for name, p in naive.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert got["score.weight"].abs().sum() > 0


class RecordingLinear(torch.nn.Linear):
    """A Linear that records the shape of every input its forward gets."""

    def forward(self, x):
        self.inputs.append(tuple(x.shape))
        return super().forward(x)


def test_the_score_head_runs_at_the_read_positions_only():
    model = reward_model()
    score = RecordingLinear(32, 1, bias=False)
    score.load_state_dict(model.score.state_dict())
    score.inputs, model.score = [], score
    pairs = make_pairs()
    layout_rewards(model, pairs, "spans")
    assert score.inputs == [(2 * len(pairs), 32)]  # 8 hidden states, not the row's 47


def test_choose_route_probes_a_reward_model_with_its_rewards():
    model = reward_model()
    assert is_reward_model(model)
    route = choose_route(model)
    assert route == Route("spans", "score", "attention-only model with SDPA")
    assert route.describe() == "prefix-shared spans, the score head at each answer's last token: attention-only " \
                               "model with SDPA"
    assert choose_route(reward_model(attn="eager")).layout == "mask"
    assert choose_route(reward_model(), packing=False) == Route("padded", "score", "--packing false")


def test_a_model_with_more_than_one_output_is_refused_in_one_line():
    config = transformers.LlamaConfig(**{**COMMON, "num_labels": 2})
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(OrpoError, match="has 2 outputs \\(num_labels\\); a reward model has one"):
        pair_rewards(model, batch_collator(model, 0, "padded")(make_pairs()))


def test_records_and_their_summary():
    """Rewards (2, 1) and (0, 1): margins 1 and −1; accuracy 1/2, margin 0, loss (log(1 + e^−1) + log(1 + e)) / 2."""
    model = reward_model()
    pairs = make_pairs()[:2]
    batch = batch_collator(model, 0, "padded")(pairs)
    rewards = pair_rewards(model, batch)
    rows = reward_records(reward_record_tensor(rewards, batch))
    assert [(r["index"], r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]) for r in rows] == \
        [(0, 7, 6, 4), (1, 3, 9, 1)]
    records = [{"reward_chosen": 2.0, "reward_rejected": 1.0}, {"reward_chosen": 0.0, "reward_rejected": 1.0}]
    summary = summarize_rewards(records)
    assert summary == pytest.approx({"pairs": 2, "accuracy": 0.5, "margin": 0.0, "rewards/chosen": 1.0,
                                     "rewards/rejected": 1.0,
                                     "loss": (torch.log1p(torch.tensor(torch.e ** -1)).item()
                                              + torch.log1p(torch.tensor(torch.e)).item()) / 2})


def test_under_bf16_autocast_the_score_head_runs_in_the_weights_fp32():
    """The decoder under bf16 autocast, the score head in fp32 (its weights'): the rewards equal the fp32 head applied
    to the bf16-autocast hidden states, not a bf16 product."""
    model = reward_model()
    pairs = make_pairs()
    batch = batch_collator(model, 0, "padded")(pairs)
    hidden = {}
    model.score.register_forward_pre_hook(lambda module, args: hidden.update(h=args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = pair_rewards(model, batch)
    flat = hidden["h"].reshape(-1, 32).float()
    expected = flat.index_select(0, batch["reward_source"].reshape(-1)) @ model.score.weight.T
    torch.testing.assert_close(torch.stack([rewards.chosen, rewards.rejected], 1).detach(), expected.view(-1, 2),
                               rtol=1e-6, atol=1e-6)
