"""Chest radiograph triage model: multi-label classifier with class-activation heatmaps."""
