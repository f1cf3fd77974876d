"""A process group: the drivers that share one host, and that host's life.

A group starts its host in a sandbox, loads its drivers into it, forwards requests, and when the
host dies (crash, kill, timeout, violation) fails what was in flight, audits it, and restarts it
with exponential back-off -- unless it failed more than ``RestartLimit`` times within
``RestartWindow`` seconds, in which case its drivers are quarantined until ``drvbox restart``.

A pooled driver that is alone in flight at two crashes of its shared host is moved into a host
of its own (as UMDF does), so that the other drivers of the group stop paying for it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from hosts.wire import Op
from reflector.arena import Arena
from reflector.devices import QUARANTINED, RESTARTING, RUNNING, STOPPED, OpenRef, UserDevice
from reflector.hostchannel import HostChannel, HostGone, _TokenBucket
from sandbox.output import escape_controls

log = logging.getLogger("drvbox.group")

STARTING = "starting"
SLOTS_PER_HOST = 8                 # requests in flight at once per host
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 5.0
BLAMES_BEFORE_SPLIT = 2
_READ, _WRITE = Op.READ, Op.WRITE
SYSCALL_REPORTS_PER_S = 100          # denied system calls audited per host per second before it is killed


def _backoff(failures: int) -> float:
    """Seconds to wait before restart number ``failures`` of the window: the first at once."""
    if failures <= 1:
        return 0.0
    return min(BACKOFF_FIRST_S * 2 ** (failures - 2), BACKOFF_MAX_S)


def _fail(code: int, message: str) -> OSError:
    return OSError(code, message)


def _registry_json(key) -> dict:
    """The driver key's values as the host's LOAD expects them (bytes as hex)."""
    out = {}
    for v in key.values() if key is not None else ():
        data = v.data
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).hex()
        elif isinstance(data, tuple):
            data = list(data)
        out[v.name] = {"type": v.type, "data": data}
    return out


class HostGroup:
    def __init__(self, gid: int, settings, devices: list[UserDevice], *, hive, audit, supervisor,
                 kernel_ops, sandbox_options: dict, on_split: Callable | None = None, solo: bool = False):
        self.gid = gid
        self.settings = settings
        self.devices = list(devices)
        for d in self.devices:
            d.group = self
        self.hive = hive
        self.audit = audit
        self.supervisor = supervisor
        self.kernel_ops = kernel_ops
        self.sandbox_options = sandbox_options
        self.on_split = on_split
        self.solo = solo
        self.state = STOPPED
        self.generation = 0
        self.channel: HostChannel | None = None
        self.started_at = 0.0
        self.restarts = 0
        self._failures: deque[float] = deque()
        self._blame: dict[str, deque[float]] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._timer: threading.Timer | None = None
        self._said_memory_fallback = False

    # -- numbers from the ProcGroup key ------------------------------------------------------

    @property
    def timeout_s(self) -> float:
        return self.settings.timeout_ms / 1000.0

    def _max_io(self) -> int:
        return max((d.policy.max_io_size for d in self.devices), default=4096)

    def _arena_slot_size(self) -> int:
        """One request's room in the arena: input and output of the largest MaxIoSize, plus the
        alignment between them."""
        return 2 * self._max_io() + 4096

    # -- starting a host ----------------------------------------------------------------------

    def _spec(self):
        from sandbox.spec import SandboxSpec
        paths = sorted({str(Path(d.module_path)) for d in self.devices})
        syscalls = sorted({s for d in self.devices for s in d.policy.syscalls})
        # ioctl is narrowed to the device nodes' listed requests when any node lists them.
        listed = [r for d in self.devices for node in d.policy.device_nodes for r in node.ioctls]
        # Drivers share the host: the strictest wish about violations holds for all of them.
        violation = "kill" if any(d.policy.syscall_violation == "kill" for d in self.devices) else "deny"
        opts = dict(self.sandbox_options)
        spec = SandboxSpec(
            name=f"host group {self.gid}" + (" (solo)" if self.solo else ""),
            readonly_paths=tuple(paths),
            memory_limit_mib=self.settings.memory_limit_mib,
            mapped_mib=self._mapped_mib(),
            max_threads=self.settings.max_threads or 32,
            max_open_files=self.settings.max_open_files or 64,
            extra_syscalls=tuple(syscalls),
            on_violation=violation,
            ioctl_ranges=tuple(sorted(set(map(tuple, listed)))) if listed else None,
            **opts,
        )
        if not self._said_memory_fallback:
            self._said_memory_fallback = True
            self._say_memory_fallback(spec)
        return spec

    def _mapped_mib(self) -> int:
        """What the Reflector maps into the host, in MiB rounded up: the arena (as start() makes
        it), and for each driver its DMA quota and its register windows.  RLIMIT_AS standing in
        for a missing cgroup leaves room for it (sandbox/limits.py address_space_mib)."""
        page = 4096
        total = Arena.footprint(self._arena_slot_size(), SLOTS_PER_HOST)
        for d in self.devices:
            total += d.policy.dma_quota + sum(w.length + page for w in d.policy.memory_windows)
        return -(-total // (1 << 20))

    def _say_memory_fallback(self, spec) -> None:
        """Once per group: when its MemoryLimit has no cgroup to enforce it here, say (log and
        audit) that RLIMIT_AS stands in for it -- address space, a looser bound than memory used."""
        from sandbox import limits
        from sandbox.check import cgroup_unavailable
        if spec.memory_limit_mib is None or "cgroup" not in spec.optional:
            return
        why = cgroup_unavailable()
        if why is None:
            return                  # the cgroup enforces it; RLIMIT_AS is only a backstop
        rlimit_as = limits.address_space_mib(spec)
        log.warning("group %d: MemoryLimit %d MiB is not enforced by a cgroup here (%s); its host gets "
                    "RLIMIT_AS %s MiB instead (address space, not memory used)", self.gid,
                    spec.memory_limit_mib, why, rlimit_as)
        self._record("host.limits", group=self.gid,
                     detail={"memory_limit_mib": spec.memory_limit_mib, "enforced_by": "RLIMIT_AS",
                             "rlimit_as_mib": rlimit_as, "cgroup": "missing", "why": why})

    def start(self) -> None:
        """Start a host and load every driver of the group into it.  Blocks until done."""
        from sandbox import spawn
        with self._cond:
            self.state = STARTING
        arena = Arena(f"group{self.gid}", self._arena_slot_size(), SLOTS_PER_HOST)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        t0 = time.monotonic()
        try:
            spec = self._spec()
            sandboxed = spawn(spec, "hosts.main:run",
                              {"arena_size": arena.size, "group": self.gid}, [theirs.fileno(), arena.fd])
        except BaseException:
            mine.close()
            arena.close()
            raise
        finally:
            theirs.close()
        channel = HostChannel(
            f"group {self.gid}", sandboxed, mine, arena,
            on_kernel_call=self._kernel_call, on_violation=self._violation, on_log=self._driver_log,
            on_exit=self._host_exited, known_drivers=lambda: {d.driver_id for d in self.devices},
            on_dead=self._host_dead)
        try:
            channel.wait_ready()
            if sandboxed.notify_fd is not None and self.supervisor is not None:
                self.supervisor.watch(sandboxed.notify_fd, _SyscallReports(self, sandboxed), action=spec.on_violation,
                                      kill=sandboxed.kill)
            for i, device in enumerate(self.devices, start=1):
                device.driver_id = i
                tail = json.dumps({"name": device.name, "key": device.key_path, "module": device.module_path,
                                   "registry": _registry_json(self.hive.key(device.key_path))}).encode()
                status, _ = channel.call(Op.LOAD, i, (), max_value=0, timeout=max(self.timeout_s, 10.0), tail=tail)
                if status:
                    raise HostGone(f"driver {device.name} failed to load: {os.strerror(status)}")
            with self._cond:
                if not channel.alive:
                    raise HostGone(f"group {self.gid}: the host died while loading its drivers")
                channel.adopted = True
                self.channel = channel
                self.started_at = time.monotonic()
                self.state = RUNNING
                self._cond.notify_all()
        except BaseException:
            channel.abandon()
            raise
        self.audit.record("host.started", group=self.gid, pid=sandboxed.inner_pid,
                          detail={"devices": [d.name for d in self.devices], "pid": sandboxed.pid,
                                  "start_ms": round((time.monotonic() - t0) * 1000, 1),
                                  "confinement": _confinement_summary(getattr(sandboxed, "confinement", None))})
        log.info("group %d: host pid %d serving %s", self.gid, sandboxed.inner_pid, ", ".join(d.name for d in self.devices))

    # -- requests --------------------------------------------------------------------------------

    def _current(self, opening: bool, ref: OpenRef | None) -> tuple[HostChannel, int]:
        # Fast path, without the Condition: a running host whose channel is the same object
        # before and after reading the generation.  _host_dead clears the channel before it
        # bumps the generation, so the pair read here is one that held together; anything else
        # (starting, restarting, a handle of an older host) takes the locked path below.
        channel = self.channel
        if channel is not None and not opening and self.state == RUNNING:
            generation = self.generation
            if self.channel is channel and (ref is None or ref.generation == generation):
                return channel, generation
        with self._cond:
            if opening and self.state in (STARTING, RESTARTING, STOPPED) and not self._stopping:
                self._cond.wait_for(lambda: self.state not in (STARTING, RESTARTING, STOPPED), self.timeout_s)
            if self.state == QUARANTINED:
                raise _fail(errno.ENODEV, f"process group {self.gid} is quarantined; `drvbox restart DEV` lifts it")
            if ref is not None and ref.generation != self.generation:
                raise _fail(errno.ESTALE, "the handle was opened before its host was restarted; open the device again")
            if self.state != RUNNING or self.channel is None:
                raise _fail(errno.EIO if self.state == RESTARTING else errno.ENODEV,
                            f"process group {self.gid} is {self.state}")
            return self.channel, self.generation

    def _call(self, channel: HostChannel, device, op: Op, fields: tuple, max_value: int) -> int:
        timeout = self.settings.timeout_ms / 1000.0
        try:
            status, value = channel.call(op, device.driver_id, fields, max_value=max_value, timeout=timeout)
        except TimeoutError:
            self.audit.record("host.timeout", device=device.name, driver=device.entry.dll, group=self.gid,
                              pid=channel.sandboxed.inner_pid,
                              detail={"op": op.name, "timeout_ms": self.settings.timeout_ms})
            channel.blame(device.driver_id)
            channel.kill()
            raise _fail(errno.ETIMEDOUT, f"{device.name} did not answer {op.name} within {self.settings.timeout_ms} ms")
        except HostGone:
            raise _fail(errno.EIO, f"the host of {device.name} failed during {op.name}")
        if status:
            raise OSError(status, f"from the {device.name} driver")
        return value

    def request(self, device, op: Op, fields: tuple, *, max_value: int, ref: OpenRef | None = None,
                opening: bool = False) -> tuple[int, int]:
        channel, generation = self._current(opening, ref)
        return generation, self._call(channel, device, op, fields, max_value)

    def transfer(self, device, ref: OpenRef, op: Op, *, code: int = 0, data: memoryview | None = None,
                 out: memoryview | None = None) -> int:
        """A request with buffers: input copied into a slot once, output copied out once."""
        channel, _ = self._current(False, ref)
        arena = channel.arena
        slot = arena.acquire(self.settings.timeout_ms / 1000.0)
        if slot is None:
            raise _fail(errno.ETIMEDOUT if channel.alive else errno.EIO, f"no free arena slot for {device.name}")
        try:
            in_len = len(data) if data is not None else 0
            out_len = len(out) if out is not None else 0
            in_off = slot.offset
            out_off = in_off + ((in_len + 63) & ~63)
            if out_off + out_len > in_off + slot.size:
                raise _fail(errno.EMSGSIZE, f"{in_len}+{out_len} bytes do not fit one arena slot")
            view = arena.view
            if in_len:
                view[in_off:in_off + in_len] = data
            if op == _READ:
                fields, limit = (ref.open_id, out_off, out_len), out_len
            elif op == _WRITE:
                fields, limit = (ref.open_id, in_off, in_len), in_len
            else:
                fields, limit = (ref.open_id, code, in_off, in_len, out_off, out_len), out_len
            n = self._call(channel, device, op, fields, limit)
            if out_len and n:
                out[:n] = view[out_off:out_off + n]
            return n
        except (ValueError, BufferError):        # the arena went away under us: the host died
            raise _fail(errno.EIO, f"the host of {device.name} failed during {op.name}")
        finally:
            arena.release(slot)

    # -- from the host ---------------------------------------------------------------------------

    def _device(self, driver_id: int):
        for d in self.devices:
            if d.driver_id == driver_id:
                return d
        return None

    def _kernel_call(self, channel, frame):
        return self.kernel_ops.handle(self, channel, self._device(frame.driver_id), frame)

    def _violation(self, kind: str, detail: dict) -> None:
        pid = self.channel.sandboxed.inner_pid if self.channel else None
        self.audit.record(kind, group=self.gid, pid=pid, detail=detail)
        log.warning("group %d: %s %s; killing its host", self.gid, kind, detail)

    def _driver_log(self, driver_id: int, level: int, message: str) -> None:
        device = self._device(driver_id)
        log.log(level if level in (10, 20, 30, 40, 50) else logging.INFO, "%s: %s",
                device.name if device else f"group {self.gid}", escape_controls(message[:2000]))

    def _syscall_denied(self, report, **extra) -> None:
        self.audit.record("syscall.denied", group=self.gid, pid=report.pid,
                          detail={"syscall": report.syscall, "nr": report.nr,
                                  "args": [f"{a:#x}" for a in report.args], "arch": report.arch, **extra})

    # -- the end of a host, and what comes after -------------------------------------------------

    def _host_dead(self, channel: HostChannel) -> None:
        """Called the moment the host's channel closes, before anyone in flight hears of it."""
        with self._cond:
            if self.channel is channel:
                self.channel = None
                self.generation += 1             # every handle opened on it is stale now
                self.state = STOPPED if self._stopping else RESTARTING
                self._cond.notify_all()

    def _host_exited(self, channel: HostChannel) -> None:
        status = channel.sandboxed.wait(timeout=5)
        # Everything the dead host held (mappings, DMA, interrupts, fds) goes back now: the
        # next host must ask again, and is checked again.
        released = self.kernel_ops.host_gone(channel)
        if released.get("drivers"):
            self._record("host.reclaimed", group=self.gid, pid=channel.sandboxed.inner_pid, detail=released)
        if self.supervisor is not None and channel.sandboxed.notify_fd is not None:
            self.supervisor.unwatch(channel.sandboxed.notify_fd)
        channel.arena.close()
        channel.sandboxed.close()
        if not channel.adopted:
            return                      # a start that failed: start() reports it
        with self._cond:
            if self._stopping:
                self.state = STOPPED
                self._cond.notify_all()
                return
        now = time.monotonic()
        detail = {"exit_code": status.code, "signal": status.signal, "killed_for": channel.killed_for,
                  "in_flight": sorted(d.name for d in map(self._device, channel.blamed_drivers) if d)}
        self.audit.record("host.crashed", group=self.gid, pid=channel.sandboxed.inner_pid, detail=detail)
        log.warning("group %d: host died %s", self.gid, detail)
        if self._maybe_split(channel, now):
            return
        self._failed(now, {})

    def _failed(self, now: float, why: dict) -> None:
        """Count one failure (a crash, or a start that failed) in the restart window; then restart
        with back-off, or quarantine the group's drivers once past RestartLimit."""
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.settings.restart_window_s:
            self._failures.popleft()
        quarantine = len(self._failures) > self.settings.restart_limit
        with self._cond:
            self.state = QUARANTINED if quarantine else RESTARTING
            self._cond.notify_all()
        if not quarantine:
            # Scheduled before anything else can fail (the audit log too may be out of fds).
            self._schedule_restart(_backoff(len(self._failures)))
            return
        log.error("group %d: %d failures in %ss: quarantined", self.gid, len(self._failures),
                  self.settings.restart_window_s)
        for d in self.devices:
            self._record("driver.quarantined", device=d.name, driver=d.entry.dll, group=self.gid,
                         detail={"failures": len(self._failures), "window_s": self.settings.restart_window_s, **why})

    def _maybe_split(self, channel: HostChannel, now: float) -> bool:
        """Move a pooled driver that keeps crashing its shared host into a host of its own."""
        if self.on_split is None or len(self.devices) < 2 or len(channel.blamed_drivers) != 1:
            return False
        culprit = self._device(next(iter(channel.blamed_drivers)))
        if culprit is None:
            return False
        times = self._blame.setdefault(culprit.name, deque())
        times.append(now)
        while times and now - times[0] > self.settings.restart_window_s:
            times.popleft()
        if len(times) < BLAMES_BEFORE_SPLIT:
            return False
        self.devices.remove(culprit)
        self._blame.pop(culprit.name, None)
        self.audit.record("host.restarted", device=culprit.name, group=self.gid,
                          detail={"reason": "moved into a host of its own after crashing its shared host",
                                  "crashes": len(times)})
        self.on_split(self, culprit)
        self._schedule_restart(BACKOFF_FIRST_S)
        return True

    def _schedule_restart(self, delay: float) -> None:
        timer = threading.Timer(delay, self._restart)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def launch(self) -> None:
        """First start of the group's host; a failure is retried like a crash."""
        self._restart(first=True)

    def _restart(self, first: bool = False) -> None:
        if self._stopping:
            return
        t0 = time.monotonic()
        try:
            self.start()
        except Exception as exc:            # a failed start counts as a failure like a crash
            log.error("group %d: restart failed: %s", self.gid, exc)
            self._failed(time.monotonic(), {"reason": "host could not be started", "error": str(exc)})
            self._record("host.crashed", group=self.gid, detail={"phase": "start", "error": str(exc)})
            return
        if first:
            return
        self.restarts += 1
        for d in self.devices:
            d.restarts += 1
        self.audit.record("host.restarted", group=self.gid, pid=self.channel.sandboxed.inner_pid if self.channel else None,
                          detail={"restarts": self.restarts, "ms": round((time.monotonic() - t0) * 1000, 1)})

    def _record(self, event: str, **fields) -> None:
        """Audit from a restart thread.  A failing audit log has already stopped the Device
        Manager (its on_failure: fail closed); here the thread only logs it and ends its work
        without a traceback."""
        try:
            self.audit.record(event, **fields)
        except Exception as exc:
            log.error("group %d: could not audit %s: %s", self.gid, event, exc)

    def restart_now(self) -> None:
        """`drvbox restart`: kill the host (if any) and start afresh; lifts a quarantine."""
        with self._cond:
            self._failures.clear()
            channel = self.channel
            quarantined_or_idle = self.state in (QUARANTINED, STOPPED)
            if quarantined_or_idle:
                self.state = RESTARTING
        if channel is not None:
            channel.kill()            # _host_exited schedules the restart
        elif quarantined_or_idle:
            self._restart()

    def stop(self) -> None:
        """Unload the drivers (pre_deinit/deinit in the host) and stop the host."""
        with self._cond:
            self._stopping = True
            channel = self.channel
            if self._timer:
                self._timer.cancel()
        if channel is None or not channel.alive:
            with self._cond:
                self.state = STOPPED
            return
        for d in self.devices:
            try:
                channel.call(Op.UNLOAD, d.driver_id, (), max_value=0, timeout=min(self.timeout_s, 5.0))
            except Exception as exc:      # a host that cannot unload is killed below all the same
                log.warning("group %d: unloading %s: %s", self.gid, d.name, exc)
        channel.send_oneway(Op.SHUTDOWN)
        try:
            channel.sandboxed.wait(timeout=3)
        except TimeoutError:             # a driver stuck in deinit: the host goes all the same
            channel.kill()
        with self._cond:
            self._cond.wait_for(lambda: self.state == STOPPED, 3)
            if self.state != STOPPED:
                channel.kill()
                self._cond.wait_for(lambda: self.state == STOPPED, 3)
        # The reader's last words (resources reclaimed, audited) come before the audit log closes.
        channel.join(5)

    def describe(self) -> dict:
        """The host as `drvbox ls` shows it.  ``pss`` is None when there is no host or its memory
        cannot be read (never a false 0); ``cgroup_memory`` what its memory cgroup is charged, when it
        has one (a group with a MemoryLimit, where a cgroup can be had)."""
        channel = self.channel
        # The host itself (what `kill -STOP` should reach, as in the audit records), not the
        # sandbox's reaper that waits for it outside its pid namespace (reaper_pid).
        return {"group": self.gid, "pid": channel.sandboxed.inner_pid if channel else None,
                "reaper_pid": channel.sandboxed.pid if channel else None, "state": self.state,
                "uptime": round(time.monotonic() - self.started_at, 3) if channel else 0,
                "pss": _pss(channel.sandboxed.inner_pid) if channel else None,
                "cgroup_memory": _cgroup_memory(channel.sandboxed.confinement) if channel else None,
                "lanes": channel.lanes() if channel else None,
                "devices": [d.name for d in self.devices], "solo": self.solo, "restarts": self.restarts}


