"""Triton kernels and their pure-PyTorch references.

Every op lives in its own folder with a public function that checks its inputs, ``reference.py`` (a step-by-step
recurrence that defines correctness, and a chunked form fast enough for CPU training), Triton forward and backward
kernels joined by one ``torch.autograd.Function``, and a README with the math. ``backend="auto"`` picks Triton on
CUDA and the reference otherwise. This package imports torch (and triton lazily), never ``nlplatform``.
"""
