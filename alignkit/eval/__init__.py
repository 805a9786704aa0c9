"""Evaluation: statistics and metrics of what alignment did."""
