"""Studies over planners and the simulator: the loop, what-if sweeps, schedule comparisons."""
