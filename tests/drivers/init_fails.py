"""Broken: init refuses with ENXIO (no such device)."""

import errno

from hosts import DriverError, StreamDriver


class Driver(StreamDriver):
    def init(self, ctx):
        raise DriverError(errno.ENXIO)
