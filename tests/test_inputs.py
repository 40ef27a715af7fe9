"""The hostile-input matrix: every `orpo` command given what a user gets wrong.

Generated, so that a new flag cannot skip it:
- every numeric flag of every command with each value its range refuses (validation.RANGES for the flags that are
  config fields; the Range types of the argparse subcommands), below and above the bounds, a fraction for
  integers, NaN and inf for numbers;
- every pair of conflicting flags (validation.CONFLICTS), on each command that has both;
and written out: paths a command cannot write, output directories holding other things, and stale, foreign and
partial checkpoints, plus the cases found by hand (model_init_kwargs, LoRA targets, a NaN model).

Each case ends in one `orpo: error:` line and exit code 2, before the work it would waste (a flag: before anything
is read; a path or a checkpoint: before the model and the data are loaded; what only the model can say: right after
it loads, before the data), or in the acceptance the docs describe (exit 0, and what the run then did).
"""
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from orpo.commands.cli import _subcommand_parser, build_parser, main
from orpo.ranges import Range
from orpo.train.config import DataArguments, ModelArguments, ORPOConfig
from orpo.train.validation import CONFLICTS, RANGES
from tiny import save_tiny_chat_model

ROWS = [{"prompt": "what is the sky", "chosen": "the sky is blue", "rejected": "the sky is red"},
        {"prompt": "is the sky green", "chosen": "no", "rejected": "yes"},
        {"prompt": "why", "chosen": "good", "rejected": "bad"},
        {"prompt": "what", "chosen": "a b c", "rejected": "ok"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "why"}) + "\n")
    (root / "a_file").write_text("")
    return {"model": save_tiny_chat_model(root / "model"), "data": str(root / "prefs.jsonl"),
            "prompts": str(root / "prompts.jsonl"), "file": str(root / "a_file"), "root": root}


def required(command: str, files: dict, tmp_path) -> list[str]:
    """The flags each command needs, valid."""
    return {
        "train": ["--model", files["model"], "--dataset", files["data"], "--output_dir", str(tmp_path / "out"),
                  "--report_to", "none"],
        "eval": ["--model", files["model"], "--dataset", files["data"]],
        "data inspect": ["--model", files["model"], "--dataset", files["data"]],
        "data prepare": ["--model", files["model"], "--dataset", files["data"]],
        "generate": ["--model", files["model"], "--prompts", files["prompts"], "--output", str(tmp_path / "g.jsonl")],
        "chat": [files["model"]],
        "judge": ["--model_a", files["model"], "--model_b", files["model"], "--prompts", files["prompts"],
                  "--reward_model", files["model"], "--output", str(tmp_path / "judged")],
        "demo": ["--output_dir", str(tmp_path / "demo")],
    }[command]


