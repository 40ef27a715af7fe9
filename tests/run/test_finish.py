"""finish.py: what a run does after its last step, from Python as from `orpo train`: the final evaluation before
the run's summary, the saved model (LoRA merged, the trainer's model keeping its adapters), the card, and no
model or card at all when no step updated the weights."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from orpo.errors import OrpoError
from orpo.run.trainer import ORPOTrainer
from orpo.train.config import ORPOConfig
from tiny import save_tiny_chat_model

ROWS = [{"prompt": "what is the sky", "chosen": "the sky is blue", "rejected": "the sky is red"},
        {"prompt": "is the sky green", "chosen": "no", "rejected": "yes"},
        {"prompt": "why", "chosen": "good", "rejected": "bad"},
        {"prompt": "what", "chosen": "a b c", "rejected": "ok"}]


def config(tmp_path, **fields):
    return ORPOConfig(**{**dict(output_dir=str(tmp_path / "out"), report_to="none", dataset_cache=False,
                                per_device_train_batch_size=2, max_steps=2, logging_steps=1, learning_rate=1e-2,
                                save_strategy="no", disable_tqdm=True, bf16=False), **fields})


@pytest.mark.parametrize("strategy", ["no", "steps"])
def test_the_final_model_is_evaluated_once_before_the_runs_summary(tmp_path, strategy):
    extra = {"eval_strategy": strategy, "eval_steps": 1} if strategy == "steps" else {}
    trainer = ORPOTrainer(model=save_tiny_chat_model(tmp_path / "m"), args=config(tmp_path, logging_steps=5, **extra),
                          train_dataset=ROWS, eval_dataset=ROWS[:2])
    trainer.train()
    history = trainer.state.log_history
    evals = [record["step"] for record in history if "eval_loss" in record]
    assert evals == ([2] if strategy == "no" else [1, 2])
    assert "train_loss" in history[-1]  # TRL's tests read the summary as the last record
    # and the final evaluation as the one before it (TRL's test_compute_metrics): the last step's training
    # metrics, due at no logging step here, are logged at that step, before the evaluation
    assert history[-2]["step"] == 2 and "eval_loss" in history[-2]
    assert [record["step"] for record in history if "loss" in record] == [2]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert sum("eval_loss" in line for line in lines) == len(evals)


def test_a_run_whose_steps_all_were_non_finite_ends_with_one_line_and_writes_no_model(tmp_path, caplog):
    path = save_tiny_chat_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path)
    # every training loss NaN (the route's probe, in eval mode, sees the model as it is)
    model.model.norm.register_forward_hook(lambda module, args, out: out * float("nan") if module.training else out)
    trainer = ORPOTrainer(model=model, args=config(tmp_path), train_dataset=ROWS)
    with pytest.raises(OrpoError, match=r"^no optimizer step updated the weights \(2 steps, 2 skipped as non-finite: "
                                        r"see the warnings above for their steps and rows\): no model or model card is "
                                        r"written; metrics.jsonl in .* shows the run$"):
        trainer.train()
    out = tmp_path / "out"
    assert not (out / "README.md").exists() and not (out / "model.safetensors").exists()
    assert not (out / "orpo_run_finished.json").exists()
    assert "non-finite loss or gradient" in caplog.text


def test_lora_saves_the_merged_model_and_the_trainer_keeps_its_adapters(tmp_path):
    from peft import LoraConfig, PeftModel

    path = save_tiny_chat_model(tmp_path / "m")
    trainer = ORPOTrainer(model=path, args=config(tmp_path), train_dataset=ROWS,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    trainer.train()
    assert isinstance(trainer.model, PeftModel)
    assert any("lora_A" in name for name, _ in trainer.model.named_parameters())  # TRL's LoRA test reads them
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert not (out / ".lora-adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=ids).logits
    assert not torch.allclose(base, expected)  # the adapter changed the model
    assert "## How orpo ran it" in (out / "README.md").read_text()
    plan = json.loads((out / "orpo_plan.json").read_text())
    assert plan["choices"][-3]["value"] == "merged" and (out / "orpo_run_finished.json").is_file()
