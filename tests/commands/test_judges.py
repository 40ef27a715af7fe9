"""judges.py: the reward model's scores (batched = one at a time = the model's own call), the verdict parser, both
orders and a position-biased judge, reference matching, the OpenAI-compatible client against a fake server and
against a real one (llama.cpp's server running SmolLM2)."""
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
import transformers

import llama_cpp.server  # noqa: F401  (the real-server test needs it: a missing install fails here, never skips)
from orpo.commands.cli import main
from orpo.commands.judges import (JUDGE_PROMPT, ChatEndpoint, PairwiseJudge, RewardJudge, is_correct, judge_messages,
                                  last_number, parse_verdict, encode_conversation)
from orpo.errors import OrpoError
from orpo.stats import pairwise_outcome
from tiny import chatml_tokenizer, word_level_tokenizer, WORDS


def tiny_reward_model(tokenizer, seed=0, context=256):
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, pad_token_id=tokenizer.pad_token_id, num_labels=1)
    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(config).eval()


PROMPTS = [[{"role": "user", "content": "why is the sky blue"}],
           [{"role": "system", "content": "ok"}, {"role": "user", "content": "what"}],
           [{"role": "user", "content": "a b c"}]]
ANSWERS = ["the sky is blue", "no", "yes yes a b c good bad ok ok what why"]


def test_reward_scores_are_the_models_own_call_batched_or_alone():
    tokenizer = chatml_tokenizer()
    model = tiny_reward_model(tokenizer)
    judge = RewardJudge(model, tokenizer, batch_size=3)
    scores, truncated = judge.score(PROMPTS, ANSWERS)
    assert truncated == [False, False, False]
    alone = []
    for messages, answer in zip(PROMPTS, ANSWERS):
        text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
        # as training encodes a pair: the template's text without its whitespace after the closing <|im_end|>
        assert text.endswith("<|im_end|>\n")
        expected = tokenizer(text.rstrip(), add_special_tokens=False)["input_ids"]
        assert expected[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert encode_conversation(tokenizer, messages, answer) == expected
        ids = torch.tensor([expected])
        with torch.no_grad():
            alone.append(model(input_ids=ids).logits[0, 0].item())
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(alone), rtol=1e-5, atol=1e-6)
    assert RewardJudge(model, tokenizer, batch_size=1).score(PROMPTS, ANSWERS)[0] == pytest.approx(scores, abs=1e-6)
    assert len(set(scores)) == 3


def test_reward_batches_group_similar_lengths_and_scores_keep_the_input_order():
    tokenizer = chatml_tokenizer()
    model = tiny_reward_model(tokenizer)
    sequences = [[5] * 2, [6] * 9, [7] * 3, [8] * 8]
    widths = []
    model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    scores = RewardJudge(model, tokenizer, batch_size=2).score_ids(sequences)
    assert widths == [(2, 9), (2, 3)]  # lengths 9 and 8 together, then 3 and 2: 2 pad tokens, not 12
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in sequences]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert len(set(scores)) == 4


def test_reward_judge_scores_each_distinct_conversation_once():
    """The same answer to the same prompt, from two models or two calls, gets the same score: a tie, whatever the
    batches around it (their padding moves an fp32 score by ~1e-6)."""
    tokenizer = chatml_tokenizer()
    model = tiny_reward_model(tokenizer)
    calls = []
    model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    judge = RewardJudge(model, tokenizer, batch_size=2)
    first = judge.score_ids([[5, 6, 7], [5] * 9, [5, 6, 7]])
    assert calls == [2] and first[0] == first[2]  # [5]*9 and [5, 6, 7]: one batch
    second = judge.score_ids([[5, 6, 7], [8, 9]])
    assert calls == [2, 1] and second[0] == first[0]  # only [8, 9] is new


