"""TokenizedPairs → row tensors for one model call, plus the index of every training target.

The layout decides which rows and positions hold which tokens; everything downstream only sees
the *target spec*: for each target token, its id, the flat index (row·T + position) of the
hidden state that predicts it, its pair and its kind (prompt / chosen / rejected). The head, the
loss and the trainer do not depend on the layout.

Prefix-shared layout (the default, ARCHITECTURE.md): each pair is laid out once as
[prompt | chosen | rejected], several pairs per row, block-diagonal across pairs:
- position ids: prompt 0..p−1, chosen p..p+c−1, rejected p..p+r−1 (restarting where chosen did);
- attention (`attention_mask`, a boolean [rows, 1, T, T], True = may attend): causal within a pair;
  chosen sees the prompt and earlier chosen tokens, rejected sees the prompt and earlier rejected
  tokens, never chosen; nothing crosses pairs; a padding token sees only itself (no empty rows);
- chosen token j is predicted by the hidden state at p−1+j; rejected token 0 by p−1 (the last
  prompt token, shared), rejected token j>0 by the hidden state of rejected token j−1.
The prompt is computed once, not twice, and padding is only the tail of each row.

Padded layout (`packing=False`, for debugging): pair i gives row 2i = prompt+chosen and row 2i+1 =
prompt+rejected, right-padded, with a 2D padding mask. Prompt targets (prompt tokens 1..p−1, for
nll_scope="full") come from the chosen row only.

Encoder-decoder layout (`collate_encoder_decoder`, T5 / BART): the prompt is the encoder's input, one row per
pair; chosen and rejected are two decoder rows per pair (2i, 2i+1), each reading its pair's encoder states
(`encoder_row`). A decoder row is its completion shifted right behind the model's decoder start token, so
completion token j is predicted by the decoder's hidden state at j. There are no prompt targets: the decoder
does not predict the prompt.

Pairs with images (TokenizedPair.vision_inputs) add their image inputs in the order their prompts
appear in the rows (vision.py: once per pair prefix-shared, twice padded); with `rope_index` (an M-RoPE
model, vision.rope_index_of) the batch also gets `rope_position_ids` [3, rows, T], the model's own
positions of each sequence, which the model call takes as its position ids. With `image_token` (a model
whose image tokens attend to all tokens of their image both ways, Gemma 3: vision.image_block_token)
the padded layout passes `token_type_ids` for the model to build that attention itself, and the mask
layout adds it to its mask; span attention has no such blocks and refuses those pairs.

A reward model (ops/reward.py) reads one hidden state per sequence instead of targets: given `last_token` (the
index a sequence's score is read at, `last_token_index`: transformers' sequence-classification rule), the
padded and prefix-shared layouts add `reward_source` [B, 2], the flat index (row·T + position) of that token of
[prompt | chosen] and of [prompt | rejected] for each pair.
"""
from __future__ import annotations

import torch

from collections.abc import Callable

from orpo.data.render import TokenizedPair
from orpo.errors import OrpoError
from orpo.ops.vision import RopeIndex, concat_vision_inputs, image_blocks, pair_rope_positions

PROMPT, CHOSEN, REJECTED = 0, 1, 2
KINDS = 3
PACKED_ATTENTION = ("spans", "mask")  # how the prefix-shared layout's attention is computed


def last_token_index(ids: list[int], pad_token_id: int | None) -> int:
    """The index of the token whose hidden state a transformers *ForSequenceClassification scores for the sequence
    `ids` alone: the rightmost token that is not `pad_token_id` (0 if every token is; the last token where the
    model has no pad id). So with pad = EOS, an answer ending in EOS is scored at the token before it, as the
    model itself scores it."""
    if pad_token_id is None:
        return len(ids) - 1
    return next((t for t in range(len(ids) - 1, -1, -1) if ids[t] != pad_token_id), 0)


LastToken = Callable[[list[int]], int]  # a sequence's ids → the index its reward is read at (last_token_index)


