"""Kernels run under Triton's interpreter on machines without a GPU. The variable must be
set before triton is first imported, hence here, before any test module imports it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
