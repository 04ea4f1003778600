"""Scenario files: the loader that validates them into a workload, a cluster and typed options."""
