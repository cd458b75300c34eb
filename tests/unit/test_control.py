"""rlsys scale/status/stop argument handling and the control actor's state (no Ray needed:
RunControl is a plain class that the controller runs as a named actor)."""

import pytest

from rlsys.cli import main
from rlsys.control import RunControl, parse_scale_args


def test_parse_scale_args():
    assert parse_scale_args(["rollout=3"]) == (3, None, None)
    assert parse_scale_args(["--run", "r1", "rollout=2", "--address", "10.0.0.1:6379"]) == (2, "r1", "10.0.0.1:6379")


@pytest.mark.parametrize("argv, msg", [
    ([], "usage: rlsys scale rollout=N"),
    (["rollout=x"], "needs an integer"),
    (["rollout=0"], "N >= 1"),
    (["learner=2"], "unknown argument 'learner=2'"),
    (["rollout=2", "--run"], "--run needs a value"),
])
def test_parse_scale_args_errors(argv, msg):
    with pytest.raises(ValueError, match=msg):
        parse_scale_args(argv)


def test_cli_reports_bad_arguments_with_exit_code_2(capsys):
    assert main(["scale", "rollout=0"]) == 2
    assert "N >= 1" in capsys.readouterr().err
    assert main(["status", "--bogus"]) == 2


def test_run_control_state():
    c = RunControl("run-a", 2)
    assert c.desired() == {"rollout": 2, "stop": False}
    assert c.scale_rollout(4)["desired_rollout"] == 4
    with pytest.raises(ValueError, match="integer >= 1"):
        c.scale_rollout(0)
    c.update_report({"step": 7, "rollout_workers": 4})
    c.stop()
    assert c.status() == {"run": "run-a", "step": 7, "rollout_workers": 4, "desired_rollout": 4,
                          "stop_requested": True}
