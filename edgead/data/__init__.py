"""Datasets, image loading and the synthetic inspection set (numpy + OpenCV only, no torch)."""
