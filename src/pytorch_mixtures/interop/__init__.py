"""Hugging Face ``transformers`` interop: convert MoE blocks both ways, upcycle dense models.

* :func:`from_hf` / :func:`to_hf`: a ``transformers`` sparse-MoE block <-> :class:`MoELayer`.
* :func:`moeify`: replace a dense model's MLPs with upcycled MoE layers (Komatsuzaki et al.
  2022), in place.
* :func:`route_depths`: wrap a decoder's layers in Mixture-of-Depths (Raposo et al. 2024).
* :func:`attach_aux_loss`: make ``model(..., labels=...).loss`` include ``pm.aux_loss(model)``
  (what ``transformers.Trainer`` optimises).

``transformers`` is an optional dependency (``pip install pytorch-mixtures[hf]``); nothing here
imports it: the functions work on the modules you pass in.
"""

from .depths import MoDDecoderLayer, route_depths
from .hf import SwiGLUMLP, from_hf, supported_blocks, to_hf
from .upcycle import attach_aux_loss, moeify

__all__ = [
    "MoDDecoderLayer",
    "SwiGLUMLP",
    "attach_aux_loss",
    "from_hf",
    "moeify",
    "route_depths",
    "supported_blocks",
    "to_hf",
]
