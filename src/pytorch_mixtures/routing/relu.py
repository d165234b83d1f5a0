"""ReLU routing (ReMoE: Wang et al. 2025, "ReMoE: Fully Differentiable Mixture-of-Experts with
ReLU Routing", ICLR 2025, arXiv 2412.14711).

Shape legend: B batch, T sequence, N = B*T tokens, D model dim, E experts, S routed slots (the
nonzero router outputs of real tokens).
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from ..checks import check_flag, check_int, check_nonnegative_float
from ..losses import router_z_loss
from .base import Router, RouterOutput, _in_autograd_backward

__all__ = ["ReLURouter", "relu_l1_loss"]


def relu_l1_loss(
    weights_NE: Tensor,
    active_NE: Tensor,
    mask_N: Tensor | None,
    target_k: float,
    *,
    load_balance: bool,
) -> Tensor:
    """ReMoE's sparsity regulariser (paper eq. 6 and its load-balanced form, section 3.4).

    Plain: ``L = (1/T) sum_t sum_e R_te`` (the mean L1 norm of the router outputs). Load
    balanced: ``L = (1/T) sum_t sum_e f_e R_te`` with ``f_e = E / (k T) sum_t 1[R_te > 0]`` (no
    gradient through ``f``), so crowded experts are pushed toward zero harder; ``f_e`` is 1 for
    every expert when each token uses exactly ``k`` experts evenly. ``T`` counts real tokens.

    Args:
        weights_NE: ``[N, E]`` router outputs ``R = relu(logits)``, float32 (or float64).
        active_NE: ``[N, E]`` bool, ``R > 0`` on real tokens.
        mask_N: ``[N]`` bool real tokens, or None.
        target_k: the target number of active experts per token ``k``.
        load_balance: use the load-balanced form.

    Returns:
        0-dim tensor of ``weights_NE``'s dtype.
    """
    if mask_N is not None:
        weights_NE = torch.where(mask_N.unsqueeze(-1), weights_NE, 0.0)
        num_tokens = mask_N.sum().clamp_min(1).to(weights_NE.dtype)
    else:
        num_tokens = torch.tensor(max(weights_NE.shape[0], 1), dtype=weights_NE.dtype)
        num_tokens = num_tokens.to(weights_NE.device)
    per_expert_E = weights_NE.sum(dim=0)
    if load_balance:
        num_experts = weights_NE.shape[-1]
        counts_E = active_NE.sum(dim=0).to(weights_NE.dtype)
        per_expert_E = per_expert_E * (counts_E * num_experts / (target_k * num_tokens))
    return per_expert_E.sum() / num_tokens


class ReLURouter(Router):
    """ReLU routing (ReMoE, Wang et al. 2025, arXiv 2412.14711): the combine weights are
    ``R = relu(x @ W^T)`` over all E experts, with no top-k and no renormalisation.

    Each token goes to the experts where ``R > 0``, weighted by ``R``: the routing is continuous
    (an expert's weight reaches zero before it is dropped), fully differentiable and dropless.
    The number of active experts per token varies; it is steered toward ``target_k`` on average
    by the paper's L1 penalty on ``R`` with an adaptive coefficient ``lambda``:

    * loss (``aux_losses["relu_l1"]``, unweighted): :func:`relu_l1_loss`, load-balanced by
      default (paper section 3.4: ``(1/T) sum_t sum_e f_e R_te``, ``f_e = E/(kT) sum_t 1[R_te>0]``);
      ``aux_loss = lambda * relu_l1 (+ z_loss_coef * router_z)``.
    * coefficient (paper eq. 7): after each training forward (checkpoint recomputations inside
      backward excluded), ``lambda <- lambda * alpha ** sign(k_realised - target_k)``, i.e.
      ``alpha ** sign((1 - k/E) - S)`` with ``S = 1 - k_realised / E`` the realised sparsity
      and ``k_realised`` the mean active experts per real token. Too many active experts raise
      the penalty, too few lower it. Paper values: ``alpha = 1.2``, ``lambda_0 = 1e-8``.
      ``lambda`` is the float32 buffer ``l1_coef`` (saved in the state dict). The paper updates
      once per optimizer step from the sparsity of all layers; here each router updates from
      its own forward (one update per training forward: with gradient accumulation, one per
      micro-batch; ranks of a distributed run update from their own tokens).

    Slots (:class:`RouterOutput`): one per nonzero ``R`` of a real token, in token-major order
    (``slots_per_token=None``: the count varies per token), all kept. Zero weights make no slot,
    so experts run only on active (token, expert) pairs, and ``stats`` counts no drop; a token
    with no active expert is counted as unrouted (its output is zero: the residual carries it).
    ``stats.active_experts_per_token`` reports the realised mean. Building the slot list reads
    the active count on the host (one sync per forward); ``MoELayer`` has no decode path for
    this router (:meth:`decide` is the default None: eval runs the full path, same outputs).

    Args:
        dim: model dimension D.
        num_experts: E.
        target_k: target mean number of active experts per token, in ``[1, E]`` (the paper's k).
        l1_coef_init: the adaptive coefficient's initial value ``lambda_0`` (paper: 1e-8), >= 0.
        l1_coef_alpha: the update factor ``alpha`` (paper: 1.2), >= 1 (1 freezes ``lambda``).
        load_balance: the load-balanced L1 term (paper section 3.4; default) or the plain L1.
        adaptive: update ``lambda`` after each training forward (False: ``lambda`` stays fixed).
        z_loss_coef: weight of the router z-loss in ``aux_loss`` (default 0: ReMoE uses none).
        init_std: std of the router weight init (default 0.02).
    """

    is_causal = True
    supports_routing_replay = True
    l1_coef: Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        target_k: int = 2,
        *,
        l1_coef_init: float = 1e-8,
        l1_coef_alpha: float = 1.2,
        load_balance: bool = True,
        adaptive: bool = True,
        z_loss_coef: float = 0.0,
        init_std: float | None = None,
    ) -> None:
        super().__init__(dim, num_experts, init_std)
        self.target_k = check_int("target_k", target_k, 1, self.num_experts)
        init = check_nonnegative_float("l1_coef_init", l1_coef_init)
        alpha = check_nonnegative_float("l1_coef_alpha", l1_coef_alpha)
        if alpha < 1:
            raise ValueError(f"l1_coef_alpha: expected a value >= 1, got {l1_coef_alpha}")
        self.l1_coef_alpha = alpha
        self.load_balance = check_flag("load_balance", load_balance)
        self.adaptive = check_flag("adaptive", adaptive)
        self.z_loss_coef = check_nonnegative_float("z_loss_coef", z_loss_coef)
        self.register_buffer("l1_coef", torch.tensor(init, dtype=torch.float32))

    @property
    def capacity_factor(self) -> float | None:
        """Always None: ReLU routing is dropless (a capacity is refused)."""
        return None

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        if value is not None:
            raise ValueError(
                f"capacity_factor: expected None (ReLURouter is dropless), got {value!r}"
            )
        self._capacity_factor = None
        self._capacity_ratio = None

    def route(
        self, x_BTD: Tensor, mask_BT: Tensor | None, token_ids: Tensor | None
    ) -> RouterOutput:
        x_ND = x_BTD.reshape(-1, self.dim)
        logits_NE = self._logits(x_ND)
        weights_NE = torch.relu(logits_NE)
        mask_N = None if mask_BT is None else mask_BT.reshape(-1)
        active_NE = weights_NE > 0
        if mask_N is not None:
            active_NE = active_NE & mask_N.unsqueeze(-1)
        l1 = relu_l1_loss(
            weights_NE, active_NE, mask_N, self.target_k, load_balance=self.load_balance
        )
        # the coefficient of this forward (the update below replaces the buffer, never in place:
        # autograd keeps this value for backward)
        weighted = self.l1_coef * l1.float()
        aux_losses = {"relu_l1": l1.float(), "router_z": router_z_loss(logits_NE, mask_N)}
        if self.z_loss_coef:
            weighted = weighted + self.z_loss_coef * aux_losses["router_z"]
        if self.training and self.adaptive and not _in_autograd_backward():
            self._update_l1_coef(active_NE, mask_N)
        replay = self._routing_replay
        slot_NE = active_NE
        if replay is not None:  # record the active set, or route on the recorded one
            if replay.replaying:
                slot_NE = replay.take(tuple(active_NE.shape), torch.bool, x_ND.device)
                if mask_N is not None:
                    slot_NE = slot_NE & mask_N.unsqueeze(-1)
            else:
                replay.record(active_NE)
        # nonzero's row-major order is token-major: slot order follows the tokens
        token_ids_S, expert_ids_S = slot_NE.nonzero(as_tuple=True)
        return RouterOutput(
            logits=logits_NE,
            probs=weights_NE,
            token_ids=token_ids_S,
            expert_ids=expert_ids_S,
            weights=weights_NE[token_ids_S, expert_ids_S],
            kept=torch.ones_like(token_ids_S, dtype=torch.bool),
            token_mask=mask_N,
            slots_per_token=None,
            capacity=None,
            aux_losses=MappingProxyType(aux_losses),
            aux_loss=weighted,
        )

    @torch.no_grad()
    def _update_l1_coef(self, active_NE: Tensor, mask_N: Tensor | None) -> None:
        """``lambda <- lambda * alpha ** sign(k_realised - target_k)`` (paper eq. 7), on the
        device (no host sync)."""
        if mask_N is None:
            realised = active_NE.sum(dim=-1).float().mean()
        else:
            realised = active_NE.sum().float() / mask_N.sum().clamp_min(1).float()
        step = torch.sign(realised - float(self.target_k))
        self.l1_coef = self.l1_coef * torch.pow(self.l1_coef.new_tensor(self.l1_coef_alpha), step)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, target_k={self.target_k}, "
            f"l1_coef={float(self.l1_coef):.3g}, l1_coef_alpha={self.l1_coef_alpha}, "
            f"load_balance={self.load_balance}"
        )
