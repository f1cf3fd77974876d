"""The host's threads: one crew that receives together, and a quota of threads per driver.

Receiving.  Every thread not running a request waits in ``epoll_wait`` on one epoll set -- the
channel, the lanes, and the crew's control eventfd -- each registered ``EPOLLONESHOT``: a frame
wakes exactly one thread, which reads it and re-arms the socket (so the next frame wakes the
next thread) before acting on it.  A request is then run by the thread that received it, at
once: no hand-over between threads on the common path.

Quotas.  Each driver may have at most ``size`` of its requests running at once (the ``threads``
of its LOAD).  A request beyond that waits in the driver's backlog, and the thread that finishes
one of that driver's requests takes the next.  The crew holds one thread more than all quotas
together (its first thread, plus ``size`` started at each LOAD and retired after its UNLOAD), so
some thread is always free to receive: a KREPLY always finds a receiver while the thread that
waits for it sits in driver code, and a slow driver holds up only requests of its own.

Control.  Work that no frame brings -- a job submitted from another thread, a thread to retire,
the end of the host -- is announced on the control eventfd; the thread it wakes takes one piece
and re-arms it, so several pieces wake several threads.  No thread is created per request.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable

DEFAULT_THREADS = 4
MAX_THREADS = 16

CONTROL = "control"     # what ``receive`` returns when the control eventfd woke the thread
_EXIT = "exit"
_ONESHOT_IN = select.EPOLLIN | select.EPOLLONESHOT


class Quota:
    """One driver's share of the crew: at most ``size`` of its jobs run at once."""

    __slots__ = ("name", "size", "running", "backlog", "stopped")

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self.running = 0
        self.backlog: deque = deque()
        self.stopped = False


class Crew:
    """The host's threads.  ``receive()`` is the host's: it waits for and handles one frame (or
    the control fd) and returns ``(quota, job)`` to run now, None (nothing to run), ``CONTROL``,
    or an int exit status (the channel ended)."""

    def __init__(self, receive: Callable[[], object], poller: select.epoll):
        self._receive = receive
        self._poller = poller
        self._mutex = threading.Lock()
        self._ready: deque = deque()          # (quota, job) submitted, its quota slot taken
        self._retire = 0                      # threads to end once idle (quotas stopped)
        self._ended = threading.Event()       # set under the mutex, with exit_status
        self.exit_status: int | None = None
        self.control = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        poller.register(self.control, _ONESHOT_IN)

    # -- threads -------------------------------------------------------------------------------

    def serve(self) -> int | None:
        """Start the crew's first thread and wait, on the main thread, until the host ends;
        returns the exit status.  The main thread does not receive: crew threads are alike and
        any of them may be the one a retirement ends, which the main thread must not be."""
        threading.Thread(target=self._loop, name="crew", daemon=True).start()
        self._ended.wait()
        return self.exit_status

    def add(self, name: str, size: int) -> Quota:
        """A quota of ``size`` for a driver being loaded, and ``size`` more threads for the crew.
        RuntimeError (nothing added) when the host's limits refuse the threads."""
        if not 1 <= size <= MAX_THREADS:
            raise ValueError(f"pool {name}: {size} threads, expected 1..{MAX_THREADS}")
        quota = Quota(name, size)
        started = 0
        try:
            for i in range(size):
                threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True).start()
                started += 1
        except RuntimeError:
            with self._mutex:
                self._retire += started
                self._signal()
            raise
        return quota

    def _loop(self) -> None:
        receive = self._receive
        while True:
            got = receive()
            if got is None:
                continue
            if got is CONTROL:
                task = self._on_control()
                if task is _EXIT:
                    return
                if task is not None:
                    self._drain(*task)
                continue
            if type(got) is tuple:
                self.run(*got)
                continue
            self.end(got)
            return

    # -- jobs ----------------------------------------------------------------------------------

    def run(self, quota: Quota, job: Callable[[], None]) -> None:
        """Run ``job`` on this thread now if ``quota`` allows, else queue it in its backlog."""
        with self._mutex:
            claimed = self._claim(quota, job)
        if claimed:
            self._drain(quota, job)

    def submit(self, quota: Quota, job: Callable[[], None]) -> None:
        """Run ``job`` on another thread (one woken for it), or queue it behind ``quota``'s."""
        with self._mutex:
            if self._claim(quota, job):
                self._ready.append((quota, job))
                self._signal()

    @staticmethod
    def _claim(quota: Quota, job: Callable[[], None]) -> bool:
        """With the mutex held: take one of ``quota``'s slots for ``job`` (True), or put ``job``
        in its backlog, for whoever finishes one of its jobs (False)."""
        if quota.running >= quota.size:
            quota.backlog.append(job)
            return False
        quota.running += 1
        return True

    def _drain(self, quota: Quota, job: Callable[[], None]) -> None:
        """Run ``job`` (its quota slot taken), then the quota's backlog; give the slot back."""
        while True:
            try:
                job()
            except BaseException:   # a job replies itself; nothing may end a crew thread early
                pass
            with self._mutex:
                if quota.backlog:
                    job = quota.backlog.popleft()
                    continue
                quota.running -= 1
                if quota.stopped and quota.running == 0:
                    self._retire_quota(quota)
                return

    def stop(self, quota: Quota) -> None:
        """The driver is unloaded: its jobs already given still run; after the last, its threads
        leave the crew."""
        with self._mutex:
            if quota.stopped:
                return
            quota.stopped = True
            if quota.running == 0 and not quota.backlog:
                self._retire_quota(quota)

    def _retire_quota(self, quota: Quota) -> None:
        # Only once nothing of the quota runs, so that the free-receiver margin always holds.
        if quota.size:
            self._retire += quota.size
            quota.size = 0
            self._signal()

    # -- the end -------------------------------------------------------------------------------

    def end(self, status: int) -> None:
        """The channel ended with ``status``: every idle crew thread returns and ``serve`` returns
        on the main thread; threads inside driver code are left to the process's exit."""
        with self._mutex:
            if not self._ended.is_set():
                self.exit_status = status
                self._ended.set()
            self._signal()

    # -- the control eventfd ---------------------------------------------------------------------

    def _signal(self) -> None:
        """Called with the mutex held: make the control fd readable (it is armed or about to be)."""
        os.eventfd_write(self.control, 1)

    def _on_control(self):
        """One piece of control work for the thread the control fd woke: ``_EXIT``, a ready
        ``(quota, job)``, or None.  Re-arms the fd; clears it only when nothing is left, so
        that every piece wakes a thread of its own."""
        with self._mutex:
            ended = self._ended.is_set()
            if ended:
                task = _EXIT
            elif self._retire:
                self._retire -= 1
                task = _EXIT
            elif self._ready:
                task = self._ready.popleft()
            else:
                task = None
            if not (ended or self._retire or self._ready):
                try:
                    os.eventfd_read(self.control)
                except BlockingIOError:
                    pass
            self._poller.modify(self.control, _ONESHOT_IN)
        return task
