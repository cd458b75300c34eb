"""End-of-run report: ``report.png`` (four plots over steps) and ``report.md`` (a summary table),
written into the run directory from ``summary.json`` alone, so a finished run can be re-reported
(``rlsys report runs/<run>``).

Every number comes from the summary, whose per-step curves are recorded from the same values
the controller sets on its Prometheus gauges (``rlsys_reward_mean``,
``rlsys_scheduler_effective_gradient_ratio``, ``rlsys_controller_eval_accuracy``) and counters
(``rlsys_learner_steps``; samples from ``rlsys_rollout_samples``):

- reward: the mean reward of each step's batch, and its running mean over ``window`` steps;
- accuracy: held-out greedy accuracy at step 0, every ``eval_every`` steps and at the end;
- effective gradient ratio: the fraction of each step's rollouts in groups with reward variance;
- throughput: completions per second over ``window``-step windows of training wall time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def running_mean(x, window: int) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    lo = np.maximum(np.arange(1, len(x) + 1) - window, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(x) + 1) - lo)


def throughput(time_s, samples, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(step index, completions/s over the ``window`` steps ending there)."""
    t, n = np.asarray(time_s, float), np.asarray(samples, float)
    if len(t) < 2:
        return np.arange(len(t)) + 1, np.full(len(t), np.nan)
    w = max(1, min(window, len(t) - 1))
    rate = (n[w:] - n[:-w]) / np.maximum(t[w:] - t[:-w], 1e-9)
    return np.arange(w, len(t)) + 1, rate


def table(summary: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table."""
    s, r = summary, summary.get("replay", {})
    rows = [
        ("run", s.get("name", "")),
        ("steps", f"{s['steps']}"),
        ("training time", f"{s['train_seconds']:.1f} s"),
        ("samples (completions)", f"{s['samples']}"),
        ("samples/s", f"{s['samples_per_s']:.1f}"),
        ("generated tokens/s", f"{s['tokens_per_s']:.0f}"),
        ("eval accuracy", f"{s['eval_accuracy_before']:.3f} -> {s['eval_accuracy_after']:.3f}"),
    ]
    evals = s.get("curves", {}).get("evaluations") or []
    if evals and evals[0].get("k"):
        a, b, k = evals[0], evals[-1], evals[0]["k"]
        rows.append((f"eval mean@{k}", f"{a['mean_at_k']:.3f} -> {b['mean_at_k']:.3f}"))
        rows.append((f"eval pass@{k}", f"{a['pass_at_k']:.3f} -> {b['pass_at_k']:.3f}"))
    for name, value in (evals[-1].get("extra_scores") or {}).items() if evals else ():
        rows.append((f"eval {name} (mean, last)", f"{value:.3f}"))
    if s.get("reward_first") is not None:
        rows.append(("train reward (first -> last steps)", f"{s['reward_first']:.3f} -> {s['reward_last']:.3f}"))
    rows += [
        ("effective gradient ratio", f"{s['effective_gradient_ratio']:.3f}"),
        ("strategy", f"{s.get('strategy', '')}"),
        (
            "replay put / acked / dropped stale",
            f"{r.get('put', 0)} / {r.get('acked', 0)} / {r.get('dropped_stale', 0)}",
        ),
        ("learner restarts", f"{s.get('learner_restarts', 0)}"),
        (
            "workers replaced (dead or hung)",
            ", ".join(f"{k} {v}" for k, v in sorted(s.get("worker_restarts", {}).items())) or "0",
        ),
        ("groups skipped (non-finite step)", f"{s.get('skipped_nonfinite', 0)}"),
        (
            "time share: generation / reward / learner / sync",
            f"{s['share_generation']:.2f} / {s['share_reward']:.2f} / {s['share_learner']:.2f} / "
            f"{s['share_weight_sync']:.2f}",
        ),
    ]
    if s.get("judge"):
        rows.append(("judge calls / spend", f"{s['judge']['calls']} / {s['judge']['spend']:.2f}"))
    return rows


def sample_completions(examples: list) -> list[str]:
    """Markdown lines showing the last evaluation's sample completions."""
    if not examples:
        return []
    out = ["", f"## Sample completions (held-out, greedy, step {examples[0].get('step', '?')})", ""]
    for x in examples:
        mark = "correct" if x["correct"] else "wrong"
        out += [
            f"**{x['prompt_id']}** ({mark}; reference `{x['reference']}`)",
            "",
            "```text",
            x["prompt"] + x["completion"],
        ]
        out += ["```", ""]
    return out


def write_report(summary: dict, out_dir: Path, window: int = 10) -> list[Path]:
    """Write report.png and report.md into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    c = summary["curves"]
    steps = np.arange(1, len(c["reward"]) + 1)
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5), dpi=100)
    title = f"{summary.get('name', 'run')}: {summary['steps']} steps, {summary['train_seconds']:.0f} s"
    fig.suptitle(title)

    a = ax[0, 0]
    a.plot(steps, c["reward"], color="#9ecae1", lw=1, label="batch mean")
    a.plot(steps, running_mean(c["reward"], window), color="#08519c", lw=2, label=f"running mean ({window})")
    a.set(title="train reward", xlabel="step", ylabel="reward")
    a.legend(loc="lower right")

    a = ax[0, 1]
    ev = np.asarray(
        c.get("eval_accuracy")
        or [[0, summary["eval_accuracy_before"]], [summary["steps"], summary["eval_accuracy_after"]]],
        float,
    )
    a.plot(ev[:, 0], ev[:, 1], "o-", color="#006d2c")
    for x, y in ev:
        a.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    a.set(title="held-out accuracy (greedy)", xlabel="step", ylabel="accuracy", ylim=(0, 1.05))

    a = ax[1, 0]
    a.plot(steps, c["effective_gradient_ratio"], color="#fdae6b", lw=1, label="per step")
    a.plot(
        steps,
        running_mean(c["effective_gradient_ratio"], window),
        color="#d94801",
        lw=2,
        label=f"running mean ({window})",
    )
    a.set(title="effective gradient ratio", xlabel="step", ylabel="fraction of rollouts", ylim=(0, 1.05))
    a.legend(loc="lower right")

    a = ax[1, 1]
    if c.get("time_s") and c.get("samples"):
        x, rate = throughput(c["time_s"], c["samples"], window)
        a.plot(x, rate, color="#54278f", lw=2)
        a.axhline(
            summary["samples_per_s"],
            color="#9e9ac8",
            ls="--",
            lw=1,
            label=f"run average {summary['samples_per_s']:.0f}/s",
        )
        a.legend(loc="lower right")
    a.set(title=f"throughput ({window}-step windows)", xlabel="step", ylabel="completions / s")
    for a in ax.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png)
    plt.close(fig)

    md = out_dir / "report.md"
    lines = [f"# {title}", "", "![report](report.png)", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in table(summary)]
    lines += sample_completions(summary.get("eval_examples") or [])
    md.write_text("\n".join(lines) + "\n")
    return [png, md]
