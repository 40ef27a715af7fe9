"""checks.py: what can be checked before anything is loaded is checked then, one line each."""
import os
import re

import pytest

from orpo.errors import OrpoError
from orpo.run.checks import check_before_loading, check_writable_dir, check_writable_file
from orpo.train.checkpoints import mark_complete, run_stamp, stamp_settings
from orpo.train.config import ORPOConfig


def config(tmp_path, **fields):
    return ORPOConfig(output_dir=str(tmp_path / "out"), **{"report_to": "none", **fields})


def test_a_directory_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OrpoError, match=r"^--output_dir .*a_file: exists and is not a directory$"):
        check_writable_dir("output_dir", str(blocker))
    with pytest.raises(OrpoError, match=r"^--output_dir .*a_file/run: .*a_file is not a directory$"):
        check_writable_dir("output_dir", str(blocker / "run"))
    check_writable_dir("output_dir", str(tmp_path / "new" / "deeper"))  # made when the run starts
    assert not (tmp_path / "new").exists()
    if not os.access("/sys", os.W_OK) or os.geteuid() == 0:  # even root cannot make files in sysfs
        with pytest.raises(OrpoError, match=r"^--output_dir /sys/orpo-run: cannot write in /sys \("):
            check_writable_dir("output_dir", "/sys/orpo-run")


def test_a_file_path_that_is_a_directory_or_cannot_be_written_is_one_line(tmp_path):
    with pytest.raises(OrpoError, match=r"^--export_gguf .*: is a directory; name the file to write$"):
        check_writable_file("export_gguf", str(tmp_path))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OrpoError, match=r"^--output .*a_file/out.jsonl: .*a_file is not a directory$"):
        check_writable_file("output", str(blocker / "out.jsonl"))
    check_writable_file("output", str(tmp_path / "sub" / "out.jsonl"))


def test_paths_and_the_output_dir_state_are_checked_first(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OrpoError, match=r"^--output_dir .*a_file: exists and is not a directory$"):
        check_before_loading(ORPOConfig(output_dir=str(tmp_path / "a_file")), "m", False, 0)
    with pytest.raises(OrpoError, match=r"^--export_gguf .*: is a directory"):
        check_before_loading(config(tmp_path, export_gguf=str(tmp_path)), "m", False, 0)
    with pytest.raises(OrpoError, match=r"^resume_from_checkpoint: .*nope: no such checkpoint directory$"):
        check_before_loading(config(tmp_path, resume_from_checkpoint=str(tmp_path / "nope")), "m", False, 0)


def test_one_process_driving_several_gpus_is_refused(tmp_path):
    with pytest.raises(OrpoError, match=r"^this process sees 4 GPUs, and transformers would drive them all from it "
                                        r"with nn.DataParallel .*torchrun --nproc_per_node 4 -m orpo train"):
        check_before_loading(config(tmp_path), "m", False, 4)


def test_evaluation_without_eval_data_is_one_line(tmp_path):
    with pytest.raises(OrpoError, match=r"^--eval_strategy steps evaluates during training, and no eval data is given"):
        check_before_loading(config(tmp_path, eval_strategy="steps", eval_steps=2), "m", False, 0)
    check_before_loading(config(tmp_path, eval_strategy="steps", eval_steps=2), "m", True, 0)


def test_init_kwargs_for_a_model_object_are_one_line(tmp_path):
    with pytest.raises(OrpoError, match=r'^model_init_kwargs \{"attn_implementation": "eager"\} apply when orpo '
                                        r"loads the model, and the model was given already loaded"):
        check_before_loading(config(tmp_path, model_init_kwargs={"attn_implementation": "eager"}), None, False, 0)
    with pytest.raises(OrpoError, match=r"^--model_init_kwargs: trust_remote_code has its own flag"):
        check_before_loading(config(tmp_path, model_init_kwargs={"trust_remote_code": True}), "m", False, 0)


