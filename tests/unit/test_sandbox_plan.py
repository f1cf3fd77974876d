"""The parent-side plans: mount view, rlimits, namespaces, control messages."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from sandbox import control, limits, mounts, namespaces
from sandbox.spec import SandboxSpec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plan(readonly=(), target="hosts.main"):
    return mounts.plan(readonly, target, 16, 65534, 65534)


def test_view_binds_the_python_install_and_the_packages_not_the_repository():
    view, sys_path = _plan()
    binds = view["binds"]
    assert os.path.realpath(sys.base_prefix) in binds
    assert os.path.join(REPO, "sandbox") in binds
    assert os.path.join(REPO, "hosts") in binds
    assert REPO not in binds
    assert REPO in sys_path
    # pyseccomp and prctl: their files, not the whole site-packages
    import pyseccomp
    assert os.path.realpath(pyseccomp.__file__) in binds
    assert os.path.dirname(os.path.realpath(pyseccomp.__file__)) not in binds


def test_view_binds_the_target_package_and_readonly_paths(tmp_path):
    driver_dir = tmp_path / "drivers"
    driver_dir.mkdir()
    view, _ = _plan(readonly=(str(driver_dir),), target="tests.helpers.spawn_and_wait")
    assert str(driver_dir) in view["binds"]
    assert os.path.join(REPO, "tests") in view["binds"]


def test_paths_inside_another_bind_are_not_bound_twice():
    assert mounts._outermost(["/usr/lib/x86_64-linux-gnu", "/usr/lib", "/opt/a/b", "/opt/a", "/opt/ab"]) == [
        "/opt/a", "/opt/ab", "/usr/lib"]


def test_symlinked_system_paths_become_symlinks():
    view, _ = _plan()
    links = dict(view["symlinks"])
    for path in ("/lib", "/lib64"):
        if os.path.islink(path):
            assert links[path] == os.readlink(path)
            assert os.path.realpath(path) in view["binds"]


def test_tmpfs_belongs_to_the_host():
    view, _ = mounts.plan((), "hosts.main", 8, 1234, 5678)
    assert view["tmpfs"] == "size=8m,mode=0700,uid=1234,gid=5678"


def test_rlimits_plan_from_spec():
    spec = SandboxSpec(name="x", address_space_mib=512, max_open_files=16, max_file_size_mib=4, max_threads=8)
    assert dict(limits.plan(spec, userns=True)) == {
        "RLIMIT_AS": 512 << 20, "RLIMIT_NOFILE": 16, "RLIMIT_FSIZE": 4 << 20, "RLIMIT_CORE": 0, "RLIMIT_NPROC": 8}
    # Without a user namespace all hosts share a uid: NPROC would be shared too, so not set.
    assert "RLIMIT_NPROC" not in dict(limits.plan(spec, userns=False))
    assert "RLIMIT_AS" not in dict(limits.plan(SandboxSpec(name="x", address_space_mib=None), userns=True))


def test_namespace_flags():
    value, names = namespaces.flags(True)
    assert names.split("|") == ["CLONE_NEWUSER", "CLONE_NEWPID", "CLONE_NEWNET", "CLONE_NEWIPC",
                                "CLONE_NEWUTS", "CLONE_NEWCGROUP", "CLONE_NEWNS"]
    value2, names2 = namespaces.flags(False)
    assert "CLONE_NEWUSER" not in names2 and value2 == value & ~0x10000000


def test_userns_default_follows_privilege():
    assert namespaces.use_userns(None) == (os.geteuid() != 0)
    assert namespaces.use_userns(True) is True


@pytest.fixture
def seqpacket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def test_control_round_trip_with_fd(seqpacket):
    a, b = seqpacket
    r, w = os.pipe()
    control.send(a, {"ready": {"x": 1}}, (r,))
    message, fds = control.recv(b)
    assert message == {"ready": {"x": 1}} and len(fds) == 1
    os.write(w, b"z")
    assert os.read(fds[0], 1) == b"z"
    for fd in (r, w, fds[0]):
        os.close(fd)


def test_control_eof(seqpacket):
    a, b = seqpacket
    a.close()
    assert control.recv(b) == (None, [])


def test_control_rejects_malformed_and_closes_its_fds(seqpacket, open_fds):
    a, b = seqpacket
    r, w = os.pipe()
    before = open_fds()
    a.sendmsg([b"[1, 2]"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))])
    with pytest.raises(control.ControlError, match="not an object"):
        control.recv(b)
    a.send(b"{not json")
    with pytest.raises(control.ControlError, match="malformed"):
        control.recv(b)
    assert open_fds() == before
    os.close(r)
    os.close(w)


def test_control_refuses_oversized_message(seqpacket):
    a, _ = seqpacket
    with pytest.raises(control.ControlError, match="exceeds"):
        control.send(a, {"plan": "x" * (control.MAX_MESSAGE + 1)})
