"""trainer.py: the whole-step loss against a naive per-example reference from the paper, gradient
accumulation exactness, metrics, and TRL-compatible usage.

Naive reference (Hong et al. 2024, Eqs. 2-7), one unpadded sequence at a time, float64 on top of
the model's fp32 log-softmax:
    ℓ = mean completion log-prob; odds = e^ℓ / (1 − e^ℓ)
    L_OR = −log σ(log odds_w − log odds_l), averaged over pairs
    L_SFT = Σ NLL over the scope's tokens / their count (scope "full": prompt tokens 1.. + chosen)
    L = L_SFT + β · L_OR
"""
import json

import pytest
import torch
import transformers

from orpo.errors import OrpoError
from orpo.ops.packing import collate_padded
from orpo.data.render import TokenizedPair
from orpo.train.config import ORPOConfig
from orpo.train.report import METRICS_FILE
from orpo.run.trainer import ORPOTrainer
from tiny import VOCAB, OpCounter, chatml_tokenizer, tiny_llama

def pairs(n=8, seed=0, high=VOCAB):
    rng = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, high, (k,), generator=rng).tolist()  # noqa: E731
    lengths = [(5, 1, 7), (2, 6, 1), (9, 3, 3), (4, 2, 8), (3, 5, 2), (6, 1, 1), (1, 4, 4), (7, 2, 5)]
    return [TokenizedPair([1] + ids(p), ids(c), ids(r), i) for i, (p, c, r) in enumerate(lengths[:n])]


def naive_orpo_loss(model, batch_pairs, beta, nll_scope):
    """The paper's equations, per example, float64 odds."""
    nll_sum, nll_count, or_terms = 0.0, 0, []
    for pair in batch_pairs:
        ell = {}
        for name, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            seq = torch.tensor([pair.prompt_ids + completion])
            logp = model(input_ids=seq).logits.float().log_softmax(-1)[0, :-1].gather(1, seq[0, 1:, None])[:, 0]
            p = len(pair.prompt_ids)
            ell[name] = logp[p - 1 :].double().mean()
            if name == "chosen":
                scoped = logp if nll_scope == "full" else logp[p - 1 :]
                nll_sum = nll_sum - scoped.double().sum()
                nll_count += len(scoped)
        odds = {k: torch.exp(v) / (1 - torch.exp(v)) for k, v in ell.items()}
        or_terms.append(-torch.nn.functional.logsigmoid(torch.log(odds["chosen"]) - torch.log(odds["rejected"])))
    return nll_sum / nll_count + beta * torch.stack(or_terms).mean()


def make_trainer(tmp_path, model, train, **overrides):
    args = dict(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True,
                use_cpu=True, dataloader_pin_memory=False, seed=0, bf16=False)  # fp32: exact comparisons
    args.update(overrides)
    return ORPOTrainer(model=model, args=ORPOConfig(**args), train_dataset=train, processing_class=chatml_tokenizer())


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


LAYOUTS = {
    "spans": dict(packing=True, packed_attention="spans"),
    "mask": dict(packing=True, packed_attention="mask"),
    "padded": dict(packing=False),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nll_scope", ["full", "completion"])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_compute_loss_matches_naive_reference_fp32(tmp_path, nll_scope, beta, layout):
    data = pairs()
    trainer = make_trainer(tmp_path, tiny_llama(), data, beta=beta, nll_scope=nll_scope, **LAYOUTS[layout])
    model = trainer.model.train()
    batch = trainer.data_collator(data)
    assert ("pair_spans" in batch, "attention_mask" in batch) == {
        "spans": (True, False), "mask": (True, True), "padded": (False, True)}[layout]
    totals = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=totals)
    loss.backward()
    fast_grads = grads(model)
    model.zero_grad()
    reference = naive_orpo_loss(model, data, beta, nll_scope)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(fast_grads, grads(model), atol=1e-5, rtol=1e-4)


def test_compute_loss_matches_naive_reference_bf16(tmp_path):
    """bf16 weights and activations: the loss is within bf16 resolution of the fp32 reference."""
    data = pairs()
    reference = naive_orpo_loss(tiny_llama(), data, 0.1, "full").item()
    trainer = make_trainer(tmp_path, tiny_llama(dtype=torch.bfloat16), data)
    batch = collate_padded(data, pad_token_id=0)
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=trainer._get_num_items_in_batch([batch], "cpu"))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference, rel=2e-2)


def test_beta_zero_is_plain_nll(tmp_path):
    data = pairs()
    trainer = make_trainer(tmp_path, tiny_llama(), data, beta=0.0, nll_scope="completion")
    batch = collate_padded(data, pad_token_id=0)
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=trainer._get_num_items_in_batch([batch], "cpu"))
    nll = [tok for p in data for tok in p.chosen_ids]
    with torch.no_grad():
        reference = naive_orpo_loss(trainer.model, data, 0.0, "completion")
    assert len(nll) == int(trainer._get_num_items_in_batch([batch], "cpu")[0])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def _train(tmp_path, name, batch, accumulation, **overrides):
    trainer = make_trainer(
        tmp_path / name, tiny_llama(), pairs(), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=1e-2, logging_steps=1,
        lr_scheduler_type="constant", optim="sgd",  # Adam would amplify float summation-order noise in ~0 grads
        **{"activation_checkpointing": True, **overrides},  # the recomputed forward must see the same layout
    )
    assert trainer.args.gradient_checkpointing
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return losses, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_micro_batch_split_gives_same_step(tmp_path):
    """One step of 4 pairs == 2 micro-batches of 2 == 4 of 1: same losses and final weights."""
    losses_whole, weights_whole = _train(tmp_path, "whole", 4, 1)
    for batch, accumulation in ((2, 2), (1, 4)):
        losses, weights = _train(tmp_path, f"split{batch}", batch, accumulation)
        assert losses == pytest.approx(losses_whole, rel=1e-5)
        torch.testing.assert_close(weights, weights_whole, atol=1e-6, rtol=1e-5)


