"""Evaluation: forward passes, merged heads and every metric computed from kept logits."""
