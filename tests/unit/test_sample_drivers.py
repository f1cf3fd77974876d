"""The sample drivers of reflector/drivers (uart, ramdisk, gpio) through LoadedDriver, as the
host and kernel mode run them: documented behaviour, and refusals of malformed requests."""

import errno
import struct
from pathlib import Path

import pytest

import reflector.drivers
from hosts import DriverError
from hosts.dispatch import LoadedDriver, LoadError
from hosts.ioctl import ctl_code, pack_out, unpack_in
from reflector.drivers import gpio, ramdisk, uart

SAMPLES = Path(reflector.drivers.__file__).resolve().parent


class Log(list):
    def __call__(self, level, message):
        self.append(message)


def load(name, registry=None, device="TST1:"):
    log = Log()
    driver = LoadedDriver(device, str(SAMPLES / name), registry or {}, None, log)
    status, h = driver.open(3, 0)
    assert status == 0
    return driver, h, log


def ioctl(d, h, code, inp=b"", out_len=64):
    out = memoryview(bytearray(out_len))
    status, n = d.ioctl(h, code, memoryview(inp), out)
    return status, bytes(out[:n])


def read(d, h, n):
    out = memoryview(bytearray(n))
    status, got = d.read(h, out)
    return status, bytes(out[:got])


# -- helpers --------------------------------------------------------------------------------------

def test_ctl_code_matches_ce():
    assert ctl_code(0x1B, 1) == 0x001B0004            # IOCTL_SERIAL_SET_BAUD_RATE
    assert ctl_code(0x07, 0) == 0x00070000            # IOCTL_DISK_GET_GEOMETRY
    assert ctl_code(0x07, 0x17, 0, 1) == 0x0007405C   # IOCTL_DISK_GET_LENGTH_INFO
    with pytest.raises(ValueError):
        ctl_code(0x10000, 0)
    with pytest.raises(ValueError):
        ctl_code(0x22, 0x1000)


def test_buffer_helpers_refuse_wrong_sizes():
    with pytest.raises(DriverError) as info:
        unpack_in(memoryview(b"abc"), "<I")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(DriverError) as info:
        pack_out(memoryview(bytearray(3)), "<I", 1)
    assert info.value.errno == errno.ENOBUFS


# -- uart ---------------------------------------------------------------------------------------

def test_uart_loopback():
    d, h, log = load("uart.py")
    assert d.write(h, memoryview(b"hello")) == (0, 5)
    assert read(d, h, 3) == (0, b"hel")
    assert read(d, h, 10) == (0, b"lo")
    assert read(d, h, 10) == (0, b"")
    assert d.seek(h, 0, 0) == (errno.EOPNOTSUPP, 0)
    assert log == []


def test_uart_baud_rate():
    d, h, _ = load("uart.py", {"BaudRate": 9600})
    assert ioctl(d, h, uart.IOCTL_SERIAL_GET_BAUD_RATE) == (0, struct.pack("<I", 9600))
    assert ioctl(d, h, uart.IOCTL_SERIAL_SET_BAUD_RATE, struct.pack("<I", 57600)) == (0, b"")
    assert ioctl(d, h, uart.IOCTL_SERIAL_GET_BAUD_RATE) == (0, struct.pack("<I", 57600))
    assert ioctl(d, h, uart.IOCTL_SERIAL_SET_BAUD_RATE, struct.pack("<I", 12345))[0] == errno.EINVAL
    assert ioctl(d, h, uart.IOCTL_SERIAL_SET_BAUD_RATE, b"\x00\x96")[0] == errno.EINVAL
    assert ioctl(d, h, uart.IOCTL_SERIAL_GET_BAUD_RATE, out_len=2)[0] == errno.ENOBUFS


def test_uart_refuses_nonstandard_registry_baud():
    with pytest.raises(LoadError) as info:
        load("uart.py", {"BaudRate": 1234})
    assert info.value.errno == errno.EINVAL


def test_uart_status_overrun_and_purge():
    d, h, _ = load("uart.py")
    assert d.write(h, memoryview(b"x" * (uart.FIFO_SIZE + 10))) == (0, uart.FIFO_SIZE)
    assert ioctl(d, h, uart.IOCTL_SERIAL_GET_COMMSTATUS) == (
        0, struct.pack("<IIII", uart.CE_OVERRUN, 0, uart.FIFO_SIZE, 0))
    # reading the status clears the error
    assert ioctl(d, h, uart.IOCTL_SERIAL_GET_COMMSTATUS)[1][:4] == b"\0\0\0\0"
    assert ioctl(d, h, uart.IOCTL_SERIAL_PURGE, struct.pack("<I", 0xF)) == (0, b"")
    assert ioctl(d, h, uart.IOCTL_SERIAL_GET_COMMSTATUS) == (0, bytes(16))
    assert ioctl(d, h, 0x001B0FFC)[0] == errno.ENOTTY


