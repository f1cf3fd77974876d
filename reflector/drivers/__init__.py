"""Sample drivers and the built-in simulated platform registry (package data)."""
