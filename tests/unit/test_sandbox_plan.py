"""The parent-side plans: mount view, rlimits, namespaces, control messages."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import sysconfig

import pytest

from sandbox import control, limits, mounts, namespaces
from sandbox.spec import SandboxSpec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plan(readonly=(), target="hosts.main"):
    return mounts.plan(readonly, target, 16, 65534, 65534)


def _visible(path: str, binds: list[str]) -> bool:
    """Whether ``path`` is in the view: at or under one of its binds."""
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in binds)


def test_view_binds_the_standard_library_not_the_python_prefix():
    binds = _plan()[0]["binds"]
    # What the interpreter loads inside: pure modules, extension modules (lib-dynload), and
    # libpython when the interpreter is linked to it.
    for module in ("json", "_json", "_ctypes"):
        origin = importlib.util.find_spec(module).origin
        assert _visible(os.path.realpath(origin), binds), f"{module} ({origin}) is not in the view"
    with open("/proc/self/maps") as f:
        libpython = {word for word in f.read().split() if "/libpython" in word}
    for path in libpython:
        assert _visible(path, binds), f"{path} is not in the view"
    # Not the prefix: for a system Python that would be all of /usr (bin, sbin, share...), and
    # not a virtual environment's site-packages (every dependency of the Reflector).
    prefix = os.path.realpath(sys.base_prefix)
    assert prefix not in binds
    for path in (os.path.join(prefix, "bin"), os.path.join(prefix, "share"), "/usr/bin", "/usr/sbin",
                 os.path.realpath(sysconfig.get_path("purelib"))):
        assert not _visible(path, binds), f"{path} is in the view"


def test_view_binds_the_packages_not_the_repository():
    view, sys_path = _plan()
    binds = view["binds"]
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
            assert _visible(os.path.realpath(path), view["binds"])


def test_a_symlink_inside_a_bind_is_left_to_the_bind(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    view, _ = _plan(readonly=(str(tmp_path), str(tmp_path / "link")))
    assert str(tmp_path / "link") not in dict(view["symlinks"])
    view, _ = _plan(readonly=(str(tmp_path / "link"),))
    assert dict(view["symlinks"])[str(tmp_path / "link")] == "real"
    assert str(tmp_path / "real") in view["binds"]


def test_directories_made_right_under_tmp_are_the_ones_sealed():
    view = {"binds": ["/tmp/a/b", "/tmp/c", "/tmp/d/e/f", "/tmp/a/g", "/usr/lib"],
            "symlinks": [("/tmp/h", "x"), ("/tmp/i/j", "k")]}
    assert mounts._made_under_tmp(view) == ["/tmp/a", "/tmp/d", "/tmp/i"]


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
