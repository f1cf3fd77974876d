"""``drvbox sandbox check``: confine a probe in a fresh sandbox and judge, mechanism by mechanism,
what the kernel says is in force (read back from inside) and what the probe could still do.

Each mechanism is judged from evidence, never from what was asked: a field of
/proc/self/status, a line of mountinfo, an errno the probe got, a report the supervisor received.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from dataclasses import dataclass, field

from sandbox import limits
from sandbox.errors import CGROUP_REMEDY, ConfinementError, errno_name
from sandbox.notify import SyscallReport, SyscallSupervisor
from sandbox.spec import SandboxSpec

PROBE_CHECKS = ["socket", "socketpair", "fork", "exec", "write_outside", "write_tmp", "thread",
                "proc_pids", "getuid"]
REQUIRED_NAMESPACES = ("pid", "net", "ipc", "uts", "cgroup", "mnt")


@dataclass
class Finding:
    mechanism: str
    ok: bool
    detail: str
    evidence: dict = field(default_factory=dict)


def cgroup_unavailable() -> str | None:
    """Why this process cannot give a host a cgroup with memory and pids limits; None if it can.

    Asked the only honest way: by making one (as spawn would, limits written) and removing it.
    A Device Manager started by a non-root user on a cgroup v1 or hybrid machine, or on v2
    without delegation, gets the reason here before any host fails on it."""
    from sandbox import cgroups
    try:
        group = cgroups.create("drvbox cgroup probe", 16, 4, frozenset())
    except ConfinementError as exc:
        why = exc.call
        if exc.errno is not None and exc.errno != errno.ENOTSUP:
            why += f": {errno_name(exc.errno)} ({os.strerror(exc.errno)})"
        return why
    group.remove()
    return None


def run(spec: SandboxSpec | None = None, *, cgroup_missing: str | None = None) -> tuple[list[Finding], dict]:
    """Spawn the probe, judge it; the findings and the raw read-back.  Raises ConfinementError
    if the sandbox cannot even be started.  ``cgroup_missing``: why the cgroup is missing when
    the caller knows (``cgroup_unavailable()``), quoted in the cgroup finding."""
    from sandbox.spawning import spawn
    spec = spec or SandboxSpec(name="drvbox sandbox check", memory_limit_mib=256)
    reports: list[SyscallReport] = []
    got_report = threading.Event()

    def on_report(report: SyscallReport) -> None:
        reports.append(report)
        got_report.set()

    ours, theirs = socket.socketpair()
    supervisor = SyscallSupervisor()
    supervisor.start()
    try:
        box = spawn(spec, "sandbox.probe:run", {"checks": PROBE_CHECKS}, [theirs.fileno()])
        theirs.close()
        try:
            if box.notify_fd is not None:
                supervisor.watch(box.notify_fd, on_report)
            probe = _read_all(ours)
            status = box.wait()
        finally:
            box.kill()
            box.wait()
            box.close()
    finally:
        theirs.close()
        ours.close()
        supervisor.stop()
    import json
    results = json.loads(probe) if probe else {}
    return judge(box.confinement, results, reports, spec, status, cgroup_missing=cgroup_missing), {
        "confinement": box.confinement, "probe": results,
        "reports": [r.__dict__ for r in reports], "exit": status.__dict__}


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def judge(conf: dict, probe: dict, reports: list[SyscallReport], spec: SandboxSpec, status, *,
          cgroup_missing: str | None = None) -> list[Finding]:
    st = conf.get("status", {})
    found: list[Finding] = []

    ns = conf.get("namespaces", {})
    wanted = REQUIRED_NAMESPACES + (("user",) if conf.get("userns") else ())
    missing = [n for n in wanted if not ns.get(n, {}).get("new")]
    found.append(Finding("namespaces", not missing,
                         f"new: {', '.join(n for n in ns if ns[n].get('new'))}"
                         + (f"; NOT new: {', '.join(missing)}" if missing else "")
                         + ("" if conf.get("userns") else "; user: none (root parent, unprivileged uid instead)"),
                         {"namespaces": ns}))

    uids = st.get("Uid", "0").split()
    gids = st.get("Gid", "0").split()
    groups = st.get("Groups", "").split()
    # Uid/Gid in /proc/self/status are as seen inside the host's user namespace (if any).
    ok = all(u != "0" for u in uids) and all(g != "0" for g in gids) and "0" not in groups
    found.append(Finding("identity", ok,
                         f"uid {uids} gid {gids} groups {groups or 'none'}; uid_map {' '.join(conf.get('uid_map', []))}",
                         {"Uid": uids, "Gid": gids, "Groups": groups}))

    caps = {k: st.get(k) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    caps_ok = all(v is not None and int(v, 16) == 0 for v in caps.values())
    locked = (conf.get("securebits", 0) & 0xAA) == 0xAA
    found.append(Finding("capabilities", caps_ok and locked,
                         " ".join(f"{k}={v}" for k, v in caps.items()) + f"; securebits {conf.get('securebits', 0):#x}"
                         + ("" if locked else " (NOT locked)"), caps))

    found.append(Finding("no_new_privs", st.get("NoNewPrivs") == "1", f"NoNewPrivs: {st.get('NoNewPrivs')}"))

    seccomp_mode = st.get("Seccomp")
    socket_errno = probe.get("socket")
    reported = sorted({r.syscall for r in reports})
    notify = conf.get("seccomp", {}).get("default") == "notify"
    ok = seccomp_mode == "2" and socket_errno == errno.EPERM and (not notify or "socket" in reported)
    found.append(Finding("seccomp", ok,
                         f"Seccomp: {seccomp_mode} (filters {st.get('Seccomp_filters')}), default "
                         f"{conf.get('seccomp', {}).get('default')}, {conf.get('seccomp', {}).get('allowed')} calls "
                         f"allowed; socket() -> {_errno(socket_errno)}; reported: {', '.join(reported) or 'nothing'}",
                         {"reported": reported}))

    processes_ok = (probe.get("fork") not in (0, None) and probe.get("exec") not in (0, None)
                    and probe.get("thread") == 0)
    found.append(Finding("processes", processes_ok,
                         f"fork -> {_errno(probe.get('fork'))}, exec -> {_errno(probe.get('exec'))}, "
                         f"thread -> {_errno(probe.get('thread'))}; visible pids {probe.get('proc_pids')}"))
    found.append(Finding("pid_view", probe.get("proc_pids") == [1] and conf.get("pid") == 1,
                         f"host is pid {conf.get('pid')}; /proc lists {probe.get('proc_pids')}"))

    mounts = conf.get("mounts", [])
    writable = [m["mount_point"] for m in mounts if "ro" not in m["options"].split(",")]
    proc = [m for m in mounts if m["mount_point"] == "/proc"]
    root = [m for m in mounts if m["mount_point"] == "/"]
    ok = (writable == ["/tmp"] and bool(proc) and "ro" in proc[0]["options"].split(",")
          and bool(root) and root[0]["fstype"] == "tmpfs" and probe.get("write_outside") == errno.EROFS
          and probe.get("write_tmp") == 0)
    found.append(Finding("mounts", ok,
                         f"{len(mounts)} mounts, writable: {writable}; root {root[0]['fstype'] if root else '?'} "
                         f"{root[0]['options'] if root else ''}; write / -> {_errno(probe.get('write_outside'))}, "
                         f"write /tmp -> {_errno(probe.get('write_tmp'))}",
                         {"mount_points": [m["mount_point"] for m in mounts]}))

    interfaces = conf.get("interfaces", [])
    found.append(Finding("network", interfaces in ([], ["lo"]) and probe.get("socketpair") not in (0, None),
                         f"interfaces {interfaces}; socketpair() -> {_errno(probe.get('socketpair'))}"))

    rl = conf.get("rlimits", {})
    expected = {"RLIMIT_NOFILE": spec.max_open_files, "RLIMIT_FSIZE": spec.max_file_size_mib << 20,
                "RLIMIT_CORE": 0}
    address_space = limits.address_space_mib(spec)
    if address_space is not None:
        expected["RLIMIT_AS"] = address_space << 20
    wrong = {k: rl.get(k) for k, v in expected.items() if rl.get(k) != [v, v]}
    found.append(Finding("rlimits", not wrong,
                         " ".join(f"{k[7:]}={rl.get(k, ['?'])[0]}" for k in sorted(rl)) + (f"; WRONG {wrong}" if wrong else ""),
                         {"rlimits": rl}))

    cg = conf.get("cgroup", {})
    if cg.get("missing"):
        # Missing is never ok, even when the spec accepted it: the memory and pids limits are
        # then only as good as their rlimit stand-ins, and the report must say so and how to fix it.
        stand_in = (f"memory limit {spec.memory_limit_mib} MiB enforced only as RLIMIT_AS "
                    f"{address_space} MiB" if spec.memory_limit_mib is not None and address_space is not None
                    else "no memory limit")
        threads = (f"threads bounded by RLIMIT_NPROC {spec.max_threads}" if conf.get("userns")
                   else "threads NOT bounded (no user namespace, so no per-host RLIMIT_NPROC)")
        found.append(Finding("cgroup", False,
                             f"missing: {cgroup_missing or 'the host got no cgroup'}; {stand_in}; {threads}; "
                             f"to fix: {CGROUP_REMEDY}", {"cgroup": cg, "why": cgroup_missing}))
        return found
    ok = "pids.max" in cg and (spec.memory_limit_mib is None or any(
        k in cg for k in ("memory.max", "memory.limit_in_bytes")))
    found.append(Finding("cgroup", ok,
                         f"v{cg.get('version')} " + " ".join(f"{k}={v}" for k, v in cg.items()
                                                             if k.startswith(("memory.", "pids.")))
                         + f"; inside {cg.get('inside')}", {"cgroup": cg}))
    return found


def _errno(value) -> str:
    if value is None:
        return "not run"
    if value == 0:
        return "succeeded"
    if isinstance(value, int):
        return errno.errorcode.get(value, str(value))
    return str(value)
