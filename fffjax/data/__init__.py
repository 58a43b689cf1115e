"""Data sets: images for FFF-v1 experiments, text for UltraFastBERT."""
