"""The learner's memory and batching options change the arithmetic, not the step: after one
step on real DeepSpeed ranks (CPU, gloo), gradient checkpointing, packed rows, token-budget
micro-batches and both together give the loss and updated weights of the plain step, on 1 and 2
ranks with ZeRO 1 and 3 (and 2 ranks with ZeRO-2, the GPU preset's stage). And LoRA trains only
its adapters and publishes merged weights."""

import numpy as np
import pytest
from helpers import free_port, learner_groups, set_learner_options

from rlsys.learner.batch import build_batch, split_for_ranks
from rlsys.learner.config import LearnerConfig, LoraConfig, LossConfig
from rlsys.learner.losses import LossNormalizer
from rlsys.learner.rank import LearnerRank

pytestmark = pytest.mark.integration

BUDGET = 40  # tokens per micro-batch: sequences here are 5 to 16 tokens, so several micro-batches
COUNT = dict(grad_accum_steps=2, max_tokens_per_micro_batch=0, packing=False, gradient_checkpointing=False)
BY_TOKENS = dict(COUNT, grad_accum_steps=1, max_tokens_per_micro_batch=BUDGET)
VARIANTS = {
    "count": COUNT,
    "checkpointing": dict(COUNT, gradient_checkpointing=True),
    "packed": dict(COUNT, packing=True),
    "token_budget": BY_TOKENS,
    "token_budget_packed": dict(BY_TOKENS, packing=True),
}


def _steps(ray, model, world, zero_stage, batch, norm, tmp_path) -> dict:
    """One step of each variant from the same weights on ``world`` ranks: name -> (summed loss,
    grad norm, published weights, micro-batches per rank)."""
    cfg = LearnerConfig(num_ranks=world, zero_stage=zero_stage, lr=1e-3)
    port = free_port()
    ranks = [ray.remote(num_cpus=0.5)(LearnerRank).remote(cfg, model, r, world, port, 1.0, 12) for r in range(world)]
    start = str(tmp_path / "start")
    out = {}
    try:
        ray.get([r.__ray_call__.remote(lambda self: self.engine.save_checkpoint(start, tag="start")) for r in ranks])
        for name, opts in VARIANTS.items():
            ray.get([r.__ray_call__.remote(set_learner_options, opts, start) for r in ranks])
            parts = split_for_ranks(batch, world, LearnerConfig(**opts))
            stats = ray.get([r.train_step.remote(s, norm, p) for r, (s, p) in zip(ranks, parts)])
            digests = ray.get([r.weights_digest.remote() for r in ranks])
            assert len(set(digests)) == 1  # the ranks stay identical
            weights = dict(ray.get([r.gather_weights.remote() for r in ranks])[0])
            out[name] = (sum(s.loss for s in stats), stats[0].grad_norm, weights, len(parts[0][1]))
        return out
    finally:
        for r in ranks:
            ray.kill(r)


@pytest.mark.parametrize(
    "world, zero_stage", [(1, 1), (1, 3), (2, 1), pytest.param(2, 2, marks=pytest.mark.slow), (2, 3)]
)
def test_memory_and_batching_options_give_the_same_step(ray_cluster, tiny_model, world, zero_stage, tmp_path):
    rng = np.random.default_rng(7)
    batch = build_batch(learner_groups(rng, k=4, n=4, max_completion=12), LossConfig(), pad_id=0)
    norm = LossNormalizer(batch.num_tokens, batch.num_seqs, 12)
    results = _steps(ray_cluster, tiny_model, world, zero_stage, batch, norm, tmp_path)
    loss, grad_norm, weights, _ = results.pop("count")
    assert grad_norm > 0
    assert results["token_budget"][3] > 2  # the budget did cut the shard into several micro-batches
    for name, (v_loss, v_norm, v_weights, _) in results.items():
        assert v_loss == pytest.approx(loss, rel=1e-5, abs=1e-7), name
        assert v_norm == pytest.approx(grad_norm, rel=1e-4), name
        assert v_weights.keys() == weights.keys()
        # Adam moves each weight by about lr (1e-3) whatever its gradient's size, so a weight whose
        # gradient is ~0 moves by float noise: 2% of lr is the tolerance (the grad norm is tighter).
        for key, t in weights.items():
            np.testing.assert_allclose(v_weights[key].numpy(), t.numpy(), rtol=0, atol=2e-5, err_msg=f"{name}: {key}")


