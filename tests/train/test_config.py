"""config.py against TRL's ORPOConfig: every flag that `transformers.HfArgumentParser` makes of TRL's
`ORPOConfig`, in every form (`--x_y V`, `--x-y V`, bare `--flag`, `--no_flag`), parses with
`HfArgumentParser(orpo.ORPOConfig)` to the same value, so a TRL script or command line needs only
its import changed. Defaults differ only where listed in DELIBERATE_DEFAULTS, with the reason.

Skipped without trl (`pip install -e '.[test]'` installs it).
"""
import argparse
import contextlib
import dataclasses
import enum
import io
import shlex
import types
import typing
import warnings

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: ORPO lives in trl.experimental since trl 1.0
    try:
        from trl.experimental.orpo import ORPOConfig as TrlORPOConfig
    except ImportError:  # trl < 1.0
        from trl import ORPOConfig as TrlORPOConfig
    from trl import ModelConfig, ScriptArguments

from orpo.errors import OrpoError
from orpo.train.config import ORPOConfig

# TRL fields whose default orpo deliberately changes (field -> reason); the test fails on any other.
# bf16: the same default (None), a different meaning: TRL turns bf16 on unless fp16 (and stops on a machine
# without it), orpo where the device computes bf16 natively (train/precision.py).
# gradient_checkpointing: the same default (true), a different meaning: TRL recomputes always, orpo when the
# largest micro-batch does not fit the memory budget (train/memory.py); --activation_checkpointing true always.
DELIBERATE_DEFAULTS: dict[str, str] = {}

# TRL fields orpo does not accept (field -> why); the test fails when one more is missing, and when one
# of these is added (then delete it here). None today.
NOT_YET: dict[str, str] = {}

# Forms TRL accepts that orpo rejects (command line -> why); the test fails on any other, and when one
# of these parses (then delete it here). None today.
REJECTED_FORMS: dict[str, str] = {}

# The command lines in the docstring of TRL's examples/scripts/orpo.py (regular and peft), verbatim.
TRL_EXAMPLES = [
    "--dataset_name trl-internal-testing/hh-rlhf-helpful-base-trl-style --model_name_or_path gpt2 "
    "--per_device_train_batch_size 4 --max_steps 1000 --learning_rate 8e-6 --gradient_accumulation_steps 1 "
    "--eval_steps 500 --output_dir gpt2-aligned-orpo --warmup_steps 150 --logging_first_step "
    "--no_remove_unused_columns",
    "--dataset_name trl-internal-testing/hh-rlhf-helpful-base-trl-style --model_name_or_path gpt2 "
    "--per_device_train_batch_size 4 --max_steps 1000 --learning_rate 8e-5 --gradient_accumulation_steps 1 "
    "--eval_steps 500 --output_dir gpt2-lora-aligned-orpo --optim rmsprop --warmup_steps 150 --logging_first_step "
    "--no_remove_unused_columns --use_peft --lora_r 16 --lora_alpha 16",
    # and the flags such runs add; TRL's --bf16 needs a value (its type is bool | None)
    "--model_name_or_path gpt2 --dataset_name trl-lib/ultrafeedback_binarized --learning_rate 8e-6 "
    "--gradient_accumulation_steps 1 --logging_steps 10 --eval_strategy steps --output_dir out --warmup_steps 150 "
    "--report_to wandb --bf16 true --logging_first_step --no_remove_unused_columns --beta 0.2 --max_length 512 "
    "--no-gradient-checkpointing --per-device-train-batch-size 2",
]


@pytest.fixture(scope="module")
def trl_parser():
    return HfArgumentParser(TrlORPOConfig)


