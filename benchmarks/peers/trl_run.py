"""TRL's GRPOTrainer on an rlsys task: the peer side of the rlsys-vs-TRL benchmark.

Runs in the peer environment (``bash benchmarks/peers/setup_trl.sh``), never in ``.venv``::

    PYTHONPATH=. .venv-trl/bin/python benchmarks/peers/trl_run.py --spec spec.json --out result.json

Imports from rlsys only ``rlsys.tasks.arithmetic`` (stdlib) and ``rlsys.tasks.tinymodel`` (torch, transformers,
tokenizers); no Ray, vLLM or DeepSpeed (checked at the end of a run).

The spec (JSON object) is :class:`PeerSpec`; unknown keys are an error, except those in
:data:`SHARED_SPEC_KEYS`, which belong to the rlsys side of the shared spec. The trainer is set up
to match rlsys's embedded default as closely as TRL allows (see :func:`grpo_config`): one
optimizer step per generation batch of ``prompts_per_step`` prompts x ``group_size``
completions, sampled at ``temperature`` with no top-k / top-p, group-normalised advantages,
the clipped-ratio loss averaged over every completion token of the batch (``loss_type="dapo"``),
no KL, AdamW with a constant learning rate and gradient clipping at 1.0, fp32 on CPU.

Clocks: ``train_seconds`` is wall time from the start of training to the end of the last
step, minus every evaluation (evaluations run with the clock paused); ``per_step.step_time``
is the same clock between consecutive step ends, so the step times add up to
``train_seconds``. Throughput is over ``train_seconds``.

Counts: ``samples`` is completions generated; ``tokens`` is generated completion tokens
including the eos token when one was sampled (TRL keeps a completion up to and including its
first eos; ``max_new_tokens`` caps the total), the same convention as vLLM's ``token_ids``.

Profile: TRL times its own phases with ``trl.extras.profiling.ProfilingContext`` (a no-op
unless reporting to wandb/mlflow/trackio); this script records those durations and adds its
own timers. ``profile`` is each phase's share of ``train_seconds`` (disjoint, adding up to 1);
``profile_detail`` has the seconds. The phases: generation (``model.generate``), reward (the
reward function), rollout_other (tokenising, decoding, padding, advantages: the rest of
TRL's ``_prepare_inputs``), forward (``compute_loss``: policy log-probs and loss), backward
(the rest of ``training_step``), optimizer (gradient clipping and ``optimizer.step``) and
other (data loading, scheduler, logging and callbacks: what is left). The same split is kept
for every step (``per_step.phases``) and for the median-time step
(``profile_detail.median_step``), which stays meaningful when other work on the machine
stretches some steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.extras import profiling  # noqa: E402

from rlsys.tasks.arithmetic import Example, TaskConfig, load_task, scratchpad_credit, verify_answer  # noqa: E402
from rlsys.tasks.tinymodel import greedy_accuracy  # noqa: E402  (the same greedy exact match as rlsys's model build)

FORBIDDEN_MODULES = ("ray", "vllm", "deepspeed")
RSS_SAMPLE_S = 0.05
REWARDS = {"exact_match": verify_answer, "scratchpad_credit": scratchpad_credit}
SHARED_SPEC_KEYS = ("experiment", "targets", "rlsys_overrides")
"""Keys of the shared spec (benchmarks/peers/run.py) that only the rlsys side or the harness reads."""


@dataclass
class PeerSpec:
    """One TRL run. Field names are shared with the rlsys side of the benchmark."""

    model_path: str
    """Hugging Face causal-LM directory with its tokenizer (bos/eos/pad; encoding prepends bos)."""
    task: dict = field(default_factory=dict)
    """Keyword arguments of :class:`rlsys.tasks.arithmetic.TaskConfig` ({} = 3-digit addition)."""
    prompts_per_step: int = 16
    """Prompts per optimizer step."""
    group_size: int = 8
    """Completions sampled per prompt (TRL's num_generations)."""
    max_new_tokens: int = 6
    """Longest completion, eos included (TRL's max_completion_length); also the eval limit."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    steps: int = 40
    """Optimizer steps."""
    max_train_seconds: float = 0.0
    """Stop after the step that brings train_seconds to at least this; 0 = no limit."""
    eval_every: int = 10
    """Greedy eval accuracy every this many steps, plus before the first and after the last; 0 = only those."""
    seed: int = 0
    """Seed of the trainer (model RNG, sampling, prompt order)."""
    temperature: float = 1.0
    """Sampling temperature (the loss divides the logits by it too)."""
    threads: int = 2
    """torch intra-op threads."""
    reward: str = "exact_match"
    """The training reward, by its rlsys name: exact_match (rlsys.tasks.arithmetic.verify_answer) or
    scratchpad_credit (partial credit per correct leading term). Eval is always exact match."""

    def __post_init__(self) -> None:
        if not (Path(self.model_path).expanduser() / "config.json").is_file():
            raise ValueError(f"spec model_path={self.model_path!r} is not a model directory (no config.json)")
        for key in ("prompts_per_step", "steps", "threads", "max_new_tokens"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"spec {key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"spec group_size must be an integer >= 2 (GRPO needs a group), got {self.group_size!r}")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError(f"spec lr and temperature must be > 0, got lr={self.lr}, temperature={self.temperature}")
        if self.reward not in REWARDS:
            raise ValueError(f"spec reward must be one of {sorted(REWARDS)}, got {self.reward!r}")
        if self.max_train_seconds < 0 or self.eval_every < 0:
            raise ValueError("spec max_train_seconds and eval_every must be >= 0 (0 = off)")

    @classmethod
    def from_json(cls, path: Path) -> PeerSpec:
        raw = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known - set(SHARED_SPEC_KEYS))
        if unknown:
            raise ValueError(
                f"{path}: unknown spec keys {unknown}; known keys are {sorted(known)} "
                f"(and {list(SHARED_SPEC_KEYS)}, which the TRL side ignores)"
            )
        return cls(**{k: v for k, v in raw.items() if k in known})


def grpo_config(spec: PeerSpec, output_dir: str) -> GRPOConfig:
    """TRL 1.16's GRPOConfig matching rlsys's synchronous GRPO step (names read from the installed source)."""
    return GRPOConfig(
        output_dir=output_dir,
        # batch: one generation batch = one optimizer step = prompts_per_step groups
        per_device_train_batch_size=spec.prompts_per_step * spec.group_size,
        num_generations=spec.group_size,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_steps=spec.steps,
        shuffle_dataset=True,
        # sampling: plain temperature sampling (top_k=0 disables top-k in TRL and transformers)
        max_completion_length=spec.max_new_tokens,
        temperature=spec.temperature,
        top_k=0,
        top_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        # objective: group-std advantages, token mean over the batch, symmetric clip, no KL
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.2,
        scale_rewards="group",
        mask_truncated_completions=False,
        # optimizer: torch AdamW, constant lr
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        # hardware and precision
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        # bookkeeping: log every step to the callbacks only; no saving, no TRL eval
        seed=spec.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        log_completions=False,
    )


def reward_function(name: str):
    """TRL reward function applying rlsys's rule ``name`` to each completion (decoded by TRL up
    to the first eos, special tokens dropped); ``answer`` comes from the dataset column."""
    rule = REWARDS[name]

    def reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
        return [rule(text, ref) for text, ref in zip(completions, answer)]

    reward.__name__ = name  # TRL names its reward metrics after the function
    return reward


# ----------------------------------------------------------------------------- measurement


class PhaseTimer:
    """Seconds and call counts per named phase; fed by TRL's profiling contexts and our own timers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1


