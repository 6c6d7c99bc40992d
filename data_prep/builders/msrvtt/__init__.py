"""MSR-VTT builder package."""

from data_prep.builders.msrvtt.msrvtt_dataset_builder import MsrVtt

__all__ = ["MsrVtt"]
