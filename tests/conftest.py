"""Test-wide settings: headless plots, deterministic and modest threading (the suite runs 2 workers)."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the edge tests need no torch
    pass
