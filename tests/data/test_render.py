"""render.py: exact trained tokens for ChatML-, Llama-3- and Zephyr-like templates, and truncation.

The tokenizers are built offline: a WordLevel model over a tiny vocabulary that splits on spaces and
punctuation and keeps "\\n" as its own token, so a stray template newline would show up in the ids.
"""
import pytest

from transformers import GenerationConfig

from orpo.errors import SAME_AFTER_TRUNCATION, TEMPLATE_ERROR, TOO_LONG, DroppedPair, OrpoError
from orpo.data.formats import PreferencePair
from orpo.data import render
from orpo.data.render import (DEFAULT_CHAT_TEMPLATE, NO_LIMITS, LengthLimits, encode_prompt, ensure_chat_template, render_pair,
                              stop_token_ids, truncate)
from tiny import word_level_tokenizer

WORDS = ("<unk> \n user assistant system Hi there Hello Go away ! , . you are kind be brief "
         "What is 2 + ? 4 5 : < | > im _ start end").split(" ") + ["\n"]

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# HuggingFaceH4/zephyr-7b-beta's template (rendered with trim_blocks/lstrip_blocks by transformers).
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# A template that writes no special token after the answer.
PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}" \
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"


def make_tokenizer(special, template, **kw):
    return word_level_tokenizer(WORDS, special, template, **kw)


def chatml():  # like SmolLM2: bos_token is <|im_start|> but the tokenizer adds no BOS
    return make_tokenizer(["<|im_start|>", "<|im_end|>"], CHATML, bos="<|im_start|>", eos="<|im_end|>")


def llama3():
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"]
    return make_tokenizer(special, LLAMA3, bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True)


def zephyr():
    return make_tokenizer(["<s>", "</s>"], ZEPHYR, bos="<s>", eos="</s>", add_bos=True,
                          plain_added=["<|user|>", "<|assistant|>", "<|system|>"])


def pair(prompt=None, chosen="Hello there !", rejected="Go away", index=3):
    prompt = prompt or [{"role": "user", "content": "Hi"}]
    return PreferencePair(prompt, [{"role": "assistant", "content": chosen}],
                          [{"role": "assistant", "content": rejected}], index)


def toks(tok, tp):
    c = tok.convert_ids_to_tokens
    return c(tp.prompt_ids), c(tp.chosen_ids), c(tp.rejected_ids)


def test_chatml_exact_tokens():
    tok = chatml()
    p, c, r = toks(tok, render_pair(pair(), tok, NO_LIMITS))
    assert p == ["<|im_start|>", "user", "\n", "Hi", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    assert c == ["Hello", "there", "!", "<|im_end|>"]
    assert r == ["Go", "away", "<|im_end|>"]


def test_llama3_exact_tokens_bos_once():
    tok = llama3()
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS ...
    tp = render_pair(pair(), tok, NO_LIMITS)
    p, c, r = toks(tok, tp)
    # ... and the template writes it too: it must appear once.
    assert p == ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n", "\n", "Hi",
                 "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n", "\n"]
    # <|eot_id|> ends the turn; eos (<|end_of_text|>) is not appended on top.
    assert c == ["Hello", "there", "!", "<|eot_id|>"]
    assert r == ["Go", "away", "<|eot_id|>"]
    assert tp.index == 3


def test_zephyr_exact_tokens_bos_prepended():
    tok = zephyr()
    p, c, r = toks(tok, render_pair(pair(), tok, NO_LIMITS))
    assert p == ["<s>", "<|user|>", "\n", "Hi", "</s>", "\n", "<|assistant|>", "\n"]
    assert c == ["Hello", "there", "!", "</s>"]
    assert r == ["Go", "away", "</s>"]


