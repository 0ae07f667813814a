"""Shared pytest setup: Triton kernels in the interpreter on CPU-only machines, one thread per
test process (CI has 2 cores), repo root importable."""

import os
import sys

if not os.path.exists("/dev/nvidia0"):  # no GPU: Triton kernels run in its interpreter
    # triton reads this when it is first imported, and any test module may be the first to import it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
torch.set_num_threads(1)