def test_metrics_are_logged_and_written_as_jsonl(tmp_path, capsys):
    data = pairs()
    trainer = make_trainer(tmp_path, tiny_llama(), data, per_device_train_batch_size=4, max_steps=2,
                           logging_steps=1, learning_rate=1e-3)
    trainer.eval_dataset = data[:4]
    trainer.train()
    metrics = trainer.evaluate()
    printed = capsys.readouterr().out.splitlines()  # not a terminal: one plain line per log, no bar
    assert [line.split("  ")[0] for line in printed] == ["step 1/2", "step 2/2", "eval step 2"], printed
    assert "log_odds" in printed[0] and "eta" in printed[0] and "\r" not in "".join(printed)
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert (tmp_path / "report.html").is_file() and (tmp_path / "logps.png").is_file()  # written at the end
    train_records = [r for r in records if "nll" in r]
    assert len(train_records) == 2
    for key in ("loss", "nll", "or_loss", "log_odds", "logps/chosen", "logps/rejected", "accuracy", "margin",
                "tokens", "tokens_per_second", "grad_norm", "learning_rate"):
        assert key in train_records[0], key
    first = train_records[0]
    assert first["loss"] == pytest.approx(first["nll"] + 0.1 * first["or_loss"], rel=1e-5)
    assert first["margin"] == pytest.approx(first["logps/chosen"] - first["logps/rejected"], rel=1e-5)
    assert 0.0 <= first["accuracy"] <= 1.0
    # tokens: the non-pad tokens of both rows of the 4 pairs of step 1
    assert first["tokens"] > 0
    for key in ("eval_loss", "eval_nll", "eval_or_loss", "eval_log_odds", "eval_accuracy"):
        assert key in metrics, key
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_nll"] + 0.1 * metrics["eval_or_loss"], rel=1e-5)


def test_layouts_train_the_same_weights(tmp_path):
    """Span attention, the dense mask and padded rows: same losses and weights after 2 steps
    (with gradient checkpointing, so the recomputed forward uses the layout too)."""
    losses_spans, weights_spans = _train(tmp_path, "spans", 4, 1)
    for layout in ("mask", "padded"):
        losses, weights = _train(tmp_path, layout, 4, 1, **LAYOUTS[layout])
        assert losses == pytest.approx(losses_spans, rel=1e-5)
        torch.testing.assert_close(weights, weights_spans, atol=1e-6, rtol=1e-5)


def test_packed_attention_spans_switches_the_model_and_mask_leaves_it(tmp_path):
    spans = make_trainer(tmp_path / "a", tiny_llama(), pairs())
    assert spans.model.config._attn_implementation == "orpo_span_sdpa"
    mask = make_trainer(tmp_path / "b", tiny_llama(), pairs(), packed_attention="mask")
    assert mask.model.config._attn_implementation == "sdpa"
    with pytest.raises(OrpoError, match="^--packed_attention 'flex': accepted: spans, mask$"):
        ORPOConfig(output_dir=str(tmp_path), packed_attention="flex")


POISON = VOCAB - 1  # a token id the embedding hook below turns into NaN


def _poisoned_trainer(tmp_path, on_nonfinite):
    """8 pairs, 2 per step, SGD; pair 5 (step 3 in file order, no shuffling) contains POISON, whose
    embedding the hook makes NaN: that step's loss and gradients are NaN."""
    data = pairs(high=POISON)
    data[5] = TokenizedPair(data[5].prompt_ids, data[5].chosen_ids + [POISON], data[5].rejected_ids, 5)
    model = tiny_llama()

    def poison(module, args, output):
        return output.masked_fill((args[0] == POISON)[..., None], float("nan"))

    trainer = make_trainer(tmp_path, model, data, per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                           optim="sgd", logging_steps=1, on_nonfinite=on_nonfinite, train_sampling_strategy="sequential")
    model.get_input_embeddings().register_forward_hook(poison)  # after the route probe, which draws random ids
    weights = []

    class RecordWeights(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            weights.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))

    trainer.add_callback(RecordWeights())
    return trainer, weights


def test_nonfinite_step_is_skipped_counted_and_never_applied(tmp_path, caplog):
    trainer, weights = _poisoned_trainer(tmp_path, "skip")
    with caplog.at_level("WARNING", logger="orpo.run.trainer"):
        trainer.train()
    assert len(weights) == 4 and all(torch.isfinite(w).all() for w in weights)
    assert torch.equal(weights[2], weights[1])  # step 3 (pairs 4 and 5) changed nothing
    assert not torch.equal(weights[3], weights[2]) and not torch.equal(weights[1], weights[0])
    assert "step 3: non-finite loss or gradient; dataset rows [4, 5]: optimizer step skipped" in caplog.text
    skipped = [r.get("nonfinite_skipped", 0) for r in trainer.state.log_history if "loss" in r]
    assert skipped == [0, 0, 1, 1]


def test_nonfinite_step_stops_with_the_step_and_rows(tmp_path):
    trainer, weights = _poisoned_trainer(tmp_path, "stop")
    with pytest.raises(OrpoError, match=r"^step 3: non-finite loss or gradient; dataset rows \[4, 5\] \(--on_nonfinite skip"):
        trainer.train()
    assert len(weights) == 2


