"""``drvbox hw`` commands on the platform: each verb, and what malformed commands get back."""

import errno
import json

import pytest

from reflector.simhw.commands import run_hw_command
from reflector.simhw.config import DeviceConfig
from reflector.simhw.platform import Platform


@pytest.fixture
def plat():
    p = Platform([DeviceConfig("UART1", "uart16550", io=[(0x3F8, 8)], irq=4),
                  DeviceConfig("DISK1", "blockdev", mem=[(0x1000_0000, 0x1000)], irq=14, values={"SizeBytes": 4096}),
                  DeviceConfig("GPIO1", "gpio", mem=[(0x1000_1000, 0x1000)], irq=9)])
    yield p
    p.close()


def run(plat, **cmd):
    return json.loads(json.dumps(run_hw_command(plat, json.loads(json.dumps(cmd)))))


def fails(plat, code, match, cmd):
    with pytest.raises(OSError, match=match) as e:
        run_hw_command(plat, cmd)
    assert e.value.errno == code


def test_describe(plat):
    assert [d["name"] for d in run(plat, verb="ls")["devices"]] == ["UART1", "DISK1", "GPIO1"]


def test_feed_then_driver_reads_and_tx_is_taken(plat):
    assert run(plat, verb="uart-feed", device="uart1", text="hé") == {"accepted": 3}
    assert bytes(plat.port_read(0x3F8, 1) for _ in range(3)) == "hé".encode()
    assert run(plat, verb="uart-feed", device="UART1", hex="0001ff") == {"accepted": 3}
    plat.port_write(0x3F8, ord("k"), 1)
    assert run(plat, verb="uart-take-tx", device="UART1") == {"hex": "6b", "text": "k"}


def test_set_input_and_modem_lines(plat):
    assert run(plat, verb="gpio-set", device="GPIO1", pin=7, level=1) == {"level": 1}
    assert plat.mem_read(0x1000_1008, 4) == 1 << 7
    run(plat, verb="uart-modem", device="UART1", cts=False)
    assert not plat.port_read(0x3FE, 1) & 0x10


def test_sectors_both_ways(plat):
    run(plat, verb="disk-write", device="DISK1", sector=1, hex="ab" * 512)
    assert run(plat, verb="disk-read", device="DISK1", sector=1, count=1)["hex"] == "ab" * 512


def test_sync(plat):
    assert run(plat, verb="sync") == {"writes": 0}
    assert run(plat, verb="sync", device="GPIO1") == {"writes": 0}


@pytest.mark.parametrize("cmd,code,match", [
    ([], errno.EINVAL, "JSON object"),
    ({"verb": "reboot"}, errno.EINVAL, "unknown verb 'reboot'; known: ls, uart-feed"),
    ({"verb": 3}, errno.EINVAL, "unknown verb 3"),
    ({"verb": "uart-feed", "device": "COM9", "text": "x"}, errno.ENODEV, "no simulated device 'COM9'"),
    ({"verb": "uart-feed", "device": "GPIO1", "text": "x"}, errno.EINVAL, "GPIO1 is a gpio, not a uart16550"),
    ({"verb": "uart-feed", "device": "UART1"}, errno.EINVAL, "exactly one of"),
    ({"verb": "uart-feed", "device": "UART1", "hex": "zz"}, errno.EINVAL, "not hex"),
    ({"verb": "uart-feed", "device": "UART1", "hex": "00" * 65537}, errno.EINVAL, "longer than 65536"),
    ({"verb": "gpio-set", "device": "GPIO1", "pin": 32, "level": 1}, errno.EINVAL, "not one of 0..31"),
    ({"verb": "gpio-set", "device": "GPIO1", "pin": 1, "level": 2}, errno.EINVAL, "not 0 or 1"),
    ({"verb": "gpio-set", "device": "GPIO1", "pin": True, "level": 1}, errno.EINVAL, "must be an integer"),
    ({"verb": "disk-read", "device": "DISK1", "sector": 0, "count": 129}, errno.EINVAL, "not in 1..128"),
    ({"verb": "disk-read", "device": "DISK1", "sector": 8, "count": 1}, errno.EINVAL, "not on a disk of 8"),
    ({"verb": "disk-write", "device": "DISK1", "sector": 0, "hex": "00"}, errno.EINVAL, "whole number"),
    ({"verb": "uart-take-tx"}, errno.EINVAL, "missing field 'device'"),
])
def test_malformed_commands_refused(plat, cmd, code, match):
    fails(plat, code, match, cmd)
