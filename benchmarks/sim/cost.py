"""Cost model of an rlsys cluster: rollout engines, learner ranks, weight publication.

Pure functions of numbers and numpy arrays; the event engine (``model.py``) asks them how
long each piece of work takes and how much of that time was useful.

Shape legend: S = sequences an engine runs in one segment (one engine call).

Rollout engine (one vLLM engine = ``gpus_per_engine`` GPUs)
-----------------------------------------------------------
Decode is memory-bound: one decode step with m live sequences that hold K context tokens in
total takes::

    step(m, K) = a + b·m + c·K        a = decode_step_s        (weights read once per step, launch)
                                      b = decode_s_per_seq     (per-sequence compute, sampling)
                                      c = decode_s_per_ctx_token (KV-cache read per context token)

A batch keeps the engine busy until its longest sequence finishes, but as sequences finish
m falls and the fixed part ``a`` is shared by fewer tokens. *Useful* time is what the same
tokens would cost at a full batch (``max_batch``), so the waste of a step is
``a·(1 - m/max_batch)``::

    useful(m, K) = a·m/max_batch + b·m + c·K          (= step(m, K) at m = max_batch)

A segment with more sequences than ``max_batch`` runs them by continuous batching: at most
``max_batch`` at once, the next one starting when one finishes (first come, first served).
Prefill is compute-bound, ``prefill_s_per_token`` per prompt (or re-prefilled context) token,
counted as useful. Worked example (a = 7 ms, b = 0.035 ms, c = 0, max_batch 128): 128
sequences of 100 tokens take 100 · (7 + 4.48) ms = 1.148 s, all useful; one sequence of 100
tokens takes 100 · 7.035 ms = 0.70 s, of which 100 · (7/128 + 0.035) ms = 8.97 ms is useful.

Learner (L data-parallel ranks, ZeRO)
-------------------------------------
``learner_step_s = tokens · learner_s_per_token / L + learner_step_overhead_s`` — forward +
backward per trained token (prompt + response) on one GPU, the batch split evenly over the
ranks, plus a fixed optimizer/communication overhead per step.

Weight publication
------------------
``publish_s(R) = sync_latency_s + weight_bytes / sync_bandwidth_bytes_per_s
+ sync_s_per_tree_level · ceil(log2(R + 1))`` for R receiving engines: gather + pack (fixed),
one pipelined broadcast of the weights (its bandwidth term does not grow with R), and a
latency term per level of a broadcast tree, which is how NCCL's tree/ring pipelines scale.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np

DEFAULT_CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class Calibration:
    """Seconds per unit of work on one cluster (see the module docstring for the formulas)."""

    name: str
    """Label printed with the results."""
    comments: str
    """Sources and assumptions behind the figures."""
    decode_step_s: float
    """a: fixed seconds of one decode step of one engine, whatever its batch."""
    decode_s_per_seq: float
    """b: extra seconds per live sequence in a decode step."""
    decode_s_per_ctx_token: float
    """c: extra seconds per context token held by the live sequences (KV reads)."""
    prefill_s_per_token: float
    """Seconds per prefilled token (prompt, or context re-prefilled after a weight update)."""
    max_batch: int
    """Most sequences an engine decodes at once (max_num_seqs / KV-cache capacity)."""
    gpus_per_engine: int
    """GPUs of one rollout engine (tensor parallel size)."""
    learner_s_per_token: float
    """Forward + backward seconds per trained token on one learner GPU."""
    learner_step_overhead_s: float
    """Fixed seconds per learner step (optimizer step, gradient reduction)."""
    sync_latency_s: float
    """Fixed seconds of one weight publication (gather, pack, engine load)."""
    weight_bytes: float
    """Bytes of one published version."""
    sync_bandwidth_bytes_per_s: float
    """Effective broadcast bandwidth (0 = no bandwidth term)."""
    sync_s_per_tree_level: float
    """Seconds per level of the broadcast tree (times ceil(log2(engines + 1)))."""

    def __post_init__(self) -> None:
        nonneg = (
            "decode_step_s",
            "decode_s_per_seq",
            "decode_s_per_ctx_token",
            "prefill_s_per_token",
            "learner_s_per_token",
            "learner_step_overhead_s",
            "sync_latency_s",
            "weight_bytes",
            "sync_bandwidth_bytes_per_s",
            "sync_s_per_tree_level",
        )
        for key in nonneg:
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"calibration {self.name!r}: {key} must be a finite number >= 0, got {v!r}")
        if self.decode_step_s + self.decode_s_per_seq <= 0:
            raise ValueError(
                f"calibration {self.name!r}: decode_step_s + decode_s_per_seq must be > 0 "
                "(a decode step cannot be free)"
            )
        if self.learner_s_per_token <= 0:
            raise ValueError(f"calibration {self.name!r}: learner_s_per_token must be > 0")
        if int(self.max_batch) != self.max_batch or self.max_batch < 1:
            raise ValueError(f"calibration {self.name!r}: max_batch must be an integer >= 1, got {self.max_batch}")
        if int(self.gpus_per_engine) != self.gpus_per_engine or self.gpus_per_engine < 1:
            raise ValueError(f"calibration {self.name!r}: gpus_per_engine must be an integer >= 1")
        if self.weight_bytes > 0 and self.sync_bandwidth_bytes_per_s == 0:
            raise ValueError(f"calibration {self.name!r}: weight_bytes > 0 needs sync_bandwidth_bytes_per_s > 0")

    def to_dict(self) -> dict:
        return asdict(self)


class SegmentCost(NamedTuple):
    elapsed_s: float
    """Wall seconds the engine is held by the segment."""
    useful_s: float
    """Seconds the same work would take at full-batch efficiency (<= elapsed_s)."""
    tokens: int
    """Tokens decoded."""


def decode_segment(ctx0_S: np.ndarray, steps_S: np.ndarray, cal: Calibration, prefill_tokens: int = 0) -> SegmentCost:
    """One engine call: sequence i starts with ``ctx0_S[i]`` context tokens and decodes
    ``steps_S[i]`` more; ``prefill_tokens`` are prefilled first.

    Invariants: ``useful_s <= elapsed_s``; equal when every step runs a full batch and
    a = 0 or m = max_batch throughout; ``tokens == steps_S.sum()``.
    """
    ctx0 = np.asarray(ctx0_S, dtype=np.float64)
    steps = np.asarray(steps_S, dtype=np.int64)
    if ctx0.shape != steps.shape or ctx0.ndim != 1:
        raise ValueError(f"ctx0_S and steps_S must be 1-D of one length, got {ctx0.shape} and {steps.shape}")
    if (steps < 0).any():
        raise ValueError("steps_S must be >= 0")
    pre = cal.prefill_s_per_token * prefill_tokens
    keep = steps > 0
    ctx0, steps = ctx0[keep], steps[keep]
    if len(steps) == 0:
        return SegmentCost(pre, pre, 0)
    if len(steps) <= cal.max_batch:
        el, us = _decode_batch(ctx0, steps, cal)
    else:
        el, us = _decode_continuous(ctx0, steps, cal)
    return SegmentCost(el + pre, us + pre, int(steps.sum()))


def _decode_batch(ctx0: np.ndarray, steps: np.ndarray, cal: Calibration) -> tuple[float, float]:
    """All sequences start together; between two finishes the live set is constant."""
    a, b, c, cap = cal.decode_step_s, cal.decode_s_per_seq, cal.decode_s_per_ctx_token, cal.max_batch
    order = np.argsort(steps, kind="stable")
    t = steps[order].astype(np.float64)
    x = ctx0[order]
    n = len(t)
    live = n - np.arange(n, dtype=np.float64)  # live sequences during interval k
    start = np.concatenate([[0.0], t[:-1]])
    dur = t - start  # steps in interval k (0 for ties)
    ctx_sum = np.cumsum(x[::-1])[::-1] + live * start  # context held at the interval's first step
    quad = c * live * dur * (dur - 1) / 2.0
    elapsed = float(np.sum(dur * (a + b * live + c * ctx_sum) + quad))
    useful = float(np.sum(dur * (a * live / cap + b * live + c * ctx_sum) + quad))
    return elapsed, useful


def _decode_continuous(ctx0: np.ndarray, steps: np.ndarray, cal: Calibration) -> tuple[float, float]:
    """More sequences than max_batch: FIFO admission as slots free up (continuous batching).

    Between two events (a finish) m sequences are live and their context sum is
    ``K(s) = sum(ctx0_i - start_i) + m·s`` at global step s."""
    a, b, c, cap = cal.decode_step_s, cal.decode_s_per_seq, cal.decode_s_per_ctx_token, cal.max_batch
    queue = list(zip(ctx0.tolist(), steps.tolist()))
    ends: list[float] = []  # heap of finishing global steps
    offset = 0.0  # sum over live of (ctx0_i - start_i)
    s = 0.0
    elapsed = useful = 0.0
    nxt = 0
    live_off: dict[int, float] = {}

    def admit() -> None:  # fill free slots from the queue at global step s
        nonlocal nxt, offset
        while nxt < len(queue) and len(ends) < cap:
            x, d = queue[nxt]
            heapq.heappush(ends, (s + d, nxt))
            live_off[nxt] = x - s
            offset += x - s
            nxt += 1

    admit()
    while ends:
        s1, i = ends[0]
        m = len(ends)
        dur = s1 - s
        if dur > 0:
            quad = c * m * (s + s1 - 1) * dur / 2.0
            elapsed += dur * (a + b * m + c * offset) + quad
            useful += dur * (a * m / cap + b * m + c * offset) + quad
        s = s1
        while ends and ends[0][0] <= s:
            _, j = heapq.heappop(ends)
            offset -= live_off.pop(j)
        admit()
    return elapsed, useful


def learner_step_s(train_tokens: int, learner_gpus: int, cal: Calibration) -> float:
    """Seconds of one learner step over ``train_tokens`` (prompt + response) tokens."""
    if learner_gpus < 1:
        raise ValueError(f"learner_gpus must be >= 1, got {learner_gpus}")
    return train_tokens * cal.learner_s_per_token / learner_gpus + cal.learner_step_overhead_s


def publish_s(num_engines: int, cal: Calibration) -> float:
    """Seconds of one weight publication to ``num_engines`` engines (see the module docstring)."""
    bw = cal.weight_bytes / cal.sync_bandwidth_bytes_per_s if cal.weight_bytes > 0 else 0.0
    return cal.sync_latency_s + bw + cal.sync_s_per_tree_level * math.ceil(math.log2(num_engines + 1))


def full_batch_tokens_per_s(cal: Calibration, mean_ctx_tokens: float) -> float:
    """Decode tokens/s of one engine at a full batch whose sequences hold ``mean_ctx_tokens``."""
    m = cal.max_batch
    return m / (cal.decode_step_s + cal.decode_s_per_seq * m + cal.decode_s_per_ctx_token * m * mean_ctx_tokens)


# --------------------------------------------------------------------------- calibrations


def calibration_from_measurements(
    decode_step_s_at_batch: Mapping[int, float],
    learner_s_per_token: float,
    sync_s: float,
    *,
    prefill_s_per_token: float = 0.0,
    decode_s_per_ctx_token: float = 0.0,
    max_batch: int | None = None,
    learner_step_overhead_s: float = 0.0,
    gpus_per_engine: int = 1,
    name: str = "cpu",
    comments: str = "",
) -> Calibration:
    """A calibration from measured figures (e.g. CPU runs of rlsys).

    ``decode_step_s_at_batch``: {batch size b: seconds of one decode step at b}, at least two
    distinct b; a and b of ``step = a + b·batch`` come from a least-squares line through them
    (clipped at 0). ``learner_s_per_token``: measured learner seconds per trained token on one
    rank. ``sync_s``: measured seconds of one publication (taken as the fixed latency; no
    bandwidth or tree term). ``max_batch`` defaults to the largest measured batch.

    >>> c = calibration_from_measurements({1: 0.011, 8: 0.018}, 2e-3, 0.5)
    >>> round(c.decode_step_s, 4), round(c.decode_s_per_seq, 4), c.max_batch
    (0.01, 0.001, 8)
    """
    pts = sorted((int(b), float(s)) for b, s in decode_step_s_at_batch.items())
    if len({b for b, _ in pts}) < 2:
        raise ValueError(
            "calibration_from_measurements needs decode step times at two or more batch sizes "
            f"to fit step = a + b*batch; got batches {[b for b, _ in pts]}"
        )
    if any(b < 1 or not (s > 0 and math.isfinite(s)) for b, s in pts):
        raise ValueError(f"decode measurements must be batch >= 1 and seconds > 0, got {pts}")
    x = np.array([b for b, _ in pts], dtype=np.float64)
    y = np.array([s for _, s in pts], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    a, b = max(float(intercept), 0.0), max(float(slope), 0.0)
    if a + b <= 0:
        raise ValueError(f"the fitted decode line is not positive (a={intercept}, b={slope}); check the measurements")
    return Calibration(
        name=name,
        comments=comments or "fitted by calibration_from_measurements from measured figures",
        decode_step_s=a,
        decode_s_per_seq=b,
        decode_s_per_ctx_token=decode_s_per_ctx_token,
        prefill_s_per_token=prefill_s_per_token,
        max_batch=int(max_batch or x.max()),
        gpus_per_engine=gpus_per_engine,
        learner_s_per_token=learner_s_per_token,
        learner_step_overhead_s=learner_step_overhead_s,
        sync_latency_s=sync_s,
        weight_bytes=0.0,
        sync_bandwidth_bytes_per_s=0.0,
        sync_s_per_tree_level=0.0,
    )


def calibration_from_dict(d: Mapping, name: str | None = None) -> Calibration:
    """A Calibration from a JSON object; unknown or missing keys are errors that name them.

    An object with ``"measured"`` instead of the coefficients is passed to
    ``calibration_from_measurements`` (keys: decode_step_s_at_batch, learner_s_per_token,
    sync_s, and optionally its keyword arguments)."""
    d = dict(d)
    if "measured" in d:
        m = dict(d.pop("measured"))
        at = {int(k): float(v) for k, v in m.pop("decode_step_s_at_batch").items()}
        return calibration_from_measurements(
            at,
            m.pop("learner_s_per_token"),
            m.pop("sync_s"),
            name=d.get("name", name or "measured"),
            comments=d.get("comments", ""),
            **m,
        )
    known = {f.name for f in fields(Calibration)}
    d.setdefault("name", name or "unnamed")
    d.setdefault("comments", "")
    unknown, missing = sorted(set(d) - known), sorted(known - set(d))
    if unknown or missing:
        raise ValueError(f"calibration {d['name']!r}: unknown keys {unknown}, missing keys {missing}")
    return Calibration(**d)


def load_calibration(spec: str | None = None) -> Calibration:
    """``spec``: None (the default of calibration.json), a name in calibration.json
    (``h100-7b``, ``cpu``), or a path to a JSON file holding one calibration object or a
    ``{"default": name, "calibrations": {name: object}}`` collection (its default is used)."""
    path = DEFAULT_CALIBRATION_FILE
    name = None
    if spec is not None:
        p = Path(spec)
        if p.suffix == ".json" or p.exists():
            if not p.is_file():
                raise FileNotFoundError(f"--calibration {spec}: no such file")
            path = p
        else:
            name = spec
    data = json.loads(path.read_text())
    if "calibrations" not in data:
        return calibration_from_dict(data, name=path.stem)
    table = data["calibrations"]
    name = name or data.get("default")
    if name not in table:
        raise ValueError(f"calibration {name!r} is not in {path}; choose one of {sorted(table)} or pass a JSON path")
    return calibration_from_dict(table[name], name=name)
