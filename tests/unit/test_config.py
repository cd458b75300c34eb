"""Every YAML under conf/ composes against the schema; bad overrides fail with the key named."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlsys.config import ConfigError, RunConfig, compose, conf_dir, to_run_config

GROUPS = sorted(p.name for p in conf_dir().iterdir() if p.is_dir())


def all_options():
    for group in GROUPS:
        for f in sorted((conf_dir() / group).glob("*.yaml")):
            yield group, f.stem


def test_every_group_has_options():
    assert {"rollout", "reward", "judge", "scheduler", "replay", "learner", "cluster", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_yaml_composes(group, option, tmp_path):
    extra = []
    if (group, option) == ("judge", "vllm"):  # needs a local model directory
        (tmp_path / "config.json").write_text("{}")
        extra = [f"judge.model={tmp_path}"]
    if (group, option) == ("experiment", "hf"):  # the user's model and data
        extra = [f"model.path={tmp_path}", "data.train_files=train.jsonl"]
    cfg = to_run_config(compose([f"{group}={option}", *extra]))
    assert isinstance(cfg, RunConfig)


def test_judge_vllm_needs_a_local_model_directory(tmp_path):
    with pytest.raises(ConfigError, match="judge.model"):
        to_run_config(compose(["judge=vllm"]))
    with pytest.raises(ConfigError, match="not a local model directory"):
        to_run_config(compose(["judge=vllm", f"judge.model={tmp_path}"]))


def test_default_is_tiny_experiment():
    cfg = to_run_config(compose())
    assert cfg.name == "tiny"
    assert cfg.replay.max_staleness == 0
    assert cfg.scheduler.strategy == "uniform"


def test_tiny_async_inherits_tiny():
    cfg = to_run_config(compose(["experiment=tiny_async"]))
    assert cfg.replay.max_staleness == 1 and cfg.steps == to_run_config(compose()).steps


def test_unknown_key_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose(["learner.learning_rate=0.1"])
    assert "learning_rate" in str(e.value) or "learning_rate" in str(e.value.__cause__)


def test_wrong_type_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose(["steps=many"])
    assert "steps" in str(e.value) or "steps" in str(e.value.__cause__)


@pytest.mark.parametrize(
    "override,key",
    [
        ("learner.zero_stage=5", "learner.zero_stage"),
        ("replay.max_staleness=-1", "replay.max_staleness"),
        ("scheduler.min_per_prompt=100", "scheduler.max_per_prompt"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("reward.function=nope", "reward.function"),
        ("learner.loss.aggregation=mean", "learner.loss.aggregation"),
        ("steps=0", "steps"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        to_run_config(compose([override]))
    assert key in str(e.value)


def _rlsys(*args, **kw):
    exe = Path(sys.executable).parent / "rlsys"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, **kw)


def test_cli_prints_composed_config():
    out = _rlsys("train", "--cfg", "job", "learner.lr=3e-4")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.0003" in out.stdout and "max_staleness: 0" in out.stdout


def test_cli_unknown_key_is_a_clear_error(tmp_path):
    out = _rlsys("train", "learner.learning_rate=0.1", f"run_root={tmp_path}")
    assert out.returncode != 0
    assert "learning_rate" in out.stderr


def test_cli_invalid_value_is_a_clear_error(tmp_path):
    out = _rlsys("train", "learner.zero_stage=7", f"run_root={tmp_path}")
    assert out.returncode == 2
    assert "learner.zero_stage must be 0, 1, 2 or 3" in out.stderr


def test_cli_malformed_dataset_row_is_a_clear_error(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(
        '{"id": "a", "prompt": "1+2=", "answer": "3", "split": "train"}\n'
        '{"id": "b", "prompt": "2+2=", "answer": 4, "split": "train"}\n'
    )
    out = _rlsys("train", f"task.data_path={data}", f"run_root={tmp_path}")
    assert out.returncode == 2, out.stderr
    assert f"{data}:2: field 'answer' must be a string, got int" in out.stderr
    assert "Traceback" not in out.stderr


def test_actors_that_do_not_fit_name_the_override_that_makes_them_fit():
    """``rlsys train learner.num_ranks=2 learner.zero_stage=3`` on a 2-CPU cluster: an rlsys error
    (ConfigError, printed without a traceback) that names cluster.num_cpus, not a RuntimeError."""
    from rlsys.config import ConfigError, compose, to_run_config
    from rlsys.controller.cluster import check_resources

    cfg = to_run_config(compose(["learner.num_ranks=2", "learner.zero_stage=3"]))
    with pytest.raises(ConfigError, match=r"need 2.25 CPUs .* has 2 CPUs.*add cluster.num_cpus=3"):
        check_resources(cfg, {"CPU": 2.0})
    check_resources(cfg, {"CPU": 3.0})  # fits
    remote = to_run_config(compose(["learner.num_ranks=2", "cluster.address=auto"]))
    with pytest.raises(ConfigError, match="add nodes"):
        check_resources(remote, {"CPU": 2.0})
    gpu = to_run_config(compose(["learner.num_gpus=1"]))
    with pytest.raises(ConfigError, match="GPUs"):
        check_resources(gpu, {"CPU": 8.0})


def test_the_hf_experiment_needs_a_model_and_data(tmp_path):
    with pytest.raises(ConfigError, match=r"experiment=hf needs model.path, data.train_files: add model.path=\.\.\."):
        to_run_config(compose(["experiment=hf"]))
    cfg = to_run_config(compose(["experiment=hf", f"model.path={tmp_path}", "data.train_files=[a.jsonl, b.parquet]"]))
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"] and cfg.max_train_seconds == 0
    assert cfg.reward.function == "math_verify" and cfg.rollout.max_new_tokens >= 512


def test_data_keys_are_checked():
    with pytest.raises(ConfigError, match="data.overlong_prompts must be one of"):
        to_run_config(compose(["data.train_files=a.jsonl", "data.overlong_prompts=truncate"]))
    with pytest.raises(ConfigError, match="data.eval_files is set but data.train_files is not"):
        to_run_config(compose(["data.eval_files=a.jsonl"]))
