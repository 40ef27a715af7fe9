"""A non-finite step under every engine (NonFiniteGuard, orpo/train/callbacks.py): 2 CPU ranks (gloo), a tiny Llama.

RUN makes chosen steps non-finite on rank 1 alone, the hard case: `nan` makes that rank's input embeddings NaN for
the step (its loss and every gradient it computes are NaN), `shard_inf` puts one inf into rank 1's own gradients
after they were reduced and clipped (FSDP2: into its shard, which no other rank holds; DDP: into its copy), just
before the guard looks. `stop` sets on_nonfinite stop for the rest of the run and makes that step NaN as `nan`
does. Each rank records, after every step, the weights it holds (DDP and ZeRO-2: the whole model; FSDP2: its
DTensor shards; ZeRO-3: its partitions) and the guard's count, and on the stop the error's text.

One launch checks, per rank: a skipped step leaves the weights as they were before it, the next step trains
(finite weights, so the optimizer state was not touched by NaNs either), `nonfinite_skipped` counts each skipped
step once, the warning is logged once for the job, and `on_nonfinite stop` ends every rank with the same one-line
error naming the step and the rows of all ranks. The slow variants compare the weights with a run that never had
the skipped steps (constant learning rate: that run's schedule is the same).
"""
import json

import pytest
import torch
from test_trainer_distributed import _environment, _start, fsdp_args, torchrun, zero_config
from tiny import tiny_llama

RUN = r'''
import json, os, sys
import torch
import transformers
from orpo import ORPOConfig, ORPOTrainer
from orpo.data.render import TokenizedPair
from orpo.errors import OrpoError
from cpu_fsdp import fsdp_on_cpu
from tiny import VOCAB, chatml_tokenizer, tiny_llama

out, spec = sys.argv[1], json.loads(sys.argv[2])
events = {int(step): event for step, event in spec.get("events", {}).items()}
torch.set_num_threads(1)
fsdp_on_cpu()
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()
pairs = [TokenizedPair([1] + ids(2 + i % 5), ids(1 + i % 3), ids(1 + (i * 7) % 4), i) for i in range(20)]
pairs = [pairs[i] for i in spec["rows"]]
args = ORPOConfig(output_dir=out, max_steps=spec["steps"], per_device_train_batch_size=2, learning_rate=1e-2,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                  seed=0, report=False, bf16=False, train_sampling_strategy="sequential", **spec.get("args", {}))
rank = args.process_index


class Inject(transformers.TrainerCallback):
    """Given to the constructor, so it runs before the guard, which ORPOTrainer adds after it."""

    def on_step_begin(self, args, state, control, **kwargs):
        if events.get(state.global_step + 1) == "stop":
            args.on_nonfinite = "stop"

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if events.get(state.global_step + 1) == "shard_inf" and rank == 1:
            grad = next(p.grad for p in model.parameters() if p.grad is not None)
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("inf")


trainer = ORPOTrainer(model=tiny_llama(), args=args, train_dataset=pairs, processing_class=chatml_tokenizer(),
                      callbacks=[Inject()])


def poison(module, inputs, output):
    if module.training and rank == 1 and events.get(trainer.state.global_step + 1) in ("nan", "stop"):
        return output * float("nan")


trainer.model.get_input_embeddings().register_forward_hook(poison)  # after the route probe


def held(p):
    """What this rank holds of a weight: a ZeRO-3 partition, an FSDP2 shard, or the whole weight."""
    local = p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p
    return local.detach().flatten().float().clone()


record = {"weights": [], "skipped": [], "engine": None, "error": None}


class Record(transformers.TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        record["engine"] = type(trainer.model_wrapped).__name__

    def on_step_end(self, args, state, control, **kwargs):
        record["weights"].append(torch.cat([held(p) for p in trainer.model.parameters()]))
        record["skipped"].append(trainer.nonfinite_skipped)


trainer.add_callback(Record())
try:
    trainer.train()
except OrpoError as error:
    record["error"] = str(error)
torch.save(record, os.path.join(out, f"record-rank{rank}.pt"))
trainer.accelerator.end_training()
'''


def run(tmp_path, name, engine_args, events, steps, rows=range(20), env=None):
    """RUN under torchrun with 2 ranks × 2 pairs per step; both ranks' records."""
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "nonfinite_run.py"
    script.write_text(RUN)
    spec = {"args": engine_args, "events": events, "steps": steps, "rows": list(rows)}
    command = torchrun(2)[0] + [str(script), str(out), json.dumps(spec)]
    # a rank that decided differently from the other would wait in a collective: the timeout ends it
    result = _start([command], _environment(env), tmp_path / f"{name}-launch", timeout=240)
    records = [out / f"record-rank{rank}.pt" for rank in (0, 1)]
    # a gloo rank sometimes aborts at interpreter exit after it wrote everything (test_trainer_distributed.launch)
    assert result.returncode == 0 or (all(r.is_file() for r in records) and "terminate called without" in result.stderr), \
        result.stderr[-3000:]
    return [torch.load(r) for r in records], result.stderr


def rows_of(step):
    """The dataset rows of a step: sequential, 2 ranks × 2 pairs."""
    return list(range(4 * (step - 1), 4 * step))