def test_named_eval_sets_get_their_own_prefix_and_pair_files(tmp_path):
    data = pairs()
    args = ORPOConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True, bf16=False,
                      per_device_train_batch_size=4, max_steps=1, save_eval_pairs=True)
    trainer = ORPOTrainer(model=tiny_llama(), args=args, train_dataset=data,
                          eval_dataset={"easy": data[:3], "hard": data[3:8]}, processing_class=chatml_tokenizer())
    metrics = trainer.evaluate()
    assert metrics["eval_easy_pairs"] == 3 and metrics["eval_hard_pairs"] == 5
    for name, expected in (("easy", data[:3]), ("hard", data[3:8])):
        for key in ("loss", "nll", "or_loss", "log_odds", "logps/chosen", "logps/rejected", "accuracy", "margin"):
            assert f"eval_{name}_{key}" in metrics, (name, key)
        lines = [json.loads(line) for line in (tmp_path / f"eval_{name}_pairs.jsonl").read_text().splitlines()]
        assert [r["index"] for r in lines[:-1]] == [p.index for p in expected]
        summary = lines[-1]["summary"]
        assert summary["accuracy"] == metrics[f"eval_{name}_accuracy"]
        # eval_loss is exact over the set's pairs: nll (a token mean) + beta · or_loss (a pair mean)
        assert metrics[f"eval_{name}_loss"] == pytest.approx(summary["nll"] + 0.1 * summary["or_loss"])
    # a dataset passed to evaluate() goes through the data path like the constructor's
    rows = [{"prompt": "what is the sky", "chosen": "blue", "rejected": "green"}]
    assert trainer.evaluate(eval_dataset=rows, metric_key_prefix="test")["test_pairs"] == 1


