"""End-to-end: privileged operations from sandboxed drivers reach the simulated hardware only as
their policies and possession allow.

A real Device Manager runs a registry of our own: simulated devices under
``HKLM\\Platform\\Devices`` (a 16550 at the COM1 ports, two GPIO banks), a DMA zone of four pages,
and the probe driver of ``tests/e2e/hwdrivers/hwprobe.py`` twice, in two hosts:

* ``PRB1:`` (group 1) owns UART1's ports, GPIO1's registers (mediated), IRQ 9 and 16 KiB of DMA;
* ``OTH1:`` (group 2) owns GPIO2 (mapped) and IRQ 10, and its policy *also* names GPIO1, IRQ 9
  and the UART ports -- a misconfiguration the Reflector must still refuse while PRB1: holds them.

Each IOCTL of the probe does one ctx.kernel call and answers the errno the driver got, so every
rule is seen from the driver's side: allowed inside, ``PermissionError`` (EACCES) one byte
outside, and a ``policy.denied`` record.  The sample drivers run on the built-in platform too.
"""

from __future__ import annotations

import errno
import struct
import sys
import threading
from pathlib import Path

import pytest

import reflector.drivers
from dm_harness import DeviceManagerProcess, reg_driver, reg_group

sys.path.insert(0, str(Path(__file__).parent / "hwdrivers"))
import hwprobe  # noqa: E402

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.needs_userns, pytest.mark.needs_seccomp_notify,
              pytest.mark.slow]

HWDRIVERS = Path(__file__).parent / "hwdrivers"
SAMPLES = Path(reflector.drivers.__file__).resolve().parent
ALLOW = '"IoctlAllow"=multi_sz:"0x00220000-0x002200FF"\n"MaxIoSize"=dword:1000'
UART_IO, GPIO1, GPIO2, DMA_BASE, DMA_SIZE = 0x3F8, 0x1000_1000, 0x1000_3000, 0x8000_0000, 0x4000
GPIO_SPAN = 0x24
DIR, RISE_EN, INT_STATUS, INT_CLEAR, OUT_SET = 0x00, 0x0C, 0x14, 0x18, 0x1C
U32 = 4

PLATFORM = f"""[HKEY_LOCAL_MACHINE\\Platform]
"DmaBase"=dword:{DMA_BASE:08X}
"DmaSize"=dword:{DMA_SIZE:08X}

[HKEY_LOCAL_MACHINE\\Platform\\Devices\\UART1]
"Model"="uart16550"
"IoBase"=dword:{UART_IO:X}
"IoLen"=dword:8
"Irq"=dword:4

[HKEY_LOCAL_MACHINE\\Platform\\Devices\\GPIO1]
"Model"="gpio"
"MemBase"=dword:{GPIO1:X}
"MemLen"=dword:1000
"Irq"=dword:9

[HKEY_LOCAL_MACHINE\\Platform\\Devices\\GPIO2]
"Model"="gpio"
"MemBase"=dword:{GPIO2:X}
"MemLen"=dword:1000
"Irq"=dword:A

"""

PROBE = (f'"IoBase"=dword:{UART_IO:X}\n"IoLen"=dword:8\n"MemBase"=dword:{GPIO1:X}\n"MemLen"=dword:{GPIO_SPAN:X}\n'
         f'"Irq"=dword:9\n"DmaQuota"=dword:{DMA_SIZE:X}\n"RegisterAccess"="mediated"\n{ALLOW}')
OTHER = (f'"IoBase"=dword:{UART_IO:X}\n"IoLen"=dword:8\n"MemBase"=multi_sz:"{GPIO2:X}","{GPIO1:X}"\n'
         f'"MemLen"=multi_sz:"{GPIO_SPAN:X}","{GPIO_SPAN:X}"\n"Irq"=dword:A\n"SysIntr"=dword:9\n'
         f'"RegisterAccess"="mapped"\n{ALLOW}')


def registry(probe_user: bool = True) -> str:
    return (PLATFORM + reg_driver("Probe", "PRB", "hwprobe.dll", user=probe_user, group=1, extra=PROBE)
            + reg_driver("Other", "OTH", "hwprobe.dll", group=2, order=2, extra=OTHER)
            + reg_group(1, timeout_ms=5000) + reg_group(2, timeout_ms=5000))


