# Shared pytest set-up. Kept minimal: it only lets plain `pytest` (not just `python -m pytest`)
# import the top-level scripts (model, prepare, tokenizer, ...) from the repository root.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
