"""Data: the datasets (datasets.py) and which samples each rank takes at each step (sharding.py).

No MPI, no Horovod, no downloads."""
from hvcodistill.data.datasets import (DATA_NAMES, BatchDataset, DataSpec, SyntheticBatchDataset,
                                       TensorBatchDataset, TransformBatchDataset, build_datasets,
                                       make_loader, mix_seed)
from hvcodistill.data.sharding import BatchPlan, batch_checksum

__all__ = ["DATA_NAMES", "BatchDataset", "BatchPlan", "DataSpec", "SyntheticBatchDataset",
           "TensorBatchDataset", "TransformBatchDataset", "batch_checksum", "build_datasets",
           "make_loader", "mix_seed"]