# -- ramdisk ------------------------------------------------------------------------------------

def test_ramdisk_seek_read_write():
    d, h, _ = load("ramdisk.py", {"SizeBytes": 4096})
    assert d.write(h, memoryview(b"sector zero")) == (0, 11)
    assert d.seek(h, 0, 0) == (0, 0)
    assert read(d, h, 11) == (0, b"sector zero")
    assert d.seek(h, 512, 0) == (0, 512)
    assert d.write(h, memoryview(b"one")) == (0, 3)
    assert d.seek(h, -3, 1) == (0, 512)
    assert read(d, h, 3) == (0, b"one")
    assert d.seek(h, -2, 2) == (0, 4094)
    assert d.write(h, memoryview(b"abcd")) == (0, 2)        # cut at the end
    assert d.write(h, memoryview(b"x")) == (errno.ENOSPC, 0)
    assert read(d, h, 10) == (0, b"")
    assert d.seek(h, 1, 2) == (errno.EINVAL, 0)
    assert d.seek(h, -1, 0) == (errno.EINVAL, 0)
    assert d.seek(h, 0, 3) == (errno.EINVAL, 0)


def test_ramdisk_handles_have_their_own_position():
    d, h, _ = load("ramdisk.py", {"SizeBytes": 1024})
    _, other = d.open(0, 0)
    assert d.write(h, memoryview(b"abc")) == (0, 3)
    assert read(d, other, 3) == (0, b"abc")


def test_ramdisk_geometry_and_length():
    d, h, _ = load("ramdisk.py", {"sizebytes": 1 << 20})
    assert ioctl(d, h, ramdisk.IOCTL_DISK_GET_GEOMETRY) == (0, struct.pack("<qIIII", 2048, 12, 1, 1, 512))
    assert ioctl(d, h, ramdisk.IOCTL_DISK_GET_LENGTH_INFO) == (0, struct.pack("<q", 1 << 20))
    assert ioctl(d, h, ramdisk.IOCTL_DISK_GET_GEOMETRY, out_len=23)[0] == errno.ENOBUFS
    assert ioctl(d, h, ramdisk.IOCTL_DISK_GET_GEOMETRY, b"x")[0] == errno.EINVAL


@pytest.mark.parametrize("size", [0, 100, 513, ramdisk.MAX_SIZE + 512])
def test_ramdisk_refuses_bad_sizes(size):
    with pytest.raises(LoadError) as info:
        load("ramdisk.py", {"SizeBytes": size})
    assert info.value.errno == errno.EINVAL


# -- gpio ---------------------------------------------------------------------------------------

def u32(v):
    return struct.pack("<I", v)


def test_gpio_outputs_and_inputs():
    d, h, _ = load("gpio.py", {"InputLevels": 0b1010})
    assert ioctl(d, h, gpio.IOCTL_GPIO_READ_PINS) == (0, u32(0b1010))          # all inputs
    assert ioctl(d, h, gpio.IOCTL_GPIO_SET_DIRECTION, struct.pack("<II", 0b0011, 0b0011)) == (0, b"")
    assert ioctl(d, h, gpio.IOCTL_GPIO_GET_DIRECTION) == (0, u32(0b0011))
    assert ioctl(d, h, gpio.IOCTL_GPIO_READ_PINS) == (0, u32(0b1000))          # outputs low, pin 3 in
    assert ioctl(d, h, gpio.IOCTL_GPIO_SET_PINS, u32(0b0101)) == (0, b"")
    assert ioctl(d, h, gpio.IOCTL_GPIO_READ_PINS) == (0, u32(0b1001))          # pin 2 is an input
    assert read(d, h, 4) == (0, u32(0b1001))
    assert ioctl(d, h, gpio.IOCTL_GPIO_CLEAR_PINS, u32(0b0001)) == (0, b"")
    assert ioctl(d, h, gpio.IOCTL_GPIO_SET_DIRECTION, struct.pack("<II", 0b0100, 0b0100)) == (0, b"")
    assert ioctl(d, h, gpio.IOCTL_GPIO_READ_PINS) == (0, u32(0b1100))          # latched pin 2 appears


def test_gpio_refuses_malformed_requests():
    d, h, _ = load("gpio.py")
    assert ioctl(d, h, gpio.IOCTL_GPIO_SET_PINS, b"\x01")[0] == errno.EINVAL
    assert ioctl(d, h, gpio.IOCTL_GPIO_SET_DIRECTION, u32(1))[0] == errno.EINVAL
    assert ioctl(d, h, gpio.IOCTL_GPIO_READ_PINS, out_len=3)[0] == errno.ENOBUFS
    assert read(d, h, 3)[0] == errno.ENOBUFS
    assert d.write(h, memoryview(b"x")) == (errno.EOPNOTSUPP, 0)
    assert ioctl(d, h, 0x80002FFC)[0] == errno.ENOTTY
