"""commands/export.py: what `orpo export` writes for a model directory and for a peft adapter directory
(--merged keeps the merged model, --merge only uses it), and its one-line refusals."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from orpo.commands.export import run_export
from orpo.errors import OrpoError
from orpo.train.models import load_model
from tiny import byte_level_chatml_tokenizer, tiny_chat_model

IDS = torch.tensor([[3, 14, 15, 92, 65, 7]])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """(base dir, adapter dir, the adapter model): a tiny Llama with a byte-level ChatML tokenizer and a
    LoRA adapter on q_proj and v_proj with random (non-zero) weights."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = byte_level_chatml_tokenizer()
    tiny_chat_model(tokenizer).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = get_peft_model(load_model(str(root / "base")), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", model.eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_merged_keeps_the_merged_model_and_exports_the_gguf_from_it(adapter, tmp_path, capsys):
    _, adapter_dir, adapter_model = adapter
    merged, gguf = tmp_path / "merged", tmp_path / "gguf" / "model.gguf"
    run_export(str(adapter_dir), str(gguf), "f32", merged=str(merged))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{merged}: {adapter_dir} merged into its base model (safetensors)"
    assert lines[1].startswith(f"{gguf}: ") and lines[1].endswith("f32, llama, 21 tensors")
    assert lines[2] == f"{gguf.parent / 'Modelfile'}: ollama create NAME -f {gguf.parent / 'Modelfile'}"
    expected = logits(adapter_model)
    assert (logits(AutoModelForCausalLM.from_pretrained(merged)) - expected).abs().max() <= 1e-5
    assert (logits(load_model(str(gguf))) - expected).abs().max() <= 1e-4  # f32's tolerance (test_gguf.py)


def test_merge_exports_the_merged_model_without_keeping_it(adapter, tmp_path, capsys):
    _, adapter_dir, adapter_model = adapter
    gguf = tmp_path / "model.gguf"
    run_export(str(adapter_dir), str(gguf), "f32", modelfile=False, merge=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    assert (logits(load_model(str(gguf))) - logits(adapter_model)).abs().max() <= 1e-4


def test_refusals_are_one_line(adapter, tmp_path):
    base_dir, adapter_dir, _ = adapter
    with pytest.raises(OrpoError, match="nothing to write; give --gguf FILE and/or --merged DIR"):
        run_export(str(base_dir))
    with pytest.raises(OrpoError, match="not a peft adapter directory .* export it without --merge / --merged"):
        run_export(str(base_dir), str(tmp_path / "m.gguf"), merge=True)
    with pytest.raises(OrpoError, match=r"merge it into its base model first \(use --merge\)"):
        run_export(str(adapter_dir), str(tmp_path / "m.gguf"))
    assert not any(tmp_path.iterdir())