@pytest.fixture(scope="module")
def our_parser():
    return HfArgumentParser(ORPOConfig)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | None:
    """The argparse namespace of `argv` (no dataclass built), or None where the parser rejects it."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            return None


def sample_values(action: argparse.Action) -> list[str]:
    """Values to pass to `action`: each choice, or a few of its type."""
    if action.choices is not None:
        return [str(choice.value if isinstance(choice, enum.Enum) else choice) for choice in action.choices]
    if isinstance(action.type, type) and issubclass(action.type, enum.Enum):
        return [member.value for member in action.type]
    if action.type is string_to_bool:
        return ["true", "false", "0", "yes"]
    return {int: ["3", "-1"], float: ["0.25", "7"], str: ["sample", '{"a": 1}']}.get(action.type, ["{}"])


def forms(action: argparse.Action) -> list[list[str]]:
    """Every command line HfArgumentParser generated `action` for: each option string, bare where the
    action takes no value or an optional one, and with each sample value."""
    lines = []
    for option in action.option_strings:
        if action.nargs == 0:
            lines.append([option])
            continue
        if action.nargs == "?":
            lines.append([option])
        values = sample_values(action)
        lines += [[option, *values[:2]]] if action.nargs == "+" else [[option, value] for value in values]
    return lines


def trl_own_fields() -> set[str]:
    """The fields TRL's ORPO declares itself (its ORPOConfig and TRL's base config), not those it
    inherits unchanged from TrainingArguments."""
    own = set()
    for cls in TrlORPOConfig.__mro__:
        if cls is TrainingArguments:
            break
        own |= set(vars(cls).get("__annotations__", {}))
    return own & {f.name for f in dataclasses.fields(TrlORPOConfig)}


def type_family(tp) -> set:
    """What the parser makes of a field's type: T | None parses as T; dict[str, Any] as dict."""
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    return {typing.get_origin(a) or a for a in args if a is not type(None)}


def test_every_trl_option_string_is_ours(trl_parser, our_parser):
    missing = option_strings(trl_parser) - option_strings(our_parser)
    not_yet = {s for action in trl_parser._actions if action.dest in NOT_YET for s in action.option_strings}
    assert missing == not_yet, f"missing: {sorted(missing - not_yet)}; no longer missing: {sorted(not_yet - missing)}"
    # the forms the parser generates: dashed aliases and --no_ complements are among them
    assert {"--per-device-train-batch-size", "--no_disable_dropout", "--no-disable-dropout",
            "--no_gradient_checkpointing", "--no_remove_unused_columns"} <= option_strings(our_parser)


def test_every_form_trl_accepts_parses_to_the_same_value(trl_parser, our_parser):
    checked, rejected_by_trl, rejected_by_ours, wrong = 0, set(), set(), []
    for action in trl_parser._actions:
        if action.dest in NOT_YET or action.dest == "help":
            continue
        for argv in forms(action):
            theirs = parse(trl_parser, argv)
            if theirs is None:  # not a form TRL accepts (a type no string converts to)
                rejected_by_trl.add(argv[0])
                continue
            ours = parse(our_parser, argv)
            checked += 1
            if ours is None:
                rejected_by_ours.add(shlex.join(argv))
            elif getattr(ours, action.dest) != getattr(theirs, action.dest):
                wrong.append(f"{shlex.join(argv)}: {action.dest}={getattr(ours, action.dest)!r}, "
                             f"TRL: {getattr(theirs, action.dest)!r}")
    assert not wrong, "\n".join(wrong)
    assert rejected_by_ours == set(REJECTED_FORMS), (f"rejected: {sorted(rejected_by_ours - set(REJECTED_FORMS))}; "
                                                     f"now parsing: {sorted(set(REJECTED_FORMS) - rejected_by_ours)}")
    assert checked > 600
    # only options whose type cannot come from a command line at all
    assert {s.lstrip("-").replace("-", "_") for s in rejected_by_trl} <= {"liger_kernel_config", "parallelism_config"}


def test_defaults_differ_only_where_deliberate(trl_parser, our_parser):
    theirs, ours = vars(parse(trl_parser, [])), vars(parse(our_parser, []))
    differ = {name for name, value in theirs.items() if name not in NOT_YET and ours.get(name) != value}
    assert differ == set(DELIBERATE_DEFAULTS), {name: (theirs[name], ours.get(name)) for name in differ}


def test_each_trl_field_has_the_same_type_family():
    theirs, ours = typing.get_type_hints(TrlORPOConfig), typing.get_type_hints(ORPOConfig)
    names = [f.name for f in dataclasses.fields(TrlORPOConfig) if f.init and f.name not in NOT_YET]
    differ = {name: (theirs[name], ours.get(name)) for name in names if type_family(theirs[name]) != type_family(ours.get(name))}
    assert not differ


