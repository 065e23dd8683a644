"""Shared by tests and benchmarks: tiny random models and an in-process Grid (no Ray, no SuperLink)."""
