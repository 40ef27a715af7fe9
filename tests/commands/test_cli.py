"""cli.py: `orpo train`, `orpo eval` and `orpo data inspect` on a tiny offline Llama + ChatML tokenizer.

Most commands run in-process through `orpo.commands.cli.main(argv)` (output captured with capsys); a few run
the `orpo` console script in a subprocess to check exit codes and that no traceback is printed.
Nothing is fetched from the Hugging Face hub.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from orpo.commands.cli import launch_world_size, main, parse_train_args, planned_processes
from orpo.data.formats import ACCEPTED_SHAPES
from orpo.data.prepare import prepare_dataset
from orpo.errors import OrpoError
from orpo.train.models import load_model
from tiny import byte_level_chatml_tokenizer, save_tiny_chat_model, word_level_tokenizer

ORPO = Path(sys.executable).parent / "orpo"

WORDS = ("<unk> user assistant system Hi there Hello Go away ! , . ? you are kind be brief "
         "What is 2 + 4 5 the sky blue green red cat dog a an yes no sure never maybe "
         "How do I help please thanks good bad fine water fire").split(" ") + ["\n"]

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROWS = [
    {"prompt": "What is 2 + 2 ?", "chosen": "4", "rejected": "5"},
    {"prompt": "Hi", "chosen": "Hello there !", "rejected": "Go away"},
    {"prompt": "What is the sky ?", "chosen": "the sky is blue", "rejected": "the sky is green"},
    {"prompt": "How do I help ?", "chosen": "please be kind", "rejected": "never help"},
    {"prompt": "What is a cat ?", "chosen": "a cat is kind", "rejected": "a dog"},
    {"prompt": "is water good ?", "chosen": "yes , water is good", "rejected": "no"},
    {"prompt": "is fire good ?", "chosen": "fire is bad", "rejected": "sure"},
    {"prompt": "How are you ?", "chosen": "fine , thanks", "rejected": "bad"},
]

RECORD_KEYS = {"index", "prompt_tokens", "chosen_tokens", "rejected_tokens", "chosen_logp_mean",
               "rejected_logp_mean", "log_odds", "nll_sum", "nll_tokens"}
METRIC_KEYS = {"loss", "nll", "or_loss", "log_odds", "logps/chosen", "logps/rejected", "accuracy", "margin",
               "tokens", "tokens_per_second", "grad_norm", "learning_rate"}


def chatml_tokenizer():
    """WordLevel over WORDS, split on spaces/punctuation, "\\n" its own token; ChatML special tokens."""
    return word_level_tokenizer(WORDS, ["<|im_start|>", "<|im_end|>"], CHATML, bos="<|im_start|>",
                                eos="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep datasets' cache of the test files out of the user's ~/.cache."""
    import datasets

    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    yield cache
    mp.undo()


