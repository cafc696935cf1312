"""Triton kernels for the hot paths (imports only torch and triton).

Each op: the ``@triton.jit`` kernel, a host function choosing block sizes, an
``autograd.Function`` where gradients are needed. The torch references they are tested against
live in ``interpdiff`` (``interpolate_reference``, ``dp_select_reference``).
"""
