"""A small decoder-only transformer LM: dense, MoE, MoD or MoDE, readable top to bottom.

Pre-norm blocks (RMSNorm), rotary position embeddings applied at each token's *true* position,
causal attention on ``scaled_dot_product_attention``, SwiGLU feed-forward (or an ``MoELayer``),
tied input/output embeddings, and ``generate()`` with a KV cache.

Attention is position-based: query q may attend to key k iff ``pos_k <= pos_q`` and k is a real
token. That one rule covers plain causal training, left-padded batches, KV-cache decoding, and
blocks that see only a routed subset of tokens (Mixture-of-Depths), since each token carries its
original position wherever it goes.

Shape legend: B batch, T sequence (queries), L cached + new keys, D model dim, H heads,
Hd head dim, V vocabulary.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_flag, check_int, check_mask_values, name_layers
from ..depth import CausalRouterName, GateName, MixtureOfDepths
from ..experts import SwiGLUExperts
from ..moe_layer import MoELayer
from ..routing import TopKRouter

__all__ = [
    "Block",
    "KVCache",
    "LMOutput",
    "ModelConfig",
    "StaticKVCache",
    "SwiGLU",
    "TransformerLM",
]

ModelKind = Literal["dense", "moe", "mod", "mode"]
MoDEVariant = Literal["staged", "integrated"]


@dataclass(frozen=True)
class ModelConfig:
    """Configuration of :class:`TransformerLM`.

    ``kind``: ``"dense"`` (SwiGLU FFN of width ``ffn_hidden``), ``"moe"`` (every ``moe_every``-th
    FFN is a top-k MoE of ``num_experts`` SwiGLU experts of width ``expert_hidden``, default
    ``ffn_hidden // top_k`` so active parameters match the dense model; the router's combine
    weights sum to ``routed_scaling_factor``, default ``top_k``, so that under uniform routing
    a MoE layer computes exactly what the dense FFN of width ``top_k * expert_width`` does;
    1.0 is Mixtral's convention, which scales the FFN output by ``1 / top_k`` against the
    dense model and loses to it in the demo), ``"mod"`` (every
    ``mod_every``-th block is routed by Mixture-of-Depths at ``mod_capacity``) and ``"mode"``
    (Mixture-of-Depths-and-Experts, Raposo et al. 2024 §3.6): with ``mode_variant="staged"``
    (default) the MoE model's every ``mod_every``-th block is also MoD-routed; with
    ``"integrated"`` there is no MoD wrapper and each MoE layer gets ``num_noop_experts``
    no-op experts (default ``num_experts``), so a token routed to one skips the FFN.

    MoD layers: ``mod_gate`` and ``mod_causal_router`` as in
    :class:`~pytorch_mixtures.depth.MixtureOfDepths`, BCE weight ``mod_aux_loss_coef``.
    ``num_noop_experts`` also applies to plain ``"moe"`` models when set.
    """

    vocab_size: int = 256
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ffn_hidden: int = 512
    max_seq_len: int = 1024
    kind: ModelKind = "dense"
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None
    moe_every: int = 1
    capacity_factor: float | None = None
    routed_scaling_factor: float | None = None
    router_kwargs: dict[str, object] = field(default_factory=dict)
    mod_capacity: float = 0.125
    mod_every: int = 2
    rope_theta: float = 10000.0
    mod_gate: GateName = "sigmoid"
    mod_causal_router: CausalRouterName = "predictor"
    mod_aux_loss_coef: float = 0.01
    mode_variant: MoDEVariant = "staged"
    num_noop_experts: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_experts", "top_k"):
            check_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k: expected an integer in [1, num_experts={self.num_experts}], "
                f"got {self.top_k}"
            )
        if self.kind not in ("dense", "moe", "mod", "mode"):
            raise ValueError(f"kind: expected 'dense', 'moe', 'mod' or 'mode', got {self.kind!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"num_heads: expected a divisor of dim={self.dim} giving an even head dim, "
                f"got {self.num_heads}"
            )
        for name in ("ffn_hidden", "max_seq_len", "moe_every", "mod_every"):
            check_int(name, getattr(self, name))
        if not isinstance(self.rope_theta, (int, float)) or not (
            math.isfinite(self.rope_theta) and self.rope_theta > 0
        ):
            raise ValueError(f"rope_theta: expected a finite value > 0, got {self.rope_theta!r}")
        if not isinstance(self.router_kwargs, dict):
            raise TypeError(
                f"router_kwargs: expected a dict, got {type(self.router_kwargs).__name__}"
            )
        if self.mode_variant not in ("staged", "integrated"):
            raise ValueError(
                f"mode_variant: expected 'staged' or 'integrated', got {self.mode_variant!r}"
            )
        if self.num_noop_experts is not None and self.num_noop_experts < 0:
            raise ValueError(
                f"num_noop_experts: expected an integer >= 0 or None, got {self.num_noop_experts}"
            )
        if self.routed_scaling_factor is not None and not (
            isinstance(self.routed_scaling_factor, (int, float))
            and not isinstance(self.routed_scaling_factor, bool)
            and math.isfinite(self.routed_scaling_factor)
            and self.routed_scaling_factor > 0
        ):
            raise ValueError(
                "routed_scaling_factor: expected a finite value > 0 or None, "
                f"got {self.routed_scaling_factor!r}"
            )
        if isinstance(self.mod_capacity, bool) or not isinstance(self.mod_capacity, (int, float)):
            raise TypeError(f"mod_capacity: expected a float in (0, 1], got {self.mod_capacity!r}")
        if not 0.0 < self.mod_capacity <= 1.0:
            raise ValueError(f"mod_capacity: expected a value in (0, 1], got {self.mod_capacity}")
        if self.num_noop_experts is not None:
            check_int("num_noop_experts", self.num_noop_experts, low=0)
        unknown = set(self.router_kwargs) - set(inspect.signature(TopKRouter).parameters)
        if unknown:
            raise ValueError(
                f"router_kwargs: expected TopKRouter arguments, got unknown {sorted(unknown)}"
            )

    @property
    def combine_scale(self) -> float:
        """What the MoE combine weights sum to (``routed_scaling_factor``, default ``top_k``)."""
        if self.routed_scaling_factor is not None:
            return float(self.routed_scaling_factor)
        return float(self.top_k)

    @property
    def expert_width(self) -> int:
        return (
            self.expert_hidden if self.expert_hidden is not None else self.ffn_hidden // self.top_k
        )

    def is_moe_layer(self, index: int) -> bool:
        return self.kind in ("moe", "mode") and index % self.moe_every == self.moe_every - 1

    def is_mod_layer(self, index: int) -> bool:
        routed = self.kind == "mod" or (self.kind == "mode" and self.mode_variant == "staged")
        return routed and index % self.mod_every == self.mod_every - 1

    @property
    def noop_experts(self) -> int:
        """No-op experts per MoE layer (integrated MoDE); 0 for plain MoE by default."""
        if self.num_noop_experts is not None:
            return self.num_noop_experts
        return self.num_experts if self.kind == "mode" and self.mode_variant == "integrated" else 0


@dataclass(frozen=True)
class LMOutput:
    """``logits`` ``[B, T, V]``; ``loss`` 0-dim cross-entropy (None without targets)."""

    logits: Tensor
    loss: Tensor | None


class KVCache:
    """Keys and values of the tokens a layer has processed, with their positions.

    Per layer: ``k``/``v`` ``[B, H, L, Hd]``, ``pos`` ``[B, L]`` int64, ``valid`` ``[B, L]`` bool.
    A routed (MoD) layer appends only the tokens it processed, so ``L`` differs per layer.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers: list[tuple[Tensor, Tensor, Tensor, Tensor] | None] = [None] * num_layers

    def append(
        self, layer: int, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Add this step's entries to layer ``layer``; return the layer's full cache."""
        old = self.layers[layer]
        if old is not None:
            k = torch.cat([old[0], k], dim=2)
            v = torch.cat([old[1], v], dim=2)
            pos = torch.cat([old[2], pos], dim=1)
            valid = torch.cat([old[3], valid], dim=1)
        self.layers[layer] = (k, v, pos, valid)
        return k, v, pos, valid

    def length(self, layer: int) -> int:
        entry = self.layers[layer]
        return 0 if entry is None else int(entry[0].shape[2])


class StaticKVCache:
    """A :class:`KVCache` preallocated to ``max_len`` slots per layer, so shapes never change.

    Per layer: ``k``/``v`` ``[B, H, max_len, Hd]``, ``pos`` ``[B, max_len]`` int64, ``valid``
    ``[B, max_len]`` bool (False until written) and ``length`` a 0-dim int64 tensor, the slots
    written. :meth:`append` writes this step's entries in place at ``length`` and returns the
    whole buffers; attention masks the unwritten slots out (``valid``), so the result equals
    :class:`KVCache`'s. Fixed shapes and in-place writes are what a compiled decode step needs:
    it compiles once, and under CUDA graphs the buffers keep their addresses. A routed (MoD)
    layer writes only the steps it runs, so its ``length`` may trail the other layers'.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("batch", batch),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("max_len", max_len),
        ):
            check_int(name, value)
        self.max_len = max_len

        def zeros(*shape: int, dtype: torch.dtype = dtype) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.layers: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = [
            (
                zeros(batch, num_heads, max_len, head_dim),
                zeros(batch, num_heads, max_len, head_dim),
                zeros(batch, max_len, dtype=torch.long),
                zeros(batch, max_len, dtype=torch.bool),
                zeros(dtype=torch.long),
            )
            for _ in range(num_layers)
        ]
        # fixed addresses: CUDA graphs (mode="reduce-overhead") then keep the in-place writes in
        # the graph instead of skipping it for mutating its inputs
        for buffers in self.layers:
            for buffer in buffers:
                torch._dynamo.mark_static_address(buffer)

    def append(
        self, layer: int, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Write this step's ``T`` entries at the layer's ``length``; return its full buffers."""
        k_all, v_all, pos_all, valid_all, length = self.layers[layer]
        num_new = k.shape[2]
        if k.shape[0] != k_all.shape[0]:
            raise ValueError(
                f"cache: expected a batch of {k_all.shape[0]} rows (as the cache was built), "
                f"got {k.shape[0]}"
            )
        # eager only (a host read): under torch.compile the caller bounds the length up front
        if not torch.compiler.is_compiling() and int(length) + num_new > self.max_len:
            raise ValueError(
                f"cache: expected at most max_len={self.max_len} entries in layer {layer}, got "
                f"{int(length) + num_new}"
            )
        slots_T = length + torch.arange(num_new, device=length.device)
        k_all.index_copy_(2, slots_T, k.to(k_all.dtype))
        v_all.index_copy_(2, slots_T, v.to(v_all.dtype))
        pos_all.index_copy_(1, slots_T, pos)
        valid_all.index_copy_(1, slots_T, valid)
        length += num_new
        return k_all, v_all, pos_all, valid_all

    def length(self, layer: int) -> int:
        """Slots written in layer ``layer`` (a host read)."""
        return int(self.layers[layer][4])


def rope(x_BHTd: Tensor, pos_BT: Tensor, theta: float) -> Tensor:
    """Rotate query/key pairs by angles ``pos * theta^(-2i/Hd)`` (Su et al. 2021), in float32."""
    head_dim = x_BHTd.shape[-1]
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=x_BHTd.device).float() / head_dim)
    angles_BTh = pos_BT.float().unsqueeze(-1) * inv_freq
    cos, sin = angles_BTh.cos().unsqueeze(1), angles_BTh.sin().unsqueeze(1)
    x1, x2 = x_BHTd.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x_BHTd.dtype)


class Attention(nn.Module):
    """Causal multi-head attention at true positions, with an optional KV cache."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.layer, self.theta = config.num_heads, layer, config.rope_theta
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(
        self,
        x_BTD: Tensor,
        pos_BT: Tensor,
        valid_BT: Tensor | None,
        cache: KVCache | StaticKVCache | None,
    ) -> Tensor:
        batch, seq_len, dim = x_BTD.shape
        head_dim = dim // self.num_heads
        qkv = self.qkv(x_BTD).view(batch, seq_len, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, T, Hd]
        q, k = rope(q, pos_BT, self.theta), rope(k, pos_BT, self.theta)
        plain = cache is None and valid_BT is None
        if plain:
            # fast path: contiguous positions, no padding -> ordinary causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            valid = valid_BT if valid_BT is not None else torch.ones_like(pos_BT, dtype=torch.bool)
            key_pos, key_valid = pos_BT, valid
            if cache is not None:
                k, v, key_pos, key_valid = cache.append(self.layer, k, v, pos_BT, valid)
            allowed_BTL = key_valid[:, None, :] & (key_pos[:, None, :] <= pos_BT[:, :, None])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_BTL.unsqueeze(1))
            # a query with no allowed key (padding) yields NaN: replace, never multiply
            out = torch.where(allowed_BTL.any(-1)[:, None, :, None], out, 0.0)
        out_BTD: Tensor = self.proj(out.transpose(1, 2).reshape(batch, seq_len, dim))
        return out_BTD


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward ``W_down (silu(W_gate x) * W_up x)`` (Shazeer 2020)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        out: Tensor = self.down(F.silu(gate) * up)
        return out


