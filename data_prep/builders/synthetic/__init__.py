"""Synthetic builder package: registers `data_prep.synthetic.builder.Synthetic` with the build CLI."""

from data_prep.synthetic.builder import Synthetic

__all__ = ["Synthetic"]
