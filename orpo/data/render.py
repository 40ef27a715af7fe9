"""PreferencePair + tokenizer → TokenizedPair through the chat template.

Rules (the subtle part of preference training, and where other trainers go wrong):

* prompt text = the template applied to the prompt messages with the generation prompt; the full text
  = the template applied to prompt + answer. The full text must start with the prompt text; the rest is
  the completion.
* A completion ends with its end-of-turn special token, included; template whitespace after it
  (ChatML's "\\n" after `<|im_end|>`, Zephyr's "\\n" after `</s>`) is not trained on. A template that
  writes no special token after the answer gets `tokenizer.eos_token` appended, never a second one.
* Prompt and completions are tokenised separately with `add_special_tokens=False` (special tokens in
  the template text are still parsed as such). BOS appears once: prepended only if the tokenizer
  normally adds one and the template did not already write it. `encode_prompt` is this prompt rule,
  and generation (`orpo generate`, `orpo chat`, the demo) uses it too, so a model is prompted exactly
  as it was trained.
* A pair the chat template refuses (roles that do not alternate, a system message it does not
  support) is dropped as TEMPLATE_ERROR with the template's message; one whose answers are the same
  after truncation as SAME_AFTER_TRUNCATION.
* Truncation (TRL's names, `LengthLimits`) is in `truncate`. Before rendering, message texts far longer than the
  limits could use are cut (`clip_pair`), so a 50 MB answer costs no more than a long one.
* Images (vision-language models): `tokenizer` is then the model's processor. Its chat template renders
  the prompt with its image parts, and the processor itself tokenizes the prompt with the images, so
  each image placeholder becomes as many image tokens as that image gets (its size decides); the
  answers are text, tokenized by the processor's tokenizer. A prompt with image tokens is never cut:
  one over max_prompt_length is dropped (TOO_LONG). Image pairs for a plain tokenizer (a text-only
  model) are TEXT_ONLY_MODEL, which prepare.py reports as one error.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from jinja2 import TemplateError

from orpo.errors import (EMPTY_RESPONSE, SAME_AFTER_TRUNCATION, TEMPLATE_ERROR, TEXT_ONLY_MODEL, TOO_LONG, DroppedPair,
                         OrpoError, first_line)
from orpo.data.formats import PreferencePair
from orpo.data.images import TEXT_KEYS, decode_image, is_processor, read_image_files, text_tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, set by `ensure_chat_template` on tokenizers without a chat template: each message is
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, the generation prompt is `<|im_start|>assistant\\n`.
If the vocabulary lacks `<|im_end|>`, the tokenizer's eos_token ends each turn instead."""