def _train_with_evaluation(tmp_path, name, evaluate_at_step):
    """2 steps, one log at step 2; a callback calls evaluate(metric_key_prefix="test") after step 1."""
    data = pairs()
    trainer = make_trainer(tmp_path / name, tiny_llama(), data, per_device_train_batch_size=4, max_steps=2,
                           logging_steps=2, learning_rate=1e-3)

    class EvaluateMidway(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == evaluate_at_step:
                trainer.evaluate(eval_dataset=data[:2], metric_key_prefix="test")

    trainer.add_callback(EvaluateMidway())
    trainer.train()
    return [r for r in trainer.state.log_history if "nll" in r]


def test_an_evaluation_never_resets_the_training_totals(tmp_path):
    """The step-2 record averages steps 1 and 2 whether or not an evaluation ran between them."""
    plain = _train_with_evaluation(tmp_path, "plain", evaluate_at_step=None)
    interrupted = _train_with_evaluation(tmp_path, "interrupted", evaluate_at_step=1)
    assert [r["step"] for r in interrupted] == [2]
    for key in ("loss", "nll", "or_loss", "log_odds", "accuracy", "tokens"):
        assert interrupted[0][key] == pytest.approx(plain[0][key], rel=1e-6), key


def test_the_final_summary_holds_no_partial_window(tmp_path):
    """3 steps logged every 2: steps 1–2 in the step-2 record, step 3 in a record of its own, and the
    end-of-training summary (train_runtime, train_loss) carries no step metrics."""
    data = pairs()
    trainer = make_trainer(tmp_path, tiny_llama(), data, per_device_train_batch_size=2, max_steps=3,
                           logging_steps=2, learning_rate=1e-3, train_sampling_strategy="sequential")
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    steps = [r for r in records if "nll" in r]
    summary = [r for r in records if "train_runtime" in r]
    assert [r["step"] for r in steps] == [2, 3] and len(summary) == 1
    assert "nll" not in summary[0] and "accuracy" not in summary[0]
    # pairs 0–3 (steps 1–2) and 4–5 (step 3), each counted once (packed: tokens = shared lengths)
    assert steps[0]["tokens"] == sum(p.shared_length for p in data[:4])
    assert steps[1]["tokens"] == sum(p.shared_length for p in data[4:6])


def test_nonfinite_skipped_survives_resume(tmp_path):
    trainer, _ = _poisoned_trainer(tmp_path, "skip")
    trainer.args.max_steps, trainer.args.save_strategy, trainer.args.save_steps = 3, "steps", 3
    trainer.train()
    assert trainer.nonfinite_skipped == 1
    resumed, _ = _poisoned_trainer(tmp_path, "skip")
    resumed.train(resume_from_checkpoint=True)
    after = [r for r in resumed.state.log_history if "nll" in r and r["step"] == 4]
    assert after and after[0]["nonfinite_skipped"] == 1


def test_activation_checkpointing_unset_is_chosen_for_the_data_and_the_memory(tmp_path, caplog):
    """Unset, the plan decides (train/memory.py) and the log says why; a budget below what a step needs
    turns it on, and the Trainer applies it; set, either name decides and the plan says so."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the default itself must not warn
        assert ORPOConfig(output_dir=str(tmp_path)).chooses_checkpointing is True
    with caplog.at_level("INFO", logger="orpo.run.trainer"):
        roomy = make_trainer(tmp_path, tiny_llama(), pairs())
    assert roomy.args.activation_checkpointing is False and roomy.args.gradient_checkpointing is False
    assert "activation checkpointing: off: a step of the largest micro-batch" in caplog.text
    tight = make_trainer(tmp_path, tiny_llama(), pairs(), memory_budget_gb=1e-6)
    assert tight.args.activation_checkpointing is True
    reason = tight.plan.choice("activation checkpointing").reason
    assert reason.startswith("on, every layer, full recompute:") and "over the budget of 0.0 GB" in reason
    tight.train()
    assert tight.model.is_activation_checkpointing  # the Trainer applied the choice

    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        off = ORPOConfig(output_dir=str(tmp_path), gradient_checkpointing=False)
    assert off.activation_checkpointing is False and off.gradient_checkpointing is False
    assert not off.chooses_checkpointing
    on = make_trainer(tmp_path, tiny_llama(), pairs(), activation_checkpointing=True)
    assert on.args.activation_checkpointing is True
    assert on.plan.choice("activation checkpointing").reason == "on, full recompute (as set)"
    assert ORPOConfig(output_dir=str(tmp_path), activation_checkpointing=False).gradient_checkpointing is False


def test_selective_checkpointing_is_what_the_trainer_applies(tmp_path, caplog):
    """Forced (--selective_checkpointing with a budget nothing fits) the plan is selective recompute of every
    layer, and a training step runs the matmuls of a step without recompute (full recompute runs more) and
    trains the same weights bit for bit."""
    def one_step(**overrides):  # the head's softmax recomputed in all three (kept only without recompute)
        trainer = make_trainer(tmp_path / str(len(overrides)) / str(overrides.get("activation_checkpointing")),
                               tiny_llama(), pairs(), max_steps=1, keep_head_probs=False, **overrides)
        with OpCounter() as counter:
            trainer.train()
        return trainer, counter.matmuls(), torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

    with caplog.at_level("INFO", logger="orpo.run.trainer"):
        selective, matmuls, weights = one_step(selective_checkpointing=True, memory_budget_gb=1e-6)
    assert selective.args.activation_checkpointing and selective.args.selective_checkpointing
    assert "activation checkpointing: on, every layer, selective (matmul and attention outputs kept" in caplog.text
    _, matmuls_none, weights_none = one_step(activation_checkpointing=False)
    full, matmuls_full, weights_full = one_step(activation_checkpointing=True)
    assert not full.args.selective_checkpointing  # set by hand: full recompute unless asked
    assert matmuls == matmuls_none < matmuls_full
    assert torch.equal(weights, weights_none) and torch.equal(weights_full, weights_none)


def test_streamed_data_is_sized_by_the_longest_pair_its_limits_let_through(tmp_path, monkeypatch):
    """A stream has no lengths ahead: the memory planner gets per_device_train_batch_size pairs of
    render.longest_pair (max_length 64: 1 + 63 + 63 tokens each); without max_length it recomputes."""
    import orpo.run.plan as plan_module

    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "what", "chosen": "good", "rejected": "bad"}) + "\n")
    seen = []
    real = plan_module.plan_checkpointing
    monkeypatch.setattr(plan_module, "plan_checkpointing", lambda shape, lengths, *a: seen.append(lengths) or real(shape, lengths, *a))
    streamed = make_trainer(tmp_path, tiny_llama(), str(data), streaming=True, max_steps=1, max_length=64,
                            per_device_train_batch_size=3)
    assert seen == [[(1, 63, 63)] * 3]
    assert streamed.plan.choice("activation checkpointing").reason.startswith("off:")
    unbounded = make_trainer(tmp_path, tiny_llama(), str(data), streaming=True, max_steps=1, max_length=None)
    assert unbounded.plan.choice("activation checkpointing").reason == (
        "on: streamed data without max_length to size it by; --activation_checkpointing false turns it off")
    assert len(seen) == 1


def test_memory_budget_must_be_positive(tmp_path):
    with pytest.raises(OrpoError, match=r"^--memory_budget_gb 0: out of range; accepted: a finite number > 0 or unset$"):
        ORPOConfig(output_dir=str(tmp_path), memory_budget_gb=0)


def _tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    return [(e.step, e.value) for e in events.Scalars(f"train/{tag}")]


def _mlflow_scalars(run_dir, tag):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, tag), key=lambda m: m.step)]


def _spy_on_wandb_log(monkeypatch, run_dir):
    """wandb 0.31 keeps an offline run in a binary file only its server reads back, so record what the
    Trainer's WandbCallback hands to the run's log (which still writes the offline run) in wandb-log.jsonl."""
    from wandb.sdk.wandb_run import Run

    log = Run.log

    def recording_log(run, data, *args, **kwargs):
        with open(run_dir / "wandb-log.jsonl", "a") as f:
            f.write(json.dumps(data) + "\n")
        return log(run, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", recording_log)  # wandb.init binds wandb.log to the run's log


def _wandb_scalars(run_dir, tag):
    logs = [json.loads(line) for line in (run_dir / "wandb-log.jsonl").read_text().splitlines()]
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # the offline run was written
    return [(log["train/global_step"], log[f"train/{tag}"]) for log in logs if f"train/{tag}" in log]


def _trackio_scalars(run_dir, tag):
    from trackio.sqlite_storage import SQLiteStorage

    (run,) = SQLiteStorage.get_runs("orpo-test")
    return [(log["train/global_step"], log[f"train/{tag}"]) for log in SQLiteStorage.get_logs("orpo-test", run)
            if f"train/{tag}" in log]


INTEGRATIONS = {  # report_to name: (environment that keeps it offline and in tmp_path, reader)
    "tensorboard": ({"TENSORBOARD_LOGGING_DIR": "{run_dir}/tb"}, _tensorboard_scalars),
    "mlflow": ({"MLFLOW_TRACKING_URI": "sqlite:///{run_dir}/mlflow.db"}, _mlflow_scalars),
    "wandb": ({"WANDB_MODE": "offline", "WANDB_DIR": "{run_dir}", "WANDB_SILENT": "true"}, _wandb_scalars),
    "trackio": ({"TRACKIO_DIR": "{run_dir}/trackio"}, _trackio_scalars),
}


@pytest.mark.parametrize("backend", list(INTEGRATIONS))
def test_report_to_integrations_get_the_orpo_metrics_offline(tmp_path, monkeypatch, backend):
    """report_to goes through the Trainer's callbacks: each backend records orpo's metrics with the values of
    metrics.jsonl. tensorboard is a test dependency; the others run where installed (pip install wandb ...)."""
    environment, read = INTEGRATIONS[backend]
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(run_dir=tmp_path))
    pytest.importorskip(backend)  # after the environment: trackio reads TRACKIO_DIR when imported
    if backend == "wandb":
        _spy_on_wandb_log(monkeypatch, tmp_path)
    trainer = make_trainer(tmp_path, tiny_llama(), pairs(), per_device_train_batch_size=4, max_steps=3,
                           logging_steps=1, learning_rate=1e-3, report_to=[backend],
                           project="orpo-test", report=False)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    for tag in ("loss", "nll", "or_loss", "log_odds", "logps/chosen", "logps/rejected", "accuracy"):
        expected = [(r["step"], r[tag]) for r in records if tag in r]
        logged = read(tmp_path, tag)
        assert [step for step, _ in logged] == [step for step, _ in expected], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), tag


def test_saves_hold_the_config_as_json_and_no_pickle(tmp_path):
    """No training_args.bin (a pickle) in checkpoints or the output directory: the config is JSON, and
    every other state file loads with torch.load(weights_only=True) (the RNG state holds numpy arrays:
    with transformers' allowlist of numpy's array types, as transformers loads it)."""
    from transformers.trainer_pt_utils import safe_globals

    trainer = make_trainer(tmp_path, tiny_llama(), pairs(4), per_device_train_batch_size=2, max_steps=2,
                           save_strategy="steps", save_steps=1, beta=0.25)
    trainer.train()
    trainer.save_model()
    assert not list(tmp_path.rglob("training_args.bin"))
    for directory in (tmp_path, tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"):
        assert json.loads((directory / "orpo_config.json").read_text())["beta"] == 0.25
    state_files = [f for f in tmp_path.rglob("*") if f.suffix in (".pt", ".pth", ".bin")]
    assert {f.name for f in state_files} == {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    with safe_globals():
        for f in state_files:
            torch.load(f, weights_only=True)


def test_train_loss_is_the_mean_of_the_step_losses(tmp_path):
    """The summary's train_loss (and TrainOutput.training_loss) is the mean of the run's step losses.
    orpo computes it from its own sum over every step of every rank (transformers adds the steps since
    the last log from rank 0 alone; the two-rank test checks the ranks)."""
    trainer = make_trainer(tmp_path, tiny_llama(), pairs(8), per_device_train_batch_size=1, max_steps=5,
                           logging_steps=1, learning_rate=1e-2)
    output = trainer.train()
    steps = [r["loss"] for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]
    summary = [r for r in trainer.state.log_history if "train_loss" in r][0]
    assert len(steps) == 5
    assert summary["train_loss"] == pytest.approx(sum(steps) / 5, rel=1e-5)
    assert output.training_loss == summary["train_loss"]


def test_lora_on_the_output_head_trains_its_adapter(tmp_path):
    """LoRA with lm_head among the targets (untied head): after two steps the head's lora_B, which
    starts at zero, has moved (the chunked head computes the adapter's term and its gradient)."""
    import peft

    model = tiny_llama()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    trainer = ORPOTrainer(
        model=model, args=ORPOConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True,
                                     disable_tqdm=True, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2),
        train_dataset=pairs(4), processing_class=chatml_tokenizer(),
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
    )
    head_b = [p for n, p in trainer.model.named_parameters() if "lm_head.lora_B" in n]
    assert len(head_b) == 1 and head_b[0].abs().max() == 0
    trainer.train()
    assert head_b[0].abs().max() > 1e-4


def tiny_mixtral(coef=0.5):
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=coef, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def separate_router_aux_loss(model, batch_pairs):
    """The Switch load-balancing loss (E · Σ_e f_e · P_e over all layers' counted tokens) with each
    token once: router logits of prompt + chosen from a separate forward of [prompt + chosen], and of
    the rejected tokens from a separate forward of [prompt + rejected]."""
    per_layer = None
    for pair in batch_pairs:
        p = len(pair.prompt_ids)
        chosen = model(input_ids=torch.tensor([pair.prompt_ids + pair.chosen_ids])).router_logits
        rejected = model(input_ids=torch.tensor([pair.prompt_ids + pair.rejected_ids])).router_logits
        layers = [torch.cat([c, r[p:]]) for c, r in zip(chosen, rejected)]
        per_layer = layers if per_layer is None else [torch.cat([a, b]) for a, b in zip(per_layer, layers)]
    probs = [layer.float().softmax(-1) for layer in per_layer]
    routed = sum(torch.zeros_like(q).scatter_(1, q.topk(2, -1).indices, 1.0).sum(0) for q in probs)
    n = sum(q.shape[0] for q in probs)
    return 4 * ((routed / n) * (sum(q.sum(0) for q in probs) / n)).sum()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moe_loss_adds_the_router_aux_loss_counting_each_token_once(tmp_path, layout):
    """A tiny Mixtral with output_router_logits and router_aux_loss_coef 0.5: the step's loss is the
    naive ORPO loss + 0.5 · aux_loss, aux_loss computed from separate forwards' router logits with the
    prompt counted once (padding never), on every layout; training logs aux_loss."""
    data = pairs(4)
    trainer = make_trainer(tmp_path, tiny_mixtral(), data, beta=0.1, **LAYOUTS[layout])
    assert trainer.plan.router_balancing.coef == 0.5
    model = trainer.model.train()
    batch = trainer.data_collator(data)
    totals = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert totals[2] == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in data)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=totals)
    with torch.no_grad():
        aux = separate_router_aux_loss(model, data)
        expected = naive_orpo_loss(model, data, 0.1, "full") + 0.5 * aux
    assert aux > 1.0  # k = 2 is its value for perfectly balanced routing; random routers are not
    torch.testing.assert_close(loss.detach().double(), expected.double(), rtol=0, atol=1e-5)


