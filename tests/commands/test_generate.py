"""generate.py / `orpo generate`: prompts from MT-Bench or prompt rows, two models side by side; every
generating path (generate, chat, demo) prompts the model with the training prompt ids and stops at
the chat template's end of turn."""
import io
import json

import pytest
import torch
from PIL import Image

from orpo.commands import demo
from orpo.commands.chat import chat_loop
from orpo.commands.cli import main
from orpo.commands.generate import generate_answers, read_prompts
from orpo.data.formats import PreferencePair
from orpo.data.render import NO_LIMITS, render_pair
from orpo.errors import OrpoError
from tiny import WORDS, chatml_tokenizer, save_tiny_chat_model, tiny_chat_model, word_level_tokenizer

MT_BENCH = "/work/shared/data/mt_bench_questions.jsonl"


def test_mt_bench_first_turns_are_read_as_is():
    prompts = read_prompts(MT_BENCH)
    assert len(prompts) == 80 and prompts[0]["id"] == 81
    assert prompts[0]["messages"] == [{"role": "user", "content": "Compose an engaging travel blog post about a "
                                       "recent trip to Hawaii, highlighting cultural experiences and must-see attractions."}]


def test_prompt_rows_and_bad_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n\n"
                    + json.dumps({"id": "x", "prompt": [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "Why?"}]}) + "\n")
    prompts = read_prompts(str(path))
    assert [p["id"] for p in prompts] == [0, "x"] and prompts[1]["messages"][0]["role"] == "system"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(OrpoError, match=r"p.jsonl, line 2: expected a 'prompt' \(text or messages\) or MT-Bench 'turns'"):
        read_prompts(str(path))


def test_generate_compare_writes_jsonl_and_html(tmp_path, capsys):
    a, b = save_tiny_chat_model(tmp_path / "a", 0), save_tiny_chat_model(tmp_path / "b", 1)
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", a, "--compare", b, "--prompts", MT_BENCH, "--limit", "3",
            "--max_new_tokens", "6", "--output", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "gen.html")]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [81, 82, 83]
    assert records[0]["prompt"].startswith("Compose an engaging travel blog post")
    assert all(set(r["answers"]) == {a, b} for r in records)
    assert any(r["answers"][a] != r["answers"][b] for r in records)  # two different models
    page = (tmp_path / "gen.html").read_text()
    assert "Compose an engaging travel blog post" in page and page.count("<tr>") == 4
    first = out.read_text()
    assert main(args) == 0  # greedy: the same answers again
    assert out.read_text() == first


def bos_chatml_tokenizer():
    """Llama-2/TinyLlama-like: the tokenizer prepends <s>, the ChatML template does not write it, and
    eos </s> is not the template's end of turn <|im_end|>."""
    return word_level_tokenizer(WORDS, ["<s>", "</s>", "<|im_start|>", "<|im_end|>"], chatml_tokenizer().chat_template,
                                bos="<s>", eos="</s>", add_bos=True, pad_token="<pad>")


