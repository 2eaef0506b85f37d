"""Hydra configs of `python -m lightning_sam.train` (shipped in the wheel as `lightning_sam.configs`)."""
