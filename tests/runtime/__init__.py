"""The actor runtime: failure policy, metrics, waiting — on both buses."""
