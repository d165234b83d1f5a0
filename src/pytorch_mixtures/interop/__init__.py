"""Hugging Face ``transformers`` interop: convert MoE blocks both ways, upcycle dense models.

* :func:`from_hf` / :func:`to_hf`: a ``transformers`` sparse-MoE block <-> :class:`MoELayer`
  (an :class:`HFMoELayer`, which records its router logits as the block did);
  :func:`from_hf_model` converts every block of a model in place.
* :func:`route_attention_mask`: hand the model's ``attention_mask`` to its MoE layers (the
  decoder layers call their MLP without it), so padding is neither routed nor counted.
* :func:`moeify`: replace a dense model's MLPs with upcycled MoE layers (Komatsuzaki et al.
  2022), in place.
* :func:`route_depths`: wrap a decoder's layers in Mixture-of-Depths (Raposo et al. 2024);
  :class:`MoDCache` / :class:`MoDCacheLayer` (loaded on first access: they subclass
  ``transformers``' cache classes) hold a routed layer's KV cache, routed tokens only.
* :func:`export_pretrained`: save a converted or upcycled model as a native ``transformers``
  checkpoint (Mixtral, Qwen3-MoE, ...) that loads without this library.
* :func:`attach_aux_loss`: make ``model(..., labels=...).loss`` include ``pm.aux_loss(model)``
  (what ``transformers.Trainer`` optimises).

``transformers`` is an optional dependency (``pip install pytorch-mixtures[hf]``); nothing here
imports it: the functions work on the modules you pass in.
"""

from .depths import MoDDecoderLayer, route_depths
from .export import export_pretrained
from .hf import SwiGLUMLP, from_hf, from_hf_model, supported_blocks, to_hf
from .hf_layer import HFMoELayer, MaskRouting, route_attention_mask
from .upcycle import attach_aux_loss, moeify

# the cache classes subclass transformers' own, so they load only when asked for
_LAZY = {"MoDCache", "MoDCacheLayer"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from . import depth_cache

        return getattr(depth_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HFMoELayer",
    "MaskRouting",
    "MoDCache",
    "MoDCacheLayer",
    "MoDDecoderLayer",
    "SwiGLUMLP",
    "attach_aux_loss",
    "export_pretrained",
    "from_hf",
    "from_hf_model",
    "moeify",
    "route_attention_mask",
    "route_depths",
    "supported_blocks",
    "to_hf",
]
