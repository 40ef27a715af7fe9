"""recipes/: every recipe loads through `orpo train`'s parser with each of its fields, and runs as a user installs it:
in a venv of a plain install of orpo plus only the extras its `# Launch:` line names (`make recipe-venvs` builds
them: .venv-recipes/plain, and one venv per set of extras layered on it), `orpo train --config RECIPE --dry_run` plans
it (a sharded recipe without a launcher, for the world size its launch line starts) and `orpo train` trains one step
on a tiny stand-in of its model's family and the shared data (the names swapped in, the sizes scaled down;
everything else as the recipe says: report_to, LoRA, FSDP2, ZeRO-3, the router loss, the vision tower). Each states
the memory line tests/recipe_models.py computes, on a config whose parameter count is its model card's.

The sharded recipes train under torchrun with 2 CPU ranks (gloo), FSDP2 set up as on a GPU (tests/cpu_fsdp.py); the
multi-node one as one machine's 2 ranks (the two-machine launch itself: tests/run/test_trainer_distributed.py)."""
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from orpo.commands.cli import launch_world_size, parse_train_args
from recipe_models import HARDWARE, PUBLISHED, RECIPES, memory_line, meta_model, read_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE_VENVS = REPO / ".venv-recipes"  # the Makefile's RECIPE_VENV
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
    for name in names:  # the install line and the command, as the recipe's launch line gives them
        assert f"`{launch_line(name).split('    (')[0]}`" in docs, name
    slurm = (RECIPES / "multinode.slurm").read_text()
    assert "-m orpo train --config recipes/multinode-2x8gpu.yaml" in slurm
    # the machines and processes per machine the slurm script starts are those of the recipe's launch line
    nodes, per_node = re.search(r"#SBATCH --nodes=(\d+)", slurm)[1], re.search(r"--nproc_per_node (\d+)", slurm)[1]
    assert launch_world_size((RECIPES / "multinode-2x8gpu.yaml").read_text()) == \
        (int(nodes) * int(per_node), f"--nnodes {nodes} --nproc_per_node {per_node}")


def launch_line(name: str) -> str:
    (line,) = [line for line in (RECIPES / name).read_text().splitlines() if line.startswith("# Launch: ")]
    return line.removeprefix("# Launch: ")


def launch_installs(name: str) -> list[str]:
    """What the recipe's launch line installs before it starts (`pip install 'orpo[tensorboard]' torchvision && ...`:
    ["'orpo[tensorboard]'", "torchvision"]); [] for nothing beyond orpo."""
    install = re.match(r"pip install (.*?) && ", launch_line(name))
    return install[1].split() if install else []


def launch_extras(name: str) -> str:
    """The orpo extras the recipe's launch line installs ("deepspeed,tensorboard"), "" for a plain install (the
    Makefile's recipe-venvs reads them the same way)."""
    extras = [re.fullmatch(r"'orpo\[([a-z0-9_,-]+)\]'", package) for package in launch_installs(name)]
    return next((m[1] for m in extras if m), "")


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_every_backend_and_engine_a_recipe_uses_is_in_its_launch_line(name):
    """A plain install has neither tensorboard nor DeepSpeed nor torchvision: a recipe that needs one names it on its
    launch line (orpo's extra where there is one, declared in pyproject.toml), and names nothing it does not need."""
    recipe = read_recipe(name)
    extras = set(filter(None, launch_extras(name).split(",")))
    needed = ({"tensorboard"} if recipe.get("report_to") == "tensorboard" else set()) | \
        ({"deepspeed"} if recipe.get("deepspeed") else set())
    assert extras == needed, (name, extras, needed)
    section = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    declared = set(re.findall(r"^([a-z0-9_-]+) = \[", section, flags=re.M))  # (tomllib: Python 3.11 on)
    assert "tensorboard" in declared and extras <= declared - {"test", "bench"}, (extras, declared)
    # beyond orpo's extras: torchvision, for Qwen2-VL's processor (no extra: its release must match the user's torch)
    others = [package for package in launch_installs(name) if not package.startswith("'orpo[")]
    assert others == (["torchvision"] if PUBLISHED[recipe["model"]][0] == "qwen2_vl" else []), others
    if recipe.get("fsdp") or recipe.get("deepspeed"):  # a dry run without a launcher plans for this world size
        assert launch_world_size((RECIPES / name).read_text())[0] == HARDWARE[name].processes


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_recipe_loads_through_the_cli_parser_with_each_field(name):
    recipe = read_recipe(name)
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


