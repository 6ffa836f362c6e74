# Shared pytest set-up: plain `pytest` (not just `python -m pytest`) imports the top-level scripts
# (model, prepare, tokenizer, ...) from the repository root, and what several test modules share.
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


def script_error(capsys, main, *argv):
    """The error line a script's main(argv) prints for bad input (after any notes), checking it exits with 2."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err and err[-1].startswith("error: ")
    return err[-1]