def record_generate(model, monkeypatch) -> list[list[int]]:
    """Wrap model.generate; the returned list gets the unpadded input ids of every sequence it is fed."""
    seen, generate = [], model.generate

    def recording(input_ids=None, attention_mask=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        seen.extend(row[m.bool()].tolist() for row, m in zip(input_ids, mask))
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    return seen


def test_generation_feeds_the_model_the_training_prompt_ids(monkeypatch):
    tok = bos_chatml_tokenizer()
    model = tiny_chat_model(tok)
    seen = record_generate(model, monkeypatch)
    prompts = [[{"role": "user", "content": "why"}],
               [{"role": "system", "content": "be good"}, {"role": "user", "content": "what is the sky"}]]
    pairs = [render_pair(PreferencePair(p, [{"role": "assistant", "content": "blue"}],
                                        [{"role": "assistant", "content": "red"}], i), tok, NO_LIMITS)
             for i, p in enumerate(prompts)]
    trained = [pair.prompt_ids for pair in pairs]
    assert all(ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 for ids in trained)

    longest_first = trained[::-1]  # batches take prompts in order of length, longest first
    generate_answers(model, tok, [{"messages": p} for p in prompts], 2, 0.0, 0, batch_size=2)  # left-padded
    assert seen == longest_first and tok.padding_side == "right"  # the tokenizer is left as it was
    seen.clear()
    chat_loop(model, tok, ["what is the sky"], io.StringIO(), system="be good", max_new_tokens=2)
    assert seen == trained[1:]
    seen.clear()
    demo.measure(model, tok, pairs, [{"prompt": p} for p in prompts], beta=0.1)  # the demo's greedy answers
    assert seen == longest_first


def scripted(model, tok, words):
    """Make greedy decoding of `model` emit `words`, one per generation step, whatever the prompt."""
    script = iter(tok.convert_tokens_to_ids(words))

    def hook(module, args, output):
        logits = torch.full_like(output.logits[:, -1], -1e9)
        logits[:, next(script)] = 0
        output.logits[:, -1] = logits

    model.register_forward_hook(hook)
    return model


def test_generation_stops_at_the_end_of_turn_not_only_at_eos():
    tok = bos_chatml_tokenizer()
    run_on = ["the", "sky", "<|im_end|>", "\n", "<|im_start|>", "user"]
    prompt = [{"messages": [{"role": "user", "content": "why"}]}]
    # without the end-of-turn token as a stop the model runs on into a turn it invents
    model = scripted(tiny_chat_model(tok), tok, run_on)
    ids = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert tok.convert_ids_to_tokens(ids[0, 1:]) == run_on
    assert generate_answers(scripted(tiny_chat_model(tok), tok, run_on), tok, prompt, 6, 0.0, 0, 1) == ["the sky"]
    out = io.StringIO()
    history = chat_loop(scripted(tiny_chat_model(tok), tok, run_on), tok, ["why"], out, max_new_tokens=6)
    assert history[-1] == {"role": "assistant", "content": "the sky"} and out.getvalue() == "the sky\n"


def test_image_prompts_are_generated_with_their_images_as_the_processor_feeds_them(tmp_path, capsys):
    """A prompt row with `images` (a path relative to the prompts file) → the processor's prompt ids and
    image inputs → model.generate; the answer equals generating from the processor's own output."""
    from transformers import AutoProcessor

    from orpo.train.models import load_model
    from vision_models import vision_training_data, write_image

    model_dir, _ = vision_training_data(tmp_path)
    write_image(tmp_path / "q" / "pic.png", 20, 30, seed=5)
    prompts = tmp_path / "q" / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "img", "prompt": "what is in the picture?", "images": ["pic.png"]}) + "\n"
                       + json.dumps({"id": "text", "prompt": "what is blue?"}) + "\n")
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", model_dir, "--prompts", str(prompts), "--max_new_tokens", "5",
                 "--bf16", "false", "--output", str(out)]) == 0  # fp32, as the expected answer below
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["img"]["prompt"] == "<image>what is in the picture?"

    processor, model = AutoProcessor.from_pretrained(model_dir), load_model(model_dir)
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]}]
    text = processor.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(tmp_path / "q" / "pic.png").convert("RGB")], return_tensors="pt",
                       add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                            eos_token_id=processor.tokenizer.eos_token_id)
    expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert records["img"]["answers"][model_dir] == expected and expected


