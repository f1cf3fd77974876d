"""The 16550 model through its port window: real offsets and bits, FIFO, interrupts, loopback."""

import pytest

from reflector.simhw.config import DeviceConfig
from reflector.simhw.errors import RegisterAccessError
from reflector.simhw.platform import Platform

BASE = 0x3F8
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


@pytest.fixture
def plat():
    p = Platform([DeviceConfig("UART1", "uart16550", io=[(BASE, 8)], irq=4)])
    yield p
    p.close()


@pytest.fixture
def irqs(plat):
    got = []
    plat.on_interrupt(got.append)
    plat.unmask(4)
    return got


def rd(p, reg):
    return p.port_read(BASE + reg, 1)


def wr(p, reg, value):
    p.port_write(BASE + reg, value, 1)


def test_reset_state(plat):
    assert rd(plat, IIR) == 0x01            # no interrupt pending
    assert rd(plat, LSR) == 0x60            # THRE | TEMT, no data
    assert rd(plat, IER) == 0 and rd(plat, LCR) == 0 and rd(plat, MCR) == 0


def test_transmit_goes_out_and_take_tx_empties(plat):
    uart = plat.device("UART1")
    for b in b"hi!":
        wr(plat, THR, b)
    assert uart.take_tx() == b"hi!"
    assert uart.take_tx() == b""
    assert rd(plat, LSR) & 0x60 == 0x60


def test_receive_sets_dr_and_rbr_pops(plat):
    uart = plat.device("UART1")
    wr(plat, FCR, 0x01)                     # FIFOs on
    assert uart.feed(b"ab") == 2
    assert rd(plat, LSR) & 0x01
    assert rd(plat, RBR) == ord("a")
    assert rd(plat, RBR) == ord("b")
    assert not rd(plat, LSR) & 0x01


def test_without_fifo_receiver_holds_one_byte_and_the_rest_waits_on_the_wire(plat):
    uart = plat.device("UART1")
    assert uart.feed(b"xyz") == 3
    assert uart.describe()["state"]["rx_fifo"] == 1
    assert bytes(rd(plat, RBR) for _ in range(3)) == b"xyz"


def test_overrun_without_flow_control(plat):
    uart = plat.device("UART1")
    wr(plat, FCR, 0x01)
    assert uart.feed(bytes(20), flow_control=False) == 16
    lsr = rd(plat, LSR)
    assert lsr & 0x02                       # OE
    assert not rd(plat, LSR) & 0x02         # cleared by reading LSR


def test_dlab_switches_offsets_0_and_1_to_the_divisor(plat):
    uart = plat.device("UART1")
    wr(plat, LCR, 0x80)
    wr(plat, DLL, 0x0C)
    wr(plat, DLM, 0x00)
    assert rd(plat, DLL) == 0x0C and rd(plat, DLM) == 0
    wr(plat, LCR, 0x03)                     # 8N1, DLAB off
    assert uart.describe()["state"]["baud"] == 9600
    assert rd(plat, IER) == 0               # IER untouched by the DLM write
    assert uart.take_tx() == b""            # the DLL write did not transmit


def test_scratch_register(plat):
    wr(plat, SCR, 0x5A)
    assert rd(plat, SCR) == 0x5A


def test_rx_interrupt_only_when_ier_bit0_set(plat, irqs):
    uart = plat.device("UART1")
    uart.feed(b"a")
    assert irqs == []                       # IER = 0: the line stays low
    assert rd(plat, IIR) == 0x01
    wr(plat, IER, 0x01)
    assert irqs == [4]
    assert rd(plat, IIR) == 0x04            # received data available
    rd(plat, RBR)
    assert rd(plat, IIR) == 0x01
    assert not uart.irq_asserted()


def test_fifo_trigger_level_and_timeout_source(plat):
    uart = plat.device("UART1")
    wr(plat, FCR, 0x01 | 0x40)              # FIFOs on, trigger at 4 bytes
    wr(plat, IER, 0x01)
    uart.feed(b"ab")
    assert rd(plat, IIR) == 0xCC            # FIFO bits + character timeout (below the trigger)
    uart.feed(b"cd")
    assert rd(plat, IIR) == 0xC4            # at the trigger level: data available


def test_thre_interrupt_on_enable_cleared_by_iir_read_and_rearmed_by_write(plat, irqs):
    wr(plat, IER, 0x02)
    assert irqs == [4]
    assert rd(plat, IIR) == 0x02            # THR empty; reading IIR clears it
    assert rd(plat, IIR) == 0x01
    plat.unmask(4)                          # InterruptDone
    wr(plat, THR, 0x41)
    assert irqs == [4, 4]
    assert rd(plat, IIR) == 0x02


def test_interrupt_priority_line_status_before_data_before_thre(plat):
    uart = plat.device("UART1")
    wr(plat, IER, 0x07)
    uart.feed(b"ab", flow_control=False)    # one byte held, one overrun
    assert rd(plat, IIR) == 0x06
    rd(plat, LSR)
    assert rd(plat, IIR) == 0x04
    rd(plat, RBR)
    assert rd(plat, IIR) == 0x02


def test_loopback_sends_thr_to_receiver_and_not_to_the_line(plat):
    uart = plat.device("UART1")
    wr(plat, FCR, 0x01)
    wr(plat, MCR, 0x10)
    wr(plat, THR, 0x55)
    assert uart.take_tx() == b""
    assert rd(plat, LSR) & 0x01
    assert rd(plat, RBR) == 0x55
    uart.feed(b"z")                          # the line is disconnected meanwhile ...
    assert not rd(plat, LSR) & 0x01
    wr(plat, MCR, 0x00)
    assert rd(plat, RBR) == ord("z")        # ... and the byte arrives when loopback ends


def test_loopback_mirrors_modem_control_into_modem_status(plat):
    wr(plat, MCR, 0x10 | 0x01 | 0x02)       # LOOP, DTR, RTS
    msr = rd(plat, MSR)
    assert msr & 0xF0 == 0x30               # DSR (from DTR) and CTS (from RTS)
    assert msr & 0x0F                       # deltas
    assert rd(plat, MSR) & 0x0F == 0        # cleared by reading MSR


def test_modem_status_interrupt(plat, irqs):
    uart = plat.device("UART1")
    rd(plat, MSR)
    wr(plat, IER, 0x08)
    uart.set_modem_lines(cts=False)
    assert irqs == [4]
    assert rd(plat, IIR) == 0x00
    assert rd(plat, MSR) & 0x01             # DCTS
    assert rd(plat, IIR) == 0x01


def test_fcr_clear_receive_fifo(plat):
    uart = plat.device("UART1")
    wr(plat, FCR, 0x01)
    uart.feed(b"abc")
    wr(plat, FCR, 0x03)
    assert not rd(plat, LSR) & 0x01


def test_tx_buffer_is_bounded():
    p = Platform([DeviceConfig("U", "uart16550", io=[(BASE, 8)], values={"TxBuffer": 4})])
    try:
        for b in b"abcdef":
            p.port_write(BASE, b, 1)
        uart = p.device("U")
        assert uart.take_tx() == b"cdef" and uart.tx_dropped == 2
    finally:
        p.close()


def test_wide_access_refused(plat):
    with pytest.raises(RegisterAccessError, match="8-bit registers"):
        plat.port_read(BASE, 2)


def test_port_one_past_the_window_refused(plat):
    from reflector.simhw.errors import AddressError
    assert plat.port_read(BASE + 7, 1) == 0
    with pytest.raises(AddressError, match="0x400"):
        plat.port_read(BASE + 8, 1)
