"""A 16550A UART: the PC COM port, register for register.

Registers (8-bit; offsets from the window's base, e.g. port 0x3F8):

====== ================================ ==========================================
offset read                             write
====== ================================ ==========================================
0      RBR receive buffer (pops a byte) THR transmit holding      (DLL when LCR.DLAB)
1      IER interrupt enable             IER                       (DLM when LCR.DLAB)
2      IIR interrupt identification     FCR FIFO control
3      LCR line control (bit 7 DLAB)    LCR
4      MCR modem control (bit 4 LOOP)   MCR
5      LSR line status                  (ignored: factory test on real parts)
6      MSR modem status                 (ignored)
7      SCR scratch                      SCR
====== ================================ ==========================================

IER: bit 0 received data, bit 1 THR empty, bit 2 line status (overrun), bit 3 modem status.
IIR: bit 0 is 0 while an interrupt is pending; bits 1-3 the source, highest priority first:
0x6 line status (cleared by reading LSR), 0x4 received data at the trigger level, 0xC receive
timeout (data below the trigger level; both cleared by reading RBR until the FIFO is empty),
0x2 THR empty (cleared by reading IIR or writing THR), 0x0 modem status (cleared by reading
MSR); bits 6-7 are set while the FIFOs are enabled.  LSR: bit 0 DR data ready, bit 1 OE
overrun (cleared by reading LSR), bit 5 THRE, bit 6 TEMT.  FCR: bit 0 enable FIFOs (16 bytes;
without them the receiver holds one byte), bit 1 clear receive FIFO, bits 6-7 trigger level
1/4/8/14.  MCR bit 4 loops THR back into the receiver and MCR bits 0-3 into MSR bits 4-7
(DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD); the serial line is disconnected meanwhile.

What the simulation simplifies, on purpose:

* The line is infinitely fast: a byte written to THR is sent at once (THRE and TEMT always
  read 1; the THR-empty interrupt is pending again right after each write), and a receive
  timeout is reported as soon as data below the trigger level waits (a real part waits four
  character times, which the model has no clock for).
* Bytes fed from outside wait on "the wire" (flow control) until the receive FIFO has room,
  unless fed with ``flow_control=False``, which overruns the FIFO as a real sender would.
* On a PC, MCR OUT2 gates the IRQ line; this model does not, so drivers need not set it.
* Baud rate, word length, parity and stop bits are stored and reported, never enforced.
"""

from __future__ import annotations

from collections import deque

from reflector.simhw.config import DeviceConfig
from reflector.simhw.model import DeviceModel
from reflector.simhw.physmem import PhysicalMemory

__all__ = ["Uart16550"]

# Register offsets.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# Bits.
IER_RDA, IER_THRE, IER_RLS, IER_MS = 0x01, 0x02, 0x04, 0x08
IIR_NONE, IIR_RLS, IIR_RDA, IIR_TIMEOUT, IIR_THRE, IIR_MS = 0x01, 0x06, 0x04, 0x0C, 0x02, 0x00
IIR_FIFO = 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08

FIFO_DEPTH = 16
TRIGGER_LEVELS = (1, 4, 8, 14)
CLOCK_DIVIDEND = 115200         # 1.8432 MHz / 16
WIRE_LIMIT = 1 << 20            # bytes waiting on the wire before feed() stops accepting


