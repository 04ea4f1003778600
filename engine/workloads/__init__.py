"""Workload builders: pipelines, op graphs, transformer training iterations."""
