"""Commands for the simulated hardware, from outside the drivers (`drvbox hw`, tests, demos).

A closed set: each command names its verb and its device; anything else is EINVAL.  They act on
the models directly, never through a driver, exactly as a signal on a real board's pins would.
"""

from __future__ import annotations

import errno

from reflector.simhw.gpio import GpioBank
from reflector.simhw.uart16550 import Uart16550


def _model(platform, command: dict, kind: type | None = None):
    name = command.get("device")
    if not isinstance(name, str):
        raise OSError(errno.EINVAL, "the command needs \"device\": the simulated device's name (see `drvbox hw ls`)")
    try:
        model = platform.device(name)
    except LookupError as exc:
        raise OSError(errno.ENODEV, str(exc)) from None
    if kind is not None and not isinstance(model, kind):
        raise OSError(errno.EINVAL, f"{name} is a {type(model).__name__}, not a {kind.__name__}")
    return model


def _ls(platform, command: dict) -> dict:
    return {"devices": platform.describe()}


def _feed(platform, command: dict) -> dict:
    data = command.get("hex")
    try:
        raw = bytes.fromhex(data) if isinstance(data, str) else str(command.get("text", "")).encode()
    except ValueError as exc:
        raise OSError(errno.EINVAL, f"\"hex\" is not hex: {exc}") from None
    return {"accepted": _model(platform, command, Uart16550).feed(raw)}


def _take_tx(platform, command: dict) -> dict:
    return {"hex": _model(platform, command, Uart16550).take_tx().hex()}


def _gpio_set(platform, command: dict) -> dict:
    pin, level = command.get("pin"), command.get("level")
    if not isinstance(pin, int) or not 0 <= pin < 32 or level not in (0, 1, True, False):
        raise OSError(errno.EINVAL, "gpio-set needs \"pin\" 0..31 and \"level\" 0 or 1")
    _model(platform, command, GpioBank).set_input(pin, int(level))
    return {}


VERBS = {
    "ls": _ls,
    "uart-feed": _feed,
    "uart-take-tx": _take_tx,
    "gpio-set": _gpio_set,
}


def run_hw_command(platform, command) -> dict:
    if not isinstance(command, dict):
        raise OSError(errno.EINVAL, "a hardware command is a JSON object")
    verb = VERBS.get(command.get("verb"))
    if verb is None:
        raise OSError(errno.EINVAL, f"unknown verb {command.get('verb')!r}; known: {', '.join(VERBS)}")
    return verb(platform, command)