class Block(nn.Module):
    """Pre-norm transformer block; returns ``x`` plus its own residual updates.

    ``forward(x, attention_mask=None, position_ids=None, cache=None)``: ``x`` ``[B, T, D]``,
    ``attention_mask`` ``[B, T]`` (True = real token), ``position_ids`` ``[B, T]`` true positions
    (default ``0..T-1``). Works on any subset of a sequence's tokens given their positions.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim)
        self.attn = Attention(config, layer)
        self.ffn_norm = nn.RMSNorm(config.dim)
        self.ffn: nn.Module
        if config.is_moe_layer(layer):
            router_kwargs: dict[str, Any] = {
                "routed_scaling_factor": config.combine_scale,
                **config.router_kwargs,
            }
            router = TopKRouter(
                config.dim,
                config.num_experts + config.noop_experts,
                config.top_k,
                capacity_factor=config.capacity_factor,
                **router_kwargs,
            )
            experts = SwiGLUExperts(config.num_experts, config.dim, config.expert_width)
            self.ffn = MoELayer(
                config.dim, router, experts, causal=True, num_noop_experts=config.noop_experts
            )
        else:
            self.ffn = SwiGLU(config.dim, config.ffn_hidden)

    def forward(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> Tensor:
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        valid = None if attention_mask is None else attention_mask.bool()
        x = x + self.attn(self.attn_norm(x), position_ids, valid, cache)
        h = self.ffn_norm(x)
        ffn_out: Tensor = (
            self.ffn(h, attention_mask=valid) if isinstance(self.ffn, MoELayer) else self.ffn(h)
        )
        return x + ffn_out


class TransformerLM(nn.Module):
    """Decoder-only LM over ``config.vocab_size`` tokens (bytes by default).

    ``forward(idx, targets=None, attention_mask=None, position_ids=None, cache=None)`` returns
    :class:`LMOutput`. ``generate`` decodes greedily or by sampling, with or without KV cache.
    Collect MoE/MoD aux losses with ``pytorch_mixtures.aux_loss(model)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([self._make_layer(i) for i in range(config.num_layers)])
        self.norm = nn.RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied embeddings
        self.apply(self._init_weights)
        name_layers(self)  # errors from a layer say which one ("layers.1.ffn")

    def _make_layer(self, index: int) -> nn.Module:
        block = Block(self.config, index)
        if self.config.is_mod_layer(index):
            return MixtureOfDepths(
                block,
                self.config.dim,
                self.config.mod_capacity,
                gate=self.config.mod_gate,
                causal_router=self.config.mod_causal_router,
                aux_loss_coef=self.config.mod_aux_loss_coef,
            )
        return block

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, SwiGLUExperts):
            # the same init as the dense FFN they replace, so dense vs MoE compares like for like
            for weight in module.parameters():
                nn.init.normal_(weight, mean=0.0, std=0.02)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> LMOutput:
        """``idx`` ``[B, T]`` int64 tokens; ``targets`` ``[B, T]`` (-100 = ignore)."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(
                f"idx: expected an int64 tensor [B, T], got {idx.dtype} {tuple(idx.shape)}"
            )
        _check_lm_inputs(idx, targets, attention_mask, position_ids, self.config.vocab_size)
        length = idx.shape[1] + (0 if cache is None else cache.length(0))
        if length > self.config.max_seq_len:
            raise ValueError(
                f"idx: expected at most max_seq_len={self.config.max_seq_len} positions "
                f"(with the cache), got {length}"
            )
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
            )
        return LMOutput(logits, loss)

    def num_params(self, active: bool = False) -> int:
        """Parameter count; with ``active`` only what one token uses (top_k of E experts)."""
        check_flag("active", active)
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for module in self.modules():
            if isinstance(module, MoELayer):
                expert_params = sum(p.numel() for p in module.experts.parameters())
                k = self.config.top_k
                total -= expert_params - expert_params * k // module.num_experts
        return total

    def new_static_cache(
        self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None
    ) -> StaticKVCache:
        """A preallocated cache for ``batch`` rows of up to ``max_len`` (default
        ``max_seq_len``) positions, on the model's device and (default) dtype."""
        weight = self.embed.weight
        return StaticKVCache(
            self.config.num_layers,
            batch,
            self.config.num_heads,
            self.config.dim // self.config.num_heads,
            self.config.max_seq_len if max_len is None else max_len,
            dtype=weight.dtype if dtype is None else dtype,
            device=weight.device,
        )

    def _last_logits(
        self,
        idx_BT: Tensor,
        mask_BT: Tensor | None,
        pos_BT: Tensor,
        cache: KVCache | StaticKVCache | None,
    ) -> Tensor:
        """The next-token logits ``[B, V]`` after ``idx_BT``: :meth:`forward` without its input
        checks (``generate`` checked the prompt; what it appends is valid by construction) and
        with the head on the last position only. The function ``compile=True`` compiles."""
        x = self.embed(idx_BT)
        for layer in self.layers:
            x = layer(x, attention_mask=mask_BT, position_ids=pos_BT, cache=cache)
        logits_BV: Tensor = self.head(self.norm(x[:, -1]))
        return logits_BV

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        attention_mask: Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        use_cache: bool = True,
        static_cache: bool = False,
        compile: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``idx`` ``[B, T]`` by ``max_new_tokens`` tokens -> ``[B, T + new]``.

        Runs in eval mode (restored afterwards). ``attention_mask`` marks left padding (0).
        ``temperature=0`` is greedy. With ``use_cache`` each step feeds only the new token;
        ``static_cache`` preallocates it (:class:`StaticKVCache`, sized to the prompt plus
        ``max_new_tokens``) so every decode step has the same shapes; ``compile`` (implies
        ``static_cache``) runs the decode steps through one ``torch.compile(fullgraph=True)``
        graph, with ``mode="reduce-overhead"`` (CUDA graphs) on CUDA. The prompt (prefill)
        runs eagerly. Greedy outputs equal the eager dynamic-cache ones.
        """
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
            got = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"idx: expected a [B, T] prompt with T >= 1, got {got}")
        if idx.dtype != torch.long:
            raise ValueError(f"idx: expected an int64 tensor [B, T], got {idx.dtype}")
        check_int("max_new_tokens", max_new_tokens, low=0)
        if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:  # NaN too
            raise ValueError(f"temperature: expected a finite float >= 0, got {temperature!r}")
        check_flag("use_cache", use_cache)
        check_flag("static_cache", static_cache)
        check_flag("compile", compile)
        if (static_cache or compile) and not use_cache:
            flag = "compile" if compile else "static_cache"
            raise ValueError(f"{flag}: expected use_cache=True (it needs the cache), got False")
        if idx.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"max_new_tokens: expected at most {self.config.max_seq_len - idx.shape[1]} "
                f"(max_seq_len={self.config.max_seq_len} minus the prompt), got {max_new_tokens}"
            )
        if top_k is not None:
            check_int("top_k", top_k, 1, self.config.vocab_size)
        _check_lm_inputs(idx, None, attention_mask, None, self.config.vocab_size)
        was_training = self.training
        self.eval()
        try:
            mask = (
                torch.ones_like(idx, dtype=torch.bool)
                if attention_mask is None
                else attention_mask.bool()
            )
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
            cache: KVCache | StaticKVCache | None = None
            if static_cache or compile:
                cache = self.new_static_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
            elif use_cache:
                cache = self.new_cache()
            step = self._last_logits
            if compile:
                mode = "reduce-overhead" if idx.device.type == "cuda" else None
                step = torch.compile(self._last_logits, fullgraph=True, dynamic=False, mode=mode)
            out = [idx]
            logits_BV = self._last_logits(idx, mask, pos, cache)  # the prefill, eager
            for i in range(max_new_tokens):
                next_B1 = _sample(logits_BV.float(), temperature, top_k, generator)
                out.append(next_B1)
                if i == max_new_tokens - 1:
                    break
                new_pos_B1 = pos[:, -1:] + 1
                pos = torch.cat([pos, new_pos_B1], dim=1)
                mask = torch.cat([mask, torch.ones_like(next_B1, dtype=torch.bool)], dim=1)
                if cache is not None:  # a generated token is never padding: no mask
                    logits_BV = step(next_B1, None, new_pos_B1, cache)
                else:
                    logits_BV = self._last_logits(torch.cat(out, dim=1), mask, pos, None)
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)


def _check_lm_inputs(
    idx: Tensor,
    targets: Tensor | None,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    vocab_size: int,
) -> None:
    """Clear errors for what would otherwise fail deep inside (or, on GPU, as a device assert)."""
    for name, value in (
        ("targets", targets),
        ("attention_mask", attention_mask),
        ("position_ids", position_ids),
    ):
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{name}: expected a Tensor of shape {tuple(idx.shape)}, got {type(value).__name__}"
            )
        if value.shape != idx.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(idx.shape)} (as idx), got {tuple(value.shape)}"
            )
    if attention_mask is not None:
        check_mask_values(attention_mask)
    if position_ids is not None:
        if position_ids.is_floating_point() or position_ids.is_complex():
            raise TypeError(f"position_ids: expected an integer tensor, got {position_ids.dtype}")
        checkable = position_ids.numel() and not torch.compiler.is_compiling()
        if checkable and int(position_ids.min()) < 0:
            raise ValueError(
                f"position_ids: expected positions >= 0, got min {int(position_ids.min())}"
            )
    if idx.numel() and not torch.compiler.is_compiling():
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"idx: expected token ids in [0, {vocab_size - 1}], got values in [{low}, {high}]"
            )
    if targets is not None and targets.numel() and not torch.compiler.is_compiling():
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(f"targets: expected an int64 tensor, got {targets.dtype}")
        real = targets[targets != -100]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
            raise ValueError(
                f"targets: expected token ids in [0, {vocab_size - 1}] or -100 (ignored), got "
                f"values in [{int(real.min())}, {int(real.max())}]"
            )


def _sample(
    logits_BV: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    if temperature <= 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator)
