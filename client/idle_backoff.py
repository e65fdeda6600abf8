"""Idle polls that back off: fast while there is work, slow after a while without any.

A SuperNode asks the SuperLink for work, and the warm executor asks its SuperNode for a task,
on a fixed short interval so that a round starts within a fraction of a second. On a host (or a
SuperLink) with many nodes and no run, those polls are all the load there is. ``IdleBackoff``
keeps the short interval while work arrived in the last ``after`` seconds, then doubles the wait
at every poll up to ``slow``, and is short again at the next piece of work. During a run, the
gaps between a node's rounds are far below ``after``, so a run's round overhead is unchanged;
the first message after a long idle spell waits at most ``slow``, as with Flower's own 3 s poll.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from logging import INFO

from flwr.supercore import log


class IdleBackoff:
    """The wait before the next poll, in seconds.

    ``fast`` (> 0) while ``work()`` was called less than ``after`` seconds ago (or since the
    start); then ``2 × fast``, ``4 × fast``, … at each ``next_wait()``, capped at ``slow``
    (≥ ``fast``). ``name`` prefixes the two log lines, one when the backoff starts and one when
    work makes it fast again. ``clock``: seconds, monotonic (``time.monotonic``; a fake in tests).
    """

    def __init__(self, fast: float, slow: float, after: float, name: str,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < fast <= slow:
            raise ValueError(f"idle backoff from {fast} s to {slow} s is not allowed; use 0 < fast <= slow")
        if after < 0:
            raise ValueError(f"idle backoff after {after} s is not allowed; use a number of seconds >= 0")
        self.fast, self.slow, self.after, self.name, self.clock = fast, slow, after, name, clock
        self.current = fast
        self.last_work = clock()

    def work(self) -> None:
        """Work arrived (a message, a task): poll fast again."""
        self.last_work = self.clock()
        if self.current != self.fast:
            log(INFO, "%s: work arrived; polling every %g s again", self.name, self.fast)
            self.current = self.fast

    def next_wait(self) -> float:
        """Seconds to wait before the next poll (see the class doc)."""
        if self.clock() - self.last_work < self.after or self.current >= self.slow:
            return self.current
        if self.current == self.fast:
            log(INFO, "%s: idle for %g s; polls back off from %g s to %g s", self.name, self.after, self.fast,
                self.slow)
        self.current = min(self.slow, 2 * self.current)
        return self.current


class PerThread:
    """An :class:`IdleBackoff` for each thread, made by ``make(thread name)`` at its first use.

    Several SuperNodes in one process (``client/node_group.py``) run Flower's loop, whose sleep and
    work hooks are module-wide (``client/supernode.py``), in a thread each: each node backs off on
    its own work, not on its neighbours'.
    """

    def __init__(self, make: Callable[[str], IdleBackoff]):
        self._make, self._local = make, threading.local()

    def _mine(self) -> IdleBackoff:
        if not hasattr(self._local, "backoff"):
            self._local.backoff = self._make(threading.current_thread().name)
        return self._local.backoff

    def work(self) -> None:
        self._mine().work()

    def next_wait(self) -> float:
        return self._mine().next_wait()
