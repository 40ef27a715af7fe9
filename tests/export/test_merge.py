"""export/merge.py: a LoRA adapter merged into its base computes what the adapter model computes, and loads
without peft; what is not an adapter directory, or cannot be merged exactly, is one OrpoError line."""
import json
import re
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from orpo.errors import OrpoError
from orpo.export.merge import adapter_base, is_adapter_dir, merge_adapter
from orpo.train.models import load_model
from tiny import chatml_tokenizer, tiny_llama


def _base_dir(path, tied=False):
    tiny_llama(seed=1, tied=tied).save_pretrained(path)
    chatml_tokenizer().save_pretrained(path)
    return str(path)


def _adapter(base_dir, path, targets):
    """A LoRA adapter on the base in `base_dir` with random (non-zero) A and B, saved to `path`; the adapter model."""
    model = get_peft_model(load_model(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(path)
    return model.eval()


IDS = torch.tensor([[3, 4, 7, 8, 9, 10, 2, 5], [6, 11, 12, 13, 14, 15, 16, 17]])


def test_merged_model_computes_the_adapter_models_logits_and_loads_without_peft(tmp_path, monkeypatch):
    base = _base_dir(tmp_path / "base")
    adapter = _adapter(base, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj", "lm_head"])
    assert is_adapter_dir(str(tmp_path / "adapter")) and adapter_base(str(tmp_path / "adapter")) == base
    with torch.no_grad():
        expected = adapter(input_ids=IDS).logits
        assert not torch.allclose(expected, load_model(base)(input_ids=IDS).logits, atol=1e-3)  # B is not zero

    out = tmp_path / "merged"
    assert merge_adapter(str(tmp_path / "adapter"), str(out)) == str(out)
    assert not is_adapter_dir(str(out)) and (out / "model.safetensors").is_file()
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in key or "base_layer" in key for key in weights)
    assert weights.keys() == load_file(tmp_path / "base" / "model.safetensors").keys()

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails from here on
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged) is LlamaForCausalLM
    with torch.no_grad():
        got = merged(input_ids=IDS).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out).chat_template == chatml_tokenizer().chat_template


def test_the_base_can_be_named_when_its_recorded_path_moved(tmp_path):
    base = _base_dir(tmp_path / "base")
    _adapter(base, tmp_path / "adapter", ["q_proj"])
    moved = tmp_path / "moved"
    (tmp_path / "base").rename(moved)
    with pytest.raises(OrpoError, match=r"no such model directory .*pass the base model explicitly") as err:
        merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "a"))
    assert "\n" not in str(err.value)
    merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "b"), base=str(moved))
    assert (tmp_path / "b" / "model.safetensors").is_file()
    assert (tmp_path / "b" / "tokenizer_config.json").is_file()  # the base's tokenizer: the adapter dir has none


def test_not_an_adapter_directory_is_one_line(tmp_path):
    base = _base_dir(tmp_path / "base")
    assert not is_adapter_dir(base) and not is_adapter_dir(str(tmp_path / "nothing"))
    cases = {base: "not a peft adapter directory (no adapter_config.json)", str(tmp_path / "nothing"): "no such directory"}
    for path, message in cases.items():
        with pytest.raises(OrpoError, match=re.escape(message)) as err:
            merge_adapter(path, str(tmp_path / "out"))
        assert "\n" not in str(err.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(OrpoError, match=r"adapter_config.json: invalid JSON"):
        merge_adapter(str(tmp_path / "broken"), str(tmp_path / "out"))
    (tmp_path / "broken" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(OrpoError, match=r"names no base model"):
        merge_adapter(str(tmp_path / "broken"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_output_dir_with_files_and_the_adapter_dir_itself_are_refused(tmp_path):
    base = _base_dir(tmp_path / "base")
    _adapter(base, tmp_path / "adapter", ["q_proj"])
    with pytest.raises(OrpoError, match="cannot be written over its adapter directory"):
        merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "adapter"))
    with pytest.raises(OrpoError, match="already has files"):
        merge_adapter(str(tmp_path / "adapter"), base)
    merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "out"))
    merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "out"), overwrite=True)


def test_an_adapter_on_a_tied_head_is_refused(tmp_path):
    """lm_head and the input embedding are one weight: merging the head's adapter would change the
    embedding too (orpo train --use_peft refuses such an adapter before training)."""
    base = _base_dir(tmp_path / "base", tied=True)
    with pytest.warns(UserWarning):  # peft's own warning about tied target modules
        _adapter(base, tmp_path / "adapter", ["q_proj", "lm_head"])
    with pytest.raises(OrpoError, match=r"the adapter changes lm_head, and .* ties lm_head to the input embedding"):
        merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_prompt_learning_adapter_has_nothing_to_merge(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "base_model_name_or_path": "org/base"}))
    with pytest.raises(OrpoError, match="a PROMPT_TUNING adapter has no weights to merge"):
        merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "out"))


def test_a_t5_adapter_merges_into_a_plain_t5(tmp_path):
    """An encoder-decoder adapter (peft SEQ_2_SEQ_LM on T5) merged into its base computes the adapter model's
    logits and loads as T5ForConditionalGeneration (load_model reads the config: AutoModelForSeq2SeqLM)."""
    from transformers import T5ForConditionalGeneration

    from tiny import save_tiny_t5

    base = save_tiny_t5(tmp_path / "base")
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, task_type="SEQ_2_SEQ_LM"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
        model.save_pretrained(tmp_path / "adapter")
        labels = torch.tensor([[7, 8, 1]])
        expected = model.eval()(input_ids=IDS[:1, :5], labels=labels).logits
    merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = load_model(str(tmp_path / "merged"))
    assert type(merged) is T5ForConditionalGeneration
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS[:1, :5], labels=labels).logits, expected, atol=1e-5, rtol=0)
