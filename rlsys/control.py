"""Control plane of a running job: ``rlsys scale rollout=N``, ``rlsys status``, ``rlsys stop``.

Each run registers one named Ray actor, ``rlsys-control``, in its own namespace
(``rlsys-<run dir name>``). It holds what an operator asked for (the desired number of rollout
workers) and what the controller last reported (step, policy version, workers). The
controller polls it between steps and converges:

* **scale up**: a new RolloutWorker starts from the run's starting policy, is brought to the
  current policy version (the last published weights) under the same lock as the learner's
  publication, and only then gets its first request, so its first samples carry the current
  version;
* **scale down**: the newest workers are asked to stop; each finishes the request it is
  serving (its groups are scored and stored like any other) and stops before taking another
  admission slot, then its actor is removed. Nothing is lost or generated twice;
* **stop**: the learner finishes the step in progress and the run ends normally (final
  evaluation, summary, and a checkpoint when ``checkpoint.every_steps`` is set).

The command line finds the job by the control actor's name, in any namespace of the cluster
(``--run`` picks one when several runs share a cluster).
"""

from __future__ import annotations

import time
from typing import Optional

CONTROL_NAME = "rlsys-control"


class RunControl:
    """Ray actor (named ``rlsys-control``): the desired state of a run and its last report."""

    def __init__(self, run: str, rollout_workers: int):
        self.run = run
        self.desired_rollout = rollout_workers
        self.report: dict = {"run": run, "rollout_workers": rollout_workers}
        self.requests: list[dict] = []
        self.stop_requested = False

    def scale_rollout(self, n: int) -> dict:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"rollout workers must be an integer >= 1, got {n!r}")
        self.desired_rollout = n
        self.requests.append({"rollout": n, "time": time.time()})
        return {"run": self.run, "desired_rollout": n, "current_rollout": self.report.get("rollout_workers")}

    def stop(self) -> dict:
        self.stop_requested = True
        self.requests.append({"stop": True, "time": time.time()})
        return {"run": self.run, "stop_requested": True, "step": self.report.get("step")}

    def desired(self) -> dict:
        return {"rollout": self.desired_rollout, "stop": self.stop_requested}

    def update_report(self, report: dict) -> None:
        self.report = {"run": self.run, **report}

    def status(self) -> dict:
        return {**self.report, "desired_rollout": self.desired_rollout, "stop_requested": self.stop_requested}


def find_control(run: Optional[str] = None):
    """The control actor of ``run`` (a run directory name), or of the only run on the cluster."""
    import ray

    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == CONTROL_NAME]
    if run is not None:
        named = [a for a in named if a["namespace"] == f"rlsys-{run}"]
    if not named:
        where = f" for run {run!r}" if run else ""
        raise LookupError(f"no running rlsys job{where} on this Ray cluster")
    if len(named) > 1:
        runs = ", ".join(sorted(a["namespace"].removeprefix("rlsys-") for a in named))
        raise LookupError(f"several rlsys jobs run on this cluster ({runs}); pick one with --run")
    return ray.get_actor(CONTROL_NAME, namespace=named[0]["namespace"])


def connect(address: Optional[str]) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)


def parse_scale_args(argv: list[str]) -> tuple[int, Optional[str], Optional[str]]:
    """``rollout=N [--run NAME] [--address ADDR]`` -> (N, run, address)."""
    n, run, address = None, None, None
    it = iter(argv)
    for a in it:
        if a.startswith("rollout="):
            try:
                n = int(a.split("=", 1)[1])
            except ValueError:
                raise ValueError(f"rollout=N needs an integer, got {a!r}") from None
        elif a in ("--run", "--address"):
            v = next(it, None)
            if v is None:
                raise ValueError(f"{a} needs a value")
            run, address = (v, address) if a == "--run" else (run, v)
        else:
            raise ValueError(f"unknown argument {a!r}; usage: rlsys scale rollout=N [--run NAME] [--address ADDR]")
    if n is None:
        raise ValueError("usage: rlsys scale rollout=N [--run NAME] [--address ADDR]")
    if n < 1:
        raise ValueError(f"rollout=N needs N >= 1, got {n}")
    return n, run, address
