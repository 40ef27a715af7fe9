"""README.md and the pages of docs/: their examples run and their links lead somewhere.

Every ```bash block runs, README first, then the pages in PAGES order, in one shell (on a tiny model instead of
SmolLM2, with the real data files); the TRL migration diff runs with orpo after its one changed line; every `orpo`
command appears in a block that runs (`orpo demo` is `make demo`); every relative link names a file that exists
and, with a #fragment, a heading of that file; and the README stays a five-minute read.

```sh blocks are what this suite's machine cannot run: the setup itself (make), launches on GPUs, several machines
or hub models, Ollama and llama.cpp. What they launch is tested elsewhere: each recipe trains a step on a stand-in
(tests/test_recipes.py), the FSDP2, ZeRO-3 and two-machine launches of docs/distributed.md run on CPU ranks with
the page's own configs (tests/run/test_trainer_distributed.py)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from orpo.commands.cli import build_parser
from tiny import byte_level_chatml_tokenizer, save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# docs/ in the order their blocks run (after the README's quick start, whose runs/uf the export page uses)
PAGES = ["quickstart", "data", "vision", "configuration", "migrating-from-trl", "evaluation", "precision-and-memory",
         "distributed", "export", "models", "recipes", "benchmarks", "errors"]
DOCS = [README] + [REPO / "docs" / f"{name}.md" for name in PAGES]
README_MAX_LINES = 250
SHARED = Path("/work/shared")  # ../shared of the repository on this machine and on CI


def code_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block whose info string is `language`."""
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^ *```{language}\n(.*?)^ *```$", text, flags=re.M | re.S)]


def _workdir(tmp_path) -> tuple[Path, str]:
    """A repository-like directory (its tests/ and recipes/ are the repository's) whose ../shared is
    the real data, and a tiny model beside it with a byte-level tokenizer (real texts keep distinct ids)."""
    (tmp_path / "shared").symlink_to(SHARED)
    (tmp_path / "repo").mkdir()
    for name in ("tests", "recipes"):
        (tmp_path / "repo" / name).symlink_to(REPO / name)
    with open(SHARED / "data" / "ultrafeedback_1k_train.jsonl") as f:  # BPE merges: about 4 characters a token
        corpus = [text for line, _ in zip(f, range(300)) for text in json.loads(line).values() if isinstance(text, str)]
    tokenizer = byte_level_chatml_tokenizer(corpus, vocab_size=2000)
    return tmp_path / "repo", save_tiny_chat_model(tmp_path / "tiny", tokenizer=tokenizer)


def _run(command: list[str], cwd: Path, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
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


def test_bash_blocks_run(tmp_path):
    """The blocks as a reader runs them; only `M=` (the model) points at the tiny model, and the venv
    activation line is skipped (this Python's environment is already the one)."""
    work, tiny = _workdir(tmp_path)
    script = ["set -euo pipefail"]
    for page, (line_number, code) in ((page, block) for page in DOCS for block in code_blocks(page.read_text(), "bash")):
        script.append(f"echo '=== {page.relative_to(REPO)} line {line_number}' >&2")
        for line in code.splitlines():
            if line.strip() == ". .venv/bin/activate":
                continue
            script.append(f"M={tiny}" if line.startswith("M=") else line)
    result = _run(["bash", "-c", "\n".join(script)], work, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = work / "runs"
    # quick start: trained model, report with plots, its comparison with the base, generations, a chat answer
    for name in ("model.safetensors", "report.html", "logps.png", "generations.html"):
        assert (runs / "uf" / name).is_file(), name
    comparison = json.loads((runs / "uf" / "eval_vs_base.jsonl").read_text().splitlines()[-1])["summary"]
    assert comparison["pairs"] == 50 and comparison["a"]["pairs"] == 50 and "sign_test_p" in comparison
    generations = [json.loads(line) for line in (runs / "uf" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 5 and all(len(g["answers"]) == 2 for g in generations)
    assert "you> Give me three tips for writing a good prompt." in result.stdout
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
