"""Turning dense features into per-pixel class probabilities: windows, thresholds, refinement."""
