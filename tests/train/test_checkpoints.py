"""checkpoints.py: complete-only resume, and SIGKILL mid-run / mid-save then resume == uninterrupted.

The kill tests run a tiny Llama for 8 optimizer steps with a checkpoint every 2 steps in a child
process (tests/tiny.py model, 16 synthetic pairs, AdamW, fp32). One child is killed with SIGKILL
after step 5 (latest complete checkpoint: 4), another while it writes checkpoint-6 (after the
weights, before the optimizer state); both are resumed with `--resume_from_checkpoint latest`
semantics and must end with the loss trajectory and weights of an uninterrupted run (1e-6).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orpo.train.checkpoints import (
    COMPLETE_MARKER, CONFIG_FILE, FINISHED_MARKER, PICKLED_ARGS, RunFinished, check_output_dir, check_stamp,
    finished_step, holds_run, is_complete, keep_metrics_until, latest_complete, mark_complete, mark_finished,
    read_counters, remove_incomplete, resolve_resume, run_stamp, save_config_as_json, stamp_differences,
)
from orpo.errors import OrpoError

TESTS = Path(__file__).resolve().parents[1]


def _checkpoint(root, step, complete):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        mark_complete(str(path), step)
    return path


def test_counters_are_kept_with_the_marker(tmp_path):
    path = tmp_path / "checkpoint-3"
    path.mkdir()
    mark_complete(str(path), 3, {"nonfinite_skipped": 2})
    assert read_counters(str(path)) == {"nonfinite_skipped": 2}
    old = tmp_path / "checkpoint-4"  # a marker written before counters existed
    old.mkdir()
    (old / COMPLETE_MARKER).write_text(json.dumps({"step": 4, "files": []}))
    assert read_counters(str(old)) == {}


def test_only_marked_checkpoints_count(tmp_path):
    _checkpoint(tmp_path, 2, complete=True)
    _checkpoint(tmp_path, 10, complete=True)  # numeric order, not string order
    half = _checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    assert json.loads((tmp_path / "checkpoint-10" / COMPLETE_MARKER).read_text()) == {
        "step": 10, "files": ["model.safetensors"], "counters": {}, "stamp": None}
    assert not is_complete(str(half))
    assert latest_complete(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert remove_incomplete(str(tmp_path)) == [str(half)]
    assert not half.exists() and (tmp_path / "checkpoint-2").exists()


def test_latest_resumes_the_newest_complete_and_trims_the_metrics(tmp_path):
    _checkpoint(tmp_path, 4, complete=True)
    _checkpoint(tmp_path, 6, complete=False)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 5)))
    for resume in ("latest", "true", True):
        assert resolve_resume(str(tmp_path), resume, False, "remove", True) == str(tmp_path / "checkpoint-4")
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [2, 4]
    assert not (tmp_path / "checkpoint-6").exists()


def test_latest_without_any_checkpoint_starts_fresh(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    assert resolve_resume(str(tmp_path), "latest", False, "remove", True) is None
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_an_incomplete_checkpoint_path_is_refused(tmp_path):
    half = _checkpoint(tmp_path, 6, complete=False)
    with pytest.raises(OrpoError, match=r"checkpoint-6 is incomplete \(its save was interrupted.*latest"):
        resolve_resume(str(tmp_path), str(half), False, "remove", True)
    with pytest.raises(OrpoError, match=r"nope: no such checkpoint directory"):
        resolve_resume(str(tmp_path), str(tmp_path / "nope"), False, "remove", True)


def test_an_output_dir_with_files_is_not_overwritten_without_the_flag(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(OrpoError, match=r"already has files \(metrics.jsonl\); pass --overwrite_output_dir"):
        resolve_resume(str(tmp_path), None, False, "remove", True)
    assert resolve_resume(str(tmp_path / "new"), None, False, "remove", True) is None


def test_overwriting_removes_the_previous_run_so_it_is_never_resumed_or_continued(tmp_path):
    """The old run's checkpoints and logs go when the new run starts: a later --resume_from_checkpoint latest
    finds no checkpoint of it, and the new run's metrics.jsonl does not continue the old one's."""
    _checkpoint(tmp_path, 4, complete=True)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 9.0}) + "\n")
    (tmp_path / "runs").mkdir()
    assert resolve_resume(str(tmp_path), None, True, "remove", True) is None
    assert list(tmp_path.iterdir()) == []
    assert resolve_resume(str(tmp_path), "latest", False, "remove", True) is None  # nothing of it to resume


def test_the_previous_run_can_be_moved_aside_instead(tmp_path):
    run = tmp_path / "out"
    _checkpoint(run, 4, complete=True)
    (tmp_path / "out.previous-1").mkdir()  # taken: the next free number is used
    assert resolve_resume(str(run), None, True, "move", True) is None
    assert run.is_dir() and list(run.iterdir()) == []
    assert (tmp_path / "out.previous-2" / "checkpoint-4" / COMPLETE_MARKER).is_file()


def test_files_no_run_wrote_are_never_removed(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OrpoError, match=r"has files that no orpo run wrote \(notes.txt\); orpo removes only runs it "
                                        r"wrote: choose another output_dir, or --previous_run move"):
        check_output_dir(str(tmp_path), None, True, "remove", -1)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    check_output_dir(str(tmp_path), None, True, "move", -1)  # moving them aside is allowed
    assert holds_run(str(tmp_path)) is False
    _checkpoint(tmp_path, 2, complete=False)
    assert holds_run(str(tmp_path)) is True


def test_a_partial_last_metrics_line_is_dropped_and_counted(tmp_path, caplog):
    """What a kill during a log write leaves: the resume keeps the records up to its step and drops the
    partial line with a warning (it ended with a JSONDecodeError traceback before)."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n" + json.dumps({"step": 4}) + "\n" + '{"step": 5, "lo')
    assert keep_metrics_until(str(metrics), 4) == 1
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == [{"step": 2, "loss": 1.0}, {"step": 4}]
    assert "its last line was partial" in caplog.text
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # a bad line before the last is not a kill's
    with pytest.raises(OrpoError, match=r"metrics.jsonl, line 2: invalid JSON$"):
        keep_metrics_until(str(metrics), 4)


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path):
    stamp = run_stamp({"beta": 0.1, "learning_rate": 1e-6}, "tiny", {"train": ("a.jsonl", "f1")})
    path = _checkpoint(tmp_path, 4, complete=False)
    mark_complete(str(path), 4, stamp=stamp)
    assert check_stamp(str(path), stamp, force=False) == []
    other = run_stamp({"beta": 0.5, "learning_rate": 1e-6}, "other", {"train": ("a.jsonl", "f2")})
    with pytest.raises(OrpoError, match=r"^resume_from_checkpoint: .*checkpoint-4 was made by another run \(beta 0.1 "
                                        r"\(now 0.5\); the model tiny \(now other\); other train data: a.jsonl \(its "
                                        r"content or preparation changed\)\); .* or pass --force_resume"):
        check_stamp(str(path), other, force=False)
    assert check_stamp(str(path), other, force=True) == [
        "beta 0.1 (now 0.5)", "the model tiny (now other)", "other train data: a.jsonl (its content or preparation changed)"]
    before_data = {"settings": stamp["settings"], "model": "tiny"}  # checked before the data is prepared
    assert check_stamp(str(path), before_data, force=False) == []
    assert stamp_differences(stamp, run_stamp(stamp["settings"], "tiny", {"train": ("b.jsonl", "f3")})) == [
        "other train data: a.jsonl (now b.jsonl)"]


