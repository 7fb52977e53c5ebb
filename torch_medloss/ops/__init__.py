"""The fused ops, one module per op stem: its registration (fake kernels and autograd of the C++ and Triton ops)
and the choice of kernel for a backend that torch_medloss.functional has already resolved.

Importing a module here builds nothing and imports no triton: the C++ ops get their fake kernels and autograd when
the extension loads (torch_medloss._extension.when_loaded), the Triton ops when their backend first runs.
"""
