"""Data sets (as tensors) and the seeded federated partitioner."""

from takfl.data.datasets import (
    DataError,
    TensorDataset,
    load_cifar,
    load_dataset,
    load_digits,
    load_image_folder,
    load_npz,
)
from takfl.data.partition import (
    Partition,
    PartitionError,
    PrototypeShare,
    dirichlet_split,
    make_partition,
    partition_summary,
    split_by_ratio,
)

__all__ = [
    "DataError",
    "Partition",
    "PartitionError",
    "PrototypeShare",
    "TensorDataset",
    "dirichlet_split",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_npz",
    "make_partition",
    "partition_summary",
    "split_by_ratio",
]
