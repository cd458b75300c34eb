"""The GPU check (scripts/gpu_check.py) on a small model: vLLM and DeepSpeed on the GPU, and
the GPU weight transports (cuda_ipc on a shared GPU; nccl when a second GPU is there) deliver
weights the engine then serves. Skipped on machines without a CUDA GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_small_model(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "--size",
            "small",
            "--prompts",
            "32",
            "--new-tokens",
            "64",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert not r["failures"]
    assert r["generation_tokens_per_s"] > 0 and r["learner_tokens_per_s"] > 0
    assert "cuda_ipc" in r["sync"]
    for t in r["sync"].values():
        assert t["logprob_gap"] < r["logprob_gap_before_sync"] / 5
    options = r["learner_options"]
    assert set(options) == {"bf16", "grad_ckpt", "zero3_offload", "lora", "packing", "token_budget"}
    assert all("error" not in v and v["tokens_per_s"] > 0 for v in options.values()), options
    assert options["grad_ckpt"]["peak_gpu_mb"] < options["bf16"]["peak_gpu_mb"]
    assert options["lora"]["peak_gpu_mb"] < options["bf16"]["peak_gpu_mb"]
