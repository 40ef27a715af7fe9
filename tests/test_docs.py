"""README.md and the pages of docs/: their examples run, what they show a command printing is what it prints, and
their links lead somewhere.

Every ```bash block runs, in PAGES order within two shells that run side by side (SHELLS: the README's quick start,
whose runs/uf the export page uses, with the pages that take longest in one, the other pages in the other; each with
its own datasets cache), on a tiny model instead of SmolLM2, with the real data files; the TRL migration diff runs with orpo after its one changed line; every `orpo`
command appears in a block that runs (`orpo demo` is `make demo`); every relative link names a file that exists
and, with a #fragment, a heading of that file; and the README stays a five-minute read.

```sh blocks are what this suite's machine cannot run: the setup itself (make), launches on GPUs, several machines
or hub models, Ollama and llama.cpp. What they launch is tested elsewhere: each recipe trains a step on a stand-in
(tests/test_recipes.py), the FSDP2, ZeRO-3 and two-machine launches of docs/distributed.md run on CPU ranks with
the page's own configs (tests/run/test_trainer_distributed.py).

What a command prints, the pages show in a ```text block right after its ```bash block (blank lines only between
them): the block's standard output (a command whose log on stderr is shown redirects it, `2>&1`). Each such pair
runs again on its own, in a fresh directory and datasets cache, with the setup the pages document: `$M` is
SmolLM2-135M-Instruct (fetched as `orpo fetch-model` does), `$D` and `$E` the quick start's data; and the block
must equal what it printed, after both are normalised for what differs between runs and machines only (NORMALISED:
durations, dates, home and cache directories, cache keys, the machine's free memory and CPU flags; on a machine
whose precision orpo chooses differently, also the precision line and the memory figures that follow from it). A
line `…` in a block stands for lines left out. ```text is for nothing else. A block of output that no command
here can print in seconds (a training run, a benchmark, the demo) is a bare ``` block, and the page says it is a
record of one run: its machine and date.

The README's claim of what the default suite checks (model families) is the count the test modules define."""
import difflib
import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import transformers

from orpo.commands.cli import build_parser
from orpo.train.models import fetch_smollm2
from tiny import byte_level_chatml_tokenizer, save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# docs/ in the order their blocks run (after the README's quick start, whose runs/uf the export page uses)
PAGES = ["quickstart", "data", "vision", "configuration", "migrating-from-trl", "evaluation", "judging",
         "reward-models", "precision-and-memory", "distributed", "export", "models", "recipes", "benchmarks", "errors"]
DOCS = [README] + [REPO / "docs" / f"{name}.md" for name in PAGES]
README_MAX_LINES = 250
SHARED = Path("/work/shared")  # ../shared of the repository on this machine and on CI


