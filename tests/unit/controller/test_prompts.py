"""The prompts a run trains on, and the id that pads its batches (rlsys/controller/inputs.py)."""

from __future__ import annotations

import json
import shutil

from rlsys.config import compose, to_run_config
from rlsys.controller.inputs import prompts_for


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tiny_model, tmp_path):
    """Llama-3-style tokenizers have no pad token: batches are padded with eos (masked out), not
    with None (which crashed the first learner step)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    tok_cfg = model / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    cfg.pop("pad_token", None)
    tok_cfg.write_text(json.dumps(cfg))
    run = to_run_config(compose([f"model.path={model}", "task.num_train=50", "task.num_eval=10", "task.num_val=10"]))
    path, pad_id, prompts = prompts_for(run)
    train, evals = prompts.train, prompts.eval
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token_id is None and pad_id == tok.eos_token_id is not None
    assert len(train) == 50 and len(evals) == 10

    _, default_pad, _ = prompts_for(to_run_config(compose([f"model.path={tiny_model}"])))
    assert default_pad == AutoTokenizer.from_pretrained(tiny_model).pad_token_id != pad_id
