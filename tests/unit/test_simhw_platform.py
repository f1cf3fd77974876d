"""The platform: attaching models, refusing bad layouts, address decoding, interrupts, the registry."""

import json
import os
import threading
from pathlib import Path

import pytest

import reflector.drivers
from policy.hive import Hive, Value
from policy.regfile import parse_files, parse_text
from reflector.simhw.config import DeviceConfig, Window
from reflector.simhw.errors import AddressError, PlatformConfigError
from reflector.simhw.physmem import DMA_ZONE_BASE, PhysicalMemory
from reflector.simhw.platform import Platform

PLATFORM_REG = Path(reflector.drivers.__file__).resolve().parent / "platform.reg"


def uart(name="UART1", io=0x3F8, irq=4, **kw):
    return DeviceConfig(name, "uart16550", io=[(io, 8)], irq=irq, **kw)


def gpio(name="GPIO1", mem=0x1000_1000, irq=9, length=0x1000):
    return DeviceConfig(name, "gpio", mem=[(mem, length)], irq=irq)


@pytest.fixture
def plat():
    p = Platform([uart(), gpio(), DeviceConfig("DISK1", "ramdisk", mem=[(0x1000_0000, 0x1000)], irq=14)])
    yield p
    p.close()


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


# -- layout ----------------------------------------------------------------------------------

def test_adjacent_windows_allowed():
    p = Platform([gpio("A", 0x1000_0000), gpio("B", 0x1000_1000, irq=10)])
    p.close()


def test_overlapping_memory_windows_refused_naming_both():
    with pytest.raises(PlatformConfigError) as e:
        Platform([gpio("A", 0x1000_0000), gpio("B", 0x1000_0FFF, irq=10)])
    assert str(e.value) == ('device B "MemBase": window MemBase 0x10000fff MemLen 0x1000 overlaps device A '
                            "MemBase 0x10000000 MemLen 0x1000 (fix: move one of them under HKLM\\Platform\\Devices)")


def test_overlapping_port_windows_refused_naming_both():
    with pytest.raises(PlatformConfigError, match=r'device COM2 "IoBase": window IoBase 0x3ff IoLen 0x8 overlaps '
                                                  r"device UART1 IoBase 0x3f8 IoLen 0x8"):
        Platform([uart(), uart("COM2", io=0x3FF, irq=3)])


def test_memory_and_port_windows_do_not_collide():
    p = Platform([uart(io=0x100), DeviceConfig("G", "gpio", mem=[(0x100, 0x100)])])
    p.close()


def test_window_in_the_dma_zone_refused():
    with pytest.raises(PlatformConfigError, match="overlaps the DMA zone 0x80000000..0x90000000"):
        Platform([gpio(mem=DMA_ZONE_BASE + 0x1000)])


def test_own_windows_overlapping_refused():
    with pytest.raises(PlatformConfigError, match="overlaps itself"):
        Platform([DeviceConfig("G", "gpio", mem=[(0x1000, 0x100), (0x1080, 0x100)])])


def test_shared_irq_refused():
    with pytest.raises(PlatformConfigError, match=r'device GPIO1 "Irq": 4 is already the line of device UART1'):
        Platform([uart(), gpio(irq=4)])


def test_duplicate_names_refused_case_insensitively():
    with pytest.raises(PlatformConfigError, match="defined twice"):
        Platform([gpio("gpio1"), gpio("GPIO1", mem=0x2000_0000, irq=10)])


def test_unknown_model_refused_listing_models():
    with pytest.raises(PlatformConfigError, match=r'"Model": is \'dac\', which is no simulated model '
                                                  r"\(fix: use one of blockdev, gpio, ramdisk, uart16550\)"):
        Platform([DeviceConfig("X", "dac", mem=[(0x1000, 0x10)])])


@pytest.mark.parametrize("kw,match", [
    (dict(mem=[(0x1000, 0)]), '"MemLen": is 0x0'),
    (dict(io=[(0xFFFF, 2)]), '"IoBase": window 0xffff\\+0x2 runs outside 0..0xffff'),
    (dict(mem=[(-1, 4)]), '"MemBase": window'),
    (dict(mem=[(0x1000, 4)], irq=256), '"Irq": is 256, outside 0..255'),
    (dict(), "has no MemBase/MemLen and no IoBase/IoLen"),
])
def test_bad_device_configs_refused(kw, match):
    with pytest.raises(PlatformConfigError, match=match):
        DeviceConfig("X", "gpio", **kw)


