"""ActivityNet Captions builder package."""

from data_prep.builders.activitynet.activitynet_dataset_builder import ActivityNet

__all__ = ["ActivityNet"]
