"""Seed-package import path: ``from pytorch_mixtures.moe import MoELayer``."""

from .moe_layer import MoELayer

__all__ = ["MoELayer"]
