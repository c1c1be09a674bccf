"""Endoscopy polyp model: per-frame polyp segmentation and a frame-level polyp score."""
