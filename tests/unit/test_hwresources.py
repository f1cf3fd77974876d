"""The Reflector's hardware resource table, and ctx.kernel in kernel mode over it.

Part 1 drives ``HardwareResources`` directly over a real simulated ``Platform`` with plain objects
as owners (a host lifetime in the Device Manager is a ``HostChannel``; any object will do).
Part 2 goes through ``KernelOps`` and ``InProcessKernel`` -- the kernel-mode ``ctx.kernel``, which
is the host's ``KernelProxy`` over a direct transport -- with policies derived from a registry,
so each rule is seen from the driver's side: allowed inside the window, ``PermissionError`` one
byte outside it, and a ``policy.denied`` record.  Part 3 runs the sample drivers of
``reflector/drivers`` on the simulated hardware in kernel mode.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

import reflector.drivers
from hosts.dispatch import LoadedDriver
from hosts.kernel_proxy import DmaBuffer, Interrupt, Region
from policy.derive import derive_one
from policy.document import Policy, format_datetime
from policy.drivers import find_drivers
from policy.regfile import parse_text
from reflector.devices import KernelDevice
from reflector.hwresources import MAX_REGIONS, HardwareResources, ResourceError
from reflector.kernel_ops import InProcessKernel, KernelOps, attach_resources
from reflector.simhw import blockdev as bd
from reflector.simhw import gpio as gp
from reflector.simhw.config import DeviceConfig
from reflector.simhw.errors import AddressError
from reflector.simhw.physmem import PAGE_SIZE, PhysicalMemory
from reflector.simhw.platform import Platform

SAMPLES = Path(reflector.drivers.__file__).resolve().parent
UART_IO, UART_MEM, UART_IRQ = 0x3F8, 0x1000_2000, 4
DISK_MEM, DISK_IRQ = 0x1000_0000, 14
GPIO_MEM, GPIO_IRQ = 0x1000_1000, 9


def make_platform(dma_pages: int = 64) -> Platform:
    return Platform([
        DeviceConfig("UART1", "uart16550", io=[(UART_IO, 8)], mem=[(UART_MEM, 0x1000)], irq=UART_IRQ),
        DeviceConfig("DISK1", "blockdev", mem=[(DISK_MEM, 0x1000)], irq=DISK_IRQ, values={"SizeBytes": 65536}),
        DeviceConfig("GPIO1", "gpio", mem=[(GPIO_MEM, 0x1000)], irq=GPIO_IRQ),
    ], PhysicalMemory(0x8000_0000, dma_pages * PAGE_SIZE))


class Owner:
    """Stands for one host lifetime (a HostChannel in the Device Manager)."""

    def __init__(self, name):
        self.name = name


@pytest.fixture
def plat():
    p = make_platform()
    yield p
    p.close()


@pytest.fixture
def hw(plat):
    r = HardwareResources(plat)
    yield r
    r.close()


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def eventfd_count(fd) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# == part 1: the table ==========================================================================

def test_mediated_region_reads_and_writes_with_side_effects(hw, plat):
    a = Owner("a")
    r = hw.map_region(a, "GIO1:", GPIO_MEM, 0x24, "mediated")
    assert r.fd is None and r.mode == "mediated"
    hw.write_register(a, "GIO1:", r.handle, gp.REG_DIR, 4, 0xF)
    hw.write_register(a, "GIO1:", r.handle, gp.REG_OUT_SET, 4, 0x5)
    assert hw.read_register(a, "GIO1:", r.handle, gp.REG_LEVEL, 4) == 0x5
    assert plat.device("GPIO1").outputs() == 0x5


def test_mediated_access_one_byte_outside_the_region_refused(hw):
    a = Owner("a")
    r = hw.map_region(a, "GIO1:", GPIO_MEM, 0x24, "mediated")
    assert hw.read_register(a, "GIO1:", r.handle, 0x20, 4) == 0        # last register: allowed
    with pytest.raises(ResourceError) as e:
        hw.read_register(a, "GIO1:", r.handle, 0x21, 4)                 # one byte past the end
    assert e.value.errno == errno.EACCES and e.value.refused
    assert "outside the region of 0x24 bytes at 0x10001000" in e.value.reason
    with pytest.raises(ResourceError) as e:
        hw.read_register(a, "GIO1:", r.handle, -4, 4)
    assert e.value.errno == errno.EACCES
    with pytest.raises(ResourceError) as e:
        hw.read_register(a, "GIO1:", r.handle, 0, 3)
    assert e.value.errno == errno.EINVAL


def test_mapped_region_passes_the_register_page_and_polls_while_mapped(hw, plat):
    a = Owner("a")
    before = open_fds()
    r = hw.map_region(a, "GIO1:", GPIO_MEM + 0x10, 0x10, "mapped")
    assert r.mode == "mapped" and r.offset == 0x10 and r.fd is not None
    assert hw.describe()["polling"]
    import mmap
    m = mmap.mmap(r.fd, PAGE_SIZE)
    os.close(r.fd)
    try:
        plat.device("GPIO1").set_input(3, 1)
        assert struct.unpack_from("<I", m, gp.REG_LEVEL)[0] == 1 << 3       # reads: at once
        struct.pack_into("<I", m, gp.REG_DIR, 0x1)                           # writes: at the next poll
        struct.pack_into("<I", m, gp.REG_OUT_SET, 0x1)
        deadline = threading.Event()
        for _ in range(2000):
            if plat.device("GPIO1").outputs() == 1:
                break
            deadline.wait(0.001)
        assert plat.device("GPIO1").outputs() == 1
    finally:
        m.close()
    hw.unmap_region(a, "GIO1:", r.handle)
    assert not hw.describe()["polling"]                                       # last mapping gone: poller stops
    assert open_fds() == before


def test_region_outside_every_device_window_is_a_platform_error(hw):
    with pytest.raises(AddressError) as e:
        hw.map_region(Owner("a"), "GIO1:", GPIO_MEM + 0xFFF, 2, "mapped")
    assert e.value.errno == errno.EFAULT


def test_handles_belong_to_their_driver_and_host(hw):
    a, b = Owner("a"), Owner("b")
    r = hw.map_region(a, "GIO1:", GPIO_MEM, 0x24, "mediated")
    for owner, driver in ((b, "GIO1:"), (a, "COM1:")):
        with pytest.raises(ResourceError) as e:
            hw.read_register(owner, driver, r.handle, 0, 4)
        assert e.value.errno == errno.EBADF and e.value.refused
        with pytest.raises(ResourceError):
            hw.unmap_region(owner, driver, r.handle)
    with pytest.raises(ResourceError):
        hw.unmap_region(a, "GIO1:", r.handle + 1000)
    hw.unmap_region(a, "GIO1:", r.handle)
    with pytest.raises(ResourceError):
        hw.unmap_region(a, "GIO1:", r.handle)                                # twice: gone


def test_one_driver_per_device_until_its_host_is_gone(hw, plat):
    a, b = Owner("a"), Owner("b")
    hw.map_region(a, "GIO1:", GPIO_MEM, 4, "mediated")
    for owner, driver in ((b, "GIO1:"), (a, "OTHER:")):
        with pytest.raises(ResourceError) as e:
            hw.map_region(owner, driver, GPIO_MEM, 4, "mediated")
        assert e.value.errno == errno.EBUSY and e.value.refused
        assert "device GPIO1 is in use by GIO1: (a)" in e.value.reason
        with pytest.raises(ResourceError):
            hw.hook_interrupt(owner, driver, GPIO_IRQ)
    assert plat.device("GPIO1").dma_owner is not None                      # bound to the claimant
    hw.release(a)
    assert plat.device("GPIO1").dma_owner is None
    hw.map_region(b, "GIO1:", GPIO_MEM, 4, "mediated")                      # free again


def test_ports_claim_the_device_too(hw, plat):
    a, b = Owner("a"), Owner("b")
    hw.write_port(a, "COM1:", UART_IO + 7, 0x5A, 1)
    assert hw.read_port(a, "COM1:", UART_IO + 7, 1) == 0x5A
    with pytest.raises(ResourceError) as e:
        hw.read_port(b, "COM1:", UART_IO + 7, 1)
    assert e.value.errno == errno.EBUSY
    with pytest.raises(AddressError):
        hw.read_port(a, "COM1:", UART_IO + 8, 1)


def test_interrupt_reaches_only_its_hooker_and_follows_ce_masking(hw, plat):
    a = Owner("a")
    handle, fd = hw.hook_interrupt(a, "GIO1:", GPIO_IRQ)
    gpio = plat.device("GPIO1")
    uart_handle, uart_fd = hw.hook_interrupt(a, "COM1:", UART_IRQ)
    try:
        assert not plat.is_masked(GPIO_IRQ)                                  # InterruptInitialize
        gpio.write(gp.REG_RISE_EN, 1, 4)
        gpio.set_input(0, 1)
        assert eventfd_count(fd) == 1
        assert eventfd_count(uart_fd) == 0                                   # not the other driver's
        assert plat.is_masked(GPIO_IRQ)                                      # masked until done
        gpio.set_input(0, 0)
        gpio.set_input(0, 1)
        assert eventfd_count(fd) == 0
        hw.interrupt_done(a, "GIO1:", handle)                                # still asserted: again
        assert eventfd_count(fd) == 1
        gpio.write(gp.REG_INT_CLEAR, 1, 4)
        hw.interrupt_done(a, "GIO1:", handle)
        assert eventfd_count(fd) == 0 and not plat.is_masked(GPIO_IRQ)
        hw.unhook_interrupt(a, "GIO1:", handle)
        assert plat.is_masked(GPIO_IRQ)                                      # close: masked
    finally:
        os.close(fd)
        os.close(uart_fd)


def test_one_hook_per_irq_and_unknown_irq(hw):
    a, b = Owner("a"), Owner("b")
    handle, fd = hw.hook_interrupt(a, "GIO1:", GPIO_IRQ)
    os.close(fd)
    with pytest.raises(ResourceError) as e:
        hw.hook_interrupt(a, "GIO1:", GPIO_IRQ)
    assert e.value.errno == errno.EBUSY and "IRQ 9 is hooked already by GIO1: (a)" in e.value.reason
    with pytest.raises(ResourceError) as e:
        hw.hook_interrupt(b, "GIO1:", GPIO_IRQ)
    assert e.value.errno == errno.EBUSY
    with pytest.raises(ResourceError) as e:
        hw.hook_interrupt(a, "GIO1:", 77)
    assert e.value.errno == errno.ENODEV
    with pytest.raises(ResourceError) as e:
        hw.interrupt_done(b, "GIO1:", handle)
    assert e.value.errno == errno.EBADF


def test_dma_is_the_drivers_and_reaches_only_its_device(hw, plat):
    a, b = Owner("a"), Owner("b")
    handle, region, fd = hw.alloc_dma(a, "DSK1:", 100)
    os.close(fd)
    assert region.size == PAGE_SIZE and hw.dma_held(a, "DSK1:") == PAGE_SIZE
    assert hw.dma_held(b, "DSK1:") == 0 and hw.dma_held(a, "GIO1:") == 0
    other, oregion, ofd = hw.alloc_dma(b, "OTH1:", 100)
    os.close(ofd)
    r = hw.map_region(a, "DSK1:", DISK_MEM, 0x3C, "mediated")
    disk = plat.device("DISK1")
    disk.write_sectors(0, b"S" * 512)

    def run(buffer_phys):
        ring = region.phys
        plat.physmem.write(ring, bd.DESCRIPTOR.pack(bd.OP_READ, 0, 0, 1, 0, buffer_phys, 0))
        for reg, value in ((bd.REG_RING_LO, ring), (bd.REG_RING_SIZE, 1), (bd.REG_CONTROL, bd.CONTROL_ENABLE
                                                                           | bd.CONTROL_RESET)):
            hw.write_register(a, "DSK1:", r.handle, reg, 4, value & 0xFFFFFFFF)
        hw.write_register(a, "DSK1:", r.handle, bd.REG_TAIL, 4, 1)
        return plat.physmem.read(ring + 1, 1)[0]

    assert run(region.phys + 2048 - 512) == bd.ST_OK
    assert plat.physmem.read(region.phys + 1536, 512) == b"S" * 512
    assert run(oregion.phys) == bd.BAD_BUFFER                                 # b's memory: unreachable
    with pytest.raises(ResourceError) as e:
        hw.free_dma(b, "OTH1:", handle)
    assert e.value.errno == errno.EBADF
    hw.free_dma(a, "DSK1:", handle)
    assert hw.dma_held(a, "DSK1:") == 0


def test_release_gives_back_everything(hw, plat):
    a = Owner("a")
    before = open_fds()
    handle, fd = hw.hook_interrupt(a, "GIO1:", GPIO_IRQ)
    os.close(fd)
    _, _, dfd = hw.alloc_dma(a, "DSK1:", 3 * PAGE_SIZE)
    os.close(dfd)
    m = hw.map_region(a, "DSK1:", DISK_MEM, 0x3C, "mapped")
    os.close(m.fd)
    hw.map_region(a, "GIO1:", GPIO_MEM, 4, "mediated")
    summary = hw.release(a)
    assert summary == {"drivers": ["DSK1:", "GIO1:"], "interrupts": [GPIO_IRQ], "regions": 2, "dma_buffers": 1,
                       "dma_bytes": 3 * PAGE_SIZE, "devices": ["DISK1", "GPIO1"]}
    assert plat.is_masked(GPIO_IRQ)
    assert plat.physmem.regions() == []
    assert hw.describe() == {"claims": {}, "interrupts": {}, "regions": [], "dma": [], "polling": False}
    assert open_fds() == before
    with pytest.raises(ResourceError):
        hw.interrupt_done(a, "GIO1:", handle)
    b = Owner("b")                                                            # the restarted host asks again
    handle, fd = hw.hook_interrupt(b, "GIO1:", GPIO_IRQ)
    os.close(fd)
    assert hw.release(Owner("nobody"))["drivers"] == []


def test_region_count_is_bounded(hw):
    a = Owner("a")
    for _ in range(MAX_REGIONS):
        hw.map_region(a, "GIO1:", GPIO_MEM, 4, "mediated")
    with pytest.raises(ResourceError) as e:
        hw.map_region(a, "GIO1:", GPIO_MEM, 4, "mediated")
    assert e.value.errno == errno.EMFILE


# == part 2: ctx.kernel in kernel mode ===========================================================

class Audit:
    def __init__(self):
        self.records = []

    def record(self, event, **kw):
        self.records.append({"event": event, **kw})
        return self.records[-1]

    def denied(self):
        return [r for r in self.records if r["event"] == "policy.denied"]


class FakeDM:
    def __init__(self, platform):
        self.platform = platform
        self.audit = Audit()


def driver_key(name, prefix, dll, extra=""):
    return (f"[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\{name}]\n\"Dll\"=\"{dll}\"\n\"Prefix\"=\"{prefix}\"\n"
            f"\"Index\"=dword:1\n\"Flags\"=dword:0\n{extra}\n\n")


REGISTRY = (
    driver_key("Serial", "COM", "uart.dll", '"IoBase"=dword:3F8\n"IoLen"=dword:8\n"Irq"=dword:4\n'
               '"MemBase"=dword:10002000\n"MemLen"=dword:8\n"RegisterAccess"="mediated"')
    + driver_key("Disk", "DSK", "ramdisk.dll", '"MemBase"=dword:10000000\n"MemLen"=dword:1000\n"Irq"=dword:E\n'
                 '"DmaQuota"=dword:20000')
    + driver_key("Gpio", "GIO", "gpio.dll", '"MemBase"=dword:10001000\n"MemLen"=dword:24\n"Irq"=dword:9\n'
                 '"RegisterAccess"="mapped"')
    + driver_key("Nothing", "NUL", "gpio.dll", "")
)


@pytest.fixture
def kernel_mode():
    platform = make_platform()
    attach_resources(platform)
    dm = FakeDM(platform)
    ops = KernelOps(dm)
    hive = parse_text(REGISTRY).hive
    devices = {}
    issued = format_datetime(datetime.now(timezone.utc))
    for entry in find_drivers(hive):
        document = derive_one(hive, entry, [SAMPLES], 1, issued).document
        device = KernelDevice(entry, Policy.trusted(document), str(SAMPLES / entry.dll.replace(".dll", ".py")),
                              dm.audit, loaded=None)
        devices[entry.name] = (device, InProcessKernel(ops, device), {v.name: v.data for v in hive.key(entry.key_path).values()})
    yield dm, ops, devices
    for device, _, _ in devices.values():
        ops.host_gone(device)
    platform.resources.close()
    platform.close()


def test_ports_allowed_inside_the_window_denied_one_byte_outside(kernel_mode):
    dm, _, devices = kernel_mode
    k = devices["COM1:"][1]
    k.write_port(UART_IO + 7, 0x42)
    assert k.read_port(UART_IO + 7) == 0x42
    with pytest.raises(OSError) as e:                                         # inside, but the UART has
        k.read_port(UART_IO + 6, 2)                                           # 8-bit registers: the
    assert e.value.errno == errno.EINVAL and not isinstance(e.value, PermissionError)  # hardware's error
    for port, width in ((UART_IO + 8, 1), (UART_IO + 7, 2), (UART_IO - 1, 1)):
        with pytest.raises(PermissionError) as e:
            k.read_port(port, width)
        assert e.value.errno == errno.EACCES
    with pytest.raises(PermissionError):
        k.write_port(UART_IO + 8, 1)
    denied = dm.audit.denied()
    assert [d["detail"]["op"] for d in denied] == ["read_port"] * 3 + ["write_port"]
    assert denied[0]["device"] == "COM1:" and denied[0]["detail"]["args"][:2] == [UART_IO + 8, 1]
    assert "is not inside any window the policy grants" in denied[0]["detail"]["reason"]


def test_map_io_space_allowed_inside_denied_one_byte_outside(kernel_mode):
    dm, _, devices = kernel_mode
    k = devices["GIO1:"][1]
    region = k.map_io_space(GPIO_MEM, 0x24)
    assert isinstance(region, Region) and region.mode == "mapped" and len(region.view) == 0x24
    with pytest.raises(PermissionError):
        k.map_io_space(GPIO_MEM, 0x25)
    with pytest.raises(PermissionError):
        k.map_io_space(GPIO_MEM - 1, 4)
    assert [d["detail"]["op"] for d in dm.audit.denied()] == ["map_io_space", "map_io_space"]
    k.unmap_io_space(region)


def test_mediated_region_each_access_checked(kernel_mode):
    dm, _, devices = kernel_mode
    k = devices["COM1:"][1]
    region = k.map_io_space(UART_MEM, 8)
    assert region.mode == "mediated"
    with pytest.raises(PermissionError):
        region.view
    region.write8(7, 0x77)                                                    # SCR
    assert region.read8(7) == 0x77
    assert k.read_port(UART_IO + 7) == 0x77                                   # the same register
    with pytest.raises(IndexError):
        region.read8(8)                                                       # the proxy's own bound
    from hosts.wire import KernelOp
    with pytest.raises(PermissionError):                                      # a forged call past it
        k._call(KernelOp.READ_REGISTER, region.handle, 8, 1)
    with pytest.raises(OSError) as e:                                         # a width the UART lacks
        region.read16(0)
    assert e.value.errno == errno.EINVAL and not isinstance(e.value, PermissionError)
    assert [d["detail"]["op"] for d in dm.audit.denied()] == ["read_register"]
    region.close()


def test_interrupt_only_the_drivers_own(kernel_mode):
    dm, _, devices = kernel_mode
    k = devices["GIO1:"][1]
    intr = k.interrupt(GPIO_IRQ)
    assert isinstance(intr, Interrupt)
    with pytest.raises(PermissionError):
        k.interrupt(UART_IRQ)
    with pytest.raises(PermissionError):
        devices["NUL1:"][1].interrupt(GPIO_IRQ)
    region = k.map_io_space(GPIO_MEM, 0x24)
    gpio = dm.platform.device("GPIO1")
    region.write32(gp.REG_FALL_EN, 1 << 5)
    dm.platform.sync("GPIO1")
    gpio.set_input(5, 1)
    assert not intr.wait(0)
    gpio.set_input(5, 0)
    assert intr.wait(5)
    region.write32(gp.REG_INT_CLEAR, 1 << 5)
    dm.platform.sync("GPIO1")
    intr.done()
    assert not intr.wait(0)
    intr.close()
    assert dm.platform.is_masked(GPIO_IRQ)
    k.unmap_io_space(region)


def test_dma_within_quota_and_over_quota_refused(kernel_mode):
    dm, _, devices = kernel_mode
    k = devices["DSK1:"][1]
    a = k.alloc_dma(0x20000 - PAGE_SIZE)
    assert isinstance(a, DmaBuffer) and len(a.view) == 0x20000 - PAGE_SIZE
    a.view[:5] = b"hello"
    assert dm.platform.physmem.read(a.phys, 5) == b"hello"                  # the model sees it at phys
    b = k.alloc_dma(1)                                                        # one page: the quota exactly
    with pytest.raises(PermissionError) as e:
        k.alloc_dma(1)
    assert "exceeds DmaQuota 131072" in str(e.value)
    k.free_dma(b)
    c = k.alloc_dma(PAGE_SIZE)
    with pytest.raises(PermissionError):
        devices["GIO1:"][1].alloc_dma(1)                                      # DmaQuota 0
    assert [d["detail"]["op"] for d in dm.audit.denied()] == ["alloc_dma", "alloc_dma"]
    k.free_dma(a)
    k.free_dma(c)


def test_unknown_operation_is_denied_and_audited(kernel_mode):
    dm, ops, devices = kernel_mode
    from hosts.wire import Frame, Op
    device = devices["GIO1:"][0]
    status, _, tail, fds = ops.handle(None, device, device, Frame(Op.KCALL, 0, 0, (99, 0, 0, 0), b""))
    assert status == errno.EPERM and fds == [] and b"unknown kernel operation 99" in tail
    assert dm.audit.denied()[-1]["detail"]["op"] == "99"


def test_host_gone_reclaims(kernel_mode):
    dm, ops, devices = kernel_mode
    device, k, _ = devices["DSK1:"]
    buf = k.alloc_dma(PAGE_SIZE)
    intr = k.interrupt(DISK_IRQ)
    summary = ops.host_gone(device)
    assert summary["dma_bytes"] == PAGE_SIZE and summary["interrupts"] == [DISK_IRQ]
    assert dm.platform.physmem.regions() == []
    buf._release()                        # the driver's own mapping and fds outlive the reclaim
    os.close(intr.fd)


# == part 3: the sample drivers on the simulated hardware, in kernel mode ========================

from reflector.drivers import gpio as gpio_drv                                   # noqa: E402
from reflector.drivers import ramdisk as disk_drv                                # noqa: E402
from reflector.drivers import uart as uart_drv                                   # noqa: E402


class Log(list):
    def __call__(self, level, message):
        self.append(message)


@pytest.fixture
def load(kernel_mode):
    dm, ops, devices = kernel_mode
    loaded = []

    def load(name, **registry):
        device, kernel, values = devices[name]
        values = {**values, **registry}
        log = Log()
        driver = LoadedDriver(name, device.module_path, values, kernel, log)
        loaded.append(driver)
        status, h = driver.open(3, 0)
        assert status == 0
        return driver, h, log
    yield load
    for driver in loaded:
        driver.unload()


def ioctl(d, h, code, inp=b"", out_len=64):
    out = memoryview(bytearray(out_len))
    status, n = d.ioctl(h, code, memoryview(inp), out)
    return status, bytes(out[:n])


def read(d, h, n):
    out = memoryview(bytearray(n))
    status, got = d.read(h, out)
    return status, bytes(out[:got])


def test_uart_loopback_through_the_16550(load, kernel_mode):
    d, h, log = load("COM1:")
    assert d.write(h, memoryview(b"hello")) == (0, 5)
    assert read(d, h, 3) == (0, b"hel")
    assert read(d, h, 10) == (0, b"lo")
    assert read(d, h, 10) == (0, b"")
    assert d.seek(h, 0, 0) == (errno.EOPNOTSUPP, 0)
    uart = kernel_mode[0].platform.device("UART1")
    assert uart.take_tx() == b""                                                # loopback: nothing on the line
    assert uart.describe()["state"]["loopback"] and uart.describe()["state"]["baud"] == 115200
    assert log == []


def test_uart_line_mode_transmits_and_receives_by_interrupt(load, kernel_mode):
    d, h, _ = load("COM1:", Loopback=0)
    uart = kernel_mode[0].platform.device("UART1")
    assert d.write(h, memoryview(b"to the line")) == (0, 11)
    assert uart.take_tx() == b"to the line"
    uart.feed(b"from the line")
    for _ in range(1000):                                                       # the IST drains it
        if ioctl(d, h, uart_drv.IOCTL_SERIAL_GET_COMMSTATUS)[1][8:12] == struct.pack("<I", 13):
            break
        threading.Event().wait(0.005)
    assert uart.describe()["state"]["rx_fifo"] == 0
    assert read(d, h, 100) == (0, b"from the line")


def test_uart_line_mode_holds_back_a_flood_with_flow_control(load, kernel_mode):
    d, h, _ = load("COM1:", Loopback=0)
    uart = kernel_mode[0].platform.device("UART1")
    data = bytes(range(256)) * 20                                               # 5120 > FIFO_SIZE
    assert uart.feed(data) == len(data)
    got = b""
    for _ in range(100):
        got += read(d, h, 1000)[1]
        if len(got) == len(data):
            break
    assert got == data


def test_uart_baud_rate_programs_the_divisor(load, kernel_mode):
    d, h, _ = load("COM1:", BaudRate=9600)
    uart = kernel_mode[0].platform.device("UART1")
    assert uart.describe()["state"]["baud"] == 9600
    assert ioctl(d, h, uart_drv.IOCTL_SERIAL_GET_BAUD_RATE) == (0, struct.pack("<I", 9600))
    assert ioctl(d, h, uart_drv.IOCTL_SERIAL_SET_BAUD_RATE, struct.pack("<I", 57600)) == (0, b"")
    assert uart.describe()["state"]["baud"] == 57600
    assert ioctl(d, h, uart_drv.IOCTL_SERIAL_SET_BAUD_RATE, struct.pack("<I", 12345))[0] == errno.EINVAL
    assert ioctl(d, h, uart_drv.IOCTL_SERIAL_GET_BAUD_RATE, out_len=2)[0] == errno.ENOBUFS


def test_uart_status_overrun_and_purge(load):
    d, h, _ = load("COM1:")
    assert d.write(h, memoryview(b"x" * (uart_drv.FIFO_SIZE + 10))) == (0, uart_drv.FIFO_SIZE)
    assert ioctl(d, h, uart_drv.IOCTL_SERIAL_GET_COMMSTATUS) == (
        0, struct.pack("<IIII", uart_drv.CE_OVERRUN, 0, uart_drv.FIFO_SIZE, 0))
    assert ioctl(d, h, uart_drv.IOCTL_SERIAL_GET_COMMSTATUS)[1][:4] == b"\0\0\0\0"
    assert ioctl(d, h, uart_drv.IOCTL_SERIAL_PURGE, struct.pack("<I", 0xF)) == (0, b"")
    assert ioctl(d, h, uart_drv.IOCTL_SERIAL_GET_COMMSTATUS) == (0, bytes(16))
    assert ioctl(d, h, 0x001B0FFC)[0] == errno.ENOTTY


def test_uart_refuses_a_nonstandard_baud_and_a_missing_port(kernel_mode):
    from hosts.dispatch import LoadError
    _, _, devices = kernel_mode
    device, kernel, values = devices["COM1:"]
    with pytest.raises(LoadError) as info:
        LoadedDriver("COM1:", device.module_path, {**values, "BaudRate": 1234}, kernel, Log())
    assert info.value.errno == errno.EINVAL
    without = {k: v for k, v in values.items() if k.lower() != "iobase"}
    with pytest.raises(LoadError) as info:
        LoadedDriver("COM1:", device.module_path, without, kernel, Log())
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("access", ["mapped", "mediated"])
def test_ramdisk_by_dma_seek_read_write(load, kernel_mode, access):
    dm = kernel_mode[0]
    device = kernel_mode[2]["DSK1:"][0]
    object.__setattr__(device.policy, "register_access", access)
    d, h, log = load("DSK1:")
    disk = dm.platform.device("DISK1")
    size = 65536
    assert d.write(h, memoryview(b"sector zero")) == (0, 11)
    assert disk.read_sectors(0, 1)[:11] == b"sector zero"                      # on the device, by DMA
    assert d.seek(h, 0, 0) == (0, 0)
    assert read(d, h, 11) == (0, b"sector zero")
    assert d.seek(h, 510, 0) == (0, 510)
    assert d.write(h, memoryview(b"span")) == (0, 4)                           # across a sector boundary
    assert disk.read_sectors(0, 2)[510:514] == b"span"
    assert d.seek(h, -2, 2) == (0, size - 2)
    assert d.write(h, memoryview(b"abcd")) == (0, 2)
    assert d.write(h, memoryview(b"x")) == (errno.ENOSPC, 0)
    assert read(d, h, 10) == (0, b"")
    big = os.urandom(size)
    assert d.seek(h, 0, 0) == (0, 0)
    assert d.write(h, memoryview(big)) == (0, size)                            # more than one bounce buffer
    assert disk.read_sectors(0, size // 512) == big
    assert d.seek(h, 100, 0) == (0, 100)
    assert read(d, h, size) == (0, big[100:])
    assert d.seek(h, 1, 2) == (errno.EINVAL, 0)
    assert ioctl(d, h, disk_drv.IOCTL_DISK_GET_GEOMETRY) == (0, struct.pack("<qIIII", size // 512, 12, 1, 1, 512))
    assert ioctl(d, h, disk_drv.IOCTL_DISK_GET_LENGTH_INFO) == (0, struct.pack("<q", size))
    assert log == []


def test_ramdisk_handles_have_their_own_position(load):
    d, h, _ = load("DSK1:")
    _, other = d.open(0, 0)
    assert d.write(h, memoryview(b"abc")) == (0, 3)
    assert read(d, other, 3) == (0, b"abc")


def u32(v):
    return struct.pack("<I", v)


@pytest.mark.parametrize("access", ["mapped", "mediated"])
def test_gpio_outputs_and_inputs_on_the_bank(load, kernel_mode, access):
    dm = kernel_mode[0]
    object.__setattr__(kernel_mode[2]["GIO1:"][0].policy, "register_access", access)
    bank = dm.platform.device("GPIO1")
    bank.set_input(1, 1)
    bank.set_input(3, 1)
    d, h, _ = load("GIO1:")
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_READ_PINS) == (0, u32(0b1010))          # all inputs
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_SET_DIRECTION, struct.pack("<II", 0b0011, 0b0011)) == (0, b"")
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_GET_DIRECTION) == (0, u32(0b0011))
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_READ_PINS) == (0, u32(0b1000))          # outputs low, pin 3 in
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_SET_PINS, u32(0b0101)) == (0, b"")
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_READ_PINS) == (0, u32(0b1001))          # pin 2 is an input
    assert bank.outputs() == 0b0001
    assert read(d, h, 4) == (0, u32(0b1001))
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_CLEAR_PINS, u32(0b0001)) == (0, b"")
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_SET_DIRECTION, struct.pack("<II", 0b0100, 0b0100)) == (0, b"")
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_READ_PINS) == (0, u32(0b1100))          # latched pin 2 appears
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_SET_PINS, b"\x01")[0] == errno.EINVAL
    assert read(d, h, 3)[0] == errno.ENOBUFS
    assert d.write(h, memoryview(b"x")) == (errno.EOPNOTSUPP, 0)
    assert ioctl(d, h, 0x80002FFC)[0] == errno.ENOTTY


def test_gpio_waits_for_an_edge_by_interrupt(load, kernel_mode):
    bank = kernel_mode[0].platform.device("GPIO1")
    d, h, _ = load("GIO1:")
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_WAIT_EDGES, struct.pack("<III", 1 << 7, 0, 0)) == (0, u32(0))
    timer = threading.Timer(0.05, bank.set_input, (7, 1))
    timer.start()
    try:
        assert ioctl(d, h, gpio_drv.IOCTL_GPIO_WAIT_EDGES, struct.pack("<III", 1 << 7, 0, 10_000)) == (0, u32(1 << 7))
    finally:
        timer.join()
    bank.set_input(7, 0)                                                         # a falling edge, not asked for
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_WAIT_EDGES, struct.pack("<III", 1 << 7, 0, 0)) == (0, u32(0))


def test_gpio_wait_is_cut_to_max_wait(load, kernel_mode):
    # A client asking for an hour must not hold a request past the host's ProcTimeout: the host,
    # and every driver in it, would be killed.
    d, h, _ = load("GIO1:", MaxWaitMs=20)
    assert ioctl(d, h, gpio_drv.IOCTL_GPIO_WAIT_EDGES, struct.pack("<III", 1 << 6, 0, 3_600_000)) == (0, u32(0))


def test_gpio_second_waiter_is_busy_rather_than_queued(load, kernel_mode):
    # Waits queued one after another would add up past the host's timeout.
    bank = kernel_mode[0].platform.device("GPIO1")
    d, h, _ = load("GIO1:", MaxWaitMs=600_000)
    first = []
    waiter = threading.Thread(target=lambda: first.append(
        ioctl(d, h, gpio_drv.IOCTL_GPIO_WAIT_EDGES, struct.pack("<III", 1 << 6, 0, 600_000))))
    waiter.start()
    try:
        deadline = time.monotonic() + 10
        while not d.driver.waiting.locked() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert ioctl(d, h, gpio_drv.IOCTL_GPIO_WAIT_EDGES, struct.pack("<III", 1 << 6, 0, 0))[0] == errno.EBUSY
    finally:
        # The edge the first waiter waits for, again until it sees one: it may not have enabled
        # edge detection yet when the first comes.
        deadline = time.monotonic() + 10
        while waiter.is_alive() and time.monotonic() < deadline:
            bank.set_input(6, 0)
            bank.set_input(6, 1)
            waiter.join(0.01)
    assert first == [(0, u32(1 << 6))]


def kernel_driver(platform, text: str, name: str):
    """One kernel-mode driver of ``text`` (a registry fragment) with its InProcessKernel."""
    dm = FakeDM(platform)
    hive = parse_text(text).hive
    entry = next(e for e in find_drivers(hive) if e.name == name)
    document = derive_one(hive, entry, [SAMPLES], 1, format_datetime(datetime.now(timezone.utc))).document
    device = KernelDevice(entry, Policy.trusted(document), str(SAMPLES / "uart.py"), dm.audit, loaded=None)
    values = {v.name: v.data for v in hive.key(entry.key_path).values()}
    return dm, device, InProcessKernel(KernelOps(dm), device), values


def test_uart_on_a_real_pseudo_terminal_through_open_device(plat):
    import tty
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        path = os.ttyname(slave)
        text = driver_key("Serial", "COM", "uart.dll", f'"DevicePath"="{path}"\n"DeviceNodes"=multi_sz:"{path}:rw"')
        dm, device, kernel, values = kernel_driver(plat, text, "COM1:")
        d = LoadedDriver("COM1:", device.module_path, values, kernel, Log())
        _, h = d.open(3, 0)
        assert d.write(h, memoryview(b"to the pty")) == (0, 10)
        assert os.read(master, 100) == b"to the pty"
        assert read(d, h, 10) == (0, b"")                                        # nothing yet: no blocking
        os.write(master, b"from the pty")
        got = b""
        for _ in range(100):
            got += read(d, h, 100)[1]
            if got == b"from the pty":
                break
            threading.Event().wait(0.01)
        assert got == b"from the pty"
        d.unload()
        # Without the node in DeviceNodes the Reflector refuses to open it.
        text = driver_key("Serial", "COM", "uart.dll", f'"DevicePath"="{path}"')
        dm, device, kernel, values = kernel_driver(plat, text, "COM1:")
        log = Log()
        from hosts.dispatch import LoadError
        with pytest.raises(LoadError) as info:
            LoadedDriver("COM1:", device.module_path, values, kernel, log)
        assert "PermissionError: [Errno 13] OPEN_DEVICE denied" in info.value.message and dm.audit.denied()[0]["detail"]["op"] == "open_device"
    finally:
        os.close(master)
        os.close(slave)


def test_open_device_never_waits_on_the_reflector(plat, tmp_path):
    # The open runs on the host's reader thread: a FIFO with no reader would have stopped it for
    # good.  It fails at once instead (ENXIO), and what opens is blocking as the driver asked.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    text = driver_key("Serial", "COM", "uart.dll", f'"DeviceNodes"=multi_sz:"{fifo}:rw"')
    _, _, kernel, _ = kernel_driver(plat, text, "COM1:")
    with pytest.raises(OSError) as info:
        kernel.open_device(str(fifo), os.O_WRONLY)
    assert info.value.errno == errno.ENXIO
    fd = kernel.open_device(str(fifo), os.O_RDONLY)
    try:
        assert os.get_blocking(fd)
    finally:
        os.close(fd)
    fd = kernel.open_device(str(fifo), os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert not os.get_blocking(fd)
    finally:
        os.close(fd)
