"""Partial rollouts on a real vLLM engine: a weight update that arrives mid-generate lands
between two segments, the rest of each unfinished completion is sampled by the new weights,
and every token's behaviour logprob is that of the version that sampled it. Against it,
wait-for-all (partial_chunk_tokens=0): the update waits for the whole call."""

import time

import numpy as np
import pytest
import torch
from helpers import build_char_chat_model
from helpers import hf_logprobs as _hf_logprobs

from rlsys.records import RolloutRequest
from rlsys.rollout.worker import RolloutConfig, RolloutWorker

pytestmark = pytest.mark.integration

PROMPTS = ["12+34=", "7+8=", "100+1=", "5+55="]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random-init char Llamas of one shape: near-uniform next-token distributions over ~100
    characters, so completions run long (the eos is 1 of ~100) and segments are many."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("partial_models")
    v0, v1 = build_char_chat_model(d / "v0", seed=0), build_char_chat_model(d / "v1", seed=1)
    hf = {v: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for v, p in ((0, v0), (1, v1))}
    weights_v1 = list(load_file(str(v1 / "model.safetensors")).items())
    return v0, hf, weights_v1, AutoTokenizer.from_pretrained(v0)


def _worker(ray_cluster, path, chunk, tmp_path):
    cfg = RolloutConfig(max_new_tokens=160, partial_chunk_tokens=chunk, num_cpus=1, seed=3)
    w = ray_cluster.remote(num_cpus=1, max_concurrency=2)(RolloutWorker).remote(cfg, str(path), 0, str(tmp_path))
    ray_cluster.get(w.ready.remote())
    return w


def _requests(tok):
    return [RolloutRequest(f"p{i}", p, tuple(tok(p)["input_ids"]), "0", 4) for i, p in enumerate(PROMPTS)]


def _update_during_generate(ray_cluster, w, tok, weights, wait_s):
    ref = w.generate.remote(_requests(tok))
    time.sleep(0.3)  # the call is under way (160 tokens in segments take seconds)
    assert ray_cluster.get(w.update_weights.remote(1, weights), timeout=120) == 1
    t_update = time.perf_counter()
    ready, _ = ray_cluster.wait([ref], timeout=wait_s)  # was the call's result there (soon) after the update?
    res = ray_cluster.get(ref, timeout=300)
    return res, t_update, time.perf_counter(), bool(ready)


def test_update_lands_between_segments_and_tokens_carry_their_version(ray_cluster, models, tmp_path):
    v0, hf, weights_v1, tok = models
    w = _worker(ray_cluster, v0, chunk=4, tmp_path=tmp_path)
    try:
        res, t_update, t_done, done_at_update = _update_during_generate(ray_cluster, w, tok, weights_v1, 0)
        assert not done_at_update, "the update should return while the generate call is still running"
        assert res.switched >= 1
        switched = checked = 0
        for g in res.groups:
            assert g.policy_version == 0  # the oldest version in the group
            spans = g.meta["version_spans"]
            assert len(spans) == g.size
            for c, sp in zip(g.completions, spans):
                assert sp[0] == [0, 0] and len(sp) <= 2, sp
                if len(sp) == 2:
                    switched += 1
                    assert sp[1][1] == 1 and sp[1][0] % 4 == 0, sp  # a segment boundary
                cut = sp[1][0] if len(sp) == 2 else len(c.token_ids)
                # each token's behaviour logprob is that of the weights that sampled it
                ref0 = _hf_logprobs(hf[0], g.prompt_token_ids, c.token_ids)
                ref1 = _hf_logprobs(hf[1], g.prompt_token_ids, c.token_ids)
                np.testing.assert_allclose(c.logprobs[:cut], ref0[:cut], atol=1e-4)
                np.testing.assert_allclose(c.logprobs[cut:], ref1[cut:], atol=1e-4)
                if 0 < cut < len(c.token_ids):
                    assert np.abs(ref0[cut:] - ref1[cut:]).max() > 1e-2  # the check can tell them apart
                    checked += 1
                assert len(c.token_ids) <= 160
                assert c.finish_reason in ("stop", "length")
        assert switched == res.switched and checked >= 1
        # the next call runs wholly under version 1
        after = ray_cluster.get(w.generate.remote(_requests(tok)[:1]))
        assert after.groups[0].policy_version == 1
        assert all(sp == [[0, 1]] for sp in after.groups[0].meta["version_spans"])
    finally:
        ray_cluster.kill(w)