@pytest.mark.parametrize("make, eot", [(chatml, "<|im_end|>"), (llama3, "<|eot_id|>"), (zephyr, "</s>")])
def test_invariants(make, eot):
    tok = make()
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2 + 2 ?"}]
    tp = render_pair(pair(prompt, "4", "5 !"), tok, NO_LIMITS)
    p, c, r = toks(tok, tp)
    ids = tp.prompt_ids + tp.chosen_ids + tp.rejected_ids
    if tok.bos_token_id is not None and make is not chatml:
        assert p[0] == tok.bos_token and ids.count(tok.bos_token_id) == 1
    for comp in (c, r):
        assert comp[-1] == eot and comp.count(eot) == 1 and "\n" not in comp
    assert p[-1] == "\n" and "<unk>" not in p + c + r


def test_multi_turn_system_prompt_chatml():
    tok = chatml()
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2 + 2 ?"}]
    p, c, r = toks(tok, render_pair(pair(prompt, "4", "5"), tok, NO_LIMITS))
    assert p == ["<|im_start|>", "system", "\n", "be", "brief", "<|im_end|>", "\n",
                 "<|im_start|>", "user", "\n", "Hi", "<|im_end|>", "\n",
                 "<|im_start|>", "assistant", "\n", "Hello", "<|im_end|>", "\n",
                 "<|im_start|>", "user", "\n", "What", "is", "2", "+", "2", "?", "<|im_end|>", "\n",
                 "<|im_start|>", "assistant", "\n"]
    assert (c, r) == (["4", "<|im_end|>"], ["5", "<|im_end|>"])


def test_template_without_end_token_gets_one_eos():
    tok = make_tokenizer(["</s>"], PLAIN, eos="</s>")
    p, c, r = toks(tok, render_pair(pair(), tok, NO_LIMITS))
    assert p == ["user", ":", "Hi", "\n", "\n", "assistant", ":"]
    assert c == ["Hello", "there", "!", "</s>"] and r == ["Go", "away", "</s>"]


def test_prompt_rendered_differently_raises():
    template = "{% if messages[-1]['role'] == 'assistant' %}system : {% endif %}" + CHATML
    tok = make_tokenizer(["<|im_start|>", "<|im_end|>"], template, eos="<|im_end|>")
    with pytest.raises(OrpoError, match="row 7"):
        render_pair(pair(index=7), tok, NO_LIMITS)


