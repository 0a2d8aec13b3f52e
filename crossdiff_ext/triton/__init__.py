"""Triton kernels of the crossdiff ops (backend "triton"): one module per op family, each kernel beside its
launcher; the plain-PyTorch references they are tested against live in crossdiff_ext/ops.

Runs on any GPU Triton supports, and on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
Importing this package imports triton; crossdiff_ext imports it lazily, on the first Triton launch.
"""
