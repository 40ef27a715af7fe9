"""packing.py: exactly which tokens are training targets, and which hidden state predicts each.

Two hand-made pairs (pad id 0):

    pair 0: prompt [1, 5, 6, 7] (p = 4)  chosen [8, 9, 2]  rejected [10, 2]
    pair 1: prompt [1, 3]       (p = 2)  chosen [4]        rejected [11, 12, 13, 14, 2]

Padded layout (the module's current layout): row 2i = prompt + chosen, row 2i+1 = prompt + rejected,
right-padded to T = max(4 + 3, 2 + 5) = 7.

    row 0: 1 5 6 7 8  9  2      (pair 0 chosen)
    row 1: 1 5 6 7 10 2  ·      (pair 0 rejected)
    row 2: 1 3 4 · ·  ·  ·      (pair 1 chosen)
    row 3: 1 3 11 12 13 14 2    (pair 1 rejected)

Token t of a row is predicted by the hidden state at t − 1, whose flat index is row·7 + t − 1.
Prompt targets (prompt tokens 1..p−1) come from the chosen row only; the first prompt token (BOS)
is never a target.

    row 0, t = 1..6: ids 5 6 7 | 8 9 2   source 0..5     kinds P P P | C C C
    row 1, t = 4..5: ids 10 2            source 10, 11   kinds R R
    row 2, t = 1..2: ids 3 | 4           source 14, 15   kinds P | C
    row 3, t = 2..6: ids 11 12 13 14 2   source 22..26   kinds R R R R R
"""
import pytest
import torch

from orpo.ops.packing import (CHOSEN, KINDS, PROMPT, REJECTED, collate_encoder_decoder, collate_padded, nll_token_count,
                               segment_sums)
from orpo.data.render import TokenizedPair

P, C, R = PROMPT, CHOSEN, REJECTED
PAIRS = [
    TokenizedPair(prompt_ids=[1, 5, 6, 7], chosen_ids=[8, 9, 2], rejected_ids=[10, 2], index=0),
    TokenizedPair(prompt_ids=[1, 3], chosen_ids=[4], rejected_ids=[11, 12, 13, 14, 2], index=1),
]


@pytest.fixture
def batch():
    return collate_padded(PAIRS, pad_token_id=0)


def test_kind_constants():
    assert (PROMPT, CHOSEN, REJECTED, KINDS) == (0, 1, 2, 3)


def test_rows(batch):
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 7, 8, 9, 2],
        [1, 5, 6, 7, 10, 2, 0],
        [1, 3, 4, 0, 0, 0, 0],
        [1, 3, 11, 12, 13, 14, 2],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert batch["position_ids"].tolist() == [list(range(7))] * 4
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert batch[key].dtype == torch.long, key


def test_targets(batch):
    assert batch["target_ids"].tolist() == [5, 6, 7, 8, 9, 2, 10, 2, 3, 4, 11, 12, 13, 14, 2]
    assert batch["target_source"].tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 14, 15, 22, 23, 24, 25, 26]
    assert batch["target_pair"].tolist() == [0] * 8 + [1] * 7
    assert batch["target_kind"].tolist() == [P, P, P, C, C, C, R, R, P, C, R, R, R, R, R]
    assert batch["num_pairs"].item() == 2
    assert batch["num_tokens"].item() == 7 + 6 + 3 + 7
    for key in ("target_ids", "target_source", "target_pair", "target_kind"):
        assert batch[key].dtype == torch.long, key


def test_source_predicts_target(batch):
    """In the padded layout the token right after each predicting position is the target, and that
    position is a real (unpadded) token."""
    flat_ids = batch["input_ids"].flatten()
    flat_mask = batch["attention_mask"].flatten()
    src = batch["target_source"]
    assert flat_ids[src + 1].tolist() == batch["target_ids"].tolist()
    assert flat_mask[src].tolist() == [1] * 15 and flat_mask[src + 1].tolist() == [1] * 15
    assert (src % 7 != 6).all()  # never the last column (nothing after it to predict)


def test_pad_token_id_is_used():
    b = collate_padded(PAIRS, pad_token_id=95)
    assert b["input_ids"][1].tolist() == [1, 5, 6, 7, 10, 2, 95]
    assert b["input_ids"][2].tolist() == [1, 3, 4, 95, 95, 95, 95]
    assert 95 not in b["target_ids"].tolist()


def test_single_token_prompt_has_no_prompt_targets():
    b = collate_padded([TokenizedPair(prompt_ids=[1], chosen_ids=[7, 2], rejected_ids=[9], index=0)], pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 7, 2], [1, 9, 0]]
    assert b["target_ids"].tolist() == [7, 2, 9]
    assert b["target_source"].tolist() == [0, 1, 3]
    assert b["target_kind"].tolist() == [C, C, R]
    assert b["target_pair"].tolist() == [0, 0, 0]


