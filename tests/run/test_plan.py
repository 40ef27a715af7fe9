"""plan.py: every choice of a run made once, named with its reason, on a copy of the config (never the config the
user passed), and rendered the same way by the log, --dry_run, the card and the report."""
import json

import pytest
import torch

from orpo.errors import OrpoError
from orpo.run.launch import launched_processes
from orpo.run.plan import Choice, plan_run
from orpo.run.setup import set_up
from orpo.train.config import ORPOConfig
from tiny import chatml_tokenizer, save_tiny_chat_model, tiny_chat_model

ROWS = [{"prompt": "what is the sky", "chosen": "the sky is blue", "rejected": "the sky is red"},
        {"prompt": "is the sky green", "chosen": "no", "rejected": "yes"},
        {"prompt": "why", "chosen": "good", "rejected": "bad"}]


def config(tmp_path, **fields):
    return ORPOConfig(output_dir=str(tmp_path / "out"), report_to="none", dataset_cache=False, **fields)


def plan_of(tmp_path, model=None, eval_rows=None, **fields):
    args = config(tmp_path, **fields)
    model = model if model is not None else save_tiny_chat_model(tmp_path / "model")
    return args, plan_run(args, set_up(model, args, ROWS, eval_rows), launched_processes(args))


def test_every_choice_is_named_with_its_reason_in_one_order(tmp_path):
    _, plan = plan_of(tmp_path, eval_rows=ROWS[:2])
    assert [choice.name for choice in plan.choices] == [
        "train data", "eval data", "output_dir", "processes", "route", "precision", "router load balancing",
        "activation checkpointing", "output head softmax", "memory", "CPU memory allocator", "final evaluation",
        "saved", "report", "export"]
    lines = dict(line.split(": ", 1) for line in plan.lines())
    assert lines["train data"].startswith("train dataset: kept 3 of 3 pairs; prepared with 1 process (cache off) in ")
    assert lines["output_dir"] == f"a new run in {tmp_path / 'out'}"
    assert lines["processes"] == ("1 (this process alone: no launcher started it): 8 pairs per micro-batch x 1 "
                                  "micro-batches x 1 process = 8 pairs per optimizer step")
    assert lines["route"] == "prefix-shared spans: attention-only model with SDPA"
    assert lines["router load balancing"] == "off: not a mixture-of-experts model loaded with output_router_logits"
    assert lines["activation checkpointing"].startswith("off: a step of the largest micro-batch (")
    assert lines["memory"].startswith("a step of the largest micro-batch (") and "it fits the budget" in lines["memory"]
    assert lines["final evaluation"] == "on the eval data after the last step, unless an evaluation falls on it"
    assert lines["export"] == "none"
    saved = json.loads(plan.to_json())  # PLAN_FILE: what the card and the report render
    assert [c["name"] for c in saved["choices"]] == [c.name for c in plan.choices]
    assert saved["choices"][4] == {"name": "route", "value": "spans",
                                   "reason": "prefix-shared spans: attention-only model with SDPA"}
    assert Choice("precision", "fp32", "fp32: --bf16 false").line() == "precision: fp32: --bf16 false"


def test_the_trainer_runs_a_copy_with_the_decisions_and_the_config_keeps_what_the_user_passed(tmp_path):
    args, plan = plan_of(tmp_path, memory_budget_gb=1e-9)  # nothing fits: every layer recomputed
    before = args.to_dict()
    copy = plan.training_args
    assert copy is not args and args.to_dict() == before
    assert args.activation_checkpointing is None and args.bf16 is None and args.keep_head_probs is None
    assert copy.activation_checkpointing is True and copy.gradient_checkpointing is True
    assert copy.selective_checkpointing is False and copy.keep_head_probs is False
    assert copy.bf16 is (plan.choice("precision").value == "bf16")
    assert plan.choice("activation checkpointing").reason.startswith("on, every layer, full recompute: ")
    assert plan.choice("output head softmax").reason == ("recomputed in backward: memory is what this run saves "
                                                         "(activation checkpointing)")


def test_what_the_user_set_is_kept_and_said(tmp_path):
    args, plan = plan_of(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"every_n_layers": 2},
                         selective_checkpointing=True, keep_head_probs=True, bf16=False, packing=False)
    lines = dict(line.split(": ", 1) for line in plan.lines())
    assert lines["activation checkpointing"] == "on, every 2 layers, selective (as set)"
    assert lines["output head softmax"] == "kept: --keep_head_probs true"
    assert lines["precision"] == "fp32: --bf16 false"
    assert lines["route"].startswith("padded: --packing false")
    copy = plan.training_args
    assert copy.activation_checkpointing_kwargs == {"every_n_layers": 2} and copy.selective_checkpointing is True


def test_streaming_runs_with_batches_sharded_by_process(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    args = config(tmp_path, streaming=True, max_steps=2)
    plan = plan_run(args, set_up(save_tiny_chat_model(tmp_path / "model"), args, str(data)), (1, "one"))
    assert plan.training_args.accelerator_config.dispatch_batches is False
    assert args.accelerator_config.dispatch_batches is None
    assert plan.lines()[0] == (f"train data: streaming {data} (shuffle buffer 10000 rows): rows are read, tokenized "
                               "and counted as training takes them")


def test_lora_on_a_model_without_a_path_saves_the_adapter_and_cannot_export(tmp_path):
    from peft import LoraConfig

    model = tiny_chat_model(chatml_tokenizer())  # built in Python: no name or path to reload its base from
    args = config(tmp_path)
    plan = plan_run(args, set_up(model, args, ROWS, processing_class=chatml_tokenizer(), peft_config=LoraConfig(r=4)),
                    (1, "one"))
    assert plan.choice("saved").value == "adapter" and plan.finish.merge_base is None
    assert "its base (a model built in Python) has no name or path to reload it by" in plan.choice("saved").reason
    args = config(tmp_path, export_gguf=str(tmp_path / "m.gguf"))
    setup = set_up(tiny_chat_model(chatml_tokenizer()), args, ROWS, processing_class=chatml_tokenizer(),
                   peft_config=LoraConfig(r=4))
    with pytest.raises(OrpoError, match=r"^--export_gguf writes the model with its LoRA adapter merged, and the base "
                                        r"model has no name or path to reload it by for the merge"):
        plan_run(args, setup, (1, "one"))


def test_an_export_the_model_cannot_take_is_refused_before_training(tmp_path):
    import transformers

    torch.manual_seed(0)
    tok = chatml_tokenizer()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    args = config(tmp_path, export_gguf=str(tmp_path / "m.gguf"))
    with pytest.raises(OrpoError, match=r"gpt2"):
        plan_run(args, set_up(gpt2, args, ROWS, processing_class=tok), (1, "one"))
