"""Triton kernels for the hot paths (imports only torch and triton).

Each op: the ``@triton.jit`` kernel, a host function choosing block sizes, an
``autograd.Function`` where gradients (or, for ``attention_jvp``, forward-mode tangents) are
needed. ``interpolate`` and ``dp`` are tested against the torch references in ``interpdiff``
(``interpolate_reference``, ``dp_select_reference``); ``attention_jvp`` against
``torch.func.jvp`` of the math attention.
"""
