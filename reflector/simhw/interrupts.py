"""Interrupt lines between the models and the Reflector, with Windows CE's masking rule.

CE's sequence: the device asserts its line; the kernel masks the line and signals the event of
the driver that called ``InterruptInitialize``; the driver's thread wakes from
``WaitForSingleObject``, services the device (which drops the line), and calls
``InterruptDone``, which unmasks it.  If the device still asserts the line then, the driver is
signalled again at once.  Here:

* every line starts **masked**: nothing is delivered until the Reflector unmasks it for the
  driver that hooked it (its ``interrupt(irq)``);
* an unmasked line that is asserted is masked and delivered once to every callback
  (``on_interrupt``), and stays masked until :meth:`InterruptLines.unmask` (``done()``);
* unmasking a line that is still asserted delivers it again straight away.

Lines are level-triggered: the controller asks the model whether its line is asserted whenever
the model says it may have changed and whenever a line is unmasked, so a level that came and
went while masked is (correctly) not delivered.  Callbacks run without any lock held, on the
thread that changed the device (a ``feed`` from outside, a register write from a host's call):
they must hand the event on, not do work.
"""

from __future__ import annotations

import threading
from typing import Callable

from reflector.simhw.model import DeviceModel

__all__ = ["InterruptLines"]


class InterruptLines:
    def __init__(self, models: dict[int, DeviceModel]) -> None:
        self._models = dict(models)          # irq -> the model wired to it
        self._lock = threading.Lock()
        self._masked: set[int] = set(self._models)
        self._callbacks: list[Callable[[int], None]] = []
        self.delivered: dict[int, int] = {irq: 0 for irq in self._models}

    def on_interrupt(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(irq)`` on each delivery; returns a function that unregisters it."""
        with self._lock:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)
        return remove

    def _known(self, irq: int) -> DeviceModel:
        model = self._models.get(irq)
        if model is None:
            wired = ", ".join(str(i) for i in sorted(self._models)) or "none"
            raise ValueError(f"no simulated device raises IRQ {irq!r} (wired IRQs: {wired})")
        return model

    def mask(self, irq: int) -> None:
        self._known(irq)
        with self._lock:
            self._masked.add(irq)

    def unmask(self, irq: int) -> None:
        """Let ``irq`` through again (``InterruptDone``); delivers at once if it is still asserted."""
        model = self._known(irq)
        with self._lock:
            self._masked.discard(irq)
        self.line_changed(model)

    def is_masked(self, irq: int) -> bool:
        self._known(irq)
        with self._lock:
            return irq in self._masked

    def line_changed(self, model: DeviceModel) -> None:
        """A model's line may have changed: deliver it if it is asserted and unmasked."""
        irq = model.config.irq
        if irq is None or self._models.get(irq) is not model:
            return
        with self._lock:
            if irq in self._masked or not model.irq_asserted():
                return
            self._masked.add(irq)            # masked until done(), as CE's kernel does before the IST runs
            self.delivered[irq] += 1
            callbacks = list(self._callbacks)
        failure: BaseException | None = None
        for callback in callbacks:
            try:
                callback(irq)
            except Exception as e:       # one broken listener must not starve the others
                failure = failure or e
        if failure is not None:
            raise failure
