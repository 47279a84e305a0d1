"""Triton kernels of llama_adapter_fast: ``@triton.jit`` functions and their launchers.

Installed as ``llama_adapter_fast.kernels``. This file imports nothing on purpose: other
libraries probe for a top-level package named ``kernels`` and import this folder whenever
the repository root is on ``sys.path``, so importing it must have no side effects.
"""
