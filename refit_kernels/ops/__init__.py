"""Public ops of refit_kernels, one module per op: validation, dispatch, and
the fake implementations and gradients of the compiled and Triton ops."""
