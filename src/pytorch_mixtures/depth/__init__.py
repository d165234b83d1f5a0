"""Depth routing: let tokens skip blocks.

* :class:`MixtureOfDepths` (alias :data:`MoDLayer`; Raposo et al. 2024, in
  :mod:`pytorch_mixtures.depth.mixture_of_depths`): each sequence's top tokens by a scalar router
  run through the wrapped block, the rest pass through unchanged; in eval a causal per-token
  decision keeps decoders causal. :func:`calibrate_thresholds` sets the eval thresholds to a
  target capacity; :class:`MoDStats` is what a layer did in its last forward.
* Block adapters (:mod:`pytorch_mixtures.depth.adapters`): :class:`BlockAdapter`,
  :class:`MaskAdapter` and :func:`position_causal_mask`, to call blocks with other mask
  conventions. The Hugging Face decoder-layer adapter is
  :class:`pytorch_mixtures.HFDecoderLayerAdapter` (in :mod:`pytorch_mixtures.interop.adapters`).
"""

from .adapters import BlockAdapter, MaskAdapter, position_causal_mask
from .mixture_of_depths import (
    CausalRouterName,
    GateName,
    MixtureOfDepths,
    MoDLayer,
    MoDStats,
    calibrate_thresholds,
)

__all__ = [
    "BlockAdapter",
    "CausalRouterName",
    "GateName",
    "MaskAdapter",
    "MixtureOfDepths",
    "MoDLayer",
    "MoDStats",
    "calibrate_thresholds",
    "position_causal_mask",
]
