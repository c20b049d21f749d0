"""Accuracy-aware search: the best compression plan within an accuracy budget, and the Pareto front."""
