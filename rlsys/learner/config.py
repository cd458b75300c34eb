"""The learner's configuration: the DeepSpeed ranks, the optimizer and the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LossConfig:
    """The policy-gradient objective."""

    advantage_norm: str = "std"
    """'std': GRPO (divide by the group's reward std); 'none': Dr. GRPO (mean-centred only)."""
    advantage_clip: float = 5.0
    """Clip advantages to [-c, c]; 0 disables. One success among many gives a huge
    normalised advantage (one in 93 gives ~9.6), hence the clip."""
    clip_low: float = 0.2
    """Lower ratio clip epsilon: ratio >= 1 - clip_low."""
    clip_high: float = 0.2
    """Upper ratio clip epsilon: ratio <= 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    aggregation: str = "token_mean"
    """'token_mean' (DAPO: mean over every completion token in the global batch),
    'seq_mean_token_mean' (GRPO: mean per sequence, then over sequences),
    'seq_mean_token_sum_norm' (Dr. GRPO: token sum / (sequences * max_new_tokens))."""
    tis_cap: float = 2.0
    """Truncated importance-sampling cap C on min(pi_old/pi_behav, C); 0 disables TIS."""
    eps: float = 1e-6
    """Added to the reward std before dividing."""

    def __post_init__(self) -> None:
        if self.advantage_norm not in ("std", "none"):
            raise ValueError(f"learner.loss.advantage_norm must be 'std' or 'none', got {self.advantage_norm!r}")
        if self.aggregation not in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
            raise ValueError(
                "learner.loss.aggregation must be one of token_mean, seq_mean_token_mean, "
                f"seq_mean_token_sum_norm; got {self.aggregation!r}"
            )
        if not (0.0 <= self.clip_low < 1.0):
            raise ValueError(f"learner.loss.clip_low must be in [0, 1), got {self.clip_low}")
        if not (0.0 <= self.clip_high < math.inf):
            raise ValueError(f"learner.loss.clip_high must be a finite number >= 0, got {self.clip_high}")
        for key in ("advantage_clip", "tis_cap"):
            if not (0.0 <= getattr(self, key) < math.inf):
                raise ValueError(
                    f"learner.loss.{key} must be a finite number >= 0 (0 disables), got {getattr(self, key)}"
                )
        if not (0.0 < self.eps < math.inf):
            raise ValueError(
                f"learner.loss.eps must be a finite number > 0 (a group with equal rewards has std 0), got {self.eps}"
            )


PACKED_ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
"""Attention that transformers keeps within each packed sequence (from restarting position ids)."""
ATTENTION = PACKED_ATTENTION + ("paged|eager",)
"""Every attention the learner accepts; paged attention serves generation and mixes a packed row."""


@dataclass
class LoraConfig:
    """Low-rank adapters (peft): train small matrices beside frozen weights."""

    rank: int = 0
    """Adapter rank r; 0 trains every weight (no LoRA)."""
    alpha: float = 32.0
    """Scaling numerator: the adapter's update is (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or name suffixes) that get adapters; ``[all-linear]``: every linear layer
    but the output head."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"learner.lora.rank must be >= 0 (0 = no LoRA), got {self.rank}")
        if self.rank and not self.alpha > 0:
            raise ValueError(f"learner.lora.alpha must be > 0, got {self.alpha}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"learner.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.target_modules:
            raise ValueError("learner.lora.target_modules is empty: name the modules that get adapters")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class LearnerConfig:
    """DeepSpeed learner ranks and the optimizer."""

    num_ranks: int = 1
    """Data-parallel DeepSpeed ranks (one Ray actor each)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    lr: float = 1e-4
    """AdamW learning rate (the peak, with a schedule: ``lr_schedule``)."""
    lr_schedule: str = "constant"
    """After ``warmup_steps``: 'constant', 'linear' or 'cosine' decay to ``min_lr_ratio * lr`` at
    ``lr_decay_steps`` (rlsys/learner/schedule.py)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from ``lr / warmup_steps`` to ``lr``."""
    lr_decay_steps: int = 0
    """The step at which a decaying schedule reaches its floor; 0: the run's ``steps``."""
    min_lr_ratio: float = 0.0
    """The decay's floor as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    grad_accum_steps: int = 1
    """Micro-batches per rank per optimizer step."""
    dtype: str = "fp32"
    """fp32 (CPU) or bf16 (GPU)."""
    num_cpus: float = 0.5
    """Ray CPUs reserved per rank (logical; on CPU machines rollout and learner mostly alternate)."""
    num_gpus: float = 0.0
    """Ray GPUs per rank (1 on GPU clusters)."""
    torch_threads: int = 0
    """torch intra-op threads per rank; 0 leaves the default (Ray gives an actor one thread per
    CPU it reserves, rounded down, at least 1). See rollout.torch_threads."""
    weight_transport: str = "auto"
    """How published weights reach the rollout workers: 'shm' (rank 0 writes one safetensors
    file to /dev/shm, workers load it: same node only), 'ray' (Ray's object store, any node) or
    'auto' (CPU: shm when every rollout worker shares learner rank 0's node, else ray; GPU:
    cuda_ipc when every engine shares rank 0's GPU, else nccl), 'nccl' (GPU: rank 0 broadcasts
    bucket by bucket to every engine over a NCCL group; engines on other GPUs than rank 0) or
    'cuda_ipc' (GPU: same device; see rlsys/rollout/weight_sync.py). scripts/bench_weight_sync.py
    measures the CPU ones, scripts/gpu_check.py the GPU ones."""
    gather_bucket_mb: int = 256
    """ZeRO-3 weight publication gathers the sharded parameters this many MB at a time, so a
    rank holds at most one bucket of gathered weights beyond its shard (rank 0 also keeps the
    CPU copy it publishes)."""
    max_restarts: int = 3
    """Learner failures (a rank dies mid-step) survived per run: the ranks are recreated from the
    last committed weights and the uncommitted batch is redelivered. Adam moments restart from
    zero (a resumed run, ``resume=<checkpoint>``, restores them)."""
    step_timeout_s: float = 3600.0
    """Deadline of one learner step (train and publish). Ranks past it count as hung and are
    recreated like dead ones (``max_restarts``). 0 = none."""
    on_nonfinite: str = "skip"
    """A step whose loss or gradient norm is NaN/inf: 'skip' it (its weights are discarded, the
    ranks restart from the last committed weights, its groups are counted as skipped_nonfinite
    and never trained) or 'stop' the run with an error. The last checkpoint stays valid."""
    max_nonfinite_steps: int = 3
    """With on_nonfinite=skip: stop the run after this many non-finite steps in a row (the run
    has diverged; lower learner.lr or check the reward)."""
    skip_zero_advantage: bool = True
    """Leave completions whose advantage is exactly 0 (a group whose rewards are all equal) out
    of the forward and backward pass. Their loss and gradient are exactly 0 and the loss keeps
    its denominators over the whole batch, so the update is unchanged; only the compute goes.
    Per-token statistics (KL to the behaviour policy, clip fraction) then cover the trained
    tokens only."""
    gradient_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward pass instead of keeping
    them (the model's own support in transformers, non-reentrant): activation memory of one
    layer instead of all, for about one more forward pass of compute. Same loss and update."""
    max_tokens_per_micro_batch: int = 0
    """Form each rank's micro-batches by a token budget instead of a count: a balanced bin
    packing of the sequences where each micro-batch holds at most this many tokens (padded
    tokens, rows x the longest row; real tokens with ``packing``). 0: ``grad_accum_steps``
    micro-batches in arrival order. Same loss and update either way (the loss is normalised
    over the whole batch); must fit the longest prompt plus ``rollout.max_new_tokens``."""
    packing: bool = False
    """Pack each micro-batch's sequences back to back into one row, with position ids that
    restart at each sequence and attention that does not cross sequences (transformers' packed
    sequence support: flash attention's variable-length kernels on GPU, a block-diagonal causal
    mask with sdpa or eager): no arithmetic on padding. Same loss and update as padded."""
    attn_implementation: str = "auto"
    """The learner model's attention: 'auto' (flash_attention_2 on GPU when flash-attn is
    installed, else sdpa), 'sdpa', 'eager', 'flash_attention_2', 'flash_attention_3',
    'flex_attention' or 'paged|eager' (not with packing)."""
    offload_optimizer: bool = False
    """ZeRO offload of the optimizer state (and its step) to CPU memory: needs zero_stage >= 1.
    GPU only in effect: on CPU the state is already in CPU memory."""
    offload_params: bool = False
    """ZeRO-3 offload of the parameters to CPU memory between uses: needs zero_stage 3. GPU
    only in effect, like offload_optimizer."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (``learner.lora.rank`` > 0): only the adapters are trained and held by
    the optimizer; the rollout workers get the merged weights."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The policy-gradient objective."""

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"learner.num_ranks must be >= 1, got {self.num_ranks}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"learner.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if not self.lr > 0:  # NaN too
            raise ValueError(f"learner.lr must be > 0, got {self.lr}")
        if self.torch_threads < 0:
            raise ValueError(f"learner.torch_threads must be >= 0 (0 = the default), got {self.torch_threads}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"learner.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.weight_transport not in ("auto", "ray", "shm", "nccl", "cuda_ipc"):
            raise ValueError(
                f"learner.weight_transport must be auto, ray, shm, nccl or cuda_ipc, got {self.weight_transport!r}"
            )
        if self.gather_bucket_mb < 1:
            raise ValueError(f"learner.gather_bucket_mb must be >= 1, got {self.gather_bucket_mb}")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"learner.on_nonfinite must be skip or stop, got {self.on_nonfinite!r}")
        if self.max_nonfinite_steps < 1 or self.step_timeout_s < 0:
            raise ValueError("learner.max_nonfinite_steps must be >= 1 and learner.step_timeout_s >= 0 (0 = none)")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"learner.dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"learner.lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}")
        if self.warmup_steps < 0 or self.lr_decay_steps < 0:
            raise ValueError(
                f"learner.warmup_steps and learner.lr_decay_steps must be >= 0, got {self.warmup_steps} and "
                f"{self.lr_decay_steps}"
            )
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"learner.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_tokens_per_micro_batch < 0:
            raise ValueError(
                f"learner.max_tokens_per_micro_batch must be >= 0 (0 = micro-batches by count), "
                f"got {self.max_tokens_per_micro_batch}"
            )
        if self.max_tokens_per_micro_batch and self.grad_accum_steps != 1:
            raise ValueError(
                "learner.max_tokens_per_micro_batch and learner.grad_accum_steps both set how a rank's batch is "
                "cut into micro-batches: set one (grad_accum_steps=1 with a token budget)"
            )
        if self.attn_implementation not in ATTENTION:
            raise ValueError(
                f"learner.attn_implementation must be one of {', '.join(ATTENTION)}, got {self.attn_implementation!r}"
            )
        if self.packing and self.attn_implementation not in PACKED_ATTENTION:
            raise ValueError(
                f"learner.packing needs attention that keeps packed sequences apart "
                f"({', '.join(PACKED_ATTENTION)}); learner.attn_implementation={self.attn_implementation} cannot"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs ZeRO (learner.zero_stage 1, 2 or 3), got zero_stage=0")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"learner.offload_params offloads ZeRO-3's parameter partitions: it needs learner.zero_stage=3, "
                f"got {self.zero_stage}"
            )
