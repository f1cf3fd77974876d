"""Simulated hardware models attached to the simulated platform."""

from reflector.simhw.config import DeviceConfig, Window
from reflector.simhw.errors import AddressError, DmaError, PlatformConfigError, RegisterAccessError, SimHwError
from reflector.simhw.physmem import DmaRegion, PhysicalMemory
from reflector.simhw.platform import MODELS, Platform

__all__ = [
    "Platform", "MODELS", "DeviceConfig", "Window", "PhysicalMemory", "DmaRegion",
    "SimHwError", "PlatformConfigError", "AddressError", "RegisterAccessError", "DmaError",
]
