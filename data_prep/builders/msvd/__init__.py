"""MSVD builder package."""

from data_prep.builders.msvd.msvd_dataset_builder import Msvd

__all__ = ["Msvd"]
