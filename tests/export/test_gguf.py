"""gguf.py: a model directory → GGUF, loaded back with transformers (`gguf_file=`) and compared with the source.

Tiny random models (Llama tied and untied, Mistral, Qwen2 with its q/k/v biases) with a byte-level ChatML
tokenizer run by default; SmolLM2-135M-Instruct (`real_model`) checks a real model, its tokenizer and chat
template (bf16 and q8_0 with `-m slow`: transformers takes ~10 s to load each file). Tolerances are max |Δ logit| against the fp32 source, measured on this machine (2-core Intel Xeon,
CPU) with a margin:

    outtype   tiny Llama (logits ~1)   SmolLM2-135M (max |logit| 39)   file size (SmolLM2)
    f32       0.0                      0.0                             540 MB
    f16       1.7e-4   (test: 1e-3)    0.031 (test: 0.1)               271 MB
    bf16      1.2e-3   (test: 5e-3)    0.22  (test: 0.6)               271 MB
    q8_0      4.5e-3   (test: 2e-2)    1.09  (test: 2.5)               145 MB

(SmolLM2: the 30-token chat prompt of MESSAGES; the argmax agrees at every position in every outtype, and
the greedy 20-token answer to "What is the capital of France?" is the source's in f32, f16 and bf16; q8_0's
differs in one token.) Where llama-cpp-python is installed (0.3.36, built here), two more tests run the file
in llama.cpp itself and compare q8_0 with llama.cpp's own quantizer.
"""
import json

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q, GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from orpo.errors import OrpoError
from orpo.export.gguf import (export_gguf, interleave_rotary_rows, pre_tokenizer_name, storage_type,
                              LLAMA3_SPLIT, QWEN2_SPLIT)
from tiny import byte_level_chatml_tokenizer, chatml_tokenizer

TINY_TOLERANCE = {"f32": 1e-4, "f16": 1e-3, "bf16": 5e-3, "q8_0": 2e-2}
SMOLLM2_TOLERANCE = {"f32": 1e-4, "f16": 0.1, "bf16": 0.6, "q8_0": 2.5}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the sky is blue, what is 2 + 2?"}]


def save_tiny(path, config_class=transformers.LlamaConfig, tokenizer=None, seed=0, **overrides):
    """A tiny random causal LM of `config_class` with `tokenizer` (byte-level ChatML), saved to `path`."""
    tokenizer = tokenizer if tokenizer is not None else byte_level_chatml_tokenizer()
    fields = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**{**fields, **overrides}))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_gguf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def max_logit_difference(a, b, ids) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


PROMPT = torch.tensor([[5, 9, 17, 33, 65, 120, 200, 250, 3, 4]])


@pytest.mark.parametrize("tied", [True, False])
def test_f32_llama_round_trip_is_exact_and_a_tied_head_is_not_written(tmp_path, tied):
    source_dir = save_tiny(tmp_path / "src", tie_word_embeddings=tied)
    exported = export_gguf(source_dir, tmp_path / "out" / "model.gguf", "f32")
    assert exported.architecture == "llama" and exported.path.stat().st_size == exported.size
    assert not (tmp_path / "out" / "model.gguf.partial").exists()
    assert ("output.weight" in tensor_types(exported.path)) is not tied
    source, loaded = AutoModelForCausalLM.from_pretrained(source_dir).eval(), load_gguf(exported.path)
    assert loaded.config.tie_word_embeddings is tied
    assert max_logit_difference(source, loaded, PROMPT) <= TINY_TOLERANCE["f32"]


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_lossy_outtypes_store_matrices_in_the_outtype_vectors_in_f32_within_tolerance(tmp_path, outtype):
    source_dir = save_tiny(tmp_path / "src")
    exported = export_gguf(source_dir, tmp_path / f"{outtype}.gguf", outtype)
    types = tensor_types(exported.path)
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.1.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == outtype.upper()
    difference = max_logit_difference(AutoModelForCausalLM.from_pretrained(source_dir).eval(),
                                      load_gguf(exported.path), PROMPT)
    assert 0 < difference <= TINY_TOLERANCE[outtype]


