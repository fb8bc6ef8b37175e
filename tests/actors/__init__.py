"""The actors' own behaviour on loopback: the converter, re-resolution, the plan boundary."""