PHASES = PhaseTimer()


def _record_trl_profiling(ctx: profiling.ProfilingContext, duration: float) -> None:
    """Replacement of ``ProfilingContext._log_metrics`` (which only reports to wandb/mlflow/trackio):
    keep the duration under the phase name without the trainer class prefix."""
    PHASES.add(ctx.name.split(".", 1)[-1], duration)


class RssSampler:
    """Peak resident set size: getrusage's high-water mark plus a sampling thread (/proc/self/statm)."""

    def __init__(self, period_s: float = RSS_SAMPLE_S) -> None:
        self.period_s = period_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        with open("/proc/self/statm") as f:
            self.peak_mb = max(self.peak_mb, int(f.read().split()[1]) * self._page_mb)

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @staticmethod
    def rusage_peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TrainClock:
    """Wall time since start() minus the time spent inside pause() since then."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self.paused_s = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def __call__(self) -> float:
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0 - self.paused_s

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            if self._t0 is not None:
                self.paused_s += time.perf_counter() - t


class PeerTrainer(GRPOTrainer):
    """GRPOTrainer that counts generated completions and tokens and times training_step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samples = 0  # completions generated
        self.completion_tokens = 0  # their tokens, eos included
        self._training_step_end = 0.0

    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        completion_ids = out[1]  # up to and including the first eos, as TRL trains on them
        self.samples += len(completion_ids)
        self.completion_tokens += sum(len(ids) for ids in completion_ids)
        return out

    def training_step(self, model, inputs, num_items_in_batch):
        t0 = time.perf_counter()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._training_step_end = time.perf_counter()
            PHASES.add("training_step", self._training_step_end - t0)


