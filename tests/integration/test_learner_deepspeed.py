"""Two DeepSpeed ranks (CPU accelerator, gloo) as Ray actors stay identical step after step."""

import os

import numpy as np
import pytest
from helpers import free_port as _free_port
from helpers import learner_groups as _groups

from rlsys.learner.batch import build_batch, shard_indices
from rlsys.learner.config import LearnerConfig, LossConfig
from rlsys.learner.losses import LossNormalizer
from rlsys.learner.rank import LearnerRank

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_two_ranks_stay_identical(ray_cluster, tiny_model, zero_stage):
    cfg = LearnerConfig(num_ranks=2, zero_stage=zero_stage, lr=1e-3, num_cpus=0.5, gather_bucket_mb=1)
    port = _free_port()
    ranks = [
        ray_cluster.remote(num_cpus=0.5)(LearnerRank).remote(cfg, tiny_model, r, 2, port, 1.0, 6) for r in range(2)
    ]
    try:
        start = ray_cluster.get([r.weights_digest.remote() for r in ranks])
        assert start[0] == start[1]
        rng = np.random.default_rng(0)
        for _ in range(3):
            batch = build_batch(_groups(rng), LossConfig(), pad_id=0)
            norm = LossNormalizer(batch.num_tokens, batch.num_seqs, 6)
            shards = [batch.select(ix) for ix in shard_indices(batch.attention_mask.sum(1), 2)]
            stats = ray_cluster.get([r.train_step.remote(s, norm) for r, s in zip(ranks, shards)])
            assert all(np.isfinite(s.loss) for s in stats)
            digests = ray_cluster.get([r.weights_digest.remote() for r in ranks])
            assert digests[0] == digests[1]
        assert digests[0] != start[0]  # the weights moved
        weights = ray_cluster.get([r.gather_weights.remote() for r in ranks])
        assert weights[1] is None and len(weights[0]) > 0
        names = {n for n, _ in weights[0]}
        assert "lm_head.weight" in names and all(t.numel() > 0 for _, t in weights[0])
        # Gathered bucket by bucket (1 MB buckets: several), the published weights are the model.
        import hashlib

        h = hashlib.sha256()
        for n, t in weights[0]:
            h.update(n.encode())
            h.update(t.numpy().tobytes())
        assert h.hexdigest() == digests[0]
        # The ranks' process group listens on loopback only: torch's default env:// rendezvous
        # started a TCPStore on every interface ('::').
        import psutil

        pids = ray_cluster.get([r.__ray_call__.remote(lambda self: os.getpid()) for r in ranks])
        listening = {c.laddr.ip for pid in pids for c in psutil.Process(pid).net_connections() if c.status == "LISTEN"}
        assert listening and all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip in listening), listening
    finally:
        for r in ranks:
            ray_cluster.kill(r)


