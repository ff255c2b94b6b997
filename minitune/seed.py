"""One seed for every random number generator a run draws from: Python's, NumPy's and torch's.

A bottom-level module (it imports no other part of minitune), so the SFT trainer, the RL loops and
the command line all seed the same way without importing one another.
"""

import random

import numpy as np
import torch


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