@pytest.fixture
def start_dm(tmp_path):
    running = []

    def start(text: str, driver_dirs=(HWDRIVERS,)) -> DeviceManagerProcess:
        dm = DeviceManagerProcess(tmp_path, text, driver_dirs=driver_dirs).start()
        running.append(dm)
        return dm
    yield start
    for dm in running:
        dm.stop()


class Probe:
    """One open handle on a probe device; each method is one ctx.kernel call in the driver."""

    def __init__(self, handle):
        self.h = handle

    def __call__(self, op, a=0, b=0, c=0, d=0):
        status, value, extra = hwprobe.ANSWER.unpack(self.h.ioctl(op, hwprobe.ARGS.pack(a, b, c, d),
                                                                  out_size=hwprobe.ANSWER.size))
        return status, value, extra

    def ok(self, op, a=0, b=0, c=0, d=0) -> int:
        status, value, _ = self(op, a, b, c, d)
        assert status == 0, f"{op:#x}({a:#x}, {b:#x}, {c:#x}, {d:#x}) failed with {errno.errorcode.get(status, status)}"
        return value

    def errno(self, op, a=0, b=0, c=0, d=0) -> int:
        return self(op, a, b, c, d)[0]


def denied(dm, device: str, op: str) -> list[dict]:
    return [r for r in dm.audit("policy.denied") if r["device"] == device and r["detail"].get("op") == op]


# -- each operation inside its window, and one byte outside ------------------------------------

@pytest.mark.parametrize("user", [True, False], ids=["user", "kernel"])
def test_ports_inside_allowed_one_byte_outside_denied_and_audited(start_dm, user):
    dm = start_dm(registry(probe_user=user))
    with dm.client() as c, c.open("PRB1:") as h:
        p = Probe(h)
        p.ok(hwprobe.PORT_WRITE, UART_IO + 7, 0x5A, 1)                      # SCR, the last port
        assert p.ok(hwprobe.PORT_READ, UART_IO + 7, 1) == 0x5A
        assert p.errno(hwprobe.PORT_READ, UART_IO + 8, 1) == errno.EACCES
        assert p.errno(hwprobe.PORT_READ, UART_IO - 1, 1) == errno.EACCES
        assert p.errno(hwprobe.PORT_WRITE, UART_IO + 8, 1, 1) == errno.EACCES
    records = denied(dm, "PRB1:", "read_port")
    assert [r["detail"]["args"][0] for r in records] == [UART_IO + 8, UART_IO - 1]
    assert "is not inside any window the policy grants" in records[0]["detail"]["reason"]
    assert denied(dm, "PRB1:", "write_port")[0]["detail"]["args"][:2] == [UART_IO + 8, 1]


@pytest.mark.parametrize("user", [True, False], ids=["user", "kernel"])
def test_memory_window_inside_allowed_one_byte_outside_denied(start_dm, user):
    dm = start_dm(registry(probe_user=user))
    with dm.client() as c, c.open("PRB1:") as h:
        p = Probe(h)
        region = p.ok(hwprobe.MAP, GPIO1, GPIO_SPAN)
        assert p(hwprobe.MAP, GPIO1, GPIO_SPAN)[2] == 0                     # mediated, as the policy says
        assert p.errno(hwprobe.MAP, GPIO1, GPIO_SPAN + 1) == errno.EACCES
        assert p.errno(hwprobe.MAP, GPIO1 - 1, 4) == errno.EACCES
        p.ok(hwprobe.REG_WRITE, region, DIR, U32, 0xF0)
        assert p.ok(hwprobe.REG_READ, region, DIR, U32) == 0xF0
        assert p.ok(hwprobe.REG_READ, region, GPIO_SPAN - 4, U32) == 0       # the last register
        # A forged READ_REGISTER one byte past the region (the proxy would refuse it itself).
        assert p.errno(hwprobe.RAW, 3, region + 1, GPIO_SPAN - 3, U32) == errno.EACCES
    assert len(denied(dm, "PRB1:", "map_io_space")) == 2
    assert len(denied(dm, "PRB1:", "read_register")) == 1