class _SyscallReports:
    """Audits a host's denied system calls -- up to a rate.  Each report is an fsync'd, signed
    audit record, and the supervisor serves every host: a host that makes denied calls in a loop
    would flood the log and delay the others' reports, so past the rate it is killed instead."""

    def __init__(self, group: "HostGroup", sandboxed):
        self.group = group
        self.sandboxed = sandboxed
        self.bucket = _TokenBucket(SYSCALL_REPORTS_PER_S)
        self.flooded = False

    def __call__(self, report) -> None:
        if self.flooded:
            return
        if self.bucket.take():
            self.group._syscall_denied(report)
            return
        self.flooded = True
        self.group._syscall_denied(report, flood=f"more than {SYSCALL_REPORTS_PER_S} denied calls a second; host killed")
        self.sandboxed.kill()


def _confinement_summary(c: dict | None) -> dict | None:
    """What is in force in the host, read back from inside it, in a few words for the audit log
    (`drvbox sandbox check` shows all of it)."""
    if not isinstance(c, dict):
        return None
    status = c.get("status") or {}
    return {
        "uid": status.get("Uid"), "no_new_privs": status.get("NoNewPrivs"), "seccomp": status.get("Seccomp"),
        "cap_eff": status.get("CapEff"), "cap_bnd": status.get("CapBnd"),
        "namespaces": sorted(n for n, v in (c.get("namespaces") or {}).items() if isinstance(v, dict) and v.get("new")),
        "cgroup": (c.get("cgroup") or {}).get("version"),
        "syscalls_allowed": (c.get("seccomp") or {}).get("allowed"),
    }


def _pss(pid: int | None) -> int | None:
    """The host's proportional set size in bytes; None when it cannot be read.  A non-root Device
    Manager cannot: the host is non-dumpable and its memory belongs to the initial user namespace,
    so /proc/PID/smaps_rollup is closed to its parent (EACCES)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_memory(confinement: dict | None) -> int | None:
    """Bytes charged to the host's cgroup (memory.current on v2, memory.usage_in_bytes on v1):
    readable by its Device Manager even where the host's /proc files are not.  None without one."""
    cgroup = (confinement or {}).get("cgroup") or {}
    if cgroup.get("missing"):
        return None
    for d in cgroup.get("paths") or ():
        for name in ("memory.current", "memory.usage_in_bytes"):
            try:
                with open(os.path.join(d, name), "rb") as f:
                    return int(f.read())
            except (OSError, ValueError):
                continue
    return None
