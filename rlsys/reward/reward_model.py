"""The fast reward model: a small locally trained transformer scorer, pairwise (with an SNGP
uncertainty) and pointwise, built and cached like the tiny policy.

Nothing is downloaded. :func:`ensure_reward_model` returns a directory holding both forms,
trained on preference data derived from the built-in task::

    ensure_reward_model(RewardModelConfig(), TaskConfig())
      -> cache hit: <cache_dir>/<key>/ holds DONE          -> return it
      -> miss:      preference data from task.train (correct answer vs a realistic mistake,
                    random order, labels flipped with probability label_noise)
                    -> train the pairwise model (BCE on the noisy labels)
                    -> one dedicated pass over the training pairs with the final weights:
                       precision = ridge I + sum phi phi^T, covariance = ridge precision^-1
                    -> train the pointwise model (BCE on noisy correct/incorrect labels)
                    -> save into <cache_dir>/.tmp-<key>-*/, DONE written last, atomic rename

Layout of a reward-model directory (weights in safetensors, configs in JSON; no pickle)::

    pairwise/model.safetensors   backbone + SNGP head, precision and covariance included
    pairwise/reward_model.json   {"kind": "pairwise", "config": RewardModelConfig, "backbone": LlamaConfig}
    pointwise/                   LlamaForSequenceClassification (num_labels=1), save_pretrained:
                                 AutoModelForSequenceClassification loads it as is
    tokenizer files              the policy's character tokenizer (rlsys.tasks.tinymodel.build_tokenizer)
    train_report.json            steps, seconds, losses, accuracies of the build
    DONE

Encoding (only tokens the policy's tokenizer already has; no vocabulary change)::

    pairwise:  <bos> prompt response_a <eos> response_b <eos>
    pointwise: <bos> prompt response <eos>

``<eos>`` closes each response exactly as it closes a completion in the policy's training
sequences, so it also serves as the separator. Responses are stripped (as ``verify_answer``
does); one longer than fits in ``max_position`` is cut to its first characters (each of the
two responses gets half the room left after the prompt). The sequence is read by a causal
``LlamaModel``; the pooled representation is the hidden state at the final ``<eos>``, which
attends to everything before it. Right padding needs no attention mask: causal attention never
lets a real token see a later pad.

Uncertainty: SNGP (Liu et al. 2020), chosen over an ensemble because it costs one forward pass
and one D x D product per pair and needs one model on disk, where an ensemble multiplies the
training time (the build has ~2 CPU-minutes) and the serving cost. Shape legend: N pairs,
H = hidden_size, D = rff_features::

    h_NH   = pooled state (after the backbone's final RMSNorm, whose learned gain sets the
             scale the kernel sees; an extra LayerNorm here stalled training in our runs)
    z_NH   = h + c * SN(W) tanh(h)                     residual layer; SN(W) = W / sigma(W) (power
                                                       iteration), c = spectral_norm_bound < 1, so
                                                       (1 - c)|h - h'| <= |z - z'| <= (1 + c)|h - h'|
    phi_ND = sqrt(2 / D) cos(z W_rff^T / ell + b)      W_rff ~ N(0, 1), b ~ U(0, 2 pi): fixed;
                                                       RBF kernel of width ell = rff_lengthscale
    logit  = phi beta                                  beta trained with the backbone
    Sigma  = ridge I + sum_train phi phi^T             precision: one pass over the training
                                                       pairs with the final weights
    var    = ridge phi^T Sigma^-1 phi                  (docs/algorithms.md §2.2)
    uncertainty    = sqrt(1 + a var)                   a = mean_field_factor (pi / 8)
    adjusted_logit = logit / uncertainty               mean-field predictive logit (returned too)

Training adds an auxiliary linear head on h (loss weight ``aux_loss_weight``): the random
features give the backbone a weak, noisy gradient early on, and the auxiliary head's BCE
gets it learning; scores always come from the GP head. Scale: ``|phi|^2 ~ 1`` (at most 2), so
``var`` is near 1 far from every training input and near 0 among many, and ``uncertainty``
lies in [1, sqrt(1 + 2a)]. With the defaults (40,000 training pairs) u - 1 is ~1e-5 to 1e-4 on
held-out in-distribution pairs and ~1e-3 to 1e-2 on degenerate answers: a router's threshold
tau lives in that range (only the ranking matters for the top-k policy).

What the variance measures: distance from the training inputs in the head's feature space
(epistemic uncertainty). It rises on inputs unlike the training pairs (strings that are not
sums, 7-digit numbers, empty answers), but it does not see the errors the model makes on
*typical* inputs it cannot resolve (a wrong middle digit): those sit in a dense region of
feature space and get a low variance. On the built-in task the default model's accuracy
therefore *rises* with u on held-out realistic mistakes and falls with u on degenerate
answers; scripts/train_rm.py measures both. Limitation: the Llama layers of the backbone are
not spectrally normalised, only the head.

Batched scoring: ``PairwiseRewardModel.score_pairs(prompts, a, b)`` -> (logit [P],
uncertainty [P]); ``score_both_orders`` scores (a, b) and (b, a) in one batch and returns
``logit_ij``, ``logit_ji`` and the mean of the two orders' uncertainties, the inputs of
``rlsys.reward.routing.pair_scores``. ``PointwiseRewardModel.score(prompts, responses)`` -> [N].

Cache invariants are those of :mod:`rlsys.tasks.tinymodel`: the key is the sha256 of both configs
(minus ``cache_dir``), the task data file's contents when set, and :data:`BUILD_VERSION`; an
entry is complete or absent; same configs give bit-identical weights (seeded, one thread).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel, PreTrainedTokenizerFast

from rlsys.reward.config import RewardModelConfig
from rlsys.tasks.tinymodel import build_tokenizer, save_tokenizer

__all__ = [
    "BUILD_VERSION",
    "BothOrders",
    "PairPrediction",
    "PairwiseRewardModel",
    "PointwiseRewardModel",
    "encode_pair",
    "encode_single",
]

log = logging.getLogger(__name__)

BUILD_VERSION = 2
"""Part of the cache key, and recorded in each saved pairwise model: bump it whenever the build
recipe or the model's computation changes (2: no LayerNorm before the head, auxiliary head)."""