def _stand_in(name: str, tmp_path: Path, stand_in_data) -> list[str]:
    """The tiny model of the recipe's family and its data as flags of `orpo train` (SWAPPED), then SCALED."""
    from family_models import save_family_model

    model_type = PUBLISHED[read_recipe(name)["model"]][0]
    train, evaluation, tokenizer = stand_in_data
    if model_type == "qwen2_vl":  # its processor: tests/stand_in_processor.py's (the recipe's torchvision aside)
        from vision_models import image_rows_files, tiny_vision_model

        model = tmp_path / "model"
        tiny_vision_model(model_type).save_pretrained(model)
        train = evaluation = image_rows_files(tmp_path)[0]
    else:
        model = save_family_model(model_type, tmp_path / "model", tokenizer)
    swapped = dict(zip(SWAPPED, (model, train, "train", evaluation, "train", tmp_path / "out")))
    return [arg for key, value in {**swapped, **SCALED}.items() for arg in (f"--{key}", str(value))]


def deepspeed_environment(name: str) -> dict:
    """DeepSpeed's on CPU ranks: it compiles a communication op with g++ (ninja from the recipe's venv) at its first
    start, kept in the venv (like the venv, reused across runs: ~40 s the first time)."""
    if not read_recipe(name).get("deepspeed"):
        return {}
    if shutil.which("g++") is None:
        pytest.skip("DeepSpeed on CPU compiles an op with g++, which is not installed")
    venv = recipe_python(name).parents[1]
    return {"TORCH_EXTENSIONS_DIR": str(venv / "torch_extensions"),
            "PATH": os.pathsep.join([str(venv / "bin"), os.environ["PATH"]])}


def recipe_python(name: str) -> Path:
    """The python of the venv the recipe runs in: a plain install plus the extras of its launch line."""
    venv = RECIPE_VENVS / (launch_extras(name) or "plain")
    if not (venv / ".installed").is_file():  # never skipped: a recipe not run on a plain install is not checked
        pytest.fail(f"{venv}: not built; `make recipe-venvs` builds it (`make test` does)")
    return venv / "bin" / "python"


def orpo_in_recipe_venv(name: str, flags: list[str], workdir: Path, processes: int = 1, env: dict | None = None):
    """`orpo train` in the recipe's venv (nothing of the test venv on its path; run from `workdir`, where
    `recipes/` is the repository's, so the orpo imported is the venv's installed one, not the tree's), under torchrun with `processes`
    CPU ranks and FSDP set up as on a GPU (tests/cpu_fsdp.py) when more than 1; Qwen2-VL's with the tests' processor
    (tests/stand_in_processor.py)."""
    python = str(recipe_python(name))
    orpo = [str(REPO / "tests" / "stand_in_processor.py")] if "torchvision" in launch_installs(name) else ["-m", "orpo"]
    command = [python, *orpo, "train", *flags] if processes == 1 else [
        python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        str(REPO / "tests" / "cpu_fsdp.py"), "train", *flags]
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if not (workdir / "recipes").exists():
        (workdir / "recipes").symlink_to(RECIPES)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, cwd=workdir,
                          env={**environment, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})


