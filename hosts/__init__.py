"""The host side of drvbox: what runs next to untrusted drivers.

Drivers import their whole API from here::

    from hosts import StreamDriver, DriverError
    from hosts.ioctl import ctl_code, unpack_in, pack_out   # CE's CTL_CODE and buffer helpers

This package's ``__init__`` is imported by every host before confinement, so it stays tiny: the
rest (``hosts.main``, ``hosts.dispatch``, ...) is imported only by whoever needs it.
"""

from hosts.api import DriverContext, DriverError, StreamDriver

__all__ = ["DriverContext", "DriverError", "StreamDriver"]