def test_segment_sums(batch):
    # one distinct power of two per target so every sum identifies exactly which tokens went in it
    logps = -torch.tensor([2.0**i for i in range(15)])
    sums, counts = segment_sums(logps, batch["target_pair"], batch["target_kind"], num_pairs=2)
    assert sums.shape == (KINDS, 2) and counts.shape == (KINDS, 2)
    assert sums.dtype == torch.float32 and counts.dtype == torch.long
    assert counts.tolist() == [[3, 1], [3, 1], [2, 5]]  # rows PROMPT, CHOSEN, REJECTED
    assert sums.tolist() == [
        [-(1 + 2 + 4), -256],  # pair 0 prompt: targets 0..2; pair 1 prompt: target 8
        [-(8 + 16 + 32), -512],  # chosen: targets 3..5; target 9
        [-(64 + 128), -(1024 + 2048 + 4096 + 8192 + 16384)],  # rejected: 6, 7; 10..14
    ]


def test_segment_sums_gradient():
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    pair = torch.tensor([0, 1, 1, 0])
    kind = torch.tensor([C, C, R, P])
    sums, counts = segment_sums(logps, pair, kind, num_pairs=2)
    assert sums.tolist() == [[-4.0, 0.0], [-1.0, -2.0], [0.0, -3.0]]
    assert counts.tolist() == [[1, 0], [1, 1], [0, 1]]
    weights = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    (sums * weights).sum().backward()
    assert logps.grad.tolist() == [30.0, 40.0, 60.0, 10.0]


def test_nll_token_count(batch):
    kinds = batch["target_kind"]
    assert nll_token_count(kinds, "full").item() == 8  # prompt 3 + 1, chosen 3 + 1
    assert nll_token_count(kinds, "completion").item() == 4  # chosen 3 + 1
    assert nll_token_count(torch.tensor([R, R]), "full").item() == 0


# ---- prefix-shared layout -------------------------------------------------------------------------
"""The same two pairs, prefix-shared. Lengths p+c+r: pair 0 = 9, pair 1 = 8; with a free attention
(huge attention_width) the fewest padded tokens win, so both share one row of T = 17:

    index:    0 1 2 3 | 4 5 6 | 7  8 || 9 10 | 11 | 12 13 14 15 16
    ids:      1 5 6 7 | 8 9 2 | 10 2 || 1 3  | 4  | 11 12 13 14 2
    position: 0 1 2 3 | 4 5 6 | 4  5 || 0 1  | 2  | 2  3  4  5  6
    branch:   P P P P | C C C | R  R || P P  | C  | R  R  R  R  R

Chosen token j is predicted by p−1+j; rejected token 0 by p−1 (shared), rejected j>0 by its
predecessor: pair 0 targets 5 6 7 | 8 9 2 | 10 2 from 0 1 2 | 3 4 5 | 3 7; pair 1 (base 9):
3 | 4 | 11 12 13 14 2 from 9 | 10 | 10 12 13 14 15.
"""
from orpo.ops.packing import choose_rows, collate_prefix_shared, pack_rows, prefix_shared_mask  # noqa: E402


@pytest.mark.parametrize("attention", ["spans", "mask"])
def test_prefix_shared_one_row(attention):
    """spans: always one row; mask: one row when attention is free (attention_width 10⁹)."""
    batch = collate_prefix_shared(PAIRS, pad_token_id=0, attention=attention, attention_width=10**9)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8, 9, 2, 10, 2, 1, 3, 4, 11, 12, 13, 14, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5, 0, 1, 2, 2, 3, 4, 5, 6]]
    assert batch["target_ids"].tolist() == [5, 6, 7, 8, 9, 2, 10, 2, 3, 4, 11, 12, 13, 14, 2]
    assert batch["target_source"].tolist() == [0, 1, 2, 3, 4, 5, 3, 7, 9, 10, 10, 12, 13, 14, 15]
    assert batch["target_kind"].tolist() == [P, P, P, C, C, C, R, R, P, C, R, R, R, R, R]
    assert batch["target_pair"].tolist() == [0] * 8 + [1] * 7
    assert batch["num_pairs"].item() == 2
    assert batch["num_tokens"].item() == 17
    # (row, offset, prompt, chosen, rejected) per pair
    assert batch["pair_spans"].tolist() == [[0, 0, 4, 3, 2], [0, 9, 2, 1, 5]]
    assert ("attention_mask" in batch) == (attention == "mask")


def test_spans_ignore_the_attention_cost():
    """With span attention a row costs no quadratic mask: all pairs share one row, no padding."""
    batch = collate_prefix_shared(PAIRS, pad_token_id=0, attention="spans", attention_width=1)
    assert batch["input_ids"].shape == (1, 17)


