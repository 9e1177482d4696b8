"""The training worker, run on the nodes: `python -m llamajobs.worker RUN_DIR` under torchrun.

Importing this package imports nothing heavy; train.py holds the loop.
"""
