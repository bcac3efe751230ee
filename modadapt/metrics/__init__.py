"""Metrics: routing statistics (and, later, ARank and FLOPs)."""
