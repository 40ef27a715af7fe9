"""TRL's own ORPO test suite, run against orpo's ORPOTrainer (run/trainer.py seen through TRL's eyes).

Follows TRL's `tests/experimental/test_orpo_trainer.py` at TRL commit 6e4ab1f72f92fc96f829c76a6b6950176f111d1f:
every case and assertion of `TestORPOTrainer` below is TRL's, with the import changed (`from orpo import
ORPOConfig, ORPOTrainer`), the hub replaced by local stand-ins built here (each hub id wrapped in `stand_in(...)`,
`load_dataset` a local function of the same call shape; nothing is downloaded), and one assertion replaced by
orpo's equivalent (test_init_with_eval_dataset, below). When TRL's file changes, port the change and update the
commit above.

TRL's cases (`TestORPOTrainer`):
- test_trust_remote_code: a model with custom modeling code is refused without trust_remote_code, loaded with it;
- test_orpo_trainer[qwen-standard_preference], [t5-standard_implicit_prompt_preference],
  [qwen-conversational_preference]: three steps with evaluation, every
  parameter changes;
- test_init_with_eval_dataset[dataset], [dataset_dict], [none]: the eval data as one set, named sets (each
  tokenized independently), or none. Its assertion `"chosen_input_ids" in <a tokenized eval row>` reads TRL's
  representation (a dict of columns); orpo's rows are `TokenizedPair`s, so it asserts their `chosen_ids` instead;
- test_orpo_trainer_processing_class_autoloaded: the tokenizer loaded from the model when omitted;
- test_orpo_trainer_with_lora[standard_preference, standard_implicit_prompt_preference,
  conversational_preference, conversational_implicit_prompt_preference]: LoRA over the four shapes, every
  adapter parameter changes;
- test_compute_metrics: the user's `compute_metrics` is called at each evaluation and its metrics are logged
  with the `eval_` prefix.

Cases of the issue that TRL's file lacks (`TestBeyondTRLSuite`):
- test_model_tags[full], [lora]: the model tagged as TRL's trainers tag theirs (orpo's tags), the card's tags the
  model's;
- test_model_init_kwargs_dtype: `model_init_kwargs={"dtype": "bfloat16"}` respected for a model given by name;
- test_evaluation_during_training: evaluations logged at the eval steps, `compute_metrics` given each eval pair's
  log-probs (chosen, rejected) with label 0;
- test_gradient_checkpointing[trl-name], [orpo-name], [both]: TRL's `gradient_checkpointing=True` (its default:
  orpo's plan decides) and orpo's `activation_checkpointing=True` (recompute forced) train, with the losses of a
  run without recompute.

Stand-ins for TRL's hub ids: "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5" a random tiny Qwen2ForCausalLM with
a byte-level ChatML tokenizer trained on the Zen of Python (distinct ids for every text, no <unk>);
"trl-internal-testing/tiny-T5ForConditionalGeneration" a random tiny T5ForConditionalGeneration with a T5-like
tokenizer (pad "<pad>" id 0, eos "</s>" appended by its post-processor); "trl-internal-testing/tiny-RemoteForCausalLM"
a directory whose config.json maps AutoModelForCausalLM to `RemoteForCausalLM` in its own modeling file (custom
code); "trl-internal-testing/zen" the Zen of Python (stdlib `this`) as pairs in TRL's four preference shapes, split
as TRL's dataset is (test_size 0.1, not shuffled).
"""
import atexit
import codecs
import contextlib
import functools
import importlib.util
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from orpo import ORPOConfig, ORPOTrainer
from tiny import byte_level_chatml_tokenizer, tiny_t5

# ---------------------------------------------------------------------------------------------------------------
# Local stand-ins for TRL's hub ids
# ---------------------------------------------------------------------------------------------------------------