def test_reward_judge_in_bf16_scores_under_autocast_and_off_leaves_the_callers_own():
    """bf16: each forward under bf16 autocast on the model's device (the weights stay fp32), scores near fp32's;
    off: no autocast of its own, so a caller's context stands."""
    tokenizer = chatml_tokenizer()
    model = tiny_reward_model(tokenizer)
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    fp32 = RewardJudge(model, tokenizer, batch_size=3).score(PROMPTS, ANSWERS)[0]
    bf16 = RewardJudge(model, tokenizer, batch_size=3, bf16=True).score(PROMPTS, ANSWERS)[0]
    assert seen == [False, True] and next(model.parameters()).dtype == torch.float32
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, abs=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert RewardJudge(model, tokenizer, batch_size=3).score(PROMPTS, ANSWERS)[0] == bf16
    assert seen == [False, True, True]


def test_reward_model_without_a_template_and_truncation():
    tokenizer = word_level_tokenizer(WORDS, [], None, pad_token="<pad>")
    assert encode_conversation(tokenizer, PROMPTS[1], "no") == tokenizer("ok\nwhat\nno")["input_ids"]
    model = tiny_reward_model(tokenizer, context=6)
    judge = RewardJudge(model, tokenizer, batch_size=2)
    scores, truncated = judge.score(PROMPTS, ANSWERS)
    assert truncated == [True, False, True]  # 10, 5 and 16 tokens ("\n" is one): the last 6 kept
    ids = tokenizer("a b c\n" + ANSWERS[2])["input_ids"][-6:]
    with torch.no_grad():
        assert scores[2] == pytest.approx(model(input_ids=torch.tensor([ids])).logits[0, 0].item(), abs=1e-6)


@pytest.mark.parametrize("reply, verdict, parsed", [
    ("[[1]]", "first", True), ("Answer 2 is better. [[2]]", "second", True), ("[[TIE]]", "tie", True),
    ("[[ 1 ]] ... final: [[1]]", "first", True),
    ("[[1]] no wait [[2]]", "tie", False),  # marks that disagree
    ("Answer 1", "tie", False), ("[1]", "tie", False), ("", "tie", False), ("[[A]]", "tie", False),
])
def test_verdict_parser(reply, verdict, parsed):
    assert parse_verdict(reply) == (verdict, parsed)


def test_both_orders_and_a_position_biased_judge():
    seen = []

    def prefers_the_answer_with_blue(conversations):
        seen.extend(conversations)
        return ["[[1]]" if "blue" in c[1]["content"].split("[Answer 1]")[1].split("[Answer 2]")[0] else "[[2]]"
                for c in conversations]

    judge = PairwiseJudge(prefers_the_answer_with_blue)
    evidence = judge.judge(PROMPTS[:2], ["blue", "red"], ["red", "blue"])
    assert [(e["verdict_a_first"], e["verdict_b_first"]) for e in evidence] == [("first", "second"),
                                                                               ("second", "first")]
    assert [pairwise_outcome(e["verdict_a_first"], e["verdict_b_first"]) for e in evidence] == [1.0, 0.0]
    assert seen[0] == judge_messages(PROMPTS[0], "blue", "red") and seen[1] == judge_messages(PROMPTS[0], "red", "blue")
    assert seen[0][1]["content"] == JUDGE_PROMPT.format(prompt="why is the sky blue", first="blue", second="red")
    assert "user: what" in seen[2][1]["content"] and "system: ok" in seen[2][1]["content"]

    always_first = PairwiseJudge(lambda conversations: ["[[1]]"] * len(conversations))
    evidence = always_first.judge(PROMPTS, ANSWERS, ANSWERS[::-1])
    assert [pairwise_outcome(e["verdict_a_first"], e["verdict_b_first"]) for e in evidence] == [0.5] * 3
    assert all(e["parsed_a_first"] and e["judge_b_first"] == "[[1]]" for e in evidence)


@pytest.mark.parametrize("answer, reference, correct", [
    ("Paris", "paris", True), ("  New\n York ", "new york", True), ("Paris, France", "Paris", False),
    ("The answer is 42.", 42, True), ("so 6, then 1,234.50", "1234.5", True), ("-3", -3, True),
    ("42 or 43", 42, False),  # the LAST number counts
    ("no number", 7, False), ("3.14", "3.14", True), ("0.5", ".5", True), ("5", "five", False),
])
def test_reference_matching(answer, reference, correct):
    assert is_correct(answer, reference) is correct


