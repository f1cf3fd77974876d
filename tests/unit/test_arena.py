"""The host arena: sealed, so a hostile host cannot shrink it under the Reflector."""

import errno
import os

import pytest

from reflector.arena import Arena


def test_arena_cannot_be_resized_by_whoever_holds_the_fd():
    arena = Arena("t", 10000, 2)
    try:
        assert arena.slot_size % os.sysconf("SC_PAGE_SIZE") == 0
        for size in (0, arena.size * 2):
            with pytest.raises(OSError) as exc:
                os.ftruncate(arena.fd, size)
            assert exc.value.errno == errno.EPERM
    finally:
        arena.close()


def test_slots_are_lent_and_returned():
    arena = Arena("t", 4096, 2)
    try:
        a, b = arena.acquire(0), arena.acquire(0)
        assert {a.offset, b.offset} == {0, arena.slot_size}
        assert arena.acquire(0.01) is None
        arena.release(a)
        assert arena.acquire(0).offset == a.offset
    finally:
        arena.close()


def test_close_wakes_waiters_with_nothing():
    arena = Arena("t", 4096, 1)
    arena.acquire(0)
    arena.close()
    assert arena.acquire(1) is None


def test_a_waiter_gets_the_slot_another_request_releases():
    import threading
    arena = Arena("t", 4096, 1)
    try:
        held = arena.acquire(0)
        got = []
        waiter = threading.Thread(target=lambda: got.append(arena.acquire(30)))
        waiter.start()
        while not arena._waiting and waiter.is_alive():    # until it waits (no sleep, no threshold)
            threading.Event().wait(0.001)
        arena.release(held)
        waiter.join()
        assert got == [held]
    finally:
        arena.close()


def test_a_close_wakes_a_blocked_waiter_with_nothing():
    import threading
    arena = Arena("t", 4096, 1)
    arena.acquire(0)
    got = []
    waiter = threading.Thread(target=lambda: got.append(arena.acquire(30)))
    waiter.start()
    while not arena._waiting and waiter.is_alive():
        threading.Event().wait(0.001)
    arena.close()
    waiter.join()
    assert got == [None]
