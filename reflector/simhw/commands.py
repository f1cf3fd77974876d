"""``drvbox hw``: feeding and watching the simulated hardware from outside the drivers.

:func:`run_hw_command` takes one JSON object from a client (the owner of the Device Manager:
the server checks that before it gets here) and answers with one JSON object.  The set of
operations is closed; each field is checked for type and range before it is used; failures are
``OSError`` with the errno a client library hands on (EINVAL for a malformed command, ENODEV
for no such device).

The command is ``{"verb": ..., ...}`` with the verbs and field names of ``drvbox hw``
(``reflector/cmd_hw.py``), so ``reflector.hwcommands`` can hand commands straight on:

=============== ============================================= ===================================
verb            fields                                        answer
=============== ============================================= ===================================
ls                                                            ``{"devices": Platform.describe()}``
uart-feed       device, hex or text, [flow_control]           ``{"accepted": n}``
uart-take-tx    device                                        ``{"hex": hex, "text": str}``
uart-modem      device, any of cts/dsr/ri/dcd (bool)          ``{}``
gpio-set        device, pin (0..31), level (0/1/bool)         ``{"level": pin level now}``
disk-read       device, sector, count (<= 128 sectors)        ``{"hex": hex}``
disk-write      device, sector, hex (whole sectors)           ``{}``
sync            [device]                                      ``{"writes": n}``
=============== ============================================= ===================================
"""

from __future__ import annotations

import errno

from reflector.simhw.blockdev import SECTOR_SIZE, BlockDevice
from reflector.simhw.gpio import GpioBank
from reflector.simhw.model import DeviceModel
from reflector.simhw.uart16550 import Uart16550

__all__ = ["run_hw_command", "MAX_TRANSFER"]

MAX_TRANSFER = 64 * 1024        # bytes one command may move, either way


def _bad(message: str) -> OSError:
    return OSError(errno.EINVAL, message)


def _field(cmd: dict, name: str, kind: type | tuple, default: object = ...) -> object:
    if name not in cmd:
        if default is ...:
            raise _bad(f"hw {cmd.get('verb')}: missing field {name!r}")
        return default
    value = cmd[name]
    if isinstance(value, bool) and kind is int:      # JSON true is not a sector number
        raise _bad(f"hw {cmd.get('verb')}: field {name!r} must be an integer, not {value!r}")
    if not isinstance(value, kind):
        raise _bad(f"hw {cmd.get('verb')}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _hex(cmd: dict, name: str) -> bytes:
    text = _field(cmd, name, str)
    if len(text) > 2 * MAX_TRANSFER:
        raise _bad(f"hw {cmd['verb']}: {name!r} is longer than {MAX_TRANSFER} bytes")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise _bad(f"hw {cmd['verb']}: {name!r} is not hex") from None


def _device(platform, cmd: dict, kind: type[DeviceModel] | None = None) -> DeviceModel:
    name = _field(cmd, "device", str)
    try:
        model = platform.device(name)
    except LookupError as e:
        raise OSError(errno.ENODEV, str(e)) from None
    if kind is not None and not isinstance(model, kind):
        raise _bad(f"hw {cmd['verb']}: {model.name} is a {model.MODEL}, not a {kind.MODEL}")
    return model


def _describe(platform, cmd: dict) -> dict:
    return {"devices": platform.describe()}


def _feed(platform, cmd: dict) -> dict:
    uart = _device(platform, cmd, Uart16550)
    if ("hex" in cmd) == ("text" in cmd):
        raise _bad("hw uart-feed: give exactly one of 'hex' and 'text'")
    if "hex" in cmd:
        data = _hex(cmd, "hex")
    else:
        data = _field(cmd, "text", str).encode("utf-8")
        if len(data) > MAX_TRANSFER:
            raise _bad(f"hw uart-feed: 'text' is longer than {MAX_TRANSFER} bytes")
    flow = _field(cmd, "flow_control", bool, True)
    return {"accepted": uart.feed(data, flow_control=flow)}


def _take_tx(platform, cmd: dict) -> dict:
    data = _device(platform, cmd, Uart16550).take_tx()
    return {"hex": data.hex(), "text": data.decode("utf-8", "replace")}


def _set_modem(platform, cmd: dict) -> dict:
    uart = _device(platform, cmd, Uart16550)
    lines = {k: _field(cmd, k, bool) for k in ("cts", "dsr", "ri", "dcd") if k in cmd}
    uart.set_modem_lines(**lines)
    return {}


def _set_input(platform, cmd: dict) -> dict:
    bank = _device(platform, cmd, GpioBank)
    pin = _field(cmd, "pin", int)
    level = _field(cmd, "level", (int, bool))
    if level not in (0, 1):
        raise _bad(f"hw gpio-set: level {level!r} is not 0 or 1")
    try:
        bank.set_input(pin, level)
    except ValueError as e:
        raise _bad(str(e)) from None
    return {"level": bank.level(pin)}


def _read_sectors(platform, cmd: dict) -> dict:
    disk = _device(platform, cmd, BlockDevice)
    sector, count = _field(cmd, "sector", int), _field(cmd, "count", int)
    if not 0 < count <= MAX_TRANSFER // SECTOR_SIZE:
        raise _bad(f"hw disk-read: count {count} is not in 1..{MAX_TRANSFER // SECTOR_SIZE}")
    try:
        return {"hex": disk.read_sectors(sector, count).hex()}
    except ValueError as e:
        raise _bad(str(e)) from None


def _write_sectors(platform, cmd: dict) -> dict:
    disk = _device(platform, cmd, BlockDevice)
    sector, data = _field(cmd, "sector", int), _hex(cmd, "hex")
    try:
        disk.write_sectors(sector, data)
    except ValueError as e:
        raise _bad(str(e)) from None
    return {}


def _sync(platform, cmd: dict) -> dict:
    if "device" in cmd:
        _device(platform, cmd)
        return {"writes": platform.sync(cmd["device"])}
    return {"writes": platform.sync()}


# The closed set.  A verb not here is refused.
_VERBS = {
    "ls": _describe, "uart-feed": _feed, "uart-take-tx": _take_tx, "uart-modem": _set_modem,
    "gpio-set": _set_input, "disk-read": _read_sectors, "disk-write": _write_sectors, "sync": _sync,
}


def run_hw_command(platform, command: object) -> dict:
    """Carry out one ``drvbox hw`` command on ``platform``; see the module docstring."""
    if not isinstance(command, dict):
        raise _bad("a hw command is a JSON object with a 'verb'")
    verb = command.get("verb")
    handler = _VERBS.get(verb) if isinstance(verb, str) else None
    if handler is None:
        raise _bad(f"unknown verb {verb!r}; known: {', '.join(_VERBS)}")
    return handler(platform, command)
