"""RewardWorker: scores whole groups with a rule verifier from a pluggable registry.

A reward function is ``fn(completion: str, reference: str) -> float``; when its signature
accepts them (``*, prompt, meta`` or ``**kwargs``) it also gets the keywords ``prompt=`` (the
user's original prompt: a string or a list of ``{"role", "content"}`` messages,
``Group.meta["prompt"]``) and ``meta=`` (the dataset row's other columns, ``Group.meta["row"]``).
It returns a finite number, or a dict ``{"reward": float, "<name>": float, ...}`` whose other
entries are extra scores, stored per completion in ``Group.meta["scores"]`` as
``{name: [float or None per completion]}`` (None: the call failed or did not return that name).
Register one with ``@register_reward("name")`` and select it with ``reward.function=name``; or
point ``reward.target`` at ``package.module.function`` (Hydra-style target) to plug in your own
without touching rlsys. Built in: exact_match, numeric_match, scratchpad_credit, math_verify.

Failure rule: a reward function that raises, hangs past ``reward.timeout_s``, or returns
something that is not a finite number (or such a dict) scores that completion
``reward.failure_reward`` and is counted in ``Group.reward_failures`` (and the
``rlsys_reward_failures_total`` metric). It never kills the run. The first failure of each kind
is logged with the exception, later ones only counted.

Pairwise stage (``reward.mode=rm_judge_router``, docs/algorithms.md §2, arXiv 2510.20369): after
the rule verifier, every pair of a group that the verifier cannot separate is scored by the
pairwise preference model in both orders (antisymmetrised); the router sends the most
uncertain pairs of the batch to the LLM judge within its budget (``reward.router``); verdicts
replace those pairs' scores (a judge failure keeps the RM's score, counted); the group's
advantages become A_i = mean_j S_ij and flow through the same loss as scalar rewards
(``Group.advantages``). ``Group.rewards`` keeps the verifier's rewards for metrics.

Pointwise stage (``reward.mode=rm_pointwise``): the pointwise reward model (sequence
classification on prompt + response) scores every completion of the batch in one pass and
``sigmoid(logit)`` becomes its reward, for tasks without a verifier; the rule function's
rewards, still computed, go to ``Group.meta["verifier_rewards"]`` for monitoring. If the model
raises, the batch keeps the rule rewards (logged, counted in ``stats()["rm_failures"]``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import numbers
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np

from rlsys.records import Group
from rlsys.reward.config import RewardModelConfig
from rlsys.reward.math_verify import math_verify
from rlsys.reward.routing import (
    RouterConfig,
    all_pairs,
    pair_scores,
    pairwise_advantage,
    rm_judge_agreement,
    rm_uncertainty,
    route_batch,
    verifier_separable,
)
from rlsys.supervision import FaultPoint, with_deadline
from rlsys.tasks.arithmetic import scratchpad_credit

log = logging.getLogger(__name__)

JUDGE_REPLACEMENT_WAIT_S = 60.0
"""How long a reward worker waits for the controller to replace a dead judge worker."""

RewardFn = Callable[..., object]
"""``fn(completion, reference[, prompt=..., meta=...]) -> float | {"reward": float, name: float}``."""
REWARD_KEYWORDS = ("prompt", "meta")
"""The keyword arguments a reward function gets when its signature accepts them."""
MODES = ("rule", "rm_pointwise", "rm_judge_router")
REWARD_FUNCTIONS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARD_FUNCTIONS:
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return deco


@register_reward("exact_match")
def exact_match(completion: str, reference: str) -> float:
    """1.0 if the stripped completion equals the reference answer, else 0.0."""
    return 1.0 if completion.strip() == reference.strip() else 0.0


register_reward("scratchpad_credit")(scratchpad_credit)  # dense reward of the counting task (rlsys.tasks.arithmetic)
register_reward("math_verify")(math_verify)  # math answers by equivalence (rlsys.reward.math_verify)


@register_reward("numeric_match")
def numeric_match(completion: str, reference: str) -> float:
    """1.0 if both parse as the same number (so '007' matches '7'), else 0.0."""
    try:
        return 1.0 if float(completion.strip()) == float(reference.strip()) else 0.0
    except ValueError:
        return 0.0


@dataclass
class RewardConfig:
    """How groups are scored."""

    function: str = "exact_match"
    """Name of a registered reward function (see rlsys.reward.worker.REWARD_FUNCTIONS)."""
    target: Optional[str] = None
    """Import path 'pkg.module.fn' of a custom reward function; overrides ``function``."""
    timeout_s: float = 5.0
    """A reward call running longer than this scores the completion as failed."""
    failure_reward: float = 0.0
    """Reward given to a completion whose reward function failed."""
    num_workers: int = 1
    """RewardWorker actors."""
    call_timeout_s: float = 300.0
    """Deadline of one score call on a reward worker (a batch of groups). A worker past it counts as
    hung: it is killed and replaced, and the groups are scored again (rlsys/supervision.py). 0 = none."""
    num_cpus: float = 0.25
    """Ray CPUs reserved per RewardWorker."""
    mode: str = "rule"
    """'rule' (the reward function alone), 'rm_pointwise' (the pointwise RM's probability that
    a response is right) or 'rm_judge_router' (the rule function, then the pairwise RM, the
    uncertainty router and the LLM judge); see the module docstring."""
    use_verifier: bool = True
    """rm_judge_router: pairs whose rule rewards differ are decided by the verifier and never
    sent to the RM or the judge."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Which pairs go to the judge."""
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """The pairwise preference model (built and cached locally when model.path is unset)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"reward.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.target is None and self.function not in REWARD_FUNCTIONS:
            raise ValueError(
                f"reward.function {self.function!r} is not registered; choose one of "
                f"{sorted(REWARD_FUNCTIONS)} or set reward.target=pkg.module.fn"
            )
        if self.mode == "rm_pointwise" and self.model.pointwise_steps == 0 and not self.model.path:
            raise ValueError(
                "reward.mode=rm_pointwise needs the pointwise model: reward.model.pointwise_steps > 0 "
                "(or reward.model.path to a directory holding one)"
            )
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s} (and finite)")
        if not math.isfinite(self.failure_reward):
            raise ValueError(f"reward.failure_reward must be finite, got {self.failure_reward}")
        if self.num_workers < 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {self.num_workers}")
        if self.call_timeout_s < 0:
            raise ValueError(f"reward.call_timeout_s must be >= 0 (0 = no deadline), got {self.call_timeout_s}")


class RewardFunctionError(RuntimeError):
    """A reward function raised, hung, or returned a non-finite / non-numeric value."""


def resolve_reward_fn(cfg: RewardConfig) -> RewardFn:
    if cfg.target is not None:
        from hydra.utils import get_object  # Hydra's own target resolution (callable: check_reward_fn)

        try:
            return get_object(cfg.target)
        except Exception as e:  # ImportError / AttributeError wrapped by Hydra
            raise ValueError(f"reward.target {cfg.target!r} cannot be imported: {e}") from e
    return REWARD_FUNCTIONS[cfg.function]


class CheckedReward(NamedTuple):
    fn: RewardFn
    keywords: tuple[str, ...]
    """Which of REWARD_KEYWORDS it is called with (decided once, from its signature)."""


def check_reward_fn(cfg: RewardConfig) -> CheckedReward:
    """The reward function, checked where a run starts (before any actor): it imports, it is
    callable, and it can be called as ``fn(completion, reference)`` plus the keywords ``prompt=``
    / ``meta=`` its signature accepts, the way reward workers call it. Raises ValueError with
    what to change."""
    fn = resolve_reward_fn(cfg)
    name = f"reward.target={cfg.target}" if cfg.target else f"reward.function={cfg.function}"
    if not callable(fn):
        raise ValueError(f"{name} is a {type(fn).__name__}, not a function; point it at a function")
    return CheckedReward(fn, reward_keywords(fn, name))


def reward_keywords(fn: RewardFn, name: str = "the reward function") -> tuple[str, ...]:
    """The keywords of REWARD_KEYWORDS that ``fn`` accepts (``**kwargs``, or a parameter of that
    name other than the two positional ones that get completion and reference). Raises ValueError
    unless ``fn(completion, reference, **those)`` binds with every other positional parameter
    defaulted (a required third positional one is refused even when named prompt: make it
    keyword-only)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return ()
    kinds = inspect.Parameter
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    by_keyword = {
        p.name for p in params[len(positional[:2]) :] if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
    }
    any_keyword = any(p.kind is kinds.VAR_KEYWORD for p in params)
    keywords = tuple(k for k in REWARD_KEYWORDS if (any_keyword and k not in signature.parameters) or k in by_keyword)
    try:
        extra = [p.name for p in positional[2:] if p.default is p.empty]
        if extra:
            raise TypeError(f"positional parameter {extra[0]!r} has no default")
        signature.bind("completion", "reference", **dict.fromkeys(keywords))
    except TypeError as e:
        fname = getattr(fn, "__name__", "fn")
        raise ValueError(
            f"{name} has the signature {fname}{signature}, which rlsys cannot call with (completion, reference) "
            f"({e}); rlsys passes those two positionally, plus prompt= and meta= (the original prompt, the "
            f"dataset row) as keywords when the signature takes them: define it as def {fname}(completion: str, "
            f"reference: str) -> float, def {fname}(completion, reference, *, prompt, meta) or "
            f"def {fname}(completion, reference, **kwargs) (any other parameter needs a default)"
        ) from None
    return keywords