PAIRWISE_DIR, POINTWISE_DIR = "pairwise", "pointwise"
WEIGHTS_FILE, META_FILE, REPORT_FILE = "model.safetensors", "reward_model.json", "train_report.json"
MISTAKE_KINDS = ("digit", "place", "carry", "swap", "length", "operand")
"""Kinds of wrong answer :func:`wrong_answers` draws (see there)."""


# ----------------------------------------------------------------------------- encoding


def _char_ids(tok: PreTrainedTokenizerFast, text: str, what: str) -> list[int]:
    vocab = tok.get_vocab()
    bad = sorted({ch for ch in text if ch not in vocab})
    if bad:
        raise ValueError(f"{what} {text!r} has characters the reward model's tokenizer cannot encode: {''.join(bad)!r}")
    return [vocab[ch] for ch in text]


def encode_pair(tok: PreTrainedTokenizerFast, prompt: str, a: str, b: str, max_position: int) -> list[int]:
    """``<bos> prompt a <eos> b <eos>`` ids; a and b stripped and cut to fit (module docstring)."""
    p = _char_ids(tok, prompt, "prompt")
    room = (max_position - 3 - len(p)) // 2
    if room < 1:
        raise ValueError(
            f"prompt {prompt!r} leaves no room for two responses in reward.model.max_position={max_position}; raise it"
        )
    ia = _char_ids(tok, a.strip(), "response")[:room]
    ib = _char_ids(tok, b.strip(), "response")[:room]
    return [tok.bos_token_id, *p, *ia, tok.eos_token_id, *ib, tok.eos_token_id]


