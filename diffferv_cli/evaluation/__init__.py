"""Evaluation (paper 4.2): pure metrics, face detection and identity, the eval report."""
