"""Experiment planning, the first stage of the pipeline: describe the dataset (fingerprint), then choose the
target spacing, patch shape and slice axis from it and from the compute budget (planner)."""
