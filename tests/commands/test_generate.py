"""generate.py / `orpo generate`: prompts from MT-Bench or prompt rows, two models side by side."""
import json

import pytest

from orpo.commands.cli import main
from orpo.errors import OrpoError
from orpo.commands.generate import read_prompts
from tiny import save_tiny_chat_model

MT_BENCH = "/work/shared/data/mt_bench_questions.jsonl"


def test_mt_bench_first_turns_are_read_as_is():
    prompts = read_prompts(MT_BENCH)
    assert len(prompts) == 80 and prompts[0]["id"] == 81
    assert prompts[0]["messages"] == [{"role": "user", "content": "Compose an engaging travel blog post about a "
                                       "recent trip to Hawaii, highlighting cultural experiences and must-see attractions."}]


def test_prompt_rows_and_bad_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n\n"
                    + json.dumps({"id": "x", "prompt": [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "Why?"}]}) + "\n")
    prompts = read_prompts(str(path))
    assert [p["id"] for p in prompts] == [0, "x"] and prompts[1]["messages"][0]["role"] == "system"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(OrpoError, match=r"p.jsonl, line 2: expected a 'prompt' \(text or messages\) or MT-Bench 'turns'"):
        read_prompts(str(path))


def test_generate_compare_writes_jsonl_and_html(tmp_path, capsys):
    a, b = save_tiny_chat_model(tmp_path / "a", 0), save_tiny_chat_model(tmp_path / "b", 1)
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", a, "--compare", b, "--prompts", MT_BENCH, "--limit", "3",
            "--max_new_tokens", "6", "--output", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "gen.html")]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [81, 82, 83]
    assert records[0]["prompt"].startswith("Compose an engaging travel blog post")
    assert all(set(r["answers"]) == {a, b} for r in records)
    assert any(r["answers"][a] != r["answers"][b] for r in records)  # two different models
    page = (tmp_path / "gen.html").read_text()
    assert "Compose an engaging travel blog post" in page and page.count("<tr>") == 4
    first = out.read_text()
    assert main(args) == 0  # greedy: the same answers again
    assert out.read_text() == first