def save_model(path, seed=0):
    """A tiny random Llama with this module's ChatML tokenizer, saved to `path`."""
    tok = chatml_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = save_model(tmp_path_factory.mktemp("tiny_llama"))
    reloaded = AutoTokenizer.from_pretrained(path)
    assert reloaded.chat_template == CHATML and reloaded.pad_token == "<|im_end|>"
    assert reloaded.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                        add_generation_prompt=True) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "prefs.jsonl", ROWS)
    write_jsonl(d / "renamed.jsonl", [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
                                      for r in ROWS[:3]])
    write_jsonl(d / "bad_json.jsonl", [ROWS[0], ROWS[1], "{bad json", ROWS[2]])
    write_jsonl(d / "types.jsonl", [{"prompt": "Hi", "chosen": 1, "rejected": 2},
                                    {"prompt": "Hi", "chosen": 3, "rejected": 4}])
    write_jsonl(d / "one_bad.jsonl", [ROWS[0], {"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}, ROWS[1]])
    return d


def subprocess_env(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets_cache"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_orpo(args, tmp_path, timeout=300):
    return subprocess.run([str(ORPO), *map(str, args)], capture_output=True, text=True, env=subprocess_env(tmp_path),
                          cwd=tmp_path, timeout=timeout)


def error_line(err: str) -> str:
    """The one `orpo: error:` line of stderr; it must be the last line and there must be no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("orpo: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    return errors[0]


# ---- bad input: one line, exit code 2 -----------------------------------------------------------------

def expected_errors(data_dir):
    d = data_dir
    shapes = ACCEPTED_SHAPES
    return {
        "missing file": (d / "nope.jsonl", f"{d / 'nope.jsonl'}: no such file"),
        "bad json": (d / "bad_json.jsonl",
                     f"{d / 'bad_json.jsonl'}, line 3: invalid JSON (Expecting property name enclosed in double "
                     "quotes at column 2); expected one JSON object per line (--skip_bad_rows skips bad lines)"),
        "columns": (d / "renamed.jsonl",
                    f"{d / 'renamed.jsonl'}: missing column 'chosen'; columns found: ['question', 'good', 'bad']; "
                    f"accepted shapes: {shapes}"),
        "types": (d / "types.jsonl",
                  f"{d / 'types.jsonl'}: zero usable pairs; kept 0 of 2 pairs; dropped 2: wrong types 2 (first at row 0: "
                  "chosen is int, expected a string or a list of messages)"),
    }


@pytest.mark.parametrize("case", ["missing file", "bad json", "columns", "types"])
@pytest.mark.parametrize("command", [["data", "inspect"], ["eval"]])
def test_bad_data_one_line_exit_2(command, case, model_dir, data_dir, capsys):
    dataset, message = expected_errors(data_dir)[case]
    assert main([*command, "--model", str(model_dir), "--dataset", str(dataset)]) == 2
    out, err = capsys.readouterr()
    line = error_line(err)
    assert line == f"orpo: error: {message}"
    assert "orpo: error" not in out
    if case == "bad json":
        assert str(dataset) in line and "line 3" in line
    if case == "columns":
        assert "['question', 'good', 'bad']" in line and "accepted shapes" in line and "--chosen_column" in line


@pytest.mark.parametrize("command", [["data", "inspect"], ["eval"]])
def test_strict_names_the_dropped_row(command, model_dir, data_dir, capsys):
    dataset = data_dir / "one_bad.jsonl"
    assert main([*command, "--model", str(model_dir), "--dataset", str(dataset), "--strict"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"orpo: error: {dataset}, row 1: pair dropped (chosen == rejected) and --strict is set; "
        "kept 2 of 3 pairs; dropped 1: chosen == rejected 1 (first at row 1)")


def test_without_strict_the_bad_row_is_dropped_and_reported(model_dir, data_dir, capsys):
    assert main(["data", "inspect", "--model", str(model_dir), "--dataset", str(data_dir / "one_bad.jsonl"),
                 "-n", "0"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "kept 2 of 3 pairs; dropped 1: chosen == rejected 1 (first at row 1)"


@pytest.mark.parametrize("command", [["data", "inspect"], ["eval"]])
def test_missing_model_path(command, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--model", "./no/such/model", "--dataset", str(data_dir / "prefs.jsonl")]) == 2
    assert error_line(capsys.readouterr().err) == "orpo: error: ./no/such/model: no such model directory"


def test_train_subprocess_missing_model_no_traceback(data_dir, tmp_path):
    result = run_orpo(["train", "--model", "./no/such/model", "--dataset", data_dir / "prefs.jsonl",
                       "--output_dir", tmp_path / "out", "--report_to", "none"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert error_line(result.stderr) == "orpo: error: ./no/such/model: no such model directory"
    assert not (tmp_path / "out").exists()


def test_train_subprocess_zero_pairs_no_traceback(model_dir, data_dir, tmp_path):
    dataset = data_dir / "types.jsonl"
    result = run_orpo(["train", "--model", model_dir, "--dataset", dataset, "--output_dir", tmp_path / "out",
                       "--report_to", "none"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert error_line(result.stderr) == (
        f"orpo: error: {dataset}: zero usable pairs; kept 0 of 2 pairs; dropped 2: wrong types 2 (first at row 0: "
        "chosen is int, expected a string or a list of messages)")


def test_inspect_subprocess_bad_json_no_traceback(model_dir, data_dir, tmp_path):
    dataset = data_dir / "bad_json.jsonl"
    result = run_orpo(["data", "inspect", "--model", model_dir, "--dataset", dataset], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert error_line(result.stderr).startswith(f"orpo: error: {dataset}, line 3: invalid JSON")


def test_train_subprocess_unknown_flag_no_traceback(model_dir, data_dir, tmp_path):
    result = run_orpo(["train", "--model", model_dir, "--dataset", data_dir / "prefs.jsonl",
                       "--output_dir", tmp_path / "out", "--no_such_flag", "1"], tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert "--no_such_flag" in result.stderr.strip().splitlines()[-1]


# ---- column mapping and inspect output ----------------------------------------------------------------

def test_inspect_column_mapping(model_dir, data_dir, capsys):
    assert main(["data", "inspect", "--model", str(model_dir), "--dataset", str(data_dir / "renamed.jsonl"),
                 "--prompt_column", "question", "--chosen_column", "good", "--rejected_column", "bad",
                 "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "=== row 1: prompt 9 tokens, chosen 4, rejected 3  (trained tokens in [[]])" in out
    assert "\n Hi <|im_end|> \n" in out  # the prompt, decoded token by token
    assert "[[Hello there ! <|im_end|>]]" in out and "[[Go away <|im_end|>]]" in out
    assert "[[the sky is blue <|im_end|>]]" in out and "[[the sky is green <|im_end|>]]" in out
    assert out.splitlines()[-1] == "kept 3 of 3 pairs"


def test_inspect_output(model_dir, data_dir, capsys):
    assert main(["data", "inspect", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"),
                 "-n", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "=== row 0: prompt 14 tokens, chosen 2, rejected 2  (trained tokens in [[]])"
    assert "=== row 1: prompt 9 tokens, chosen 4, rejected 3  (trained tokens in [[]])" in lines
    assert "=== row 2" not in out
    # trained tokens (the completions with their <|im_end|>) between the markers; no ANSI codes off a tty
    assert lines[lines.index("--- chosen") + 1] == "[[4 <|im_end|>]]"
    assert lines[lines.index("--- rejected") + 1] == "[[5 <|im_end|>]]"
    assert "[[Hello there ! <|im_end|>]]" in lines and "[[Go away <|im_end|>]]" in lines
    assert "\033[" not in out
    stats = lines[lines.index("=== statistics"):]
    assert stats == [
        "=== statistics",
        "  prompt tokens: min 9, mean 12.2, max 14",
        "  chosen tokens: min 2, mean 4.2, max 6",
        "rejected tokens: min 2, mean 2.8, max 5",
        "rows by shape: prompt/chosen/rejected strings 8",
        "kept 8 of 8 pairs",
    ]


def test_inspect_names_the_columns_not_read_and_a_shape_without_a_prompt_column(model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "questions.jsonl", [
        {"question": "What is the sky ?", "chosen": "the sky is blue", "rejected": "the sky is green"},
        {"question": "What is a cat ?", "chosen": "a cat is kind", "rejected": "a dog"}])
    assert main(["data", "inspect", "--model", str(model_dir), "--dataset", str(dataset), "-n", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "rows by shape: implicit prompt (shared prefix; no prompt column) 2",
        "kept 2 of 2 pairs; columns not read: question (2 rows have an implicit prompt: --prompt_column question "
        "reads it as the prompt)"]
    assert main(["data", "inspect", "--model", str(model_dir), "--dataset", str(dataset), "-n", "0",
                 "--prompt_column", "question"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["rows by shape: prompt/chosen/rejected strings 2",
                                                         "kept 2 of 2 pairs"]


def test_data_prepare_writes_a_set_that_inspect_and_train_read(model_dir, data_dir, tmp_path, capsys):
    """`orpo data prepare --output DIR` once; `--dataset DIR` then gives what the file gives, from the set."""
    prepared = tmp_path / "prepared"
    flags = ["--model", str(model_dir), "--dataset_cache_dir", str(tmp_path / "cache")]
    assert main(["data", "prepare", *flags, "--dataset", str(data_dir / "prefs.jsonl"), "--output", str(prepared)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "kept 8 of 8 pairs"
    assert lines[1].startswith(f"prepared with 1 process, cached at {tmp_path / 'cache'}")
    assert lines[1].endswith(f"; prepared set written to {prepared} (train from it with --dataset {prepared})")
    assert main(["data", "inspect", *flags, "--dataset", str(data_dir / "prefs.jsonl"), "-n", "2"]) == 0
    from_file = capsys.readouterr().out
    assert main(["data", "inspect", *flags, "--dataset", str(prepared), "-n", "2"]) == 0
    assert capsys.readouterr().out == from_file
    # a set prepared with other options is refused in one line
    assert main(["data", "inspect", *flags, "--dataset", str(prepared), "--max_length", "16"]) == 2
    assert "prepared with other data options: max_length 1024 (now 16)" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["train", *flags, "--dataset", str(prepared), "--output_dir", str(out), "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
                 "--disable_tqdm", "true", "--report", "false"]) == 0


def test_train_streaming_trains_the_weights_a_prepared_run_trains(model_dir, data_dir, tmp_path, caplog):
    """--streaming, the source order kept (--streaming_shuffle_buffer 0), against a prepared run read in order
    (sequential sampler): the same pairs in the same steps, so the same weights; the running data totals are
    logged with each step and the model card says the data was streamed."""
    data = tmp_path / "prefs.jsonl"
    rows = ROWS[:2] + [{"prompt": "Hi", "chosen": "yes", "rejected": "yes"}] + ROWS[2:]  # row 2 is dropped
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = ["--model", str(model_dir), "--dataset", str(data), "--max_steps", "3",
             "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
             "--disable_tqdm", "true", "--logging_steps", "1", "--learning_rate", "1e-3", "--seed", "0",
             "--dataset_cache_dir", str(tmp_path / "cache")]
    assert main(["train", *flags, "--output_dir", str(tmp_path / "prepared"),
                 "--train_sampling_strategy", "sequential"]) == 0
    caplog.set_level("INFO", logger="orpo")
    assert main(["train", *flags, "--output_dir", str(tmp_path / "streamed"), "--streaming",
                 "--streaming_shuffle_buffer", "0"]) == 0
    prepared, streamed = (load_file(tmp_path / run / "model.safetensors") for run in ("prepared", "streamed"))
    assert prepared.keys() == streamed.keys()
    assert all(torch.equal(prepared[k], streamed[k]) for k in prepared)
    steps = [json.loads(line) for line in (tmp_path / "streamed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    # accelerate's loader holds the next batch (its end-of-data check): after step 1, 2 batches were read
    assert [(r["stream_rows_read"], r["stream_pairs_kept"], r["stream_pairs_dropped"]) for r in steps] == [
        (5, 4, 1), (7, 6, 1), (9, 8, 1)]
    assert "train data: read 5 rows (pass 1): kept 4 of 5 pairs; dropped 1: chosen == rejected 1 (first at row 2)" \
        in caplog.messages
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the prepared run's set; the stream wrote none
    assert "Streamed (training): the rows read while training" in (tmp_path / "streamed" / "README.md").read_text()


def test_train_streaming_needs_max_steps(model_dir, data_dir, tmp_path, capsys):
    assert main(["train", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"), "--output_dir",
                 str(tmp_path / "out"), "--streaming"]) == 2
    assert "--streaming needs --max_steps: a stream has no length to count epochs by" in capsys.readouterr().err


# ---- eval ---------------------------------------------------------------------------------------------

def odds(logp: float) -> float:
    return logp - math.log1p(-math.exp(logp))


def test_eval_records_and_summary(model_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    assert main(["eval", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"),
                 "--output", str(output)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    records, last = lines[:-1], lines[-1]
    assert list(last) == ["summary"] and last["summary"] == summary
    assert len(records) == len(ROWS) and [r["index"] for r in records] == list(range(len(ROWS)))
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["log_odds"] == pytest.approx(odds(r["chosen_logp_mean"]) - odds(r["rejected_logp_mean"]),
                                              rel=1e-4, abs=1e-5)
        assert r["chosen_logp_mean"] < 0 and r["rejected_logp_mean"] < 0
        assert r["nll_tokens"] == r["prompt_tokens"] + r["chosen_tokens"] - 1  # nll_scope=full
    assert records[0]["prompt_tokens"] == 14 and records[0]["chosen_tokens"] == 2
    assert records[1]["chosen_tokens"] == 4 and records[1]["rejected_tokens"] == 3
    assert summary["pairs"] == len(ROWS)
    assert summary["accuracy"] == sum(r["log_odds"] > 0 for r in records) / len(records)
    assert summary["log_odds"] == pytest.approx(sum(r["log_odds"] for r in records) / len(records))
    nll = sum(r["nll_sum"] for r in records) / sum(r["nll_tokens"] for r in records)
    assert summary["nll"] == pytest.approx(nll)
    assert summary["loss"] == pytest.approx(summary["nll"] + 0.1 * summary["or_loss"])


def test_eval_limit(model_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    assert main(["eval", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"),
                 "--output", str(output), "--limit", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 3 and [r["index"] for r in lines[:2]] == [0, 1]
    assert all(set(r) == RECORD_KEYS for r in lines[:2])
    assert summary["pairs"] == 2 and lines[2] == {"summary": summary}


def test_eval_fast_path_equals_reference(model_dir, data_dir, tmp_path, capsys):
    out = {}
    for name, flags in (("fast", []), ("reference", ["--reference"])):
        out[name] = tmp_path / f"{name}.jsonl"
        assert main(["eval", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"),
                     "--output", str(out[name]), *flags]) == 0
    fast, reference = ([json.loads(line) for line in out[n].read_text().splitlines()] for n in ("fast", "reference"))
    assert [r.get("index") for r in fast] == [r.get("index") for r in reference]
    for got, want in zip(fast[:-1], reference[:-1]):
        assert got["log_odds"] == pytest.approx(want["log_odds"], abs=1e-4)
    assert fast[-1]["summary"]["accuracy"] == reference[-1]["summary"]["accuracy"]


def test_eval_compare_two_models(model_dir, data_dir, tmp_path, capsys):
    """A model against itself: nothing fixed or broken, p = 1, Δ = 0; against another model the
    per-pair file holds each model's log_odds and their difference."""
    other = str(save_model(tmp_path / "other", seed=1))
    output = tmp_path / "compare.jsonl"
    data = str(data_dir / "prefs.jsonl")
    assert main(["eval", "--model", str(model_dir), "--compare", str(model_dir), "--dataset", data]) == 0
    printed = capsys.readouterr().out
    assert "pairs B had wrong and A gets right: 0; the reverse: 0; sign test p = 1" in printed
    assert "mean Δlog_odds (A − B) +0.0000, 95% bootstrap CI [+0.0000, +0.0000]" in printed
    assert main(["eval", "--model", other, "--compare", str(model_dir), "--dataset", data,
                 "--output", str(output)]) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    per_pair, summary = lines[:-1], lines[-1]["summary"]
    assert len(per_pair) == len(ROWS) and summary["pairs"] == len(ROWS)
    for r in per_pair:
        assert r["delta_log_odds"] == pytest.approx(r["log_odds_a"] - r["log_odds_b"])
        assert r["change"] in ("fixed", "broken", "both right", "both wrong")
    assert summary["fixed"] == sum(r["change"] == "fixed" for r in per_pair)
    assert summary["a"]["log_odds"] == pytest.approx(summary["log_odds_a"])
    assert summary["b"]["accuracy"] == pytest.approx(summary["accuracy_b"])


def test_eval_compare_refuses_a_model_with_another_tokenizer(model_dir, data_dir, tmp_path, capsys):
    other = save_tiny_chat_model(tmp_path / "other", seed=1, tokenizer=byte_level_chatml_tokenizer())
    assert main(["eval", "--model", str(model_dir), "--compare", other, "--dataset", str(data_dir / "prefs.jsonl")]) == 2
    assert "tokenizer" in capsys.readouterr().err


# ---- train --------------------------------------------------------------------------------------------

def test_train_evaluates_the_final_model_and_writes_the_pair_file(model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    prefs = str(data_dir / "prefs.jsonl")
    assert main(["train", "--model", str(model_dir), "--dataset", prefs, "--eval_dataset", prefs,
                 "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "4",
                 "--report_to", "none", "--save_strategy", "no", "--save_eval_pairs", "--disable_tqdm", "true"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_runtime" in r]
    assert len(evaluations) == 1 and evaluations[0]["step"] == 1 and evaluations[0]["eval_pairs"] == len(ROWS)
    lines = [json.loads(line) for line in (out / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(lines) == len(ROWS) + 1 and set(lines[0]) == RECORD_KEYS
    assert lines[-1]["summary"]["accuracy"] == evaluations[0]["eval_accuracy"] and lines[-1]["step"] == 1
    card = (out / "README.md").read_text()  # the model card (tests/export/test_card.py tests its content)
    assert f"A fine-tune of `{model_dir}`" in card and f"| held-out | `{prefs}` | 8 | 8 | 0 |" in card


def test_train_end_to_end_subprocess(model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    result = run_orpo(["train", "--model", model_dir, "--dataset", data_dir / "prefs.jsonl", "--output_dir", out,
                       "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
                       "--report_to", "none", "--save_strategy", "no"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"train data: {data_dir / 'prefs.jsonl'}: kept 8 of 8 pairs" in result.stderr

    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "model.safetensors").is_file()
    assert not (out / "pytorch_model.bin").exists()
    trained, initial = load_file(out / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]

    again = run_orpo(["train", "--model", model_dir, "--dataset", data_dir / "prefs.jsonl", "--output_dir", out,
                      "--max_steps", "1", "--report_to", "none"], tmp_path)
    assert again.returncode == 2
    assert error_line(again.stderr).startswith(f"orpo: error: output_dir {out} already has files (README.md, chat_template")
    assert error_line(again.stderr).endswith("; pass --overwrite_output_dir to start a new run there (the previous one "
                                             "is removed), or --resume_from_checkpoint latest to continue its run")
    assert "train data" not in again.stderr  # refused before the data is prepared
    assert load_file(out / "model.safetensors").keys() == trained.keys()  # untouched
    # the same command resumed (a requeued job): the run finished, so it trains nothing and succeeds
    rerun = run_orpo(["train", "--model", model_dir, "--dataset", data_dir / "prefs.jsonl", "--output_dir", out,
                      "--max_steps", "2", "--report_to", "none", "--resume_from_checkpoint", "latest"], tmp_path)
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr
    assert "this run finished at step 2; nothing to resume" in rerun.stderr
    assert all(torch.equal(v, trained[k]) for k, v in load_file(out / "model.safetensors").items())
    assert not (out / "training_args.bin").exists() and (out / "orpo_config.json").is_file()
    for r in steps:
        assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
        assert r["loss"] == pytest.approx(r["nll"] + 0.1 * r["or_loss"], rel=1e-4)
        assert r["margin"] == pytest.approx(r["logps/chosen"] - r["logps/rejected"], abs=1e-5)
        assert r["accuracy"] in (0.0, 0.5, 1.0) and r["tokens"] > 0


def test_train_bf16_without_use_cpu(model_dir, data_dir, tmp_path):
    """`--bf16 true` alone (transformers would stop: "Your setup doesn't support bf16/gpu") trains in
    bf16 autocast on a machine whose only device is the CPU."""
    assert main(["train", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"),
                 "--output_dir", str(tmp_path / "out"), "--bf16", "true", "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
                 "--disable_tqdm", "true"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "orpo_config.json").read_text())["bf16"] is True


def test_train_refuses_lora_on_a_tied_head(model_dir, data_dir, tmp_path, capsys):
    """The fixture's model ties lm_head to the input embedding: merging a head adapter at the end would
    change the embedding too, so the saved model would differ from the trained one."""
    assert main(["train", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"),
                 "--output_dir", str(tmp_path / "out"), "--use_peft", "true", "--lora_target_modules", "q_proj",
                 "lm_head", "--max_steps", "1", "--report_to", "none"]) == 2
    assert "lm_head shares its weight with the input embedding" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_peft_saves_merged_model(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"),
                 "--output_dir", str(out), "--use_peft", "true", "--lora_r", "4",
                 "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--report_to", "none",
                 "--save_strategy", "no", "--disable_tqdm", "true"]) == 0
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert "| LoRA | r 4, alpha 32, dropout 0.05, modules q_proj, v_proj |" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM)
    trained, initial = load_file(out / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert trained.keys() == initial.keys() and not any("lora" in k for k in trained)
    for k in trained:
        changed = not torch.equal(trained[k], initial[k])
        assert changed == (k.endswith(("q_proj.weight", "v_proj.weight"))), k  # only the adapted modules
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML


# ---- --config -----------------------------------------------------------------------------------------

def test_config_yaml_with_flag_override(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("beta: 0.5\nmax_steps: 3\nlearning_rate: 0.001\nuse_peft: true\nlora_target_modules: [q_proj, v_proj]\n")
    model_args, data_args, args = parse_train_args(["--config", str(config), "--model", "m", "--dataset", "d.jsonl",
                                                    "--beta", "0.25"])
    assert (args.beta, args.max_steps, args.learning_rate) == (0.25, 3, 0.001)
    assert args.output_dir == "orpo-output"  # the default when neither gives one
    assert model_args.model == "m" and model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert data_args.dataset == "d.jsonl"


def test_config_file_missing(tmp_path):
    with pytest.raises(OrpoError) as e:
        parse_train_args(["--config", str(tmp_path / "nope.yaml"), "--model", "m", "--dataset", "d.jsonl"])
    assert str(e.value) == f"{tmp_path / 'nope.yaml'}: no such config file"


def test_config_file_missing_via_main(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--model", "m", "--dataset", "d.jsonl"]) == 2
    assert error_line(capsys.readouterr().err) == f"orpo: error: {tmp_path / 'nope.yaml'}: no such config file"


def test_output_dir_equals_form_is_kept():
    _, _, args = parse_train_args(["--model", "m", "--dataset", "d.jsonl", "--output_dir=mine"])
    assert args.output_dir == "mine"


def test_config_yaml_null_means_none(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("max_length: null\n")
    _, _, args = parse_train_args(["--config", str(config), "--model", "m", "--dataset", "d.jsonl"])
    assert args.max_length is None


def test_remote_code_is_off_unless_asked(monkeypatch, tmp_path):
    _, _, config = parse_train_args(["--model", "m", "--dataset", "d.jsonl"])
    assert config.trust_remote_code is False
    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(OrpoError, match="cannot load a causal LM: stop here"):
        load_model(str(tmp_path))
    assert seen["trust_remote_code"] is False


# --- one config home: eval and inspect take their flags from the training fields -------------------

@pytest.mark.parametrize("command", ["eval", "data inspect"])
def test_subcommand_flags_are_the_config_fields(command):
    """Every flag of eval/inspect is a field of ORPOConfig or of the argument dataclasses in
    orpo.train.config, with that field's default and help (nothing retyped in cli.py)."""
    import dataclasses

    from orpo.commands.cli import _subcommand_parser
    from orpo.train.config import DataArguments, EvalArguments, InspectArguments, ModelArguments, ORPOConfig

    homes = {}
    for cls in (ORPOConfig, ModelArguments, DataArguments, EvalArguments, InspectArguments):
        for f in dataclasses.fields(cls):
            homes.setdefault(f.name, f)
    actions = [a for a in _subcommand_parser(command)._actions if a.dest != "help"]
    assert {"model", "dataset", "max_length", "max_prompt_length", "prompt_column", "label_map", "strict"} <= {
        a.dest for a in actions}
    for action in actions:
        if action.option_strings[0].startswith("--no_"):  # HfArgumentParser's negation of a True-default bool
            continue
        home = homes[action.dest]
        default = None if home.default is dataclasses.MISSING else home.default
        assert action.default == default, action.dest
        assert action.help.startswith(home.metadata["help"][:40]), action.dest


def test_eval_and_inspect_take_the_new_data_fields(model_dir, tmp_path, capsys):
    """--prompt_column a,b joins two prompt columns, in inspect and eval alike (same fields as train)."""
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "What is", "input": "the sky ?", "chosen": "the sky is blue", "rejected": "no"},
        {"instruction": "Hi", "input": "", "chosen": "Hello there !", "rejected": "Go away"},
    ])
    flags = ["--model", str(model_dir), "--dataset", str(path), "--prompt_column", "instruction,input"]
    assert main(["data", "inspect", *flags, "-n", "1"]) == 0
    out = capsys.readouterr().out
    joined = prepare_dataset([{"prompt": "What is\n\nthe sky ?", "chosen": "the sky is blue", "rejected": "no"}],
                             chatml_tokenizer()).pairs[0]
    assert out.splitlines()[0].startswith(f"=== row 0: prompt {len(joined.prompt_ids)} tokens")
    assert "kept 2 of 2 pairs" in out
    assert main(["eval", *flags]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 2


def test_subcommand_unknown_flag_is_one_line(model_dir, capsys):
    assert main(["eval", "--model", str(model_dir), "--dataset", "x.jsonl", "--batchsize", "3"]) == 2
    assert "orpo eval: unknown options ['--batchsize', '3']" in capsys.readouterr().err


def test_inconsistent_label_options_are_one_line(model_dir, data_dir, capsys):
    code = main(["data", "inspect", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"),
                 "--response_columns", "a,b", "--label_column", "l"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs all three of --response_columns, --label_column and --label_map" in err


# --- every shape trains from the CLI and from Python with identical pairs ------------------------------

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
SHAPE_CASES = {  # fixture file → the data fields it needs (the same dict for the CLI flags and ORPOConfig)
    "llamafactory_sharegpt_dpo.json": {},
    "llamafactory_openai_tags.jsonl": {},
    "trl_content_parts.jsonl": {},
    "llamafactory_v1_dpo.jsonl": {},
    "pandalm_testset.json": {"prompt_column": "instruction,input", "response_columns": "response1,response2",
                             "label_column": "annotator1,annotator2,annotator3",
                             "label_map": {"1": "response1", "2": "response2", "0": "tie"}},
    "autoj_pairwise.jsonl": {"response_columns": "response 1,response 2", "label_column": "label",
                             "label_map": {"0": "response 1", "1": "response 2", "2": "tie"}},
    "ultrafeedback_raw.jsonl": {"binarize": "best_vs_random"},
}
ONE_STEP = {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": "none", "save_strategy": "no",
            "report": False, "disable_tqdm": True}


def _flags(fields: dict) -> list[str]:
    return [arg for key, value in fields.items()
            for arg in (f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value))]


def _rows(path: Path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]


@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory):
    """A tiny model with a byte-level tokenizer: real-world texts keep distinct ids (no <unk>)."""
    from tiny import byte_level_chatml_tokenizer, tiny_chat_model

    path = tmp_path_factory.mktemp("byte_model")
    tok = byte_level_chatml_tokenizer()
    tiny_chat_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("fixture", SHAPE_CASES)
def test_every_shape_trains_from_cli_and_python_with_identical_pairs(fixture, byte_model_dir, tmp_path, monkeypatch):
    model_dir = byte_model_dir
    from orpo import ORPOConfig, ORPOTrainer

    fields = SHAPE_CASES[fixture]
    seen = []
    real_train = ORPOTrainer.train

    def spy(self, *args, **kwargs):  # the pairs the CLI's trainer trains on, then a real step
        seen.append(list(self.train_dataset))
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(ORPOTrainer, "train", spy)
    assert main(["train", "--model", str(model_dir), "--dataset", str(FIXTURES / fixture), "--output_dir",
                 str(tmp_path / "cli"), *_flags({**fields, **ONE_STEP})]) == 0
    config = ORPOConfig(output_dir=str(tmp_path / "python"), **fields, **ONE_STEP)
    trainer = ORPOTrainer(model=load_model(str(model_dir)), args=config, train_dataset=_rows(FIXTURES / fixture),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    assert seen[0] == seen[1] == list(trainer.train_dataset)
    assert len(seen[0]) >= 2 and trainer.state.global_step == 1


@pytest.mark.parametrize("command", [["train"], ["eval"], ["data", "inspect"], ["demo"], ["generate"], ["chat"],
                                     ["export"]])
def test_every_help_prints(command, capsys):
    """argparse formats help strings with %: a bare % in a field's help breaks --help (it did, for eval)."""
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_export_writes_the_gguf_and_the_modelfile_beside_it(byte_model_dir, tmp_path, capsys):
    gguf = tmp_path / "out" / "model.gguf"
    assert main(["export", str(byte_model_dir), "--gguf", str(gguf), "--outtype", "q8_0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{gguf}: {gguf.stat().st_size / 1e3:.1f} kB, q8_0, llama, 21 tensors",
                     f"{gguf.parent / 'Modelfile'}: ollama create NAME -f {gguf.parent / 'Modelfile'}"]
    assert (gguf.parent / "Modelfile").read_text().splitlines()[1] == "FROM ./model.gguf"
    reloaded = load_model(str(gguf))
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        difference = (reloaded(ids).logits - load_model(str(byte_model_dir))(ids).logits).abs().max().item()
    assert difference < 2e-2  # q8_0's tolerance in tests/export/test_gguf.py


IDS_EXPORT = torch.tensor([[3, 14, 15, 92, 65]])


def test_train_export_gguf_writes_the_trained_model_as_gguf(byte_model_dir, data_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    out, gguf = tmp_path / "run", tmp_path / "run" / "model.gguf"
    assert main(["train", "--model", str(byte_model_dir), "--dataset", str(data_dir / "prefs.jsonl"), "--output_dir",
                 str(out), "--export_gguf", str(gguf), "--export_outtype", "f32", *_flags(ONE_STEP)]) == 0
    assert f"exported {gguf}: " in caplog.text and (out / "Modelfile").is_file()
    with torch.no_grad():  # the trained model, not the one it started from
        difference = (load_model(str(gguf))(IDS_EXPORT).logits - load_model(str(out))(IDS_EXPORT).logits).abs().max()
    assert difference <= 1e-4


def test_train_export_gguf_refuses_before_training(model_dir, data_dir, tmp_path, capsys):
    """The word-level test tokenizer has no GGUF form: the run stops before training, not after."""
    assert main(["train", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"), "--output_dir",
                 str(tmp_path / "run"), "--export_gguf", str(tmp_path / "m.gguf"), *_flags(ONE_STEP)]) == 2
    assert error_line(capsys.readouterr().err).startswith("orpo: error: cannot write a WordLevel tokenizer to GGUF")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_export_no_modelfile(byte_model_dir, tmp_path, capsys):
    assert main(["export", str(byte_model_dir), "--gguf", str(tmp_path / "m.gguf"), "--no_modelfile"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_export_errors_are_one_line(model_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert error_line(capsys.readouterr().err) == f"orpo: error: {tmp_path / 'nope'}: no such model directory"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert main(["export", str(adapter), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert error_line(capsys.readouterr().err).endswith("merge it into its base model first (use --merge)")
    assert main(["export", str(model_dir), "--gguf", str(tmp_path / "m.gguf")]) == 2  # a WordLevel tokenizer
    assert error_line(capsys.readouterr().err).startswith("orpo: error: cannot write a WordLevel tokenizer to GGUF")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "Modelfile").exists()


def test_image_pairs_train_from_the_cli_and_python_with_identical_pairs(tmp_path, monkeypatch):
    """A vision-language model directory (tiny LLaVA with its processor) and image pairs with paths relative
    to the data file: `orpo train` trains on the pairs Python prepares, and saves the processor."""
    from orpo import ORPOConfig, ORPOTrainer
    from vision_models import vision_training_data

    model_dir, data = vision_training_data(tmp_path)
    seen = []
    real_train = ORPOTrainer.train

    def spy(self, *args, **kwargs):
        seen.append(list(self.train_dataset))
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(ORPOTrainer, "train", spy)
    assert main(["train", "--model", model_dir, "--dataset", data, "--output_dir", str(tmp_path / "cli"),
                 *_flags(ONE_STEP)]) == 0
    ORPOTrainer(model_dir, args=ORPOConfig(output_dir=str(tmp_path / "python"), **ONE_STEP), train_dataset=data).train()
    assert seen[0] == seen[1] and sum(bool(pair.images) for pair in seen[0]) == 6
    assert (tmp_path / "cli" / "processor_config.json").is_file()  # reloads as a processor, images and all


def test_inspect_shows_each_image_as_its_placeholder_and_size(tmp_path, capsys):
    from vision_models import vision_training_data

    model_dir, data = vision_training_data(tmp_path)
    assert main(["data", "inspect", "--model", model_dir, "--dataset", data, "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\n<image 1: 30x20 px, 4 tokens>what is in the picture?<|im_end|>" in out
    assert "[[A dog on a beach.<|im_end|>]]" in out


@pytest.mark.parametrize("family", ["gemma3", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_image_pairs_train_from_the_cli_on_each_family(tmp_path, family, monkeypatch):
    """`orpo train` on a saved vision-language model directory: the model (AutoModelForImageTextToText) and its
    processor (AutoProcessor) load, and LLaMA-Factory-shaped image rows train with them (TRL's shape: the LLaVA
    test above). Processors whose video processor needs torchvision cannot be saved or loaded here: the CLI
    gets those from the tests' builder instead of AutoProcessor."""
    from orpo.run import setup
    from vision_models import SAVED_PROCESSORS, family_processor, image_rows_files, tiny_vision_model

    model_dir = tmp_path / "model"
    tiny_vision_model(family).save_pretrained(model_dir)
    if family in SAVED_PROCESSORS:
        family_processor(family).save_pretrained(model_dir)
    else:
        monkeypatch.setattr(setup, "load_tokenizer", lambda name, trust_remote_code=False: family_processor(family))
    _, llamafactory = image_rows_files(tmp_path)
    assert main(["train", "--model", str(model_dir), "--dataset", llamafactory, "--output_dir", str(tmp_path / "out"),
                 "--save_strategy", "no", *_flags({**ONE_STEP, "per_device_train_batch_size": 2})]) == 0
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1


def test_image_pairs_evaluate_and_compare_two_vision_language_models(tmp_path, capsys):
    """`orpo eval --compare` on image pairs: both models score the same pairs (their processors' tokenizers
    agree), pair by pair."""
    from vision_models import save_tiny_llava, vision_training_data

    model_dir, data = vision_training_data(tmp_path)
    other = save_tiny_llava(tmp_path / "other", seed=1)
    out = tmp_path / "compare.jsonl"
    assert main(["eval", "--model", model_dir, "--compare", other, "--dataset", data, "--output", str(out)]) == 0
    summary = json.loads(out.read_text().splitlines()[-1])["summary"]
    assert summary["pairs"] == 7 and summary["a"]["pairs"] == summary["b"]["pairs"] == 7
    assert summary["a"]["log_odds"] != summary["b"]["log_odds"]


def test_dry_run_reports_config_data_route_precision_and_memory_and_writes_nothing(model_dir, data_dir, tmp_path,
                                                                                   capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--dataset", str(data_dir / "one_bad.jsonl"), "--output_dir", str(out),
            "--max_steps", "3", "--beta", "0.2", "--bf16", "false", "--dry_run", "true"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"dry run of orpo train into {out}: every input checked, nothing trained, nothing written to " \
                       "output_dir"
    assert lines[1].startswith(f"model: {model_dir} (LlamaForCausalLM, ") and lines[1].endswith(" trainable)")
    assert lines[2] == "settings changed from the defaults: max_steps=3, bf16=False, beta=0.2"  # in field order
    plan = dict(line.split(": ", 1) for line in lines[3:])  # the run's plan: every choice with its reason
    assert list(plan) == ["train data", "output_dir", "processes", "route", "precision", "router load balancing",
                          "activation checkpointing", "output head softmax", "memory", "CPU memory allocator",
                          "final evaluation", "saved", "report", "export"]
    assert plan["train data"].startswith(f"{data_dir / 'one_bad.jsonl'}: kept 2 of 3 pairs; dropped 1: chosen == "
                                         "rejected 1 (first at row 1); ")
    assert plan["output_dir"] == f"a new run in {out}"
    assert plan["route"].startswith("prefix-shared spans") and plan["precision"] == "fp32: --bf16 false"
    assert plan["activation checkpointing"].startswith("off: a step of the largest micro-batch")
    assert plan["output head softmax"].startswith("kept from the forward")
    assert plan["memory"].startswith("a step of the largest micro-batch (") and " GB on cpu: it fits the budget" in plan["memory"]
    assert not out.exists()  # no output directory, no weights
    assert main(args + ["--memory_budget_gb", "0.000001", "--activation_checkpointing", "true"]) == 0
    plan = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines()[3:])
    assert plan["activation checkpointing"] == "on, full recompute (as set)"
    assert plan["output head softmax"] == ("recomputed in backward: memory is what this run saves (activation "
                                           "checkpointing)")
    assert "it does not fit the budget of 0.0 GB (--memory_budget_gb)" in plan["memory"] and not out.exists()
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    assert main(args + ["--overwrite_output_dir"]) == 0  # what would happen to the run there
    plan = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines()[3:])
    assert plan["output_dir"] == (f"a new run in {out}; the previous run there (1 entries) is removed when training "
                                  "starts (--overwrite_output_dir)")
    assert (out / "metrics.jsonl").is_file()


def test_launch_world_size_is_what_the_launch_lines_torchrun_flags_start():
    assert launch_world_size("# a recipe\n# Launch: torchrun --nproc_per_node 8 -m orpo train\nmodel: m") == \
        (8, "--nproc_per_node 8")
    assert launch_world_size("# Launch: sbatch x.slurm    (each: torchrun --nnodes=2 --nproc_per_node=4 ...)") == \
        (8, "--nnodes=2 --nproc_per_node=4")
    assert launch_world_size("# Launch: orpo train --config x.yaml") is None
    assert launch_world_size("model: m\n# torchrun --nproc_per_node 8") is None  # only the launch line counts


def test_a_sharded_dry_run_without_a_launcher_plans_the_world_size_of_its_flag_or_launch_line(tmp_path, monkeypatch):
    from orpo.run import launch

    recipe = tmp_path / "sharded.yaml"
    recipe.write_text("# Launch: torchrun --nproc_per_node 4 -m orpo train --config sharded.yaml\nfsdp: full_shard\n")

    def planned(*flags, file=recipe):
        model_args, _, config = parse_train_args(["--config", str(file), "--model", "m", "--dataset", "d",
                                                  "--output_dir", str(tmp_path / "out"), *flags])
        return planned_processes(model_args, config, str(file))

    assert planned("--dry_run") == (4, f"--nproc_per_node 4 in the `# Launch:` line of {recipe}; planned in this "
                                       "process, which no launcher started")
    assert planned("--dry_run", "--world_size", "6") == (6, "--world_size 6; planned in this process, which no "
                                                            "launcher started")
    assert planned() is None  # training it here is refused before loading (run/checks.py)
    with pytest.raises(OrpoError, match=r"^--world_size 6: sets the processes a dry run plans for in a process no "
                                        r"launcher started \(with --dry_run\)"):
        planned("--world_size", "6")
    bare = tmp_path / "bare.yaml"
    bare.write_text("fsdp: full_shard\n")
    with pytest.raises(OrpoError, match=r"^--dry_run of a sharded run \(--fsdp\) in a process no launcher started "
                                        r"plans each of the run's processes: give their number with --world_size N"):
        planned("--dry_run", file=bare)
    assert planned("--dry_run", "--fsdp", "", file=bare) is None  # not sharded: the run is this process
    monkeypatch.setattr(launch, "is_launched", lambda config: True)  # under torchrun: the launcher's world size
    assert planned("--dry_run") is None
    with pytest.raises(OrpoError, match=r"^--world_size 6: "):
        planned("--dry_run", "--world_size", "6")


def test_dry_run_of_a_config_file(model_dir, data_dir, tmp_path, capsys):
    """`orpo train --config RECIPE --dry_run`: the file's settings are the run's, reported, nothing written."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model_dir}\ndataset: {data_dir / 'prefs.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
                      "max_steps: 5\nlearning_rate: 1.0e-5\n")
    assert main(["train", "--config", str(recipe), "--dry_run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == "settings changed from the defaults: max_steps=5, learning_rate=1e-05"
    assert any(line.startswith("memory: ") for line in lines) and not (tmp_path / "run").exists()


def test_model_init_kwargs_reach_the_model_orpo_train_loads(data_dir, tmp_path, capsys):
    """--model_init_kwargs go to from_pretrained: a mixture-of-experts model loaded with output_router_logits
    trains with the load-balancing loss (aux_loss in the metrics), without it with none. The dtype has its own
    flag, so a dtype among them is one line."""
    from family_models import save_family_model

    model = save_family_model("qwen2_moe", tmp_path / "moe", chatml_tokenizer())
    for name, init in (("balanced", {"output_router_logits": True}), ("plain", None)):
        flags = _flags({**ONE_STEP, "logging_steps": 1, **({"model_init_kwargs": init} if init else {})})
        assert main(["train", "--model", model, "--dataset", str(data_dir / "prefs.jsonl"),
                     "--output_dir", str(tmp_path / name), *flags]) == 0
        step = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert ("aux_loss" in step) == (name == "balanced"), step
    assert step["nll"] > 0
    capsys.readouterr()
    assert main(["train", "--model", model, "--dataset", str(data_dir / "prefs.jsonl"), "--output_dir",
                 str(tmp_path / "dtype"), "--model_init_kwargs", '{"dtype": "bfloat16"}', *_flags(ONE_STEP)]) == 2
    assert error_line(capsys.readouterr().err) == "orpo: error: --model_init_kwargs: dtype has its own flag (--dtype); give it there"


def test_a_python_run_and_a_cli_run_with_the_same_settings_write_the_same_files(model_dir, data_dir, tmp_path):
    """`orpo train` is its flags parsed plus the call a Python user makes: the same files (model, tokenizer, card,
    report and plots, metrics with the final evaluation, the plan, the finished marker), the same trained
    weights and the same plan, but for the paths in it."""
    from orpo import ORPOConfig, ORPOTrainer

    settings = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "report_to": "none",
                "save_steps": 1, "disable_tqdm": True, "bf16": False, "learning_rate": 1e-3}
    data, held_out = str(data_dir / "prefs.jsonl"), str(data_dir / "one_bad.jsonl")
    assert main(["train", "--model", str(model_dir), "--dataset", data, "--eval_dataset", held_out, "--output_dir",
                 str(tmp_path / "cli"), *_flags(settings)]) == 0
    ORPOTrainer(model=str(model_dir), args=ORPOConfig(output_dir=str(tmp_path / "python"), **settings),
                train_dataset=data, eval_dataset=held_out).train()

    def files(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())

    cli, python = tmp_path / "cli", tmp_path / "python"
    assert files(cli) == files(python)
    assert {"README.md", "model.safetensors", "metrics.jsonl", "orpo_plan.json", "orpo_run_finished.json",
            "report.html", "loss.png", "checkpoint-2/orpo_checkpoint_complete.json"} <= set(files(cli))
    weights = load_file(cli / "model.safetensors")
    assert all(torch.equal(value, weights[key]) for key, value in load_file(python / "model.safetensors").items())
    plans = [json.loads((run / "orpo_plan.json").read_text().replace(str(run), "OUT")) for run in (cli, python)]
    assert [c["name"] for c in plans[0]["choices"]] == [c["name"] for c in plans[1]["choices"]]
    assert plans[0]["stamp"] == plans[1]["stamp"] and plans[0]["choices"][-3:] == plans[1]["choices"][-3:]
    evals = [[json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "eval_loss" in line] for run in (cli, python)]
    assert evals == [[2], [2]]


# ---- an encoder-decoder model (T5) ------------------------------------------------------------------------

T5_ROWS = [{"prompt": "the sky is", "chosen": "blue", "rejected": "green"},
           {"prompt": "why ?", "chosen": "yes good", "rejected": "no bad"},
           {"prompt": "what is a", "chosen": "b c", "rejected": "ok"},
           {"prompt": "the sky", "chosen": "is blue", "rejected": "is red"}]


def test_t5_trains_saves_and_evaluates_from_the_cli(data_dir, tmp_path, capsys):
    """`orpo train` on a saved tiny T5 directory (loaded as a sequence-to-sequence model) trains, saves the model,
    its tokenizer (with the template it was trained with) and the card; `orpo eval` scores the result, the fast
    path as the reference; --export_gguf is refused in one line before training."""
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    from tiny import save_tiny_t5

    t5 = save_tiny_t5(tmp_path / "t5")
    prefs = str(write_jsonl(tmp_path / "t5.jsonl", T5_ROWS))
    out = tmp_path / "out"
    common = ["--model", t5, "--dataset", prefs, "--output_dir", str(out), "--max_steps", "2",
              "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
              "--disable_tqdm", "true", "--report", "false", "--learning_rate", "0.01"]
    assert main(["train", *common, "--export_gguf", str(tmp_path / "t5.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("orpo: error: GGUF export does not apply to encoder-decoder models (t5): llama.cpp runs "
                       "decoder-only ones; the saved safetensors model is the result (transformers loads it)")
    assert not out.exists()
    assert main(["data", "inspect", "--model", t5, "--dataset", prefs, "-n", "1"]) == 0
    shown = capsys.readouterr().out  # the prompt is the encoder's input; each answer ends with T5's </s>, trained
    assert "--- prompt (the encoder's input, never an NLL target)" in shown and "</s>]]" in shown
    assert main(["train", *common, "--eval_dataset", prefs]) == 0
    trained = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert isinstance(trained, T5ForConditionalGeneration)
    assert AutoTokenizer.from_pretrained(out).chat_template is not None
    card = (out / "README.md").read_text()  # its usage loads and decodes an encoder-decoder model
    assert "AutoModelForSeq2SeqLM.from_pretrained" in card and "tokenizer.decode(output[0], skip" in card
    assert "pipeline_tag: text2text-generation" in card
    plan = json.loads((out / "orpo_plan.json").read_text())["choices"]
    assert {c["name"]: c["value"] for c in plan}["route"] == "encoder-decoder"
    assert {c["name"]: c["value"] for c in plan}["NLL"] == "completion"
    results = {}
    for name, flags in (("fast", []), ("reference", ["--reference"])):
        results[name] = tmp_path / f"{name}.jsonl"
        assert main(["eval", "--model", str(out), "--dataset", prefs, "--output", str(results[name]), *flags]) == 0
    fast, reference = ([json.loads(line) for line in results[n].read_text().splitlines()] for n in results)
    assert len(fast) == len(T5_ROWS) + 1
    for got, want in zip(fast[:-1], reference[:-1]):
        assert got["nll_tokens"] == want["nll_tokens"] == got["chosen_tokens"]  # the completion only
        for key in ("chosen_logp_mean", "rejected_logp_mean", "log_odds", "nll_sum"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5)


def test_t5_with_lora_from_the_cli_saves_the_merged_model(tmp_path):
    """--use_peft on T5: the adapter is peft's SEQ_2_SEQ_LM (its default targets for T5, q and v) and the run saves
    it merged into its base: a plain T5 whose attention weights moved."""
    from safetensors.torch import load_file as load_weights

    from tiny import save_tiny_t5

    t5 = save_tiny_t5(tmp_path / "t5")
    prefs = str(write_jsonl(tmp_path / "t5.jsonl", T5_ROWS))
    out = tmp_path / "out"
    assert main(["train", "--model", t5, "--dataset", prefs, "--output_dir", str(out), "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
                 "--disable_tqdm", "true", "--report", "false", "--use_peft", "--learning_rate", "0.05"]) == 0
    base, merged = load_weights(f"{t5}/model.safetensors"), load_weights(out / "model.safetensors")
    assert merged.keys() == base.keys()
    moved = {name for name in base if not torch.equal(base[name], merged[name])}
    assert moved and all(name.endswith((".q.weight", ".v.weight")) for name in moved)


def test_train_objective_reward_trains_and_saves_a_reward_model(model_dir, data_dir, tmp_path, capsys):
    """`orpo train --objective reward` on the tiny Llama (pad = EOS = <|im_end|>: each answer's reward read at the
    token before its EOS, as the saved model reads it): the plan says so, the final evaluation logs the held-out
    pair accuracy, and the output directory loads as AutoModelForSequenceClassification with one output."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    assert main(["train", "--model", str(model_dir), "--dataset", str(data_dir / "prefs.jsonl"), "--eval_dataset",
                 str(data_dir / "prefs.jsonl"), "--objective", "reward", "--output_dir", str(out), "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
                 "--disable_tqdm", "true", "--report", "false", "--learning_rate", "1e-3",
                 "--dataset_cache_dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "eval step 2  loss " in printed and "  acc " in printed.split("eval step 2")[1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(records) if "eval_accuracy" in r)
    assert final["eval_pairs"] == 8 and {"eval_margin", "eval_rewards/chosen", "eval_rewards/rejected"} <= set(final)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == AutoTokenizer.from_pretrained(out).pad_token_id
    choices = {c["name"]: c["value"] for c in json.loads((out / "orpo_plan.json").read_text())["choices"]}
    assert choices["objective"] == "reward" and choices["route"] == "spans+score"


def test_generate_and_judge_keep_freed_cpu_memory_without_an_accelerator(model_dir, tmp_path, monkeypatch):
    """Sampling and scoring on the CPU reuse freed memory as training does (train/allocator.py); with an accelerator
    the models run there and the process's malloc is left alone."""
    import torch

    calls = []
    monkeypatch.setattr("orpo.train.allocator.keep_freed_memory", lambda: calls.append("kept") or True)
    prompts = str(write_jsonl(tmp_path / "p.jsonl", [{"id": 0, "prompt": "what is 2 + 2?", "reference": 4}]))
    answers = str(write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "prompt": "what is 2 + 2?", "answers": {"m": "4"}}]))
    judge = ["judge", "--answers_a", answers, "--answers_b", answers, "--prompts", prompts, "--reference"]
    generate = ["generate", "--model", str(model_dir), "--prompts", prompts, "--max_new_tokens", "2", "--samples", "1"]
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert main(judge + ["--output", str(tmp_path / "j1")]) == 0
    assert main(generate + ["--output", str(tmp_path / "g1.jsonl")]) == 0
    assert calls == ["kept", "kept"]
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cpu"))
    assert main(judge + ["--output", str(tmp_path / "j2")]) == 0
    assert calls == ["kept", "kept"]