def code_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block whose info string is `language`."""
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^ *```{language}\n(.*?)^ *```$", text, flags=re.M | re.S)]


def shown_outputs(text: str) -> list[tuple[int, str, str]]:
    """(line number, commands, output) of every ```bash block followed, after blank lines only, by a ```text block."""
    blocks = list(re.finditer(r"^ *```(\w*)\n(.*?)^ *```$", text, flags=re.M | re.S))
    return [(text[: a.start()].count("\n") + 2, a.group(2), b.group(2)) for a, b in zip(blocks, blocks[1:])
            if a.group(1) == "bash" and b.group(1) == "text" and not text[a.end():b.start()].strip()]


# What differs between two runs of a command, or between machines, and nothing else: (pattern, replacement),
# applied to the block and to what the command printed alike.
NORMALISED = [
    (r"(?:/[^\s/()'\"~]+)+/\.cache/", "~/.cache/"),  # the home directory: of whoever wrote the page, of this run
    (r"\b[0-9a-f]{32}\b", "<key>"),  # a prepared-data cache key (it hashes orpo's data code too)
    (r"\b\d+(?:\.\d+)? s\b", "<t> s"),  # durations
    (r"\b\d{4}-\d{2}-\d{2}(?:[ T][\d:.]+)?\b", "<date>"),
    (r"budget of [\d.]+ GB \((\d+)% of the [\d.]+ GB free", r"budget of <GB> (\1% of the <GB> free"),  # free memory
    (r"natively \([\w, ]+\)", "natively (<CPU flags>)"),
]
# On a machine where orpo chooses another precision, the precision line and the memory it implies are its own
OTHER_PRECISION = [(r"^precision: .*$", "precision: <this machine's>"), (r"\b\d+(?:\.\d+)? GB\b", "<GB>")]


def normalised(text: str, rules: list[tuple[str, str]]) -> list[str]:
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text, flags=re.M)
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def shows(block: str, printed: str) -> str | None:
    """None where `block` is what was `printed` (a line `…` in the block stands for any lines), else their diff."""
    shown, got = normalised(block, NORMALISED), normalised(printed, NORMALISED)
    choices = [[line.split(":")[1] for line in lines if line.startswith("precision: ")] for lines in (shown, got)]
    if choices[0] != choices[1]:  # bf16 autocast where the page was written, fp32 here (or the reverse)
        shown, got = normalised("\n".join(shown), OTHER_PRECISION), normalised("\n".join(got), OTHER_PRECISION)
    parts = [[]]
    for line in shown:
        parts.append([]) if line.strip() == "…" else parts[-1].append(line)
    pattern = "(?:.*\n)*?".join(re.escape("".join(f"{line}\n" for line in part)) for part in parts)
    if re.fullmatch(pattern, "".join(f"{line}\n" for line in got)):
        return None
    return "\n".join(difflib.unified_diff(shown, got, "shown", "printed", lineterm=""))


def _repository_like(directory: Path) -> Path:
    """directory/repo, whose tests/ and recipes/ are the repository's and whose ../shared is the real data."""
    (directory / "shared").symlink_to(SHARED)
    (directory / "repo").mkdir()
    for name in ("tests", "recipes"):
        (directory / "repo" / name).symlink_to(REPO / name)
    return directory / "repo"


def _workdir(tmp_path) -> tuple[Path, str]:
    """A repository-like directory, and a tiny model beside it with a byte-level tokenizer (real texts keep
    distinct ids)."""
    _repository_like(tmp_path)
    with open(SHARED / "data" / "ultrafeedback_1k_train.jsonl") as f:  # BPE merges: about 4 characters a token
        corpus = [text for line, _ in zip(f, range(300)) for text in json.loads(line).values() if isinstance(text, str)]
    tokenizer = byte_level_chatml_tokenizer(corpus, vocab_size=2000)
    return tmp_path / "repo", save_tiny_chat_model(tmp_path / "tiny", tokenizer=tokenizer)


def _run(command: list[str], cwd: Path, timeout: int, env: dict | None = None,
         **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **(env or {})}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