def test_unknown_packed_attention_is_rejected():
    with pytest.raises(ValueError, match="attention must be one of"):
        collate_prefix_shared(PAIRS, pad_token_id=0, attention="flex")


def test_prefix_shared_mask_visibility():
    mask = collate_prefix_shared(PAIRS, pad_token_id=0, attention="mask", attention_width=10**9)["attention_mask"]
    assert mask.shape == (1, 1, 17, 17) and mask.dtype == torch.bool
    sees = lambda q: torch.nonzero(mask[0, 0, q]).flatten().tolist()  # noqa: E731
    assert sees(3) == [0, 1, 2, 3]  # last prompt token: causal prompt
    assert sees(6) == [0, 1, 2, 3, 4, 5, 6]  # chosen: prompt + earlier chosen
    assert sees(7) == [0, 1, 2, 3, 7]  # first rejected token: prompt, never chosen
    assert sees(8) == [0, 1, 2, 3, 7, 8]
    assert sees(9) == [9]  # the next pair starts afresh
    assert sees(12) == [9, 10, 12]
    assert sees(16) == [9, 10, 12, 13, 14, 15, 16]


def test_padding_sees_only_itself_and_rows_are_tail_padded():
    batch = collate_prefix_shared(PAIRS, pad_token_id=0, attention="mask", attention_width=1)  # a row per pair
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8, 9, 2, 10, 2], [1, 3, 4, 11, 12, 13, 14, 2, 0]]
    assert batch["pair_spans"].tolist() == [[0, 0, 4, 3, 2], [1, 0, 2, 1, 5]]
    mask = batch["attention_mask"][1, 0]
    assert torch.nonzero(mask[8]).flatten().tolist() == [8]
    assert not mask[:8, 8].any()  # no real token sees the padding
    assert batch["target_source"].tolist()[8:] == [9, 10, 10, 12, 13, 14, 15]


def test_prefix_shared_mask_from_owner_and_branch():
    owner = torch.tensor([[0, 0, 0, -1]])
    branch = torch.tensor([[P, C, R, P]])
    assert prefix_shared_mask(owner, branch)[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [0, 0, 0, 1],
    ]


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 9, 4, 3], capacity=9) == [[1], [0, 2], [3]]
    assert pack_rows([12, 3], capacity=9) == [[0], [1]]  # too long for the capacity: a row of its own


def test_choose_rows_trades_padding_against_attention():
    """lengths 10, 6, 6; cost = rows · T · (1 + T/w). Capacities and their rows:
    10 → [10] [6] [6], T 10: 30·(1 + 10/w);  15 → [10] [6 6], T 12: 24·(1 + 12/w);
    20 → [10 6] [6], T 16: 32·(1 + 16/w);    22 → [10 6 6], T 22: 22·(1 + 22/w).
    w = 10⁹: 30, 24, 32, 22 → one row.  w = 10: 60, 52.8, 83.2, 70.4 → [10] [6 6]."""
    assert choose_rows([10, 6, 6], attention_width=10**9) == [[0, 1, 2]]
    assert choose_rows([10, 6, 6], attention_width=10) == [[0], [1, 2]]


# ---- encoder-decoder layout ---------------------------------------------------------------------------

ENCODER_DECODER_PAIRS = [TokenizedPair([7, 8, 9, 1], [10, 11, 1], [12, 1], index=3),
                         TokenizedPair([13, 1], [14, 1], [15, 16, 17, 1], index=5)]


