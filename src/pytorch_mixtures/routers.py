"""Routers without a learned gate, and the aux-loss-free bias update.

* :class:`HashRouter`: hash layers (Roller et al. 2021, "Hash Layers For Large Sparse
  Models"): a fixed random map from token id to expert.
* :class:`UniformRouter`: random or round-robin assignment, for benchmarking balanced loads.
* :func:`update_expert_bias`: DeepSeek-V3's bias update for every ``TopKRouter(expert_bias=True)``
  in a model.

Both routers return the same :class:`~pytorch_mixtures.routing.RouterOutput` as the learned
ones, so they plug into ``MoELayer`` unchanged. They have no parameters and no aux losses.

Shape legend: B batch, T sequence, N = B*T tokens, D model dim, E experts, K slots per token,
V vocabulary size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .routing import (
    Router,
    RouterOutput,
    TopKRouter,
    _check_capacity_factor,
    _check_positive_int,
    token_choice_keep,
    token_major_output,
)

__all__ = ["HashRouter", "UniformRouter", "update_expert_bias"]

UniformMode = Literal["random", "round_robin"]


def _token_choice_output(
    x_BTD: Tensor,
    expert_ids_NK: Tensor,
    probs_NE: Tensor,
    weights_NK: Tensor,
    mask_N: Tensor | None,
    capacity_factor: float | None,
) -> RouterOutput:
    """A token-major :class:`RouterOutput` with GShard capacity (as ``TopKRouter``'s)."""
    num_experts = probs_NE.shape[-1]
    kept_NK, capacity = token_choice_keep(expert_ids_NK, mask_N, capacity_factor, num_experts)
    zero = torch.zeros((), device=x_BTD.device)
    return token_major_output(
        probs_NE, probs_NE, expert_ids_NK, weights_NK, kept_NK, mask_N, capacity, {}, zero
    )


class HashRouter(Router):
    """Hash routing (Roller et al. 2021): token id ``v`` always goes to expert ``table[v]``.

    ``table`` (``hash_table``, a ``[V]`` int64 buffer saved in the state dict) is a fixed
    uniformly random map drawn from ``seed``: the paper's "Random Hash". Each token has one
    slot with weight 1 (the expert's output is the layer's output). Nothing is learned, so
    there is no aux loss; the routing is causal (a token's expert depends only on its id).

    It routes on token ids, so it needs them at forward::

        moe = pm.MoELayer(dim, pm.HashRouter(dim, 8, vocab_size=32000), experts)
        y = moe(h, token_ids=input_ids)      # input_ids [B, T], h [B, T, D]

    ``RouterOutput.logits`` and ``probs`` are the one-hot ``[N, E]`` float32 assignment.

    Args:
        dim: model dimension D (the router ignores the hidden states' values).
        num_experts: E.
        vocab_size: V, token ids must lie in ``[0, V)``.
        seed: seed of the random table.
        capacity_factor: None (dropless) or > 0, as for ``TopKRouter``.
    """

    is_causal = True
    uses_token_ids = True
    has_gate = False
    hash_table: Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        vocab_size: int,
        *,
        seed: int = 0,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__(dim, num_experts)
        self.vocab_size = _check_positive_int("vocab_size", vocab_size)
        self.capacity_factor = _check_capacity_factor(capacity_factor)
        generator = torch.Generator().manual_seed(int(seed))
        table = torch.randint(num_experts, (self.vocab_size,), generator=generator)
        self.register_buffer("hash_table", table)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, *, token_ids: Tensor | None = None
    ) -> RouterOutput:
        """Route ``x`` ``[B, T, D]`` (or ``[N, D]``) by ``token_ids`` of shape ``x.shape[:-1]``."""
        x_BTD, mask_BT = self._check_input(x, attention_mask)
        num_tokens = x_BTD.shape[0] * x_BTD.shape[1]
        if token_ids is None:
            raise ValueError(
                "token_ids: HashRouter routes on token ids; pass them as "
                "moe(x, token_ids=input_ids) or router(x, token_ids=input_ids)"
            )
        if not isinstance(token_ids, Tensor) or token_ids.is_floating_point():
            got = token_ids.dtype if isinstance(token_ids, Tensor) else type(token_ids).__name__
            raise TypeError(f"token_ids: expected an integer Tensor, got {got}")
        if token_ids.numel() != num_tokens:
            raise ValueError(
                f"token_ids: expected shape {tuple(x.shape[:-1])} (one id per token), "
                f"got {tuple(token_ids.shape)}"
            )
        ids_N = token_ids.reshape(-1).long()
        if num_tokens and (ids_N.min() < 0 or ids_N.max() >= self.vocab_size):
            raise ValueError(
                f"token_ids: expected ids in [0, {self.vocab_size}), "
                f"got min {int(ids_N.min())}, max {int(ids_N.max())}"
            )
        expert_ids_N1 = self.hash_table[ids_N.to(self.hash_table.device)].to(x.device).view(-1, 1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        probs_NE = F.one_hot(expert_ids_N1.view(-1), self.num_experts).to(dtype)
        weights_N1 = torch.ones(expert_ids_N1.shape, dtype=dtype, device=x.device)
        mask_N = None if mask_BT is None else mask_BT.reshape(-1)
        return _token_choice_output(
            x_BTD, expert_ids_N1, probs_NE, weights_N1, mask_N, self.capacity_factor
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, vocab_size={self.vocab_size}, "
            f"capacity_factor={self.capacity_factor}"
        )


class UniformRouter(Router):
    """Input-independent routing with balanced expected loads, for benchmarks and baselines.

    ``mode="random"``: each token draws ``top_k`` distinct experts uniformly at random (from
    torch's global generator, on the input's device) at every forward. ``mode="round_robin"``:
    token n's slot j goes to expert ``(n * top_k + j) mod E``: exactly balanced loads whenever
    ``E`` divides ``N * top_k``, and deterministic. Every slot has weight ``1 / top_k``.

    ``RouterOutput.probs`` (and ``logits``) are the uniform ``1 / E`` over experts. No
    parameters, no aux loss; causal (nothing depends on other tokens' values).

    Args:
        dim: model dimension D.
        num_experts: E.
        top_k: slots per token, in ``[1, E]``.
        mode: ``"random"`` or ``"round_robin"``.
        capacity_factor: None (dropless) or > 0, as for ``TopKRouter``.
    """

    is_causal = True
    has_gate = False

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        *,
        mode: UniformMode = "random",
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__(dim, num_experts)
        self.top_k = _check_positive_int("top_k", top_k, 1, num_experts)
        if mode not in ("random", "round_robin"):
            raise ValueError(f"mode: expected 'random' or 'round_robin', got {mode!r}")
        self.mode: UniformMode = mode
        self.capacity_factor = _check_capacity_factor(capacity_factor)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> RouterOutput:
        """Route ``x`` ``[B, T, D]`` or ``[N, D]``; ``attention_mask`` ``[B, T]`` (1 = real)."""
        x_BTD, mask_BT = self._check_input(x, attention_mask)
        num_tokens = x_BTD.shape[0] * x_BTD.shape[1]
        num_experts, top_k = self.num_experts, self.top_k
        dtype = torch.promote_types(x.dtype, torch.float32)
        if self.mode == "random":
            # the top-k of i.i.d. uniforms is a uniformly random k-subset
            noise_NE = torch.rand(num_tokens, num_experts, device=x.device)
            expert_ids_NK = noise_NE.topk(top_k, dim=-1).indices
        else:
            slots_NK = torch.arange(num_tokens * top_k, device=x.device).view(num_tokens, top_k)
            expert_ids_NK = slots_NK % num_experts
        probs_NE = torch.full(
            (num_tokens, num_experts), 1.0 / num_experts, dtype=dtype, device=x.device
        )
        weights_NK = torch.full((num_tokens, top_k), 1.0 / top_k, dtype=dtype, device=x.device)
        mask_N = None if mask_BT is None else mask_BT.reshape(-1)
        return _token_choice_output(
            x_BTD, expert_ids_NK, probs_NE, weights_NK, mask_N, self.capacity_factor
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, mode={self.mode!r}, "
            f"capacity_factor={self.capacity_factor}"
        )


def update_expert_bias(
    model: nn.Module, rate: float = 1e-3, *, all_reduce: bool = True, group: object = None
) -> dict[str, Tensor]:
    """Apply DeepSeek-V3's aux-loss-free bias update to every bias-balanced router in ``model``.

    For each ``TopKRouter(expert_bias=True)``: ``bias += rate * sign(mean(load) - load)`` with
    ``load`` the experts chosen by real tokens in the training forwards since the last call,
    then the counts are reset. Call it once per optimizer step (after the last micro-batch of
    a gradient-accumulation step). Counts are all-reduced over ``group`` when
    ``torch.distributed`` is initialised (``all_reduce=True``), so ranks stay in sync.

    Args:
        model: any module containing the routers (or a router itself).
        rate: the bias update speed gamma (DeepSeek-V3: 1e-3), >= 0.
        all_reduce: sum the counts over ``group`` when distributed.
        group: the process group (default: the world).

    Returns:
        Module name -> ``[E]`` int64 loads used, for the routers that had counted forwards.

    Raises:
        ValueError: when ``model`` holds no router with ``expert_bias=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    found = False
    used: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, TopKRouter) and module.expert_bias is not None:
            found = True
            loads = module.update_expert_bias(rate, all_reduce=all_reduce, group=group)
            if loads is not None:
                used[name] = loads
    if not found:
        raise ValueError(
            "model: contains no TopKRouter(expert_bias=True); build the routers with "
            "expert_bias=True to use update_expert_bias"
        )
    return used
