"""Checks that keep the house in order: layering, the docs, installs, containers, benchmarks' small runs."""