def test_encoder_decoder_batch_names_every_token_of_two_t5_pairs():
    """T5 pairs (EOS 1, pad 0 = the decoder start): each prompt once as an encoder row; chosen and rejected as
    decoder rows 2i, 2i+1, each the completion shifted right behind the start token; completion token j is
    predicted at decoder position j; no prompt targets."""
    batch = collate_encoder_decoder(ENCODER_DECODER_PAIRS, pad_token_id=0, decoder_start_token_id=0)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 1], [13, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["decoder_input_ids"].tolist() == [[0, 10, 11, 0], [0, 12, 0, 0], [0, 14, 0, 0], [0, 15, 16, 17]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["encoder_row"].tolist() == [0, 0, 1, 1]
    assert batch["target_ids"].tolist() == [10, 11, 1, 12, 1, 14, 1, 15, 16, 17, 1]
    assert batch["target_source"].tolist() == [0, 1, 2, 4, 5, 8, 9, 12, 13, 14, 15]  # row · 4 + j
    assert batch["target_pair"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert batch["target_kind"].tolist() == [CHOSEN] * 3 + [REJECTED] * 2 + [CHOSEN] * 2 + [REJECTED] * 4
    assert PROMPT not in batch["target_kind"].tolist()
    assert batch["pair_index"].tolist() == [3, 5] and int(batch["num_pairs"]) == 2
    assert int(batch["num_tokens"]) == 6 + 11  # each prompt once, each completion once


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_decoder_inputs_are_the_models_own_shift_of_the_labels(family):
    """decoder_input_ids equal what the model itself makes of the completions as labels (T5's _shift_right, BART's
    shift_tokens_right, behind its decoder_start_token_id) on every real position."""
    from tiny import tiny_bart, tiny_t5

    model = tiny_t5() if family == "t5" else tiny_bart()
    pad, start = model.config.pad_token_id, model.config.decoder_start_token_id
    batch = collate_encoder_decoder(ENCODER_DECODER_PAIRS, pad_token_id=pad, decoder_start_token_id=start)
    completions = [c for pair in ENCODER_DECODER_PAIRS for c in (pair.chosen_ids, pair.rejected_ids)]
    labels = torch.full((len(completions), 4), -100)
    for row, completion in enumerate(completions):
        labels[row, : len(completion)] = torch.tensor(completion)
    own = model.prepare_decoder_input_ids_from_labels(labels=labels)
    real = batch["decoder_attention_mask"].bool()
    assert torch.equal(batch["decoder_input_ids"][real], own[real])


# ---------------------------------------------------------------------------------------------
# a reward model's read positions (reward_source)
# ---------------------------------------------------------------------------------------------
from functools import partial  # noqa: E402

from orpo.ops.packing import last_token_index  # noqa: E402


def test_last_token_index_is_the_rightmost_non_pad_token_as_transformers_reads_it():
    assert last_token_index([1, 5, 6, 2], pad_token_id=0) == 3
    assert last_token_index([1, 5, 2, 2], pad_token_id=2) == 1  # pad = EOS: the token before the trailing EOS
    assert last_token_index([1, 2, 5], pad_token_id=2) == 2  # a pad id inside is not the end
    assert last_token_index([2, 2], pad_token_id=2) == 0  # every token a pad: argmax of zeros
    assert last_token_index([1, 5, 0], pad_token_id=None) == 2  # no pad id: the last token


def test_reward_source_of_the_padded_layout():
    """Rows (T = 7, module docstring): pair 0 chosen ends at row 0 t = 6 → 6, rejected at row 1 t = 5 → 12; pair 1
    chosen at row 2 t = 2 → 16, rejected at row 3 t = 6 → 27. With pad = 2 (the answers' EOS) each is read one
    token earlier; pair 1's chosen [4] has no 2, so it stays at 16."""
    last = partial(last_token_index, pad_token_id=0)
    assert collate_padded(PAIRS, pad_token_id=0, last_token=last)["reward_source"].tolist() == [[6, 12], [16, 27]]
    eos = partial(last_token_index, pad_token_id=2)
    assert collate_padded(PAIRS, pad_token_id=0, last_token=eos)["reward_source"].tolist() == [[5, 11], [16, 26]]
    assert "reward_source" not in collate_padded(PAIRS, pad_token_id=0)


def test_reward_source_of_the_prefix_shared_layout():
    """Spans, one row: pair 0 at 0..8 = [1 5 6 7 | 8 9 2 | 10 2], pair 1 at 9..16 = [1 3 | 4 | 11 12 13 14 2]. Chosen
    ends: 6 and 9 + 2 = 11; rejected ends: 8 and 16. With pad = 2: 5, 11 (no 2 in [1 3 4]), 7, 15. A rejected answer
    of pads only is read at the last prompt token, before the chosen answer (position 3 of pair 0)."""
    last = partial(last_token_index, pad_token_id=0)
    spans = collate_prefix_shared(PAIRS, pad_token_id=0, attention="spans", last_token=last)
    assert spans["reward_source"].tolist() == [[6, 8], [11, 16]]
    eos = partial(last_token_index, pad_token_id=2)
    assert collate_prefix_shared(PAIRS, pad_token_id=0, last_token=eos)["reward_source"].tolist() == [[5, 7], [11, 15]]
    only_pads = [TokenizedPair([1, 5, 6, 7], [8, 9, 2], [2], index=0)]
    assert collate_prefix_shared(only_pads, pad_token_id=0, last_token=eos)["reward_source"].tolist() == [[5, 3]]


def test_reward_source_of_the_mask_layout_follows_each_pair_to_its_row():
    """A row per pair (attention_width 1), longest first: pair 0 (9 tokens) in row 0, pair 1 (8 tokens) in row 1 of
    width 9. Pair 1's chosen ends at 9 + 2 = 11, its rejected at 9 + 7 = 16."""
    last = partial(last_token_index, pad_token_id=0)
    batch = collate_prefix_shared(PAIRS, pad_token_id=0, attention="mask", attention_width=1, last_token=last)
    assert batch["input_ids"].shape == (2, 9)
    assert batch["reward_source"].tolist() == [[6, 8], [11, 16]]
