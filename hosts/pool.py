"""The host's threads: a fixed set per driver, started at LOAD, taking turns at the channel.

Each driver has its own pool, so a driver that blocks holds up only its own requests, and no
thread is created per request (thread creation is bounded by the host's limits; a request must
not be what reaches them).

Leader/follower: one thread at a time -- the *leader* -- receives on the channel.  A leader that
receives a request for its own driver first passes the leadership on to an idle thread (a lock
release) and then runs the request itself, so the common request costs no hand-over between
threads.  A request for another driver goes to an idle thread of that driver, or to its backlog
when all of them are busy; a slow driver therefore never holds up the others.  The main thread
belongs to no driver and is always idle when it does not lead, so there is always somebody to
lead: a KREPLY always finds a receiver while the thread that waits for it sits in driver code.

Threads of a driver lead only while it is loaded and not being unloaded (``leads``), so that a
pool being stopped is never the one blocked in a receive: its threads end as soon as they are
told to, not at the next frame.  Jobs never raise: each is a closure that replies on its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

DEFAULT_THREADS = 4
MAX_THREADS = 16

_LEAD = "lead"      # the task that makes a thread the leader
_STOP = "stop"      # the task that ends an idle thread of a stopped pool
_EXIT = "exit"      # the task that ends the main thread's serving (the host ends)


class Member:
    """One thread of the crew: where it is woken, and what it is woken for."""

    __slots__ = ("pool", "wake", "task")

    def __init__(self, pool: WorkerPool | None):
        self.pool = pool
        # A bare lock, taken at birth and released once per task: the cheapest wake-up between
        # two Python threads (an Event costs a Condition and a second lock).
        self.wake = threading.Lock()
        self.wake.acquire()
        self.task = None

    def give(self, task) -> None:
        self.task = task
        self.wake.release()

    def take(self):
        self.wake.acquire()
        task, self.task = self.task, None
        return task


class Crew:
    """Every thread of one host that may lead, and the rules by which the leadership passes.

    ``lead(member) -> job | None`` is the host's receive loop.  It returns a job for the
    member's own pool after the member has passed the leadership on (``pass_lead``), or None
    when the member no longer leads (passed on with nothing to do, or the host ended).
    """

    def __init__(self, lead: Callable[[Member], Callable[[], None] | None]):
        self._lead = lead
        self._mutex = threading.Lock()
        self._pools: list[WorkerPool] = []
        self.main = Member(None)
        self.ended = False

    # -- the main thread ---------------------------------------------------------------------

    def serve(self) -> None:
        """Run on the main thread: lead first (nobody else exists yet), then whenever told to;
        return once the host has ended."""
        me = self.main
        while not self.ended:
            self._lead(me)
            if self.ended:
                return
            if me.take() == _EXIT:
                return

    def end(self, me: Member) -> None:
        """Called by the leader that saw the end of the channel.  Nobody leads after it; the main
        thread, idle unless it is this leader, is woken to return."""
        with self._mutex:
            self.ended = True
        if me is not self.main:
            self.main.give(_EXIT)

    # -- passing the leadership ----------------------------------------------------------------

    def pass_lead(self, me: Member) -> bool:
        """Make an idle thread the leader instead of ``me``: one of ``me``'s pool if it may lead,
        else one of another pool that may, else the main thread (never for the main thread
        itself: it keeps leading when no worker is idle).  True if the leadership passed."""
        with self._mutex:
            successor = None
            if me.pool is not None and me.pool.leads and me.pool.idle:
                successor = me.pool.idle.pop()
            else:
                for pool in self._pools:
                    if pool.leads and pool.idle:
                        successor = pool.idle.pop()
                        break
            if successor is None:
                if me is self.main:
                    return False
                successor = self.main
        successor.give(_LEAD)
        return True

    def may_hand_off(self, me: Member) -> bool:
        """Whether ``me`` should stop leading now: a worker whose pool may no longer lead, or
        the main thread while a worker is idle and may."""
        with self._mutex:
            if me.pool is not None:
                return not me.pool.leads
            return any(pool.leads and pool.idle for pool in self._pools)

    # -- jobs --------------------------------------------------------------------------------

    def give(self, pool: WorkerPool, job: Callable[[], None]) -> None:
        """Run ``job`` on a thread of ``pool``: an idle one now, else the first to finish."""
        with self._mutex:
            if pool.idle:
                member = pool.idle.pop()
            else:
                pool.backlog.append(job)
                return
        member.give(job)

    def _enlist(self, pool: WorkerPool) -> None:
        with self._mutex:
            self._pools.append(pool)

    def set_leads(self, pool: WorkerPool, leads: bool) -> None:
        with self._mutex:
            pool.leads = leads and not pool.stopped

    def stop(self, pool: WorkerPool) -> None:
        """Each thread of ``pool`` ends after the jobs given to it before this call."""
        with self._mutex:
            pool.stopped = True
            pool.leads = False
            idle, pool.idle = pool.idle, []
            if pool in self._pools:
                self._pools.remove(pool)
        for member in idle:
            member.give(_STOP)

    def _work(self, pool: WorkerPool) -> None:
        me = Member(pool)
        while True:
            with self._mutex:
                if pool.backlog:
                    task = pool.backlog.popleft()
                elif pool.stopped or self.ended:
                    return
                else:
                    pool.idle.append(me)
                    task = None
            if task is None:
                task = me.take()
            if task == _STOP:
                return
            if task == _LEAD:
                task = self._lead(me)
                if task is None:
                    continue
            try:
                task()
            except BaseException:  # a job replies itself; nothing may end a worker early
                pass


class WorkerPool:
    """The fixed threads of one driver.  ``leads``: its idle threads may be made leader (set
    once the driver is loaded, cleared when it is unloaded)."""

    def __init__(self, crew: Crew, name: str, size: int = DEFAULT_THREADS):
        if not 1 <= size <= MAX_THREADS:
            raise ValueError(f"pool {name}: {size} threads, expected 1..{MAX_THREADS}")
        self.name = name
        self.crew = crew
        self.idle: list[Member] = []
        self.backlog: deque = deque()
        self.leads = False
        self.stopped = False
        crew._enlist(self)
        self._threads = [threading.Thread(target=crew._work, args=(self,), name=f"{name}-{i}", daemon=True)
                         for i in range(size)]
        try:
            for thread in self._threads:
                thread.start()
        except RuntimeError:
            self.stop()
            raise

    def submit(self, job: Callable[[], None]) -> None:
        self.crew.give(self, job)

    def stop(self) -> None:
        self.crew.stop(self)