def test_moe_training_logs_aux_loss_and_its_loss_includes_it(tmp_path):
    trainer = make_trainer(tmp_path, tiny_mixtral(), pairs(4), beta=0.1, per_device_train_batch_size=4,
                           max_steps=1, logging_steps=1, learning_rate=0.0)
    trainer.train()
    log = next(r for r in trainer.state.log_history if "loss" in r and "aux_loss" in r)
    assert log["loss"] == pytest.approx(log["nll"] + 0.1 * log["or_loss"] + 0.5 * log["aux_loss"], rel=1e-4)


def test_reuse_cpu_memory_keeps_freed_memory_on_the_cpu_only_when_asked(tmp_path, monkeypatch):
    """config.reuse_cpu_memory (default true): the plan decides, and training sets malloc up on the CPU
    (train/allocator.py); nothing happens at construction."""
    calls = []
    monkeypatch.setattr("orpo.run.trainer.keep_freed_memory", lambda: calls.append(1) or True)
    on = make_trainer(tmp_path / "on", tiny_llama(), pairs(2), max_steps=1)
    assert calls == [] and on.plan.reuse_cpu_memory
    on.train()
    assert calls == [1]
    off = make_trainer(tmp_path / "off", tiny_llama(), pairs(2), reuse_cpu_memory=False, max_steps=1)
    off.train()
    assert calls == [1] and off.plan.choice("CPU memory allocator").reason == "the system's: --reuse_cpu_memory false"