# TRL's own fields, each set away from its default; bf16 false as TRL's
# default (bf16 on) fails on a machine without bf16 support.
TRL_OWN_ARGV = [
    "--beta", "0.5", "--max_length", "256", "--max_completion_length", "128", "--no_disable_dropout",
    "--padding_value", "7", "--generate_during_eval", "false", "--is_encoder_decoder", "false",
    "--model_init_kwargs", '{"revision": "main", "attn_implementation": "eager"}', "--dataset_num_proc", "2",
    "--learning_rate", "8e-6", "--logging_steps", "5", "--no_gradient_checkpointing", "--bf16", "false",
    "--lr_scheduler_kwargs", '{"num_cycles": 2}', "--use_liger_kernel", "false", "--torch_empty_cache_steps", "4",
    "--trust_remote_code", "true",
]


def test_trl_own_fields_parse_to_the_same_config(tmp_path):
    named = {arg.removeprefix("--").removeprefix("no_") for arg in TRL_OWN_ARGV if arg.startswith("--")}
    assert named == trl_own_fields() - set(NOT_YET)  # a new TRL field needs a line here
    argv = [*TRL_OWN_ARGV, "--output_dir", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers: gradient_checkpointing is deprecated
        (theirs,) = HfArgumentParser(TrlORPOConfig).parse_args_into_dataclasses(argv)
        (ours,) = HfArgumentParser(ORPOConfig).parse_args_into_dataclasses(argv)
    for name in sorted(named | {"activation_checkpointing"}):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.model_init_kwargs == {"revision": "main", "attn_implementation": "eager"}
    assert ours.activation_checkpointing is False and ours.disable_dropout is False


def test_gradient_checkpointing_forms(tmp_path):
    parser = HfArgumentParser(ORPOConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the default does not warn
        (default,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    # unset: the run's plan chooses (train/memory.py); the config keeps it unset, the plan's copy holds the choice
    assert default.chooses_checkpointing and default.activation_checkpointing is None
    for off in (["--no_gradient_checkpointing"], ["--no-gradient-checkpointing"], ["--gradient_checkpointing", "false"]):
        with pytest.warns(FutureWarning, match="gradient_checkpointing"):
            (config,) = parser.parse_args_into_dataclasses([*off, "--output_dir", str(tmp_path)])
        assert config.activation_checkpointing is False and config.gradient_checkpointing is False, off
    (config,) = parser.parse_args_into_dataclasses(
        ["--no_gradient_checkpointing", "--activation_checkpointing", "true", "--output_dir", str(tmp_path)])
    assert config.activation_checkpointing is True and not config.chooses_checkpointing  # the new name wins
    (config,) = parser.parse_args_into_dataclasses(["--gradient_checkpointing", "true", "--output_dir", str(tmp_path)])
    assert config.chooses_checkpointing  # TRL's default, said: the parser cannot tell it from unset


def test_remove_unused_columns_forms(tmp_path):
    """TRL's default (True) and its --no_ form; orpo's batches come from prepared pairs either way."""
    parser = HfArgumentParser(ORPOConfig)
    for argv, expected in (([], True), (["--no_remove_unused_columns"], False),
                           (["--no-remove-unused-columns"], False), (["--remove_unused_columns", "false"], False)):
        (config,) = parser.parse_args_into_dataclasses([*argv, "--output_dir", str(tmp_path)])
        assert config.remove_unused_columns is expected, argv


def test_bare_activation_checkpointing_means_true(tmp_path):
    (config,) = HfArgumentParser(ORPOConfig).parse_args_into_dataclasses(
        ["--no_gradient_checkpointing", "--activation_checkpointing", "--output_dir", str(tmp_path)])
    assert config.activation_checkpointing is True


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the case of a machine without an accelerator")
def test_bf16_on_a_machine_without_an_accelerator_trains_on_the_cpu(tmp_path):
    """transformers refuses bf16 without a GPU unless use_cpu is set ("Your setup doesn't support
    bf16/gpu ..."): with the CPU the only device, orpo sets it."""
    args = ORPOConfig(output_dir=str(tmp_path), bf16=True)
    assert args.bf16 and args.use_cpu and args.device.type == "cpu"


def test_is_encoder_decoder_is_accepted_and_left_to_the_model(tmp_path):
    """TRL's field: accepted either way and kept as given; the model's config decides (run/setup.py checks a True
    against a decoder-only model)."""
    assert ORPOConfig(output_dir=str(tmp_path), is_encoder_decoder=True).is_encoder_decoder is True
    assert ORPOConfig(output_dir=str(tmp_path), is_encoder_decoder=False).is_encoder_decoder is False


def test_deepspeed_and_fsdp_config_problems_are_one_line(tmp_path, monkeypatch):
    from orpo.train import config

    with pytest.raises(OrpoError, match=r"^--fsdp_config .*/fsdp\.json: no such file$"):
        ORPOConfig(output_dir=str(tmp_path), fsdp=True, fsdp_config=str(tmp_path / "fsdp.json"))
    monkeypatch.setattr(config, "_installed", lambda module: False)
    with pytest.raises(OrpoError, match=r"^--deepspeed needs DeepSpeed, which is not installed: "
                                        r"pip install 'orpo\[deepspeed\]'$"):
        ORPOConfig(output_dir=str(tmp_path), deepspeed=str(tmp_path / "ds.json"))
    monkeypatch.setattr(config, "_installed", lambda module: True)
    with pytest.raises(OrpoError, match=r"^--deepspeed .*/ds\.json: no such file$"):
        ORPOConfig(output_dir=str(tmp_path), deepspeed=str(tmp_path / "ds.json"))
    # one process, not launched by torchrun/accelerate: refused before loading (run/checks.py), a dry run plans it
    assert ORPOConfig(output_dir=str(tmp_path), fsdp=True).fsdp


def test_streaming_problems_are_one_line_and_it_shards_by_batches(tmp_path):
    with pytest.raises(OrpoError, match=r"^--streaming needs --max_steps"):
        ORPOConfig(output_dir=str(tmp_path), streaming=True)
    with pytest.raises(OrpoError, match=r"^--streaming tokenizes in the training process .*--dataloader_num_workers"):
        ORPOConfig(output_dir=str(tmp_path), streaming=True, max_steps=2, dataloader_num_workers=2)
    with pytest.raises(OrpoError, match=r"^--streaming_shuffle_buffer -1: out of range; accepted: an integer >= 0$"):
        ORPOConfig(output_dir=str(tmp_path), streaming=True, max_steps=2, streaming_shuffle_buffer=-1)
    with pytest.raises(OrpoError, match=r"^--streaming shards the stream over processes by batches"):
        ORPOConfig(output_dir=str(tmp_path), streaming=True, max_steps=2, accelerator_config={"dispatch_batches": True})
    # the config keeps accelerate's default; the plan's copy turns dispatch_batches off (tests/run/test_plan.py)
    assert ORPOConfig(output_dir=str(tmp_path), streaming=True, max_steps=2).accelerator_config.dispatch_batches is None


@pytest.mark.parametrize("line", TRL_EXAMPLES)
def test_trl_example_command_line(line, tmp_path, monkeypatch):
    """TRL's example script builds HfArgumentParser((ScriptArguments, ORPOConfig, ModelConfig)); with
    ours in place of TRL's ORPOConfig its command lines parse, to the same values."""
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(line)
    trl_parser = HfArgumentParser((ScriptArguments, TrlORPOConfig, ModelConfig))
    our_parser = HfArgumentParser((ScriptArguments, ORPOConfig, ModelConfig))  # no flag clashes
    theirs, ours = vars(parse(trl_parser, argv)), vars(parse(our_parser, argv))
    differ = {name for name, value in theirs.items() if ours.get(name) != value}
    assert differ <= set(DELIBERATE_DEFAULTS) | set(NOT_YET), {n: (theirs[n], ours.get(n)) for n in differ}

    if "--bf16" in argv:  # bf16 needs hardware support to build the config; the flags parsed above
        argv[argv.index("--bf16") + 1] = "false"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        script, config, model = our_parser.parse_args_into_dataclasses(argv)
    assert isinstance(config, ORPOConfig)
    assert script.dataset_name == theirs["dataset_name"] and model.model_name_or_path == "gpt2"
    assert config.learning_rate == float(theirs["learning_rate"]) and config.remove_unused_columns is False  # --no_
    assert config.logging_first_step is True and config.warmup_steps == 150
