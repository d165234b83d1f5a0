"""Mixture-of-Depths: kept for the old import path ``pytorch_mixtures.mod``.

The code lives in :mod:`pytorch_mixtures.depth` (:mod:`~pytorch_mixtures.depth.mixture_of_depths`
and :mod:`~pytorch_mixtures.depth.adapters`) and, for the Hugging Face decoder-layer adapter, in
:mod:`pytorch_mixtures.interop.adapters`; every name this module has always had is re-exported
here unchanged (``pm.mod.MixtureOfDepths is pm.MixtureOfDepths``).
"""

from .depth import *  # noqa: F403  (the old path re-exports the whole package)
from .depth import __all__ as _depth_names
from .interop.adapters import HFDecoderLayerAdapter

__all__ = [*_depth_names, "HFDecoderLayerAdapter"]