def test_image_prompts_for_a_text_only_model_are_one_line(tmp_path):
    from vision_models import write_image

    write_image(tmp_path / "pic.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "what is this?", "images": ["pic.png"]}) + "\n")
    with pytest.raises(OrpoError, match="prompt 0 has images, and the model is text-only"):
        generate_answers(tiny_chat_model(chatml_tokenizer()), chatml_tokenizer(), read_prompts(str(prompts)), 2, 0.0,
                         0, 1)
    prompts.write_text(json.dumps({"prompt": "what is this?", "images": ["none.png"]}) + "\n")
    with pytest.raises(OrpoError, match=r"prompts.jsonl, line 1: images\[0\] 'none.png': No such file or directory"):
        read_prompts(str(prompts))


def test_a_prompt_image_entry_of_the_wrong_type_is_one_line(tmp_path):
    """The prompts file's images column is read as training data's is (formats.read_images)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "what is this?", "images": [5]}) + "\n")
    with pytest.raises(OrpoError) as err:
        read_prompts(str(prompts))
    assert str(err.value) == (f"{prompts}, line 1: images[0] is int, expected a file path, bytes, {{'bytes', 'path'}} "
                              "or a PIL image")


def test_an_encoder_decoder_model_reads_the_training_prompt_and_answers_with_its_decoder(monkeypatch):
    """T5: the encoder is fed the prompt ids training used (right-padded), and the answer is the decoder's tokens
    (what generate returns for an encoder-decoder model), stopping at EOS; chat does the same."""
    from orpo.data.render import ensure_chat_template
    from tiny import t5_tokenizer, tiny_t5

    tok = t5_tokenizer()
    ensure_chat_template(tok, encoder_decoder=True)
    model = tiny_t5()
    prompts = [[{"role": "user", "content": "why"}], [{"role": "user", "content": "what is the sky"}]]
    trained = [render_pair(PreferencePair(p, [{"role": "assistant", "content": "blue"}],
                                          [{"role": "assistant", "content": "red"}], i), tok, NO_LIMITS).prompt_ids
               for i, p in enumerate(prompts)]
    assert trained[0] == tok("why")["input_ids"]
    scripted(model, tok, ["the", "sky", "</s>"] * 2)  # one step of the script per decoder step, both rows
    seen = record_generate(model, monkeypatch)
    answers = generate_answers(model, tok, [{"messages": p} for p in prompts], 5, 0.0, 0, batch_size=2)
    assert seen == trained[::-1] and answers == ["the sky", "the sky"]  # batched longest first
    seen.clear()
    history = chat_loop(model, tok, ["why"], io.StringIO(), max_new_tokens=5)
    assert seen == trained[:1] and history[-1] == {"role": "assistant", "content": "the sky"}


def test_sample_seed_depends_only_on_seed_prompt_and_sample():
    from orpo.commands.generate import sample_seed

    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1)
    seeds = {sample_seed(s, i, k) for s in (0, 1) for i in range(50) for k in range(3)}
    assert len(seeds) == 300  # no two triples share a seed
    assert all(0 <= x < 2**63 for x in seeds)


def test_expand_samples_keeps_order_and_gives_each_copy_its_seed():
    from orpo.commands.generate import expand_samples, sample_seed

    rows = expand_samples([{"id": "a"}, {"id": "b"}], 2, seed=7)
    assert [(r["id"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert [r["seed"] for r in rows] == [sample_seed(7, 0, 0), sample_seed(7, 0, 1), sample_seed(7, 1, 0),
                                         sample_seed(7, 1, 1)]


def test_gumbel_sampler_samples_softmax_of_logits_over_temperature():
    """Logits (2, 1, 0) in 6000 rows, each its own seed: the argmax of the sampler's scores falls on each token as
    often as softmax(logits / T) says, within 4 standard errors: T = 1 → (0.6652, 0.2447, 0.0900) (e² : e : 1),
    T = 2 → (0.5065, 0.3072, 0.1863) (e : e^0.5 : 1), T = 0.25 → (0.9817, 0.0180, 0.0003)."""
    from orpo.commands.generate import SeededGumbelSampler

    n = 6000
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(n, 1)
    for temperature, expected in ((1.0, [0.6652, 0.2447, 0.0900]), (2.0, [0.5065, 0.3072, 0.1863]),
                                  (0.25, [0.9817, 0.0180, 0.0003])):
        scores = SeededGumbelSampler(list(range(n)), temperature)(None, logits.clone())
        frequencies = torch.bincount(scores.argmax(-1), minlength=3) / n
        expected = torch.tensor(expected)
        assert (frequencies - expected).abs().le(4 * (expected * (1 - expected) / n).sqrt() + 1e-3).all(), \
            (temperature, frequencies)


def test_gumbel_sampler_rows_follow_their_seeds_not_their_place():
    from orpo.commands.generate import SeededGumbelSampler

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    forward = SeededGumbelSampler([5, 6, 7], 1.0)
    backward = SeededGumbelSampler([7, 6, 5], 1.0)
    for _ in range(3):  # each step draws the next noise of each row's own generator
        assert torch.equal(forward(None, logits.clone()), backward(None, logits.flip(0).clone()).flip(0))
    alone = SeededGumbelSampler([6], 1.0)
    first = alone(None, logits[1:2].clone())
    assert torch.equal(first, SeededGumbelSampler([6], 1.0)(None, logits[1:2].clone()))
    assert not torch.equal(first, alone(None, logits[1:2].clone()))  # the second step's noise is new


def test_each_answer_is_sampled_from_its_seed_whatever_its_batch():
    """T = 1 on a tiny random model: a (prompt, seed) gives the same answer alone, in batches of 2 and 16, at
    another place among other prompts; other seeds give other answers; greedy answers are model.generate's."""
    from orpo.commands.generate import expand_samples

    tok = chatml_tokenizer()
    model = tiny_chat_model(tok)
    texts = ["why", "what is the sky", "the sky is blue what is green", "ok", "a b c good bad yes no why", "red"]
    prompts = [{"id": i, "messages": [{"role": "user", "content": t}]} for i, t in enumerate(texts)]
    rows = expand_samples(prompts, 2, seed=3)
    alone = [generate_answers(model, tok, [row], 10, 1.0, 0, 1)[0] for row in rows]
    assert generate_answers(model, tok, rows, 10, 1.0, 0, batch_size=2) == alone
    assert generate_answers(model, tok, rows[::-1], 10, 1.0, 0, batch_size=16) == alone[::-1]
    assert len(set(alone)) == len(alone)  # twelve seeds, twelve different answers (two per prompt)
    # without a "seed", prompt i's is sample_seed(seed, i, 0): the first sample of expand_samples(prompts, 1, seed)
    assert generate_answers(model, tok, prompts, 10, 1.0, 3, batch_size=4) == alone[::2]
    assert generate_answers(model, tok, prompts, 10, 1.0, 4, batch_size=4) != alone[::2]

    greedy = generate_answers(model, tok, rows, 10, 0.0, 0, batch_size=4)
    for row, answer in zip(rows, greedy):
        ids = torch.tensor([tok.apply_chat_template(row["messages"], add_generation_prompt=True)["input_ids"]])
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        assert answer == tok.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_progress_is_logged_under_a_label_or_passed_to_a_callable(caplog):
    tok = chatml_tokenizer()
    model = tiny_chat_model(tok)
    prompts = [{"id": i, "messages": [{"role": "user", "content": t}]} for i, t in enumerate(["why", "ok", "red"])]
    calls = []
    generate_answers(model, tok, prompts, 2, 1.0, 0, batch_size=2,
                     progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 3), (3, 3)]
    with caplog.at_level("INFO", logger="orpo"):
        generate_answers(model, tok, prompts, 2, 1.0, 0, batch_size=2, progress="model a")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("model a: 3/3 answers  ") and "answers/s  eta 0s" in lines[0]


