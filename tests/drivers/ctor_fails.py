"""Broken: constructing the Driver raises."""


class Driver:
    def __init__(self):
        raise ZeroDivisionError("constructor")
