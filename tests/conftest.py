"""Test-wide settings: headless plots, deterministic and modest threading (the suite runs 2 workers),
and an empty data root so no test can depend on datasets that happen to be on the machine."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["EDGEMOE_DATA"] = tempfile.mkdtemp(prefix="edgemoe-test-data-")
atexit.register(shutil.rmtree, os.environ["EDGEMOE_DATA"], True)

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the edge tests need no torch
    pass