def encode_single(tok: PreTrainedTokenizerFast, prompt: str, response: str, max_position: int) -> list[int]:
    """``<bos> prompt response <eos>`` ids; the response stripped and cut to fit."""
    p = _char_ids(tok, prompt, "prompt")
    room = max_position - 2 - len(p)
    if room < 1:
        raise ValueError(
            f"prompt {prompt!r} leaves no room for a response in reward.model.max_position={max_position}; raise it"
        )
    return [tok.bos_token_id, *p, *_char_ids(tok, response.strip(), "response")[:room], tok.eos_token_id]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids_NL and the index of each row's last real token, last_N."""
    length = max(len(s) for s in seqs)
    ids_NL = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_NL[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids_NL, torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)


def _check_lengths(**columns: Sequence[str]) -> int:
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"need one entry per item in each of {', '.join(lengths)}; got lengths {lengths}")
    return next(iter(lengths.values()))


# ----------------------------------------------------------------------------- models


def _backbone_config(cfg: RewardModelConfig, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )


class PairPrediction(NamedTuple):
    """Everything the SNGP head says about P pairs (float64 numpy arrays [P])."""

    logit: np.ndarray
    """Logit of P(a better than b), a shown first."""
    variance: np.ndarray
    """GP predictive variance ``ridge phi^T Sigma^-1 phi``."""
    uncertainty: np.ndarray
    """``sqrt(1 + mean_field_factor * variance)`` (>= 1)."""
    adjusted_logit: np.ndarray
    """``logit / uncertainty`` (mean-field predictive logit)."""


class BothOrders(NamedTuple):
    """Scores of P pairs in both orders: the inputs of ``rlsys.reward.routing.pair_scores``."""

    logit_ij: np.ndarray
    """l(a, b), a shown first."""
    logit_ji: np.ndarray
    """l(b, a), b shown first."""
    uncertainty: np.ndarray
    """Mean of the two orders' uncertainties."""


class SNGPHead(nn.Module):
    """Pooled state -> (logit, variance): residual spectral-normalised layer, random Fourier
    features, linear output, and the precision/covariance of the output weights."""

    def __init__(self, cfg: RewardModelConfig, generator: torch.Generator) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.rff_features
        self.bound = cfg.spectral_norm_bound
        self.ridge = cfg.ridge
        self.mean_field_factor = cfg.mean_field_factor
        self.proj = spectral_norm(nn.Linear(h, h, bias=False))
        self.out = nn.Linear(d, 1, bias=False)
        self.register_buffer("rff_weight", torch.randn(d, h, generator=generator) / cfg.rff_lengthscale)
        self.register_buffer("rff_bias", torch.rand(d, generator=generator) * 2 * math.pi)
        self.register_buffer("precision", cfg.ridge * torch.eye(d, dtype=torch.float64))
        self.register_buffer("covariance", torch.eye(d, dtype=torch.float64))
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.float64))

    def features(self, pooled_NH: torch.Tensor) -> torch.Tensor:
        """phi_ND, the random Fourier features of pooled states."""
        z_NH = pooled_NH + self.bound * self.proj(torch.tanh(pooled_NH))
        d = self.rff_weight.shape[0]
        return math.sqrt(2.0 / d) * torch.cos(z_NH @ self.rff_weight.T + self.rff_bias)

    @torch.no_grad()
    def refine_spectral_norm(self, iterations: int = 500) -> None:
        """Run extra power iterations on the residual layer's weight. During training sigma(W) is
        estimated with one iteration per step and lags the moving weight slightly (by ~0.3% in
        our runs); after this, ``spectral_norm_of_layer`` is c to float precision."""
        was_training = self.proj.training
        self.proj.train()
        try:
            for _ in range(iterations):
                self.proj.weight  # in train mode, reading the weight runs one power iteration
        finally:
            self.proj.train(was_training)

    def spectral_norm_of_layer(self) -> float:
        """Exact largest singular value of the residual layer's effective weight, c W / sigma(W)."""
        return float(torch.linalg.matrix_norm(self.bound * self.proj.weight.detach(), ord=2))

    def variance(self, phi_ND: torch.Tensor) -> torch.Tensor:
        """ridge phi^T Sigma^-1 phi = phi^T covariance phi, float64 [N]."""
        phi = phi_ND.to(torch.float64)
        return ((phi @ self.covariance) * phi).sum(dim=-1)

    @torch.no_grad()
    def reset_precision(self) -> None:
        self.precision.copy_(self.ridge * torch.eye(self.precision.shape[0], dtype=torch.float64))
        self.num_seen.zero_()

    @torch.no_grad()
    def accumulate_precision(self, phi_ND: torch.Tensor) -> None:
        phi = phi_ND.to(torch.float64)
        self.precision += phi.T @ phi
        self.num_seen += phi.shape[0]

    @torch.no_grad()
    def finalize_covariance(self) -> None:
        """covariance = ridge Sigma^-1 (Cholesky inverse; Sigma is SPD by construction)."""
        self.precision.copy_((self.precision + self.precision.T) / 2)
        chol = torch.linalg.cholesky(self.precision)
        self.covariance.copy_(self.ridge * torch.cholesky_inverse(chol))


