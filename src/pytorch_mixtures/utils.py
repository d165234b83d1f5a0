"""Compatibility module: :class:`MHSA` now lives in :mod:`pytorch_mixtures.attention`. Kept so
that the seed package's ``from pytorch_mixtures.utils import MHSA`` still works."""

from .attention import MHSA

__all__ = ["MHSA"]