@pytest.mark.parametrize("config_class, model_type, architecture, extra", [
    (transformers.MistralConfig, "mistral", "llama", {"sliding_window": None}),
    # Qwen2's tokenizer class adds <|endoftext|> when it loads, and Qwen2 pads its embedding past the vocabulary
    (transformers.Qwen2Config, "qwen2", "qwen2", {"tie_word_embeddings": True, "vocab_size": 320}),
])
def test_mistral_and_qwen2_round_trip_exactly_in_f32(tmp_path, config_class, model_type, architecture, extra):
    source_dir = save_tiny(tmp_path / "src", config_class, **extra)
    source = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    assert source.config.model_type == model_type
    exported = export_gguf(source_dir, tmp_path / "model.gguf", "f32")
    assert exported.architecture == architecture
    if model_type == "qwen2":  # Qwen2's q/k/v biases, stored as f32 vectors
        assert tensor_types(exported.path)["blk.0.attn_q.bias"] == "F32"
    assert max_logit_difference(source, load_gguf(exported.path), PROMPT) <= TINY_TOLERANCE["f32"]


def test_tokenizer_metadata_and_chat_template_survive(tmp_path):
    source_dir = save_tiny(tmp_path / "src")
    exported = export_gguf(source_dir, tmp_path / "model.gguf", "f16")
    source, loaded = AutoTokenizer.from_pretrained(source_dir), AutoTokenizer.from_pretrained(
        tmp_path, gguf_file="model.gguf")
    assert loaded.chat_template == source.chat_template and exported.chat_template
    text = source.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == text
    assert loaded(text)["input_ids"] == source(text)["input_ids"]
    fields = GGUFReader(exported.path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == source.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.padding_token_id"].contents() == source.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[source.convert_tokens_to_ids("<|im_start|>")] == 3  # CONTROL: kept whole by llama.cpp
    assert types[source.convert_tokens_to_ids("the")] == 1  # NORMAL


def test_unused_embedding_rows_become_unused_placeholder_tokens(tmp_path):
    tokenizer = byte_level_chatml_tokenizer()
    source_dir = save_tiny(tmp_path / "src", tokenizer=tokenizer, vocab_size=len(tokenizer) + 3)
    fields = GGUFReader(export_gguf(source_dir, tmp_path / "model.gguf", "f32").path).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tokenizer) + 3 and tokens[-1] == f"[PAD{len(tokenizer) + 2}]" and types[-1] == 5


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer (sentencepiece BPE with byte fallback, "▁" for spaces) over a few words."""
    pieces = ["▁", "t", "h", "e", "s", "k", "y", "i", "b", "l", "u", "▁t", "he", "▁the", "▁s", "▁sk", "▁sky",
              "▁i", "▁is", "▁b", "▁bl", "ue", "▁blue", "<|im_start|>", "<|im_end|>"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update((piece, 259 + i) for i, piece in enumerate(pieces))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "s"), ("▁s", "k"), ("▁sk", "y"), ("▁", "i"), ("▁i", "s"),
              ("▁", "b"), ("▁b", "l"), ("u", "e"), ("▁bl", "ue")]
    tokenizer = transformers.LlamaTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = chatml_tokenizer().chat_template
    return tokenizer


def test_sentencepiece_tokenizer_is_written_as_llama_with_scores_and_byte_tokens(tmp_path):
    tokenizer = sentencepiece_tokenizer()
    source_dir = save_tiny(tmp_path / "src", tokenizer=tokenizer)
    exported = export_gguf(source_dir, tmp_path / "model.gguf", "f32")
    fields = GGUFReader(exported.path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.pre" not in fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    assert types[tokens.index("<0x41>")] == 6 and types[0] == 2 and types[1] == 3  # BYTE, UNKNOWN, CONTROL
    # llama.cpp merges the best-scored pair first: scores follow the merges' order
    assert scores[tokens.index("▁t")] > scores[tokens.index("he")] > scores[tokens.index("▁the")]
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in ["the sky is blue!", "<|im_start|>user\nthe sky<|im_end|>"]:
        assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max_logit_difference(AutoModelForCausalLM.from_pretrained(source_dir).eval(), load_gguf(exported.path),
                                torch.tensor([[1, 260, 270, 275, 281]])) <= TINY_TOLERANCE["f32"]


def test_interleave_rotary_rows_pairs_each_half_and_transformers_undoes_it():
    heads, head_dim = 2, 4  # head h: rows [h.a0, h.a1, h.b0, h.b1] → [h.a0, h.b0, h.a1, h.b1]
    weight = np.arange(heads * head_dim * 3, dtype=np.float32).reshape(heads * head_dim, 3)
    interleaved = interleave_rotary_rows(weight, heads)
    assert [row[0] for row in interleaved] == [0, 6, 3, 9, 12, 18, 15, 21]
    undo = LlamaTensorProcessor()._reverse_permute_weights
    np.testing.assert_array_equal(undo(interleaved, heads, heads), weight)
    bias = np.arange(8, dtype=np.float32)
    assert interleave_rotary_rows(bias, heads).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_storage_types():
    assert storage_type((64,), "q8_0") == Q.F32 and storage_type((64, 64), "f32") == Q.F32
    assert storage_type((64, 64), "q8_0") == Q.Q8_0 and storage_type((64, 64), "bf16") == Q.BF16
    assert storage_type((64, 48), "q8_0") == Q.F16  # rows that are not whole 32-value blocks


def test_pre_tokenizer_names_from_tokenizer_json_structure():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    no_regex = {**byte_level, "use_regex": False}
    split = lambda regex: {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    sequence = lambda *steps: {"type": "Sequence", "pretokenizers": list(steps)}
    assert pre_tokenizer_name(byte_level) == "gpt-2"  # llama.cpp refuses "gpt2" ("unknown pre-tokenizer type")
    assert pre_tokenizer_name(sequence({"type": "Digits", "individual_digits": True}, byte_level)) == "smollm"
    assert pre_tokenizer_name(sequence(split(LLAMA3_SPLIT), no_regex)) == "llama-bpe"
    assert pre_tokenizer_name(sequence(split(QWEN2_SPLIT), no_regex)) == "qwen2"
    assert pre_tokenizer_name(sequence(split(r"\s+"), no_regex)) is None
    assert pre_tokenizer_name(None) is None
    assert pre_tokenizer_name({"type": "Whitespace"}) is None


def test_what_cannot_be_exported_is_one_line(tmp_path):
    with pytest.raises(OrpoError, match=r"no such model directory$"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(OrpoError, match=r"LoRA adapter .*\(use --merge\)$"):
        export_gguf(adapter, tmp_path / "x.gguf")
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)
                                 ).save_pretrained(gpt2)
    with pytest.raises(OrpoError, match=r"^cannot export model type 'gpt2' to GGUF; supported: llama, mistral, qwen2$"):
        export_gguf(gpt2, tmp_path / "x.gguf")
    word_level = save_tiny(tmp_path / "word", tokenizer=chatml_tokenizer())
    with pytest.raises(OrpoError, match=r"^cannot write a WordLevel tokenizer to GGUF"):
        export_gguf(word_level, tmp_path / "x.gguf")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((gpt2 / "model.safetensors").read_bytes())
    with pytest.raises(OrpoError, match=r"no_config: cannot read its config.json"):
        export_gguf(no_config, tmp_path / "x.gguf")
    scaled = save_tiny(tmp_path / "scaled", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 10000.0})
    with pytest.raises(OrpoError, match=r"rotary scaling 'linear'"):
        export_gguf(scaled, tmp_path / "x.gguf")
    with pytest.raises(OrpoError, match=r"--outtype q4: choose one of f32, f16, bf16, q8_0"):
        export_gguf(scaled, tmp_path / "x.gguf", "q4")
    # Gemma 4: its config holds head_dim per layer, which the global config refuses to answer
    gemma4 = save_tiny(tmp_path / "gemma4", transformers.Gemma4TextConfig, head_dim=8, global_head_dim=16,
                       hidden_size_per_layer_input=8, vocab_size_per_layer_input=64)
    with pytest.raises(OrpoError, match=r"^cannot export model type 'gemma4_text' to GGUF; supported: llama, mistral, "
                                        r"qwen2$"):
        export_gguf(gemma4, tmp_path / "x.gguf")
    per_layer = save_tiny(tmp_path / "per_layer")  # a Llama config.json with per-layer overrides
    config = json.loads((per_layer / "config.json").read_text())
    config["per_layer_config"] = {"1": {"num_key_value_heads": 4}}
    (per_layer / "config.json").write_text(json.dumps(config))
    with pytest.raises(OrpoError, match=r"^cannot export a llama model whose layers differ \(num_key_value_heads: "
                                        r"per_layer_config\) to GGUF; llama.cpp's llama gives every layer one shape$"):
        export_gguf(per_layer, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


@pytest.fixture(scope="module")
def smollm2_source():
    from orpo.train.models import fetch_smollm2

    directory = fetch_smollm2()
    return (directory, AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(directory))


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_source, tmp_path_factory):
    """outtype → (the exported file, the model transformers loads from it), each made once. transformers
    builds gguf's tensor name map once per submodule (9 s for SmolLM2); one map per architecture here."""
    import functools

    import gguf

    out = tmp_path_factory.mktemp("smollm2")
    patch = pytest.MonkeyPatch()
    patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    cache = {}

    def exported(outtype):
        if outtype not in cache:
            path = export_gguf(smollm2_source[0], out / f"smollm2-{outtype}.gguf", outtype)
            cache[outtype] = path, load_gguf(path.path)
        return cache[outtype]

    yield exported
    patch.undo()


