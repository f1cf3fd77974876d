"""Broken: raises while the module executes."""

raise RuntimeError("this driver module cannot be imported")
