"""vision.py (and the layouts with images): each pair's images encoded once in the prefix-shared layout,
M-RoPE positions as the model gives each full sequence, per-pair log-probs equal to separate forwards.

Models are tiny random vision-language models built from configs (tests/vision_models.py), images
small seeded random arrays through each family's own image processor (PIL backend)."""
import pytest
import torch

from orpo.ops.attention import ATTENTION, use_span_attention
from orpo.ops.forward import pair_logps
from orpo.ops.packing import collate_prefix_shared
from orpo.ops.route import Route, choose_route, probe_route, route_logp_means, separate_logp_means
from orpo.ops.vision import (VISION_PREFIX, concat_vision_inputs, image_block_token, image_blocks, mm_token_type_ids,
                             pair_rope_positions, rope_index_of, vision_model_inputs, vision_tower)
from vision_models import FAMILIES, IMAGE, VIDEO, VISION_END, VISION_START, image_pair, tiny_vision_model


def test_concat_vision_inputs_joins_each_tensor_in_order_under_the_batch_prefix():
    first = {"pixel_values": torch.zeros(4, 3), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    second = {"pixel_values": torch.ones(8, 3), "image_grid_thw": torch.tensor([[1, 2, 4]])}
    joined = concat_vision_inputs([first, None, second])  # a text-only pair adds nothing
    assert sorted(joined) == [VISION_PREFIX + "image_grid_thw", VISION_PREFIX + "pixel_values"]
    assert joined[VISION_PREFIX + "pixel_values"].tolist() == [[0.0] * 3] * 4 + [[1.0] * 3] * 8
    assert joined[VISION_PREFIX + "image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    assert vision_model_inputs({"input_ids": torch.zeros(1), **joined}).keys() == {"pixel_values", "image_grid_thw"}
    assert concat_vision_inputs([None, None]) == {}
    # Idefics3's [prompts, images, ...]: a prompt with fewer images is padded with all-zero images, as its
    # processor batches them (the model drops those)
    one, two = torch.ones(1, 1, 3, 2, 2), torch.full((1, 2, 3, 2, 2), 2.0)
    batched = concat_vision_inputs([{"pixel_values": one}, {"pixel_values": two}])[VISION_PREFIX + "pixel_values"]
    assert batched.shape == (2, 2, 3, 2, 2)
    assert batched[0, 0].eq(1).all() and batched[0, 1].eq(0).all() and batched[1].eq(2).all()
    with pytest.raises(ValueError, match="same keys"):
        concat_vision_inputs([first, {"pixel_values": torch.ones(1, 3)}])


def test_mm_token_type_ids_marks_image_and_video_placeholders():
    config = type("Config", (), {"image_token_id": IMAGE, "video_token_id": VIDEO})()
    ids = torch.tensor([[5, IMAGE, IMAGE, 6, VIDEO]])
    assert mm_token_type_ids(ids, config).tolist() == [[0, 1, 1, 0, 2]]


def test_pair_rope_positions_worked_example_qwen2_vl():
    """One image of grid (t, h, w) = (1, 4, 6) patches, merged 2 × 2: 6 image tokens on a 2 × 3 grid.
    prompt = t0 t1 <vision_start> IMG×6 <vision_end> t2, chosen = c0 c1, rejected = r0.
    Text is 1D (all three axes equal): t0 0, t1 1, <vision_start> 2. The image starts at 3: time 3 for
    all six, height 3 + (0 0 0 1 1 1), width 3 + (0 1 2 0 1 2). Text continues from the largest
    position + 1 = 6: <vision_end> 6, t2 7, c0 8, c1 9; rejected restarts where chosen did: r0 8."""
    model = tiny_vision_model("qwen2_vl")
    vision_inputs = {"image_grid_thw": torch.tensor([[1, 4, 6]])}
    prompt = [10, 11, VISION_START] + [IMAGE] * 6 + [VISION_END, 12]
    positions = pair_rope_positions(rope_index_of(model), prompt, [20, 21], [30], vision_inputs)
    text = [0, 1, 2]
    after = [6, 7, 8, 9, 8]
    assert positions.tolist() == [
        text + [3] * 6 + after,
        text + [3, 3, 3, 4, 4, 4] + after,
        text + [3, 4, 5, 3, 4, 5] + after,
    ]


def test_rope_index_of_is_none_for_one_dimensional_positions():
    assert rope_index_of(tiny_vision_model("llava")) is None
    assert rope_index_of(tiny_vision_model("qwen2_vl")) is not None


def image_pairs(family):
    big = [(64, 96)] if family == "qwen3_vl" else [(56, 84)]  # Qwen3-VL patches are 16 pixels, the others 14
    # (Gemma 3 and LLaVA resize every image to one size: 4 image tokens each)
    two = [(32, 32), (64, 32)] if family == "qwen3_vl" else [(28, 28), (56, 42)]
    return [image_pair(family, big, (5, 7, 4), seed=1, index=0),
            image_pair(family, two, (3, 1, 6), seed=2, index=1),  # two images, a one-token chosen answer
            image_pair(family, big, (6, 5, 5), seed=3, index=2)]


def encoded_rows(model, compute):
    """(what `compute()` returns, the image rows the model's vision tower encoded meanwhile)."""
    seen = []
    hook = vision_tower(model).register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))).shape[0]), with_kwargs=True)
    try:
        return compute(), sum(seen)
    finally:
        hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_layout_equals_separate_forwards_and_prefix_sharing_encodes_each_image_once(family):
    """Gemma 3's image tokens attend to each other both ways: the mask layout adds those blocks, span
    attention has none and refuses such pairs (the route then takes the mask)."""
    model = tiny_vision_model(family)
    pairs = image_pairs(family)
    # each sequence alone, the model's own positions and masks: each pair's images encoded twice
    expected, twice = encoded_rows(model, lambda: separate_logp_means(model, pairs))
    once = twice // 2
    spans = [] if family == "gemma3" else [("spans", "chunked", once), ("spans", "logits", once)]
    for layout, head, encoded in [("padded", "chunked", 2 * once), ("mask", "chunked", once), *spans]:
        if layout == "spans":
            use_span_attention(model)
        got, rows = encoded_rows(model, lambda: route_logp_means(model, pairs, Route(layout, head)))
        assert (got - expected).abs().max() < 2e-6, (layout, head, got, expected)
        assert rows == encoded, (layout, rows, encoded)
    if family == "gemma3":
        use_span_attention(model)
        assert probe_route(model, Route("spans"), pairs, expected) == (
            "span attention cannot let a prompt's image tokens attend to each other both ways, as this model's do; "
            "use --packed_attention mask")
        assert choose_route(model, image_pairs=pairs).layout == "mask"


