"""A package driver for tests."""
class Driver:
    pass
