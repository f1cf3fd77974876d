"""Simulated hardware models attached to the simulated platform."""