def test_default_chat_template_and_pad():
    tok = make_tokenizer(["<|im_start|>", "<|im_end|>"], None, eos="<|im_end|>")
    assert tok.pad_token is None
    warnings = ensure_chat_template(tok)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and tok.pad_token == "<|im_end|>"
    assert len(warnings) == 2 and "chat template" in warnings[0] and "pad" in warnings[1]
    p, c, _ = toks(tok, render_pair(pair(), tok, NO_LIMITS))
    assert p == ["<|im_start|>", "user", "\n", "Hi", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    assert c == ["Hello", "there", "!", "<|im_end|>"]
    assert ensure_chat_template(tok) == []  # idempotent


def test_default_chat_template_eos_fallback():
    tok = make_tokenizer(["<s>", "</s>"], None, bos="<s>", eos="</s>", add_bos=True)
    warnings = ensure_chat_template(tok)
    assert "'</s>'" in warnings[0] and "end of turn" in warnings[0] and tok.pad_token == "</s>"
    tp = render_pair(pair(), tok, NO_LIMITS)
    p, c, _ = toks(tok, tp)
    im_start = ["<", "|", "im", "_", "start", "|", ">"]  # not in the vocab: plain text
    assert p == ["<s>", *im_start, "user", "\n", "Hi", "</s>", "\n", *im_start, "assistant", "\n"]
    assert c == ["Hello", "there", "!", "</s>"]


@pytest.mark.parametrize("make", [chatml, llama3, zephyr])
def test_encode_prompt_is_the_training_prompt(make):
    tok = make()
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Hi"}]
    assert encode_prompt(tok, prompt) == render_pair(pair(prompt), tok, NO_LIMITS).prompt_ids


def test_stop_token_ids_add_the_end_of_turn():
    ids = lambda tok, *names: [tok.convert_tokens_to_ids(n) for n in names]  # noqa: E731
    other_eos = make_tokenizer(["<s>", "</s>", "<|im_start|>", "<|im_end|>"], CHATML, bos="<s>", eos="</s>")
    assert stop_token_ids(other_eos) == ids(other_eos, "</s>", "<|im_end|>")
    config = GenerationConfig(eos_token_id=[other_eos.convert_tokens_to_ids("<|im_end|>"), 7])
    assert stop_token_ids(other_eos, config) == ids(other_eos, "<|im_end|>") + [7] + ids(other_eos, "</s>")
    assert stop_token_ids(chatml(), GenerationConfig(eos_token_id=7)) == [7] + ids(chatml(), "<|im_end|>")
    assert stop_token_ids(llama3()) == ids(llama3(), "<|end_of_text|>", "<|eot_id|>")
    assert stop_token_ids(zephyr()) == ids(zephyr(), "</s>")  # eos is the end of turn: once
    for template in (PLAIN, None):  # no special token after the answer; no template at all
        tok = make_tokenizer(["</s>"], template, eos="</s>")
        assert stop_token_ids(tok) == ids(tok, "</s>")


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
     "{% endif %}{{ m['content'] }}{% endfor %}", "System role not supported"),
    ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
     "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
     "{% endif %}{{ m['content'] }}{% endfor %}", "Conversation roles must alternate user/assistant/user/assistant/..."),
    ("{{ messages[0]['content'] + 1 }}", 'can only concatenate str (not "int") to str'),  # a TypeError
    ("{% for m in messages %}{{ m['content'] }}", "Unexpected end of template. Jinja was looking for the following "
                                                  "tags: 'endfor' or 'else'. The innermost block that needs to be "
                                                  "closed is 'for'."),
])
def test_template_error_drops_the_pair_with_its_message(template, message):
    tok = make_tokenizer(["</s>"], template, eos="</s>")
    system_first = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Hi"}]
    with pytest.raises(DroppedPair) as e:
        render_pair(pair(system_first), tok, NO_LIMITS)
    assert (e.value.reason, e.value.detail) == (TEMPLATE_ERROR, message)


def test_answers_equal_after_truncation_drop_the_pair():
    tok = chatml()
    with pytest.raises(DroppedPair) as e:
        render_pair(pair(chosen="Hello there !", rejected="Hello there ."), tok, LengthLimits(None, None, 2))
    assert (e.value.reason, e.value.detail) == (SAME_AFTER_TRUNCATION, "both answers are the same 2 tokens "
                                                                       "within the length limits")
    _, c, r = toks(tok, render_pair(pair(chosen="Hello there !", rejected="Hello there ."), tok, LengthLimits(None, None, 3)))
    assert (c, r) == (["Hello", "there", "!"], ["Hello", "there", "."])  # one more token tells them apart


# ---- truncation ------------------------------------------------------------------------------------

BOS = 100


def test_truncate_completion_from_right():
    assert truncate([BOS, 1], [2, 3, 4, 5], [6, 7], LengthLimits(None, None, 3), BOS) == ([BOS, 1], [2, 3, 4], [6, 7])


def test_truncate_prompt_keeps_end_and_bos():
    assert truncate([BOS, 1, 2, 3, 4], [5], [6], LengthLimits(None, 3, None), BOS) == ([BOS, 3, 4], [5], [6])
    assert truncate([1, 2, 3, 4], [5], [6], LengthLimits(None, 2, None), BOS) == ([3, 4], [5], [6])  # no BOS to keep
    assert truncate([1, 2, 3, 4], [5], [6], LengthLimits(None, 2, None), None) == ([3, 4], [5], [6])
    assert truncate([BOS, 1, 2], [5], [6], LengthLimits(None, 1, None), BOS) == ([BOS], [5], [6])


def test_truncate_max_length_cuts_completions():
    assert truncate([BOS, 1, 2], [3, 4, 5, 6], [7, 8], LengthLimits(5, None, None), BOS) == ([BOS, 1, 2], [3, 4], [7, 8])
    assert truncate([BOS, 1], [3, 4], [7], LengthLimits(4, None, None), BOS) == ([BOS, 1], [3, 4], [7])  # fits