class PairwiseRewardModel(nn.Module):
    """Reads ``<bos> prompt a <eos> b <eos>`` and outputs the logit of P(a better than b) and
    its SNGP uncertainty. See the module docstring for the encoding and the head."""

    def __init__(self, cfg: RewardModelConfig, tok: Optional[PreTrainedTokenizerFast] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = tok if tok is not None else build_tokenizer(cfg.max_position)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.backbone = LlamaModel(_backbone_config(cfg, self.tok))
        self.head = SNGPHead(cfg, generator)
        self.aux = nn.Linear(cfg.hidden_size, 1)
        """Auxiliary linear head: used only by the training loss (module docstring)."""

    def pooled(self, ids_NL: torch.Tensor, last_N: torch.Tensor) -> torch.Tensor:
        """pooled_NH: the backbone's hidden state at each row's last real token (the final eos)."""
        hidden_NLH = self.backbone(input_ids=ids_NL, use_cache=False).last_hidden_state
        return hidden_NLH[torch.arange(ids_NL.shape[0]), last_N]

    def forward(self, ids_NL: torch.Tensor, last_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit_N, phi_ND) of right-padded sequences whose last real token is at last_N."""
        phi_ND = self.head.features(self.pooled(ids_NL, last_N))
        return self.head.out(phi_ND).squeeze(-1), phi_ND

    def encode(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[list[int]]:
        _check_lengths(prompts=prompts, a=a, b=b)
        return [encode_pair(self.tok, p, x, y, self.cfg.max_position) for p, x, y in zip(prompts, a, b)]

    @torch.no_grad()
    def predict_pairs(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], batch_size: int = 512
    ) -> PairPrediction:
        """Logit, variance, uncertainty and adjusted logit of each pair (a shown first)."""
        seqs = self.encode(prompts, a, b)
        logits, variances = [], []
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(seqs), batch_size):
                ids_NL, last_N = _pad(seqs[start : start + batch_size], self.tok.pad_token_id)
                logit_N, phi_ND = self(ids_NL, last_N)
                logits.append(logit_N.to(torch.float64))
                variances.append(self.head.variance(phi_ND))
        finally:
            self.train(was_training)
        logit = torch.cat(logits).numpy() if logits else np.zeros(0)
        var = torch.cat(variances).numpy() if variances else np.zeros(0)
        u = np.sqrt(1.0 + self.cfg.mean_field_factor * var)
        return PairPrediction(logit, var, u, logit / u)

    def score_pairs(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], batch_size: int = 512
    ) -> tuple[np.ndarray, np.ndarray]:
        """(logit_ab [P], uncertainty [P]): logit of P(a better than b) with a shown first."""
        pred = self.predict_pairs(prompts, a, b, batch_size)
        return pred.logit, pred.uncertainty

    def score_both_orders(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], batch_size: int = 512
    ) -> BothOrders:
        """l(a, b), l(b, a) and the mean of both orders' uncertainties, in one batched pass."""
        n = _check_lengths(prompts=prompts, a=a, b=b)
        pred = self.predict_pairs([*prompts, *prompts], [*a, *b], [*b, *a], batch_size)
        return BothOrders(pred.logit[:n], pred.logit[n:], (pred.uncertainty[:n] + pred.uncertainty[n:]) / 2)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE)
        meta = {
            "kind": "pairwise",
            "build_version": BUILD_VERSION,
            "config": dataclasses.asdict(self.cfg),
            "backbone": self.backbone.config.to_dict(),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "PairwiseRewardModel":
        """The pairwise model saved in ``directory`` (or in its ``pairwise/`` subdirectory), in eval mode."""
        directory = Path(directory).expanduser()
        if (directory / PAIRWISE_DIR / META_FILE).is_file():
            directory = directory / PAIRWISE_DIR
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{directory} is not a pairwise reward-model directory (no {META_FILE}); "
                "build one with rlsys.tasks.preference_model.ensure_reward_model"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "pairwise":
            raise ValueError(f"{meta_path} describes a {meta.get('kind')!r} model, not a pairwise one")
        if meta.get("build_version") != BUILD_VERSION:
            raise ValueError(
                f"{directory} holds a pairwise model of build version {meta.get('build_version')}, "
                f"this code computes version {BUILD_VERSION}; rebuild it (ensure_reward_model, or "
                "scripts/train_rm.py --save)"
            )
        fields = {f.name for f in dataclasses.fields(RewardModelConfig)}
        cfg = RewardModelConfig(**{k: v for k, v in meta["config"].items() if k in fields})
        with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the caller's RNG
            model = cls(cfg)
        model.load_state_dict(load_file(directory / WEIGHTS_FILE))
        return model.eval()


class PointwiseRewardModel:
    """``LlamaForSequenceClassification`` (num_labels=1) on ``<bos> prompt response <eos>``:
    the logit that the response is correct. No uncertainty."""

    def __init__(self, model: LlamaForSequenceClassification, tok: PreTrainedTokenizerFast, max_position: int):
        self.model = model
        self.tok = tok
        self.max_position = max_position

    @classmethod
    def create(cls, cfg: RewardModelConfig, tok: Optional[PreTrainedTokenizerFast] = None) -> "PointwiseRewardModel":
        """A freshly initialised model (seeded by the caller's RNG state)."""
        tok = tok if tok is not None else build_tokenizer(cfg.max_position)
        config = _backbone_config(cfg, tok)
        config.num_labels = 1
        return cls(LlamaForSequenceClassification(config), tok, cfg.max_position)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        _check_lengths(prompts=prompts, responses=responses)
        return [encode_single(self.tok, p, r, self.max_position) for p, r in zip(prompts, responses)]

    def logits(self, ids_NL: torch.Tensor) -> torch.Tensor:
        """[N] logits of right-padded ids (the class pools the last non-pad token)."""
        return self.model(input_ids=ids_NL, use_cache=False).logits.squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 512) -> np.ndarray:
        """float64 [N]: logit that each response is a correct answer to its prompt."""
        seqs = self.encode(prompts, responses)
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for start in range(0, len(seqs), batch_size):
                ids_NL, _ = _pad(seqs[start : start + batch_size], self.tok.pad_token_id)
                out.append(self.logits(ids_NL).to(torch.float64))
        finally:
            self.model.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros(0)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)
        save_tokenizer(self.tok, Path(directory))

    @classmethod
    def load(cls, directory: str | Path) -> "PointwiseRewardModel":
        """The pointwise model in ``directory`` (or in its ``pointwise/`` subdirectory), in eval mode."""
        directory = Path(directory).expanduser()
        if (directory / POINTWISE_DIR / "config.json").is_file():
            directory = directory / POINTWISE_DIR
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{directory} holds no pointwise reward model (no config.json); the build "
                "skips it when reward.model.pointwise_steps=0"
            )
        with torch.random.fork_rng(devices=[]):
            model = LlamaForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
        return cls(
            model.eval(), build_tokenizer(model.config.max_position_embeddings), model.config.max_position_embeddings
        )