def chat_ids(tokenizer, messages):
    return torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       return_dict=True)["input_ids"]])


@pytest.mark.real_model
@pytest.mark.parametrize("outtype", ["f32", "f16", pytest.param("bf16", marks=pytest.mark.slow),
                                     pytest.param("q8_0", marks=pytest.mark.slow)])
def test_smollm2_logits_match_the_source(smollm2_source, smollm2_gguf, outtype):
    """SmolLM2-135M-Instruct (tied embeddings, byte-level BPE, ChatML with a default system prompt): logits
    on a chat prompt within the module docstring's tolerance; bf16 and q8_0 with -m slow (a load is ~10 s)."""
    _, model, tokenizer = smollm2_source
    exported, loaded = smollm2_gguf(outtype)
    assert max_logit_difference(model, loaded, chat_ids(tokenizer, MESSAGES)) <= SMOLLM2_TOLERANCE[outtype]


@pytest.mark.real_model
def test_smollm2_greedy_answers_are_identical_in_f32_and_f16(smollm2_source, smollm2_gguf):
    _, model, tokenizer = smollm2_source
    ids = chat_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    greedy = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    expected = model.generate(ids, **greedy)
    for outtype in ("f32", "f16"):
        assert torch.equal(smollm2_gguf(outtype)[1].generate(ids, **greedy), expected), outtype


