"""How any actor runs: the worker loop, the pure settle decision, settings, logs, metrics, local HTTP."""
