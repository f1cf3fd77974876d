"""A policy's DeviceNodes ioctl list narrows what the host's seccomp filter lets through: the listed
request reaches the device (which answers for itself), an unlisted one is refused by our filter and
audited by name.  The driver is written here, at run time: it is not a module of this repository."""

from __future__ import annotations

import errno
import struct
import textwrap

import pytest

from dm_harness import DeviceManagerProcess, reg_driver, reg_group

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

LISTED, UNLISTED = 0x00224000, 0x00224008

DRIVER = textwrap.dedent('''
    import fcntl, os, struct
    from hosts import StreamDriver

    class Driver(StreamDriver):
        def init(self, ctx):
            self.kernel = ctx.kernel

        def open(self, access, share):
            return None

        def io_control(self, opened, code, inbuf, outbuf):
            (request,) = struct.unpack("<I", inbuf)
            fd = self.kernel.open_device("/dev/null", os.O_RDONLY)
            try:
                fcntl.ioctl(fd, request, 0)
                err = 0
            except OSError as exc:
                err = exc.errno
            finally:
                os.close(fd)
            struct.pack_into("<I", outbuf, 0, err)
            return 4
''')


def test_listed_device_ioctl_passes_and_unlisted_is_refused(tmp_path):
    drivers = tmp_path / "drivers"
    drivers.mkdir()
    (drivers / "nodeprobe.py").write_text(DRIVER)
    registry = (reg_driver("Node", "NOD", "nodeprobe.dll", group=1,
                           extra=f'"IoctlAllow"=multi_sz:"0x00220000"\n'
                                 f'"DeviceNodes"=multi_sz:"/dev/null:r:{LISTED:#010x}"')
                + reg_group(1))
    dm = DeviceManagerProcess(tmp_path, registry, driver_dirs=(drivers,)).start()
    try:
        with dm.client() as c, c.open("NOD1:") as h:
            listed = struct.unpack("<I", h.ioctl(0x00220000, struct.pack("<I", LISTED), 4))[0]
            unlisted = struct.unpack("<I", h.ioctl(0x00220000, struct.pack("<I", UNLISTED), 4))[0]
        assert listed == errno.ENOTTY          # through our filter; /dev/null is no terminal
        assert unlisted == errno.EPERM         # our filter
        recs = dm.wait_audit("syscall.denied", group=1)
        assert any(r["detail"]["syscall"] == "ioctl" and r["detail"]["args"][1] == hex(UNLISTED) for r in recs)
    finally:
        assert dm.stop() == 0
