# Shared pytest set-up: plain `pytest` (not just `python -m pytest`) imports the top-level scripts
# (model, prepare, tokenizer, ...) from the repository root, and one fixture the test modules share.
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and several threads crawl on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
