"""A hostile driver tries to leave its host: the file system, the process, the network.

Each attack runs inside a real sandboxed host of a real Device Manager and reports the errno it
got.  A pass says which layer refused: ``EPERM`` *and* a ``syscall.denied`` record naming the
call (the seccomp supervisor; the record is what tells it from the kernel's own EPERM), ``ENOENT``
from the mount view, ``EROFS`` from a read-only mount, ``ESRCH`` from the pid namespace.  Where an
allowed counterpart exists it runs too, so a pass cannot be a host that refuses everything.
"""

from __future__ import annotations

import errno
import os
import sys
import time

import pytest

from adv_kit import attack, denied_syscalls

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

GROUP = 1


@pytest.fixture(scope="module")
def hos(hostile_dm):
    with hostile_dm.client() as c, c.open("HOS1:") as h:
        yield h


def wait_denied(dm, names: set[str], timeout: float = 10) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = denied_syscalls(dm, GROUP) & names
        if seen:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no syscall.denied naming {sorted(names)} for group {GROUP}; "
                         f"denied so far: {sorted(denied_syscalls(dm, GROUP))}")


# -- the seccomp layer: EPERM, and the supervisor's record names the call -------------------------

SECCOMP_ATTACKS = [
    # (attack, arg, the system call(s) the audit record may name)
    ("mknod", None, {"mknodat", "mknod"}),
    ("mkfifo", None, {"mknodat", "mknod"}),
    ("symlink", None, {"symlink", "symlinkat"}),
    ("hardlink", None, {"link", "linkat"}),
    ("fork", None, {"clone"}),
    ("vfork", None, {"vfork"}),
    ("clone_process", None, {"clone"}),
    ("execve", None, {"execve"}),
    ("ptrace", None, {"ptrace"}),
    ("process_vm_writev", None, {"process_vm_writev"}),
    ("setuid", None, {"setuid"}),
    ("setgid", None, {"setgid"}),
    ("capset", None, {"capset"}),
    ("unshare", None, {"unshare"}),
    ("setns", None, {"setns"}),
    ("mount", None, {"mount"}),
    ("pivot_root", None, {"pivot_root"}),
    ("seccomp", None, {"seccomp"}),
    ("prctl_dumpable", None, {"prctl"}),
    ("prctl_securebits", None, {"prctl"}),
    ("personality", None, {"personality"}),
    ("io_uring_setup", None, {"io_uring_setup"}),
    ("userfaultfd", None, {"userfaultfd"}),
    ("bpf", None, {"bpf"}),
    ("keyctl", None, {"keyctl"}),
    ("perf_event_open", None, {"perf_event_open"}),
    ("open_by_handle_at", None, {"open_by_handle_at"}),
    ("socket", "inet", {"socket"}),
    ("socket", "inet6", {"socket"}),
    ("socket", "unix", {"socket"}),
    ("socket", "netlink", {"socket"}),
    ("socket", "packet", {"socket"}),
]


@pytest.mark.parametrize("name,arg,calls", SECCOMP_ATTACKS,
                         ids=[f"{a}-{b}" if b else a for a, b, _ in SECCOMP_ATTACKS])
def test_forbidden_call_is_refused_by_our_filter_and_audited(hostile_dm, hos, name, arg, calls):
    before = len(hostile_dm.audit("syscall.denied"))
    err, _ = attack(hos, name, arg)
    assert err == errno.EPERM, f"{name}: got {errno.errorcode.get(err, err)}, expected EPERM from seccomp"
    wait_denied(hostile_dm, calls)
    assert len(hostile_dm.audit("syscall.denied")) > before, "the refusal left no new syscall.denied record"


def test_connect_to_the_device_managers_socket_is_refused_by_our_filter(hostile_dm, hos):
    # The host cannot make a socket, so it tries its one socket, the channel, at the DM's path.
    err, _ = attack(hos, "connect_dm", str(hostile_dm.socket))
    assert err == errno.EPERM
    wait_denied(hostile_dm, {"connect"})


# -- the mount view -------------------------------------------------------------------------------

def test_etc_shadow_is_not_in_the_view(hos):
    assert attack(hos, "read_shadow") == (errno.ENOENT, 0)


def test_root_home_shows_only_the_python_install(hos):
    # The view binds the Python install; on this machine it lives under /root/.pyenv, so /root
    # shows exactly that one entry and none of root's files.
    real = os.path.realpath(sys.executable)
    on_path = 1 if real.startswith("/root/") else 0
    err, entries = attack(hos, "list_root")
    assert (err, entries) in ((0, on_path), (errno.ENOENT, 0)), (err, entries)
    for secret in (".bashrc", ".gitconfig", ".ssh/id_rsa", ".bash_history"):
        assert attack(hos, "read_path", "/root/" + secret) == (errno.ENOENT, 0), secret


