"""sandbox/output.py: a host's stdout/stderr become escaped, cut, rate-bound log lines."""

import logging
import os
import threading
import time

import pytest

from sandbox import output
from sandbox.output import HostOutput, printable


class Clock:
    """A clock the test moves by hand, so the rate bound is tested without timing."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_control_characters_are_escaped_one_host_line_one_log_line():
    lines = HostOutput("host group 1", clock=Clock()).feed(b"\x1b[2Jclear\r\tx\x7f\xc2\x9b\xff\n")
    assert lines == ["host group 1: \\x1b[2Jclear\\x0d\\x09x\\x7f\\x9b\\xff"]
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in lines[0])


def test_printable_keeps_text_and_escapes_every_c0_del_c1():
    assert printable("grüße ✓".encode()) == "grüße ✓"
    for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)):
        assert printable(chr(c).encode()) == f"\\x{c:02x}"


def test_a_forged_line_of_ours_is_prefixed_with_the_host():
    lines = HostOutput("host group 1", clock=Clock()).feed(b"ok\ndrvbox: stopping\n")
    assert lines == ["host group 1: ok", "host group 1: drvbox: stopping"]


def test_lines_split_across_reads_and_the_last_without_newline():
    out = HostOutput("h", clock=Clock())
    assert out.feed(b"one\ntw") == ["h: one"]
    assert out.feed(b"o\nthr") == ["h: two"]
    assert out.close() == ["h: thr"]


def test_a_long_line_is_cut_and_its_rest_dropped_up_to_the_newline():
    out = HostOutput("h", max_line=10, clock=Clock())
    assert out.feed(b"0123456789abc") == ["h: 0123456789 [line cut]"]
    assert out.feed(b"x" * 100_000) == []            # nothing buffered for a line without end
    assert len(out._partial) == 0
    assert out.feed(b"yy\nnext\n") == ["h: next"]
    assert out.close() == []


def test_past_the_line_rate_lines_are_counted_and_dropped_with_one_summary():
    clock = Clock()
    out = HostOutput("host group 7", lines_per_s=5, clock=clock)
    logged = out.feed(b"".join(b"line %d\n" % i for i in range(100)))
    assert logged == [f"host group 7: line {i}" for i in range(5)]
    assert out.close() == ["... 95 lines from host group 7 dropped (more than 5 lines or 16384 bytes a second)"]


def test_after_a_second_lines_pass_again_and_the_drop_is_summarised_once():
    clock = Clock()
    out = HostOutput("h", lines_per_s=5, clock=clock)
    out.feed(b"x\n" * 20)
    assert out.feed(b"x\n" * 20) == []               # still the same instant: no summary line per read
    clock.now += 1.0
    logged = out.feed(b"y\n" * 20)
    assert logged == ["h: y"] * 5 + [
        "... 50 lines from h dropped (more than 5 lines or 16384 bytes a second)"]
    assert out.dropped_total == 50


def test_the_byte_budget_bounds_long_lines_too():
    clock = Clock()
    out = HostOutput("h", bytes_per_s=3000, clock=clock)
    logged = out.feed((b"z" * 1999 + b"\n") * 10)
    assert len(logged) == 1 and out.dropped_total == 9


def _fds():
    return set(os.listdir("/proc/self/fd"))


def test_the_reader_logs_drains_a_flood_ends_at_eof_and_closes_its_fd(caplog):
    caplog.set_level(logging.WARNING, logger="drvbox.host")
    before = _fds()
    r, w = output.pipe()
    started = time.monotonic()
    thread = output.start_reader("host group 3", r)
    # Far more than a pipe holds (64 KiB): the write returns only because the reader drains
    # even while it drops.
    flood = b"\x1b[2Jfake\n" + b"flood\n" * 200_000
    writer = threading.Thread(target=lambda: (os.write(w, b"first\n"), _write_all(w, flood), os.close(w)))
    writer.start()
    writer.join(60)
    assert not writer.is_alive(), "the host's write blocked: the reader stopped draining"
    thread.join(60)
    assert not thread.is_alive(), "the reader did not end at EOF"
    elapsed = time.monotonic() - started
    assert _fds() == before                         # the read end is closed: nothing leaks
    messages = [r.getMessage() for r in caplog.records if r.name == "drvbox.host"]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "drvbox.host")
    assert messages[0] == "host group 3: first"
    assert messages[1] == "host group 3: \\x1b[2Jfake"
    # Not a timing threshold: the bound the buckets promise for however long this took (a burst,
    # the refill, one summary a second and the last one).
    assert len(messages) <= output.LINES_PER_S * (1 + elapsed) + elapsed + 2
    assert messages[-1].startswith("... ") and messages[-1].endswith("dropped (more than 50 lines or 16384 bytes a second)")
    assert not any("\x1b" in m for m in messages)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def test_a_flood_that_stops_is_summarised_before_the_host_ends(caplog):
    caplog.set_level(logging.WARNING, logger="drvbox.host")
    r, w = output.pipe()
    thread = output.start_reader("host group 4", r)
    try:
        _write_all(w, b"x\n" * 10_000)
        deadline = time.monotonic() + 60        # a guard against a hang, not a threshold
        while time.monotonic() < deadline and not any(
                m.getMessage().startswith("... ") for m in caplog.records if m.name == "drvbox.host"):
            time.sleep(0.05)
        summaries = [m.getMessage() for m in caplog.records
                     if m.name == "drvbox.host" and m.getMessage().startswith("... ")]
        assert summaries and summaries[0].startswith("... ") and "lines from host group 4 dropped" in summaries[0]
    finally:
        os.close(w)
        thread.join(60)
    dropped = sum(int(m.getMessage().split()[1]) for m in caplog.records
                  if m.name == "drvbox.host" and m.getMessage().startswith("... "))
    logged = sum(1 for m in caplog.records if m.name == "drvbox.host" and m.getMessage() == "host group 4: x")
    assert logged + dropped == 10_000


@pytest.mark.needs_seccomp_notify
@pytest.mark.usefixtures("require_namespaces")
def test_a_real_hosts_traceback_is_logged_and_no_fd_is_left(caplog):
    """A real sandbox whose target fails (sandbox.probe:run without its fd: IndexError): the
    traceback the host prints reaches drvbox.host, prefixed; after close() the reader has ended
    and closed its end of the pipe, so restarts leak nothing."""
    from sandbox.spec import SandboxSpec, spawn
    caplog.set_level(logging.WARNING, logger="drvbox.host")
    before = _fds()
    for _ in range(2):     # a restart: the second sandbox must not find the first one's pipe open
        box = spawn(SandboxSpec(name="output-test", optional=frozenset({"cgroup"})), "sandbox.probe:run", {}, [])
        status = box.wait(timeout=120)     # a guard against a hang
        box.close()
        assert status.code == 1
        assert _fds() == before
    messages = [m.getMessage() for m in caplog.records if m.name == "drvbox.host"]
    assert messages.count("output-test: Traceback (most recent call last):") == 2, messages
    assert messages.count("output-test: IndexError: list index out of range") == 2, messages
    assert "drvbox-host-output output-test" not in [t.name for t in threading.enumerate()]
