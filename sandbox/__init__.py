"""Confinement of host processes: one module per kernel mechanism, applied in order by spawn."""
