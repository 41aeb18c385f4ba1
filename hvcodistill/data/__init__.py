"""Data: the data sources by name (datasets.py, tokens.py, on the types of base.py) and which
samples each rank takes at each step (sharding.py).

No MPI, no Horovod, no downloads."""

from hvcodistill.data.base import BatchDataset, DataSpec, make_loader, mix_seed
from hvcodistill.data.datasets import (
    DATA_NAMES,
    SyntheticBatchDataset,
    TensorBatchDataset,
    TransformBatchDataset,
    build_datasets,
)
from hvcodistill.data.sharding import BatchPlan, batch_checksum

__all__ = [
    "DATA_NAMES",
    "BatchDataset",
    "BatchPlan",
    "DataSpec",
    "SyntheticBatchDataset",
    "TensorBatchDataset",
    "TransformBatchDataset",
    "batch_checksum",
    "build_datasets",
    "make_loader",
    "mix_seed",
]
