"""plansim's SimPy cluster simulator. Imports engine.core only (see the layers in docs/DESIGN.md)."""
