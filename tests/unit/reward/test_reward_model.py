"""rlsys.reward.reward_model: encoding, preference data, the SNGP head, save/load, the cache, config checks."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from rlsys.reward import reward_model as rm
from rlsys.reward.config import RewardModelConfig
from rlsys.reward.reward_model import MISTAKE_KINDS, PairwiseRewardModel, PointwiseRewardModel, encode_pair
from rlsys.reward.routing import antisymmetrize, pair_scores
from rlsys.tasks.arithmetic import TaskConfig, load_task
from rlsys.tasks.preference_model import ensure_reward_model, pairwise_accuracy, preference_data, wrong_answers
from rlsys.tasks.tinymodel import build_tokenizer

TINY = dict(
    num_layers=1,
    hidden_size=64,
    num_heads=2,
    intermediate_size=128,
    max_position=32,
    rff_features=128,
    steps=800,
    pointwise_steps=50,
    batch_size=32,
)
TINY_TASK = TaskConfig(digits=2, num_train=1500, num_val=50, num_eval=50)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny build (both forms) shared by the tests that only read it."""
    cache = tmp_path_factory.mktemp("rm_cache")
    with torch.random.fork_rng(devices=[]):
        return ensure_reward_model(RewardModelConfig(cache_dir=str(cache), **TINY), TINY_TASK)


@pytest.fixture(scope="module")
def pairwise(built):
    return PairwiseRewardModel.load(built)


@pytest.fixture(scope="module")
def held_out():
    task = load_task(TINY_TASK)
    return preference_data(task.val + task.eval, 4, 0.0, seed=7)


# ----------------------------------------------------------------------------- encoding and data


def test_encode_pair_layout_uses_only_the_policy_tokens():
    tok = build_tokenizer()
    ids = encode_pair(tok, "12+34=", " 46 ", "47", 64)
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:]) == [*"12+34=46", "<eos>", *"47", "<eos>"]


def test_encode_pair_cuts_long_responses_and_rejects_unknown_characters():
    tok = build_tokenizer()
    ids = encode_pair(tok, "12+34=", "1" * 100, "2" * 100, 32)
    assert len(ids) <= 32 and ids[-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="cannot encode: 'x'"):
        encode_pair(tok, "12+34=", "4x6", "46", 64)
    with pytest.raises(ValueError, match="reward.model.max_position"):
        encode_pair(tok, "1" * 40 + "=", "1", "2", 32)


def test_wrong_answers_are_distinct_and_wrong():
    rng = random.Random(0)
    for a in range(0, 1000, 37):
        for b in (0, 5, 99, 999):
            answer = str(a + b)
            out = wrong_answers(f"{a}+{b}=", answer, 5, rng)
            texts = [t for _, t in out]
            assert len(texts) == len(set(texts)) >= 3
            assert answer not in texts and all(t.isdigit() for t in texts)
            assert {k for k, _ in out} <= set(MISTAKE_KINDS)


def test_preference_data_labels_and_noise():
    task = load_task(TaskConfig(digits=3, num_train=3000, num_val=10, num_eval=10))
    answers = {ex.prompt: ex.answer for ex in task.train}
    data = preference_data(task.train, 2, 0.1, seed=3)
    assert len(data) == 6000
    for p, a, b, clean in zip(data.prompts, data.a, data.b, data.clean_label):
        assert (a == answers[p]) != (b == answers[p])  # exactly one correct: no wrong-vs-wrong pairs
        assert clean == float(a == answers[p])
    assert 0.3 < data.clean_label.mean() < 0.7  # both orders
    assert 0.08 < np.mean(data.label != data.clean_label) < 0.12
    again = preference_data(task.train, 2, 0.1, seed=3)
    assert again.a == data.a and np.array_equal(again.label, data.label)


# ----------------------------------------------------------------------------- scoring API