def test_every_page_of_docs_is_run():
    assert sorted(p.name for p in (REPO / "docs").glob("*.md")) == sorted(p.name for p in DOCS[1:])


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown text's headings: lower case, punctuation dropped, spaces as hyphens
    (headings inside fenced blocks are not headings)."""
    text = re.sub(r"^ *```.*?^ *```$", "", text, flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_relative_links_lead_to_a_file_and_heading():
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}: no such file")
            elif anchor and anchor not in heading_anchors(linked.read_text()):
                broken.append(f"{page.name}: {target}: no such heading")
    assert not broken, broken


def test_every_command_is_shown_in_a_block_that_runs():
    shown = {m.group(1) for page in DOCS for _, code in code_blocks(page.read_text(), "bash")
             for m in re.finditer(r"\borpo(?:\.cli)? ([a-z][\w-]*)", code)}
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(subparsers.choices) - {"demo"} <= shown, set(subparsers.choices) - shown
    assert "orpo demo" in README.read_text() and "make demo" in README.read_text()


# The pages each shell runs, README first: independent of each other's runs/ (only export.md reads the README's
# runs/uf), about equally long, side by side on two cores (each command is mostly one core importing its libraries).
SHELLS = [[README] + [REPO / "docs" / f"{name}.md" for name in ("quickstart", "data", "export")],
          [REPO / "docs" / f"{name}.md" for name in PAGES if name not in ("quickstart", "data", "export")]]


def test_bash_blocks_run(tmp_path):
    """The blocks as a reader runs them; only `M=` (the model) points at the tiny model, and the venv
    activation line is skipped (this Python's environment is already the one)."""
    assert sorted(map(str, sum(SHELLS, []))) == sorted(map(str, DOCS))  # every page in one shell, once
    work, tiny = _workdir(tmp_path)

    def run(index: int, pages: list[Path]) -> subprocess.CompletedProcess:
        script = ["set -euo pipefail"]
        for page, (line_number, code) in ((page, block) for page in pages
                                          for block in code_blocks(page.read_text(), "bash")):
            script.append(f"echo '=== {page.relative_to(REPO)} line {line_number}' >&2")
            for line in code.splitlines():
                if line.strip() == ". .venv/bin/activate":
                    continue
                script.append(f"M={tiny}" if line.startswith("M=") else line)
        return _run(["bash", "-c", "\n".join(script)], work, timeout=900,
                    env={"HF_DATASETS_CACHE": str(tmp_path / f"datasets-{index}")})

    with ThreadPoolExecutor(len(SHELLS)) as pool:
        results = list(pool.map(run, range(len(SHELLS)), SHELLS))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    stdout = "".join(result.stdout for result in results)
    runs = work / "runs"
    # quick start: trained model, report with plots, its comparison with the base, generations, a chat answer
    for name in ("model.safetensors", "report.html", "logps.png", "generations.html"):
        assert (runs / "uf" / name).is_file(), name
    comparison = json.loads((runs / "uf" / "eval_vs_base.jsonl").read_text().splitlines()[-1])["summary"]
    assert comparison["pairs"] == 50 and comparison["a"]["pairs"] == 50 and "sign_test_p" in comparison
    generations = [json.loads(line) for line in (runs / "uf" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 5 and all(len(g["answers"]) == 2 for g in generations)
    assert "you> Give me three tips for writing a good prompt." in stdout
    # the other sections: YAML config, tensorboard, a resumed run, two launchers
    assert json.loads((runs / "uf-yaml" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert list((runs / "tb" / "runs").glob("*/events.out.tfevents.*"))
    assert (runs / "long" / "checkpoint-4" / "orpo_checkpoint_complete.json").is_file()
    assert not (runs / "long" / "checkpoint-2").exists()  # save_total_limit 1
    # export: the GGUF and the Modelfile beside it
    assert (runs / "uf" / "model.gguf").stat().st_size > 0
    assert (runs / "uf" / "Modelfile").read_text().splitlines()[1] == "FROM ./model.gguf"
    for name in ("ddp", "ddp-accelerate", "lora"):
        assert (runs / name / "model.safetensors").is_file(), name


def test_trl_migration_diff_runs_with_only_the_import_changed(tmp_path):
    ((_, diff),) = code_blocks((REPO / "docs" / "migrating-from-trl.md").read_text(), "diff")
    lines = diff.splitlines()
    before = [line[1:] for line in lines if line[:1] in (" ", "-", "")]
    after = [line[1:] for line in lines if line[:1] in (" ", "+", "")]
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    assert len(before) == len(after) and changed == [
        ("from trl.experimental.orpo import ORPOConfig, ORPOTrainer", "from orpo import ORPOConfig, ORPOTrainer")]
    work, tiny = _workdir(tmp_path)
    script = "\n".join(after)
    for text, replacement in (('"~/.cache/orpo/SmolLM2-135M-Instruct"', repr(tiny)), ("max_steps=10", "max_steps=2")):
        assert text in script
        script = script.replace(text, replacement)
    result = _run([sys.executable, "-c", script], work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / "runs" / "from-trl"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "nll" in line] == [1, 2]
    assert (out / "model.safetensors").is_file()


def test_text_blocks_are_outputs_of_the_command_before_them():
    """```text blocks are checked outputs (shown_outputs); one anywhere else would go unchecked."""
    stray = []
    for page in DOCS:
        text = page.read_text()
        checked = {output for _, _, output in shown_outputs(text)}
        stray += [f"{page.name} line {line}" for line, output in code_blocks(text, "text") if output not in checked]
    assert not stray, stray


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> list[tuple[str, int, str, str, subprocess.CompletedProcess]]:
    """(page, line, commands, output shown, what the commands printed) of each command block with a shown output,
    each block run on its own with the documented setup, in a fresh directory and datasets cache, several at once."""
    smollm2 = fetch_smollm2()
    variables = (f"M={smollm2}\nD=../shared/data/ultrafeedback_1k_train.jsonl\n"
                 "E=../shared/data/ultrafeedback_200_eval.jsonl\n")

    def run(page: Path, line: int, code: str) -> subprocess.CompletedProcess:
        directory = tmp_path_factory.mktemp(f"{page.stem}-{line}")
        code = "\n".join(f"M={smollm2}" if c.startswith("M=") else c for c in code.splitlines())
        return _run(["bash", "-c", f"set -euo pipefail\n{variables}{code}"], _repository_like(directory), timeout=600,
                    env={"HF_DATASETS_CACHE": str(directory / ".cache" / "huggingface" / "datasets")})

    blocks = [(page, line, code, shown) for page in DOCS for line, code, shown in shown_outputs(page.read_text())]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda block: run(*block[:3]), blocks))
    return [(page.name, line, code, shown, result) for (page, line, code, shown), result in zip(blocks, results)]


@pytest.mark.real_model
def test_shown_outputs_are_what_the_commands_print(printed):
    assert {page for page, *_ in printed} >= {"data.md", "precision-and-memory.md", "recipes.md", "export.md"}
    differing = []
    for page, line, _, shown, result in printed:
        if result.returncode != 0:
            differing.append(f"{page} line {line}: exit code {result.returncode}\n{result.stderr[-2000:]}")
        elif (diff := shows(shown, result.stdout)) is not None:
            differing.append(f"{page} line {line}:\n{diff}")
    assert not differing, "\n\n".join(differing)


@pytest.mark.real_model
def test_the_quick_starts_drop_counts_in_prose_are_what_data_prepare_prints(printed):
    """The README's and the quick start page's drop counts of the quick start's data (max_length 512), from the
    data page's `orpo data prepare --max_length 512` as it printed it."""
    (printout,) = [result.stdout for page, _, code, _, result in printed
                   if page == "data.md" and "orpo data prepare" in code and "--max_length 512" in code]
    counts = dict(re.findall(r"^ +(too long|chosen == rejected|empty response) (\d+) ", printout, flags=re.M))
    kept, total = re.search(r"kept (\d+) of (\d+) pairs", printout).groups()
    claim = (f"kept {kept} of the {total} pairs ({counts['too long']} longer than 512 tokens, "
             f"{counts['chosen == rejected']} with chosen == rejected, {counts['empty response']} with an empty answer")
    for page in (README, REPO / "docs" / "quickstart.md"):
        assert claim in " ".join(page.read_text().split()), (page.name, claim)


def _test_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_says_which_families_the_default_suite_checks():
    """The README's counts are the test modules' own: FAST_FAMILIES by default, the rest of EXPECTED_ROUTES with
    -m slow, of the causal-LM model types of the installed transformers; and the vision families."""
    from family_models import FAST_FAMILIES, causal_lm_types
    from vision_models import FAMILIES as VISION_FAMILIES

    expected_routes = _test_module(REPO / "tests" / "ops" / "test_route.py").EXPECTED_ROUTES
    text = " ".join(README.read_text().split())
    version = ".".join(transformers.__version__.split(".")[:2])
    slow, unbuilt = set(expected_routes) - set(FAST_FAMILIES), set(causal_lm_types()) - set(expected_routes)
    claim = (f"for {len(FAST_FAMILIES)} of the {len(causal_lm_types())} causal-LM model types transformers {version} "
             f"ships, and with `pytest -m slow` {len(slow)} more (the other {len(unbuilt)} are not built here")
    assert claim in text, claim
    assert f"for the {len(VISION_FAMILIES)} vision-language families" in text


def test_a_shown_output_differs_in_nothing_but_times_paths_and_the_machine():
    shown = ("model: /root/.cache/orpo/SmolLM2-135M-Instruct\n"
             "train data: kept 994 of 1000 pairs; cached at /root/.cache/huggingface/datasets/orpo/"
             "d49a5859e2cf29316d23b2ded304b18d in 2.8 s\n"
             "precision: bf16 autocast: the CPU computes bf16 natively (avx512_bf16)\n"
             "memory: needs about 11.5 GB on cpu: it fits the budget of 19.4 GB (80% of the 24.3 GB free on cpu)\n")
    printed = shown
    for mine, theirs in (("/root", "/home/ci"), ("2.8 s", "13.0 s"), ("d49a58", "0a1b2c"),
                         ("(avx512_bf16)", "(amx_bf16)"), ("19.4 GB (80% of the 24.3", "48.0 GB (80% of the 60.0")):
        printed = printed.replace(mine, theirs)
    assert shows(shown, printed) is None
    assert shows(shown.replace("994", "993"), printed) is not None  # a count is not a machine figure
    assert shows(shown, printed.replace("11.5 GB on", "11.6 GB on")) is not None  # nor the estimate, same precision
    other_machine = printed.replace("bf16 autocast: the CPU computes bf16 natively (amx_bf16)",
                                    "fp32: the CPU has no bf16 units").replace("11.5", "14.2")
    assert shows(shown, other_machine) is None
    assert shows("…\nprecision: bf16 autocast: the CPU computes bf16 natively (avx512_bf16)\n…", printed) is None
    assert shows("…\nprecision: bf16 autocast: the CPU has bf16 units\n…", printed) is not None  # the same choice
    assert shows("model: /root/.cache/orpo/SmolLM2-135M-Instruct\n…", printed) is None
    assert shows("train data: kept 994 of 1000 pairs\n…", printed) is not None  # the first line, unless … before it


# docs/errors.md's lines that a command prints before anything loads, and the flags of `orpo train` that make it
ERRORS_BEFORE_LOADING = [
    ["--logprob_chunk_size", "-4"], ["--beta", "nan"], ["--packed_attention", "spans", "--packing", "false"],
    ["--max_steps", "0", "--num_train_epochs", "0"], ["--beta", "abc"], ["--export_gguf", "out/"], ["--streaming"],
    ["--unknown_flag", "1"], ["--model_init_kwargs", '{"dtype": "float16"}'],
]


def test_the_errors_page_shows_the_lines_orpo_prints(tmp_path, capsys, monkeypatch):
    """Each of these printed lines is a row of the errors page (its `...` standing for any text)."""
    from orpo.commands.cli import main

    rows = re.findall(r"^\| `(orpo: error: .*?)` \|", (REPO / "docs" / "errors.md").read_text(), flags=re.M)
    documented = [re.compile(".*".join(re.escape(part) for part in row.split("..."))) for row in rows]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n')
    undocumented = []
    for flags in ERRORS_BEFORE_LOADING:
        assert main(["train", "--model", "no-model", "--dataset", "prefs.jsonl", "--output_dir", "runs/x", *flags]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("orpo: error: ")]
        if not any(row.fullmatch(line) for row in documented):
            undocumented.append(line)
    assert not undocumented, undocumented