class CallThread:
    """Runs calls one at a time on a reused daemon thread, each under a deadline.

    A new thread per call costs ~0.3 ms, as much as the RPC that delivers a batch of
    rule-verified groups; this thread is reused for as long as every call returns in time.
    A call past its deadline keeps its thread (Python cannot kill threads): that thread is
    abandoned (a daemon, it never blocks shutdown) and the next call starts a fresh one.
    Not for concurrent use: one caller at a time.
    """

    def __init__(self, name: str = "reward-fn"):
        self.name = name
        self._inbox = None

    def _serve(self, inbox) -> None:
        while True:
            fn, args, kwargs, box, done = inbox.get()
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported to the caller, never swallowed
                box["error"] = e
            done.set()

    def call(self, fn: Callable, args: tuple, timeout_s: float, kwargs: Optional[dict] = None) -> dict:
        """``{"value": ...}`` or ``{"error": exception}``; raises TimeoutError past the deadline."""
        import queue

        if self._inbox is None:
            self._inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(self._inbox,), daemon=True, name=self.name).start()
        box, done = {}, threading.Event()
        self._inbox.put((fn, args, kwargs or {}, box, done))
        if not done.wait(timeout_s):
            self._inbox = None  # the thread is stuck in fn: leave it behind
            raise TimeoutError
        return box


