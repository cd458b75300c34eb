"""Prometheus metric names (one vocabulary: ``rlsys_<role>_<name>_<unit>``) and the
controller's endpoint.

Every metric rlsys exports is declared here and nowhere else. Each process serves its own
endpoint: the controller (``Metrics``: learner progress, scheduler, replay, reward and judge
totals) and every actor (``ACTOR_METRICS``: what only that actor sees, and its memory). The
controller writes the list of endpoints as a Prometheus file_sd file
(``<run dir>/prometheus_targets.json``, and ``cluster.prometheus_targets`` if set) with the
target labels ``run``, ``role`` and ``index``; labels are bounded that way (no per-prompt
labels), and metric names carry the role: ``rlsys_<role>_<name>_<unit>``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from rlsys.records import StepRecord
from rlsys.replay.base import ReplayCounters

log = logging.getLogger(__name__)


class Metrics:
    """The controller's metrics, on their own registry (so tests can run several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._dropped_seen = 0
        self.steps = Counter("rlsys_learner_steps", "Optimizer steps committed", registry=r)
        self.policy_version = Gauge("rlsys_learner_policy_version", "Current policy version", registry=r)
        self.loss = Gauge("rlsys_learner_loss", "Policy loss of the last step", registry=r)
        self.grad_norm = Gauge("rlsys_learner_grad_norm", "Global gradient norm of the last step", registry=r)
        self.kl = Gauge(
            "rlsys_learner_kl", "KL(behaviour || current policy) of the last step (k1 estimate)", registry=r
        )
        self.step_seconds = Histogram(
            "rlsys_learner_step_seconds",
            "Learner step wall time",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.sync_seconds = Histogram(
            "rlsys_learner_weight_sync_seconds",
            "Weight sync wall time",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.samples = Counter("rlsys_rollout_samples", "Completions generated", registry=r)
        self.tokens = Counter("rlsys_rollout_tokens", "Completion tokens generated", registry=r)
        self.gen_seconds = Histogram(
            "rlsys_rollout_generation_seconds",
            "Generate call latency",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.switched = Counter(
            "rlsys_rollout_partial_switched",
            "Completions continued under a newer policy version (partial rollouts)",
            registry=r,
        )
        self.reward_mean = Gauge("rlsys_reward_mean", "Mean reward of the last learner batch", registry=r)
        self.reward_extra = Gauge(
            "rlsys_reward_extra",
            "Mean of an extra score the reward function returned (a dict return), last learner batch",
            ["score"],
            registry=r,
        )
        self.reward_failures = Counter("rlsys_reward_failures", "Completions whose reward function failed", registry=r)
        self.replay_depth = Gauge("rlsys_replay_depth_groups", "Groups waiting in the replay store", registry=r)
        self.replay_dropped_stale = Counter(
            "rlsys_replay_dropped_stale_groups", "Groups dropped for exceeding max_staleness", registry=r
        )
        self.replay_acked = Gauge(
            "rlsys_replay_acked_groups", "Groups acknowledged (trained and committed)", registry=r
        )
        self.replay_put = Gauge("rlsys_replay_put_groups", "Groups put into the store", registry=r)
        self.replay_redelivered = Gauge(
            "rlsys_replay_redelivered_groups", "Groups handed back for redelivery after a learner failure", registry=r
        )
        self.replay_rejected = Gauge(
            "rlsys_replay_rejected_records", "Records rejected (corrupt, unknown version)", registry=r
        )
        self.replay_duplicates = Gauge(
            "rlsys_replay_duplicate_groups", "Already-trained groups skipped (dedupe)", registry=r
        )
        self.version_lag = Gauge(
            "rlsys_rollout_policy_version_lag_versions",
            "Largest policy-version lag among the last step's groups (learner - sampler)",
            registry=r,
        )
        self.replay_staleness = Histogram(
            "rlsys_replay_staleness_versions",
            "Policy-version lag of trained groups",
            registry=r,
            buckets=(0, 1, 2, 3, 4, 8),
        )
        self.group_size = Histogram(
            "rlsys_scheduler_group_size_rollouts",
            "Rollouts per trained group (allocation)",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.effective_gradient_ratio = Gauge(
            "rlsys_scheduler_effective_gradient_ratio",
            "Fraction of the last batch's rollouts in groups with non-zero reward variance",
            registry=r,
        )
        self.effective_prompt_ratio = Gauge(
            "rlsys_scheduler_effective_prompt_ratio",
            "Fraction of the last batch's groups with non-zero reward variance",
            registry=r,
        )
        self.rollouts_per_step = Gauge(
            "rlsys_scheduler_rollouts_per_step", "Rollouts generated since the previous step", registry=r
        )
        self.filtered = Counter("rlsys_scheduler_filtered_groups", "Groups discarded by dynamic sampling", registry=r)
        self.reused = Counter(
            "rlsys_scheduler_reused_responses", "Stored correct responses swapped in (AR3PO)", registry=r
        )
        self.routed_fraction = Gauge("rlsys_reward_routed_fraction", "Fraction of pairs sent to the judge", registry=r)
        self.rm_judge_agreement = Gauge(
            "rlsys_reward_rm_judge_agreement", "Fraction of judged pairs where the RM agreed with the judge", registry=r
        )
        self.judge_calls = Gauge("rlsys_judge_calls", "Judge calls made (cumulative)", registry=r)
        self.judge_fallbacks = Gauge("rlsys_judge_fallbacks", "Pairs that fell back to the RM (cumulative)", registry=r)
        self.judge_spend = Gauge("rlsys_judge_spend", "Judge spend (cumulative, judge.cost_per_call units)", registry=r)
        self.judge_calls_per_step = Gauge(
            "rlsys_judge_calls_per_step", "Judge calls made during the last step", registry=r
        )
        self.judge_spend_per_step = Gauge(
            "rlsys_judge_spend_per_step", "Judge spend during the last step (judge.cost_per_call units)", registry=r
        )
        self.judge_latency = Gauge("rlsys_judge_latency_seconds", "Mean judge call latency", registry=r)
        self.judge_queue_depth = Gauge("rlsys_judge_queue_depth_calls", "Judge calls queued or in flight", registry=r)
        self.eval_accuracy = Gauge("rlsys_controller_eval_accuracy", "Held-out greedy accuracy", registry=r)
        self.worker_restarts = Counter(
            "rlsys_controller_worker_restarts",
            "Dead or hung workers replaced (role: rollout, reward, judge, learner)",
            ["role"],
            registry=r,
        )
        for role in ("rollout", "reward", "judge", "learner"):  # exported at 0 from the start
            self.worker_restarts.labels(role)
        self.skipped_nonfinite = Counter(
            "rlsys_learner_skipped_nonfinite_groups",
            "Groups of steps skipped for a non-finite loss or gradient",
            registry=r,
        )
        self.memory = _memory_gauge("controller", r)

    def observe_round(
        self,
        samples: int,
        tokens: int,
        reward_failures: int,
        generate_seconds: float,
        filtered: int,
        switched: int,
        reused: int,
    ) -> None:
        """One generate + score round of a rollout loop."""
        self.samples.inc(samples)
        self.tokens.inc(tokens)
        self.reward_failures.inc(reward_failures)
        self.gen_seconds.observe(generate_seconds)
        self.filtered.inc(filtered)
        self.switched.inc(switched)
        self.reused.inc(reused)

    def observe_step(self, rec: StepRecord, replay: ReplayCounters) -> None:
        """A committed learner step (the same record the loggers and the progress line get), and the
        replay store's counters at that point."""
        self.effective_gradient_ratio.set(rec.effective_gradient_ratio)
        self.effective_prompt_ratio.set(rec.effective_prompt_ratio)
        self.rollouts_per_step.set(rec.rollouts_per_step)
        for n in rec.group_sizes:
            self.group_size.observe(n)
        self.steps.inc()
        self.policy_version.set(rec.policy_version)
        self.loss.set(rec.loss)
        self.grad_norm.set(rec.grad_norm)
        self.reward_mean.set(rec.reward_mean)
        for name, value in rec.extra_scores.items():
            self.reward_extra.labels(score=name).set(value)
        self.step_seconds.observe(rec.step_seconds)
        self.sync_seconds.observe(rec.weight_sync_seconds)
        for lag in rec.staleness:
            self.replay_staleness.observe(lag)
        self.version_lag.set(max(rec.staleness))
        self.kl.set(rec.kl)
        self.replay_acked.set(replay.acked)
        self.replay_put.set(replay.put)
        self.replay_redelivered.set(replay.requeued)
        self.replay_rejected.set(replay.rejected)
        self.replay_duplicates.set(replay.duplicates)
        # A counter mirrors the store's cumulative count (which a resumed Redis store restores).
        self.replay_dropped_stale.inc(max(0, rec.dropped_stale - self._dropped_seen))
        self._dropped_seen = max(self._dropped_seen, rec.dropped_stale)


def _memory_gauge(role: str, registry: CollectorRegistry) -> Gauge:
    """``rlsys_<role>_process_memory_bytes``: resident memory of the exporting process, read at scrape."""
    import psutil

    proc = psutil.Process()
    g = Gauge(f"rlsys_{role}_process_memory_bytes", f"Resident memory of the {role} process", registry=registry)
    g.set_function(lambda: proc.memory_info().rss)
    return g


class RolloutMetrics:
    """A rollout worker's own endpoint (role ``rollout``, one per worker)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tokens = Counter("rlsys_rollout_engine_tokens", "Completion tokens this engine generated", registry=r)
        self.in_flight = Gauge(
            "rlsys_rollout_engine_requests_in_flight",
            "Requests in this engine's current generate call (and carried over)",
            registry=r,
        )
        self.latency = Histogram(
            "rlsys_rollout_engine_generate_seconds",
            "Engine time of one generate call",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.version = Gauge("rlsys_rollout_engine_policy_version", "Policy version this engine serves", registry=r)
        self.memory = _memory_gauge("rollout", r)


class RewardMetrics:
    """A reward worker's own endpoint (role ``reward``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.groups = Counter("rlsys_reward_worker_groups", "Groups this reward worker scored", registry=r)
        self.latency = Histogram(
            "rlsys_reward_worker_score_seconds",
            "Time to score one batch of groups",
            registry=r,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.queue = Gauge(
            "rlsys_reward_worker_queue_depth_batches", "Score calls in progress in this worker", registry=r
        )
        self.memory = _memory_gauge("reward", r)


class JudgeMetrics:
    """The judge worker's own endpoint (role ``judge``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.calls = Counter("rlsys_judge_worker_calls", "Judge calls this worker made", registry=r)
        self.fallbacks = Counter("rlsys_judge_worker_fallbacks", "Pairs that fell back to the RM here", registry=r)
        self.queue = Gauge("rlsys_judge_worker_queue_depth_calls", "Judge calls queued or in flight", registry=r)
        self.latency = Histogram(
            "rlsys_judge_worker_latency_seconds",
            "Latency of one judge_pairs request",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.memory = _memory_gauge("judge", r)


class LearnerRankMetrics:
    """A learner rank's own endpoint (role ``learner``, one per rank)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tokens = Counter("rlsys_learner_rank_tokens", "Completion tokens this rank trained on", registry=r)
        self.step_seconds = Histogram(
            "rlsys_learner_rank_step_seconds",
            "This rank's forward+backward+step time",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.kl = Gauge("rlsys_learner_rank_kl", "Approximate KL(behaviour || current) of the last step", registry=r)
        self.memory = _memory_gauge("learner", r)


ACTOR_METRICS = {
    "rollout": RolloutMetrics,
    "reward": RewardMetrics,
    "judge": JudgeMetrics,
    "learner": LearnerRankMetrics,
}
"""Role -> the metrics an actor of that role serves on its own endpoint."""


def all_registries() -> list[CollectorRegistry]:
    """Every registry rlsys exports (the controller's and each actor role's): the dashboard
    generator and its test introspect these."""
    return [Metrics().registry, *(cls().registry for cls in ACTOR_METRICS.values())]


def serve_actor(role: str, host: str):
    """An actor's metrics on a free port of ``host``: returns (its metrics, "host:port")."""
    metrics = ACTOR_METRICS[role]()
    server = serve(metrics, host, 0)
    advertised = host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: advertise the node's address
        try:
            import ray

            advertised = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001
            advertised = "127.0.0.1"
    return metrics, f"{advertised}:{server.port}", server


@dataclass
class MetricsServer:
    host: str
    port: int
    _server: object

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(metrics, host: str, port: int) -> MetricsServer:
    """Start the endpoint (port 0 picks a free port). Binds localhost unless configured."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    actual = server.server_address[1]
    log.info("Prometheus metrics at http://%s:%d/metrics", host, actual)
    return MetricsServer(host, actual, server)
