"""Triton kernels of the ``triton`` backend, each file holding its kernels, their heuristics and launchers.

``chunked.py``, ``fused.py`` and ``epilogue.py`` are the vocabulary sweeps, ``common.py`` the shared ``@triton.jit`` maths and the
launch helper. ``grao_kernels.backends.triton_backend`` validates, picks the
sweep by the memory budget and allocates the outputs. These modules are
imported when the backend first is (``triton.jit`` decides at decoration time
whether a kernel compiles or runs under ``TRITON_INTERPRET=1``).
"""