def test_wait_for_all_update_waits_for_the_whole_call(ray_cluster, models, tmp_path):
    v0, hf, weights_v1, tok = models
    w = _worker(ray_cluster, v0, chunk=0, tmp_path=tmp_path)
    try:
        res, _, _, done_at_update = _update_during_generate(ray_cluster, w, tok, weights_v1, 2)
        assert done_at_update, "wait-for-all: the update returns only after the generate call"
        assert res.switched == 0
        g = res.groups[0]
        assert g.policy_version == 0 and "version_spans" not in g.meta
        np.testing.assert_allclose(
            g.completions[0].logprobs, _hf_logprobs(hf[0], g.prompt_token_ids, g.completions[0].token_ids), atol=1e-4
        )
    finally:
        ray_cluster.kill(w)


def test_carry_over_returns_every_group_once_whole_and_drains(ray_cluster, models, tmp_path):
    """Calls return the groups that are complete once the tail is thin; the rest continue in the
    next call (beside its new requests, across a weight update) and a drain finishes them."""
    v0, hf, weights_v1, tok = models
    cfg = RolloutConfig(max_new_tokens=160, partial_chunk_tokens=8, partial_carry_fraction=0.5, num_cpus=1, seed=5)
    w = ray_cluster.remote(num_cpus=1, max_concurrency=2)(RolloutWorker).remote(cfg, str(v0), 0, str(tmp_path))
    try:
        first = [RolloutRequest(f"a{i}", p, tuple(tok(p)["input_ids"]), "0", 4) for i, p in enumerate(PROMPTS)]
        second = [RolloutRequest(f"b{i}", p, tuple(tok(p)["input_ids"]), "0", 4) for i, p in enumerate(PROMPTS)]
        r1 = ray_cluster.get(w.generate.remote(first, carry=True))
        assert r1.carried >= 1 and len(r1.groups) + r1.carried == 4, (len(r1.groups), r1.carried)
        ray_cluster.get(w.update_weights.remote(1, weights_v1))
        r2 = ray_cluster.get(w.generate.remote(second, carry=True))
        r3 = ray_cluster.get(w.generate.remote([], carry=True, drain=True))
        assert r3.carried == 0
        groups = r1.groups + r2.groups + r3.groups
        assert sorted(g.prompt_id for g in groups) == sorted(r.prompt_id for r in first + second)
        carried_over_update = 0
        for g in groups:
            assert g.size == 4
            for c, sp in zip(g.completions, g.meta["version_spans"]):
                assert c.finish_reason == "stop" or len(c.token_ids) == 160
                assert g.policy_version == sp[0][1]
                cut = sp[1][0] if len(sp) == 2 else len(c.token_ids)
                model = hf[sp[0][1]]
                np.testing.assert_allclose(
                    c.logprobs[:cut], _hf_logprobs(model, g.prompt_token_ids, c.token_ids)[:cut], atol=1e-4
                )
                if len(sp) == 2:
                    assert sp == [[0, 0], [sp[1][0], 1]]
                    np.testing.assert_allclose(
                        c.logprobs[cut:], _hf_logprobs(hf[1], g.prompt_token_ids, c.token_ids)[cut:], atol=1e-4
                    )
                    carried_over_update += 1
            if g.prompt_id.startswith("b"):
                assert g.policy_version == 1
        assert carried_over_update >= 1  # first-call groups finished under version 1
        assert r1.num_tokens + r2.num_tokens + r3.num_tokens == sum(g.num_tokens for g in groups)
    finally:
        ray_cluster.kill(w)
