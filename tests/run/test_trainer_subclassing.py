"""Subclassing ORPOTrainer the way Axolotl and ms-swift subclass TRL's (docs/migrating-from-trl.md, "For
integrators that subclass TRL's trainer"): the page's example subclass, run from the page's own text, overrides
`batch_loss` to add a margin term and logs it with `add_metric`.

Checked against separate forwards of each sequence (test_trainer.naive_orpo_loss and the mean completion
log-probs ℓ): the loss is ORPO's plus margin_weight · mean over the step's pairs of max(0, margin − (ℓ_chosen −
ℓ_rejected)), its gradients include the term's, and the logged `margin_hinge` is that mean, over the micro-batches
of a step in training and over the pairs in evaluation. And the constructor argument of TRL's that orpo has no use
for, `data_collator`, is refused in one line."""
import pytest
import torch

from orpo.errors import OrpoError
from orpo.run.trainer import ORPOTrainer
from orpo.train.config import ORPOConfig
from test_docs import REPO, code_blocks
from test_trainer import grads, naive_orpo_loss, pairs
from tiny import chatml_tokenizer, tiny_llama

SECTION = "## For integrators that subclass TRL's trainer"


def page_example() -> type:
    """The subclass the page shows, defined by running the page's python block."""
    page = (REPO / "docs" / "migrating-from-trl.md").read_text()
    (code,) = [c for _, c in code_blocks(page.split(SECTION, 1)[1], "python") if "class MarginORPOTrainer" in c]
    namespace = {}
    exec(compile(code, "docs/migrating-from-trl.md", "exec"), namespace)
    return namespace["MarginORPOTrainer"]


def trainer_of(cls, tmp_path, data, trainer_kwargs=None, **overrides):
    args = dict(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                dataloader_pin_memory=False, seed=0, bf16=False)  # fp32: exact comparisons
    args.update(overrides)
    return cls(model=tiny_llama(), args=ORPOConfig(**args), train_dataset=data, processing_class=chatml_tokenizer(),
               **(trainer_kwargs or {}))


def separate_mean_logps(model, batch_pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_chosen, ℓ_rejected [pairs]: each completion's mean token log-prob from a forward of [prompt + it] alone."""
    ell = {"chosen": [], "rejected": []}
    for pair in batch_pairs:
        for name, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            seq = torch.tensor([pair.prompt_ids + completion])
            logp = model(input_ids=seq).logits.float().log_softmax(-1)[0, :-1].gather(1, seq[0, 1:, None])[:, 0]
            ell[name].append(logp[len(pair.prompt_ids) - 1 :].double().mean())
    return torch.stack(ell["chosen"]), torch.stack(ell["rejected"])


def hinge_mean(model, batch_pairs, margin):
    chosen, rejected = separate_mean_logps(model, batch_pairs)
    return torch.relu(margin - (chosen - rejected)).mean()


def test_the_pages_subclass_adds_its_term_to_the_loss_and_to_the_gradients(tmp_path):
    data = pairs()
    trainer = trainer_of(page_example(), tmp_path, data, dict(margin_weight=0.5, margin=0.5), beta=0.1)
    model = trainer.model.train()
    batch = trainer.data_collator(data)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=trainer.step_totals([batch], torch.device("cpu")))
    loss.backward()
    subclass_grads = grads(model)
    model.zero_grad()
    orpo_only = naive_orpo_loss(model, data, 0.1, "full")
    orpo_only.backward()
    orpo_grads = grads(model)
    model.zero_grad()
    chosen, rejected = separate_mean_logps(model, data)
    hinge = torch.relu(0.5 - (chosen - rejected))
    assert 0 < int((hinge > 0).sum()) < len(data)  # the hinge is active for some pairs and not for others
    reference = naive_orpo_loss(model, data, 0.1, "full") + 0.5 * hinge.mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(subclass_grads, grads(model), atol=1e-5, rtol=1e-4)
    assert (subclass_grads - orpo_grads).abs().max() > 1e-3  # the term's gradient is there, not lost in rounding


def test_the_pages_subclass_logs_its_metric_as_the_exact_mean_in_training_and_evaluation(tmp_path):
    """One step of 5 pairs in micro-batches of 3 and 2 (learning rate 0: the weights stay those of the
    reference): the step's `margin_hinge` is the mean over its 5 pairs (not the mean of the micro-batches' means),
    and its loss ORPO's plus 0.5 times it; an evaluation in batches of 2, 2 and 1 logs eval_margin_hinge, the mean
    over its pairs, and its eval_loss stays ORPO's loss."""
    data = pairs(5)
    trainer = trainer_of(page_example(), tmp_path, data, dict(margin_weight=0.5, margin=0.5), beta=0.1,
                         per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=1, logging_steps=1,
                         per_device_eval_batch_size=2, learning_rate=0.0)
    trainer.train()
    (log,) = [r for r in trainer.state.log_history if "margin_hinge" in r]
    with torch.no_grad():
        expected = hinge_mean(trainer.model, data, 0.5).item()
    assert expected > 0
    assert log["margin_hinge"] == pytest.approx(expected, rel=1e-5)
    assert log["loss"] == pytest.approx(log["nll"] + 0.1 * log["or_loss"] + 0.5 * expected, rel=1e-5)
    metrics = trainer.evaluate(data)
    assert metrics["eval_margin_hinge"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_nll"] + 0.1 * metrics["eval_or_loss"], rel=1e-5)


class _NamedLikeOrpo(ORPOTrainer):
    def batch_loss(self, model, inputs, logps, step):
        self.add_metric("nll", 0.0)
        return super().batch_loss(model, inputs, logps, step)


def test_a_metric_named_like_one_orpo_logs_is_refused_in_one_line(tmp_path):
    trainer = trainer_of(_NamedLikeOrpo, tmp_path, pairs(2), max_steps=1, logging_steps=1)
    with pytest.raises(OrpoError, match=r"add_metric: nll is logged in training already"):
        trainer.train()


def test_a_data_collator_is_refused_in_one_line(tmp_path):
    with pytest.raises(OrpoError, match="takes no data_collator"):
        trainer_of(ORPOTrainer, tmp_path, pairs(2), dict(data_collator=lambda rows: rows))
