"""Held-out evaluation: greedy accuracy on the eval prompts, split over the rollout workers.

Accuracy is the share of prompts whose greedy completion the task's verifier accepts
(``verify_answer``). The prompts are sharded round-robin over the live workers; the shard of a
worker that is dead or past ``rollout.call_timeout_s`` goes to one that answered, so an
evaluation survives a worker failure (the worker itself is replaced by its rollout loop).
"""

from __future__ import annotations

import asyncio
import logging

from rlsys.scheduling.scheduler import Prompt
from rlsys.supervision import describe, is_worker_failure, with_deadline
from rlsys.tasks.arithmetic import verify_answer

log = logging.getLogger(__name__)


async def greedy_accuracy(workers: list, prompts: list[Prompt], call_timeout_s: float) -> float:
    shards = [prompts[i :: len(workers)] for i in range(len(workers))]

    def greedy(w, shard):
        return with_deadline(w.generate_greedy.remote([list(p.prompt_token_ids) for p in shard]), call_timeout_s)

    outs = await asyncio.gather(*[greedy(w, s) for w, s in zip(workers, shards)], return_exceptions=True)
    for o in outs:
        if isinstance(o, BaseException) and not is_worker_failure(o):
            raise o
    healthy = [w for w, o in zip(workers, outs) if not isinstance(o, BaseException)]
    for i, o in enumerate(outs):
        if isinstance(o, BaseException):
            if not healthy:
                raise RuntimeError("no rollout worker answered the evaluation") from o
            log.warning("evaluation: a rollout worker %s; its shard goes to another worker", describe(o))
            outs[i] = await greedy(healthy[0], shards[i])
    correct = sum(verify_answer(text, p.reference) for s, o in zip(shards, outs) for p, text in zip(s, o))
    return correct / max(len(prompts), 1)