ENCODER_DECODER_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' or loop.last or messages[loop.index0 + 1]['role'] == 'assistant' %}"
    "{{ eos_token }}{% else %}{{ '\n\n' }}{% endif %}{% endfor %}"
)
"""Set by `ensure_chat_template` on an encoder-decoder model's tokenizer without a chat template (T5, BART): the
texts as they are, the prompt's messages joined by a blank line and ended by eos_token, each answer ended by
eos_token; no roles, no generation prompt. So the encoder reads the prompt with the tokenizer's own special tokens
("text</s>"; BART's tokenizer also puts "<s>" in front, `adds_bos`) and the decoder's targets are the answer with
EOS exactly once ("answer</s>"), as `tokenizer(text)` gives them."""


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair in the prefix-shared layout [prompt | chosen | rejected].

    prompt_ids:   the rendered prompt up to and including the generation prompt (BOS once, at the start
                  if the tokenizer uses one).
    chosen_ids:   the chosen assistant turn up to and including its end-of-turn token; never empty.
    rejected_ids: the same for the rejected turn; never empty.
    index:        the source row (0-based).
    images:       the prompt's images as image file bytes (images.read_image), in placeholder order;
                  () for a text-only pair.
    vision_inputs: for a prompt with images, the image processor's tensors for them, as a batch of one
                  prompt (pixel_values and, per family, image_grid_thw, image_sizes, ...): the model
                  encodes them into the prompt's image tokens, in order (ops/vision.py). None for a
                  text-only pair. Not part of equality (tensors; `images` is).
    Every chosen/rejected token is a training target; prompt tokens are NLL targets only when
    nll_scope == "full".
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = 0
    images: tuple = ()
    vision_inputs: dict | None = field(default=None, compare=False)

    @property
    def shared_length(self) -> int:
        """Tokens of the pair in the prefix-shared layout: prompt + chosen + rejected."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def ensure_chat_template(tokenizer, encoder_decoder: bool = False) -> list[str]:
    """Give `tokenizer` a chat template and a pad token if it lacks them; return the warnings to log. A
    processor without a chat template takes its tokenizer's; the pad token is its tokenizer's.
    `encoder_decoder` (the model's config.is_encoder_decoder): a tokenizer without a template gets
    ENCODER_DECODER_TEMPLATE, with no warning (the texts are what such a model reads)."""
    if is_processor(tokenizer):
        warnings = ensure_chat_template(tokenizer.tokenizer, encoder_decoder)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = tokenizer.tokenizer.chat_template
            warnings.append("processor has no chat template; using its tokenizer's")
        return warnings
    warnings = []
    if tokenizer.chat_template is None and encoder_decoder:
        if tokenizer.eos_token is None:
            raise OrpoError("the encoder-decoder model's tokenizer has no chat template and no eos_token to end the "
                            "prompt and the answers with")
        tokenizer.chat_template = ENCODER_DECODER_TEMPLATE
    elif tokenizer.chat_template is None:
        vocab = tokenizer.get_vocab()
        if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
            warnings.append("tokenizer has no chat template; using the default ChatML template")
        else:
            if tokenizer.eos_token is None:
                raise OrpoError("tokenizer has no chat template, no <|im_end|> token and no eos_token")
            # Adding <|im_end|> would need new, untrained embeddings; the eos token already means "stop".
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE.replace("'<|im_end|>'", "eos_token")
            warnings.append(
                "tokenizer has no chat template and no <|im_start|>/<|im_end|> tokens; using the default "
                f"ChatML template with eos_token {tokenizer.eos_token!r} as the end of turn"
            )
    if tokenizer.pad_token is None:
        pad = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if pad is not None:
            tokenizer.pad_token = pad
            warnings.append(f"tokenizer has no pad token; using {pad!r}")
    return warnings


def _special_strings(tokenizer) -> set[str]:
    """Every special token's text (eos/bos/... and added special tokens like Llama-3's <|eot_id|>)."""
    added = tokenizer.added_tokens_decoder.values()
    return set(tokenizer.all_special_tokens) | {t.content for t in added if t.special}


def adds_bos(tokenizer) -> bool:
    """Whether tokenizing with add_special_tokens=True puts bos_token_id in front."""
    return _adds_special(tokenizer, tokenizer.bos_token_id, slice(None, 1))


def adds_eos(tokenizer) -> bool:
    """Whether tokenizing with add_special_tokens=True puts eos_token_id at the end."""
    return _adds_special(tokenizer, tokenizer.eos_token_id, slice(-1, None))


def _adds_special(tokenizer, token_id: int | None, where: slice) -> bool:
    """Whether `token_id` is at `where` (the first or last position) of a text tokenized with
    add_special_tokens=True and not without."""
    if token_id is None:
        return False
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    return with_special[where] == [token_id] and without[where] != [token_id]


TEMPLATE_ERRORS = (TemplateError, ValueError, TypeError)
"""What applying a chat template raises on a conversation it refuses: jinja2's errors (its
`raise_exception(...)`, syntax errors) and the ValueError/TypeError some templates raise."""


def template_error_message(err: Exception) -> str:
    """The first line of a chat template's error, for a one-line report."""
    return first_line(err)


def _render_prompt(tokenizer, messages: list[dict], images: tuple[bytes, ...] = ()
                   ) -> tuple[str, list[int], dict | None]:
    """(prompt text, prompt ids, the images' inputs or None); `tokenizer` may be a processor, which then
    tokenizes the prompt with its `images` (each placeholder expanded to that image's tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    words = text_tokenizer(tokenizer)
    vision_inputs = None
    if images:
        output = tokenizer(text=[text], images=[decode_image(data) for data in images], add_special_tokens=False,
                           return_tensors="pt")
        ids = output["input_ids"][0].tolist()
        vision_inputs = {key: value for key, value in output.items() if key not in TEXT_KEYS}
    else:
        ids = words(text, add_special_tokens=False)["input_ids"]
    bos = words.bos_token_id
    if adds_bos(words) and ids[:1] != [bos]:
        ids = [bos] + ids  # the model was trained with BOS; the template didn't write it
    return text, ids, vision_inputs


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids training uses, and so the ids generation must feed the model: `messages`
    through the chat template with the generation prompt, tokenized with add_special_tokens=False,
    with BOS prepended iff the tokenizer normally adds one and the template did not write it. A prompt
    with images: `encode_image_prompt`, which also returns their inputs. Raises what the template
    raises (TEMPLATE_ERRORS)."""
    return _render_prompt(tokenizer, messages)[1]