def test_gemma3_image_tokens_attend_both_ways_and_that_changes_the_answer():
    """The negative control of the test above: Gemma 3 read without its image blocks (token_type_ids) gives
    other log-probs, so the mask layout's blocks are tested, not idle."""
    model = tiny_vision_model("gemma3")
    pair = image_pairs("gemma3")[0]
    ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
    with torch.no_grad():
        causal = model(input_ids=ids, **pair.vision_inputs).logits[0, len(pair.prompt_ids):]
        blocks = model(input_ids=ids, token_type_ids=(ids == IMAGE).long(), **pair.vision_inputs).logits
        blocks = blocks[0, len(pair.prompt_ids):]
    assert (causal - blocks).abs().max() > 1e-3
    assert image_block_token(model) == IMAGE and image_block_token(tiny_vision_model("llava")) is None
    assert image_blocks(torch.tensor([[5, IMAGE, IMAGE, 6, IMAGE, 7]]), IMAGE).tolist() == [[-1, 0, 0, -1, 1, -1]]


def test_without_the_models_positions_the_layout_is_wrong():
    """The negative control: one position per token (a text model's) changes Qwen2-VL's result, so the
    test above could fail."""
    model = tiny_vision_model("qwen2_vl")
    pairs = image_pairs("qwen2_vl")
    expected = separate_logp_means(model, pairs)
    batch = collate_prefix_shared(pairs, 0, attention="mask")  # no rope_index
    with torch.no_grad():
        logps = pair_logps(model, batch, 64)
    got = torch.stack([logps.logps_chosen, logps.logps_rejected], dim=1)
    assert (got - expected).abs().max() > 1e-3


def test_span_attention_replaces_the_language_models_attention_only():
    model = tiny_vision_model("qwen2_vl")
    use_span_attention(model)
    assert model.config.get_text_config()._attn_implementation == ATTENTION
    assert model.config.vision_config._attn_implementation == "sdpa"  # its tokens are patches, not pairs


def test_the_route_probe_pairs_of_a_vision_language_model_hold_no_placeholder_ids():
    """Random probe ids must not ask for images the probe has none of (Qwen2-VL's vocabulary holds them)."""
    from orpo.ops.route import probe_pairs

    model = tiny_vision_model("qwen2_vl")
    ids = {i for pair in probe_pairs(model) for i in pair.prompt_ids + pair.chosen_ids + pair.rejected_ids}
    assert not ids & {IMAGE, VIDEO, VISION_START, VISION_END}
    assert choose_route(model, image_pairs=image_pairs("qwen2_vl")[:2]).layout == "spans"