def test_score_pairs_shapes_and_batching(pairwise, held_out):
    p, a, b = held_out.prompts[:37], held_out.a[:37], held_out.b[:37]
    logit, u = pairwise.score_pairs(p, a, b)
    assert logit.shape == u.shape == (37,) and logit.dtype == np.float64
    assert np.all(np.isfinite(logit)) and np.all(u >= 1.0)
    small_logit, small_u = pairwise.score_pairs(p, a, b, batch_size=5)
    np.testing.assert_allclose(small_logit, logit, atol=1e-5)
    np.testing.assert_allclose(small_u, u, atol=1e-7)
    pred = pairwise.predict_pairs(p, a, b)
    np.testing.assert_allclose(pred.uncertainty, np.sqrt(1 + pairwise.cfg.mean_field_factor * pred.variance))
    np.testing.assert_allclose(pred.adjusted_logit, pred.logit / pred.uncertainty)
    empty = pairwise.score_pairs([], [], [])
    assert empty[0].shape == empty[1].shape == (0,)
    with pytest.raises(ValueError, match="one entry per item"):
        pairwise.score_pairs(p, a, b[:-1])


def test_score_both_orders_feeds_the_router(pairwise, held_out):
    p, a, b = held_out.prompts[:60], held_out.a[:60], held_out.b[:60]
    both = pairwise.score_both_orders(p, a, b)
    l_ba, u_ba = pairwise.score_pairs(p, b, a)
    l_ab, u_ab = pairwise.score_pairs(p, a, b)
    np.testing.assert_allclose(both.logit_ij, l_ab, atol=1e-5)
    np.testing.assert_allclose(both.logit_ji, l_ba, atol=1e-5)
    np.testing.assert_allclose(both.uncertainty, (u_ab + u_ba) / 2, atol=1e-7)
    # antisymmetry-ish: swapping the responses mostly flips the preference
    assert np.corrcoef(both.logit_ij, -both.logit_ji)[0, 1] > 0.5
    # identical responses: both orders are the same input, so s = 0
    same = pairwise.score_both_orders(p[:3], a[:3], a[:3])
    np.testing.assert_allclose(antisymmetrize(same.logit_ij, same.logit_ji), 0.0, atol=1e-6)
    # three responses -> the router's three pairs (0,1), (0,2), (1,2)
    r = ["46", "47", "45"]
    g = pairwise.score_both_orders(["12+34="] * 3, [r[0], r[0], r[1]], [r[1], r[2], r[2]])
    scores = pair_scores(None, g.logit_ij, g.logit_ji, g.uncertainty)
    assert scores.S.shape == (3, 3)


def test_trained_model_beats_chance_on_held_out_pairs(pairwise, held_out):
    both = pairwise.score_both_orders(held_out.prompts, held_out.a, held_out.b)
    s = antisymmetrize(both.logit_ij, both.logit_ji)
    assert pairwise_accuracy(s, held_out.clean_label) > 0.6


def test_pointwise_scores(built, held_out):
    model = PointwiseRewardModel.load(built)
    scores = model.score(held_out.prompts[:20], held_out.a[:20])
    assert scores.shape == (20,) and np.all(np.isfinite(scores))
    np.testing.assert_allclose(model.score(held_out.prompts[:20], held_out.a[:20], batch_size=3), scores, atol=1e-5)


# ----------------------------------------------------------------------------- SNGP head


def test_spectral_norm_bound_holds(pairwise):
    head = pairwise.head
    c = head.bound
    assert head.spectral_norm_of_layer() <= c * 1.001
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(256, pairwise.cfg.hidden_size, generator=gen) * 3
    h2 = h + torch.randn(h.shape, generator=gen) * 0.5
    with torch.no_grad():
        g = c * head.proj(torch.tanh(h))
        g2 = c * head.proj(torch.tanh(h2))
    # the residual branch is c-Lipschitz, so z = h + g(h) keeps distances within [1-c, 1+c]
    assert torch.all((g - g2).norm(dim=1) <= c * (h - h2).norm(dim=1) * 1.001)


def test_precision_matrix_is_symmetric_positive_definite(pairwise):
    head = pairwise.head
    precision, covariance = head.precision, head.covariance
    assert precision.dtype == torch.float64 and precision.shape == (pairwise.cfg.rff_features,) * 2
    torch.testing.assert_close(precision, precision.T, rtol=0, atol=1e-9)
    assert torch.linalg.eigvalsh(precision).min() >= pairwise.cfg.ridge * (1 - 1e-9)
    assert head.num_seen.item() > 1000  # accumulated over the training pairs
    eye = torch.eye(precision.shape[0], dtype=torch.float64)
    torch.testing.assert_close(precision @ covariance, pairwise.cfg.ridge * eye, rtol=0, atol=1e-6)