def test_truncate_drops_when_prompt_leaves_no_room():
    with pytest.raises(DroppedPair) as e:
        truncate([BOS, 1, 2, 3], [4], [5], LengthLimits(4, None, None), BOS)
    assert e.value.reason == TOO_LONG
    assert str(e.value) == "too long: prompt of 4 tokens leaves no room for the completion within max_length=4"


def test_truncate_never_empty_completion():
    for n_prompt in range(1, 6):
        for max_length in range(1, 9):
            for mpl in (None, 1, 2, 3):
                for mcl in (None, 1, 2):
                    prompt = [BOS] + list(range(1, n_prompt))
                    try:
                        p, c, r = truncate(prompt, [1, 2, 3], [4], LengthLimits(max_length, mpl, mcl), BOS)
                    except DroppedPair as e:
                        assert e.reason == TOO_LONG and len(prompt if mpl is None else
                                                            prompt[:mpl]) >= max_length
                        continue
                    assert c and r and len(p) + max(len(c), len(r)) <= max_length
                    assert p[0] == BOS and (mpl is None or len(p) <= mpl)
                    assert mcl is None or max(len(c), len(r)) <= mcl


def test_longest_pair_worked_by_hand():
    """max_length 8: prompt p, completions min(m, 8 − p): no completion limit → p = 1 (1 + 7 + 7 = 15 tokens);
    m = 3 → p = 8 − 3 = 5 (5 + 3 + 3 = 11 > 1 + 3 + 3); max_prompt_length 2 caps p (2 + 3 + 3 = 8);
    no max_length: max_prompt_length and m, or unbounded."""
    assert LengthLimits(8, None, None).longest_pair() == (1, 7, 7)
    assert LengthLimits(8, 5, 3).longest_pair() == (5, 3, 3)
    assert LengthLimits(8, 2, 3).longest_pair() == (2, 3, 3)
    assert LengthLimits(8, None, 20).longest_pair() == (1, 7, 7)
    assert LengthLimits(None, 4, 3).longest_pair() == (4, 3, 3)
    assert LengthLimits(None, 4, None).longest_pair() is None and LengthLimits(None, None, 3).longest_pair() is None


def test_longest_pair_is_the_longest_truncate_lets_through():
    """Against every prompt length, with completions longer than any limit."""
    for max_length in range(2, 10):
        for mpl in (None, 1, 2, 5):
            for mcl in (None, 1, 3, 20):
                longest = 0
                for n_prompt in range(1, 12):
                    try:
                        p, c, r = truncate([7] * n_prompt, [1] * 30, [2] * 30, LengthLimits(max_length, mpl, mcl), None)
                    except DroppedPair:
                        continue
                    longest = max(longest, len(p) + len(c) + len(r))
                assert sum(LengthLimits(max_length, mpl, mcl).longest_pair()) == longest, (max_length, mpl, mcl)


def test_render_pair_truncation_end_to_end():
    tok = zephyr()
    tp = render_pair(pair(prompt=[{"role": "user", "content": "What is 2 + 2 ?"}]), tok, LengthLimits(8, 5, 3))
    p, c, r = toks(tok, tp)
    assert p == ["<s>", "</s>", "\n", "<|assistant|>", "\n"]  # BOS kept, then the prompt's end
    assert c == ["Hello", "there", "!"] and r == ["Go", "away", "</s>"]
    with pytest.raises(DroppedPair, match="prompt of 5 tokens leaves no room"):
        render_pair(pair(), tok, LengthLimits(5, 5, None))


