"""Triton kernels. Imported lazily by the ops: importing triton takes seconds."""
