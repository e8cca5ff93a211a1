"""Config -> Plan: every output tensor with the recipe that produces it, read from configs and headers
only. build (the entry point), the recipes and the Plan, the sources, concat and assembly planning, the
expert table, the union vocabulary, FP8 output, estimates, and the plan's text summary."""