def collate_padded(pairs: list[TokenizedPair], pad_token_id: int, rope_index: RopeIndex | None = None,
                   image_token: int | None = None, last_token: LastToken | None = None) -> dict[str, torch.Tensor]:
    """Build a padded batch.

    Returns a dict of tensors:
      input_ids, attention_mask, position_ids: [2·B, T] (T = longest prompt+completion)
      target_ids, target_source, target_pair, target_kind: [N] (int64), one entry per target token
      pair_index: [B] each pair's TokenizedPair.index (its row in the dataset, for error messages)
      num_pairs: [] (B); num_tokens: [] the non-padding tokens the model processes
      with images: their inputs (vision.concat_vision_inputs, each prompt's twice: chosen row, rejected
      row) and, with `rope_index`, rope_position_ids [3, 2·B, T] (padding at 0); with `image_token`,
      token_type_ids [2·B, T] (1 = that token)
      with `last_token`: reward_source [B, 2] (module docstring)
    """
    sequences, ids, source, pair_of, kind_of = [], [], [], [], []
    width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    for i, pair in enumerate(pairs):
        p = len(pair.prompt_ids)
        for kind, completion in ((CHOSEN, pair.chosen_ids), (REJECTED, pair.rejected_ids)):
            row = len(sequences)
            sequences.append(pair.prompt_ids + completion)
            # token t of the sequence is predicted by the hidden state at t − 1
            first = 1 if kind == CHOSEN else p  # prompt targets are taken once, from the chosen row
            for t in range(first, p + len(completion)):
                ids.append(sequences[-1][t])
                source.append(row * width + t - 1)
                pair_of.append(i)
                kind_of.append(PROMPT if t < p else kind)
    input_ids, attention_mask = _right_padded(sequences, pad_token_id)
    position_ids = torch.arange(width).expand(len(sequences), width).clone()
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        **_target_spec(ids, source, pair_of, kind_of),
        "pair_index": _pair_index(pairs),
        "num_pairs": torch.tensor(len(pairs)),
        "num_tokens": attention_mask.sum(),
        **concat_vision_inputs([pair.vision_inputs for pair in pairs for _ in range(2)]),
    }
    if rope_index is not None:
        rope = torch.zeros((3, len(sequences), width), dtype=torch.long)
        for r, seq in enumerate(sequences):
            rope[:, r, : len(seq)] = rope_index(seq, pairs[r // 2].vision_inputs)
        batch["rope_position_ids"] = rope
    if image_token is not None:
        batch["token_type_ids"] = (input_ids == image_token).long()
    if last_token is not None:  # row 2i holds [prompt | chosen], row 2i + 1 [prompt | rejected], from position 0
        batch["reward_source"] = torch.tensor([row * width + last_token(seq) for row, seq in enumerate(sequences)],
                                              dtype=torch.long).view(-1, 2)
    return batch


def collate_encoder_decoder(pairs: list[TokenizedPair], pad_token_id: int, decoder_start_token_id: int
                            ) -> dict[str, torch.Tensor]:
    """Build an encoder-decoder batch (module docstring).

    Returns a dict of tensors:
      input_ids, attention_mask: [B, P] the prompts, right-padded (P = longest prompt): the encoder's input
      decoder_input_ids, decoder_attention_mask: [2·B, C] (C = longest completion) row 2i = chosen, 2i+1 = rejected
        of pair i, each [decoder_start_token_id] + completion[:-1], right-padded: the model's own shift of labels
        to decoder inputs (T5's `_shift_right`, BART's `shift_tokens_right`)
      encoder_row: [2·B] the encoder row (pair) each decoder row reads (i for rows 2i and 2i+1)
      target_ids, target_source, target_pair, target_kind: [N] one entry per completion token; source = decoder
        row·C + j for completion token j
      pair_index, num_pairs, num_tokens: as `collate_padded` (the tokens: each prompt once, each completion once)
    """
    prompts = [pair.prompt_ids for pair in pairs]
    completions = [ids for pair in pairs for ids in (pair.chosen_ids, pair.rejected_ids)]
    input_ids, attention_mask = _right_padded(prompts, pad_token_id)
    decoder_input_ids, decoder_attention_mask = _right_padded(
        [[decoder_start_token_id] + ids[:-1] for ids in completions], pad_token_id)
    width = decoder_input_ids.shape[1]
    ids, source, pair_of, kind_of = [], [], [], []
    for row, completion in enumerate(completions):
        ids += completion
        source += range(row * width, row * width + len(completion))
        pair_of += [row // 2] * len(completion)
        kind_of += [CHOSEN if row % 2 == 0 else REJECTED] * len(completion)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_attention_mask,
        "encoder_row": torch.arange(len(pairs)).repeat_interleave(2),
        **_target_spec(ids, source, pair_of, kind_of),
        "pair_index": _pair_index(pairs),
        "num_pairs": torch.tensor(len(pairs)),
        "num_tokens": attention_mask.sum() + decoder_attention_mask.sum(),
    }


def _right_padded(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, T] ids right-padded with pad_token_id, [rows, T] int64 mask, 1 = a real token)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, seq in enumerate(sequences):
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, : len(seq)] = 1
    return ids, mask


