"""Mixture-of-Depths: kept for the old import path ``pytorch_mixtures.mod``.

The code lives in :mod:`pytorch_mixtures.depth` (:mod:`~pytorch_mixtures.depth.mixture_of_depths`
and :mod:`~pytorch_mixtures.depth.adapters`) and, for the Hugging Face decoder-layer adapter, in
:mod:`pytorch_mixtures.interop.adapters`; every name this module has always had is re-exported
here unchanged (``pm.mod.MixtureOfDepths is pm.MixtureOfDepths``).
"""

from .depth.adapters import BlockAdapter, MaskAdapter, position_causal_mask
from .depth.mixture_of_depths import (
    CausalRouterName,
    GateName,
    MixtureOfDepths,
    MoDLayer,
    MoDStats,
    calibrate_thresholds,
)
from .interop.adapters import HFDecoderLayerAdapter

__all__ = [
    "BlockAdapter",
    "CausalRouterName",
    "GateName",
    "HFDecoderLayerAdapter",
    "MaskAdapter",
    "MixtureOfDepths",
    "MoDLayer",
    "MoDStats",
    "calibrate_thresholds",
    "position_causal_mask",
]