def zen_lines() -> list[str]:
    """The 19 aphorisms of the Zen of Python (stdlib `this`, rot13-encoded there)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this

    text = codecs.decode(this.s, "rot13")
    return [line for line in text.splitlines()[2:] if line.strip()]


def zen_rows(config_name: str) -> dict[str, list]:
    """The Zen as preference pairs in one of TRL's four shapes: each aphorism split after its first half of words
    (prompt | chosen), the rejected completion the second half of the next aphorism whose second half differs from
    the chosen one from the start of a word on (" than complex." vs " than complicated." would not: an implicit prompt
    is the texts' common start, and TRL's stops where the texts differ, inside "compl")."""
    halves = []
    for line in zen_lines():
        words = line.split(" ")
        cut = max(1, len(words) // 2)
        halves.append((" ".join(words[:cut]), " " + " ".join(words[cut:])))
    prompts = [p for p, _ in halves]
    chosen = [c for _, c in halves]

    def differs_at_a_word(a: str, b: str) -> bool:
        same = next(i for i, (x, y) in enumerate(zip(a + "\0", b + "\1")) if x != y)
        return same > 0 and a[same - 1] == " "

    rejected = [next(r for _, r in halves[i + 1:] + halves[:i] if differs_at_a_word(c, r)) for i, c in enumerate(chosen)]
    if config_name == "standard_preference":
        return {"prompt": prompts, "chosen": chosen, "rejected": rejected}
    if config_name == "standard_implicit_prompt_preference":
        return {"chosen": [p + c for p, c in zip(prompts, chosen)], "rejected": [p + r for p, r in zip(prompts, rejected)]}
    user = [[{"role": "user", "content": f"Complete: {p}"}] for p in prompts]
    answer = lambda text: [{"role": "assistant", "content": text.strip()}]  # noqa: E731
    if config_name == "conversational_preference":
        return {"prompt": user, "chosen": [answer(c) for c in chosen], "rejected": [answer(r) for r in rejected]}
    if config_name == "conversational_implicit_prompt_preference":
        return {"chosen": [u + answer(c) for u, c in zip(user, chosen)],
                "rejected": [u + answer(r) for u, r in zip(user, rejected)]}
    raise ValueError(f"no zen config {config_name!r}")


def load_dataset(path: str, name: str, split: str | None = None):
    """`datasets.load_dataset` for "trl-internal-testing/zen" only, from the stand-in rows: a DatasetDict
    (train/test) or, with `split`, that split."""
    assert path == "trl-internal-testing/zen", path
    splits = Dataset.from_dict(zen_rows(name)).train_test_split(test_size=0.1, shuffle=False)
    return splits[split] if split is not None else DatasetDict(splits)


def _qwen2(directory: Path) -> None:
    tokenizer = byte_level_chatml_tokenizer(corpus=zen_lines() + ["Complete: user assistant system"], vocab_size=400)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _t5(directory: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer, processors

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(zen_lines(), vocab_size=300, min_frequency=1, special_tokens=["<pad>", "</s>", "<unk>"],
                            show_progress=False)
    backend = bpe._tokenizer
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", backend.token_to_id("</s>"))])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                                     unk_token="<unk>")
    tiny_t5(vocab=len(tokenizer)).save_pretrained(directory)  # </s> is 1 and <pad> 0 here, as tiny_t5 says
    tokenizer.save_pretrained(directory)


REMOTE_MODELING = '''
from transformers import Qwen2Config, Qwen2ForCausalLM


class RemoteConfig(Qwen2Config):
    model_type = "remote"


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
'''


def _remote(directory: Path) -> None:
    _qwen2(directory)
    (directory / "modeling_remote.py").write_text(REMOTE_MODELING)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="remote", architectures=["RemoteForCausalLM"],
                  auto_map={"AutoConfig": "modeling_remote.RemoteConfig",
                            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))


STAND_INS = {
    "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": _qwen2,
    "trl-internal-testing/tiny-T5ForConditionalGeneration": _t5,
    "trl-internal-testing/tiny-RemoteForCausalLM": _remote,
}


@functools.cache
def _stand_in_root() -> Path:
    root = tempfile.mkdtemp(prefix="orpo-trl-stand-ins-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return Path(root)


@functools.cache
def stand_in(hub_id: str) -> str:
    """The local directory standing in for TRL's test model `hub_id`, built once per test session."""
    directory = _stand_in_root() / hub_id.split("/")[-1]
    STAND_INS[hub_id](directory)
    return str(directory)


class TrlTestCase:
    """TRL's tests/testing_utils.py TrlTestCase: `self.tmp_dir` is the test's tmp_path."""

    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)