def test_generate_samples_writes_one_line_per_prompt_and_sample(tmp_path, capsys, caplog):
    from orpo.commands.generate import sample_seed

    model = save_tiny_chat_model(tmp_path / "a", 0)
    out = tmp_path / "new" / "gen.jsonl"  # its directory is made
    with caplog.at_level("INFO", logger="orpo"):
        assert main(["generate", "--model", model, "--prompts", MT_BENCH, "--limit", "2", "--samples", "2",
                     "--temperature", "1", "--seed", "5", "--max_new_tokens", "6", "--bf16", "false",
                     "--output", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "new" / "gen.html")]
    assert f"generating 4 answers with {model}; fp32: --bf16 false" in caplog.text
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"], r["seed"]) for r in records] == [
        (81, 0, sample_seed(5, 0, 0)), (81, 1, sample_seed(5, 0, 1)), (82, 0, sample_seed(5, 1, 0)),
        (82, 1, sample_seed(5, 1, 1))]
    assert all(set(r) == {"id", "sample", "seed", "prompt", "messages", "answers"} and set(r["answers"]) == {model}
               for r in records)
    assert records[0]["prompt"] == records[1]["prompt"] and records[0]["answers"] != records[1]["answers"]
    page = (tmp_path / "new" / "gen.html").read_text()
    assert "<th>sample</th>" in page and page.count("<tr>") == 5


def test_samples_at_temperature_zero_are_refused_before_loading(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "no-such-model"), "--prompts", MT_BENCH, "--samples", "3",
                 "--output", str(tmp_path / "gen.jsonl")]) == 2
    assert capsys.readouterr().err == ("orpo: error: --samples 3 with --temperature 0: greedy answers would be "
                                       "identical; sample with --temperature > 0 (the ORPO paper: 3 samples at 1.0) "
                                       "or take --samples 1\n")


def test_an_encoder_decoder_model_samples_from_each_answers_seed_too():
    from orpo.commands.generate import expand_samples
    from orpo.data.render import ensure_chat_template
    from tiny import t5_tokenizer, tiny_t5

    tok = t5_tokenizer()
    ensure_chat_template(tok, encoder_decoder=True)
    model = tiny_t5()
    rows = expand_samples([{"id": i, "messages": [{"role": "user", "content": t}]}
                           for i, t in enumerate(["why", "what is the sky blue", "ok"])], 2, seed=1)
    alone = [generate_answers(model, tok, [row], 8, 1.0, 0, 1)[0] for row in rows]
    assert generate_answers(model, tok, rows, 8, 1.0, 0, batch_size=4) == alone and len(set(alone)) > 3


def test_bf16_generates_under_autocast_and_leaves_the_weights_fp32():
    tok = chatml_tokenizer()
    model = tiny_chat_model(tok)
    dtypes = []
    model.lm_head.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    prompts = [{"messages": [{"role": "user", "content": "why"}]}]
    generate_answers(model, tok, prompts, 2, 1.0, 0, 1, bf16=True)
    assert set(dtypes) == {torch.bfloat16} and model.lm_head.weight.dtype == torch.float32
    dtypes.clear()
    generate_answers(model, tok, prompts, 2, 1.0, 0, 1)
    assert set(dtypes) == {torch.float32}
