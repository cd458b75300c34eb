"""The end-of-run report from a summary: running means, windowed throughput, the table, files."""

import numpy as np

from rlsys.observability.report import running_mean, table, throughput, write_report


def test_running_mean_and_throughput():
    np.testing.assert_allclose(running_mean([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    steps, rate = throughput([1.0, 2.0, 4.0, 5.0], [10, 20, 40, 60], window=2)
    np.testing.assert_array_equal(steps, [3, 4])
    np.testing.assert_allclose(rate, [30 / 3, 40 / 3])


def _summary(n=30):
    rng = np.random.default_rng(0)
    return {
        "name": "t",
        "steps": n,
        "train_seconds": 12.5,
        "samples": 128 * n,
        "samples_per_s": 307.2,
        "tokens_per_s": 1200.0,
        "eval_accuracy_before": 0.2,
        "eval_accuracy_after": 0.6,
        "reward_first": 0.1,
        "reward_last": 0.4,
        "effective_gradient_ratio": 0.7,
        "strategy": "uniform",
        "learner_restarts": 0,
        "share_generation": 0.3,
        "share_reward": 0.1,
        "share_learner": 0.5,
        "share_weight_sync": 0.1,
        "replay": {"put": 16 * n, "acked": 16 * n, "dropped_stale": 0},
        "judge": {"calls": 12, "spend": 6.0},
        "curves": {
            "reward": rng.random(n).tolist(),
            "effective_gradient_ratio": rng.random(n).tolist(),
            "time_s": np.linspace(0.4, 12.5, n).tolist(),
            "samples": (128 * np.arange(1, n + 1)).tolist(),
            "eval_accuracy": [[0, 0.2], [15, 0.45], [n, 0.6]],
        },
    }


def test_report_files(tmp_path):
    png, md = write_report(_summary(), tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
    text = md.read_text()
    for label, value in table(_summary()):
        assert f"| {label} | {value} |" in text
    assert "| eval accuracy | 0.200 -> 0.600 |" in text and "| judge calls / spend | 12 / 6.00 |" in text


def test_report_of_an_old_summary_without_the_new_curves(tmp_path):
    s = _summary(3)
    for k in ("time_s", "samples", "eval_accuracy"):
        del s["curves"][k]
    png, _ = write_report(s, tmp_path)
    assert png.stat().st_size > 10_000


def test_rlsys_report_redraws_from_a_run_dir(tmp_path, capsys):
    import json

    from rlsys.cli import main

    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.png").is_file() and "report.md" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