def test_learner_logprobs_match_vllm_behaviour_logprobs(ray_cluster, tiny_model, tmp_path):
    """The learner's per-token logprobs of vLLM's own samples equal vLLM's behaviour logprobs."""
    from transformers import AutoTokenizer

    from rlsys.records import RolloutRequest
    from rlsys.rollout.worker import RolloutConfig, RolloutWorker
    from rlsys.tasks.tinymodel import encode_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model)
    w = ray_cluster.remote(num_cpus=1)(RolloutWorker).remote(
        RolloutConfig(max_new_tokens=6), tiny_model, 0, str(tmp_path)
    )
    rank = ray_cluster.remote(num_cpus=0.5)(LearnerRank).remote(LearnerConfig(), tiny_model, 0, 1, _free_port(), 1.0, 6)
    try:
        reqs = [
            RolloutRequest(f"p{i}", p, tuple(encode_prompt(tok, p)), "0", 4)
            for i, p in enumerate(["12+34=", "999+1=", "250+250="])
        ]
        groups = ray_cluster.get(w.generate.remote(reqs)).groups
        for g in groups:
            g.rewards = np.zeros(g.size, np.float32)
        batch = build_batch(groups, LossConfig(), pad_id=tok.pad_token_id)
        lp = ray_cluster.get(rank.compute_logprobs.remote(batch))
        diff = np.abs((lp - batch.behav_logprobs) * batch.mask).max()
        assert diff < 1e-4, diff
    finally:
        ray_cluster.kill(w)
        ray_cluster.kill(rank)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_gradient_checkpointing_gives_the_same_step(ray_cluster, tiny_model, zero_stage):
    """learner.gradient_checkpointing recomputes activations in the backward pass: the loss and
    the updated weights equal those of the plain step (one rank, ZeRO 1 and 3)."""
    rng = np.random.default_rng(1)
    batch = build_batch(_groups(rng), LossConfig(), pad_id=0)
    norm = LossNormalizer(batch.num_tokens, batch.num_seqs, 6)
    results = []
    for ckpt in (False, True):
        cfg = LearnerConfig(zero_stage=zero_stage, lr=1e-3, gradient_checkpointing=ckpt)
        rank = ray_cluster.remote(num_cpus=0.5)(LearnerRank).remote(cfg, tiny_model, 0, 1, _free_port(), 1.0, 6)
        try:
            on = ray_cluster.get(rank.__ray_call__.remote(lambda self: self.engine.module.is_gradient_checkpointing))
            assert on == ckpt
            (stats,) = ray_cluster.get([rank.train_step.remote(batch, norm)])
            results.append((stats, dict(ray_cluster.get(rank.gather_weights.remote()))))
        finally:
            ray_cluster.kill(rank)
    (plain, w_plain), (ckpt, w_ckpt) = results
    assert plain.grad_norm > 0  # the step moved the weights
    assert ckpt.loss == pytest.approx(plain.loss, rel=1e-5, abs=1e-7)
    assert ckpt.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
    moved = 0
    for name, t in w_plain.items():
        np.testing.assert_allclose(w_ckpt[name].numpy(), t.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        moved += 1
    assert moved == len(w_ckpt) > 0


@pytest.mark.slow  # ~45 s; the resume test checks the schedule's continuation in the default run
def test_learning_rate_follows_the_schedule_from_the_committed_step(ray_cluster, tiny_model):
    """DeepSpeed steps the schedule after each optimizer step; a rank started at committed step
    k (a restart or a resume) continues it at k, not at 0."""
    from rlsys.learner.schedule import lr_factor

    cfg = LearnerConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=2, lr_decay_steps=5, min_lr_ratio=0.1)
    rng = np.random.default_rng(3)
    batch = build_batch(_groups(rng), LossConfig(), pad_id=0)
    norm = LossNormalizer(batch.num_tokens, batch.num_seqs, 6)

    def lr(rank) -> float:
        return ray_cluster.get(rank.__ray_call__.remote(lambda self: self.engine.get_lr()[0]))

    fresh = ray_cluster.remote(num_cpus=0.5)(LearnerRank).remote(cfg, tiny_model, 0, 1, _free_port(), 1.0, 6)
    later = ray_cluster.remote(num_cpus=0.5)(LearnerRank).remote(
        cfg, tiny_model, 0, 1, _free_port(), 1.0, 6, start_step=3
    )
    try:
        seen = [lr(fresh)]
        for _ in range(5):
            ray_cluster.get(fresh.train_step.remote(batch, norm))
            seen.append(lr(fresh))
        assert seen == pytest.approx([1e-3 * lr_factor(s, cfg) for s in range(6)], rel=1e-9)
        assert seen[0] == pytest.approx(5e-4) and seen[-1] == pytest.approx(1e-4)  # warmup, then the floor
        assert lr(later) == pytest.approx(seen[3], rel=1e-9)
    finally:
        ray_cluster.kill(fresh)
        ray_cluster.kill(later)
