"""Supervision primitives shared by the controller and the actors: deadlines that never lose a
cancel (:func:`with_deadline`), what counts as a dead or hung worker (:func:`is_worker_failure`),
and the fault-injection hook the actors expose as ``inject_fault`` (:class:`FaultPoint`, used by
the fault tests and ``scripts/soak.py``: it arms a hang of the actor's next call).

What the controller does when a worker dies or hangs is rlsys/controller/recovery.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional


def is_worker_failure(error: BaseException) -> bool:
    """A failure of the actor itself (died, unreachable, or past its deadline), as opposed to
    an exception raised by the work (which is a bug or bad input, and is not retried)."""
    import ray

    return isinstance(
        error, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, asyncio.TimeoutError, TimeoutError)
    )


async def with_deadline(ref, timeout_s: float):
    """Await an ObjectRef (or awaitable) for at most ``timeout_s`` (0: no deadline); past it,
    the call is cancelled (and has unwound) before ``asyncio.TimeoutError`` is raised.

    Not ``asyncio.wait_for``: before Python 3.12 it returns the answer when a cancel lands in
    the tick the answer arrives, so the cancel is lost, and a loop that polls an actor through
    it (the controller's scale loop pings the judge every control_poll_s) outlives the run's
    end, which waits for it forever."""
    call = asyncio.ensure_future(ref)
    try:
        done, _ = await asyncio.wait({call}, timeout=timeout_s if timeout_s > 0 else None)
    except asyncio.CancelledError:
        if call.done() and not call.cancelled():
            call.exception()  # retrieved: the caller is gone, nothing to report
        call.cancel()
        raise
    if not done:
        call.cancel()
        await asyncio.wait({call})  # let it unwind (release what it holds) first
        raise asyncio.TimeoutError(f"no answer within {timeout_s}s")
    return call.result()


def describe(error: BaseException) -> str:
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return "hung (no answer before its deadline)"
    return f"died ({type(error).__name__})"


class FaultPoint:
    """An armed fault of one actor (fault injection for tests and scripts/soak.py)."""

    KINDS = ("hang",)

    def __init__(self) -> None:
        self.hang_s = 0.0

    def arm(self, kind: str, seconds: float = 3600.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {self.KINDS}")
        self.hang_s = float(seconds)

    def hang_here(self) -> None:
        """Block the calling thread if a hang is armed (disarms it)."""
        s, self.hang_s = self.hang_s, 0.0
        if s > 0:
            time.sleep(s)

    @property
    def armed(self) -> Optional[str]:
        return "hang" if self.hang_s > 0 else None
