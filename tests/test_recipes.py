"""recipes/: every recipe loads through `orpo train`'s parser with each of its fields, trains one step on a tiny
stand-in of its model's family and the shared data (the names swapped in, the sizes scaled down; everything else
as the recipe says: LoRA, FSDP2, ZeRO-3, the router loss, the vision tower), and states the memory line
tests/recipe_models.py computes, on a config whose parameter count is its model card's.

The sharded recipes run under torchrun with 2 CPU ranks (gloo), FSDP2 set up as on a GPU (tests/cpu_fsdp.py); the
multi-node one as one machine's 2 ranks (the two-machine launch itself: tests/run/test_trainer_distributed.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orpo.commands.cli import main, parse_train_args
from recipe_models import HARDWARE, PUBLISHED, RECIPES, memory_line, meta_model, read_recipe

REPO = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/data")  # ../shared/data of the repository on this machine and on CI
SWAPPED = ("model", "dataset", "dataset_split", "eval_dataset", "eval_split", "output_dir")
SCALED = {"max_steps": 1, "max_length": 128, "max_prompt_length": 64, "per_device_train_batch_size": 2,
          "gradient_accumulation_steps": 1, "logging_steps": 1, "report": False, "disable_tqdm": True}


def test_every_recipe_is_known_and_documented():
    names = sorted(path.name for path in RECIPES.glob("*.yaml"))
    assert names == sorted(HARDWARE)
    docs, readme = (REPO / "docs" / "recipes.md").read_text(), (REPO / "README.md").read_text()
    for name in names + ["multinode.slurm"]:
        assert f"recipes/{name}" in docs and f"`{name}" in readme, name
    assert "-m orpo train --config recipes/multinode-2x8gpu.yaml" in (RECIPES / "multinode.slurm").read_text()


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_recipe_loads_through_the_cli_parser_with_each_field(name, monkeypatch):
    recipe = read_recipe(name)
    if recipe.get("fsdp"):  # orpo refuses --fsdp in a process of its own (no launcher): that check aside here
        from orpo.train import config

        monkeypatch.setattr(config, "_check_engine_configs", lambda args: None)
    parsed = {}
    for arguments in parse_train_args(["--config", str(RECIPES / name)]):
        parsed.update(vars(arguments))
    for key, value in recipe.items():
        got = parsed[key]
        if key == "fsdp_config":  # TrainingArguments drops the fsdp_ prefix and adds its defaults
            assert {k.removeprefix("fsdp_"): v for k, v in value.items()}.items() <= got.items(), (key, got)
        elif key == "report_to":
            assert got == ([] if value == "none" else [value]), (key, got)
        else:
            assert got == value, (key, got)


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_recipe_memory_line_is_orpos_estimate(name):
    """The `# memory:` line is what tests/recipe_models.py computes now (regenerate: python tests/recipe_models.py)."""
    lines = [line for line in (RECIPES / name).read_text().splitlines() if line.startswith("# memory:")]
    assert lines == [memory_line(name)]


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_published_config_has_the_model_cards_parameter_count(hub_id):
    """A mistyped width or depth changes the parameter count: each config is checked against its card's figure."""
    model = meta_model(hub_id, {"freeze_vision_tower": False})
    count, stated = sum(p.numel() for p in model.parameters()), PUBLISHED[hub_id][2]
    assert abs(count / stated - 1) < 0.005, (hub_id, count, stated)


@pytest.fixture(scope="module")
def stand_in_data(tmp_path_factory):
    """The shared UltraFeedback files cut to 8 training and 4 eval pairs, and a byte-level ChatML tokenizer for them."""
    from tiny import byte_level_chatml_tokenizer

    root = tmp_path_factory.mktemp("recipe_data")
    for name, rows in (("ultrafeedback_1k_train.jsonl", 8), ("ultrafeedback_200_eval.jsonl", 4)):
        with open(SHARED / name) as source:
            (root / name).write_text("".join(line for line, _ in zip(source, range(rows))))
    texts = [text for line in (root / "ultrafeedback_1k_train.jsonl").read_text().splitlines()
             for text in json.loads(line).values() if isinstance(text, str)]
    return root / "ultrafeedback_1k_train.jsonl", root / "ultrafeedback_200_eval.jsonl", byte_level_chatml_tokenizer(texts)


def _stand_in(name: str, tmp_path: Path, stand_in_data, monkeypatch) -> list[str]:
    """The tiny model of the recipe's family and its data as flags of `orpo train` (SWAPPED), then SCALED."""
    from family_models import save_family_model

    model_type = PUBLISHED[read_recipe(name)["model"]][0]
    train, evaluation, tokenizer = stand_in_data
    if model_type == "qwen2_vl":
        from orpo.run import setup
        from vision_models import family_processor, image_rows_files, tiny_vision_model

        model = tmp_path / "model"
        tiny_vision_model(model_type).save_pretrained(model)
        # its processor needs torchvision (for the video processor) to load: the tests' builder stands in for it
        monkeypatch.setattr(setup, "load_tokenizer", lambda path, trust_remote_code=False: family_processor(model_type))
        train = evaluation = image_rows_files(tmp_path)[0]
    else:
        model = save_family_model(model_type, tmp_path / "model", tokenizer)
    swapped = dict(zip(SWAPPED, (model, train, "train", evaluation, "train", tmp_path / "out")))
    return [arg for key, value in {**swapped, **SCALED}.items() for arg in (f"--{key}", str(value))]


def _torchrun(flags: list[str], env: dict) -> subprocess.CompletedProcess:
    """`orpo train` under torchrun with 2 CPU ranks, FSDP set up as on a GPU (tests/cpu_fsdp.py)."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "cpu_fsdp.py"), "train", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env})


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_recipe_trains_a_step_on_a_stand_in(name, tmp_path, stand_in_data, monkeypatch, request):
    recipe = read_recipe(name)
    flags = ["--config", str(RECIPES / name), *_stand_in(name, tmp_path, stand_in_data, monkeypatch)]
    if recipe.get("fsdp") or recipe.get("deepspeed"):
        env = request.getfixturevalue("deepspeed_environment") if recipe.get("deepspeed") else {}
        result = _torchrun(flags, env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "did not set up FSDP" not in result.stderr  # sharded, not DDP
    else:
        assert main(["train", *flags]) == 0
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in records if "nll" in r]
    assert step["step"] == 1 and math.isfinite(step["loss"])
    assert ("aux_loss" in step) == bool((recipe.get("model_init_kwargs") or {}).get("output_router_logits"))
    assert any("eval_loss" in r for r in records)  # the recipe's eval set, evaluated at the end
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()  # the model and its card
    if recipe.get("use_peft"):  # saved merged: no adapter files
        assert not (out / "adapter_config.json").exists()
