"""The three judges of `orpo judge` (commands/judge.py): a reward model, a pairwise LLM judge, reference answers.

Reward model (`RewardJudge`): a transformers AutoModelForSequenceClassification with ONE output (num_labels = 1).
The score of an answer is that output for the conversation [prompt messages + {"role": "assistant", "content":
answer}], encoded through the reward model's own chat template as training encodes a pair
(`encode_conversation`: the prompt, then the answer up to its end-of-turn token; a tokenizer without a template
gets the prompt's messages and the answer as plain text, joined by "\\n"), so a reward model that orpo trained
scores what it was trained on. Conversations longer than the model's context keep their last tokens (the score is
read at the last token) and are counted as truncated. Batches are
right-padded: a causal reward model reads its output at the last non-pad token, and right padding leaves every
real token's positions and attention as in the sequence alone, so a batched score equals the score alone.

Pairwise judge (`PairwiseJudge`): an LLM shown the prompt and two answers, labelled by position, asked with
`JUDGE_PROMPT` which is better. Its reply is read by `parse_verdict`; each pair is asked twice (A's answer first,
then B's first) and `stats.pairwise_outcome` combines the two verdicts. The LLM is either a local causal LM,
generating greedily through the one generator (`generate.generate_answers`), or any OpenAI-compatible chat
endpoint (`ChatEndpoint`: llama.cpp's server, vLLM, Ollama, a hosted API), asked at temperature 0.

Reference answers (`is_correct`): an answer is correct when, after normalisation (`normalise`: lower case,
whitespace runs as one space, stripped), it equals the reference; or, when the reference is a number, when the
LAST number in the answer equals it (`last_number`: "-1,234.50" reads 1234.5 negative; "12." reads 12).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
import urllib.error
import urllib.request

import torch

from orpo.commands.generate import generate_answers
from orpo.data.images import text_tokenizer
from orpo.data.render import TEMPLATE_ERRORS, encode_answer, template_error_message
from orpo.errors import OrpoError, first_line
from orpo.train.precision import bf16_autocast

logger = logging.getLogger(__name__)

# The judging prompt: the labels are POSITIONS (the answer shown first is [[1]]), not models A and B, so the same
# prompt serves both orders. Adapted from MT-Bench's pairwise prompt (Zheng et al. 2023, arXiv 2306.05685).
JUDGE_SYSTEM = ("You are an impartial judge. You compare two AI assistants' answers to the same user prompt and "
                "say which answer is better.")
JUDGE_PROMPT = """Which answer to the user's prompt below is better: more helpful, correct, relevant and clear?
Do not let the order of the answers, their length or the assistants' names sway you.

[User prompt]
{prompt}

[Answer 1]
{first}
[End of answer 1]

[Answer 2]
{second}
[End of answer 2]

