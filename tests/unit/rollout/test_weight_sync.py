"""Bucketed weight publication (rlsys.rollout.weight_sync): plan, pack and unpack, on CPU tensors.
The NCCL broadcast itself runs in tests/gpu (marked gpu) and scripts/gpu_check.py."""

import pytest
import torch

from rlsys.rollout.weight_sync import WeightMismatchError, check_plan, pack, plan_buckets, unpack


def _params():
    g = torch.Generator().manual_seed(0)
    return [
        ("embed.weight", torch.randn(10, 6, generator=g)),
        ("norm.weight", torch.randn(6, generator=g)),
        ("lm_head.weight", torch.randn(7, 6, generator=g)),
        ("odd", torch.randn(3, generator=g)),
    ]


def test_plan_respects_the_bucket_bound_and_keeps_order_and_alignment():
    named = _params()
    plan = plan_buckets([(n, "float32", t.shape) for n, t in named], max_bytes=256)
    assert [s.name for b in plan for s in b.slots] == [n for n, _ in named]
    for b in plan:
        assert all(s.offset % 16 == 0 for s in b.slots)
        assert b.nbytes <= 256 or len(b.slots) == 1  # only an oversized tensor exceeds the bound alone
        assert b.nbytes >= sum(s.nbytes for s in b.slots)
    assert [len(b.slots) for b in plan] == [1, 3]  # 240 B | 24 B (+8 pad) + 168 B (+8) + 12 B
    whole = plan_buckets([(n, "float32", t.shape) for n, t in named], max_bytes=1 << 20)
    assert len(whole) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_pack_unpack_round_trip_casts_to_the_plan_dtype(dtype):
    named = _params()
    plan = plan_buckets([(n, dtype, t.shape) for n, t in named], max_bytes=200)
    by = dict(named)
    for b in plan:
        buf = pack(b, [by[s.name] for s in b.slots])
        assert buf.dtype == torch.uint8 and buf.numel() == b.nbytes
        for name, view in unpack(b, buf):
            assert view.dtype == getattr(torch, dtype) and view.shape == by[name].shape
            assert torch.equal(view, by[name].to(view.dtype))


def test_bad_plans_and_buffers_are_refused():
    with pytest.raises(ValueError, match="dtype int64"):
        plan_buckets([("x", "int64", (3,))], 100)
    with pytest.raises(ValueError, match="twice"):
        plan_buckets([("x", "float32", (3,)), ("x", "float32", (3,))], 100)
    plan = plan_buckets([("a", "float32", (2, 3))], 100)
    with pytest.raises(ValueError, match="does not match"):
        pack(plan[0], [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="expected"):
        unpack(plan[0], torch.zeros(7, dtype=torch.uint8))


def test_plan_is_checked_against_the_engine_checkpoint_before_any_byte_moves():
    expected = {"a": (2, 3), "b": (4,)}
    check_plan(plan_buckets([("a", "bfloat16", (2, 3)), ("b", "bfloat16", (4,))], 64), expected)
    with pytest.raises(WeightMismatchError, match="shape mismatch"):
        check_plan(plan_buckets([("a", "bfloat16", (3, 2)), ("b", "bfloat16", (4,))], 64), expected)
    with pytest.raises(WeightMismatchError, match="missing"):
        check_plan(plan_buckets([("a", "bfloat16", (2, 3))], 64), expected)
