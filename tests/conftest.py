"""Shared test set-up: make the repository root importable and keep the 2-core CI machine responsive."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Tests use tiny models; one or two threads is fastest on the 2-core CI machine and keeps results stable.
torch.set_num_threads(min(2, torch.get_num_threads()))