Reply with exactly one verdict: [[1]] if answer 1 is better, [[2]] if answer 2 is better, [[tie]] if they are
equally good."""
VERDICT_PATTERN = re.compile(r"\[\[\s*(1|2|tie)\s*\]\]", re.IGNORECASE)
VERDICT_NAMES = {"1": "first", "2": "second", "tie": "tie"}

API_KEY_VARIABLES = ("ORPO_JUDGE_API_KEY", "OPENAI_API_KEY")
RETRIED_STATUSES = (429, 500, 502, 503, 504)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def judge_messages(prompt_messages: list[dict], first: str, second: str) -> list[dict]:
    """The judge's conversation: JUDGE_SYSTEM, then JUDGE_PROMPT with the prompt (its messages as "role: text"
    lines, the plain text of a one-message prompt) and the two answers in the order shown."""
    if len(prompt_messages) == 1:
        prompt = _text(prompt_messages[0]["content"])
    else:
        prompt = "\n".join(f"{m['role']}: {_text(m['content'])}" for m in prompt_messages)
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt, first=first, second=second)}]


def parse_verdict(reply: str) -> tuple[str, bool]:
    """(verdict, parsed) of a judge's reply: the verdict is "first" ([[1]]), "second" ([[2]]) or "tie" ([[tie]]),
    read strictly: every verdict mark in the reply must say the same. No mark, or marks that disagree, is
    unparseable: ("tie", False), a tie that the report counts apart."""
    marks = {match.lower() for match in VERDICT_PATTERN.findall(reply)}
    if len(marks) != 1:
        return "tie", False
    return VERDICT_NAMES[marks.pop()], True


class PairwiseJudge:
    """Asks an LLM (`complete`: a list of conversations → one reply each) about pairs in both orders."""

    def __init__(self, complete):
        self.complete = complete

    def judge(self, prompt_messages: list[list[dict]], answers_a: list[str], answers_b: list[str]) -> list[dict]:
        """Per pair i: {"verdict_a_first", "verdict_b_first", "judge_a_first", "judge_b_first" (the raw replies),
        "parsed_a_first", "parsed_b_first"}; 2 · pairs requests (A first, B first for each pair, in that order)."""
        conversations = []
        for messages, a, b in zip(prompt_messages, answers_a, answers_b):
            conversations += [judge_messages(messages, a, b), judge_messages(messages, b, a)]
        replies = self.complete(conversations)
        evidence = []
        for a_first, b_first in zip(replies[0::2], replies[1::2]):
            (verdict_a, parsed_a), (verdict_b, parsed_b) = parse_verdict(a_first), parse_verdict(b_first)
            evidence.append({"verdict_a_first": verdict_a, "verdict_b_first": verdict_b,
                             "judge_a_first": a_first, "judge_b_first": b_first,
                             "parsed_a_first": parsed_a, "parsed_b_first": parsed_b})
        return evidence


def local_completion(model, tokenizer, max_new_tokens: int, batch_size: int, bf16: bool = False):
    """`complete` for a local causal LM: greedy replies through the one generator, in batches (`bf16`: under bf16
    autocast)."""
    def complete(conversations: list[list[dict]]) -> list[str]:
        # greedy: the seed changes nothing, and is there for a generator that reads each prompt's own
        prompts = [{"id": i, "messages": messages, "sample": 0, "seed": 0} for i, messages in enumerate(conversations)]
        return generate_answers(model, tokenizer, prompts, max_new_tokens, temperature=0.0, seed=0,
                                batch_size=batch_size, bf16=bf16)
    return complete


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint: POST {url}/chat/completions, {"model", "messages", "temperature": 0,
    "max_tokens"}, the reply read from choices[0].message.content. `api_key`: sent as a Bearer token when set.
    429, 5xx and connection errors are retried `retries` times (waits `backoff`, 2·backoff, ...); anything else,
    or the last failure, is one OrpoError line naming the URL and the status."""

    def __init__(self, url: str, model_name: str, api_key: str | None, max_tokens: int, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0):
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def _request(self, path: str, body: dict | None) -> dict:
        url = f"{self.url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    text = response.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code not in RETRIED_STATUSES or attempt == self.retries:
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    raise OrpoError(f"judge endpoint {url}: HTTP {err.code} {err.reason}{tries}"
                                    + (f": {detail}" if detail else "")) from None
                problem = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                if attempt == self.retries:
                    raise OrpoError(f"judge endpoint {url}: cannot connect ({first_line(reason)}) after "
                                    f"{attempt + 1} tries; is the server running?") from None
                problem = f"cannot connect ({first_line(reason)})"
            else:
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise OrpoError(f"judge endpoint {url}: the reply is not JSON: {text[:80]!r}") from None
            wait = self.backoff * 2**attempt
            logger.warning("judge endpoint %s: %s; retrying in %.1f s", url, problem, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def check(self) -> None:
        """Before any model loads: GET {url}/models answers (a 404 is accepted: not every server lists models);
        a server that is down or refuses the key is one line now, not after the answers are generated."""
        try:
            self._request("/models", None)
        except OrpoError as err:
            if "HTTP 404" not in str(err):
                raise

    def reply(self, messages: list[dict]) -> str:
        body = {"model": self.model_name, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        answer = self._request("/chat/completions", body)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise OrpoError(f"judge endpoint {self.url}/chat/completions: no choices[0].message.content in the "
                            f"reply {json.dumps(answer)[:120]}") from None
        return content if isinstance(content, str) else ""

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        return [self.reply(messages) for messages in conversations]


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The first line of an HTTP error's body (OpenAI-style {"error": {"message"}} read out), at most 160 chars."""
    try:
        body = err.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    try:
        message = json.loads(body)["error"]
        body = message.get("message", body) if isinstance(message, dict) else str(message)
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    return first_line(body)[:160] if body.strip() else ""


def encode_conversation(tokenizer, prompt_messages: list[dict], answer: str) -> list[int]:
    """The ids a reward model scores for [prompt + assistant answer]. With a chat template: the prompt and the
    answer encoded as training encodes a pair (`render.encode_answer`: the prompt with its generation prompt, the
    answer up to its end-of-turn token, no template whitespace after it), so a reward model trained by orpo scores
    what it was trained on. Without one: the messages' texts and the answer joined by "\n", with the tokenizer's
    special tokens."""
    words = text_tokenizer(tokenizer)
    if getattr(words, "chat_template", None):
        try:
            prompt_ids, completion_ids = encode_answer(tokenizer, prompt_messages, answer)
        except TEMPLATE_ERRORS as err:
            raise OrpoError(f"the reward model's chat template refuses a prompt: {template_error_message(err)}") from None
        return prompt_ids + completion_ids
    return words("\n".join([*(_text(m["content"]) for m in prompt_messages), answer]))["input_ids"]


class RewardJudge:
    """Scores conversations with a one-output sequence classifier, in batches, without gradients; `bf16`: under bf16
    autocast on the model's device (fp32 weights kept), as training computes where the device has bf16."""

    def __init__(self, model, tokenizer, batch_size: int, max_length: int | None = None, bf16: bool = False):
        labels = getattr(model.config, "num_labels", None)
        if labels != 1:
            raise OrpoError(f"--reward_model {model.config.name_or_path}: {labels} outputs (num_labels); a reward "
                            "model has one (a score)")
        self.model = model.eval()
        self.tokenizer = text_tokenizer(tokenizer)
        self.batch_size = batch_size
        self.bf16 = bf16
        self.max_length = max_length or _context_length(model, self.tokenizer)
        self.scored: dict[tuple[int, ...], float] = {}  # each distinct conversation's score, computed once
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        if model.config.pad_token_id is None:  # the model finds each row's last token by its pad id
            model.config.pad_token_id = self.pad_id

    def encode(self, prompt_messages: list[dict], answer: str) -> tuple[list[int], bool]:
        """(the conversation's token ids, `encode_conversation`; whether they were truncated): a conversation longer
        than max_length keeps its last max_length tokens."""
        ids = encode_conversation(self.tokenizer, prompt_messages, answer)
        return ids[-self.max_length :], len(ids) > self.max_length

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """One score per token sequence, in their order: the model's output for each distinct sequence not scored
        before, in right-padded batches of `batch_size` sequences of similar length (longest first, so that a batch
        too big for memory fails at once), which pads far less than batches in the given order where lengths vary."""
        # a conversation seen before (this call or an earlier one) keeps its score: the same answer from two models
        # is a tie, not a difference of a batch's rounding (1e-6 in fp32, more in bf16)
        keys = [tuple(ids) for ids in sequences]
        new = list(dict.fromkeys(key for key in keys if key not in self.scored))
        order = sorted(new, key=lambda key: -len(key))
        device = self.model.device
        autocast = bf16_autocast(device, self.bf16)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            with autocast:
                logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            self.scored.update(zip(batch, logits[:, 0].float().tolist()))
        return [self.scored[key] for key in keys]

    def score(self, prompt_messages: list[list[dict]], answers: list[str]) -> tuple[list[float], list[bool]]:
        """(a score per (prompt, answer), whether each conversation was truncated)."""
        encoded = [self.encode(m, a) for m, a in zip(prompt_messages, answers)]
        return self.score_ids([ids for ids, _ in encoded]), [cut for _, cut in encoded]


def _context_length(model, tokenizer) -> int:
    """The longest sequence the model takes: its max_position_embeddings, else the tokenizer's (sane) limit."""
    length = getattr(model.config, "max_position_embeddings", None)
    if isinstance(length, int) and length > 0:
        return length
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 4096


def load_reward_model(name: str, dtype: str = "float32"):
    """(model, tokenizer) of a reward model, loaded as training loads one (`train/models.load_model(reward=True)`:
    AutoModelForSequenceClassification, one output), on this machine's accelerator if it has one. One line when it
    is not a one-output classifier."""
    from orpo.train.models import load_model, load_tokenizer

    check_reward_model(name)
    tokenizer = load_tokenizer(name)
    model = load_model(name, dtype=dtype, reward=True)
    if torch.accelerator.is_available():
        model.to(torch.accelerator.current_accelerator())
    return model, tokenizer


def check_reward_model(name: str) -> None:
    """One line unless `name`'s config (read alone: cheap, before any model loads) is a sequence classifier's
    with one output."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise OrpoError(f"--reward_model {name}: cannot read a model config: {first_line(err)}") from None
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise OrpoError(f"--reward_model {name}: a {architectures[0]}; a reward model is a sequence classifier "
                        "(AutoModelForSequenceClassification) with one output")
    if config.num_labels != 1:
        raise OrpoError(f"--reward_model {name}: {config.num_labels} outputs (num_labels); a reward model has "
                        "one (a score)")


def normalise(text: str) -> str:
    """Lower case, whitespace runs as one space, stripped."""
    return " ".join(str(text).split()).lower()


def last_number(text: str) -> float | None:
    """The last number written in `text` ("1,234.5" is 1234.5; "-3" is -3), None if it has none."""
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def reference_number(reference) -> float | None:
    """The reference as a number when it is one (an int/float, or a text that is exactly a number), else None."""
    if isinstance(reference, bool):
        return None
    if isinstance(reference, (int, float)):
        return float(reference)
    text = str(reference).strip()
    if NUMBER.fullmatch(text):
        return float(text.replace(",", ""))
    return None


def is_correct(answer: str, reference) -> bool:
    """Exact after normalisation, or, for a numeric reference, the answer's last number equals it."""
    if normalise(answer) == normalise(reference):
        return True
    number = reference_number(reference)
    if number is None:
        return False
    found = last_number(answer)
    return found is not None and math.isclose(found, number, rel_tol=0, abs_tol=1e-9)


def _text(content) -> str:
    """A message's text; the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))
