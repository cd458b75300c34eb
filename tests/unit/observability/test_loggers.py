"""Optional loggers (TensorBoard, W&B offline) receive the per-step metric records."""

import pytest
from helpers import tb_scalars

from rlsys.observability.loggers import LoggersConfig, MetricLoggers


def test_off_by_default_writes_nothing(tmp_path):
    lg = MetricLoggers(LoggersConfig(), tmp_path, "r")
    assert not lg.active
    lg.log(1, {"rlsys_reward_mean": 0.5})
    lg.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_and_wandb_offline_get_the_same_records(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = MetricLoggers(LoggersConfig(tensorboard=True, wandb=True), tmp_path, "run-x", config={"steps": 3})
    for step in (1, 2, 3):
        lg.log(step, {"rlsys_reward_mean": step / 10, "rlsys_learner_loss": -step, "rlsys_learner_kl": float("nan")})
    lg.close()
    got = tb_scalars(tmp_path)
    assert got["rlsys_reward_mean"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert [v for _, v in got["rlsys_learner_loss"]] == [-1, -2, -3]
    assert "rlsys_learner_kl" not in got  # non-finite values are skipped, not logged as NaN
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="wandb_mode"):
        LoggersConfig(wandb_mode="cloud")
