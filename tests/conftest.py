"""Shared test set-up: make the repository root importable and keep the 2-core CI machine responsive."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Tests use tiny models: one thread is as fast as two for them and never oversubscribes a busy 2-core machine.
torch.set_num_threads(1)
