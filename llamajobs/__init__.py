"""llamajobs: fine-tune LLaMA-family models on SLURM clusters, with estimates you can plan on."""

__version__ = "0.1.0"