# --- vision-language models --------------------------------------------------------------------------------

def naive_vision_orpo_loss(model, batch_pairs, beta):
    """naive_orpo_loss for pairs with images: each sequence in a call of its own with its images, the model
    computing its own positions (ops.vision.reference_inputs); nll_scope "full"."""
    from orpo.ops.vision import reference_inputs

    nll_sum, nll_count, or_terms = 0.0, 0, []
    for pair in batch_pairs:
        ell = {}
        for name, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            seq = torch.tensor([pair.prompt_ids + completion])
            logits = model(input_ids=seq, **reference_inputs(model, seq, pair.vision_inputs)).logits
            logp = logits.float().log_softmax(-1)[0, :-1].gather(1, seq[0, 1:, None])[:, 0]
            p = len(pair.prompt_ids)
            ell[name] = logp[p - 1:].double().mean()
            if name == "chosen":
                nll_sum, nll_count = nll_sum - logp.double().sum(), nll_count + len(logp)
        log_odds = {k: v - torch.log1p(-torch.exp(v)) for k, v in ell.items()}
        or_terms.append(-torch.nn.functional.logsigmoid(log_odds["chosen"] - log_odds["rejected"]))
    return nll_sum / nll_count + beta * torch.stack(or_terms).mean()


def trainable_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("family, layout", [("qwen2_vl", layout) for layout in LAYOUTS]
                         + [("gemma3", "mask"), ("gemma3", "padded")])
def test_vision_language_loss_and_gradients_match_separate_forwards(tmp_path, family, layout):
    """Qwen2-VL (M-RoPE) and Gemma 3 (image tokens attending both ways) with images in the prompts: the
    trainer's loss and gradients equal the paper's loss over separate forwards of each sequence with its
    images; the vision tower is frozen (no gradient)."""
    from orpo.ops.vision import vision_tower
    from vision_models import image_pair, tiny_vision_model

    data = [image_pair(family, [(56, 84)], (5, 7, 4), seed=1, index=0),
            image_pair(family, [(28, 28), (56, 42)], (3, 1, 6), seed=2, index=1)]
    trainer = make_trainer(tmp_path, tiny_vision_model(family), data, **LAYOUTS[layout])
    model = trainer.model.train()
    assert not any(p.requires_grad for p in vision_tower(model).parameters())
    batch = trainer.data_collator(data)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=trainer._get_num_items_in_batch([batch], "cpu"))
    loss.backward()
    fast = trainable_grads(model)
    model.zero_grad()
    reference = naive_vision_orpo_loss(model, data, 0.1)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(fast, trainable_grads(model), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("freeze", [True, False])
def test_vision_language_training_freezes_the_vision_tower_unless_told(tmp_path, freeze):
    from vision_models import vision_training_data

    model_dir, data = vision_training_data(tmp_path)
    args = ORPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                      save_strategy="no", report=False, disable_tqdm=True, use_cpu=True, freeze_vision_tower=freeze)
    trainer = ORPOTrainer(model_dir, args=args, train_dataset=data)
    inner = trainer.model.model
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    tower = {f"model.vision_tower.{name}" for name, _ in inner.vision_tower.named_parameters()}
    assert any(name.startswith("model.language_model.") for name in changed)
    assert any(name.startswith("model.multi_modal_projector.") for name in changed)
    assert bool(changed & tower) is not freeze


def test_the_route_is_probed_with_the_datas_image_pairs(tmp_path, monkeypatch):
    """With a layout that gets images wrong (here: one position per token for Qwen2-VL's M-RoPE), every route
    fails the image probe and the run stops in one line instead of training on wrong log-probs."""
    from orpo.ops import forward
    from vision_models import image_pair, tiny_vision_model

    data = [image_pair("qwen2_vl", [(56, 84)], (5, 7, 4), seed=1, index=0)]
    assert make_trainer(tmp_path, tiny_vision_model("qwen2_vl"), data).plan.route.layout == "spans"
    monkeypatch.setattr(forward, "rope_index_of", lambda model: None)  # the collator probes and training use
    with pytest.raises(OrpoError, match="no batch layout reproduces the model's separate forwards"):
        make_trainer(tmp_path, tiny_vision_model("qwen2_vl"), data)


