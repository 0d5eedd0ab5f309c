"""Triton kernels of the ``triton`` backend, one file per kernel.

Only ``@triton.jit`` functions and their autotuning configurations live here;
checks, allocation, grids and config selection are in
``grao_kernels.backends.triton_backend``. Modules here are imported lazily by
that launcher because ``triton.jit`` decides at decoration time whether a
kernel runs compiled or under the interpreter (``TRITON_INTERPRET=1``).
"""