class RewardValue(NamedTuple):
    """One reward call's result: the reward and the extra named scores (empty for a plain number)."""

    reward: float
    extras: dict[str, float]


def call_with_timeout(
    fn: RewardFn,
    completion: str,
    reference: str,
    timeout_s: float,
    thread: Optional[CallThread] = None,
    kwargs: Optional[dict] = None,
) -> RewardValue:
    """One reward call ``fn(completion, reference, **kwargs)`` under ``timeout_s`` (on ``thread``,
    else a thread of its own); raise RewardFunctionError on any failure: it raised, hung, or
    returned neither a finite number nor a dict of them with a "reward"."""
    try:
        box = (thread or CallThread()).call(fn, (completion, reference), timeout_s, kwargs)
    except TimeoutError:
        raise RewardFunctionError(f"timed out after {timeout_s}s") from None
    if "error" in box:
        e = box["error"]
        raise RewardFunctionError(f"raised {type(e).__name__}: {e}") from e
    value = box.get("value")
    if not isinstance(value, Mapping):
        return RewardValue(_finite(value, ""), {})
    if "reward" not in value:
        keys = sorted(map(str, value))[:8]
        raise RewardFunctionError(f"returned a dict without a 'reward' key (keys: {keys}), expected a float")
    extras = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise RewardFunctionError(f"returned a dict with the key {k!r} of type {type(k).__name__}, expected str")
        extras[k] = _finite(v, f"a dict whose {k!r} is ")
    return RewardValue(extras.pop("reward"), extras)