def _target_spec(ids: list[int], source: list[int], pair_of: list[int], kind_of: list[int]) -> dict:
    names = ("target_ids", "target_source", "target_pair", "target_kind")
    return {name: torch.tensor(values, dtype=torch.long) for name, values in zip(names, (ids, source, pair_of, kind_of))}


def _pair_index(pairs: list[TokenizedPair]) -> torch.Tensor:
    return torch.tensor([pair.index for pair in pairs], dtype=torch.long)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into rows of at most `capacity` tokens
    (an item longer than `capacity` gets a row of its own). Deterministic; rows in first-use order."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def choose_rows(lengths: list[int], attention_width: int) -> list[list[int]]:
    """Group pairs into rows with the least estimated compute.

    Linear layers cost ∝ rows·T (padding included) and attention ∝ rows·T² (a dense mask computes
    every query/key pair of a row), so the estimate is rows·T·(1 + T / attention_width), where
    `attention_width` is the row width at which attention costs as much as the linear layers
    (about 3 × hidden size for Llama-like models). Candidate row capacities: 1, 1.5, 2, 3 and 4
    times the longest pair, and everything in one row.
    """
    longest = max(lengths)
    best = None
    for capacity in sorted({int(longest * f) for f in (1, 1.5, 2, 3, 4)} | {sum(lengths)}):
        rows = pack_rows(lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * width * (1 + width / attention_width)
        if best is None or cost < best[0]:
            best = (cost, rows)
    return best[1]


def collate_prefix_shared(
    pairs: list[TokenizedPair], pad_token_id: int, attention: str = "spans", attention_width: int = 2048,
    rope_index: RopeIndex | None = None, image_token: int | None = None, last_token: LastToken | None = None,
) -> dict[str, torch.Tensor]:
    """Build a prefix-shared batch (layout in the module docstring).

    attention="spans": all pairs in one row, no padding; the attention is computed per pair from
    `pair_spans` (attention.py), so there is no attention_mask. attention="mask": rows chosen by
    `choose_rows`, attention_mask a dense bool [rows, 1, T, T] for any mask-honouring attention.
    Returns the keys of `collate_padded` (image inputs once per pair, in row order), plus pair_spans
    [B, 5] int64: row, offset and the prompt, chosen and rejected lengths of each pair, pairs of a row
    in offset order; with `last_token`, reward_source [B, 2] (module docstring).
    """
    if attention not in PACKED_ATTENTION:
        raise ValueError(f"attention must be one of {PACKED_ATTENTION}, got {attention!r}")
    lengths = [pair.shared_length for pair in pairs]
    rows = [list(range(len(pairs)))] if attention == "spans" else choose_rows(lengths, attention_width)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    rope = torch.zeros((3, len(rows), width), dtype=torch.long) if rope_index is not None else None
    # per token: which pair of the row it belongs to (−1 = padding) and its branch (PROMPT/CHOSEN/REJECTED)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)
    branch = torch.zeros((len(rows), width), dtype=torch.long)
    ids, source, pair_of, kind_of, spans = [], [], [], [], []
    reward_source = [[0, 0] for _ in pairs]
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            pair = pairs[i]
            p, c, n = len(pair.prompt_ids), len(pair.chosen_ids), lengths[i]
            spans.append([r, offset, p, c, len(pair.rejected_ids)])
            base = r * width + offset
            input_ids[r, offset : offset + n] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
            position_ids[r, offset : offset + n] = torch.cat([torch.arange(p + c), torch.arange(p, n - c)])
            if rope is not None:
                rope[:, r, offset : offset + n] = pair_rope_positions(
                    rope_index, pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, pair.vision_inputs)
            owner[r, offset : offset + n] = i
            branch[r, offset + p : offset + p + c] = CHOSEN
            branch[r, offset + p + c : offset + n] = REJECTED
            r_len = len(pair.rejected_ids)
            ids += pair.prompt_ids[1:] + pair.chosen_ids + pair.rejected_ids
            source += (
                list(range(base, base + p - 1))  # prompt token t ← hidden state t − 1
                + list(range(base + p - 1, base + p - 1 + c))  # chosen token j ← p − 1 + j
                + [base + p - 1]  # rejected token 0 ← the last prompt token, shared with chosen
                + list(range(base + p + c, base + p + c + r_len - 1))  # rejected j > 0 ← rejected j − 1
            )
            kind_of += [PROMPT] * (p - 1) + [CHOSEN] * c + [REJECTED] * r_len
            pair_of += [i] * (n - 1)
            if last_token is not None:
                # [prompt | chosen] is contiguous; [prompt | rejected] skips the chosen answer's c positions
                t_chosen = last_token(pair.prompt_ids + pair.chosen_ids)
                t_rejected = last_token(pair.prompt_ids + pair.rejected_ids)
                reward_source[i] = [base + t_chosen, base + t_rejected + (c if t_rejected >= p else 0)]
            offset += n
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        **_target_spec(ids, source, pair_of, kind_of),
        "pair_spans": torch.tensor(spans, dtype=torch.long).view(-1, 5),
        "pair_index": _pair_index(pairs),
        "num_pairs": torch.tensor(len(pairs)),
        "num_tokens": torch.tensor(sum(lengths)),
        **concat_vision_inputs([pairs[i].vision_inputs for row in rows for i in row]),
    }
    if rope is not None:
        batch["rope_position_ids"] = rope
    if last_token is not None:
        batch["reward_source"] = torch.tensor(reward_source, dtype=torch.long).view(-1, 2)
    blocks = image_blocks(input_ids, image_token) if image_token is not None else None
    if attention == "mask":
        batch["attention_mask"] = prefix_shared_mask(owner, branch, blocks)
    elif blocks is not None and bool((blocks >= 0).any()):
        raise OrpoError("span attention cannot let a prompt's image tokens attend to each other both ways, as this "
                        "model's do; use --packed_attention mask")
    return batch