@pytest.mark.real_model
def test_smollm2_tokenizer_and_template_survive(smollm2_source, smollm2_gguf):
    _, _, tokenizer = smollm2_source
    path = smollm2_gguf("f16")[0].path
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert loaded.chat_template == tokenizer.chat_template
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # its tokenizer.json: ByteLevel alone


@pytest.mark.real_model
def test_llama_cpp_answers_like_transformers(smollm2_source, tmp_path):
    """Where llama-cpp-python is installed: llama.cpp loads the exported SmolLM2, tokenizes a chat prompt to
    transformers' ids, applies the chat template stored in the file and answers a fixed prompt greedily with
    transformers' words. (It found that llama.cpp spells GPT-2's pre-tokenizer "gpt-2": "gpt2" does not load.)"""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; "
                                    "pip install llama-cpp-python to run llama.cpp on the exported file")
    directory, model, tokenizer = smollm2_source
    path = export_gguf(directory, tmp_path / "smollm2-f32.gguf", "f32").path
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, seed=0, verbose=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
    answer = llm.create_chat_completion(messages, max_tokens=20, temperature=0.0)["choices"][0]["message"]["content"]
    ids = chat_ids(tokenizer, messages)
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
    assert answer.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()


@pytest.mark.real_model
def test_q8_0_tensors_are_llama_cpps_own_quantization(smollm2_source, tmp_path):
    """Where llama-cpp-python is installed: llama.cpp's own quantizer (llama_model_quantize) turns the f32
    export into q8_0 with exactly the bytes of orpo's q8_0 export, tensor for tensor."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    directory = smollm2_source[0]
    f32 = export_gguf(directory, tmp_path / "f32.gguf", "f32").path
    ours = export_gguf(directory, tmp_path / "q8_0.gguf", "q8_0").path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp_path / "theirs.gguf").encode(),
                                          ctypes.byref(params)) == 0
    theirs = {t.name: t for t in GGUFReader(tmp_path / "theirs.gguf").tensors}
    mine = {t.name: t for t in GGUFReader(ours).tensors}
    assert set(mine) == set(theirs)
    for name, tensor in mine.items():
        assert tensor.tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs[name].data)), name


def test_an_encoder_decoder_model_is_refused_in_one_line(tmp_path, capsys):
    """GGUF export (llama.cpp) does not apply to T5 / BART: one line, from `orpo export --gguf` and from the check
    `orpo train --export_gguf` makes at plan time (tests/commands/test_cli.py runs that one)."""
    from orpo.commands.cli import main
    from orpo.export.gguf import check_exportable
    from tiny import save_tiny_t5, t5_tokenizer, tiny_t5

    line = ("GGUF export does not apply to encoder-decoder models (t5): llama.cpp runs decoder-only ones; the saved "
            "safetensors model is the result (transformers loads it)")
    with pytest.raises(OrpoError) as err:
        check_exportable(tiny_t5().config, t5_tokenizer())
    assert str(err.value) == line
    model_dir = save_tiny_t5(tmp_path / "t5")
    with pytest.raises(OrpoError) as err:
        export_gguf(model_dir, str(tmp_path / "t5.gguf"))
    assert str(err.value) == line
    assert main(["export", model_dir, "--gguf", str(tmp_path / "t5.gguf")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"orpo: error: {line}"
    assert not (tmp_path / "t5.gguf").exists()
