"""Devices: what an application opens.  The same calls reach a driver in-process (kernel mode)
or in a sandboxed host (user mode); applications cannot tell them apart but by speed.

Every call is checked against the driver's policy here, in both modes, before anything is
copied: sizes against ``MaxIoSize`` (EMSGSIZE), IOCTL codes against ``IoctlAllow`` (EACCES).
Failures are raised as ``OSError(errno)``: the server turns them into the client's errno.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from hosts.wire import Op
from policy import decisions

log = logging.getLogger("drvbox.device")

MAX_CODES_REMEMBERED = 1024

# Device states, as `drvbox ls` reports them.
RUNNING, RESTARTING, QUARANTINED, REJECTED, STOPPED = "running", "restarting", "quarantined", "rejected", "stopped"


def _fail(code: int, message: str) -> OSError:
    return OSError(code, message)


@dataclass(frozen=True)
class OpenRef:
    """A handle's view of an open device: which host generation opened it, and the driver's id."""
    generation: int
    open_id: int


class Device:
    mode = "kernel"

    def __init__(self, entry, policy, module_path: str, audit):
        self.entry = entry
        self.name = entry.name
        self.key_path = entry.key_path
        self.policy = policy
        self.module_path = module_path
        self.audit = audit
        self.restarts = 0
        # Codes the policy allowed once, so allowed again: the policy document is immutable for
        # the life of this object.  Bounded, so that a client cycling through codes cannot grow it.
        self._codes_allowed: set[int] = set()

    # Checks shared by both modes: each returns only when the policy allows the call.
    def check_transfer(self, op: str, length: int) -> None:
        d = decisions.may_transfer(self.policy, op, length)
        if not d.allowed:
            self.audit.record("policy.denied", device=self.name, driver=self.entry.dll, group=self.entry.group,
                              detail={"op": op, "length": length, "reason": d.reason})
            raise _fail(errno.EMSGSIZE, d.reason)

    def check_ioctl(self, code: int, in_len: int, out_len: int) -> None:
        limit = self.policy.max_io_size
        if in_len <= limit and out_len <= limit and code in self._codes_allowed:
            return
        if in_len > limit or out_len > limit:
            for op, length in (("ioctl-in", in_len), ("ioctl-out", out_len)):
                if length > limit:
                    self.audit.record("policy.denied", device=self.name, driver=self.entry.dll, group=self.entry.group,
                                      detail={"op": "ioctl", "code": f"{code:#010x}", op: length,
                                              "reason": f"{length} bytes exceed MaxIoSize {limit}"})
                    raise _fail(errno.EMSGSIZE, f"buffer of {length} bytes exceeds MaxIoSize {limit}")
        d = decisions.may_ioctl(self.policy, code, in_len, out_len)
        if not d.allowed:
            self.audit.record("policy.denied", device=self.name, driver=self.entry.dll, group=self.entry.group,
                              detail={"op": "ioctl", "code": f"{code:#010x}", "reason": d.reason})
            raise _fail(errno.EACCES, d.reason)
        if len(self._codes_allowed) < MAX_CODES_REMEMBERED:
            self._codes_allowed.add(code)

    @property
    def state(self) -> str:
        return RUNNING


class KernelDevice(Device):
    """A trusted driver running in the Device Manager's own process: fastest, no isolation."""

    mode = "kernel"

    def __init__(self, entry, policy, module_path, audit, loaded):
        super().__init__(entry, policy, module_path, audit)
        self.loaded = loaded
        self._stopped = False

    @property
    def state(self) -> str:
        return STOPPED if self._stopped else RUNNING

    def _result(self, pair: tuple[int, int]) -> int:
        status, value = pair
        if status:
            raise _fail(status, f"{self.name} driver")
        return value

    def open(self, access: int, share: int) -> OpenRef:
        if self._stopped:
            raise _fail(errno.ENODEV, f"{self.name} is stopped")
        return OpenRef(0, self._result(self.loaded.open(access, share)))

    def close(self, ref: OpenRef) -> None:
        self._result(self.loaded.close(ref.open_id))

    def read(self, ref: OpenRef, out: memoryview) -> int:
        self.check_transfer("read", len(out))
        n = self._result(self.loaded.read(ref.open_id, out))
        return self._bounded(n, len(out), "read")

    def write(self, ref: OpenRef, data: memoryview) -> int:
        self.check_transfer("write", len(data))
        return self._bounded(self._result(self.loaded.write(ref.open_id, data.toreadonly())), len(data), "write")

    def seek(self, ref: OpenRef, offset: int, whence: int) -> int:
        return self._result(self.loaded.seek(ref.open_id, offset, whence))

    def ioctl(self, ref: OpenRef, code: int, inbuf: memoryview, outbuf: memoryview) -> int:
        self.check_ioctl(code, len(inbuf), len(outbuf))
        n = self._result(self.loaded.ioctl(ref.open_id, code, inbuf.toreadonly(), outbuf))
        return self._bounded(n, len(outbuf), "ioctl")

    def _bounded(self, n: int, limit: int, op: str) -> int:
        if not 0 <= n <= limit:
            raise _fail(errno.EIO, f"{self.name} {op} returned {n}, outside 0..{limit}")
        return n

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.loaded.unload()


class UserDevice(Device):
    """A driver in a sandboxed host of its process group; every call crosses the arena."""

    mode = "user"

    def __init__(self, entry, policy, module_path, audit, group=None):
        super().__init__(entry, policy, module_path, audit)
        self.group = group          # the HostGroup serving it now (it may move to a solo group)
        self.driver_id = 0          # its id inside the group's host

    @property
    def state(self) -> str:
        return self.group.state if self.group is not None else STOPPED

    def open(self, access: int, share: int) -> OpenRef:
        generation, open_id = self.group.request(self, Op.OPEN, (access, share), max_value=0xFFFFFFFF,
                                                 opening=True)
        return OpenRef(generation, open_id)

    def close(self, ref: OpenRef) -> None:
        try:
            self.group.request(self, Op.CLOSE, (ref.open_id,), max_value=0, ref=ref)
        except OSError as exc:
            # The host that held it is gone (stale, dying, quarantined): so is the open
            # instance, and the caller's handle is released all the same.
            if exc.errno not in (errno.ESTALE, errno.EIO, errno.ENODEV):
                raise

    def read(self, ref: OpenRef, out: memoryview) -> int:
        self.check_transfer("read", len(out))
        return self.group.transfer(self, ref, Op.READ, out=out)

    def write(self, ref: OpenRef, data: memoryview) -> int:
        self.check_transfer("write", len(data))
        return self.group.transfer(self, ref, Op.WRITE, data=data)

    def seek(self, ref: OpenRef, offset: int, whence: int) -> int:
        _, pos = self.group.request(self, Op.SEEK, (ref.open_id, offset, whence), max_value=2**63 - 1, ref=ref)
        return pos

    def ioctl(self, ref: OpenRef, code: int, inbuf: memoryview, outbuf: memoryview) -> int:
        self.check_ioctl(code, len(inbuf), len(outbuf))
        return self.group.transfer(self, ref, Op.IOCTL, code=code, data=inbuf, out=outbuf)
