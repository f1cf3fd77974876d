"""A host's stdout and stderr are hostile too: a driver that writes terminal escapes, a forged
line of the Device Manager's and a flood to fd 2 reaches the Device Manager's log only escaped,
prefixed with its host's name and rate-bound, and the Device Manager goes on serving."""

from __future__ import annotations

import re
import time

import pytest

from adv_kit import ALLOW, DeviceManagerProcess, reg_driver, reg_group

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

ECHO = 0x00220000
NOISE = 0x00220044
FLOOD_LINES = 100_000     # ~1.3 MB: many times what a pipe holds, so it passes only if drained

# Written into a temporary directory at run time, like the hostile kit's driver.
NOISY_SOURCE = r'''
import os

from hosts import StreamDriver

ECHO = %(echo)d
NOISE = %(noise)d


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Driver(StreamDriver):
    def init(self, ctx):
        self.ctx = ctx

    def open(self, access, share):
        return {}

    def io_control(self, opened, code, inbuf, outbuf):
        if code == NOISE:
            _write_all(2, b"\x1b[2J\x1b]0;owned\x07")
            _write_all(2, b"\ndrvbox: stopping\n")
            _write_all(2, b"".join(b"flood %%06d\n" %% i for i in range(%(lines)d)))
        n = min(len(inbuf), len(outbuf))
        outbuf[:n] = inbuf[:n]
        return n
''' % {"echo": ECHO, "noise": NOISE, "lines": FLOOD_LINES}


@pytest.fixture
def noisy_dm(tmp_path):
    drivers = tmp_path / "untrusted-drivers"
    drivers.mkdir()
    (drivers / "noisy.py").write_text(NOISY_SOURCE)
    registry = reg_driver("Noisy", "NSY", "noisy.dll", group=1, extra=ALLOW) + reg_group(1)
    dm = DeviceManagerProcess(tmp_path, registry, driver_dirs=[drivers]).start()
    yield dm
    dm.stop()


def _wait_for(dm, pattern: str) -> str:
    deadline = time.monotonic() + 60        # a guard against a hang, not a threshold
    while time.monotonic() < deadline:
        log = dm.log()
        if re.search(pattern, log, re.M):
            return log
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in the Device Manager's log:\n{dm.log()[-3000:]}")


def test_a_drivers_stderr_reaches_the_log_escaped_prefixed_and_bounded(noisy_dm):
    noisy_dm.wait_state("NSY1:", "running")
    with noisy_dm.client() as c, c.open("NSY1:") as h:
        # The whole flood is written before io_control returns: the answer proves the Device
        # Manager drained the pipe even while it dropped lines.
        assert h.ioctl(NOISE, b"noisy", 5) == b"noisy"
        assert h.ioctl(ECHO, b"still here", 10) == b"still here"
    log = _wait_for(noisy_dm, r"^drvbox: WARNING drvbox\.host: \.\.\. \d+ lines from host group 1 dropped")
    raw = noisy_dm.log_path.read_bytes()
    assert b"\x1b" not in raw and b"\x07" not in raw
    assert "drvbox.host: host group 1: \\x1b[2J\\x1b]0;owned\\x07" in log, log[-3000:]
    forged = [line for line in log.splitlines() if "drvbox: stopping" in line]
    assert forged == ["drvbox: WARNING drvbox.host: host group 1: drvbox: stopping"], forged
    flood = [line for line in log.splitlines() if re.search(r"host group 1: flood \d{6}$", line)]
    dropped = sum(int(m) for m in re.findall(r"\.\.\. (\d+) lines from host group 1 dropped", log))
    assert 0 < len(flood) < FLOOD_LINES and dropped > 0, (len(flood), dropped)
    # It goes on serving, with the same host: the noise was not a reason to end it.
    with noisy_dm.client() as c, c.open("NSY1:") as h:
        assert h.ioctl(ECHO, b"after", 5) == b"after"
    assert noisy_dm.audit("host.crashed") == []
    assert noisy_dm.stop() == 0
    assert "drvbox: stopping" in noisy_dm.log().splitlines()