def _finite(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise RewardFunctionError(
            f"returned {where}{type(value).__name__} {shown}, expected a float "
            '(or a dict {"reward": float, "<extra score>": float, ...})'
        )
    try:
        finite = math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        shown = value if isinstance(value, float) else str(value)[:40]
        raise RewardFunctionError(f"returned {where}non-finite value {shown}")
    return float(value)


class GroupScorer:
    """Pure(ish) scoring core, used by the RewardWorker actor and directly in tests."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.fn, self.keywords = check_reward_fn(cfg)
        self.name = cfg.target or cfg.function
        self._reported: set[str] = set()
        self._thread = CallThread()

    def score_group(self, group: Group) -> Group:
        rewards = np.empty(group.size, dtype=np.float32)
        extras: list[dict[str, float]] = [{}] * group.size
        failures = 0
        kwargs = reward_kwargs(self.keywords, group.meta.get("prompt", group.prompt), group.meta.get("row", {}))
        for i, c in enumerate(group.completions):
            try:
                rewards[i], extras[i] = call_with_timeout(
                    self.fn, c.text, group.reference, self.cfg.timeout_s, self._thread, kwargs
                )
            except RewardFunctionError as e:
                rewards[i] = self.cfg.failure_reward
                failures += 1
                kind = str(e).split(" ")[0]
                if kind not in self._reported:
                    self._reported.add(kind)
                    log.error(
                        "reward function %r failed on group %s: %s (scored %s; further failures "
                        "of this kind are only counted)",
                        self.name,
                        group.group_id,
                        e,
                        self.cfg.failure_reward,
                    )
        scored = group.with_rewards(rewards, failures)
        scores = aligned_scores(extras)
        if scores or "scores" in group.meta:  # a group scored again keeps no stale scores
            meta = {k: v for k, v in group.meta.items() if k != "scores"}
            scored = dataclasses.replace(scored, meta={**meta, "scores": scores} if scores else meta)
        return scored


def reward_kwargs(keywords: tuple[str, ...], prompt: object, meta: dict) -> dict:
    """The keyword arguments a reward function that takes ``keywords`` (``check_reward_fn``) gets."""
    values = {"prompt": prompt, "meta": meta}
    return {k: values[k] for k in keywords}


def score_means(scores: dict[str, list[Optional[float]]]) -> dict[str, float]:
    """Each extra score's mean over the completions that have it (``{name: [value or None]}``)."""
    out = {}
    for name, values in scores.items():
        got = [v for v in values if v is not None]
        if got:
            out[name] = sum(got) / len(got)
    return out


def aligned_scores(extras: list[dict[str, float]]) -> dict[str, list[Optional[float]]]:
    """Per-completion extra scores as ``{name: [value or None per completion]}`` (None where a call
    failed or returned no such name); empty when no call returned extras."""
    names = dict.fromkeys(k for e in extras for k in e)
    return {k: [e.get(k) for e in extras] for k in names}


class PointwiseStage:
    """Rewards from the pointwise RM: sigmoid of its logit per completion, one batched pass."""

    def __init__(self, rm):
        self.rm = rm  # .score(prompts, responses) -> logits [N]
        self.stats = {"scored": 0, "rm_failures": 0}

    def apply(self, groups: list[Group]) -> list[Group]:
        prompts = [g.prompt for g in groups for _ in g.completions]
        texts = [c.text for g in groups for c in g.completions]
        try:
            logits = np.asarray(self.rm.score(prompts, texts), dtype=np.float64)
            if logits.shape != (len(texts),) or not np.all(np.isfinite(logits)):
                raise ValueError(f"expected {len(texts)} finite logits, got shape {logits.shape}")
        except Exception as e:  # noqa: BLE001 - a broken RM must not kill the run
            self.stats["rm_failures"] += len(groups)
            log.error(
                "pointwise reward model failed on a batch of %d groups (%s: %s); they keep the rule rewards",
                len(groups),
                type(e).__name__,
                e,
            )
            return groups
        probs = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        out, k = [], 0
        for g in groups:
            meta = {**g.meta, "verifier_rewards": [float(r) for r in g.rewards]}
            out.append(dataclasses.replace(g, rewards=probs[k : k + g.size], meta=meta))
            k += g.size
        self.stats["scored"] += len(texts)
        return out


@dataclass
class PairwiseStats:
    groups: int = 0
    pairs: int = 0
    verifier_decided: int = 0
    routed: int = 0
    judged: int = 0
    fallbacks: int = 0
    agreement_sum: float = 0.0
    agreement_n: int = 0


class PairwiseStage:
    """RM scores for undecided pairs -> router -> judge -> pairwise advantages (pure but for
    the injected RM and judge callables)."""

    def __init__(self, cfg: RewardConfig, rm, judge=None):
        self.cfg = cfg
        self.rm = rm  # .score_both_orders(prompts, a, b) -> (logit_ij, logit_ji, uncertainty)
        self.judge = judge  # async (list[JudgePair], step) -> list[Optional[int]], or None
        self.rng = np.random.default_rng(cfg.router.seed)
        self.stats = PairwiseStats()

    async def apply(self, groups: list[Group]) -> list[Group]:
        from rlsys.reward.judge import JudgePair

        todo = [g for g in groups if g.size >= 2]
        inputs, spans = ([], [], []), []
        for g in todo:
            pairs = all_pairs(g.size)
            decided = verifier_separable(g.rewards) if self.cfg.use_verifier else np.zeros(len(pairs), bool)
            open_idx = np.flatnonzero(~decided)
            for i, j in pairs[open_idx]:
                inputs[0].append(g.prompt)
                inputs[1].append(g.completions[i].text)
                inputs[2].append(g.completions[j].text)
            spans.append((pairs, decided, open_idx))
        lij_all = lji_all = unc_all = np.zeros(0)
        if inputs[0]:
            lij_all, lji_all, u_gp = self.rm.score_both_orders(*inputs)
            unc_all = rm_uncertainty(self.cfg.router.signal, lij_all, lji_all, u_gp)
        scores, k = [], 0
        for g, (pairs, decided, open_idx) in zip(todo, spans):
            lij, lji, unc = (np.full(len(pairs), np.nan) for _ in range(3))
            lij[open_idx], lji[open_idx], unc[open_idx] = (
                x[k : k + len(open_idx)] for x in (lij_all, lji_all, unc_all)
            )
            k += len(open_idx)
            scores.append(pair_scores(g.rewards if self.cfg.use_verifier else None, lij, lji, unc))
        plans = route_batch(scores, self.cfg.router, self.rng)
        requests = [
            (gi, JudgePair(todo[gi].prompt, todo[gi].completions[a].text, todo[gi].completions[b].text))
            for gi, plan in enumerate(plans)
            for a, b in plan.judge_pairs
        ]
        verdicts: list = [None] * len(requests)
        if requests and self.judge is not None:
            step = max(g.policy_version for g in todo)
            verdicts = list(await self.judge([r for _, r in requests], step))
        out, pos = {}, 0
        st = self.stats
        for gi, (g, plan) in enumerate(zip(todo, plans)):
            v = verdicts[pos : pos + len(plan.judge)]
            pos += len(plan.judge)
            applied = plan.apply(v, self.cfg.router.verdict_scale)
            agree = rm_judge_agreement(plan.scores.s[plan.judge], v)
            if np.isfinite(agree):
                st.agreement_sum += agree
                st.agreement_n += 1
            st.groups += 1
            st.pairs += len(plan.scores.pairs)
            st.verifier_decided += int(plan.scores.decided.sum())
            st.routed += len(plan.judge)
            st.judged += applied.judged
            st.fallbacks += applied.fallbacks
            out[g.group_id] = dataclasses.replace(g, advantages=pairwise_advantage(applied.S).astype(np.float32))
        return [out.get(g.group_id, g) for g in groups]


class RewardWorker:
    """Ray actor shell (``reward`` role): rule scoring, plus the pairwise stage when configured."""

    def __init__(
        self, cfg: RewardConfig, reward_model_path: Optional[str] = None, judge=None, metrics_host: Optional[str] = None
    ):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.metrics = self.metrics_endpoint_ = None
        if metrics_host is not None:  # this worker's own Prometheus endpoint (rlsys.observability.metrics)
            from rlsys.observability.metrics import serve_actor

            self.metrics, self.metrics_endpoint_, self._metrics_server = serve_actor("reward", metrics_host)
        self.scorer = GroupScorer(cfg)
        self.faults = FaultPoint()
        self.judge, self._judge_swapped = judge, asyncio.Event()
        self.judge_unavailable = 0
        self.pairwise = self.pointwise = None
        if cfg.mode == "rm_pointwise":
            from rlsys.reward.reward_model import PointwiseRewardModel

            if reward_model_path is None:
                raise ValueError("reward.mode=rm_pointwise needs a reward model path")
            self.pointwise = PointwiseStage(PointwiseRewardModel.load(reward_model_path))
        if cfg.mode == "rm_judge_router":
            from rlsys.reward.reward_model import PairwiseRewardModel

            if reward_model_path is None:
                raise ValueError("reward.mode=rm_judge_router needs a reward model path")
            rm = PairwiseRewardModel.load(reward_model_path)
            self.pairwise = PairwiseStage(cfg, rm, self._call_judge if judge is not None else None)

    async def _call_judge(self, pairs: list, step: int) -> list[Optional[int]]:
        """The judge worker's verdicts. If it died (the controller replaces it, rlsys/supervision.py),
        wait for the replacement and retry once; else keep the RM's scores (verdict None, counted)."""
        import ray

        for attempt in range(2):
            judge = self.judge
            try:
                return await judge.judge_pairs.remote(pairs, step)
            except ray.exceptions.RayActorError as e:
                if attempt == 0:
                    log.warning("judge worker unavailable (%s); waiting for its replacement", type(e).__name__)
                    self._judge_swapped.clear()
                    if self.judge is judge:
                        try:
                            await with_deadline(self._judge_swapped.wait(), JUDGE_REPLACEMENT_WAIT_S)
                        except asyncio.TimeoutError:
                            break
        self.judge_unavailable += len(pairs)
        log.error("judge worker unavailable: %d pair(s) keep the reward model's score", len(pairs))
        return [None] * len(pairs)

    def set_judge(self, judge) -> None:
        """The controller replaced the judge worker."""
        self.judge = judge
        self._judge_swapped.set()

    def inject_fault(self, kind: str, seconds: float = 3600.0) -> None:
        """Fault injection (tests, scripts/soak.py): 'hang' the next score call (blocks the actor)."""
        self.faults.arm(kind, seconds)

    async def score(self, groups: list[Group]) -> list[Group]:
        self.faults.hang_here()
        m = self.metrics
        if m is None:
            return await self._score(groups)
        t0 = time.perf_counter()
        m.queue.inc()
        try:
            scored = await self._score(groups)
        finally:
            m.queue.dec()
        m.latency.observe(time.perf_counter() - t0)
        m.groups.inc(len(scored))
        return scored

    async def _score(self, groups: list[Group]) -> list[Group]:
        scored = [self.scorer.score_group(g) for g in groups]
        if self.pointwise is not None:
            scored = self.pointwise.apply(scored)
        if self.pairwise is not None:
            scored = await self.pairwise.apply(scored)
        return scored

    def metrics_endpoint(self) -> Optional[str]:
        return self.metrics_endpoint_

    def stats(self) -> dict:
        if self.pointwise is not None:
            return dict(self.pointwise.stats)
        if self.pairwise is None:
            return {}
        return {**dataclasses.asdict(self.pairwise.stats), "judge_unavailable": self.judge_unavailable}

    def ready(self) -> bool:
        return True
