"""The training app, ``python -m lightning_sam.train`` (Hydra), and what its runs leave behind.

Importing this package imports no Hydra app: :func:`lightning_sam.app.load.load_run` and
:mod:`lightning_sam.app.runs` are usable without it (``python -m lightning_sam.landscape`` uses them).
"""