def test_dma_within_quota_and_over_quota_refused(start_dm):
    dm = start_dm(registry())
    with dm.client() as c, c.open("PRB1:") as h:
        p = Probe(h)
        first, phys = p(hwprobe.ALLOC, DMA_SIZE - 4096)[1:]
        assert phys == DMA_BASE
        p.ok(hwprobe.ALLOC, 1)                                                 # one page more: the quota
        assert p.errno(hwprobe.ALLOC, 1) == errno.EACCES
        p.ok(hwprobe.FREE, first)
        p.ok(hwprobe.ALLOC, 4096)
    records = denied(dm, "PRB1:", "alloc_dma")
    assert len(records) == 1 and f"exceeds DmaQuota {DMA_SIZE}" in records[0]["detail"]["reason"]
    with dm.client() as c, c.open("OTH1:") as h:
        assert Probe(h).errno(hwprobe.ALLOC, 1) == errno.EACCES                # DmaQuota 0


# -- interrupts ------------------------------------------------------------------------------

def edge(p: Probe, region: int) -> None:
    """Make GPIO1 latch a rising edge on pin 0 by driving it as an output (mediated writes)."""
    p.ok(hwprobe.REG_WRITE, region, RISE_EN, U32, 1)
    p.ok(hwprobe.REG_WRITE, region, DIR, U32, 1)
    p.ok(hwprobe.REG_WRITE, region, OUT_SET, U32, 1)


def test_interrupt_reaches_only_its_driver(start_dm):
    dm = start_dm(registry())
    with dm.client() as c, c.open("PRB1:") as ph, c.open("OTH1:") as oh:
        p, o = Probe(ph), Probe(oh)
        irq = p.ok(hwprobe.HOOK, 9)
        other_irq = o.ok(hwprobe.HOOK, 10)
        assert p.errno(hwprobe.HOOK, 10) == errno.EACCES                      # not its Irq
        region = p.ok(hwprobe.MAP, GPIO1, GPIO_SPAN)
        edge(p, region)
        assert p.ok(hwprobe.WAIT, irq, 10_000) == 1
        assert o.ok(hwprobe.WAIT, other_irq, 0) == 0                          # the other host: nothing
        assert p.ok(hwprobe.WAIT, irq, 0) == 0                                # masked until done
        p.ok(hwprobe.REG_WRITE, region, INT_CLEAR, U32, 1)
        p.ok(hwprobe.DONE, irq)
        p.ok(hwprobe.CLOSE_IRQ, irq)
        assert p.ok(hwprobe.HOOK, 9) >= 0                                     # closed: may hook again
    assert denied(dm, "PRB1:", "interrupt")[0]["detail"]["args"][0] == 10


def test_window_irq_and_ports_of_a_driver_in_another_host_refused(start_dm):
    dm = start_dm(registry())
    with dm.client() as c, c.open("PRB1:") as ph, c.open("OTH1:") as oh:
        p, o = Probe(ph), Probe(oh)
        p.ok(hwprobe.MAP, GPIO1, GPIO_SPAN)
        p.ok(hwprobe.HOOK, 9)
        p.ok(hwprobe.PORT_READ, UART_IO, 1)
        # OTH1:'s policy names all three, but PRB1: holds them.
        assert o.errno(hwprobe.MAP, GPIO1, GPIO_SPAN) == errno.EBUSY
        assert o.errno(hwprobe.HOOK, 9) == errno.EBUSY
        assert o.errno(hwprobe.PORT_READ, UART_IO, 1) == errno.EBUSY
        # A handle number of PRB1:'s region, used by OTH1:, is nobody's.
        assert o.errno(hwprobe.RAW, 3, 1, 0, U32) == errno.EBADF
        # Its own device works, mapped: a write into the page reaches the bank at the next poll.
        mine = o.ok(hwprobe.MAP, GPIO2, GPIO_SPAN)
        assert o(hwprobe.MAP, GPIO2, 4)[2] == 1
        o.ok(hwprobe.VIEW_WRITE, mine, DIR, U32, 0xAB)
        assert o.ok(hwprobe.REG_READ, mine, DIR, U32) == 0xAB
    reasons = [r["detail"]["reason"] for r in dm.audit("policy.denied") if r["device"] == "OTH1:"]
    assert any("device GPIO1 is in use by PRB1:" in r for r in reasons)
    assert any("IRQ 9 is hooked already by PRB1:" in r for r in reasons)