def test_a_checkpoint_made_with_other_settings_or_another_model_is_refused_before_loading(tmp_path):
    made = config(tmp_path, beta=0.1)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    mark_complete(str(checkpoint), 2, stamp=run_stamp(stamp_settings(made), "tiny", {"train": ("a", "f")}))
    latest = dict(resume_from_checkpoint="latest")
    check_before_loading(config(tmp_path, beta=0.1, max_steps=9, **latest), "tiny", False, 0)  # may change
    with pytest.raises(OrpoError, match=r"checkpoint-2 was made by another run \(beta 0.1 \(now 0.5\)\)"):
        check_before_loading(config(tmp_path, beta=0.5, **latest), "tiny", False, 0)
    with pytest.raises(OrpoError, match=r"checkpoint-2 was made by another run \(the model tiny \(now other\)\)"):
        check_before_loading(config(tmp_path, resume_from_checkpoint=str(checkpoint)), "other", False, 0)
    check_before_loading(config(tmp_path, beta=0.5, force_resume=True, **latest), "tiny", False, 0)


def test_a_report_to_backend_that_is_not_installed_is_one_line_naming_its_install(tmp_path, monkeypatch):
    from transformers import integrations

    from orpo.run.checks import REPORT_BACKENDS, check_report_to

    for backend, (available, install) in REPORT_BACKENDS.items():  # transformers' function, as it names it
        assert backend in integrations.INTEGRATION_TO_CALLBACK and callable(getattr(integrations, available)), backend
        monkeypatch.setattr(integrations, available, lambda: False)
        with pytest.raises(OrpoError, match=rf"^--report_to {backend}: {backend} is not installed; "
                                            rf"{re.escape(install)} \(or --report_to none\)$"):
            check_report_to([backend])
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    with pytest.raises(OrpoError, match=r"^--report_to tensorboard: .*pip install 'orpo\[tensorboard\]'"):
        check_before_loading(config(tmp_path, report_to=["tensorboard"]), "m", False, 0)  # before anything loads
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: True)
    check_before_loading(config(tmp_path, report_to="tensorboard"), "m", False, 0)
    with pytest.raises(OrpoError, match=r"^--report_to tensorbored: not a backend transformers reports to; accepted: "
                                        r"azure_ml, .*tensorboard.*, all, none$"):
        check_report_to(["tensorbored"])


def test_report_to_all_and_none_are_what_transformers_makes_of_them(tmp_path, monkeypatch):
    """"all": the backends installed (never a missing one), "none": none; both pass the check."""
    from transformers import integrations
    from transformers.integrations import integration_utils

    from orpo.run.checks import check_report_to

    for module in (integrations, integration_utils):  # "all" asks integration_utils, the check integrations
        monkeypatch.setattr(module, "is_tensorboard_available", lambda: False)
    everything, nothing = config(tmp_path, report_to="all").report_to, config(tmp_path, report_to="none").report_to
    assert "tensorboard" not in everything and nothing == []
    check_report_to(everything)
    check_report_to(nothing)


def test_a_sharded_run_without_a_launcher_is_one_line_unless_a_dry_run_plans_it(tmp_path, monkeypatch, request):
    """--fsdp / --deepspeed in a process no launcher started (transformers: a ValueError when the Trainer is built;
    DeepSpeed: an MPI discovery that fails); a dry run planning N processes launched elsewhere needs none."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from orpo.train import config as config_module

    request.addfinalizer(unset_hf_deepspeed_config)  # later models must not load under ZeRO-3's init
    monkeypatch.setattr(config_module, "_installed", lambda module: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for fields, flag in (({"fsdp": "full_shard"}, "--fsdp"), ({"deepspeed": {"zero_optimization": {"stage": 2}}},
                                                              "--deepspeed")):
        args = config(tmp_path, **fields)
        with pytest.raises(OrpoError, match=rf"^{flag} shards the model over several processes: launch with torchrun "
                                            r"or accelerate .*; --dry_run plans such a run without a launcher$"):
            check_before_loading(args, "m", False, 0)
        check_before_loading(args, "m", False, 0, planned_processes=8)
        monkeypatch.setenv("LOCAL_RANK", "0")  # launched
        check_before_loading(args, "m", False, 0)
        monkeypatch.delenv("LOCAL_RANK")
