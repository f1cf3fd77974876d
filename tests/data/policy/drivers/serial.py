class Driver:
    """A test driver: does nothing."""