def test_a_finished_run_is_not_resumed_by_latest(tmp_path):
    """A rerun of a finished run's command (e.g. a requeued job) must not train into its output
    directory again. A larger max_steps extends it; naming a checkpoint trains on from it, and so does
    a fresh start with overwrite, each removing the marker (a kill after that resumes as usual)."""
    _checkpoint(tmp_path, 4, complete=True)
    mark_finished(str(tmp_path), 5)
    assert finished_step(str(tmp_path)) == 5
    for resume, max_steps in (("latest", 5), (True, -1), ("latest", 3)):
        with pytest.raises(RunFinished, match=r"this run finished at step 5; nothing to resume.*larger --max_steps"):
            resolve_resume(str(tmp_path), resume, False, "remove", True, max_steps)
    # a larger max_steps extends the run: resumed from its newest checkpoint
    assert resolve_resume(str(tmp_path), "latest", False, "remove", True, 9).endswith("checkpoint-4")
    mark_finished(str(tmp_path), 5)
    assert resolve_resume(str(tmp_path), str(tmp_path / "checkpoint-4"), False, "remove", True)
    assert finished_step(str(tmp_path)) is None
    mark_finished(str(tmp_path), 5)
    assert resolve_resume(str(tmp_path), None, True, "remove", True) is None
    assert not (tmp_path / FINISHED_MARKER).exists()


