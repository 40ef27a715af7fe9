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
                 "--output", str(out)]) == 0
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