def prefix_shared_mask(owner: torch.Tensor, branch: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [rows, 1, T, T] SDPA mask from per-token pair ids (−1 = padding) and branches [rows, T].

    query q may attend key k iff k ≤ q, same pair, and k is a prompt token or in q's branch;
    a padding query attends only to itself, so no row of the mask is empty (SDPA would give NaN).
    `blocks` [rows, T] (vision.image_blocks: one number per image's run of tokens, −1 elsewhere): tokens of
    one image also attend to each other's later tokens.
    """
    width = owner.shape[1]
    q, k = torch.arange(width)[:, None], torch.arange(width)[None, :]
    same_pair = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    visible_branch = (branch[:, None, :] == PROMPT) | (branch[:, None, :] == branch[:, :, None])
    mask = same_pair & visible_branch & (k <= q)
    if blocks is not None:
        mask |= (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    mask |= torch.eye(width, dtype=torch.bool)  # padding sees itself; real tokens already do
    return mask[:, None]


def segment_sums(
    token_logps: torch.Tensor, target_pair: torch.Tensor, target_kind: torch.Tensor, num_pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-token log-probs per (kind, pair).

    token_logps: [N] fp32; target_pair, target_kind: [N].
    Returns (sums [KINDS, B] fp32, counts [KINDS, B] int64), rows indexed by PROMPT/CHOSEN/REJECTED.
    """
    segment = target_kind * num_pairs + target_pair
    sums = token_logps.new_zeros(KINDS * num_pairs).index_add(0, segment, token_logps)
    counts = torch.bincount(segment, minlength=KINDS * num_pairs)
    return sums.view(KINDS, num_pairs), counts.view(KINDS, num_pairs)


def nll_token_count(target_kind: torch.Tensor, nll_scope: str) -> torch.Tensor:
    """Number of NLL targets: chosen tokens, plus prompt tokens when nll_scope == "full"."""
    in_scope = target_kind == CHOSEN
    if nll_scope == "full":
        in_scope |= target_kind == PROMPT
    return in_scope.sum()