def test_uncertainty_is_larger_out_of_distribution(pairwise, held_out):
    """Responses unlike any training pair (random strings of the alphabet, 7-digit numbers,
    empty answers, runs of '+='-signs) get a larger GP variance than held-out in-distribution
    pairs. Pooled over the families: one family alone is close for this tiny model."""
    var_in = pairwise.predict_pairs(held_out.prompts, held_out.a, held_out.b).variance
    rng = random.Random(0)
    prompts = held_out.prompts[:50]
    correct = [str(sum(map(int, p[:-1].split("+")))) for p in prompts]
    strings = ["".join(rng.choice("0123456789+=") for _ in range(rng.randint(5, 9))) for _ in prompts]
    long_numbers = [str(rng.randrange(10**6, 10**7)) for _ in prompts]
    families = [(strings, long_numbers), (long_numbers, correct), (correct, [""] * 50), (["=+=+="] * 50, correct)]
    var_ood = np.concatenate([pairwise.predict_pairs(prompts, a, b).variance for a, b in families])
    assert np.median(var_ood) > 1.5 * np.median(var_in)
    assert var_ood.mean() > var_in.mean()
    _, u_in = pairwise.score_pairs(held_out.prompts, held_out.a, held_out.b)
    assert np.all(u_in < np.sqrt(1 + pairwise.cfg.mean_field_factor))  # var <= |phi|^2 <= 1 (D random cosines)


# ----------------------------------------------------------------------------- save/load and cache


def test_save_load_round_trip_is_exact(pairwise, held_out, tmp_path):
    pairwise.save(tmp_path / "copy")
    again = PairwiseRewardModel.load(tmp_path / "copy")
    p, a, b = held_out.prompts[:50], held_out.a[:50], held_out.b[:50]
    before, after = pairwise.predict_pairs(p, a, b), again.predict_pairs(p, a, b)
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)
    state = torch.get_rng_state()
    PairwiseRewardModel.load(tmp_path / "copy")
    assert torch.equal(state, torch.get_rng_state())  # loading leaves the caller's RNG alone
    meta_path = tmp_path / "copy" / "reward_model.json"
    meta_path.write_text(meta_path.read_text().replace(f'"build_version": {rm.BUILD_VERSION}', '"build_version": 1'))
    with pytest.raises(ValueError, match="rebuild it"):
        PairwiseRewardModel.load(tmp_path / "copy")


def test_cache_returns_the_same_directory_and_builds_deterministically(built, tmp_path):
    cfg = RewardModelConfig(cache_dir=str(built.parent), **TINY)
    assert ensure_reward_model(cfg, TINY_TASK) == built
    assert (built / "DONE").is_file() and (built / "train_report.json").is_file()
    assert ensure_reward_model(dataclasses.replace(cfg, path=str(built)), TINY_TASK) == built
    other = ensure_reward_model(dataclasses.replace(cfg, cache_dir=str(tmp_path), pointwise_steps=0), TINY_TASK)
    assert other != built and not (other / "pointwise").exists()
    first = (built / "pairwise" / "model.safetensors").read_bytes()
    assert (other / "pairwise" / "model.safetensors").read_bytes() == first  # same config, same weights
    with pytest.raises(FileNotFoundError, match="reward.model.path"):
        ensure_reward_model(dataclasses.replace(cfg, path=str(tmp_path / "nowhere")), TINY_TASK)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, field",
    [
        ({"path": ""}, "path"),
        ({"num_layers": 0}, "num_layers"),
        ({"hidden_size": 100, "num_heads": 3}, "hidden_size"),
        ({"max_position": 8}, "max_position"),
        ({"rff_features": 0}, "rff_features"),
        ({"rff_lengthscale": 0.0}, "rff_lengthscale"),
        ({"spectral_norm_bound": 1.0}, "spectral_norm_bound"),
        ({"ridge": -1.0}, "ridge"),
        ({"mean_field_factor": float("nan")}, "mean_field_factor"),
        ({"aux_loss_weight": -0.5}, "aux_loss_weight"),
        ({"steps": 0}, "steps"),
        ({"pointwise_steps": -1}, "pointwise_steps"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"negatives_per_prompt": 0}, "negatives_per_prompt"),
        ({"label_noise": 0.5}, "label_noise"),
        ({"cache_dir": ""}, "cache_dir"),
    ],
)
def test_config_errors_name_the_key(override, field):
    with pytest.raises(ValueError, match=rf"reward\.model\.{field}"):
        RewardModelConfig(**override)
