"""Harmless: a Driver that does not subclass StreamDriver and implements only open and read."""


class Driver:
    def open(self, access, share):
        return "handle"

    def read(self, opened, out):
        out[:2] = b"ok"
        return 2
