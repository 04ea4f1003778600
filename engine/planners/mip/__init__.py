"""The MIP planner: a flexible job-shop in Pyomo, solved by HiGHS."""