def test_clip_pair_keeps_exactly_the_tokens_truncation_keeps(monkeypatch):
    """A 30k-character prompt and answer: cut to limit × MAX_CHARS_PER_TOKEN characters before
    rendering, the ids are the same as rendering everything and truncating the tokens."""
    long_prompt = [{"role": "user", "content": " ".join(["Hi"] * 9000) + " there"}]
    big = pair(prompt=long_prompt, chosen=" ".join(["Hello", "there"] * 3000))
    clipped = render.clip_pair(big, LengthLimits(64, 16, None))
    assert len(clipped.prompt[0]["content"]) == 16 * render.MAX_CHARS_PER_TOKEN
    assert clipped.prompt[0]["content"].endswith("Hi there")  # the prompt keeps its end
    assert clipped.chosen[0]["content"] == big.chosen[0]["content"][: 64 * render.MAX_CHARS_PER_TOKEN]
    assert clipped.rejected == big.rejected  # short texts are untouched
    fast = render_pair(big, chatml(), LengthLimits(64, 16, None))
    monkeypatch.setattr(render, "MAX_CHARS_PER_TOKEN", 10**9)  # no clipping
    assert render_pair(big, chatml(), LengthLimits(64, 16, None)) == fast
    assert len(fast.prompt_ids) == 16 and len(fast.chosen_ids) == 64 - 16


def test_no_limits_no_clipping():
    big = pair(chosen="Hello " * 100_000)
    assert render.clip_pair(big, NO_LIMITS) == big


# --- images (a vision-language model's processor) ------------------------------------------------------

def image_pair(images=1, prompt_text="Describe it."):
    from vision_models import random_image

    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt_text}]
    return PreferencePair([{"role": "user", "content": content}],
                          [{"role": "assistant", "content": "A dog on a beach."}], [{"role": "assistant", "content": "A cat."}],
                          images=tuple(random_image(20, 30, seed=i) for i in range(images)))


