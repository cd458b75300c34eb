"""Which token ids end a completion (rlsys/rollout/engine.py: stop_token_ids)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from rlsys.rollout.engine import stop_token_ids


def test_every_eos_of_generation_config_then_config_then_tokenizer(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, 128001]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 128001}))
    assert stop_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=128008)) == [128009, 128001, 128008]


def test_a_model_without_generation_config_stops_at_the_tokenizers_eos(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": None}))
    assert stop_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=2)) == [2]
    assert stop_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=None)) == []
