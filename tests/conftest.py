"""Test-wide settings.

Tiny models gain nothing from intra-op threads, and two OpenMP threads per process on a 2-core
machine shared with subprocess tests spin against each other (10x slow-downs seen), so every
test process, and every subprocess a test starts, uses one thread.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
