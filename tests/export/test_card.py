"""export/card.py: the model card of a run, from a fixed metrics.jsonl and real drop counts; its front
matter parses with huggingface_hub's model-card parser (offline)."""
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from orpo.data.prepare import prepare_dataset
from orpo.export.card import base_license, card_settings, render_card, write_card
from orpo.train.config import ORPOConfig
from orpo.train.report import PLOTS
from tiny import chatml_tokenizer, save_tiny_chat_model

FIXTURE = Path(__file__).parent / "fixtures" / "metrics.jsonl"
ROWS = [
    {"prompt": "why is the sky blue", "chosen": "the sky is blue", "rejected": "no"},
    {"prompt": "what is good", "chosen": "yes", "rejected": "bad"},
    {"prompt": "is the sky red", "chosen": "no", "rejected": "yes"},
    {"prompt": "ok", "chosen": "ok", "rejected": "ok"},  # chosen == rejected
    {"prompt": "a b c", "chosen": "", "rejected": "a"},  # empty response
    {"prompt": "why", "chosen": "b", "rejected": "b"},  # chosen == rejected
]


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "my-run"
    out.mkdir()
    shutil.copy(FIXTURE, out / "metrics.jsonl")
    for name in ("loss.png", "logps.png"):  # the report's plots; speed.png and log_odds.png not written
        (out / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    (out / "report.html").write_text("<html></html>")
    return out


def _settings():
    config = ORPOConfig(output_dir="unused", beta=0.25, nll_scope="completion", max_length=256, max_prompt_length=128,
                        learning_rate=5e-5, per_device_train_batch_size=2, gradient_accumulation_steps=4, bf16=False,
                        seed=7)
    return card_settings(config, steps=3)


def _write(out, base_model, train_source="prefs.jsonl", license=None):
    prepared = prepare_dataset(ROWS, chatml_tokenizer())
    held_out = prepare_dataset(ROWS[:4], chatml_tokenizer())
    return Path(write_card(str(out), base_model, _settings(), train=(train_source, prepared),
                           eval=("held_out.jsonl", held_out), license=license))


def test_card_front_matter_parses_and_names_hub_ids(run_dir):
    path = _write(run_dir, "HuggingFaceTB/SmolLM2-135M-Instruct", train_source="trl-lib/ultrafeedback_binarized",
                  license="apache-2.0")
    assert path == run_dir / "README.md"
    card = ModelCard(path.read_text())  # huggingface_hub's parser: raises on invalid YAML front matter
    meta = card.data.to_dict()
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers",
                    "license": "apache-2.0", "datasets": ["trl-lib/ultrafeedback_binarized"],
                    "tags": ["orpo", "preference-optimization"], "pipeline_tag": "text-generation"}
    assert card.text.startswith("\n# my-run\n")
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card.text


def test_card_content_from_the_metrics_file(run_dir):
    base = str(run_dir.parent / "base-model")  # a local directory: named in the text, not in the front matter
    text = _write(run_dir, base).read_text()
    meta = ModelCard(text).data.to_dict()
    assert "base_model" not in meta and "datasets" not in meta and "license" not in meta
    assert meta["tags"] == ["orpo", "preference-optimization"] and meta["pipeline_tag"] == "text-generation"
    assert f"`{base}` (a path on the machine that trained it)" in text
    # data: rows, kept, dropped, and the drops by reason for both sets (held-out: the first 4 rows)
    assert "| training | `prefs.jsonl` | 6 | 3 | 3 |" in text
    assert "| held-out | `held_out.jsonl` | 4 | 3 | 1 |" in text
    assert "| reason | training | held-out |" in text
    assert "| chosen == rejected | 2 | 1 |" in text and "| empty response | 1 | 0 |" in text
    # settings
    for row in ("| beta | 0.25 |", "| nll_scope | completion |", "| max_length | 256 |", "| max_prompt_length | 128 |",
                "| max_completion_length | none |", "| learning_rate | 5e-05 |", "| steps | 3 |",
                "| per_device_train_batch_size | 2 |", "| gradient_accumulation_steps | 4 |",
                "| pairs per optimizer step | 8 |", "| precision | fp32 |", "| seed | 7 |"):
        assert row in text, row
    assert "LoRA" not in text
    # metrics: the first and the last training log (steps 1 and 3) and the last evaluation (step 3), 4 digits
    assert ("| metric | training, first log (step 1) | training, final log (step 3) | held-out (step 3, 3 pairs) |"
            in text)
    for row in ("| loss | 4.123 | 2.988 | 3.211 |", "| nll | 4.05 | 2.91 | 3.17 |", "| or_loss | 0.7346 | 0.5123 | 0.5432 |",
                "| log_odds | -0.1234 | 0.8765 | 0.4321 |", "| logps/chosen | -4.01 | -2.9 | -3.1 |",
                "| logps/rejected | -3.95 | -3.9 | -3.6 |", "| margin | -0.06 | 1 | 0.5 |",
                "| accuracy | 0.25 | 0.75 | 1 |"):
        assert row in text, row
    for absent in ("3.5 ", "3.61", "0.6667", "3.537", "301.2"):  # step 2's logs, the step-2 evaluation, summary, speed
        assert absent not in text, absent
    # the plots that exist, by relative path, and the report
    assert f"![{PLOTS['loss.png'][0]}](loss.png)" in text and f"![{PLOTS['logps.png'][0]}](logps.png)" in text
    assert "speed.png" not in text and "log_odds.png" not in text
    assert "[report.html](report.html)" in text
    # usage
    assert f'AutoModelForCausalLM.from_pretrained("{run_dir}")' in text and f"orpo chat {run_dir}" in text


