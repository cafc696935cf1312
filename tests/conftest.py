import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("INTERPDIFF_TEST_THREADS", "1")))  # tiny ops: 1 thread is fastest, and 2 threads on a busy 2-core machine slow some tests 10x


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
