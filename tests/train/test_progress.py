"""progress.py: the plain progress line, durations, and what a training run prints off a terminal."""
from orpo.train.progress import format_duration, format_line


def test_format_duration():
    assert [format_duration(s) for s in (7, 65, 3725, 0.4)] == ["7s", "1m05s", "1h02m05s", "0s"]


def test_train_and_eval_lines():
    logs = {"loss": 2.31, "log_odds": 0.12, "accuracy": 0.625, "tokens_per_second": 101.4, "nll": 2.0}
    assert format_line(10, 100, logs, 200) == "step 10/100  loss 2.3100  log_odds 0.120  acc 0.62  tok/s 101  eta 3m20s"
    assert format_line(1, 5, {"loss": 1.0}, None) == "step 1/5  loss 1.0000"
    assert format_line(10, 100, {"eval_loss": 2.0, "eval_accuracy": 0.5}, 60) == "eval step 10  loss 2.0000  acc 0.50"


def test_count_progress_logs_done_total_rate_and_eta_at_most_every_few_seconds_and_at_the_end(caplog):
    from orpo.train.progress import CountProgress

    now = [0.0]
    progress = CountProgress("judged", "pairs", every=5.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="orpo"):
        now[0] = 1.0
        progress(2, 10)  # under 5 s since the start: quiet
        now[0] = 6.0
        progress(4, 10)  # 4 pairs in 6 s: 0.67/s, 6 left: 9 s
        now[0] = 7.0
        progress(10, 10)  # the end: always
    assert [r.getMessage() for r in caplog.records] == ["judged: 4/10 pairs  0.67 pairs/s  eta 9s",
                                                        "judged: 10/10 pairs  1.43 pairs/s  eta 0s"]
