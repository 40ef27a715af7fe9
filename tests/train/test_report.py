"""report.py: metrics.jsonl → PNG plots + report.html; one-line errors."""
import json

import pytest

from orpo.commands.cli import main
from orpo.errors import OrpoError
from orpo.train.report import PLOTS, _draw, read_metrics, smoothing_window, trailing_mean, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train_record(step):
    return {"step": step, "epoch": step / 10, "loss": 3.0 - step / 10, "nll": 2.0, "or_loss": 1.0 - step / 20,
            "log_odds": -1.0 + step / 5, "logps/chosen": -2.0 + step / 10, "logps/rejected": -1.0 - step / 10,
            "accuracy": min(1.0, step / 10), "margin": 0.0, "tokens": 100.0, "tokens_per_second": 50.0 + step,
            "grad_norm": 1.0, "learning_rate": 1e-5}


def _write(tmp_path, with_eval=True):
    records = [_train_record(s) for s in range(1, 11)]
    if with_eval:
        records += [{"step": 5, "eval_loss": 2.5, "eval_nll": 2.1, "eval_log_odds": 0.3, "eval_accuracy": 0.5}]
    records += [{"step": 10, "train_runtime": 12.0, "train_loss": 2.4}]  # Trainer's summary: not a step
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_read_metrics_splits_train_and_eval(tmp_path):
    _write(tmp_path)
    train, evals = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in train] == list(range(1, 11))
    assert evals == [{"step": 5, "loss": 2.5, "nll": 2.1, "log_odds": 0.3, "accuracy": 0.5}]


def test_write_report_writes_every_plot_and_links_them(tmp_path):
    _write(tmp_path)
    path = write_report(str(tmp_path))
    assert path == str(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    for name in PLOTS:
        if name == "rewards.png":  # a reward model's (test below)
            assert not (tmp_path / name).exists()
            continue
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE, name
        assert f'<img src="{name}"' in page
    assert "10 logged training steps (last: step 10),\n1 evaluations" in page
    assert "<tr><td>log_odds</td><td>-0.8</td><td>1</td></tr>" in page  # first and last log


def test_a_reward_models_run_is_plotted_with_its_rewards(tmp_path):
    """--objective reward logs loss, accuracy, margin and rewards/* (no nll): its steps are training records, drawn
    in loss.png, log_odds.png (its accuracy) and rewards.png; logps.png has nothing to draw."""
    records = [{"step": s, "loss": 0.7 - s / 20, "accuracy": s / 10, "margin": s / 10, "rewards/chosen": s / 20,
                "rewards/rejected": -s / 20, "tokens": 100.0, "tokens_per_second": 50.0} for s in range(1, 6)]
    records += [{"step": 5, "eval_loss": 0.5, "eval_accuracy": 0.75, "eval_margin": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_report(str(tmp_path))
    drawn = {name for name in PLOTS if (tmp_path / name).exists()}
    assert drawn == {"loss.png", "log_odds.png", "rewards.png", "speed.png"}
    assert "<tr><td>rewards/chosen</td><td>0.05</td><td>0.25</td></tr>" in (tmp_path / "report.html").read_text()


def test_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(OrpoError, match=r"metrics.jsonl: no such file; `orpo report` needs the output_dir"):
        write_report(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_runtime": 1.0}) + "\n")
    with pytest.raises(OrpoError, match=r"no training records to plot"):
        write_report(str(tmp_path))
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().startswith("orpo: error: ")


def test_cli_report(tmp_path, capsys):
    _write(tmp_path, with_eval=False)
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")


def test_trailing_mean_by_hand():
    # window 2: 1, (1+2)/2, (2+3)/2, ...; window 3: 1, 1.5, (1+2+3)/3, (2+3+4)/3, (3+4+5)/3
    assert trailing_mean([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert trailing_mean([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert trailing_mean([4.0, 2.0], 1) == [4.0, 2.0]
    assert [smoothing_window(n) for n in (5, 19, 20, 45, 1000)] == [1, 1, 2, 4, 100]


def test_long_training_series_get_a_trailing_mean_eval_series_do_not():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [_train_record(s) for s in range(1, 41)]
    evals = [{"step": s, "logps/chosen": -1.0, "logps/rejected": -2.0} for s in range(10, 41, 10)]
    fig, ax = plt.subplots()
    _draw(ax, records, evals, PLOTS["logps.png"][1], ("-", "--"))
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["chosen (mean of 4 logs)", "chosen (eval)", "rejected (mean of 4 logs)", "rejected (eval)"]
    raw, mean = ax.lines[0], ax.lines[1]  # the faint raw chosen series, then its mean in the same colour
    assert raw.get_alpha() == 0.25 and raw.get_color() == mean.get_color()
    chosen = [r["logps/chosen"] for r in records]
    assert list(mean.get_ydata()) == pytest.approx(trailing_mean(chosen, 4))
    plt.close(fig)


def test_a_judged_run_gets_a_judge_section_with_a_link(tmp_path):
    _write(tmp_path)
    (tmp_path / "judge").mkdir()
    stats = {"win_rate": 0.625, "win_rate_ci": [0.4, 0.85], "confidence": 0.95, "prompts": 4, "comparisons": 12,
             "wins": 6, "ties": 3, "losses": 3, "sign_test_p": 0.625, "lc_win_rate": 0.6}
    settings = {"a": "runs/x", "b": "base", "judge": "reward model rm"}
    (tmp_path / "judge" / "judge.json").write_text(json.dumps({"settings": settings, "stats": stats, "judge": {}}))
    page = open(write_report(str(tmp_path))).read()
    assert '<a href="judge/judge.html">judge/judge.html</a>' in page
    assert "0.625 (95% CI 0.400 – 0.850), 4 prompts, 12 comparisons" in page and "6 / 3 / 3" in page
    (tmp_path / "judge" / "judge.json").write_text("{}")
    with pytest.raises(OrpoError, match=r"judge.json: not a judge.json that orpo judge wrote"):
        write_report(str(tmp_path))
