"""Scoring a model on a test split: metrics, intervals, calibration, the report."""
