"""DiDeMo builder package."""

from data_prep.builders.didemo.didemo_dataset_builder import Didemo

__all__ = ["Didemo"]
