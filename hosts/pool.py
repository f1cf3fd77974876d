"""A fixed set of worker threads per driver, started at LOAD.

Each driver has its own pool, so a driver that blocks holds up only its own requests, and no
thread is created per request (thread creation is bounded by the host's limits; a request must
not be what reaches them).  Jobs never raise: each is a closure that replies on its own.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

DEFAULT_THREADS = 4
MAX_THREADS = 16


class WorkerPool:
    def __init__(self, name: str, size: int = DEFAULT_THREADS):
        if not 1 <= size <= MAX_THREADS:
            raise ValueError(f"pool {name}: {size} threads, expected 1..{MAX_THREADS}")
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        """Each thread ends after the jobs queued before this call."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # a job replies itself; nothing may end a worker early
                pass
