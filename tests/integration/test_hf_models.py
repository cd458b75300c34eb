"""Your model on your data: Hugging Face architectures with real tokenizer types, trained end to end.

Fixtures are built locally (rlsys/tasks/chatmodel.py): a Qwen2 model with a byte-level BPE
tokenizer and a ChatML template (a pad token, eos ``<|im_end|>`` and ``<|endoftext|>``), and a
Llama model with a Llama-3-style tokenizer (no pad token; the template writes the BOS; eos
``<|eot_id|>`` and ``<|end_of_text|>``). Each runs ``rlsys train`` as a user does (a process of
its own) on messages with a system prompt, read from JSONL, parquet and a ``save_to_disk``
directory: vLLM generation, reward (a function that takes ``prompt=`` and ``meta=`` and returns
extra scores), learner steps, weight sync, evaluation, the saved policy, ``rlsys export``, and a
reload of the exported policy in vLLM that generates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port as _free_port

pytestmark = pytest.mark.integration

RLSYS = str(Path(sys.executable).parent / "rlsys")
TESTS = Path(__file__).resolve().parents[1]


def user_env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(TESTS))
    return env


def rows(n: int) -> list[dict]:
    return [
        {
            "messages": [{"role": "user", "content": f"Ivan has {i} marbles. He buys 2 more. How many now?"}],
            "answer": str(i + 2),
            "level": i % 3,
            "split": "test" if i < 4 else "train",
        }
        for i in range(n)
    ]


def write(tmp_path: Path, fmt: str) -> Path:
    import datasets

    data = rows(24)
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        return path
    ds = datasets.Dataset.from_list(data)
    if fmt == "parquet":
        ds.to_parquet(str(tmp_path / "data.parquet"))
        return tmp_path / "data.parquet"
    path = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": ds.filter(lambda r: r["split"] == "train"), "test": ds.filter(lambda r: r["split"] == "test")}
    ).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    "arch, fmt",
    # save_to_disk is opt-in (--runslow): the same training path; tests/unit/data reads every format
    [("qwen2", "jsonl"), ("llama", "parquet"), pytest.param("qwen2", "save_to_disk", marks=pytest.mark.slow)],
    ids=["qwen2-chatml-jsonl", "llama3-nopad-parquet", "qwen2-save_to_disk"],
)
def test_train_a_hf_model_on_messages_then_export_and_reload(arch, fmt, tmp_path):
    from rlsys.tasks.chatmodel import ensure_fixture

    model = ensure_fixture(arch)
    data = write(tmp_path, fmt)
    run_root = tmp_path / "runs"
    ray_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # unix socket paths must stay short
    out = subprocess.run(
        [
            RLSYS, "train", f"model.path={model}", f"data.train_files={data}", "data.prompt_key=messages",
            "data.system_prompt=Answer with a number.", "reward.target=helpers.prompt_aware_reward",
            "steps=2", "scheduler.prompts_per_step=4", "scheduler.samples_per_prompt=4", "rollout.max_new_tokens=8",
            "eval.samples=2", f"run_root={run_root}", "max_train_seconds=0", f"cluster.temp_dir={ray_dir}",
        ],
        capture_output=True, text=True, timeout=400, env=user_env(),
    )  # fmt: skip
    shutil.rmtree(ray_dir, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = run_root.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["reward_failures"] == 0
    assert summary["data"] == {
        "train_prompts": 20, "eval_prompts": 4, "dropped_overlong": 0, "chat_template": True,
        "sources": summary["data"]["sources"],
    } and str(data) in summary["data"]["sources"][0]  # fmt: skip
    last = summary["curves"]["evaluations"][-1]
    assert last["k"] == 2 and 0 <= last["pass_at_k"] <= 1
    assert last["extra_scores"] == {"saw_prompt": 1.0, "saw_meta": 1.0}  # the reward saw the row
    log = (run / "train.log").read_text()
    assert "a training prompt as the policy sees it (chat template applied)" in log
    assert "Answer with a number." in log  # the system prompt is in what the policy sees
    assert "20 train / 4 eval prompts" in log

    exported = tmp_path / "exported"
    ex = subprocess.run([RLSYS, "export", str(run), str(exported)], capture_output=True, text=True, env=user_env())
    assert ex.returncode == 0, ex.stderr
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (exported / name).is_file(), name
    check_reload(exported, model)


def check_reload(exported: Path, base: Path) -> None:
    """The exported policy loads in transformers (tokenizer with its chat template, the base
    model's eos ids) and in vLLM, which generates from a chat-templated prompt."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.chat_template == AutoTokenizer.from_pretrained(base).chat_template
    eos = GenerationConfig.from_pretrained(exported).eos_token_id
    assert isinstance(eos, list) and len(eos) == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": "Ivan has 3 marbles."}], add_generation_prompt=True)
    code = f"""
import os, json
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model={str(exported)!r}, dtype="float32", enforce_eager=True, max_model_len=256, block_size=32,
          kv_cache_memory_bytes=1 << 26)
out = llm.generate([TokensPrompt(prompt_token_ids={list(_ids(prompt))!r})], SamplingParams(max_tokens=5, temperature=0))
print("GENERATED", json.dumps(list(out[0].outputs[0].token_ids)))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=user_env())
    assert "GENERATED" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
    assert len(json.loads(res.stdout.split("GENERATED", 1)[1])) >= 1


def _ids(prompt) -> list[int]:
    return list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_learner_logprobs_of_chat_templated_prompts_match_vllm(arch, ray_cluster, tmp_path):
    """Same tolerance as the tiny model's parity test: both sides see the same token ids, which
    are exactly what the tokenizer's own apply_chat_template produces."""
    from transformers import AutoTokenizer

    from rlsys.data.config import DataConfig
    from rlsys.data.prompts import build_prompts
    from rlsys.learner.batch import build_batch
    from rlsys.learner.config import LearnerConfig, LossConfig
    from rlsys.learner.rank import LearnerRank
    from rlsys.records import RolloutRequest
    from rlsys.rollout.worker import RolloutConfig, RolloutWorker
    from rlsys.tasks.chatmodel import ensure_fixture

    model = str(ensure_fixture(arch))
    tok = AutoTokenizer.from_pretrained(model)
    data = write(tmp_path, "jsonl")
    cfg = DataConfig(train_files=str(data), prompt_key="messages", system_prompt="Answer with a number.")
    prompts = build_prompts(cfg, tok, 200).train[:3]
    for p in prompts:
        conv = [{"role": "system", "content": "Answer with a number."}, *p.raw_prompt]
        assert list(p.prompt_token_ids) == _ids(tok.apply_chat_template(conv, add_generation_prompt=True))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    assert (tok.pad_token_id is None) == (arch == "llama")
    w = ray_cluster.remote(num_cpus=1)(RolloutWorker).remote(RolloutConfig(max_new_tokens=8), model, 0, str(tmp_path))
    rank = ray_cluster.remote(num_cpus=0.5)(LearnerRank).remote(LearnerConfig(), model, 0, 1, _free_port(), 1.0, 8)
    try:
        stop_ids = ray_cluster.get(w.__ray_call__.remote(lambda self: self.stop_ids))
        assert len(stop_ids) == 2 and tok.eos_token_id in stop_ids  # both of generation_config's eos ids
        reqs = [RolloutRequest(p.prompt_id, p.prompt, p.prompt_token_ids, p.reference, 4) for p in prompts]
        groups = ray_cluster.get(w.generate.remote(reqs)).groups
        assert [g.prompt_token_ids for g in groups] == [tuple(p.prompt_token_ids) for p in prompts]
        for g in groups:
            g.rewards = np.zeros(g.size, np.float32)
        batch = build_batch(groups, LossConfig(), pad_id=pad)
        lp = ray_cluster.get(rank.compute_logprobs.remote(batch))
        diff = np.abs((lp - batch.behav_logprobs) * batch.mask).max()
        assert diff < 1e-4, diff
    finally:
        ray_cluster.kill(w)
        ray_cluster.kill(rank)