def _merged_logprobs(weights: dict, base: str, batch) -> np.ndarray:
    """Per-token log-probabilities of ``batch`` under a plain transformers model holding the
    published (merged) ``weights``: the parity test's reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlsys.learner.losses import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.load_state_dict(weights, strict=True)
    model.eval()
    with torch.no_grad():
        ids = torch.from_numpy(batch.input_ids)
        logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch.attention_mask)).logits
        return token_logprobs(logits, ids).numpy()


@pytest.mark.parametrize("zero_stage", [3])  # ZeRO-1 (the default): test_e2e.py's LoRA run
def test_lora_trains_only_adapters_and_publishes_merged_weights(ray_cluster, tiny_model, tmp_path, zero_stage):
    """The optimizer holds the adapters and nothing else (counted); every publication is the
    merged model, which vLLM loads and whose log-probabilities equal vLLM's; the learner's own
    (adapter) log-probabilities equal the merged model's; a checkpoint holds the adapters in
    peft's format and the merged policy, which vLLM serves as a plain model directory."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsys import checkpoint
    from rlsys.learner.lora import apply_lora
    from rlsys.records import RolloutRequest
    from rlsys.rollout.worker import RolloutConfig, RolloutWorker
    from rlsys.tasks.tinymodel import encode_prompt

    lora = LoraConfig(rank=4, alpha=8.0)
    expected = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model), lora)
    n_adapter = sum(p.numel() for p in expected.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in expected.parameters())
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = LearnerConfig(zero_stage=zero_stage, lr=2e-2, lora=lora)
    rank = ray_cluster.remote(num_cpus=0.5)(LearnerRank).remote(cfg, tiny_model, 0, 1, free_port(), 1.0, 6)
    worker = ray_cluster.remote(num_cpus=1)(RolloutWorker).remote(
        RolloutConfig(max_new_tokens=6), tiny_model, 0, str(tmp_path)
    )
    served = None
    try:
        names, count = ray_cluster.get(rank.optimizer_params.remote())
        assert count == n_adapter < n_all / 10 and all(".lora_A." in n or ".lora_B." in n for n in names)
        reqs = [
            RolloutRequest(f"p{i}", p, tuple(encode_prompt(tok, p)), "0", 4)
            for i, p in enumerate(["12+34=", "999+1=", "250+250="])
        ]
        before = None
        for version in (1, 2):
            groups = ray_cluster.get(worker.generate.remote(reqs)).groups
            for g in groups:  # reward the longer completions: the update has a direction
                g.rewards = np.array([len(c.token_ids) for c in g.completions], np.float32) + np.arange(g.size) * 0.1
            batch = build_batch(groups, LossConfig(), pad_id=tok.pad_token_id)
            if before is not None:  # the engine serves the last publication: parity with the merged model
                merged = _merged_logprobs(before, tiny_model, batch)
                learner = ray_cluster.get(rank.compute_logprobs.remote(batch))
                assert np.abs((merged - batch.behav_logprobs) * batch.mask).max() < 1e-4
                assert np.abs((learner - merged) * batch.mask).max() < 1e-4
            norm = LossNormalizer(batch.num_tokens, batch.num_seqs, 6)
            ray_cluster.get(rank.train_step.remote(batch, norm))
            weights = ray_cluster.get(rank.gather_weights.remote())
            assert not any("lora" in n or "base_layer" in n for n, _ in weights)
            # the engine checks the names and shapes against its checkpoint
            assert ray_cluster.get(worker.update_weights.remote(version, weights)) == version
            if before is not None:
                assert any(not np.array_equal(before[n].numpy(), t.numpy()) for n, t in weights)  # merged weights moved
            before = dict(weights)
        ckpt = tmp_path / "ckpt"
        ray_cluster.get(rank.save_checkpoint.remote(str(ckpt)))
        with safe_open(str(ckpt / checkpoint.ADAPTER_DIR / "adapter_model.safetensors"), "pt") as f:
            adapters = {k: f.get_tensor(k) for k in f.keys()}
        assert adapters and all("lora_" in k for k in adapters)
        assert sum(t.numel() for t in adapters.values()) == n_adapter
        assert (ckpt / checkpoint.ADAPTER_DIR / "adapter_config.json").is_file()
        hf = ckpt / checkpoint.HF_DIR
        checkpoint.complete_policy(hf, tiny_model)
        plain = AutoModelForCausalLM.from_pretrained(hf)
        for name, t in plain.named_parameters():
            np.testing.assert_allclose(t.detach().numpy(), before[name].numpy(), rtol=0, atol=0, err_msg=name)
        served = ray_cluster.remote(num_cpus=1)(RolloutWorker).remote(
            RolloutConfig(max_new_tokens=6), str(hf), 1, str(tmp_path)
        )
        groups = ray_cluster.get(served.generate.remote(reqs[:1])).groups
        groups[0].rewards = np.zeros(groups[0].size, np.float32)
        batch = build_batch(groups, LossConfig(), pad_id=tok.pad_token_id)
        merged = _merged_logprobs(before, tiny_model, batch)
        assert np.abs((merged - batch.behav_logprobs) * batch.mask).max() < 1e-4
    finally:
        for actor in (rank, worker, served):
            if actor is not None:
                ray_cluster.kill(actor)
