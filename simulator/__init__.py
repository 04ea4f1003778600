"""plansim's SimPy cluster simulator. Imports engine.core.ir and hardware_profiles only."""