@pytest.mark.parametrize("family", ["llava", "gemma3", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                                    "llava_onevision"])
def test_image_rows_in_both_shapes_train_from_python_on_each_family(tmp_path, family):
    """TRL-shaped rows (training) and LLaMA-Factory-shaped rows (evaluation) → the family's own processor →
    pairs with each image's tokens → a route probed with them → one training step and an evaluation."""
    from vision_models import IMAGE as IMAGE_ID, family_processor, image_rows_files, image_tokens, tiny_vision_model

    trl, llamafactory = image_rows_files(tmp_path)
    args = ORPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                      save_strategy="no", report=False, disable_tqdm=True, use_cpu=True, per_device_eval_batch_size=2)
    trainer = ORPOTrainer(tiny_vision_model(family), args=args, train_dataset=trl, eval_dataset=llamafactory,
                          processing_class=family_processor(family))
    train, held_out = trainer.prepared["train"], trainer.prepared["eval"]
    assert (train.kept, held_out.kept, dict(train.drops), dict(held_out.drops)) == (4, 2, {}, {})
    assert dict(held_out.shapes) == {"ShareGPT turns": 2}
    for pair in [*train.pairs, *held_out.pairs]:  # each image as many tokens as its processor gives it
        if not pair.images:
            assert pair.prompt_ids.count(IMAGE_ID) == 0 and pair.vision_inputs is None
            continue
        assert pair.prompt_ids.count(IMAGE_ID) == image_tokens(family, pair.vision_inputs)
    assert "probed with 2 of the data's image pairs too" in trainer.plan.route.reason
    assert trainer.plan.route.layout == ("mask" if family == "gemma3" else "spans")
    output = trainer.train()
    assert output.global_step == 1 and torch.isfinite(torch.tensor(output.training_loss))
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_constructing_and_training_leaves_the_config_as_the_user_passed_it(tmp_path):
    """The plan decides on a copy (trainer.args); the config object the user passed keeps every value, unset
    ones included, through construction, training and the finishing steps."""
    args = ORPOConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True,
                      max_steps=2, per_device_train_batch_size=2, logging_steps=1, memory_budget_gb=1e-6)
    before = args.to_dict()
    trainer = ORPOTrainer(model=tiny_llama(), args=args, train_dataset=pairs(4), processing_class=chatml_tokenizer())
    trainer.train()
    assert args.to_dict() == before
    assert (args.bf16, args.activation_checkpointing, args.keep_head_probs) == (None, None, None)
    assert trainer.args is not args and trainer.args.activation_checkpointing is True  # the plan's choice


# ---- encoder-decoder models (T5, Flan-T5, BART) ----------------------------------------------------------

def naive_encoder_decoder_loss(model, batch_pairs, beta):
    """The paper's equations for an encoder-decoder model, per example, from the full logits of
    model(input_ids=prompt, labels=completion); NLL over the chosen completions' tokens (the decoder does not
    predict the prompt), float64 odds."""
    nll_sum, nll_count, or_terms = 0.0, 0, []
    for pair in batch_pairs:
        ell = {}
        for name, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            labels = torch.tensor([completion])
            logits = model(input_ids=torch.tensor([pair.prompt_ids]), labels=labels).logits
            logp = logits.float().log_softmax(-1)[0].gather(1, labels[0, :, None])[:, 0]
            ell[name] = logp.double().mean()
            if name == "chosen":
                nll_sum, nll_count = nll_sum - logp.double().sum(), nll_count + len(logp)
        odds = {k: torch.exp(v) / (1 - torch.exp(v)) for k, v in ell.items()}
        or_terms.append(-torch.nn.functional.logsigmoid(torch.log(odds["chosen"]) - torch.log(odds["rejected"])))
    return nll_sum / nll_count + beta * torch.stack(or_terms).mean()


def _encoder_decoder(family):
    from tiny import bart_tokenizer, t5_tokenizer, tiny_bart, tiny_t5

    if family == "bart":
        return tiny_bart(), bart_tokenizer()
    return tiny_t5(flan=family == "flan-t5"), t5_tokenizer()


@pytest.mark.parametrize("family", ["t5", "flan-t5", "bart"])
@pytest.mark.parametrize("nll_scope", ["full", "completion"])
def test_encoder_decoder_loss_and_gradients_match_naive_reference(tmp_path, family, nll_scope):
    """One micro-batch of 8 pairs of unequal lengths: loss and every parameter's gradient equal the naive loss
    from separate forwards (fp32); the plan says what the NLL covers."""
    model, tok = _encoder_decoder(family)
    data = pairs()
    args = ORPOConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                      dataloader_pin_memory=False, seed=0, bf16=False, beta=0.5, nll_scope=nll_scope)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert trainer.plan.route.layout == "encoder-decoder"
    assert trainer.plan.choice("NLL").value == "completion" and trainer.args.nll_scope == "completion"
    assert args.nll_scope == nll_scope  # the user's config is not changed
    model = trainer.model.train()
    batch = trainer.data_collator(data)
    totals = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=totals)
    loss.backward()
    fast_grads = grads(model)
    model.zero_grad()
    reference = naive_encoder_decoder_loss(model, data, 0.5)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(fast_grads, grads(model), atol=1e-5, rtol=1e-4)


def test_encoder_decoder_runs_one_encoder_forward_per_micro_batch(tmp_path):
    """The encoder sees each prompt once (B rows), the decoder chosen and rejected (2·B rows)."""
    model, tok = _encoder_decoder("t5")
    data = pairs(4)
    trainer = ORPOTrainer(model=model, args=ORPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                                       bf16=False), train_dataset=data, processing_class=tok)
    rows = {}
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: rows.setdefault(name, []).append(
        out[0].shape[0])) for name, module in (("encoder", model.encoder), ("decoder", model.decoder))]
    trainer.compute_loss(model, trainer.data_collator(data))
    for hook in hooks:
        hook.remove()
    assert rows == {"encoder": [4], "decoder": [8]}


def test_trl_encoder_decoder_call_trains_t5(tmp_path):
    """TRL's test_orpo_trainer for T5: the flag set on the config after construction, implicit-prompt string rows,
    the model object and its tokenizer; train and eval run, the loss is logged and every nonzero parameter changed."""
    from datasets import Dataset

    model, tok = _encoder_decoder("t5")
    rows = [{"chosen": "the sky is blue", "rejected": "the sky is green"},
            {"chosen": "why ? yes good", "rejected": "why ? no bad"}] * 4
    args = ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=0.9,
                      eval_strategy="steps", eval_steps=2, beta=0.1, report_to="none", use_cpu=True)
    args.is_encoder_decoder = True
    before = {name: p.clone() for name, p in model.named_parameters()}
    trainer = ORPOTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows),
                          eval_dataset=Dataset.from_list(rows[:2]))
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    for name, p in model.named_parameters():
        if before[name].sum() != 0:
            assert not torch.equal(before[name], p), name