def refused(argv: list[str], capsys, before_loading: bool = True) -> str:
    """Runs `orpo ARGV`: exit code 2 and one `orpo: error:` line, the last on stderr, no traceback. With
    `before_loading`, nothing else was printed: no tokenizer, model or data was loaded."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("orpo: error: "), err
    assert sum(line.startswith("orpo: error: ") for line in lines) == 1, err
    assert "train data" not in err, err  # never after the data was prepared
    if before_loading:
        assert lines == [lines[-1]], err
    return lines[-1].removeprefix("orpo: error: ")


# --- numeric flags: every value each range refuses --------------------------------------------------------------

def config_flag_fields(command: str) -> set[str]:
    if command == "train":
        classes = (ModelArguments, DataArguments, ORPOConfig)
        return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
    return {f.name for f in dataclasses.fields(_subcommand_parser(command).dataclass_types[0])}


def argparse_ranges(command: str) -> dict[str, Range]:
    parser = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {action.dest: action.type for action in parser._actions if isinstance(action.type, Range)}


def numeric_cases():
    cases = []
    for command in ("train", "eval", "data inspect", "data prepare"):
        for name in sorted(config_flag_fields(command) & set(RANGES)):
            cases += [(command, name, value) for value in RANGES[name].refused()]
    for command in ("generate", "judge", "chat", "demo"):
        for name, accepted in sorted(argparse_ranges(command).items()):
            cases += [(command, name, value) for value in accepted.refused()]
    return cases


def test_every_numeric_flag_of_every_command_has_a_range():
    """The generation below covers every numeric flag: a numeric config field without a RANGES entry, or an
    argparse number without a Range type, fails here."""
    import typing

    for cls in (ModelArguments, ORPOConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            numeric = {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))
            if f.init and numeric and hints[f.name] is not bool:
                assert f.name in RANGES, f"{cls.__name__}.{f.name} is numeric and has no entry in validation.RANGES"
    for command in ("eval", "data inspect", "data prepare"):
        flags = _subcommand_parser(command).dataclass_types[0]
        for f in dataclasses.fields(flags):
            if {int, float} & set(typing.get_args(f.type) or (f.type,)):
                assert f.name in RANGES, (command, f.name)
    parser = next(a for a in build_parser()._actions if a.dest == "command")
    for command, sub in parser.choices.items():
        for action in sub._actions:
            assert action.type not in (int, float), f"orpo {command} {action.option_strings}: use a Range type"
    assert {name for _, name, _ in numeric_cases()} >= set(RANGES)  # every range is tried on a command


@pytest.mark.parametrize("command, name, value", numeric_cases(),
                         ids=lambda v: v if isinstance(v, str) else repr(v))
def test_an_out_of_range_number_is_one_line_before_anything_loads(command, name, value, files, tmp_path, capsys):
    text = "nan" if isinstance(value, float) and math.isnan(value) else str(value)
    line = refused([*command.split(), *required(command, files, tmp_path), f"--{name}", text], capsys)
    assert f"--{name}" in line and text in line, line
    assert not (tmp_path / "out").exists()


# --- conflicting flags ----------------------------------------------------------------------------------------

def flag_values(example: dict) -> list[str]:
    argv = []
    for name, value in example.items():
        if value is None:
            continue  # unset: the flag is left out
        argv += [f"--{name}", *(map(str, value) if isinstance(value, list) else [str(value).lower() if isinstance(
            value, bool) else str(value)])]
    return argv


def conflict_cases():
    cases = []
    for conflict in CONFLICTS:
        for command in ("train", "eval"):
            if set(conflict.example) <= config_flag_fields(command):
                cases.append((command, conflict))
    return cases


def test_every_conflict_is_reachable_from_a_command():
    assert {id(c) for _, c in conflict_cases()} == {id(c) for c in CONFLICTS}


@pytest.mark.parametrize("command, conflict", conflict_cases(),
                         ids=lambda v: v if isinstance(v, str) else "+".join(v.example))
def test_conflicting_flags_are_one_line_before_anything_loads(command, conflict, files, tmp_path, capsys):
    line = refused([*command.split(), *required(command, files, tmp_path), *flag_values(conflict.example)], capsys)
    assert line == conflict.message


# --- paths that cannot be written, directories that hold something else ----------------------------------------

def path_cases(files, tmp_path):
    under_file = f"{files['file']}/sub"
    train = required("train", files, tmp_path)
    return {
        "train --output_dir under a file": (["train", *train, "--output_dir", under_file], "--output_dir"),
        "train --output_dir a file": (["train", *train, "--output_dir", files["file"]], "--output_dir"),
        "train --export_gguf a directory": (["train", *train, "--export_gguf", str(tmp_path)], "--export_gguf"),
        "train --export_gguf under a file": (["train", *train, "--export_gguf", f"{under_file}/m.gguf"],
                                             "--export_gguf"),
        "eval --output a directory": (["eval", *required("eval", files, tmp_path), "--output", str(tmp_path)],
                                      "--output"),
        "data prepare --output under a file": (
            ["data", "prepare", *required("data prepare", files, tmp_path), "--output", under_file], "--output"),
        "export --gguf a directory": (["export", files["model"], "--gguf", str(tmp_path)], "--gguf"),
        "export --merged under a file": (["export", files["model"], "--merged", under_file], "--merged"),
        "generate --output under a file": (
            ["generate", "--model", files["model"], "--prompts", files["prompts"], "--output", f"{under_file}/g.jsonl"],
            "--output"),
        "judge --output under a file": (["judge", *required("judge", files, tmp_path), "--output", under_file],
                                        "--output"),
    }


PATH_CASES = ["train --output_dir under a file", "train --output_dir a file", "train --export_gguf a directory",
              "train --export_gguf under a file", "eval --output a directory", "data prepare --output under a file",
              "export --gguf a directory", "export --merged under a file", "generate --output under a file",
              "judge --output under a file"]


@pytest.mark.parametrize("case", PATH_CASES)
def test_a_path_that_cannot_be_written_is_one_line_before_anything_loads(case, files, tmp_path, capsys):
    argv, flag = path_cases(files, tmp_path)[case]
    assert refused(argv, capsys).startswith(flag + " ")


def test_an_output_dir_with_files_is_refused_before_anything_loads(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = refused(["train", *required("train", files, tmp_path)], capsys)
    assert line.startswith(f"output_dir {out} already has files (notes.txt); pass --overwrite_output_dir")
    line = refused(["train", *required("train", files, tmp_path), "--overwrite_output_dir"], capsys)
    assert line.startswith(f"output_dir {out} has files that no orpo run wrote (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_report_to_backend_that_is_not_installed_is_one_line_before_anything_loads(files, tmp_path, capsys,
                                                                                     monkeypatch):
    from transformers import integrations

    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    line = refused(["train", *required("train", files, tmp_path), "--report_to", "tensorboard"], capsys)
    assert line == "--report_to tensorboard: tensorboard is not installed; pip install 'orpo[tensorboard]' " \
                   "(or --report_to none)"
    assert refused(["train", *required("train", files, tmp_path), "--report_to", "wandb,x"], capsys) \
        .startswith("--report_to wandb,x: not a backend transformers reports to; accepted: ")
    assert not (tmp_path / "out").exists()


# --- what only the model can say: right after it loads, before the data -------------------------------------------

def test_init_kwargs_and_lora_targets_the_model_refuses_are_one_line_before_the_data(files, tmp_path, capsys):
    train = ["train", *required("train", files, tmp_path)]
    assert refused([*train, "--model_init_kwargs", "{bad"], capsys).startswith("--model_init_kwargs: invalid JSON")
    line = refused([*train, "--model_init_kwargs", '{"foo": 1}'], capsys, before_loading=False)
    assert line.endswith("cannot be loaded with them (LlamaForCausalLM.__init__() got an unexpected keyword argument "
                         "'foo')")
    line = refused([*train, "--use_peft", "--lora_target_modules", "nope"], capsys, before_loading=False)
    assert line.startswith("--lora_target_modules nope: Target modules {'nope'} not found in the base model")
    assert not (tmp_path / "out").exists()


def test_a_model_no_route_reproduces_is_one_line(files, tmp_path, capsys):
    model = tmp_path / "nan_model"
    save_tiny_chat_model(model)
    weights = load_file(model / "model.safetensors")
    save_file({**weights, "model.norm.weight": torch.full_like(weights["model.norm.weight"], math.nan)},
              model / "model.safetensors")
    line = refused(["train", *required("train", files, tmp_path), "--model", model], capsys, before_loading=False)
    assert line.startswith("LlamaForCausalLM: no batch layout reproduces the model's separate forwards")


# --- stale, foreign and partial checkpoints --------------------------------------------------------------------

def run_flags(files, tmp_path, *flags) -> list[str]:
    return ["train", *required("train", files, tmp_path), "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--save_steps", "1", "--bf16", "false", *map(str, flags)]


def test_stale_foreign_and_partial_checkpoints(files, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "out"
    assert main(run_flags(files, tmp_path, "--max_steps", "2", "--beta", "0.1")) == 0
    capsys.readouterr()
    # foreign: another run's settings, refused before anything loads, naming what differs
    line = refused(run_flags(files, tmp_path, "--resume_from_checkpoint", "latest", "--max_steps", "3", "--beta", "0.5"),
                   capsys)
    assert line.startswith(f"resume_from_checkpoint: {out / 'checkpoint-2'} was made by another run (beta 0.1 (now "
                           "0.5)); ")
    # stale: the run finished; resuming it again trains nothing and succeeds (a requeued job)
    assert main(run_flags(files, tmp_path, "--max_steps", "2", "--beta", "0.1", "--resume_from_checkpoint", "latest")) == 0
    assert "this run finished at step 2; nothing to resume" in caplog.text
    # partial: a checkpoint whose save was cut is refused by name, and "latest" passes over it
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    line = refused(run_flags(files, tmp_path, "--resume_from_checkpoint", out / "checkpoint-3", "--max_steps", "4"),
                   capsys)
    assert line.startswith(f"resume_from_checkpoint: {out / 'checkpoint-3'} is incomplete")
    # a partial last line of metrics.jsonl (a kill during a log write) is dropped, not fatal
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    caplog.clear()
    assert main(run_flags(files, tmp_path, "--max_steps", "4", "--beta", "0.1", "--resume_from_checkpoint", "latest")) == 0
    assert "its last line was partial" in caplog.text and "resumes " + str(out / "checkpoint-2") in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line and "eval" not in line]
    assert steps == [1, 2, 3, 4]
    # overwritten: the old run is gone, so "latest" resumes the new run, never the old one
    assert main(run_flags(files, tmp_path, "--max_steps", "1", "--beta", "0.3", "--overwrite_output_dir")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    caplog.clear()
    assert main(run_flags(files, tmp_path, "--max_steps", "2", "--beta", "0.3", "--resume_from_checkpoint", "latest")) == 0
    assert f"resumes {out / 'checkpoint-1'}" in caplog.text
