"""Routers without a learned gate: fixed rules instead of a learned score.

* :class:`HashRouter`: hash layers (Roller et al. 2021, "Hash Layers For Large Sparse
  Models"): a fixed random map from token id to expert.
* :class:`UniformRouter`: random or round-robin assignment, for benchmarking balanced loads.

Both routers return the same :class:`~pytorch_mixtures.routing.RouterOutput` as the learned
ones, so they plug into ``MoELayer`` unchanged. They have no parameters and no aux losses.

Shape legend: B batch, T sequence, N = B*T tokens, D model dim, E experts, K slots per token,
V vocabulary size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_capacity_factor, check_int, check_token_ids
from .base import Router, RouterOutput, token_major_output
from .capacity import token_choice_keep

__all__ = ["HashRouter", "UniformRouter"]

UniformMode = Literal["random", "round_robin"]


def _fixed_output(
    x_BTD: Tensor,
    expert_ids_NK: Tensor,
    probs_NE: Tensor,
    weight: float,
    mask_BT: Tensor | None,
    capacity_factor: float | None,
    ratio: tuple[int, int] | None,
) -> RouterOutput:
    """A token-major :class:`RouterOutput` with every slot weighted ``weight``, GShard capacity
    (as ``TopKRouter``'s), ``probs`` as logits and no aux loss."""
    num_experts = probs_NE.shape[-1]
    mask_N = None if mask_BT is None else mask_BT.reshape(-1)
    weights_NK = torch.full(expert_ids_NK.shape, weight, dtype=probs_NE.dtype, device=x_BTD.device)
    kept_NK, capacity = token_choice_keep(
        expert_ids_NK, mask_N, capacity_factor, num_experts, ratio
    )
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
        self.vocab_size = check_int("vocab_size", vocab_size)
        check_int("seed", seed, low=None)
        self.capacity_factor = check_capacity_factor(capacity_factor)
        generator = torch.Generator().manual_seed(int(seed))
        table = torch.randint(num_experts, (self.vocab_size,), generator=generator)
        self.register_buffer("hash_table", table)

    def route(
        self, x_BTD: Tensor, mask_BT: Tensor | None, token_ids: Tensor | None
    ) -> RouterOutput:
        ids_N = check_token_ids(
            token_ids, tuple(x_BTD.shape[:2]), self.vocab_size, expected_device=x_BTD.device
        )
        device = x_BTD.device
        expert_ids_N1 = self.hash_table[ids_N.to(self.hash_table.device)].to(device).view(-1, 1)
        dtype = torch.promote_types(x_BTD.dtype, torch.float32)
        probs_NE = F.one_hot(expert_ids_N1.view(-1), self.num_experts).to(dtype)
        return _fixed_output(
            x_BTD, expert_ids_N1, probs_NE, 1.0, mask_BT, self.capacity_factor,
            self._capacity_ratio,
        )  # fmt: skip

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
        self.top_k = check_int("top_k", top_k, 1, num_experts)
        if mode not in ("random", "round_robin"):
            raise ValueError(f"mode: expected 'random' or 'round_robin', got {mode!r}")
        self.mode: UniformMode = mode
        self.capacity_factor = check_capacity_factor(capacity_factor)

    def route(
        self, x_BTD: Tensor, mask_BT: Tensor | None, token_ids: Tensor | None
    ) -> RouterOutput:
        device = x_BTD.device
        num_tokens = x_BTD.shape[0] * x_BTD.shape[1]
        num_experts, top_k = self.num_experts, self.top_k
        dtype = torch.promote_types(x_BTD.dtype, torch.float32)
        if self.mode == "random":
            # the top-k of i.i.d. uniforms is a uniformly random k-subset
            noise_NE = torch.rand(num_tokens, num_experts, device=device)
            expert_ids_NK = noise_NE.topk(top_k, dim=-1).indices
        else:
            slots_NK = torch.arange(num_tokens * top_k, device=device).view(num_tokens, top_k)
            expert_ids_NK = slots_NK % num_experts
        probs_NE = torch.full(
            (num_tokens, num_experts), 1.0 / num_experts, dtype=dtype, device=device
        )
        return _fixed_output(
            x_BTD, expert_ids_NK, probs_NE, 1.0 / top_k, mask_BT, self.capacity_factor,
            self._capacity_ratio,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, mode={self.mode!r}, "
            f"capacity_factor={self.capacity_factor}"
        )