# -- resources follow the host ---------------------------------------------------------------

def test_resources_reclaimed_after_a_crash(start_dm):
    dm = start_dm(registry())
    with dm.client() as c:
        p = Probe(c.open("PRB1:"))                                              # dies with its host
        p.ok(hwprobe.ALLOC, DMA_SIZE)                                           # the whole DMA zone
        p.ok(hwprobe.HOOK, 9)
        p.ok(hwprobe.MAP, GPIO1, GPIO_SPAN)
        held = c.hw({"verb": "ls"})["held"]
        assert sum(b["size"] for b in held["dma"]) == DMA_SIZE and 9 in map(int, held["interrupts"])
        with pytest.raises(OSError) as exc:
            p(hwprobe.EXIT, 3)
        assert exc.value.errno == errno.EIO
    dm.wait_audit("host.crashed", group=1)
    (reclaimed,) = dm.wait_audit("host.reclaimed", group=1)
    assert reclaimed["detail"]["dma_bytes"] == DMA_SIZE and reclaimed["detail"]["interrupts"] == [9]
    with dm.client() as c:
        assert c.hw({"verb": "ls"})["held"]["dma"] == []
    dm.wait_state("PRB1:", "running")
    # The restarted host holds nothing: it must ask again, and everything is there to be had.
    with dm.client() as c, c.open("PRB1:") as h:
        p = Probe(h)
        p.ok(hwprobe.ALLOC, DMA_SIZE)                                           # the zone was given back
        irq = p.ok(hwprobe.HOOK, 9)                                             # the IRQ was unhooked
        region = p.ok(hwprobe.MAP, GPIO1, GPIO_SPAN)
        edge(p, region)
        assert p.ok(hwprobe.WAIT, irq, 10_000) == 1


# -- the sample drivers on the built-in platform ----------------------------------------------

def builtin_registry() -> str:
    text = (SAMPLES / "platform.reg").read_text()
    return text.split("\n", 1)[1]                                               # without REGEDIT4


def test_sample_drivers_on_the_simulated_hardware(start_dm):
    dm = start_dm(builtin_registry(), driver_dirs=(SAMPLES,))
    with dm.client() as c:
        with c.open("COM1:") as h:
            assert h.write(b"hello") == 5                                        # loopback in the 16550
            assert h.read(5) == b"hello"
            assert h.ioctl(0x001B0050, b"", out_size=4) == struct.pack("<I", 115200)
        with c.open("DSK1:") as h:
            data = bytes(range(256)) * 16 + b"tail"
            assert h.write(data) == len(data)
            assert h.seek(0, 0) == 0
            assert h.read(len(data)) == data
            assert h.ioctl(0x0007405C, b"", out_size=8) == struct.pack("<q", 1 << 20)
        with c.open("GIO1:") as h:
            h.ioctl(0x8000200C, struct.pack("<II", 0x3, 0x3))
            h.ioctl(0x80002000, struct.pack("<I", 0x1))
            assert h.ioctl(0x80002008, b"", out_size=4) == struct.pack("<I", 0x1)


def test_uart_driver_on_a_real_pseudo_terminal(start_dm):
    """The same uart.py, given DevicePath: the Reflector opens the pty (DeviceNodes) and passes
    the fd into the sandboxed host, which cannot open it itself."""
    import os
    import tty
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        path = os.ttyname(slave)
        text = (reg_driver("Serial", "COM", "uart.dll", group=1,
                           extra=f'"DevicePath"="{path}"\n"DeviceNodes"=multi_sz:"{path}:rw"\n'
                                 '"IoctlAllow"=multi_sz:"0x001B0004","0x001B004C","0x001B0050","0x001B006C"')
                + reg_group(1))
        dm = start_dm(text, driver_dirs=(SAMPLES,))
        with dm.client() as c, c.open("COM1:") as h:
            assert h.write(b"out") == 3
            assert os.read(master, 10) == b"out"
            os.write(master, b"in")
            got = b""
            for _ in range(200):
                got += h.read(10)
                if got == b"in":
                    break
                threading.Event().wait(0.01)
            assert got == b"in"
    finally:
        os.close(master)
        os.close(slave)