def assert_guarded(records, log, engine, skipped_steps, stop_step):
    """Every rank: the skipped steps left its weights as they were, the other steps trained them (finite), each
    skip was counted once, the run stopped at `stop_step` with the one line naming it and all its rows."""
    for rank, record in enumerate(records):
        assert record["engine"].startswith(engine), record["engine"]
        weights = record["weights"]
        assert len(weights) == stop_step - 1, (rank, len(weights))  # the stop step never ended
        for step in range(1, stop_step):
            assert torch.isfinite(weights[step - 1]).all(), (rank, step)
            before = weights[step - 2] if step > 1 else None
            if step in skipped_steps:
                assert torch.equal(weights[step - 1], before), f"rank {rank}: skipped step {step} changed weights"
            elif before is not None:
                assert not torch.equal(weights[step - 1], before), f"rank {rank}: step {step} trained nothing"
        assert record["skipped"] == [sum(s <= step for s in skipped_steps) for step in range(1, stop_step)], rank
        assert record["error"] == (f"step {stop_step}: non-finite loss or gradient; dataset rows {rows_of(stop_step)} "
                                   "(--on_nonfinite skip skips such steps)"), (rank, record["error"])
    for step in skipped_steps:  # logged by the main process alone
        assert log.count(f"step {step}: non-finite loss or gradient; dataset rows {rows_of(step)}: "
                         "optimizer step skipped") == 1, log[-3000:]


def assert_same_as_without(tmp_path, records, engine_args, applied_steps, env=None):
    """A run over only the applied steps' rows ends, on every rank, with the weights the guarded run had after its
    last applied step: the skipped steps left no trace (weights, optimizer state, schedule)."""
    rows = [row for step in applied_steps for row in rows_of(step)]
    reference, _ = run(tmp_path, "without", engine_args, {}, len(applied_steps), rows, env)
    for rank, (record, expected) in enumerate(zip(records, reference)):
        got, want = record["weights"][applied_steps[-1] - 1], expected["weights"][-1]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"rank {rank}: {m}")


FSDP_EVENTS = {"2": "nan", "3": "shard_inf", "5": "stop"}  # step 4 trains after two skipped steps


def test_fsdp2_skips_a_step_one_rank_made_nonfinite_and_stops_on_every_rank(tmp_path):
    """FSDP2 (the --fsdp_config of docs/distributed.md): step 2's loss is NaN on rank 1 only; at step 3 one element of
    rank 1's gradient shard is inf, which rank 0 never holds: the verdict is all-reduced, so both ranks skip both."""
    records, log = run(tmp_path, "fsdp", fsdp_args(), FSDP_EVENTS, steps=6)
    assert_guarded(records, log, "FSDP", skipped_steps=(2, 3), stop_step=5)
    assert records[0]["weights"][0].numel() < sum(p.numel() for p in tiny_llama().parameters())  # a shard, not the model


@pytest.mark.slow
def test_fsdp2_skipped_steps_leave_no_trace(tmp_path):
    records, _ = run(tmp_path, "fsdp", fsdp_args(), FSDP_EVENTS, steps=6)
    assert_same_as_without(tmp_path, records, fsdp_args(), applied_steps=(1, 4))


@pytest.mark.slow
def test_ddp_skips_a_step_one_rank_made_nonfinite_and_stops_on_every_rank(tmp_path):
    """DDP: gradients are all-reduced before the guard, so a NaN loss on one rank reaches both; an inf put into rank
    1's copy after the all-reduce reaches rank 0 only through the guard's own all-reduced verdict."""
    records, log = run(tmp_path, "ddp", {}, FSDP_EVENTS, steps=6)
    assert_guarded(records, log, "DistributedDataParallel", skipped_steps=(2, 3), stop_step=5)
    assert_same_as_without(tmp_path, records, {}, applied_steps=(1, 4))


ZERO_EVENTS = {"2": "nan", "4": "stop"}  # DeepSpeed's gradients are its own: no shard_inf


def test_deepspeed_zero3_skips_a_step_one_rank_made_nonfinite_and_stops_on_every_rank(tmp_path, deepspeed_environment):
    """ZeRO-3: the engine steps inside the last backward; DeepSpeed's own check skips the step (its all-reduced
    gradient norm is NaN) and the guard reads that verdict (engine.was_step_applied) to count it or stop."""
    records, log = run(tmp_path, "zero3", {"deepspeed": zero_config(3)}, ZERO_EVENTS, steps=5, env=deepspeed_environment)
    assert_guarded(records, log, "DeepSpeedEngine", skipped_steps=(2,), stop_step=4)
    assert records[0]["weights"][0].numel() < sum(p.numel() for p in tiny_llama().parameters())  # a partition


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_skipped_step_leaves_no_trace(tmp_path, deepspeed_environment, stage):
    """ZeRO-2 and -3 (DeepSpeed's skip), and stage 0 in fp32, where DeepSpeed steps a plain torch optimizer
    unchecked and the guard's step pre-hook on it drops the gradients."""
    engine_args = {"deepspeed": zero_config(stage)}
    records, log = run(tmp_path, f"zero{stage}", engine_args, ZERO_EVENTS, steps=5, env=deepspeed_environment)
    assert_guarded(records, log, "DeepSpeedEngine", skipped_steps=(2,), stop_step=4)
    assert_same_as_without(tmp_path, records, engine_args, applied_steps=(1, 3), env=deepspeed_environment)