def test_last_number():
    assert last_number("a 1,234.5 b -7") == -7.0 and last_number("x") is None and last_number("12.") == 12.0


class FakeAPI(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server for the tests: answers each request with the next (status, JSON body) of
    `script`, and records (path, Authorization header, JSON body or None) in `requests`."""
    script: list = []
    requests: list = []

    def do_POST(self):  # noqa: N802
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def do_GET(self):  # noqa: N802  (/models)
        self._answer(None)

    def _answer(self, body):
        FakeAPI.requests.append((self.path, self.headers.get("Authorization"), body))
        status, reply = FakeAPI.script.pop(0)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_api():
    FakeAPI.script, FakeAPI.requests = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def chat_reply(text):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def test_endpoint_sends_the_openai_request_with_the_key(fake_api):
    FakeAPI.script = [(200, chat_reply("[[2]]"))]
    endpoint = ChatEndpoint(fake_api, "judge-7b", "sk-test", max_tokens=16, backoff=0)
    assert endpoint([[{"role": "user", "content": "hi"}]]) == ["[[2]]"]
    path, auth, body = FakeAPI.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body == {"model": "judge-7b", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                    "max_tokens": 16}


def test_endpoint_errors_are_one_line(fake_api):
    endpoint = ChatEndpoint(fake_api, "m", None, max_tokens=8, retries=2, backoff=0)
    FakeAPI.script = [(401, {"error": {"message": "Incorrect API key provided"}})]
    with pytest.raises(OrpoError) as err:
        endpoint.reply([])
    assert str(err.value) == (f"judge endpoint {fake_api}/chat/completions: HTTP 401 Unauthorized: Incorrect API key "
                              "provided")
    assert len(FakeAPI.requests) == 1  # not retried
    FakeAPI.script, FakeAPI.requests = [(500, {}), (503, {}), (200, chat_reply("[[1]]"))], []
    assert endpoint.reply([]) == "[[1]]" and len(FakeAPI.requests) == 3  # retried, then answered
    FakeAPI.script, FakeAPI.requests = [(500, {"error": "boom"})] * 3, []
    with pytest.raises(OrpoError, match=r"chat/completions: HTTP 500 Internal Server Error after 3 tries: boom$"):
        endpoint.reply([])
    FakeAPI.script = [(200, {"unexpected": 1})]
    with pytest.raises(OrpoError, match=r"no choices\[0\].message.content in the reply"):
        endpoint.reply([])
    FakeAPI.script = [(404, {})]
    endpoint.check()  # a server without /models is fine
    FakeAPI.script = [(401, {"error": {"message": "no key"}})]
    with pytest.raises(OrpoError, match=r"/models: HTTP 401 Unauthorized: no key"):
        endpoint.check()


def test_an_unreachable_endpoint_is_one_line():
    port = free_port()  # nobody listens on it
    endpoint = ChatEndpoint(f"http://127.0.0.1:{port}/v1", "m", None, max_tokens=8, retries=1, backoff=0)
    with pytest.raises(OrpoError, match=rf"judge endpoint http://127.0.0.1:{port}/v1/chat/completions: cannot connect "
                                        r"\(.*\) after 2 tries; is the server running\?"):
        endpoint.reply([])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server (llama-cpp-python) running SmolLM2-135M-Instruct's GGUF file, stopped at
    the end whatever happens. Its log (~200 kB at start-up) goes to a file: a pipe nobody reads would block it."""
    from orpo.train.models import smollm2_gguf

    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("llama_cpp.server did not answer within 120 s")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.real_model
def test_judging_through_llama_cpp_server(llama_server, tmp_path, capsys):
    """Two prompts judged in both orders by SmolLM2 behind llama.cpp's server through --judge_url: four requests,
    each reply recorded and read by the parser; judge.json recomputed from the records."""
    from test_judge import recompute

    rows = [{"id": i, "prompt": p, "answers": {"a": a, "b": b}} for i, (p, a, b) in enumerate([
        ("What is the capital of France?", "The capital of France is Paris.", "It is Berlin."),
        ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5.")])]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["judge", "--answers_a", f"{path}:a", "--answers_b", f"{path}:b", "--judge_url", llama_server,
                 "--judge_max_tokens", "8", "--output", str(out)]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    summary = json.loads((out / "judge.json").read_text())
    comparisons = [c for r in records for c in r["comparisons"]]
    assert len(comparisons) == 2 and all(isinstance(c["judge_a_first"], str) and c["judge_a_first"]
                                         for c in comparisons)
    for c in comparisons:
        assert (c["verdict_a_first"], c["parsed_a_first"]) == parse_verdict(c["judge_a_first"])
        assert (c["verdict_b_first"], c["parsed_b_first"]) == parse_verdict(c["judge_b_first"])
    assert (summary["stats"], summary["judge"]) == recompute("pairwise", records, seed=0)
    assert summary["judge"]["judge_replies"] == 4
    assert "win rate of A" in capsys.readouterr().out


def test_the_judging_page_shows_the_judging_prompt_as_it_is():
    from pathlib import Path

    from orpo.commands.judges import JUDGE_SYSTEM

    page = (Path(__file__).resolve().parents[2] / "docs" / "judging.md").read_text()
    assert f"```md\n{JUDGE_PROMPT}\n```" in page and f"```md\n{JUDGE_SYSTEM}\n```" in page


def test_judge_url_end_to_end_with_scripted_verdicts(fake_api, tmp_path, capsys, monkeypatch):
    """orpo judge --judge_url against the fake server: the key from the environment, /models asked first, each pair
    in both orders, verdicts that agree, disagree and fail to parse; judge.json recomputed from the records."""
    from test_judge import recompute

    monkeypatch.delenv("ORPO_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    rows = [{"id": i, "prompt": f"q{i}", "answers": {"a": f"answer a{i}", "b": f"b{i}"}} for i in range(4)]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    replies = ["[[1]]", "[[2]]",  # A wins both orders
               "[[2]]", "[[1]]",  # B wins both orders
               "[[1]]", "[[1]]",  # the first shown, whichever it is: a tie
               "I think [[2]]", "no verdict"]  # one order unparseable: a tie
    FakeAPI.script = [(200, {"data": []})] + [(200, chat_reply(r)) for r in replies]
    out = tmp_path / "out"
    assert main(["judge", "--answers_a", f"{path}:a", "--answers_b", f"{path}:b", "--judge_url", fake_api,
                 "--judge_model_name", "judge-7b", "--output", str(out)]) == 0
    assert [r[0] for r in FakeAPI.requests] == ["/v1/models"] + ["/v1/chat/completions"] * 8
    assert {r[1] for r in FakeAPI.requests} == {"Bearer sk-fallback"}
    shown = [r[2]["messages"][1]["content"] for r in FakeAPI.requests[1:3]]
    assert shown == [JUDGE_PROMPT.format(prompt="q0", first="answer a0", second="b0"),
                     JUDGE_PROMPT.format(prompt="q0", first="b0", second="answer a0")]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    summary = json.loads((out / "judge.json").read_text())
    assert [c["outcome"] for r in records for c in r["comparisons"]] == [1.0, 0.0, 0.5, 0.5]
    assert summary["judge"] == {"verdicts_a_first": {"first": 2, "second": 2, "tie": 0},
                                "verdicts_b_first": {"first": 2, "second": 1, "tie": 1},
                                "unparsed": 1, "judge_replies": 8}
    assert (summary["stats"], summary["judge"]) == recompute("pairwise", records, seed=0)
    assert summary["stats"]["wins"] == 1 and summary["stats"]["ties"] == 2 and summary["stats"]["losses"] == 1
    assert "unparseable verdicts   1 of 8 (read as ties)" in capsys.readouterr().out
