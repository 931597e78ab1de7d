"""Compiled numba kernels: arrays and scalars in, arrays out; no Python objects, no I/O."""