def test_card_without_metrics_or_eval_and_with_lora(tmp_path):
    from peft import LoraConfig

    settings = card_settings(ORPOConfig(output_dir="unused"), steps=1,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"]))
    prepared = prepare_dataset(ROWS[:3], chatml_tokenizer())
    text = render_card("run", "org/base", {"training": (ROWS[:3], prepared)}, settings, [], [], [], hub_ids={"org/base"})
    assert ModelCard(text).data.to_dict()["tags"] == ["orpo", "preference-optimization", "lora"]
    # the tags are the trained model's (`model_tags`, which may hold the user's own and "lora" already): once each
    text = render_card("run", "org/base", {"training": (ROWS[:3], prepared)}, settings, [], [], [],
                       tags=["mine", "orpo", "lora"])
    assert ModelCard(text).data.to_dict()["tags"] == ["mine", "orpo", "lora"]
    assert "| LoRA | r 4, alpha 8, dropout 0.0, modules q_proj, v_proj |" in text
    assert "| training | `rows given in Python` | 3 | 3 | 0 |" in text and "by reason" not in text
    assert "## Results" not in text


def test_lines_skipped_as_unreadable_are_named_under_the_drops(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:4]) + "{not json\n[1]\n")
    prepared = prepare_dataset(str(path), chatml_tokenizer(), skip_bad_rows=True, use_cache=False)
    held_out = prepare_dataset(ROWS[:3], chatml_tokenizer())
    text = render_card("run", "org/base", {"training": (str(path), prepared), "held-out": ("rows", held_out)},
                       _settings(), [], [], [])
    assert f"| training | `{path}` | 4 | 3 | 1 |" in text and "| chosen == rejected | 1 | 0 |" in text
    assert ("\nUnreadable lines skipped (--skip_bad_rows), not counted as rows: training: skipped 2 bad lines (first: "
            "line 5: invalid JSON (Expecting property name enclosed in double quotes at column 2)).\n") in text
    assert "Unreadable lines" not in render_card("run", "org/base", {"held-out": ("rows", held_out)}, _settings(),
                                                 [], [], [])


def test_the_license_comes_from_a_local_base_models_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    assert base_license(str(tmp_path)) == "mit"
    assert base_license(str(tmp_path / "nothing")) is None
    assert base_license("no-such-org/no-such-model-anywhere") is None  # not in the hub cache; nothing downloaded


def test_the_usage_snippet_runs(run_dir, capsys):
    save_tiny_chat_model(run_dir)
    text = _write(run_dir, "org/base").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(snippet.replace("max_new_tokens=256", "max_new_tokens=4"), {})
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("lora", [False, True])
def test_a_vision_language_runs_card_names_its_pipeline_and_its_usage_snippet_runs_with_an_image(tmp_path, capsys,
                                                                                              lora):
    """`orpo train` on a tiny LLaVA (full, or a LoRA adapter): the card's front matter says image-text-to-text
    and its snippet, given a picture, loads the model and processor and generates."""
    from orpo.commands.cli import main
    from vision_models import vision_training_data, write_image

    model_dir, data = vision_training_data(tmp_path)
    out = tmp_path / "run"
    flags = ["--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj"] if lora else []
    assert main(["train", "--model", model_dir, "--dataset", data, "--output_dir", str(out), "--max_steps", "1",
                 "--report_to", "none", "--save_strategy", "no", "--report", "false", *flags]) == 0
    text = (out / "README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["pipeline_tag"] == "image-text-to-text"
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    write_image(tmp_path / "picture.jpg", 30, 30)
    capsys.readouterr()
    snippet = snippet.replace("max_new_tokens=256", "max_new_tokens=4")
    exec(snippet.replace('"picture.jpg"', repr(str(tmp_path / "picture.jpg"))), {})
    assert capsys.readouterr().out.strip()


def test_a_reward_models_card_names_its_pipeline_settings_and_metrics_and_its_usage_snippet_scores(tmp_path, capsys):
    """A directory holding a *ForSequenceClassification (orpo train --objective reward): pipeline text-classification,
    the reward-model tag, the objective in place of beta and nll_scope, the rewards in the results, and a usage
    snippet that scores an answer (it runs)."""
    import transformers

    out = tmp_path / "rm"
    base = save_tiny_chat_model(tmp_path / "base")
    transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(out)
    chatml_tokenizer().save_pretrained(out)
    (out / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 0.7, "accuracy": 0.5, "margin": 0.1, "rewards/chosen": 0.2,
                    "rewards/rejected": 0.1}) + "\n"
        + json.dumps({"step": 1, "eval_loss": 0.6, "eval_accuracy": 0.75, "eval_pairs": 4, "eval_margin": 0.3}) + "\n")
    settings = card_settings(ORPOConfig(output_dir="unused", objective="reward"), steps=1)
    assert "beta" not in settings and "nll_scope" not in settings and settings["objective"] == "reward"
    prepared = prepare_dataset(ROWS[:3], chatml_tokenizer())
    text = Path(write_card(str(out), "org/base", settings, train=("prefs.jsonl", prepared))).read_text()
    meta = ModelCard(text).data.to_dict()
    assert meta["pipeline_tag"] == "text-classification" and "reward-model" in meta["tags"]
    assert "Bradley-Terry reward model on [org/base]" in text and "odds-ratio" not in text
    assert "| rewards/chosen | 0.2 |" in text and "| accuracy | 0.5 | 0.75 |" in text
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(snippet, {})
    float(capsys.readouterr().out.strip())
