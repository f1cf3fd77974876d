"""End-to-end: the mount view around binds that lie under /tmp, proved from inside a real sandbox.

A bind under /tmp lands on the host's own writable /tmp, and the directories on the way to it
are made by the view.  With a user namespace those directories can only be owned by the host's
own (mapped) uid, so their owner's permission bits cannot be what protects them: whatever the
uid mapping, the host must not be able to add a file next to its driver's files, nor inside
them, while the rest of its /tmp stays writable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile

import pytest

from sandbox.spec import SandboxSpec, spawn

pytestmark = [pytest.mark.needs_seccomp_notify, pytest.mark.usefixtures("require_namespaces")]

# Only a guard against hanging the whole run if the sandbox never ends; never a measure.
HANG_GUARD = 120.0
REFUSED = (errno.EACCES, errno.EROFS, errno.EPERM)


def _probe(spec: SandboxSpec, checks: list[str], **arg) -> tuple[dict, list[dict]]:
    """The probe's results, and the mounts read back from inside."""
    ours, theirs = socket.socketpair()
    try:
        try:
            box = spawn(spec, "sandbox.probe:run", {"checks": checks, **arg}, [theirs.fileno()])
        finally:
            theirs.close()
        chunks = []
        while chunk := ours.recv(65536):
            chunks.append(chunk)
        box.wait(timeout=HANG_GUARD)
        box.close()
    finally:
        ours.close()
    return json.loads(b"".join(chunks)), box.confinement["mounts"]


@pytest.fixture
def under_tmp():
    """Bind sources under the real /tmp (not tmp_path: TMPDIR may point elsewhere)."""
    made = []

    def make(prefix: str) -> str:
        made.append(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path)


@pytest.mark.parametrize("userns", [pytest.param(True, marks=pytest.mark.needs_userns), None],
                         ids=["userns", "default"])
def test_directories_the_view_makes_under_tmp_are_not_writable_and_tmp_is(under_tmp, userns):
    top = under_tmp("drvbox-view-")
    drivers = os.path.join(top, "drivers")              # a directory bind, one level down
    module = os.path.join(top, "files", "driver.py")    # a file bind
    package = os.path.join(top, "deep", "a", "b", "pkg")  # a directory bind, deeper down
    alone = under_tmp("drvbox-view-alone-")             # a directory bind right in /tmp
    for path in (drivers, os.path.dirname(module), package):
        os.makedirs(path)
    with open(module, "w") as f:
        f.write("X = 1\n")
    # World-writable sources: only the view can be what refuses a write into the binds.
    for path in (drivers, package, alone):
        os.chmod(path, 0o777)

    refused_here = {
        os.path.join(top, "planted"): "the first directory the view made under /tmp",
        os.path.join(drivers, "planted"): "inside a directory bind",
        os.path.join(top, "files", "planted"): "next to a file bind",
        os.path.join(top, "deep", "planted"): "a made directory, two levels above a bind",
        os.path.join(top, "deep", "a", "b", "planted"): "the made parent of a deep bind",
        os.path.join(package, "planted"): "inside a deep directory bind",
        os.path.join(alone, "planted"): "inside a bind right in /tmp",
    }
    allowed_here = [os.path.join("/tmp", "planted"), os.path.join("/tmp", "x-" + os.path.basename(top))]
    spec = SandboxSpec(name="e2e-view", userns=userns, optional=frozenset({"cgroup"}),
                       readonly_paths=(drivers, module, package, alone))

    results, mounts = _probe(spec, ["create_files", "write_tmp"], create_files=[*refused_here, *allowed_here])

    created = results["create_files"]
    wrongly_allowed = {path: why for path, why in refused_here.items() if created[path] not in REFUSED}
    assert not wrongly_allowed, f"the host could create files here: {wrongly_allowed} (errnos: {created})"
    # The allowed side: the host's own /tmp, also right next to the directories above.
    assert [created[path] for path in allowed_here] == [0, 0], created
    assert results["write_tmp"] == 0
    # Nothing reached the real directories behind the binds.
    for path in (drivers, package, alone, os.path.dirname(module)):
        assert "planted" not in os.listdir(path), path
    # What refused them, read back: the made directory is a read-only mount of its own, and it
    # kept the host /tmp's noexec (nothing written there at run time could be mapped executable).
    options = {m["mount_point"]: set(m["options"].split(",")) for m in mounts}
    assert {"ro", "nosuid", "nodev", "noexec"} <= options[top], options.get(top)
    assert "rw" in options["/tmp"], options["/tmp"]