def test_the_device_managers_state_dir_is_not_in_the_view(hostile_dm, hos):
    for secret in ("audit.log", "keys/audit.key", "serials.json"):
        path = hostile_dm.state / secret
        assert path.exists() or secret == "serials.json", f"{path} should exist outside the host"
        assert attack(hos, "read_path", str(path)) == (errno.ENOENT, 0), path


def test_driver_files_are_read_only_even_when_world_writable(hostile_dm, hos):
    # The module on the driver path is 0666 in a 0777 directory, but the host runs the pinned
    # copy the Device Manager made at acceptance (<state>/modules/<sha256>/, 0444) through a
    # read-only bind: the write is refused by the copy's mode (EACCES) before the mount (EROFS).
    drivers = hostile_dm.driver_dirs[0]
    assert os.stat(drivers / "hostile.py").st_mode & 0o777 == 0o666
    before = (drivers / "hostile.py").read_bytes()
    err, _ = attack(hos, "write_own_file")
    assert err in (errno.EACCES, errno.EROFS), errno.errorcode.get(err, err)
    # A new file next to it: the view holds the module, not a writable copy of the directory
    # (the directory inside is the view's own: root-owned 0755 without a user namespace, and
    # bound read-only over itself in any case, see sandbox/mounts.py), so EACCES or EROFS.
    err, _ = attack(hos, "write_own_dir")
    assert err in (errno.EACCES, errno.EROFS), errno.errorcode.get(err, err)
    assert not (drivers / "planted.py").exists()
    assert (drivers / "hostile.py").read_bytes() == before


def test_tmp_is_writable_the_allowed_side(hos):
    assert attack(hos, "write_tmp") == (0, 0)


def test_proc_1_root_is_the_hosts_own_view(hos):
    # pid 1 of the host's pid namespace is inside the host: /proc/1/root is its own root.
    assert attack(hos, "proc1_root_list") == (0, 1)
    assert attack(hos, "proc1_root_shadow") == (errno.ENOENT, 0)


def test_proc_self_mem_cannot_be_opened_for_writing(hos):
    # /proc is mounted read-only in the host: the open for writing fails before any write.
    assert attack(hos, "proc_self_mem") == (errno.EROFS, 0)


# -- the pid namespace ------------------------------------------------------------------------------

def _ppid(pid) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(_ppid(entry), []).append(int(entry))
            except OSError:
                continue
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def test_processes_outside_the_host_do_not_exist_for_it(hostile_dm, hos):
    with hostile_dm.client() as c:
        mine = {h["pid"] for h in c.devices()["hosts"] if "HOS1:" in h["devices"]}
    outside = {hostile_dm.proc.pid} | _descendants(hostile_dm.proc.pid)
    launchers = {_ppid(p) for p in mine}
    targets = (outside | launchers) - mine
    assert len(targets) >= 3, targets      # the DM, its reapers, the other groups' hosts
    for pid in sorted(targets):
        if pid > 1:
            assert attack(hos, "kill", pid) == (errno.ESRCH, 0), f"kill({pid}, 0) from inside"


def test_the_host_has_no_parent_it_can_see(hos):
    assert attack(hos, "getppid") == (0, 0)


def test_a_pid_inside_the_host_exists_the_allowed_side(hos):
    # kill is allowed (Python signals its own threads); pid 1 of its namespace is inside.
    assert attack(hos, "kill", 1) == (0, 0)


# -- the one socket a host has reaches only the Reflector -------------------------------------------

def test_sendto_an_abstract_address_goes_to_the_reflector_which_kills_the_host(hostile_dm):
    # sendto is allowed (the channel needs it); on a connected SOCK_SEQPACKET the kernel
    # ignores the address, so the bytes land in the Reflector, which reads a 1-byte frame.
    # The request itself came on a lane and is answered there: it may be answered before the
    # reader has read the stray frame (and killed the host), or fail with EIO after.
    with hostile_dm.client() as c, c.open("HOS1:") as h:
        try:
            attack(h, "sendto_abstract", "\0drvbox-adversarial")
        except OSError as exc:
            assert exc.errno == errno.EIO
    recs = hostile_dm.wait_audit("protocol.violation", group=GROUP)
    assert any("shorter than" in r["detail"]["reason"] for r in recs), recs
    hostile_dm.wait_state("HOS1:", "running")
