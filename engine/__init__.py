"""plansim's planning side: IR, workloads, cost model, planners, loop and CLI."""