class Uart16550(DeviceModel):
    MODEL = "uart16550"
    REG_WIDTH = 1
    REG_SPAN = 8
    MAPPED_LIMITS = ("reads have no side effects: RBR is never popped, IIR/LSR/MSR never cleared by a read; "
                     "DLAB sequences and THR writes between two syncs collapse or reorder. Use RegisterAccess="
                     "mediated or the port window for this model; mapped mode shows state only.")

    def __init__(self, config: DeviceConfig, physmem: PhysicalMemory) -> None:
        self._tx_limit = config.int_value("TxBuffer", 65536, 1, 1 << 24)
        super().__init__(config, physmem)
        self._rx: deque[int] = deque()
        self._wire: deque[int] = deque()        # fed from outside, not yet in the receiver
        self._tx = bytearray()
        self.tx_dropped = 0
        self._rbr_last = 0
        self._ier = self._lcr = self._mcr = self._scr = 0
        self._dll, self._dlm = 1, 0             # 115200 baud until the driver says otherwise
        self._fifo = False
        self._trigger = 1
        self._overrun = False
        self._thre_pending = False
        self._modem_in = MSR_CTS | MSR_DSR | MSR_DCD  # the far end: clear to send, ready, carrier
        self._msr_delta = 0
        self._msr_status = self._modem_status()
        with self._op():
            pass                                  # publish the reset state to the page

    # -- outside the driver: the other end of the serial line ----------------------------------

    def feed(self, data: bytes, *, flow_control: bool = True) -> int:
        """Bytes arriving on the serial line; returns how many were taken.

        With flow control they wait on the wire (up to 1 MiB) until the receive FIFO has room;
        without it, bytes that do not fit are lost and set LSR.OE, as on a real line.  In
        loopback the receiver is disconnected from the line.
        """
        data = bytes(data)
        with self._op():
            if flow_control:
                n = min(len(data), WIRE_LIMIT - len(self._wire))
                self._wire.extend(data[:n])
                self._refill()
                return n
            if self._mcr & MCR_LOOP:
                return 0
            taken = 0
            for b in data:
                taken += self._receive(b)
            return taken

    def take_tx(self) -> bytes:
        """Everything the driver transmitted since the last call."""
        with self._lock:
            out, self._tx = bytes(self._tx), bytearray()
            return out

    def set_modem_lines(self, *, cts: bool | None = None, dsr: bool | None = None, ri: bool | None = None,
                        dcd: bool | None = None) -> None:
        """The far end's modem lines (seen in MSR when not in loopback)."""
        with self._op():
            for bit, level in ((MSR_CTS, cts), (MSR_DSR, dsr), (MSR_RI, ri), (MSR_DCD, dcd)):
                if level is not None:
                    self._modem_in = (self._modem_in | bit) if level else (self._modem_in & ~bit)
            self._update_msr()

    # -- internals ------------------------------------------------------------------------------

    def _capacity(self) -> int:
        return FIFO_DEPTH if self._fifo else 1

    def _receive(self, byte: int) -> int:
        if len(self._rx) >= self._capacity():
            self._overrun = True
            return 0
        self._rx.append(byte)
        return 1

    def _refill(self) -> None:
        if self._mcr & MCR_LOOP:
            return
        while self._wire and len(self._rx) < self._capacity():
            self._rx.append(self._wire.popleft())

    def _modem_status(self) -> int:
        if self._mcr & MCR_LOOP:
            m = self._mcr
            return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        return self._modem_in

    def _update_msr(self) -> None:
        old, new = self._msr_status, self._modem_status()
        changed = old ^ new
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if old & MSR_RI and not new & MSR_RI:
            self._msr_delta |= MSR_TERI
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        self._msr_status = new

    def _iir(self) -> int:
        fifo = IIR_FIFO if self._fifo else 0
        if self._ier & IER_RLS and self._overrun:
            return fifo | IIR_RLS
        if self._ier & IER_RDA and self._rx:
            if self._fifo and len(self._rx) < self._trigger:
                return fifo | IIR_TIMEOUT
            return fifo | IIR_RDA
        if self._ier & IER_THRE and self._thre_pending:
            return fifo | IIR_THRE
        if self._ier & IER_MS and self._msr_delta:
            return fifo | IIR_MS
        return fifo | IIR_NONE

    def _lsr(self) -> int:
        return (LSR_DR if self._rx else 0) | (LSR_OE if self._overrun else 0) | LSR_THRE | LSR_TEMT

    def _transmit(self, byte: int) -> None:
        if self._mcr & MCR_LOOP:
            self._receive(byte)
        else:
            self._tx.append(byte)
            if len(self._tx) > self._tx_limit:
                excess = len(self._tx) - self._tx_limit
                del self._tx[:excess]
                self.tx_dropped += excess
        self._thre_pending = True           # the line is infinitely fast: THR is empty again

    # -- registers ------------------------------------------------------------------------------

    def _peek_reg(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            return self._dll if dlab else (self._rx[0] if self._rx else self._rbr_last)
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            return self._iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return self._lsr()
        if offset == MSR:
            return self._msr_status | self._msr_delta
        return self._scr

    def _read_reg(self, offset: int) -> int:
        value = self._peek_reg(offset)
        if offset == RBR and not self._lcr & LCR_DLAB and self._rx:
            self._rbr_last = self._rx.popleft()
            self._refill()
        elif offset == IIR and value & 0x0F == IIR_THRE:
            self._thre_pending = False
        elif offset == LSR:
            self._overrun = False
        elif offset == MSR:
            self._msr_delta = 0
        return value

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                if value & IER_THRE and not self._ier & IER_THRE:
                    self._thre_pending = True   # enabling it while THR is empty interrupts at once
                self._ier = value & 0x0F
        elif offset == FCR:
            enable = bool(value & FCR_ENABLE)
            if enable != self._fifo or value & FCR_CLEAR_RX:
                self._rx.clear()            # changing the FIFO mode clears the FIFOs, as on the part
            self._fifo = enable
            self._trigger = TRIGGER_LEVELS[value >> 6]
            self._refill()
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & 0x1F
            self._update_msr()
            self._refill()
        elif offset == SCR:
            self._scr = value
        # LSR and MSR: writes ignored.

    def _line(self) -> bool:
        return not self._iir() & IIR_NONE

    def _state(self) -> dict:
        divisor = self._dlm << 8 | self._dll
        return {
            "rx_fifo": len(self._rx), "rx_waiting": len(self._wire), "tx_pending": len(self._tx),
            "tx_dropped": self.tx_dropped, "fifo_enabled": self._fifo, "loopback": bool(self._mcr & MCR_LOOP),
            "baud": CLOCK_DIVIDEND // divisor if divisor else None, "lcr": self._lcr, "ier": self._ier,
            "iir": self._iir(), "lsr": self._lsr(),
        }