def test_a_plain_install_has_no_extra_and_runs_orpo_train_help():
    """The plain venv has none of the extras' packages (nor the test extra's), and `orpo train --help` runs there:
    no test-only dependency is imported on its way (the dry runs below are the rest of the way)."""
    python = recipe_python("smollm2-135m-cpu.yaml")
    probe = "import importlib.util as u, orpo; print([m for m in ('tensorboard', 'deepspeed', 'torchvision', 'trl', " \
            "'pytest') if u.find_spec(m)]); print(orpo.__file__)"
    missing = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                             cwd=python.parents[1])
    found, orpo_file = missing.stdout.splitlines()
    assert found == "[]", found
    # what pip installs, a copy in the venv's site-packages, not the tree (an editable install would hide a module
    # the wheel leaves out)
    assert Path(orpo_file).is_relative_to(python.parents[1]) and "site-packages" in orpo_file, orpo_file
    result = subprocess.run([python.parent / "orpo", "train", "--help"], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0 and "--world_size" in result.stdout and "--report_to" in result.stdout, result.stderr


def _sharded(name: str) -> bool:
    recipe = read_recipe(name)
    return bool(recipe.get("fsdp") or recipe.get("deepspeed"))


# the dry runs of the sharded recipes (a path of their own: planned without a launcher) and of the CPU recipe (a
# plain install, no extra) run by default; the other one-process recipes' dry runs with `pytest -m slow` (their
# one-step training below, by default, passes every check their dry run makes, in the same venv)
DRY_RUNS = [name if _sharded(name) or name == "smollm2-135m-cpu.yaml" else pytest.param(name, marks=pytest.mark.slow)
            for name in sorted(HARDWARE)]


@pytest.mark.parametrize("name", DRY_RUNS)
def test_recipe_dry_runs_on_a_plain_install_without_a_launcher(name, tmp_path, stand_in_data):
    """A sharded recipe's plan is each process's of the world size its launch line starts, in a plain process."""
    recipe = read_recipe(name)
    result = orpo_in_recipe_venv(name, ["--config", f"recipes/{name}", *_stand_in(name, tmp_path, stand_in_data),
                                        "--dry_run"], tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    plan = dict(line.split(": ", 1) for line in result.stdout.splitlines()[3:])
    if _sharded(name):
        processes, flags = launch_world_size((RECIPES / name).read_text())
        assert plan["processes"].startswith(f"{processes} ({flags} in the `# Launch:` line of recipes/{name}; planned "
                                            "in this process, which no launcher started): "), plan["processes"]
        assert plan["processes"].endswith("FSDP2" if recipe.get("fsdp") else "DeepSpeed ZeRO-3")
        assert f"x {processes} processes = " in plan["processes"]
    else:
        assert plan["processes"].startswith("1 (this process alone: no launcher started it)")
    assert plan["output_dir"].startswith(f"a new run in {tmp_path / 'out'}") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_recipe_trains_a_step_on_a_stand_in(name, tmp_path, stand_in_data):
    recipe = read_recipe(name)
    flags = ["--config", f"recipes/{name}", *_stand_in(name, tmp_path, stand_in_data)]
    if _sharded(name):
        result = orpo_in_recipe_venv(name, flags, tmp_path, processes=2, env=deepspeed_environment(name))
        assert "did not set up FSDP" not in result.stderr  # sharded, not DDP
    else:
        result = orpo_in_recipe_venv(name, flags, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in records if "nll" in r]
    assert step["step"] == 1 and math.isfinite(step["loss"])
    assert ("aux_loss" in step) == bool((recipe.get("model_init_kwargs") or {}).get("output_router_logits"))
    assert any("eval_loss" in r for r in records)  # the recipe's eval set, evaluated at the end
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()  # the model and its card
    if recipe.get("use_peft"):  # saved merged: no adapter files
        assert not (out / "adapter_config.json").exists()
    # the recipe's report_to backend wrote its log (tensorboard: event files under output_dir/runs)
    assert any(out.glob("runs/*/events.out.tfevents.*")) == (recipe.get("report_to") == "tensorboard")
