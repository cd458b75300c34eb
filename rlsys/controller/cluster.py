"""The Ray cluster a run uses: start a local one (kept on loopback) or join one, and check that
the run's actors fit before any is placed. Light on purpose: the command line imports it to reach
a running job without loading torch."""

from __future__ import annotations

import math
import os

from rlsys.config import ClusterConfig, ConfigError, RunConfig


def keep_ray_on_loopback() -> None:
    """Make the local Ray cluster this process starts bind 127.0.0.1 only (call before
    ``ray.init``). Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is imported,
    so setting the variable after ``import ray`` is not enough: its cluster then takes the
    machine's external address and listens on every interface. The variable is still set for
    the daemons and workers ray.init starts; the constant for this process."""
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray imported already
        constants.ENABLE_RAY_CLUSTER = False


def start_ray(cfg: ClusterConfig, namespace: str) -> None:
    """Join ``cluster.address`` or start a local cluster on loopback with explicit CPUs."""
    import ray

    if ray.is_initialized():
        return
    if cfg.address is not None:
        ray.init(address=cfg.address, namespace=namespace, log_to_driver=False)
        return
    if cfg.loopback_only:
        keep_ray_on_loopback()
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=False,
        _temp_dir=cfg.temp_dir,
        namespace=namespace,
        _node_ip_address="127.0.0.1" if cfg.loopback_only else None,
        log_to_driver=False,
    )


def check_resources(cfg: RunConfig, available: dict) -> None:
    """Fail fast (instead of waiting forever for placement) when the actors cannot fit, with the
    override that makes them fit. Ray's CPUs are logical: on a machine with fewer cores than a
    run asks for, raising ``cluster.num_cpus`` oversubscribes them, which the embedded default
    tolerates (its roles mostly take turns)."""
    judge = cfg.judge.backend != "none"
    need_cpu = (
        cfg.rollout.num_workers * cfg.rollout.num_cpus
        + cfg.reward.num_workers * cfg.reward.num_cpus
        + cfg.learner.num_ranks * cfg.learner.num_cpus
        + judge * cfg.judge.num_cpus
    )
    need_gpu = (
        cfg.rollout.num_workers * cfg.rollout.num_gpus
        + cfg.learner.num_ranks * cfg.learner.num_gpus
        + judge * cfg.judge.num_gpus
    )
    have_cpu, have_gpu = available.get("CPU", 0.0), available.get("GPU", 0.0)
    if need_cpu <= have_cpu + 1e-9 and need_gpu <= have_gpu + 1e-9:
        return
    parts = [
        f"the actors need {need_cpu:g} CPUs and {need_gpu:g} GPUs but the Ray cluster has {have_cpu:g} CPUs and "
        f"{have_gpu:g} GPUs"
    ]
    if need_gpu > have_gpu + 1e-9:
        parts.append(
            "lower rollout.num_gpus / learner.num_gpus / judge.num_gpus or the worker counts, or run on a "
            "cluster with more GPUs (cluster.address)"
        )
    elif cfg.cluster.address is None:
        parts.append(
            f"add cluster.num_cpus={math.ceil(need_cpu - 1e-9)} (Ray's CPUs are logical; the local cluster "
            "may claim more than the machine has), or lower rollout.num_cpus / learner.num_cpus / "
            "reward.num_cpus / judge.num_cpus or the worker counts"
        )
    else:
        parts.append(
            "lower rollout.num_cpus / learner.num_cpus / reward.num_cpus / judge.num_cpus or the worker "
            "counts, or add nodes to the cluster"
        )
    raise ConfigError("; ".join(parts))
