"""The GPIO bank: direction, outputs, outside inputs, edge interrupts and write-1-to-clear."""

import pytest

from reflector.simhw.config import DeviceConfig
from reflector.simhw.platform import Platform

BASE, IRQ = 0x1000_1000, 9
DIR, OUT, LEVEL, RISE_EN, FALL_EN, INT_STATUS, INT_CLEAR, OUT_SET, OUT_CLEAR = range(0, 0x24, 4)


@pytest.fixture
def plat():
    p = Platform([DeviceConfig("GPIO1", "gpio", mem=[(BASE, 0x1000)], irq=IRQ)])
    yield p
    p.close()


@pytest.fixture
def gpio(plat):
    return plat.device("GPIO1")


@pytest.fixture
def irqs(plat):
    got = []
    plat.on_interrupt(got.append)
    plat.unmask(IRQ)
    return got


def rd(p, reg):
    return p.mem_read(BASE + reg, 4)


def wr(p, reg, value):
    p.mem_write(BASE + reg, value, 4)


def test_inputs_from_outside_show_in_level(plat, gpio):
    gpio.set_input(3, 1)
    gpio.set_input(31, True)
    assert rd(plat, LEVEL) == (1 << 3) | (1 << 31)
    gpio.set_input(3, 0)
    assert rd(plat, LEVEL) == 1 << 31 and gpio.level(31) == 1


def test_outputs_drive_level_only_when_output(plat, gpio):
    wr(plat, OUT, 0b11)
    assert rd(plat, LEVEL) == 0 and gpio.outputs() == 0     # still inputs
    wr(plat, DIR, 0b01)
    assert rd(plat, LEVEL) == 0b01 and gpio.outputs() == 0b01
    gpio.set_input(0, 0)                                     # the outside cannot override an output
    assert gpio.level(0) == 1


def test_out_set_and_clear_registers_read_zero(plat, gpio):
    wr(plat, DIR, 0xFF)
    wr(plat, OUT_SET, 0x0F)
    wr(plat, OUT_CLEAR, 0x03)
    assert rd(plat, OUT) == 0x0C and rd(plat, OUT_SET) == 0 and rd(plat, OUT_CLEAR) == 0


def test_rising_edge_interrupt_only_when_enabled(plat, gpio, irqs):
    gpio.set_input(5, 1)
    assert rd(plat, INT_STATUS) == 0 and irqs == []          # no edge enabled at the time
    gpio.set_input(5, 0)
    wr(plat, RISE_EN, 1 << 5)
    gpio.set_input(5, 1)
    assert rd(plat, INT_STATUS) == 1 << 5 and irqs == [IRQ]
    gpio.set_input(5, 0)                                      # falling: not enabled
    assert rd(plat, INT_STATUS) == 1 << 5


def test_falling_edge_interrupt(plat, gpio, irqs):
    gpio.set_input(2, 1)
    wr(plat, FALL_EN, 1 << 2)
    assert irqs == []
    gpio.set_input(2, 0)
    assert rd(plat, INT_STATUS) == 1 << 2 and irqs == [IRQ]


def test_write_one_to_clear_and_line_follows_status(plat, gpio, irqs):
    wr(plat, RISE_EN, 0b11)
    gpio.set_input(0, 1)
    gpio.set_input(1, 1)
    assert rd(plat, INT_STATUS) == 0b11
    wr(plat, INT_STATUS, 0b01)
    assert rd(plat, INT_STATUS) == 0b10 and gpio.irq_asserted()
    wr(plat, INT_CLEAR, 0b10)
    assert rd(plat, INT_STATUS) == 0 and not gpio.irq_asserted()
    assert rd(plat, INT_CLEAR) == 0


def test_writing_zero_to_status_clears_nothing(plat, gpio):
    wr(plat, RISE_EN, 1)
    gpio.set_input(0, 1)
    wr(plat, INT_STATUS, 0)
    assert rd(plat, INT_STATUS) == 1


def test_driver_driven_output_edges_interrupt_too(plat, gpio, irqs):
    wr(plat, DIR, 1 << 7)
    wr(plat, RISE_EN, 1 << 7)
    wr(plat, OUT_SET, 1 << 7)
    assert rd(plat, INT_STATUS) == 1 << 7 and irqs == [IRQ]


def test_same_edge_while_masked_is_delivered_once_then_again_after_done(plat, gpio, irqs):
    wr(plat, RISE_EN, 0b11)
    gpio.set_input(0, 1)
    gpio.set_input(1, 1)                                      # line already up and masked
    assert irqs == [IRQ]
    wr(plat, INT_CLEAR, 0b01)
    plat.unmask(IRQ)                                          # done() with pin 1 still pending
    assert irqs == [IRQ, IRQ]
    wr(plat, INT_CLEAR, 0b10)
    plat.unmask(IRQ)
    assert irqs == [IRQ, IRQ]


@pytest.mark.parametrize("pin", [-1, 32, "3", 1.0])
def test_bad_pins_refused(gpio, pin):
    with pytest.raises(ValueError, match="is not one of 0..31"):
        gpio.set_input(pin, 1)