# ---------------------------------------------------------------------------------------------
# --objective reward: a Bradley-Terry reward model through the same run
# ---------------------------------------------------------------------------------------------
REWARD_ROWS = [{"prompt": p, "chosen": c, "rejected": r}
               for p in ("the sky is", "what is the sky", "why is the sky blue", "a b c", "ok what", "system why",
                         "user what is", "the red sky")
               for c, r in (("yes good", "no bad"), ("good", "bad"))]


def tiny_reward_model(seed=0):
    from tiny import tiny_chat_model

    torch.manual_seed(seed)
    config = tiny_chat_model(chatml_tokenizer()).config
    config.num_labels = 1
    return transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reward_compute_loss_and_gradients_match_separate_forwards_however_the_step_is_split(tmp_path, layout):
    """The step's loss is the mean over its pairs of −log σ(r_c − r_r), each reward the model's own call on
    [prompt | answer] alone; two micro-batches of 2 pairs give the loss and gradients of one of 4."""
    data = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.index) for p in pairs(4, high=20)]
    trainer = make_trainer(tmp_path, tiny_reward_model(), data, objective="reward", **LAYOUTS[layout])
    model = trainer.model.train()
    separate = torch.stack([torch.stack([model(input_ids=torch.tensor([p.prompt_ids + answer])).logits[0, 0]
                                         for answer in (p.chosen_ids, p.rejected_ids)]) for p in data])
    naive = torch.nn.functional.softplus(separate[:, 1] - separate[:, 0]).mean()
    naive.backward()
    expected = grads(model)
    model.zero_grad()
    batches = [trainer.data_collator(data[:2]), trainer.data_collator(data[2:])]
    totals = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=totals)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(naive.item(), rel=1e-5)
    torch.testing.assert_close(grads(model), expected, rtol=1e-4, atol=1e-7)
    logged = trainer._train_metrics({})
    assert set(logged) == {"accuracy", "margin", "rewards/chosen", "rewards/rejected", "tokens", "tokens_per_second"}
    assert logged["margin"] == pytest.approx((separate[:, 0] - separate[:, 1]).mean().item(), rel=1e-5)


def test_reward_training_learns_a_toy_preference_and_saves_a_model_that_scores_the_same(tmp_path):
    """From a causal LM's directory (`model` a path: loaded as a reward model, new score head): 20 steps on a
    trivially learnable set (chosen "good" / "yes good", rejected "bad" / "no bad") lower the held-out Bradley-Terry
    loss, end at held-out accuracy 1 and save a directory that AutoModelForSequenceClassification loads, with the
    trained model's rewards and the tokenizer's pad id."""
    from tiny import save_tiny_chat_model
    from orpo.ops.reward import separate_rewards

    path = save_tiny_chat_model(tmp_path / "base")
    out = tmp_path / "out"
    args = ORPOConfig(output_dir=str(out), objective="reward", report_to="none", save_strategy="no",
                      disable_tqdm=True, use_cpu=True, seed=0, bf16=False, learning_rate=3e-3, max_steps=20,
                      per_device_train_batch_size=4, logging_steps=10, report=False, overwrite_output_dir=True)
    trainer = ORPOTrainer(model=path, args=args, train_dataset=REWARD_ROWS[:12], eval_dataset=REWARD_ROWS[12:])
    assert trainer.plan.choice("objective").value == "reward"
    assert trainer.plan.route.head == "score"
    before = trainer.evaluate()
    trainer.train()
    final = trainer.state.log_history[-2]  # the final evaluation, before the run's summary
    assert final["eval_accuracy"] == 1.0 and final["eval_pairs"] == 4
    assert final["eval_loss"] < before["eval_loss"] / 2
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(saved).__name__ == "LlamaForSequenceClassification" and saved.config.num_labels == 1
    assert saved.config.pad_token_id == chatml_tokenizer().pad_token_id
    pairs_ = trainer.setup.eval.pairs
    held_out = [pairs_[i] for i in range(len(pairs_))]
    torch.testing.assert_close(separate_rewards(saved, held_out), separate_rewards(trainer.model.eval(), held_out))
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card


def test_reward_objective_refuses_a_model_of_the_other_kind_in_one_line(tmp_path):
    with pytest.raises(OrpoError, match="objective 'reward' trains a reward model, and LlamaForCausalLM is not one"):
        make_trainer(tmp_path, tiny_llama(), pairs(2), objective="reward")
    with pytest.raises(OrpoError, match="is a sequence-classification \\(reward\\) model: train it with objective"):
        make_trainer(tmp_path, tiny_reward_model(), pairs(2, high=20))


def test_reward_training_with_lora_trains_the_score_head_whole_and_saves_the_merged_reward_model(tmp_path):
    """LoRA (task SEQ_CLS): the adapters and the new score head train; the saved directory is the merged reward
    model, which scores as the trained one does. A LoraConfig of another task is refused in one line (the new head
    would stay random)."""
    from peft import LoraConfig
    from tiny import save_tiny_chat_model
    from orpo.ops.reward import separate_rewards

    path = save_tiny_chat_model(tmp_path / "base")
    out = tmp_path / "out"
    args = ORPOConfig(output_dir=str(out), objective="reward", report_to="none", save_strategy="no",
                      disable_tqdm=True, use_cpu=True, seed=0, bf16=False, learning_rate=1e-2, max_steps=3,
                      per_device_train_batch_size=4, report=False)
    with pytest.raises(OrpoError, match="LoRA on a reward model must train its new score head in full"):
        ORPOTrainer(model=path, args=args, train_dataset=REWARD_ROWS, peft_config=LoraConfig(task_type="CAUSAL_LM"))
    lora = LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"])
    trainer = ORPOTrainer(model=path, args=args, train_dataset=REWARD_ROWS, peft_config=lora)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("score" in name for name in trainable) and any("lora_A" in name for name in trainable)
    trainer.train()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert not (out / "adapter_config.json").exists()
    some = [trainer.setup.train.pairs[i] for i in range(3)]
    torch.testing.assert_close(separate_rewards(merged, some), separate_rewards(trainer.model.eval(), some))