def test_the_config_is_saved_as_json_not_pickled(tmp_path):
    (tmp_path / PICKLED_ARGS).write_bytes(b"a pickle")
    save_config_as_json(str(tmp_path), json.dumps({"beta": 0.25}))
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == {"beta": 0.25}
    assert not (tmp_path / PICKLED_ARGS).exists()
    # with FSDP's sharded checkpoints the directory is written after the config
    save_config_as_json(str(tmp_path / "checkpoint-2"), "{}")
    assert (tmp_path / "checkpoint-2" / CONFIG_FILE).read_text() == "{}"


RUN = r'''
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback
from orpo import ORPOConfig, ORPOTrainer
from orpo.data.render import TokenizedPair
from tiny import VOCAB, chatml_tokenizer, tiny_llama

out, kill, resume, n_pairs = sys.argv[1], sys.argv[2], sys.argv[3] == "resume", int(sys.argv[4])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()
pairs = [TokenizedPair([1] + ids(2 + i % 5), ids(1 + i % 3), ids(1 + (i * 7) % 4), i) for i in range(n_pairs)]
stream = {{}}
if os.environ.get("STREAM_ROWS"):  # --streaming: these rows from a file, shuffled, passes restarting
    words = "the sky is blue green red yes no why what ok good bad a b c".split()
    rows = [{{"prompt": " ".join(words[(i + k) % 17] for k in range(1 + i % 4)), "chosen": words[i % 17] + " good",
             "rejected": words[(i * 5) % 17] + " bad"}} for i in range(int(os.environ["STREAM_ROWS"]))]
    pairs = os.path.join(os.path.dirname(out), "rows.jsonl")
    with open(pairs, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    stream = dict(streaming=True, streaming_shuffle_buffer=4)
args = ORPOConfig(output_dir=out, max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2,
                  logging_steps=1, save_strategy="steps", save_steps=2, save_total_limit=2, report_to="none",
                  disable_tqdm=True, use_cpu=True, seed=0, bf16=False, **stream)
trainer = ORPOTrainer(model=tiny_llama(), args=args, train_dataset=pairs, processing_class=chatml_tokenizer())

class KillAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("KILL_AFTER_STEP", "5")):
            os.kill(os.getpid(), signal.SIGKILL)

if kill == "step":
    trainer.add_callback(KillAfterStep())
if kill == "save":  # die inside checkpoint-6's save: weights written, optimizer state not yet
    original = Trainer._save_optimizer_and_scheduler
    def save_then_die(self, output_dir):
        if self.state.global_step == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)
    Trainer._save_optimizer_and_scheduler = save_then_die
trainer.train(resume_from_checkpoint="latest" if resume else None)
save_file({{k: p.detach().contiguous() for k, p in trainer.model.named_parameters()}}, os.path.join(out, "final.safetensors"))
'''