def require_peft(test):
    """TRL's tests/testing_utils.py require_peft: skip where peft is not installed."""
    return pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="test requires peft")(test)


# ---------------------------------------------------------------------------------------------------------------
# TRL's tests/experimental/test_orpo_trainer.py at 6e4ab1f72f92fc96f829c76a6b6950176f111d1f
# ---------------------------------------------------------------------------------------------------------------


class TestORPOTrainer(TrlTestCase):
    def setup_method(self):
        self.model_id = stand_in("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5")
        self.model = AutoModelForCausalLM.from_pretrained(self.model_id, dtype="float32")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        self.tokenizer.pad_token = self.tokenizer.eos_token

        # get t5 as seq2seq example:
        model_id = stand_in("trl-internal-testing/tiny-T5ForConditionalGeneration")
        self.t5_model = AutoModelForSeq2SeqLM.from_pretrained(model_id, dtype="float32")
        self.t5_tokenizer = AutoTokenizer.from_pretrained(model_id)

    def test_trust_remote_code(self):
        dataset = load_dataset("trl-internal-testing/zen", "standard_preference", split="train")
        model_id = stand_in("trl-internal-testing/tiny-RemoteForCausalLM")
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)

        with pytest.raises(ValueError, match="custom code"):
            ORPOTrainer(
                model=model_id,
                args=ORPOConfig(output_dir=self.tmp_dir, report_to="none"),
                processing_class=tokenizer,
                train_dataset=dataset,
            )

        trainer = ORPOTrainer(
            model=model_id,
            args=ORPOConfig(output_dir=self.tmp_dir, report_to="none", trust_remote_code=True),
            processing_class=tokenizer,
            train_dataset=dataset,
        )
        assert type(trainer.model).__name__ == "RemoteForCausalLM"

    @pytest.mark.parametrize(
        "name, config_name",
        [
            ("qwen", "standard_preference"),
            ("t5", "standard_implicit_prompt_preference"),
            ("qwen", "conversational_preference"),
        ],
    )
    def test_orpo_trainer(self, name, config_name):
        training_args = ORPOConfig(
            output_dir=self.tmp_dir,
            per_device_train_batch_size=2,
            max_steps=3,
            remove_unused_columns=False,
            gradient_accumulation_steps=1,
            learning_rate=9e-1,
            eval_strategy="steps",
            beta=0.1,
            report_to="none",
        )

        dataset = load_dataset("trl-internal-testing/zen", config_name)

        if name == "qwen":
            model = self.model
            tokenizer = self.tokenizer
        elif name == "t5":
            model = self.t5_model
            tokenizer = self.t5_tokenizer
            training_args.is_encoder_decoder = True

        trainer = ORPOTrainer(
            model=model,
            args=training_args,
            processing_class=tokenizer,
            train_dataset=dataset["train"],
            eval_dataset=dataset["test"],
        )

        previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}

        trainer.train()

        assert trainer.state.log_history[-1]["train_loss"] is not None

        # Check that the params have changed
        for n, param in previous_trainable_params.items():
            new_param = trainer.model.get_parameter(n)
            if param.sum() != 0:  # ignore 0 biases
                assert not torch.equal(param, new_param)

    @pytest.mark.parametrize(
        "eval_dataset_type",
        [
            "dataset",
            "dataset_dict",
            "none",
        ],
    )
    def test_init_with_eval_dataset(self, eval_dataset_type):
        # ORPO tokenizes the eval dataset at init by calling `.map()` directly on it, so streaming (iterable) and
        # plain dict-of-datasets eval datasets are not yet supported; only `Dataset` and `DatasetDict` are tested.
        train_dataset = load_dataset("trl-internal-testing/zen", "standard_preference", split="train")

        if eval_dataset_type == "none":
            eval_dataset = None
        else:
            eval_split = load_dataset("trl-internal-testing/zen", "standard_preference", split="test")
            if eval_dataset_type == "dataset":
                eval_dataset = eval_split
            else:  # "dataset_dict"
                eval_dataset = DatasetDict({"data1": eval_split, "data2": eval_split})

        training_args = ORPOConfig(output_dir=self.tmp_dir, report_to="none")
        trainer = ORPOTrainer(
            model=self.model,
            args=training_args,
            processing_class=self.tokenizer,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
        )

        if eval_dataset_type == "none":
            assert trainer.eval_dataset is None
        elif isinstance(trainer.eval_dataset, dict):
            assert set(trainer.eval_dataset.keys()) == {"data1", "data2"}
            # Each split was tokenized independently.
            assert next(iter(trainer.eval_dataset["data1"])).chosen_ids  # TRL: key "chosen_input_ids"; orpo: TokenizedPair
            assert next(iter(trainer.eval_dataset["data2"])).chosen_ids  # TRL: key "chosen_input_ids"; orpo: TokenizedPair
        else:
            assert next(iter(trainer.eval_dataset)).chosen_ids  # TRL: key "chosen_input_ids"; orpo: TokenizedPair

    def test_orpo_trainer_processing_class_autoloaded(self):
        # processing_class is documented as optional: when omitted it should be
        # auto-loaded from the model, consistent with DPOTrainer / RewardTrainer.
        training_args = ORPOConfig(
            output_dir=self.tmp_dir,
            per_device_train_batch_size=2,
            max_steps=3,
            remove_unused_columns=False,
            beta=0.1,
            report_to="none",
        )
        dataset = load_dataset("trl-internal-testing/zen", "standard_preference")
        trainer = ORPOTrainer(
            model=self.model,
            args=training_args,
            train_dataset=dataset["train"],
        )
        assert trainer.processing_class is not None
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None

    @pytest.mark.parametrize(
        "config_name",
        [
            "standard_preference",
            "standard_implicit_prompt_preference",
            "conversational_preference",
            "conversational_implicit_prompt_preference",
        ],
    )
    @require_peft
    def test_orpo_trainer_with_lora(self, config_name):
        from peft import LoraConfig

        lora_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            bias="none",
            task_type="CAUSAL_LM",
        )

        training_args = ORPOConfig(
            output_dir=self.tmp_dir,
            per_device_train_batch_size=2,
            max_steps=3,
            remove_unused_columns=False,
            gradient_accumulation_steps=4,
            learning_rate=9e-1,
            eval_strategy="steps",
            beta=0.1,
            report_to="none",
        )

        dataset = load_dataset("trl-internal-testing/zen", config_name)

        trainer = ORPOTrainer(
            model=self.model,
            args=training_args,
            processing_class=self.tokenizer,
            train_dataset=dataset["train"],
            eval_dataset=dataset["test"],
            peft_config=lora_config,
        )

        previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}

        trainer.train()

        assert trainer.state.log_history[-1]["train_loss"] is not None

        # Check that the params have changed
        for n, param in previous_trainable_params.items():
            if "lora" in n:
                new_param = trainer.model.get_parameter(n)
                if param.sum() != 0:  # ignore 0 biases
                    assert not torch.equal(param, new_param)

    def test_compute_metrics(self):
        model = AutoModelForCausalLM.from_pretrained(stand_in("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5"),
                                                     dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(stand_in("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5"))
        tokenizer.pad_token = tokenizer.eos_token

        dataset = load_dataset("trl-internal-testing/zen", "standard_preference")

        def dummy_compute_metrics(*args, **kwargs):
            return {"test": 0.0}

        training_args = ORPOConfig(
            output_dir=self.tmp_dir,
            remove_unused_columns=False,
            per_device_train_batch_size=2,
            do_eval=True,
            eval_strategy="steps",
            eval_steps=1,
            per_device_eval_batch_size=2,
            report_to="none",
        )

        trainer = ORPOTrainer(
            model=model,
            args=training_args,
            processing_class=tokenizer,
            train_dataset=dataset["train"],
            eval_dataset=dataset["test"],
            compute_metrics=dummy_compute_metrics,
        )

        trainer.train()

        assert trainer.state.log_history[-2]["eval_test"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# What the issue asks of a TRL replacement beyond TRL's file
# ---------------------------------------------------------------------------------------------------------------


class TestBeyondTRLSuite(TrlTestCase):
    def setup_method(self):
        self.model_id = stand_in("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5")
        self.model = AutoModelForCausalLM.from_pretrained(self.model_id, dtype="float32")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        self.dataset = load_dataset("trl-internal-testing/zen", "standard_preference")

    def args(self, **overrides):
        return ORPOConfig(**{"output_dir": self.tmp_dir, "report_to": "none", "per_device_train_batch_size": 2,
                             "max_steps": 2, "learning_rate": 1e-2, "seed": 0, **overrides})

    @pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
    def test_model_tags(self, lora):
        # TRL tags the model it trains (`model.add_model_tags`); orpo adds its own tags, which the card's are.
        # "trl" is not among them: on the hub it says that TRL trained the model (export/card.py, MODEL_TAGS).
        from huggingface_hub import ModelCard
        from peft import LoraConfig

        trainer = ORPOTrainer(model=self.model, args=self.args(), processing_class=self.tokenizer,
                              train_dataset=self.dataset["train"],
                              peft_config=LoraConfig(r=4, task_type="CAUSAL_LM") if lora else None)
        assert trainer.model.model_tags == ["orpo", "preference-optimization"]
        trainer.train()
        card_tags = ModelCard.load(f"{self.tmp_dir}/README.md").data.to_dict()["tags"]
        assert card_tags == trainer.model.model_tags + (["lora"] if lora else [])

    def test_model_init_kwargs_dtype(self):
        args = self.args(model_init_kwargs={"dtype": "bfloat16"}, max_steps=1)
        trainer = ORPOTrainer(model=self.model_id, args=args, processing_class=self.tokenizer,
                              train_dataset=self.dataset["train"])
        assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
        trainer.train()
        assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
        assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))

    def test_evaluation_during_training(self):
        # every eval_steps, orpo's metrics and those of compute_metrics, which gets each eval pair's mean completion
        # log-probs (chosen, rejected) with label 0 (the preferred column): its accuracy is orpo's eval_accuracy
        calls = []

        def accuracy(prediction):
            calls.append(prediction)
            return {"argmax_accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

        args = self.args(max_steps=4, eval_strategy="steps", eval_steps=2, logging_steps=1)
        trainer = ORPOTrainer(model=self.model, args=args, processing_class=self.tokenizer,
                              train_dataset=self.dataset["train"], eval_dataset=self.dataset["test"],
                              compute_metrics=accuracy)
        trainer.train()
        evaluations = [r for r in trainer.state.log_history if "eval_loss" in r]
        assert [r["step"] for r in evaluations] == [2, 4]
        assert [r["step"] for r in trainer.state.log_history if "loss" in r] == [1, 2, 3, 4]
        assert trainer.state.log_history[-2] is evaluations[-1]
        assert len(calls) == 2 and calls[0].predictions.shape == (len(self.dataset["test"]), 2)
        assert (calls[0].label_ids == 0).all()
        for record in evaluations:
            assert record["eval_argmax_accuracy"] == record["eval_accuracy"]
            assert torch.isfinite(torch.tensor(record["eval_loss"]))

    @pytest.mark.parametrize("flags, recompute", [
        ({"gradient_checkpointing": True}, None),  # TRL's name and default: orpo's plan decides (a tiny model: off)
        ({"activation_checkpointing": True}, 1),  # set: every layer recomputed
        ({"gradient_checkpointing": True, "activation_checkpointing": True}, 1),
    ], ids=["trl-name", "orpo-name", "both"])
    def test_gradient_checkpointing(self, flags, recompute):
        # recompute changes no value: the steps' losses equal those of a run without it
        losses = {}
        for run, run_flags in (("with", flags), ("without", {"activation_checkpointing": False})):
            model = AutoModelForCausalLM.from_pretrained(self.model_id, dtype="float32")
            args = self.args(**run_flags, logging_steps=1, bf16=False, output_dir=f"{self.tmp_dir}/{run}")
            trainer = ORPOTrainer(model=model, args=args, processing_class=self.tokenizer,
                                  train_dataset=self.dataset["train"])
            if run == "with":
                choice = next(c for c in trainer.plan.choices if c.name == "activation checkpointing")
                assert choice.value == recompute, choice
                assert trainer.plan.training_args.gradient_checkpointing is (recompute is not None)
            trainer.train()
            assert model.is_activation_checkpointing is (run == "with" and recompute is not None)
            losses[run] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        assert len(losses["with"]) == 2
        assert losses["with"] == pytest.approx(losses["without"], rel=1e-5)
