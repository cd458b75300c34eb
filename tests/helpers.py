"""Shared builders for tests (no Ray)."""

import uuid

import numpy as np

from rlsys.records import Completion, Group


def make_group(version=0, rewards=(1.0, 0.0), prompt=(1, 3, 4), completion_lens=None, prompt_id=None):
    lens = completion_lens or [2] * len(rewards)
    comps = [Completion(np.arange(5, 5 + n, dtype=np.int32) % 14 + 2, -np.ones(n, np.float32), "1", "stop")
             for n in lens]
    pid = prompt_id or f"p{uuid.uuid4().hex[:6]}"
    return Group(group_id=f"{pid}:{uuid.uuid4().hex[:8]}", prompt_id=pid, prompt="1+1=", prompt_token_ids=tuple(prompt),
                 reference="2", policy_version=version, completions=comps,
                 rewards=np.asarray(rewards, np.float32))


def flaky_reward(completion: str, reference: str) -> float:
    """A user reward function with a bug: raises whenever the completion contains a '7'."""
    if "7" in completion:
        raise ZeroDivisionError("user bug")
    return 1.0 if completion.strip() == reference.strip() else 0.0
