"""Inference-time alignment: spend compute at generation time instead of training."""
