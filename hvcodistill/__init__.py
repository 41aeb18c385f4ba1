"""hvcodistill: codistillation for distributed training on Horovod/MPI clusters."""

__version__ = "0.1.0"
