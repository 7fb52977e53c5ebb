"""Triton kernels of torch_medloss, importable as ``torch_medloss.kernels`` (setup.py maps this directory there).

One module per op stem (``kernels/<stem>.py``): the Triton kernels, their launchers and the ``triton_op`` that
registers them. The modules import triton, so the rest of the package imports them only when the "triton" backend
runs; importing this package imports nothing and touches no GPU.
"""
