"""Reading ``HKEY_LOCAL_MACHINE\\Platform\\Devices\\<Name>`` into :class:`DeviceConfig` objects.

Each subkey is one device:

* ``Model`` (sz, required): one of the models in ``reflector.simhw.platform.MODELS``;
* ``MemBase``/``MemLen``, ``IoBase``/``IoLen``: a dword each for one window, or multi_sz lists
  of hex numbers (``"48004000"``, ``0x`` optional) of equal length for several windows, as BSPs
  write them;
* ``Irq`` (dword, optional): the line the model raises;
* every other value is model-specific (``SizeBytes`` of a block device, ``TxBuffer`` of a UART)
  and is passed on as its data.

The hive is duck-typed (``policy.hive.Hive``: ``key(path)``, ``Key.subkeys()``, ``Key.values()``,
``Key.get(name)`` with ``.data``, ``.type``, ``.location``), so this module does not depend on
the policy package.  Errors name the device, the value and where it was written.
"""

from __future__ import annotations

from reflector.simhw.config import DeviceConfig, Window
from reflector.simhw.errors import PlatformConfigError

__all__ = ["DEVICES_KEY", "PLATFORM_KEY", "configs_from_hive", "dma_zone_from_hive"]

PLATFORM_KEY = r"HKEY_LOCAL_MACHINE\Platform"
DEVICES_KEY = PLATFORM_KEY + r"\Devices"
_STRUCTURAL = {"model", "membase", "memlen", "iobase", "iolen", "irq"}


def configs_from_hive(hive) -> list[DeviceConfig]:
    """One DeviceConfig per subkey of ``HKLM\\Platform\\Devices`` (none if the key is absent)."""
    root = hive.key(DEVICES_KEY)
    if root is None:
        return []
    return [_config(key) for key in root.subkeys()]


def dma_zone_from_hive(hive) -> tuple[int, int] | None:
    """``DmaBase``/``DmaSize`` (dwords or qwords) of ``HKLM\\Platform``, for boards whose device
    windows sit where the default DMA zone would be; None when neither is given."""
    key = hive.key(PLATFORM_KEY)
    base = key.get("DmaBase") if key is not None else None
    size = key.get("DmaSize") if key is not None else None
    if base is None and size is None:
        return None
    if base is None or size is None:
        present, missing = ("DmaBase", "DmaSize") if base is not None else ("DmaSize", "DmaBase")
        raise PlatformConfigError("(platform)", present, f"is given without {missing}",
                                  location=_location(base or size), fix=f"add {missing} under [{PLATFORM_KEY}]")
    for v in (base, size):
        if v.type not in ("dword", "qword"):
            raise PlatformConfigError("(platform)", v.name, f"is a {v.type}; expected a dword or qword",
                                      location=_location(v))
    return base.data, size.data


def _location(value) -> object:
    return getattr(value, "location", None)


def _numbers(device: str, value) -> list[int]:
    """A dword, or a multi_sz of hex strings, as a list of ints."""
    if value.type == "dword" or value.type == "qword":
        return [value.data]
    if value.type == "multi_sz":
        out = []
        for item in value.data:
            text = item.strip()
            digits = text[2:] if text[:2].lower() == "0x" else text
            try:
                if not digits:
                    raise ValueError
                out.append(int(digits, 16))
            except ValueError:
                raise PlatformConfigError(device, value.name, f"item {item!r} is not a hex number",
                                          location=_location(value), fix='write hex digits, e.g. "48004000"') from None
        return out
    raise PlatformConfigError(device, value.name, f"is a {value.type}; expected a dword or a multi_sz of hex numbers",
                              location=_location(value))


def _windows(device: str, key, base_name: str, len_name: str) -> list[Window]:
    base, length = key.get(base_name), key.get(len_name)
    if base is None and length is None:
        return []
    if base is None or length is None:
        present, missing = (base_name, len_name) if base is not None else (len_name, base_name)
        raise PlatformConfigError(device, present, f"is given without {missing}",
                                  location=_location(base or length), fix=f"add {missing} or remove {present}")
    bases, lengths = _numbers(device, base), _numbers(device, length)
    if len(bases) != len(lengths):
        raise PlatformConfigError(device, len_name,
                                  f"lists {len(lengths)} lengths for {len(bases)} bases in {base_name}",
                                  location=_location(length), fix="give one length per base")
    return [Window(b, n) for b, n in zip(bases, lengths)]


def _config(key) -> DeviceConfig:
    device = key.name
    model = key.get("Model")
    if model is None:
        raise PlatformConfigError(device, "Model", f"is missing from [{key.path}]",
                                  fix='add "Model"="uart16550" (or ramdisk, blockdev, gpio)')
    if model.type != "sz":
        raise PlatformConfigError(device, "Model", f"is a {model.type}; expected a string", location=_location(model))
    irq_value = key.get("Irq")
    irq = None
    if irq_value is not None:
        if irq_value.type != "dword":
            raise PlatformConfigError(device, "Irq", f"is a {irq_value.type}; expected a dword",
                                      location=_location(irq_value))
        irq = irq_value.data
    extra = {v.name: v.data for v in key.values() if v.name.casefold() not in _STRUCTURAL}
    try:
        return DeviceConfig(device, model.data.strip().lower(), mem=_windows(device, key, "MemBase", "MemLen"),
                            io=_windows(device, key, "IoBase", "IoLen"), irq=irq, values=extra,
                            location=_location(model))
    except PlatformConfigError as e:
        if e.location is None and e.value is not None and key.get(e.value) is not None:
            raise PlatformConfigError(e.device, e.value, e.problem, location=_location(key.get(e.value)),
                                      fix=e.fix) from None
        raise
