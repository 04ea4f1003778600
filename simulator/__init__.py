"""plansim's SimPy cluster simulator. Imports engine.ir and hardware_profiles only."""
