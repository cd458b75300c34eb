"""rlsys.checkpoint helpers: when to save, atomic publish, keep-last pruning, resolving resume=."""

import json

import pytest

from rlsys import checkpoint
from rlsys.checkpoint import CheckpointConfig, CheckpointError


def test_is_due_every_k_and_at_the_last_step():
    cfg = CheckpointConfig(every_steps=3)
    assert [s for s in range(1, 11) if checkpoint.is_due(cfg, s, 10)] == [3, 6, 9, 10]
    assert not any(checkpoint.is_due(CheckpointConfig(), s, 10) for s in range(1, 11))


@pytest.mark.parametrize("kw", [{"every_steps": -1}, {"keep_last": 0}])
def test_config_errors(kw):
    with pytest.raises(ValueError, match="checkpoint."):
        CheckpointConfig(**kw)


def fake_checkpoint(root, step, keep_last=2):
    tmp = checkpoint.begin(root, step)
    (tmp / "hf").mkdir()
    (tmp / "learner").mkdir()
    return checkpoint.commit(tmp, {"step": step, "version": step}, root, keep_last)


def test_commit_publishes_atomically_and_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        final = fake_checkpoint(root, step)
    assert final == root / "step_000006" and not list(root.glob("*.tmp"))
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_000004", "step_000006"]
    assert (root / "latest").read_text().strip() == "step_000006"
    assert json.loads((final / "state.json").read_text())["state_version"] == checkpoint.STATE_VERSION


def test_resolve_accepts_a_checkpoint_its_root_or_the_run_dir(tmp_path):
    fake_checkpoint(tmp_path / "run" / "checkpoints", 3)
    want = tmp_path / "run" / "checkpoints" / "step_000003"
    for p in (want, tmp_path / "run" / "checkpoints", tmp_path / "run"):
        assert checkpoint.resolve(str(p)) == want
    assert checkpoint.read_state(want)["step"] == 3


def test_resume_from_nothing_or_a_broken_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        checkpoint.resolve(str(tmp_path))
    ck = fake_checkpoint(tmp_path, 1)
    (ck / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.read_state(ck)
    (ck / "state.json").write_text(json.dumps({"state_version": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        checkpoint.read_state(ck)
    (ck / "state.json").write_text(json.dumps({"state_version": checkpoint.STATE_VERSION}))
    (ck / "learner").rmdir()
    with pytest.raises(CheckpointError, match="incomplete: no learner/"):
        checkpoint.read_state(ck)
