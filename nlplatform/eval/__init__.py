"""Evaluation: offline eval data, lm-eval tasks and the model adapter."""
