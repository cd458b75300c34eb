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


def _model_dir(d, with_template=False):
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    (d / "tokenizer.json").write_text("{}")
    (d / "generation_config.json").write_text('{"eos_token_id": [1, 2]}')
    config = {"eos_token": "<e>", **({"chat_template": "{{ old }}"} if with_template else {})}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_complete_policy_adds_tokenizer_generation_config_and_the_runs_template(tmp_path):
    base = _model_dir(tmp_path / "base", with_template=True)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "config.json").write_text('{"trained": true}')
    template = tmp_path / "t.jinja"
    template.write_text("{{ new }}")
    checkpoint.complete_policy(saved, base, str(template))
    assert json.loads((saved / "config.json").read_text()) == {"trained": True}  # never overwritten
    assert (saved / "generation_config.json").read_text() == '{"eos_token_id": [1, 2]}'
    assert (saved / "chat_template.jinja").read_text() == "{{ new }}"
    assert "chat_template" not in json.loads((saved / "tokenizer_config.json").read_text())


def test_export_takes_a_checkpoint_a_run_or_its_final_policy(tmp_path):
    run = tmp_path / "run"
    _model_dir(run / "policy")
    out = checkpoint.export(str(run), tmp_path / "out1")  # no checkpoints: the final policy
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    ckpt = run / "checkpoints" / "step_000004"
    _model_dir(ckpt / checkpoint.HF_DIR)
    (ckpt / checkpoint.LEARNER_DIR).mkdir()
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps({"state_version": checkpoint.STATE_VERSION, "step": 4}))
    (run / "checkpoints" / checkpoint.LATEST_FILE).write_text("step_000004\n")
    (ckpt / checkpoint.HF_DIR / "config.json").write_text('{"step": 4}')
    out = checkpoint.export(str(run), tmp_path / "out2")  # the newest checkpoint
    assert json.loads((out / "config.json").read_text()) == {"step": 4}
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        checkpoint.export(str(run), tmp_path / "out2")
    with pytest.raises(CheckpointError, match="no checkpoint there .*or a policy/ directory"):
        checkpoint.export(str(tmp_path / "nothing"), tmp_path / "out3")