def test_failed_construction_leaks_no_fds():
    before = open_fds()
    pm = PhysicalMemory()
    with pytest.raises(PlatformConfigError):
        Platform([gpio("A"), DeviceConfig("D", "ramdisk", mem=[(0x2000_0000, 0x1000)], values={"SizeBytes": 3})], pm)
    pm.close()
    assert open_fds() == before


def test_close_leaks_no_fds():
    before = open_fds()
    p = Platform([uart(), gpio()])
    p.physmem.alloc(10, owner=1)
    p.close()
    assert open_fds() == before


# -- decoding --------------------------------------------------------------------------------

def test_find_mem_last_byte_allowed_one_past_denied(plat):
    model, off = plat.find_mem(0x1000_1FFC, 4)
    assert model.name == "GPIO1" and off == 0xFFC
    with pytest.raises(AddressError, match="memory range 0x10001ffd\\+0x4 is not within one window"):
        plat.find_mem(0x1000_1FFD, 4)


def test_find_mem_straddling_two_devices_denied(plat):
    with pytest.raises(AddressError):
        plat.find_mem(0x1000_0FFC, 8)        # DISK1's last word and GPIO1's first


def test_find_mem_below_and_nonsense_denied(plat):
    with pytest.raises(AddressError):
        plat.find_mem(0x0FFF_FFFC, 4)
    with pytest.raises(AddressError, match="positive length"):
        plat.find_mem(0x1000_0000, 0)


def test_port_window_edges(plat):
    plat.port_write(0x3FF, 0x12, 1)
    assert plat.port_read(0x3FF, 1) == 0x12
    with pytest.raises(AddressError):
        plat.port_read(0x3F7, 1)


def test_device_lookup_case_insensitive_and_listing(plat):
    assert plat.device("uart1").name == "UART1"
    with pytest.raises(LookupError, match="devices: UART1, GPIO1, DISK1"):
        plat.device("COM9")


# -- interrupts ------------------------------------------------------------------------------

def test_lines_start_masked_and_deliver_once_until_done(plat):
    got = []
    plat.on_interrupt(got.append)
    u = plat.device("UART1")
    plat.port_write(0x3F9, 1, 1)
    u.feed(b"ab")
    assert got == [] and plat.is_masked(4)           # nobody hooked IRQ 4 yet
    plat.unmask(4)                                   # InterruptInitialize: delivered at once
    assert got == [4] and plat.is_masked(4)
    u.feed(b"c")
    assert got == [4]                                # masked until done()
    plat.port_read(0x3F8, 1)
    plat.unmask(4)                                   # done() while data remains: again
    assert got == [4, 4]


def test_interrupt_reaches_only_its_irq(plat):
    got = []
    plat.on_interrupt(got.append)
    plat.unmask(4)
    plat.unmask(9)
    plat.mem_write(0x1000_100C, 1, 4)                # GPIO RISE_EN pin 0
    plat.device("GPIO1").set_input(0, 1)
    assert got == [9]


def test_level_gone_while_masked_is_not_delivered(plat):
    got = []
    plat.on_interrupt(got.append)
    g = plat.device("GPIO1")
    plat.mem_write(0x1000_100C, 1, 4)
    g.set_input(0, 1)
    plat.mem_write(0x1000_1018, 1, 4)                # cleared before anyone unmasked
    plat.unmask(9)
    assert got == []


def test_mask_stops_delivery_and_unregister(plat):
    got = []
    remove = plat.on_interrupt(got.append)
    plat.unmask(9)
    plat.mask(9)
    plat.mem_write(0x1000_100C, 1, 4)
    plat.device("GPIO1").set_input(0, 1)
    assert got == []
    remove()
    plat.unmask(9)
    assert got == []


def test_unknown_irq_refused(plat):
    with pytest.raises(ValueError, match=r"no simulated device raises IRQ 5 \(wired IRQs: 4, 9, 14\)"):
        plat.unmask(5)


