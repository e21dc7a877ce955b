"""Runnable pieces of the tutorial in kernels/README.md, from naive attention to the Triton kernel.

Each one runs from the repository root, on a laptop without a GPU:

    python -m tutorial.tiling         which causal tiles the kernel computes, masks, or never loads
    python -m tutorial.bytes_moved    HBM bytes of naive attention vs flash attention, counted
    python -m tutorial.step_through   the kernel's running m_i, l_i, acc, watched block by block
"""