def _run(tmp_path, out, kill, resume, pairs=16, env=None):
    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=str(TESTS)))
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), **(env or {})}
    return subprocess.run([sys.executable, str(script), str(out), kill, resume, str(pairs)], capture_output=True, text=True,
                          env=env, timeout=300)


def _losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r and "train_runtime" not in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    result = _run(tmp, tmp / "out", "none", "fresh")
    assert result.returncode == 0, result.stderr[-2000:]
    return _losses(tmp / "out"), load_file(str(tmp / "out" / "final.safetensors"))


@pytest.mark.parametrize("kill,incomplete", [("step", None), ("save", "checkpoint-6")])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, kill, incomplete):
    out = tmp_path / "out"
    killed = _run(tmp_path, out, kill, "fresh")
    assert killed.returncode == -signal.SIGKILL
    assert latest_complete(str(out)) == str(out / "checkpoint-4")
    if incomplete:  # the kill really hit the middle of a save
        assert (out / incomplete / "model.safetensors").exists() and not is_complete(str(out / incomplete))
    resumed = _run(tmp_path, out, "none", "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    losses, weights = uninterrupted
    got = _losses(out)
    assert [step for step, _ in got] == list(range(1, 9)) == [step for step, _ in losses]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in losses], abs=1e-6)
    final = load_file(str(out / "final.safetensors"))
    assert final.keys() == weights.keys()
    for name in weights:
        torch.testing.assert_close(final[name], weights[name], rtol=0, atol=1e-6, msg=name)
    # save_total_limit 2 kept the two newest, all complete
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert all(is_complete(str(p)) for p in out.glob("checkpoint-*"))


def test_a_streamed_run_resumes_where_it_was_in_a_later_pass(tmp_path):
    """--streaming over 9 rows (shuffle buffer 4), 2 pairs a step: pass 2 of the file starts inside step 5.
    Killed after step 7, resumed from checkpoint-6 (in pass 2): the Trainer re-reads the 12 pairs it trained
    and the run goes on with the pairs, losses and weights of an uninterrupted one."""
    env = {"STREAM_ROWS": "9", "KILL_AFTER_STEP": "7"}
    whole = _run(tmp_path, tmp_path / "whole", "none", "fresh", env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _run(tmp_path, tmp_path / "out", "step", "fresh", env=env)
    assert killed.returncode == -signal.SIGKILL
    assert latest_complete(str(tmp_path / "out")) == str(tmp_path / "out" / "checkpoint-6")
    resumed = _run(tmp_path, tmp_path / "out", "none", "resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "out")
    assert [step for step, _ in got] == list(range(1, 9)) == [step for step, _ in expected]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], abs=1e-6)
    final, weights = (load_file(str(tmp_path / run / "final.safetensors")) for run in ("out", "whole"))
    for name in weights:
        torch.testing.assert_close(final[name], weights[name], rtol=0, atol=1e-6, msg=name)


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    """A finished run (max_steps 8, mid-epoch: 24 pairs are 12 steps) resumed with "latest" stops with
    RunFinished and changes nothing. Without its finished marker (a kill after the last checkpoint,
    before the run ended), transformers' loop alone would train a 9th step before it checks max_steps;
    orpo loads the last checkpoint and trains nothing."""
    out = tmp_path / "out"
    result = _run(tmp_path, out, "none", "fresh", pairs=24)
    assert result.returncode == 0, result.stderr[-2000:]
    losses, weights = _losses(out), load_file(str(out / "final.safetensors"))
    result = _run(tmp_path, out, "none", "resume", pairs=24)
    assert result.returncode != 0 and "RunFinished" in result.stderr and "finished at step 8" in result.stderr
    (out / FINISHED_MARKER).unlink()
    result = _run(tmp_path, out, "none", "resume", pairs=24)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _losses(out) == losses and [step for step, _ in losses] == list(range(1, 9))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    final = load_file(str(out / "final.safetensors"))
    for name in weights:
        torch.testing.assert_close(final[name], weights[name], rtol=0, atol=0, msg=name)