def test_callback_may_call_back_into_the_model(plat):
    """Callbacks run with no lock held: an ISR-like callback reading the device does not deadlock."""
    seen = []

    def isr(irq):
        seen.append(plat.port_read(0x3FA, 1))        # IIR
        seen.append(plat.port_read(0x3F8, 1))        # RBR
    plat.on_interrupt(isr)
    plat.unmask(4)
    plat.port_write(0x3F9, 1, 1)
    plat.device("UART1").feed(b"x")
    assert seen == [0x04, ord("x")]


def test_failing_callback_does_not_starve_others(plat):
    got = []

    def broken(irq):
        raise RuntimeError("listener bug")
    plat.on_interrupt(broken)
    plat.on_interrupt(got.append)
    plat.unmask(9)
    plat.mem_write(0x1000_100C, 1, 4)
    with pytest.raises(RuntimeError, match="listener bug"):
        plat.device("GPIO1").set_input(0, 1)
    assert got == [9]


def test_concurrent_feeders_and_readers_lose_no_byte(plat):
    u = plat.device("UART1")
    plat.port_write(0x3FA, 0x01, 1)                  # FIFOs on
    data = bytes(range(256)) * 8
    out = bytearray()

    def feeder():
        for i in range(0, len(data), 16):
            u.feed(data[i:i + 16])
    t = threading.Thread(target=feeder)
    t.start()
    while len(out) < len(data):
        if plat.port_read(0x3FD, 1) & 1:
            out.append(plat.port_read(0x3F8, 1))
    t.join()
    assert bytes(out) == data


# -- describe --------------------------------------------------------------------------------

def test_describe_is_json_and_complete(plat):
    plat.bind_dma("DISK1", "host2")
    d = {x["name"]: x for x in json.loads(json.dumps(plat.describe()))}
    assert set(d) == {"UART1", "GPIO1", "DISK1"}
    assert d["UART1"]["io"] == [[0x3F8, 8]] and d["UART1"]["irq"] == 4 and d["UART1"]["masked"] is True
    assert d["DISK1"]["state"]["sectors"] == 2048 and d["DISK1"]["dma_owner"] == "host2"
    assert "INT_CLEAR" in d["GPIO1"]["mapped_limits"]


# -- the registry ----------------------------------------------------------------------------

def test_from_registry_reads_windows_irq_and_model_values():
    h = Hive()
    k = r"HKLM\Platform\Devices\UART1"
    h.set_value(k, Value("Model", "sz", "UART16550"))
    h.set_value(k, Value("IoBase", "dword", 0x3F8))
    h.set_value(k, Value("IoLen", "dword", 8))
    h.set_value(k, Value("MemBase", "multi_sz", ("10002000", "0x10004000")))
    h.set_value(k, Value("MemLen", "multi_sz", ("1000", "100")))
    h.set_value(k, Value("Irq", "dword", 4))
    h.set_value(k, Value("TxBuffer", "dword", 128))
    p = Platform.from_registry(h)
    try:
        u = p.device("UART1")
        assert u.config.io == (Window(0x3F8, 8),)
        assert u.config.mem == (Window(0x1000_2000, 0x1000), Window(0x1000_4000, 0x100))
        assert u.config.irq == 4 and u.config.value("txbuffer") == 128
        assert p.find_mem(0x1000_4000, 1)[0] is u
    finally:
        p.close()


def test_from_registry_without_devices_is_an_empty_platform():
    p = Platform.from_registry(Hive())
    assert p.describe() == []
    p.close()


def reg_error(text):
    hive = parse_text(text, "plat.reg", strict=True).hive
    with pytest.raises(PlatformConfigError) as e:
        Platform.from_registry(hive)
    return str(e.value)