def encode_answer(tokenizer, messages: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one answer to `messages`, by the rules a training pair's are made (module
    docstring): `encode_prompt`'s ids, then the assistant's turn up to and including its end-of-turn token (EOS
    where the template writes none). What a reward model trained by orpo read in training, and so what it scores.
    Untruncated; raises what the template raises (TEMPLATE_ERRORS)."""
    prompt_text, prompt_ids, _ = _render_prompt(tokenizer, messages)
    completion = _completion_text(messages, [{"role": "assistant", "content": answer}], prompt_text, tokenizer,
                                  "an answer")
    return prompt_ids, text_tokenizer(tokenizer)(completion, add_special_tokens=False)["input_ids"]


def encode_image_prompt(processor, messages: list[dict], images: tuple[bytes, ...]) -> tuple[list[int], dict | None]:
    """(`encode_prompt`'s ids, the images' inputs for the model) of a prompt with image parts."""
    _, ids, vision_inputs = _render_prompt(processor, messages, images)
    return ids, vision_inputs


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The ids that end an answer, deduplicated in this order: generation_config's eos_token_id
    (int or list), the tokenizer's eos, and the chat template's end-of-turn token, i.e. the first
    special token the template writes after the assistant's content in [user "x", assistant "y"]
    (ChatML <|im_end|>, Llama-3 <|eot_id|>, Zephyr </s>). A model whose eos is not its end of turn
    (a base model given ChatML) would otherwise run on into turns it invents."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id]
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except TEMPLATE_ERRORS:  # no template, or one refusing the probe: the eos ids are all we know
        text = ""
    after = text[text.rfind("y") + 1:] if "y" in text else ""
    found = [(after.find(s), -len(s), s) for s in _special_strings(tokenizer) if s in after]
    if found:  # the earliest; of two starting there, the longer
        ids.append(tokenizer.convert_tokens_to_ids(min(found)[2]))
    return list(dict.fromkeys(i for i in ids if i is not None))


def _completion_text(prompt: list[dict], answer: list, prompt_text: str, tokenizer, where: str) -> str:
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    tokenizer = text_tokenizer(tokenizer)
    if not full.startswith(prompt_text):
        raise OrpoError(
            f"{where}: the chat template renders the prompt differently with and without "
            "the answer, so the completion cannot be separated from the prompt"
        )
    # Whitespace the template writes after the end-of-turn token is formatting, not the answer:
    # at generation time the model stops at the end-of-turn token and never produces it.
    text = full[len(prompt_text):].rstrip()
    if not any(text.endswith(s) for s in _special_strings(tokenizer)) and tokenizer.eos_token:
        text += tokenizer.eos_token  # no end-of-turn token: teach the model to stop with EOS
    return text


@dataclass(frozen=True)
class LengthLimits:
    """TRL's three length limits, which travel together (None: no limit): prompt + completion tokens of each
    sequence (`max_length`), prompt tokens (`max_prompt_length`), completion tokens (`max_completion_length`)."""

    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    max_completion_length: int | None = None

    def __post_init__(self):
        for name, limit in vars(self).items():
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1, got {limit}")

    def longest_pair(self) -> tuple[int, int, int] | None:
        """(prompt, chosen, rejected) token counts of the pair with the most tokens `truncate` lets through (its
        prefix-shared row is the longest), or None when the limits do not bound it. With max_length L, prompt
        p ≥ 1 and completion limit m: chosen = rejected = min(m, L − p), so p + 2·min(m, L − p) grows with p
        while L − p ≥ m and shrinks after: p = L − m, kept within [1, min(max_prompt_length, L − 1)].
        E.g. L=1024, no other limits: (1, 1023, 1023); L=1024, m=256, max_prompt_length 512: (512, 256, 256)."""
        length, prompt_limit, completion_limit = self.max_length, self.max_prompt_length, self.max_completion_length
        if length is None:
            if prompt_limit is None or completion_limit is None:
                return None
            return prompt_limit, completion_limit, completion_limit
        longest_prompt = min(prompt_limit or length - 1, length - 1)
        prompt = 1 if completion_limit is None else min(max(length - completion_limit, 1), longest_prompt)
        prompt = max(prompt, 1)
        completion = min(completion_limit or length, length - prompt)
        return prompt, completion, completion


NO_LIMITS = LengthLimits(None, None, None)


def truncate(prompt_ids, chosen_ids, rejected_ids, limits: LengthLimits, bos_token_id, cut_prompt: bool = True):
    """Apply the length limits and return (prompt, chosen, rejected) lists.

    1. completions longer than max_completion_length are cut from the right;
    2. a prompt longer than max_prompt_length keeps its end (a leading BOS token is kept); with
       `cut_prompt` False (a prompt with image tokens) it is not cut: DroppedPair(TOO_LONG);
    3. if prompt + longest completion > max_length, completions are cut from the right to fit;
       if no completion token would be left → DroppedPair(TOO_LONG). Never returns an empty completion.
    """
    max_length, max_prompt_length, max_completion_length = \
        limits.max_length, limits.max_prompt_length, limits.max_completion_length
    prompt, chosen, rejected = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    if max_completion_length is not None:
        chosen, rejected = chosen[:max_completion_length], rejected[:max_completion_length]
    if max_prompt_length is not None and len(prompt) > max_prompt_length and not cut_prompt:
        raise DroppedPair(TOO_LONG, f"the prompt with its image tokens is {len(prompt)} tokens, over "
                                    f"max_prompt_length={max_prompt_length} (image tokens are not cut)")
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        # The end of the prompt (the latest turn + generation prompt) matters most; BOS must stay first.
        head = prompt[:1] if bos_token_id is not None and prompt[:1] == [bos_token_id] else []
        keep = max_prompt_length - len(head)
        prompt = head + (prompt[len(prompt) - keep:] if keep > 0 else [])
    if max_length is not None and len(prompt) + max(len(chosen), len(rejected)) > max_length:
        room = max_length - len(prompt)
        if room < 1:
            raise DroppedPair(TOO_LONG, f"prompt of {len(prompt)} tokens leaves no room for the "
                                        f"completion within max_length={max_length}")
        chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected


MAX_CHARS_PER_TOKEN = 256
"""No token of a real vocabulary spans more characters than this (BPE merges top out at a few
dozen), so `limit × MAX_CHARS_PER_TOKEN` characters always hold more than `limit` tokens."""


def _clip(messages: list[dict], max_chars: int, keep_end: bool) -> list[dict]:
    def cut(text):
        if not isinstance(text, str) or len(text) <= max_chars:
            return text
        return text[-max_chars:] if keep_end else text[:max_chars]

    return [{**m, "content": cut(m.get("content"))} for m in messages]


def clip_pair(pair: PreferencePair, limits: LengthLimits) -> PreferencePair:
    """Cut message texts longer than the token limits could ever keep: prompt messages keep their
    end (the prompt is truncated from the left), answer messages their start. With at most
    MAX_CHARS_PER_TOKEN characters per token the kept tokens are the same as without the cut."""
    prompt_limit = min((n for n in (limits.max_prompt_length, limits.max_length) if n is not None), default=None)
    answer_limit = min((n for n in (limits.max_completion_length, limits.max_length) if n is not None), default=None)
    return replace(
        pair,
        prompt=pair.prompt if prompt_limit is None else _clip(pair.prompt, prompt_limit * MAX_CHARS_PER_TOKEN, True),
        chosen=pair.chosen if answer_limit is None else _clip(pair.chosen, answer_limit * MAX_CHARS_PER_TOKEN, False),
        rejected=pair.rejected if answer_limit is None else _clip(pair.rejected, answer_limit * MAX_CHARS_PER_TOKEN, False),
    )


def render_pair(pair: PreferencePair, tokenizer, limits: LengthLimits, image_root: Path | None = None) -> TokenizedPair:
    """Render `pair` through the chat template of `tokenizer` (a tokenizer, or a vision-language model's
    processor) and tokenize it (rules in the module doc); image paths are relative to `image_root`."""
    if pair.images and not is_processor(tokenizer):
        raise DroppedPair(TEXT_ONLY_MODEL, f"the prompt has {len(pair.images)} image(s) and the model's tokenizer "
                                           "no image processor")
    images = read_image_files(pair.images, image_root)
    pair = clip_pair(pair, limits)
    words = text_tokenizer(tokenizer)
    try:
        prompt_text, prompt_ids, vision_inputs = _render_prompt(tokenizer, pair.prompt, images)
        chosen_ids, rejected_ids = (
            words(_completion_text(pair.prompt, answer, prompt_text, tokenizer, f"row {pair.index}"),
                  add_special_tokens=False)["input_ids"]
            for answer in (pair.chosen, pair.rejected)
        )
    except TEMPLATE_ERRORS as err:  # one bad row must not abort the run
        raise DroppedPair(TEMPLATE_ERROR, template_error_message(err)) from None
    if not chosen_ids or not rejected_ids:  # only possible with a template that renders no answer and no EOS
        raise DroppedPair(EMPTY_RESPONSE, "the chat template rendered an empty completion")
    prompt_ids, chosen_ids, rejected_ids = truncate(prompt_ids, chosen_ids, rejected_ids, limits, words.bos_token_id,
                                                    cut_prompt=not images)
    if chosen_ids == rejected_ids:  # no preference left to learn
        raise DroppedPair(SAME_AFTER_TRUNCATION, f"both answers are the same {len(chosen_ids)} tokens "
                                                 "within the length limits")
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, pair.index, images, vision_inputs)
