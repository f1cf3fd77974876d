"""Broken: defines no class Driver."""

driver = object()