def test_registry_errors_name_file_line_device_and_value():
    msg = reg_error('[HKLM\\Platform\\Devices\\G]\n"Model"="gpio"\n"MemBase"=dword:1000\n')
    assert msg == 'plat.reg:3:1: device G "MemBase": is given without MemLen (fix: add MemLen or remove MemBase)'
    msg = reg_error('[HKLM\\Platform\\Devices\\G]\n"Model"="gpio"\n"MemBase"=multi_sz:"1000","zz"\n'
                    '"MemLen"=multi_sz:"10","10"\n')
    assert msg.startswith('plat.reg:3:1: device G "MemBase": item \'zz\' is not a hex number')
    msg = reg_error('[HKLM\\Platform\\Devices\\G]\n"Model"="gpio"\n"MemBase"=multi_sz:"1000","2000"\n'
                    '"MemLen"=multi_sz:"10"\n')
    assert 'plat.reg:4:1: device G "MemLen": lists 1 lengths for 2 bases' in msg
    msg = reg_error('[HKLM\\Platform\\Devices\\G]\n"MemBase"=dword:1000\n"MemLen"=dword:10\n')
    assert 'device G "Model": is missing' in msg
    msg = reg_error('[HKLM\\Platform\\Devices\\G]\n"Model"="gpio"\n"IoBase"=dword:100\n"IoLen"=dword:0\n')
    assert msg.startswith('plat.reg:4:1: device G "IoLen": is 0x0')


def test_builtin_platform_reg_parses_strictly_and_attaches():
    hive = parse_files([PLATFORM_REG], strict=True).hive
    p = Platform.from_registry(hive)
    try:
        d = {x["name"]: x for x in p.describe()}
        assert d["UART1"]["io"] == [[0x3F8, 8]] and d["UART1"]["irq"] == 4
        assert d["DISK1"]["mem"] == [[0x1000_0000, 0x1000]] and d["DISK1"]["irq"] == 14
        assert d["DISK1"]["state"]["size_bytes"] == 1 << 20
        assert d["GPIO1"]["mem"] == [[0x1000_1000, 0x1000]] and d["GPIO1"]["irq"] == 9
    finally:
        p.close()


def test_builtin_drivers_match_their_hardware_and_sample_ioctls():
    """Each driver key's windows and IRQ are its device's, and IoctlAllow lists the sample's codes."""
    from reflector.drivers import gpio as gpio_drv, ramdisk as ramdisk_drv, uart as uart_drv
    hive = parse_files([PLATFORM_REG], strict=True).hive
    for key_name, device, module in (("Serial", "UART1", uart_drv), ("Ramdisk", "DISK1", ramdisk_drv),
                                     ("GPIO", "GPIO1", gpio_drv)):
        drv = hive.key(rf"HKLM\Drivers\BuiltIn\{key_name}")
        dev = hive.key(rf"HKLM\Platform\Devices\{device}")
        assert drv.get("Flags").data & 0x10, key_name
        assert drv.get("Irq").data == dev.get("Irq").data, key_name
        for base, length in (("IoBase", "IoLen"), ("MemBase", "MemLen")):
            if drv.get(base) is not None:
                assert (drv.get(base).data, drv.get(length).data) == (dev.get(base).data, dev.get(length).data)
        codes = {int(c, 16) for c in drv.get("IoctlAllow").data}
        assert codes == {v for k, v in vars(module).items() if k.startswith("IOCTL_")}, key_name
    for group in ("ProcGroup_0001", "ProcGroup_0002"):
        k = hive.key(rf"HKLM\Drivers\{group}")
        assert k.get("ProcTimeout").data == 5000 and k.get("ProcName") is not None


def test_dma_zone_from_the_registry_moves_out_of_the_way_of_devices():
    text = ('[HKLM\\Platform]\n"DmaBase"=dword:20000000\n"DmaSize"=dword:00100000\n'
            '[HKLM\\Platform\\Devices\\G]\n"Model"="gpio"\n"MemBase"=dword:80000000\n"MemLen"=dword:1000\n')
    p = Platform.from_registry(parse_text(text, "plat.reg", strict=True).hive)
    try:
        assert (p.physmem.base, p.physmem.size) == (0x2000_0000, 0x10_0000)
        assert p.physmem.alloc(1, owner=1).phys == 0x2000_0000
    finally:
        p.close()


def test_dma_zone_half_given_or_unaligned_refused():
    msg = reg_error('[HKLM\\Platform]\n"DmaBase"=dword:20000000\n')
    assert msg == ('plat.reg:2:1: device (platform) "DmaBase": is given without DmaSize '
                   '(fix: add DmaSize under [HKEY_LOCAL_MACHINE\\Platform])')
    msg = reg_error('[HKLM\\Platform]\n"DmaBase"=dword:20000001\n"DmaSize"=dword:1000\n')
    assert "page-aligned" in msg
