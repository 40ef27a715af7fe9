"""chat.py / `orpo chat`: the interactive loop answers like `orpo generate`, keeps and trims the history."""
import io


from orpo.commands.chat import chat_loop, fit_history
from orpo.commands.cli import main
from orpo.commands.generate import generate_answers
from orpo.data.render import encode_prompt
from tiny import WORDS, chatml_tokenizer, save_tiny_chat_model, tiny_chat_model, word_level_tokenizer


def _user(text):
    return {"role": "user", "content": text}


def test_answers_equal_generate_and_history_is_kept():
    tok = chatml_tokenizer()
    model = tiny_chat_model(tok)
    out = io.StringIO()
    history = chat_loop(model, tok, ["the sky is", "", "why"], out, max_new_tokens=8)
    first = generate_answers(model, tok, [{"messages": [_user("the sky is")]}], 8, 0.0, 0, 1)[0]
    assert first, "a random tiny model still answers something"
    assert history[:2] == [_user("the sky is"), {"role": "assistant", "content": first}]
    # the second answer is generated from the whole conversation, as generate would from the same messages
    second = generate_answers(model, tok, [{"messages": history[:3]}], 8, 0.0, 0, 1)[0]
    assert history[2:] == [_user("why"), {"role": "assistant", "content": second}]
    assert out.getvalue() == f"{first}\n{second}\n"  # streamed text, one line per answer


def test_commands_reset_system_exit_and_echo():
    tok = chatml_tokenizer()
    model = tiny_chat_model(tok)
    out = io.StringIO()
    lines = ["why", "/reset", "/system be good", "what", "/nope", "/exit", "never read"]
    history = chat_loop(model, tok, lines, out, max_new_tokens=4, echo=True)
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[0]["content"] == "be good" and history[1] == _user("what")
    text = out.getvalue()
    assert text.startswith("you> why\n")
    assert "(conversation reset)\n" in text and "(system prompt set; conversation reset)\n" in text
    assert "(unknown command /nope; commands:" in text and "never read" not in text
    assert chat_loop(model, tok, ["/system", "why"], io.StringIO(), system="be good", max_new_tokens=2)[0] == _user("why")


def test_fit_history_drops_oldest_exchanges_keeps_system():
    tok = chatml_tokenizer()
    system = {"role": "system", "content": "ok good"}
    exchange = [_user("what is the sky"), {"role": "assistant", "content": "blue"}]
    messages = [system] + exchange * 2 + [_user("why")]
    # ChatML, one token per word: <|im_start|> role \n words <|im_end|> \n  →  system 7, user 9, assistant 6,
    # last user 6 tokens, generation prompt <|im_start|> assistant \n 3
    assert len(encode_prompt(tok, messages)) == 7 + 2 * (9 + 6) + 6 + 3 == 46
    kept, ids, dropped = fit_history(tok, messages, 46)
    assert (kept, dropped) == (messages, 0) and len(ids) == 46
    kept, ids, dropped = fit_history(tok, messages, 45)
    assert kept == [system] + exchange + [_user("why")] and dropped == 1 and len(ids) == 46 - 15
    kept, ids, dropped = fit_history(tok, messages, 10)  # the last user message always stays
    assert kept == [system, _user("why")] and dropped == 2 and len(ids) == 7 + 6 + 3


def test_loop_trims_to_the_context_and_refuses_a_message_too_long():
    tok = chatml_tokenizer()
    model = tiny_chat_model(tok, context=40)
    out = io.StringIO()
    lines = ["what is the sky", "why", "why"]
    history = chat_loop(model, tok, lines, out, max_new_tokens=16)
    assert "(dropped the 1 oldest exchange to fit the context)" in out.getvalue()
    assert history[-2] == _user("why") and len(encode_prompt(tok, history[:-1])) <= 24
    out = io.StringIO()
    assert chat_loop(model, tok, lines + [" ".join(["blue"] * 40)], out, max_new_tokens=16) == history
    # 40 words + <|im_start|> user \n ... <|im_end|> \n + generation prompt = 48
    assert "(message not sent: 48 prompt tokens, the model takes 24 with max_new_tokens 16)" in out.getvalue()


def test_template_refusing_a_system_message_is_one_line():
    tok = word_level_tokenizer(
        WORDS, ["<s>", "</s>"],
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ' ' + m['content'] + '</s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant ' }}{% endif %}",
        eos="</s>", pad_token="<pad>")
    model = tiny_chat_model(tok)
    out = io.StringIO()
    history = chat_loop(model, tok, ["why", "/reset", "what"], out, system="be good", max_new_tokens=2)
    assert "(the chat template refused the conversation: System role not supported; try /reset or /system)" \
        in out.getvalue()
    assert history[0]["role"] == "system" and len(history) == 1  # nothing answered while the system message stays


def test_cli_chat_reads_piped_stdin(tmp_path, monkeypatch, capsys):
    save_tiny_chat_model(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("the sky is\n/exit\n"))
    assert main(["chat", str(tmp_path), "--max_new_tokens", "4", "--system", "be good"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "you> the sky is" and lines[2:] == ["you> /exit"]  # one answer line between


def test_sampled_answers_are_generate_answers_from_the_session_seeds():
    """At T > 0 answer n of a session is sampled as generate samples a prompt whose seed is sample_seed(seed, n, 0)."""
    from orpo.commands.generate import sample_seed

    tok = chatml_tokenizer()
    model = tiny_chat_model(tok)
    history = chat_loop(model, tok, ["the sky is", "why"], io.StringIO(), max_new_tokens=8, temperature=1.0, seed=4)
    for n in range(2):
        prompt = {"messages": history[: 2 * n + 1], "seed": sample_seed(4, n, 0)}
        assert history[2 * n + 1]["content"] == generate_answers(model, tok, [prompt], 8, 1.0, 0, 1)[0]
    assert chat_loop(model, tok, ["the sky is", "why"], io.StringIO(), max_new_tokens=8, temperature=1.0,
                     seed=4) == history  # replayed: the same answers
    assert chat_loop(model, tok, ["the sky is"], io.StringIO(), max_new_tokens=8, temperature=1.0,
                     seed=5)[1] != history[1]
