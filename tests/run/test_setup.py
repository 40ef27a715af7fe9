"""setup.py: a run's model and data loaded in order, what the loaders refuse turned into one line right after the
load, before the data is prepared."""
import json

import pytest
import torch

from orpo.errors import OrpoError
from orpo.run.setup import prepare_source, set_up
from orpo.train.config import ORPOConfig
from tiny import chatml_tokenizer, save_tiny_chat_model, tiny_llama

ROWS = [{"prompt": "what is the sky", "chosen": "the sky is blue", "rejected": "the sky is red"},
        {"prompt": "why", "chosen": "good", "rejected": "bad"}]


def config(tmp_path, **fields):
    return ORPOConfig(output_dir=str(tmp_path / "out"), report_to="none", dataset_cache=False, **fields)


def test_a_model_by_name_is_loaded_with_its_init_kwargs_and_dtype(tmp_path):
    setup = set_up(save_tiny_chat_model(tmp_path / "m"), config(
        tmp_path, model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"}), ROWS)
    assert next(setup.model.parameters()).dtype == torch.bfloat16
    assert setup.model.config._attn_implementation == "eager"
    assert setup.model_name == str(tmp_path / "m") and setup.sources == {"train": ROWS, "eval": None}
    assert setup.train.kept == 2 and setup.eval is None


def test_init_kwargs_the_model_refuses_are_one_line_before_the_data(tmp_path, monkeypatch):
    import orpo.run.setup as module

    monkeypatch.setattr(module, "prepare_source", lambda *a: pytest.fail("the data was prepared"))
    with pytest.raises(OrpoError, match=r'^--model_init_kwargs \{"foo": 1\}: .* cannot be loaded with them '
                                        r"\(LlamaForCausalLM.__init__\(\) got an unexpected keyword argument 'foo'\)$"):
        set_up(save_tiny_chat_model(tmp_path / "m"), config(tmp_path, model_init_kwargs={"foo": 1}), ROWS)


def test_lora_targets_the_model_lacks_are_one_line(tmp_path):
    from peft import LoraConfig

    model = save_tiny_chat_model(tmp_path / "m")
    with pytest.raises(OrpoError, match=r"^--lora_target_modules nope: Target modules \{'nope'\} not found in the "
                                        r"base model"):
        set_up(model, config(tmp_path), ROWS, peft_config=LoraConfig(r=4, target_modules=["nope"]))
    with pytest.raises(OrpoError, match=r"lm_head shares its weight with the input embedding \(tied\)"):
        set_up(tiny_llama(tied=True), config(tmp_path), ROWS, processing_class=chatml_tokenizer(),
               peft_config=LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))


def test_each_role_reads_its_split_of_a_hub_dataset(tmp_path, monkeypatch):
    import orpo.run.setup as module

    seen = []
    monkeypatch.setattr(module, "prepare_data", lambda args, source, tok, split, name: seen.append((source, split, name)))
    args = config(tmp_path, dataset_split="train_prefs", eval_split="test_prefs")
    prepare_source("org/prefs", chatml_tokenizer(), args, "train")
    prepare_source("org/prefs", chatml_tokenizer(), args, "eval")
    prepare_source({"a": ROWS, "b": "org/b"}, chatml_tokenizer(), args, "eval")
    assert seen == [("org/prefs", "train_prefs", "org/prefs"), ("org/prefs", "test_prefs", "org/prefs"),
                    (ROWS, "test_prefs", "eval_a dataset"), ("org/b", "test_prefs", "org/b")]
    assert prepare_source(None, chatml_tokenizer(), args, "eval") is None


def test_dropout_is_disabled_on_the_model_given(tmp_path):
    path = save_tiny_chat_model(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.5}))
    setup = set_up(path, config(tmp_path), ROWS)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in setup.model.model.layers)


def test_encoder_decoder_is_read_from_the_model_not_the_flag(tmp_path):
    """A T5 directory loads as T5ForConditionalGeneration with the flag unset, and its tokenizer gets the
    encoder-decoder template; the flag set True on a decoder-only model is one line, before the data."""
    from transformers import T5ForConditionalGeneration

    from orpo.data.render import ENCODER_DECODER_TEMPLATE
    from tiny import save_tiny_t5

    rows = [{"prompt": "the sky is", "chosen": "blue", "rejected": "red"}]
    setup = set_up(save_tiny_t5(tmp_path / "t5"), config(tmp_path), rows)
    assert type(setup.model) is T5ForConditionalGeneration
    assert setup.processing_class.chat_template == ENCODER_DECODER_TEMPLATE
    assert setup.train.pairs[0].prompt_ids == setup.processing_class("the sky is")["input_ids"]
    with pytest.raises(OrpoError, match=r"^--is_encoder_decoder true: LlamaForCausalLM is a decoder-only model") as err:
        set_up(tiny_llama(), config(tmp_path, is_encoder_decoder=True), ROWS, processing_class=chatml_tokenizer())
    assert "\n" not in str(err.value)