def test_an_image_prompt_is_tokenized_by_the_processor_with_its_images():
    """The processor's template writes "<image>" where the part stands and the processor expands it to the
    image's 4 tokens; the answers are text tokens of the processor's tokenizer, ending at <|im_end|>."""
    from vision_models import llava_processor

    processor = llava_processor()
    tok = processor.tokenizer
    got = render_pair(image_pair(), processor, LengthLimits(256, 128, None))
    image = tok.convert_tokens_to_ids("<image>")
    expected_prompt = (tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"] + [image] * 4
                       + tok("Describe it.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    assert got.prompt_ids == expected_prompt
    assert got.chosen_ids == tok("A dog on a beach.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert got.rejected_ids == tok("A cat.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert got.vision_inputs.keys() == {"pixel_values"} and got.vision_inputs["pixel_values"].shape == (1, 3, 28, 28)
    assert len(got.images) == 1 and got.images[0].startswith(b"\x89PNG")  # stored as an image file


def test_an_image_prompt_is_never_cut():
    from vision_models import llava_processor

    processor = llava_processor()
    prompt_tokens = len(render_pair(image_pair(2), processor, NO_LIMITS).prompt_ids)
    with pytest.raises(DroppedPair) as drop:
        render_pair(image_pair(2), processor, LengthLimits(None, prompt_tokens - 1, None))
    assert (drop.value.reason, drop.value.detail) == (
        TOO_LONG, f"the prompt with its image tokens is {prompt_tokens} tokens, over "
                  f"max_prompt_length={prompt_tokens - 1} (image tokens are not cut)")
    assert render_pair(image_pair(2), processor, LengthLimits(None, prompt_tokens, None)).prompt_ids  # at the limit: kept


def test_images_for_a_text_only_tokenizer_are_that_drop():
    from orpo.errors import TEXT_ONLY_MODEL

    tok = word_level_tokenizer(WORDS, ["<|im_start|>", "<|im_end|>"], CHATML, eos="<|im_end|>")
    with pytest.raises(DroppedPair) as drop:
        render_pair(image_pair(), tok, LengthLimits(256, 128, None))
    assert (drop.value.reason, drop.value.detail) == (
        TEXT_ONLY_MODEL, "the prompt has 1 image(s) and the model's tokenizer no image processor")


def test_a_text_pair_renders_alike_through_the_processor_and_its_tokenizer():
    from vision_models import llava_processor

    processor = llava_processor()
    text = PreferencePair([{"role": "user", "content": "what is in the picture?"}],
                          [{"role": "assistant", "content": "A dog."}], [{"role": "assistant", "content": "A cat."}])
    processor.tokenizer.chat_template = processor.chat_template
    assert render_pair(text, processor, LengthLimits(256, 128, None)) == render_pair(text, processor.tokenizer, LengthLimits(256, 128, None))
    assert render_pair(text, processor, LengthLimits(256, 128, None)).vision_inputs is None


# ---- encoder-decoder models (T5, BART): no chat template ------------------------------------------------

def _answer(text):
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_pair_is_the_tokenizers_own_ids(family):
    """An encoder-decoder model's tokenizer without a chat template gets ENCODER_DECODER_TEMPLATE, silently: the
    prompt is the text with the tokenizer's own special tokens (T5: "... </s>"; BART: "<s> ... </s>"), each answer
    the text with EOS exactly once at its end; a system message joins the prompt with a blank line."""
    from tiny import bart_tokenizer, t5_tokenizer

    tok = t5_tokenizer() if family == "t5" else bart_tokenizer()
    assert ensure_chat_template(tok, encoder_decoder=True) == []
    assert tok.chat_template == render.ENCODER_DECODER_TEMPLATE
    pair = PreferencePair([{"role": "user", "content": "the sky is"}], _answer("blue"), _answer("green red"))
    got = render_pair(pair, tok, NO_LIMITS)
    words = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tok.eos_token_id]
    bos = [tok.bos_token_id] if family == "bart" else []
    assert got.prompt_ids == tok("the sky is")["input_ids"] == bos + words("the sky is") + eos
    assert got.chosen_ids == words("blue") + eos and got.rejected_ids == words("green red") + eos
    assert encode_prompt(tok, pair.prompt) == got.prompt_ids  # generation prompts the encoder the same way
    system = PreferencePair([{"role": "system", "content": "ok"}, {"role": "user", "content": "why"}], _answer("yes"),
                            _answer("no"))
    assert render_pair(system, tok, NO_LIMITS).prompt_ids == bos + words("ok") + words("\n\n") + words("why") + eos


def test_encoder_decoder_truncation_keeps_the_prompts_end_and_never_empties_an_answer():
    """T5: a long prompt keeps its end (its "</s>" included); an answer is cut from the right, never to nothing."""
    from tiny import t5_tokenizer

    tok = t5_tokenizer()
    ensure_chat_template(tok, encoder_decoder=True)
    pair = PreferencePair([{"role": "user", "content": "the sky is blue green red"}], _answer("yes good"),
                          _answer("no bad ok"))
    got = render_pair(pair, tok, LengthLimits(max_length=5, max_prompt_length=3, max_completion_length=None))
    assert got.prompt_ids == tok("green red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert got.chosen_ids == tok("yes good", add_special_tokens=False)["input_ids"]
    assert got.rejected_ids == tok("no bad", add_special_tokens=False)["input_ids"]
    with pytest.raises(DroppedPair) as drop:
        render_pair(pair, tok, LengthLimits(max_length=3, max_prompt_length=3, max_completion_length=None))
    assert drop.value.reason == TOO_LONG


def test_encode_answer_is_a_training_pairs_prompt_and_completion():
    """What a reward model trained here read in training (render_pair's prompt + chosen ids) is what the judge
    scores for the same answer (render.encode_answer)."""
    from tiny import chatml_tokenizer

    tok = chatml_tokenizer()
    prompt = [{"role": "system", "content": "ok"}, {"role": "user", "content": "why is the sky blue"}]
    trained = render_pair(PreferencePair(prompt, [{"role": "assistant", "content": "the sky is blue"}],
                                         [{"role": "assistant", "content": "no"}], 0), tok, NO_LIMITS)
    assert render.encode_answer(tok, prompt, "the sky is blue") == (trained.prompt_ids, trained.chosen_ids)
    assert trained.chosen_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # the template's "\n" after it: not read
