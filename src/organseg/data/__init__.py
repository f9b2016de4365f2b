"""torchio patch sampling from HDF5 caches and the shared LightningDataModule."""

from organseg.data.datamodule import CTDataModule
from organseg.data.datasets import CacheSource, CaseStream, PatchStream

__all__ = ["CTDataModule", "CacheSource", "CaseStream", "PatchStream"]
