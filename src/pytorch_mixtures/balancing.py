"""Compatibility module: the balancing losses now live in :mod:`pytorch_mixtures.losses` and the
selection rules in :mod:`pytorch_mixtures.routing.selection`. Kept so that
``pytorch_mixtures.balancing.X`` still works.
"""

from .losses import cv_squared, importance_loss, noisy_top_k_load, sequence_balance_loss
from .routing.selection import group_limited_scores, softplus_noise_std

__all__ = [
    "cv_squared",
    "group_limited_scores",
    "importance_loss",
    "noisy_top_k_load",
    "sequence_balance_loss",
    "softplus_noise_std",
]