class BenchmarkCallback(TrainerCallback):
    """Train clock, per-step records, evals (clock paused), the optimizer timer and the time limit."""

    def __init__(self, spec: PeerSpec, tok: PreTrainedTokenizerBase, eval_examples: Sequence[Example]) -> None:
        self.spec, self.tok, self.eval_examples = spec, tok, eval_examples
        self.trainer: PeerTrainer | None = None
        self.clock = TrainClock()
        self.curve: list[dict] = []
        self.per_step: list[dict] = []
        self.eval_seconds = 0.0
        self.stopped_by = "steps"
        self._last_step_end = 0.0
        self._optimizer_t0 = 0.0
        self._phases_at_last_step: dict[str, float] = {}

    @property
    def train_seconds(self) -> float:
        """The train clock at the end of the last step."""
        return self._last_step_end

    def evaluate(self, step: int) -> None:
        trainer = self.trainer
        with self.clock.pause():
            t0 = time.perf_counter()
            acc = greedy_accuracy(trainer.model, self.tok, self.eval_examples)
            self.eval_seconds += time.perf_counter() - t0
        self.curve.append(
            {
                "step": step,
                "samples": trainer.samples,
                "tokens": trainer.completion_tokens,
                "train_seconds": round(self.train_seconds, 4),
                "eval_accuracy": acc,
            }
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self.evaluate(0)
        self.clock.start()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # gradient clipping ran between the end of training_step and here; time both with the step
        self._optimizer_t0 = self.trainer._training_step_end

    def on_optimizer_step(self, args, state, control, **kwargs):
        PHASES.add("optimizer", time.perf_counter() - self._optimizer_t0)

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        step_time = now - self._last_step_end
        phases = {k: v - self._phases_at_last_step.get(k, 0.0) for k, v in PHASES.seconds.items()}
        self.per_step.append(
            {
                "step": state.global_step,
                "step_time": round(step_time, 4),
                "phases": phase_split(phases, step_time, self.spec.reward),
            }
        )
        self._last_step_end, self._phases_at_last_step = now, dict(PHASES.seconds)
        if self.spec.max_train_seconds and now >= self.spec.max_train_seconds and state.global_step < self.spec.steps:
            self.stopped_by = "max_train_seconds"
            control.should_training_stop = True
        if self.spec.eval_every and state.global_step % self.spec.eval_every == 0:
            self.evaluate(state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs or not self.per_step or self.per_step[-1]["step"] != state.global_step:
            return
        self.per_step[-1].update(
            {
                "reward_mean": logs["reward"],
                "completion_mean_length": logs.get("completions/mean_length"),
                "frac_reward_zero_std": logs.get("frac_reward_zero_std"),
                "loss": logs.get("loss"),
                "grad_norm": logs.get("grad_norm"),
                "entropy": logs.get("entropy"),
                "clip_ratio": logs.get("clip_ratio/region_mean"),
            }
        )


def phase_split(seconds: dict[str, float], total: float, reward_name: str) -> dict[str, float]:
    """Disjoint phases of ``total`` seconds from PhaseTimer totals (see the module docstring)."""
    generation, reward = seconds.get("transformers.generate", 0.0), seconds.get(reward_name, 0.0)
    prepare, forward = seconds.get("_prepare_inputs", 0.0), seconds.get("compute_loss", 0.0)
    split = {
        "generation": generation,
        "reward": reward,
        "rollout_other": prepare - generation - reward,
        "forward": forward,
        "backward": seconds.get("training_step", 0.0) - prepare - forward,
        "optimizer": seconds.get("optimizer", 0.0),
    }
    split["other"] = total - sum(split.values())
    return {k: round(v, 4) for k, v in split.items()}


def profile_detail(train_seconds: float, per_step: list[dict], reward_name: str) -> dict:
    """Phase seconds over the whole run and for the median-time step (robust to a busy machine),
    with TRL's raw profiling totals."""
    middle = sorted(per_step, key=lambda r: r["step_time"])[len(per_step) // 2]
    return {
        "seconds": phase_split(PHASES.seconds, train_seconds, reward_name),
        "median_step": {"step": middle["step"], "step_time": middle["step_time"], "seconds": middle["phases"]},
        "raw_seconds": {k: round(v, 4) for k, v in sorted(PHASES.seconds.items())},
        "raw_calls": dict(sorted(PHASES.calls.items())),
    }


# ----------------------------------------------------------------------------- main


def run(spec: PeerSpec) -> dict:
    torch.set_num_threads(spec.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    profiling.ProfilingContext._log_metrics = _record_trl_profiling
    wall_t0 = time.perf_counter()

    data = load_task(TaskConfig(**spec.task))
    model_path = str(Path(spec.model_path).expanduser())
    tok = AutoTokenizer.from_pretrained(model_path)
    probe = tok("1")["input_ids"]
    if probe[:1] != [tok.bos_token_id] or tok.eos_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"{model_path}: the tokenizer must prepend bos and define eos and pad (got {probe})")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    train = Dataset.from_dict({"prompt": [ex.prompt for ex in data.train], "answer": [ex.answer for ex in data.train]})

    callback = BenchmarkCallback(spec, tok, data.eval)
    with tempfile.TemporaryDirectory(prefix="trl-peer-") as out_dir, RssSampler() as rss:
        trainer = PeerTrainer(
            model=model,
            reward_funcs=reward_function(spec.reward),
            args=grpo_config(spec, out_dir),
            train_dataset=train,
            processing_class=tok,
            callbacks=[callback],
        )
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)
        callback.trainer = trainer
        trainer.train()
        steps = trainer.state.global_step
        if not callback.curve or callback.curve[-1]["step"] != steps:
            callback.evaluate(steps)
    train_seconds = callback.train_seconds

    imported = [m for m in FORBIDDEN_MODULES if m in sys.modules]
    if imported:
        raise RuntimeError(f"the TRL peer imported {imported}; it must run without them")
    return {
        "system": "trl",
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "spec": dataclasses.asdict(spec),
        "steps": steps,
        "stopped_by": callback.stopped_by,
        "train_seconds": round(train_seconds, 4),
        "eval_seconds": round(callback.eval_seconds, 4),
        "wall_seconds": round(time.perf_counter() - wall_t0, 4),
        "samples": trainer.samples,
        "tokens": trainer.completion_tokens,
        "tokens_include_eos": True,
        "steps_per_s": steps / train_seconds,
        "samples_per_s": trainer.samples / train_seconds,
        "tokens_per_s": trainer.completion_tokens / train_seconds,
        "initial_accuracy": callback.curve[0]["eval_accuracy"],
        "final_accuracy": callback.curve[-1]["eval_accuracy"],
        "curve": callback.curve,
        "reward_curve": [r.get("reward_mean") for r in callback.per_step],
        "per_step": callback.per_step,
        "peak_rss_mb": {"getrusage": round(RssSampler.rusage_peak_mb(), 1), "sampled": round(rss.peak_mb, 1)},
        "step_time_median": sorted(r["step_time"] for r in callback.per_step)[steps // 2],
        "step_time_min": min(r["step_time"] for r in callback.per_step),
        # share of train_seconds per phase; disjoint, they add up to 1
        "profile": {k: v / train_seconds for k, v in phase_split(PHASES.seconds, train_seconds, spec.reward).items()},
        "profile_detail": profile_detail(train_seconds, callback.per_step, spec.reward),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, required=True, help="JSON spec (see PeerSpec)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    result = run(PeerSpec.from_json(args.spec))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"trl: {result['steps']} steps in {result['train_seconds']:.1f}s train | "
        f"{result['samples_per_s']:.0f} samples/s | accuracy {result['initial_accuracy']:.3f} -> "
        f"{result['final_accuracy']:.3f} | peak RSS {result['peak_rss_mb']['getrusage']:.0f} MB"
    )


if __name__ == "__main__":
    main()
