"""Evaluation: metrics and choosing the delivered network on validation cases."""
