"""Planners (heuristic, known schedules, MIP), their registry and the independent validator."""
