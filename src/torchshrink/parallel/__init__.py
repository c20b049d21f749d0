"""Parallel execution: data-parallel training under torchrun (``ddp``)."""
