"""`drvbox hw` commands: one command set, kept with the models in ``reflector.simhw.commands``."""

from reflector.simhw.commands import run_hw_command  # noqa: F401
