# ruff: noqa: E501  (one table row per line reads best)
"""Table-driven bad input: every case raises ValueError or TypeError naming the argument, what
was expected and what was received; no other exception type may escape.

Each row is ``(id, call, error, fragments)``: ``call(tmp_path)`` must raise ``error`` and the
message must contain every fragment (the argument's name, the expected and the received value).
To cover a new public class or function, append rows: this is the one bad-input table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from pytorch_mixtures.models import ModelConfig, TransformerLM

D, E = 8, 4

Call = Callable[[Path], object]


def topk(**kwargs) -> pm.TopKRouter:
    return pm.TopKRouter(D, E, 2, **kwargs)


def layer(**kwargs) -> pm.MoELayer:
    return pm.MoELayer(D, topk(), pm.MLPExperts(E, D, 16), **kwargs)


def x(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    shape = shape or (2, 3, D)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.ones(shape, dtype=dtype, device=device)


def lm() -> TransformerLM:
    return TransformerLM(ModelConfig(vocab_size=50, dim=16, num_layers=1, num_heads=2, kind="moe"))


def load(module: nn.Module, state: dict[str, torch.Tensor]) -> object:
    return module.load_state_dict(state)


def write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def saved(tmp: Path, obj: object) -> Path:
    path = tmp / "obj.pt"
    torch.save(obj, path)
    return path


def replayed(module: nn.Module, record: dict, inp: torch.Tensor) -> object:
    with pm.replay_routing(module, record):
        return module(inp)


class Opaque:
    """A class torch.load(weights_only=True) must refuse to unpickle."""


def experts_list(*modules: nn.Module) -> list[nn.Module]:
    return list(modules)


class WrongShape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :-1]


CASES: list[tuple[str, Call, type[Exception], tuple[str, ...]]] = [
    # --- layer construction and first checks (formerly tests/test_errors.py)
    ("last dim", lambda t: layer()(torch.randn(2, 3, D + 1)), ValueError, (f"[..., {D}]",)),
    ("int input", lambda t: layer()(torch.ones(2, 3, D, dtype=torch.long)), TypeError, ("floating",)),
    ("top_k zero", lambda t: pm.TopKRouter(D, E, 0), ValueError, ("top_k",)),
    ("top_k > E", lambda t: pm.TopKRouter(D, E, E + 1), ValueError, (f"[1, {E}]",)),
    ("top_k float", lambda t: pm.TopKRouter(D, E, 1.5), TypeError, ("top_k",)),
    ("capacity zero", lambda t: pm.TopKRouter(D, E, capacity_factor=0.0), ValueError, ("> 0",)),
    ("capacity neg", lambda t: layer(capacity_factor=-1.0), ValueError, ("capacity_factor",)),
    ("layer capacity", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E, D, 16), 0.0), ValueError, ("capacity_factor",)),
    ("ec capacity", lambda t: pm.ExpertChoiceRouter(D, E, 0.0), ValueError, ("capacity_factor",)),
    ("score func", lambda t: pm.TopKRouter(D, E, score_func="tanh"), ValueError, ("score_func",)),
    ("jitter", lambda t: pm.TopKRouter(D, E, jitter_noise=1.5), ValueError, ("jitter_noise",)),
    ("num_experts vs experts", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E + 1, D, 16)), ValueError, (f"{E + 1} experts",)),
    ("num_experts kwarg", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E, D, 16), num_experts=E + 2), ValueError, ("num_experts",)),
    ("empty list", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E), []), ValueError, ("non-empty",)),
    ("dim mismatch", lambda t: pm.MoELayer(D + 1, pm.TopKRouter(D, E), []), ValueError, ("dim",)),
    ("experts dim", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E, D + 2, 16)), ValueError, ("dim",)),
    ("no router", lambda t: pm.MoELayer(D, None, pm.MLPExperts(E, D, 16)), TypeError, ("router",)),
    ("router type", lambda t: pm.MoELayer(D, nn.Linear(D, E), pm.MLPExperts(E, D, 16)), TypeError, ("Router",)),
    ("not a module", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E), [nn.Identity()] * (E - 1) + ["x"]), TypeError, (f"experts[{E - 1}]",)),
    ("wrong expert output", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E, E), [nn.Identity()] * 2 + [WrongShape()] + [nn.Identity()])(torch.randn(2, 3, D)), ValueError, ("experts[2]",)),
    ("mask shape", lambda t: layer()(torch.randn(2, 3, D), attention_mask=torch.ones(2, 4)), ValueError, ("attention_mask",)),
    ("activation", lambda t: pm.MLPExperts(E, D, 16, activation="nope"), ValueError, ("activation",)),
    ("hidden zero", lambda t: pm.SwiGLUExperts(E, D, 0), ValueError, ("hidden_dim",)),
    ("heads", lambda t: pm.MHSA(10, 3), ValueError, ("num_heads",)),
    # --- masks hold only 0/1 (an additive mask is refused, never reinterpreted); token ids exactly shaped
    ("layer additive mask", lambda t: layer()(x(), attention_mask=torch.tensor([[0.0, 0.0, float("-inf")]] * 2)), ValueError, ("attention_mask", "0/1", "-inf", "== 0")),
    ("layer mask of twos", lambda t: layer()(x(), attention_mask=torch.full((2, 3), 2)), ValueError, ("attention_mask", "0/1", "2")),
    ("router mask of -1", lambda t: topk()(x(), torch.full((2, 3), -1)), ValueError, ("attention_mask", "0/1", "-1")),
    ("router nan mask", lambda t: topk()(x(), torch.full((2, 3), float("nan"))), ValueError, ("attention_mask", "0/1", "nan")),
    ("soft moe additive mask", lambda t: pm.SoftMoE(D, E, 1, pm.MLPExperts(E, D, 16))(x(), torch.tensor([[0.0, float("-inf"), 0.0]] * 2)), ValueError, ("attention_mask", "0/1", "-inf")),
    ("mod additive mask", lambda t: pm.MixtureOfDepths(nn.Identity(), D)(x(), torch.tensor([[0.0, float("-inf"), 0.0]] * 2)), ValueError, ("attention_mask", "0/1", "-inf")),
    ("mhsa mask of twos", lambda t: pm.MHSA(D, 2)(x(), torch.full((2, 3), 2.0)), ValueError, ("attention_mask", "0/1", "2.0")),
    ("hash token ids transposed", lambda t: pm.MoELayer(D, pm.HashRouter(D, E, 50), pm.MLPExperts(E, D, 16))(x(), token_ids=torch.zeros(3, 2, dtype=torch.long)), ValueError, ("token_ids", "(2, 3)", "(3, 2)")),
    ("hash token ids flat", lambda t: pm.HashRouter(D, E, 50)(x(), token_ids=torch.zeros(6, dtype=torch.long)), ValueError, ("token_ids", "(2, 3)", "(6,)")),
    ("hash bool token ids", lambda t: pm.HashRouter(D, E, 50)(x(), token_ids=torch.ones(2, 3, dtype=torch.bool)), TypeError, ("token_ids", "integer", "torch.bool")),
    # --- flags are bools; generation and upcycling arguments are checked
    ("router normalize str", lambda t: topk(normalize_weights="no"), TypeError, ("normalize_weights", "True or False", "'no'")),
    ("router expert_bias int", lambda t: topk(expert_bias=1), TypeError, ("expert_bias", "True or False", "int")),
    ("layer check_finite str", lambda t: layer(check_finite="yes"), TypeError, ("check_finite", "True or False", "'yes'")),
    ("soft moe normalize str", lambda t: pm.SoftMoE(D, E, 1, pm.MLPExperts(E, D, 16), normalize="off"), TypeError, ("normalize", "True or False", "'off'")),
    ("mhsa causal str", lambda t: pm.MHSA(D, 2, causal="true"), TypeError, ("causal", "True or False", "'true'")),
    ("generate negative tokens", lambda t: lm().generate(torch.zeros(1, 2, dtype=torch.long), -1), ValueError, ("max_new_tokens", ">= 0", "-1")),
    ("generate nan temperature", lambda t: lm().generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=float("nan")), ValueError, ("temperature", ">= 0", "nan")),
    ("generate top_k over vocab", lambda t: lm().generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=1.0, top_k=51), ValueError, ("top_k", "[1, 50]", "51")),
    # --- errors the library names instead of torch
    ("shared experts of another width", lambda t: pm.MoELayer(D, topk(), pm.MLPExperts(E, D, 16), shared_experts=nn.Linear(D + 1, D))(x()), ValueError, ("shared_experts", f"[N, {D}]", "failed on an input")),
    ("shared experts output width", lambda t: pm.MoELayer(D, topk(), pm.MLPExperts(E, D, 16), shared_experts=nn.Linear(D, D + 1))(x()), ValueError, ("shared_experts", f"(6, {D})", f"(6, {D + 1})")),
    ("mod x of another dtype", lambda t: pm.MixtureOfDepths(nn.Identity(), D)(x(dtype=torch.float64)), TypeError, ("x", "torch.float32", "torch.float64")),
    ("backend assigned later", lambda t: (lambda e: (setattr(e, "backend", "cuda_kernels"), e(x(5, D), torch.tensor([1, 1, 1, 2]))))(pm.SwiGLUExperts(E, D, 16)), ValueError, ("backend", "'loop'", "'cuda_kernels'")),
    ("lm targets out of vocab", lambda t: lm()(torch.zeros(1, 3, dtype=torch.long), targets=torch.tensor([[1, 50, -100]])), ValueError, ("targets", "[0, 49]", "50")),
    ("lm float targets", lambda t: lm()(torch.zeros(1, 3, dtype=torch.long), targets=torch.zeros(1, 3)), TypeError, ("targets", "int64", "torch.float32")),
    # --- found by the misuse fuzz (silently wrong before)
    ("experts negative count", lambda t: pm.MLPExperts(E, D, 16)(x(5, D), torch.tensor([6, -1, 0, 0])), ValueError, ("tokens_per_expert", ">= 0", "-1")),
    ("balance loss additive mask", lambda t: pm.losses.load_balancing_loss(torch.randn(6, E), E, 2, attention_mask=torch.tensor([[0.0, float("-inf"), 0.0]] * 2)), ValueError, ("attention_mask", "0/1", "-inf")),
    ("lm additive mask", lambda t: lm()(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.tensor([[0.0, 0.0, float("-inf")]] * 2)), ValueError, ("attention_mask", "0/1", "-inf")),
    ("plot to a directory", lambda t: pm.plot_expert_load([{"l": {"tokens_per_expert": [1, 2]}}], t), ValueError, ("path", ".png", "directory")),
    ("plot without extension", lambda t: pm.plot_expert_load([{"l": {"tokens_per_expert": [1, 2]}}], t / "load"), ValueError, ("path", ".png", "load")),
    ("plot history str", lambda t: pm.plot_expert_load("abc", t / "load.png"), TypeError, ("history", "list", "dicts")),
    # --- found by the misuse fuzz (accepted silently before)
    ("mlp bias str", lambda t: pm.MLPExperts(E, D, 16, bias="yes"), TypeError, ("bias", "True or False", "'yes'")),
    ("router init_std negative", lambda t: pm.TopKRouter(D, E, init_std=-1.0), ValueError, ("init_std", ">= 0", "-1.0")),
    ("hash seed float", lambda t: pm.HashRouter(D, E, 50, seed=1.5), TypeError, ("seed", "int", "1.5")),
    ("bias update all_reduce str", lambda t: pm.TopKRouter(D, E, expert_bias=True).update_expert_bias(all_reduce="no"), TypeError, ("all_reduce", "True or False", "'no'")),
    ("experts as nn.Sequential", lambda t: pm.MoELayer(D, topk(), nn.Sequential(*[nn.Linear(D, D) for _ in range(E)])), TypeError, ("experts", "list of nn.Module", "nn.Sequential")),
    ("soft moe float64 x", lambda t: pm.SoftMoE(D, E, 1, pm.MLPExperts(E, D, 16))(x(dtype=torch.float64)), TypeError, ("x", "torch.float32", "torch.float64")),
    ("mod residual flag str", lambda t: pm.MixtureOfDepths(nn.Identity(), D, block_returns_residual="yes"), TypeError, ("block_returns_residual", "True or False", "'yes'")),
    ("mod predictor hidden zero", lambda t: pm.MixtureOfDepths(nn.Identity(), D, predictor_hidden=0), ValueError, ("predictor_hidden", ">= 1", "0")),
    ("mod capacity set later", lambda t: setattr(pm.MixtureOfDepths(nn.Identity(), D), "capacity", -1.0), ValueError, ("capacity", "(0, 1]", "-1.0")),
    ("config max_seq_len zero", lambda t: ModelConfig(max_seq_len=0), ValueError, ("max_seq_len", ">= 1", "0")),
    ("config rope_theta nan", lambda t: ModelConfig(rope_theta=float("nan")), ValueError, ("rope_theta", "> 0", "nan")),
    ("config moe_every float", lambda t: ModelConfig(moe_every=2.0), TypeError, ("moe_every", "int", "float")),
    ("config router_kwargs str", lambda t: ModelConfig(router_kwargs="x"), TypeError, ("router_kwargs", "dict", "str")),
    ("generate inf temperature", lambda t: lm().generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=float("inf")), ValueError, ("temperature", ">= 0", "inf")),
    ("generate use_cache str", lambda t: lm().generate(torch.zeros(1, 2, dtype=torch.long), 1, use_cache="no"), TypeError, ("use_cache", "True or False", "'no'")),
    ("generate past max_seq_len", lambda t: TransformerLM(ModelConfig(vocab_size=50, dim=16, num_layers=1, num_heads=2, max_seq_len=8)).generate(torch.zeros(1, 4, dtype=torch.long), 5), ValueError, ("max_new_tokens", "at most 4", "5")),
    ("lm negative positions", lambda t: lm()(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[-1, 0]])), ValueError, ("position_ids", ">= 0", "-1")),
    ("lm float positions", lambda t: lm()(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[0.0, 1.0]])), TypeError, ("position_ids", "integer", "torch.float32")),
    ("num_params active str", lambda t: lm().num_params(active="yes"), TypeError, ("active", "True or False", "'yes'")),
    ("cv_squared negative eps", lambda t: pm.losses.cv_squared(torch.ones(3), eps=-1.0), ValueError, ("eps", ">= 0", "-1.0")),
    ("hf adapter str layer", lambda t: pm.HFDecoderLayerAdapter("x", nn.Identity()), TypeError, ("layer", "nn.Module", "str")),
    ("clip grad norm nan", lambda t: pm.distributed.clip_grad_norm_(nn.Linear(2, 2), float("nan")), ValueError, ("max_norm", "finite", "nan")),
    # --- the misuse fuzz's opaque cases, now named
    ("balance loss 1-D logits", lambda t: pm.losses.load_balancing_loss(torch.randn(E), E, 2), ValueError, ("router_logits", "[tokens, num_experts]", "(4,)")),
    ("balance loss mixed widths", lambda t: pm.losses.load_balancing_loss([torch.randn(3, E), torch.randn(3, E + 1)], E, 2), ValueError, ("router_logits", "same experts", "[4, 5]")),
    ("sequence loss ids out of range", lambda t: pm.losses.sequence_balance_loss(torch.rand(2, 3, E), torch.full((2, 3, 2), 9)), ValueError, ("expert_ids_BTK", "[0, 3]", "9")),
    ("importance mask size", lambda t: pm.losses.importance_loss(torch.rand(6, E), torch.ones(5, dtype=torch.bool)), ValueError, ("token_mask_N", "(6,)", "(5,)")),
    ("noisy load negative std", lambda t: pm.losses.noisy_top_k_load(torch.randn(6, E), torch.randn(6, E), -torch.ones(6, E), 2), ValueError, ("noise_std_NE", "> 0", "-1.0")),
    ("experts int x", lambda t: pm.MLPExperts(E, D, 16)(torch.ones(5, D, dtype=torch.long), torch.tensor([1, 1, 1, 2])), TypeError, ("x", "floating", "torch.int64")),
    ("module list of one module", lambda t: pm.ModuleListExperts(nn.Linear(D, D), D), TypeError, ("experts", "list of nn.Module", "Linear")),
    ("mhsa dropout str", lambda t: pm.MHSA(D, 2, dropout="0"), TypeError, ("dropout", "float", "'0'")),
    ("mod block of another width", lambda t: pm.MixtureOfDepths(nn.Linear(D + 2, D + 2), D, capacity=1.0)(x()), ValueError, ("block", f"[B, K, {D}]", "failed on")),
    ("calibrate model str", lambda t: pm.calibrate_thresholds("model", lambda: None), TypeError, ("model", "nn.Module", "str")),
    ("hash token ids list", lambda t: pm.HashRouter(D, E, 50)(x(), token_ids=[[0, 1, 2]] * 2), TypeError, ("token_ids", "integer", "list")),
    ("router top_k set later", lambda t: setattr(topk(), "top_k", 10), ValueError, ("top_k", "[1, 4]", "10")),
    ("config mod_capacity str", lambda t: ModelConfig(mod_capacity="0.5"), TypeError, ("mod_capacity", "float", "'0.5'")),
    ("config unknown router kwarg", lambda t: ModelConfig(router_kwargs={"nope": 1}), ValueError, ("router_kwargs", "TopKRouter", "nope")),
    ("config noop float", lambda t: ModelConfig(num_noop_experts=1.5), TypeError, ("num_noop_experts", "int", "1.5")),
    ("lm of a str config", lambda t: TransformerLM("config"), TypeError, ("config", "ModelConfig", "str")),
    ("lm past max_seq_len", lambda t: TransformerLM(ModelConfig(vocab_size=50, dim=16, num_layers=1, num_heads=2, max_seq_len=8))(torch.zeros(1, 9, dtype=torch.long)), ValueError, ("idx", "max_seq_len=8", "9")),
    ("generate static without cache", lambda t: lm().generate(torch.zeros(1, 2, dtype=torch.long), 1, use_cache=False, static_cache=True), ValueError, ("static_cache", "use_cache=True", "False")),
    ("generate compile str", lambda t: lm().generate(torch.zeros(1, 2, dtype=torch.long), 1, compile="yes"), TypeError, ("compile", "True or False", "'yes'")),
    ("static cache overflow", lambda t: lm()(torch.zeros(1, 3, dtype=torch.long), cache=lm().new_static_cache(1, 2)), ValueError, ("cache", "max_len=2", "3")),
    ("static cache batch", lambda t: lm()(torch.zeros(2, 1, dtype=torch.long), cache=lm().new_static_cache(1, 4)), ValueError, ("cache", "batch of 1", "2")),
    ("static cache zero length", lambda t: lm().new_static_cache(1, 0), ValueError, ("max_len", ">= 1", "0")),
    ("bias update rate negative", lambda t: pm.TopKRouter(8, 4, expert_bias=True, bias_update_rate=-1.0), ValueError, ("bias_update_rate", ">= 0", "-1")),
    ("generate empty prompt", lambda t: lm().generate(torch.zeros(1, 0, dtype=torch.long), 1), ValueError, ("idx", "T >= 1", "(1, 0)")),
    ("plot history rows", lambda t: pm.plot_expert_load([{"l": 1}], t / "load.png"), TypeError, ("history", "per-layer dicts", "list")),
    ("expert_parameters of str", lambda t: list(pm.distributed.expert_parameters("x")), TypeError, ("model", "nn.Module", "str")),
    ("load_checkpoint missing folder", lambda t: pm.distributed.load_checkpoint(nn.Linear(2, 2), str(t / "missing")), ValueError, ("path", "checkpoint folder", "missing")),
    ("readable_file argument None", lambda t: pm.files.readable_file(t, None), TypeError, ("argument", "str", "None")),
    # --- router construction
    ("router dim zero", lambda t: pm.TopKRouter(0, E), ValueError, ("dim", ">= 1", "got 0")),
    ("router dim float", lambda t: pm.TopKRouter(8.0, E), TypeError, ("dim", "int", "float")),
    ("router experts zero", lambda t: pm.TopKRouter(D, 0), ValueError, ("num_experts", "got 0")),
    ("router experts bool", lambda t: pm.TopKRouter(D, True), TypeError, ("num_experts", "bool")),
    ("top_k negative", lambda t: pm.TopKRouter(D, E, -1), ValueError, ("top_k", "[1, 4]", "-1")),
    ("top_k None", lambda t: pm.TopKRouter(D, E, None), TypeError, ("top_k", "int", "NoneType")),
    ("capacity nan", lambda t: topk(capacity_factor=float("nan")), ValueError, ("capacity_factor", "finite", "nan")),
    ("capacity inf", lambda t: topk(capacity_factor=float("inf")), ValueError, ("capacity_factor", "> 0", "inf")),
    ("capacity str", lambda t: topk(capacity_factor="1.0"), TypeError, ("capacity_factor", "float", "'1.0'")),
    ("balance coef negative", lambda t: topk(balance_loss_coef=-0.1), ValueError, ("balance_loss_coef", ">= 0", "-0.1")),
    ("z coef nan", lambda t: topk(z_loss_coef=float("nan")), ValueError, ("z_loss_coef", ">= 0", "nan")),
    ("jitter negative", lambda t: topk(jitter_noise=-0.1), ValueError, ("jitter_noise", ">= 0", "-0.1")),
    ("ec capacity factor str", lambda t: pm.ExpertChoiceRouter(D, E, "2"), TypeError, ("capacity_factor", "float", "'2'")),
    ("ec capacity and factor", lambda t: pm.ExpertChoiceRouter(D, E, 1.0, capacity=2), ValueError, ("capacity", "capacity=2", "capacity_factor=1.0")),
    ("ec capacity fraction", lambda t: pm.ExpertChoiceRouter(D, E, capacity=1.5), ValueError, ("capacity", "(0, 1]", "1.5")),
    ("ec capacity str", lambda t: pm.ExpertChoiceRouter(D, E, capacity="2"), TypeError, ("capacity", "int count", "'2'")),
    ("groups not divisor", lambda t: pm.TopKRouter(D, E, 2, num_groups=3), ValueError, ("num_groups", "divisor", "3")),
    ("bias update without bias", lambda t: topk().update_expert_bias(), ValueError, ("update_expert_bias", "expert_bias=False")),
    ("uniform mode", lambda t: pm.UniformRouter(D, E, mode="hash"), ValueError, ("mode", "'random'", "'hash'")),
    ("hash vocab zero", lambda t: pm.HashRouter(D, E, 0), ValueError, ("vocab_size", ">= 1", "got 0")),
    ("hash without token ids", lambda t: pm.MoELayer(D, pm.HashRouter(D, E, 50), pm.MLPExperts(E, D, 16))(x()), ValueError, ("token_ids", "token_ids=input_ids")),
    ("hash float token ids", lambda t: pm.HashRouter(D, E, 50)(x(), token_ids=torch.zeros(2, 3)), TypeError, ("token_ids", "integer", "float32")),
    ("hash token id range", lambda t: pm.HashRouter(D, E, 50)(x(), token_ids=torch.full((2, 3), 50)), ValueError, ("token_ids", "[0, 50)", "max 50")),
    ("soft moe slots zero", lambda t: pm.SoftMoE(D, E, 0, pm.MLPExperts(E, D, 16)), ValueError, ("slots_per_expert", ">= 1", "got 0")),
    ("shared experts str", lambda t: pm.MoELayer(D, topk(), pm.MLPExperts(E, D, 16), shared_experts="mlp"), TypeError, ("shared_experts", "nn.Module", "str")),
    ("ec z coef negative", lambda t: pm.ExpertChoiceRouter(D, E, z_loss_coef=-1.0), ValueError, ("z_loss_coef", ">= 0", "-1.0")),
    # --- router forward
    ("router int x", lambda t: topk()(x(dtype=torch.long)), TypeError, ("x", "floating", "torch.int64")),
    ("router bool x", lambda t: topk()(x(dtype=torch.bool)), TypeError, ("x", "floating", "torch.bool")),
    ("router rank 4", lambda t: topk()(x(1, 2, 3, D)), ValueError, ("x", f"[B, T, {D}]", "(1, 2, 3, 8)")),
    ("router rank 1", lambda t: topk()(x(D)), ValueError, ("x", f"[N, {D}]", "(8,)")),
    ("router last dim", lambda t: topk()(x(2, 3, D + 1)), ValueError, ("x", f"[B, T, {D}]", "(2, 3, 9)")),
    ("router list x", lambda t: topk()([[0.0] * D]), TypeError, ("x", "Tensor", "list")),
    ("router mask transposed", lambda t: topk()(x(), torch.ones(3, 2)), ValueError, ("attention_mask", "(2, 3)", "(3, 2)")),
    ("router mask list", lambda t: topk()(x(), [[1, 1, 1]] * 2), TypeError, ("attention_mask", "Tensor", "list")),
    ("router mask complex", lambda t: topk()(x(), torch.ones(2, 3, dtype=torch.complex64)), TypeError, ("attention_mask", "bool", "complex64")),
    ("router mask device", lambda t: topk()(x(), torch.ones(2, 3, device="meta")), ValueError, ("attention_mask", "cpu", "meta")),
    ("ec int x", lambda t: pm.ExpertChoiceRouter(D, E)(x(dtype=torch.int32)), TypeError, ("x", "floating", "torch.int32")),
    ("ec mask shape", lambda t: pm.ExpertChoiceRouter(D, E)(x(), torch.ones(2, 4)), ValueError, ("attention_mask", "(2, 3)", "(2, 4)")),
    # --- MoELayer construction
    ("layer dim float", lambda t: pm.MoELayer(8.0, topk(), pm.MLPExperts(E, D, 16)), TypeError, ("dim", "int", "float")),
    ("router for other dim", lambda t: pm.MoELayer(D, pm.TopKRouter(D + 2, E), pm.MLPExperts(E, D, 16)), ValueError, ("dim", f"dim={D + 2}", f"dim={D}")),
    ("experts single module", lambda t: pm.MoELayer(D, topk(), nn.Linear(D, D)), TypeError, ("experts", "list of nn.Module", "Linear")),
    ("experts str", lambda t: pm.MoELayer(D, topk(), "mlp"), TypeError, ("experts", "list of nn.Module", "str")),
    ("experts mixed dtype", lambda t: pm.MoELayer(D, topk(), [nn.Linear(D, D), nn.Linear(D, D).double(), nn.Linear(D, D), nn.Linear(D, D)]), ValueError, ("experts[1]", "float32", "float64")),
    ("experts on other device", lambda t: pm.MoELayer(D, topk(), pm.MLPExperts(E, D, 16).to("meta")), ValueError, ("experts", "cpu", "meta")),
    ("layer capacity str", lambda t: pm.MoELayer(D, topk(), pm.MLPExperts(E, D, 16), "1.25"), TypeError, ("capacity_factor", "float", "'1.25'")),
    ("expert of other width", lambda t: pm.MoELayer(D, topk(), [nn.Linear(D + 1, D) for _ in range(E)])(x()), ValueError, ("experts[", f"[n, {D}]", "failed on an input of shape")),
    # --- MoELayer forward
    ("layer 0-dim x", lambda t: layer()(torch.tensor(1.0)), ValueError, ("x", f"[..., {D}]", "()")),
    ("layer bool x", lambda t: layer()(x(dtype=torch.bool)), TypeError, ("x", "floating", "torch.bool")),
    ("layer list x", lambda t: layer()([1.0] * D), TypeError, ("x", "Tensor", "list")),
    ("layer float64 x", lambda t: layer()(x(dtype=torch.float64)), TypeError, ("x", "torch.float32", "torch.float64")),
    ("layer bf16 x no autocast", lambda t: layer()(x(dtype=torch.bfloat16)), TypeError, ("x", "torch.float32", "torch.bfloat16")),
    ("layer x other device", lambda t: layer()(x(device="meta")), ValueError, ("x", "cpu", "meta")),
    ("layer mask list", lambda t: layer()(x(), attention_mask=[1, 1]), TypeError, ("attention_mask", "(2, 3)", "list")),
    ("layer mask rank", lambda t: layer()(x(), attention_mask=torch.ones(2)), ValueError, ("attention_mask", "(2, 3)", "(2,)")),
    # --- experts
    ("mlp experts zero", lambda t: pm.MLPExperts(0, D, 16), ValueError, ("num_experts", ">= 1", "got 0")),
    ("mlp dim float", lambda t: pm.MLPExperts(E, 8.0, 16), TypeError, ("dim", "int", "float")),
    ("swiglu hidden bool", lambda t: pm.SwiGLUExperts(E, D, True), TypeError, ("hidden_dim", "int", "bool")),
    ("experts x width", lambda t: pm.MLPExperts(E, D, 16)(x(5, D + 1), torch.tensor([1, 1, 1, 2])), ValueError, ("x", f"[S, {D}]", "(5, 9)")),
    ("experts counts float", lambda t: pm.MLPExperts(E, D, 16)(x(5, D), torch.ones(E)), TypeError, ("tokens_per_expert", "integer", "float32")),
    ("experts counts shape", lambda t: pm.MLPExperts(E, D, 16)(x(5, D), torch.ones(3, dtype=torch.long)), ValueError, ("tokens_per_expert", "(4,)", "(3,)")),
    ("experts counts too many", lambda t: pm.SwiGLUExperts(E, D, 16)(x(5, D), torch.full((E,), 2)), ValueError, ("tokens_per_expert", "sum to 8", "5 rows")),
    ("module list dim zero", lambda t: pm.ModuleListExperts([nn.Identity()], 0), ValueError, ("dim", ">= 1", "got 0")),
    # --- state dicts
    ("load more experts", lambda t: load(layer(), pm.MoELayer(D, pm.TopKRouter(D, 8), pm.MLPExperts(8, D, 16)).state_dict()), ValueError, ("state_dict", "4 experts", "8 experts")),
    ("router load experts", lambda t: load(topk(), pm.TopKRouter(D, 6).state_dict()), ValueError, ("state_dict", "4 experts", "6 experts")),
    ("router load dim", lambda t: load(topk(), pm.TopKRouter(D + 1, E).state_dict()), ValueError, ("state_dict", f"dim={D}", f"dim={D + 1}")),
    ("experts load fewer", lambda t: load(pm.SwiGLUExperts(E, D, 16), pm.SwiGLUExperts(2, D, 16).state_dict()), ValueError, ("state_dict", "4 experts", "2 experts")),
    ("module list load", lambda t: load(pm.ModuleListExperts([nn.Linear(D, D)] * E, D), pm.ModuleListExperts([nn.Linear(D, D) for _ in range(5)], D).state_dict()), ValueError, ("state_dict", "4 experts", "5 experts")),
    # --- losses
    ("balance num_experts", lambda t: pm.losses.load_balancing_loss(torch.randn(6, 5), 4, 2), ValueError, ("num_experts", "5", "got 4")),
    ("balance top_k zero", lambda t: pm.losses.load_balancing_loss(torch.randn(6, E), E, 0), ValueError, ("top_k", "[1, 4]", "got 0")),
    ("balance top_k float", lambda t: pm.losses.load_balancing_loss(torch.randn(6, E), E, 1.5), TypeError, ("top_k", "int", "float")),
    ("z-loss int logits", lambda t: pm.losses.router_z_loss(torch.ones(6, E, dtype=torch.long)), TypeError, ("router_logits", "floating", "torch.int64")),
    ("z-loss str", lambda t: pm.losses.router_z_loss("logits"), TypeError, ("router_logits", "Tensor", "str")),
    ("z-loss mask size", lambda t: pm.losses.router_z_loss(torch.randn(12, E), torch.ones(5)), ValueError, ("attention_mask", "12", "(5,)")),
    ("aux_loss of list", lambda t: pm.aux_loss([layer()]), TypeError, ("model", "nn.Module", "list")),
    ("plan_dispatch None", lambda t: pm.dispatch.plan_dispatch(None), TypeError, ("route", "RouterOutput", "NoneType")),
    # --- MHSA
    ("mhsa heads float", lambda t: pm.MHSA(D, 2.0), TypeError, ("num_heads", "int", "float")),
    ("mhsa dropout one", lambda t: pm.MHSA(D, 2, dropout=1.0), ValueError, ("dropout", "[0, 1)", "1.0")),
    ("mhsa rank 2", lambda t: pm.MHSA(D, 2)(x(3, D)), ValueError, ("x", f"[B, T, {D}]", "(3, 8)")),
    ("mhsa int x", lambda t: pm.MHSA(D, 2)(x(dtype=torch.long)), TypeError, ("x", "floating", "torch.int64")),
    ("mhsa mask shape", lambda t: pm.MHSA(D, 2)(x(), torch.ones(2, 4)), ValueError, ("attention_mask", "(2, 3)", "(2, 4)")),
    ("mhsa mask list", lambda t: pm.MHSA(D, 2)(x(), [[1, 1, 1]]), TypeError, ("attention_mask", "Tensor", "list")),
    # --- reference model
    ("config top_k > experts", lambda t: ModelConfig(kind="moe", num_experts=4, top_k=5), ValueError, ("top_k", "num_experts=4", "got 5")),
    ("config heads zero", lambda t: ModelConfig(num_heads=0), ValueError, ("num_heads", ">= 1", "got 0")),
    ("config dim float", lambda t: ModelConfig(dim=128.0), TypeError, ("dim", "int", "float")),
    ("config scaling zero", lambda t: ModelConfig(routed_scaling_factor=0.0), ValueError, ("routed_scaling_factor", "> 0", "0.0")),
    ("config scaling nan", lambda t: ModelConfig(routed_scaling_factor=float("nan")), ValueError, ("routed_scaling_factor", "finite", "nan")),
    ("lm float idx", lambda t: lm()(torch.zeros(2, 5)), ValueError, ("idx", "int64", "torch.float32")),
    ("lm idx out of vocab", lambda t: lm()(torch.tensor([[1, 2, 50]])), ValueError, ("idx", "[0, 49]", "[1, 50]")),
    ("lm negative idx", lambda t: lm()(torch.tensor([[-1, 2]])), ValueError, ("idx", "[0, 49]", "[-1, 2]")),
    ("lm targets shape", lambda t: lm()(torch.zeros(2, 5, dtype=torch.long), targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, ("targets", "(2, 5)", "(2, 4)")),
    ("lm mask shape", lambda t: lm()(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(5)), ValueError, ("attention_mask", "(2, 5)", "(5,)")),
    ("lm position_ids list", lambda t: lm()(torch.zeros(1, 2, dtype=torch.long), position_ids=[[0, 1]]), TypeError, ("position_ids", "Tensor", "list")),
    # --- files and checkpoints (the CLI's --data and checkpoint paths)
    ("file missing", lambda t: pm.files.readable_file(t / "nope.txt", "--data"), ValueError, ("--data", "existing file", "nope.txt")),
    ("file is a directory", lambda t: pm.files.readable_file(t, "--data"), ValueError, ("--data", "expected a file", "directory")),
    ("file empty", lambda t: pm.files.readable_file(write(t, "e.txt", b""), "--data"), ValueError, ("--data", "non-empty", "0 bytes")),
    ("file path int", lambda t: pm.files.readable_file(3, "--data"), TypeError, ("--data", "path", "int")),
    ("checkpoint empty", lambda t: pm.files.load_state_dict_file(write(t, "c.pt", b"")), ValueError, ("checkpoint", "non-empty", "c.pt")),
    ("checkpoint garbage", lambda t: pm.files.load_state_dict_file(write(t, "c.pt", b"not a zip")), ValueError, ("checkpoint", "torch.save", "c.pt")),
    ("checkpoint with code", lambda t: pm.files.load_state_dict_file(saved(t, {"w": Opaque()})), ValueError, ("checkpoint", "tensors only", "obj.pt")),
    ("checkpoint not a dict", lambda t: pm.files.load_state_dict_file(saved(t, [torch.ones(2)])), ValueError, ("checkpoint", "state dict", "list")),
    ("safetensors garbage", lambda t: pm.files.load_state_dict_file(write(t, "c.safetensors", b"xx")), ValueError, ("checkpoint", "safetensors", "c.safetensors")),
    ("name_layers of str", lambda t: pm.checks.name_layers("model"), TypeError, ("model", "nn.Module", "str")),
    # --- the routing frontier: drop policies, zero-computation experts, padding, pruning
    ("drop_policy unknown", lambda t: topk(capacity_factor=1.0, drop_policy="random"), ValueError, ("drop_policy", "'position', 'probs'", "'random'")),
    ("drop_policy int", lambda t: topk(drop_policy=1), ValueError, ("drop_policy", "'position', 'probs'", "got 1")),
    ("drop_policy set later", lambda t: setattr(topk(), "drop_policy", "first"), ValueError, ("drop_policy", "'position', 'probs'", "'first'")),
    ("expert choice drop_policy", lambda t: pm.ExpertChoiceRouter(D, E, drop_policy="position"), ValueError, ("drop_policy", "'probs'", "'position'")),
    ("zero-computation kind", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E + 1), pm.MLPExperts(E, D, 16), zero_computation_experts={"identity": 1}), ValueError, ("zero_computation_experts", "'zero', 'copy', 'constant'", "'identity'")),
    ("zero-computation list", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E + 1), pm.MLPExperts(E, D, 16), zero_computation_experts=["copy"]), TypeError, ("zero_computation_experts", "dict", "list")),
    ("zero-computation count", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E + 1), pm.MLPExperts(E, D, 16), zero_computation_experts={"copy": -1}), ValueError, ("zero_computation_experts['copy']", ">= 0", "-1")),
    ("zero-computation too many", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(1, D, 16), zero_computation_experts={"copy": E}), ValueError, ("zero_computation_experts", f"fewer than {E}", f"got {E}")),
    ("zero-computation router size", lambda t: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E, D, 16), zero_computation_experts={"copy": 1}), ValueError, ("experts", f"{E} experts", "1 of them zero-computation", f"got {E}")),
    ("pad_to_capacity dropless", lambda t: layer(pad_to_capacity=True), ValueError, ("pad_to_capacity", "capacity", "capacity_factor=None")),
    ("pad_to_capacity str", lambda t: layer(capacity_factor=1.0, pad_to_capacity="yes"), TypeError, ("pad_to_capacity", "True or False", "str")),
    ("prune keep zero", lambda t: pm.prune_experts(layer(), keep=0, batches=[x()]), ValueError, ("keep", f"[1, {E}]", "got 0")),
    ("prune keep fraction", lambda t: pm.prune_experts(layer(), keep=2.5, batches=[x()]), ValueError, ("keep", "(0, 1]", "2.5")),
    ("prune keep below top_k", lambda t: pm.prune_experts(layer(), keep=1, batches=[x()]), ValueError, ("keep", "at least 2", "got 1")),
    ("prune keep str", lambda t: pm.prune_experts(layer(), keep="2", batches=[x()]), TypeError, ("keep", "int", "str")),
    ("prune criterion", lambda t: pm.prune_experts(layer(), keep=2, batches=[x()], criterion="norm"), ValueError, ("criterion", "'reap', 'frequency'", "'norm'")),
    ("prune no batches", lambda t: pm.prune_experts(layer(), keep=2, batches=[]), ValueError, ("batches", "at least one", "none")),
    ("prune batch of str", lambda t: pm.prune_experts(layer(), keep=2, batches=["text"]), TypeError, ("batches", "Tensor", "str")),
    ("prune model list", lambda t: pm.prune_experts([layer()], keep=2, batches=[x()]), TypeError, ("model", "nn.Module", "list")),
    # --- routing replay and ReLU routing (routing frontier)
    ("replay model type", lambda t: pm.record_routing("net").__enter__(), TypeError, ("model", "nn.Module", "str")),
    ("replay no routers", lambda t: pm.record_routing(nn.Linear(D, D)).__enter__(), ValueError, ("model", "TopKRouter", "none")),
    ("replay unsupported", lambda t: pm.record_routing(pm.ExpertChoiceRouter(D, E)).__enter__(), ValueError, ("model", "TopKRouter", "ExpertChoiceRouter")),
    ("replay record type", lambda t: pm.replay_routing(topk(), "rec").__enter__(), TypeError, ("record", "dict", "str")),
    ("replay unknown name", lambda t: pm.replay_routing(topk(), {"moe.router": []}).__enter__(), ValueError, ("record", "module names", "'moe.router'")),
    ("replay entry type", lambda t: pm.replay_routing(topk(), {"": [1, 2]}).__enter__(), TypeError, ("record['']", "list of tensors", "list")),
    ("replay shape", lambda t: replayed(topk(), {"": [torch.zeros(5, 2, dtype=torch.long)]}, x()), ValueError, ("record[''][0]", "(6, 2)", "(5, 2)")),
    ("replay dtype", lambda t: replayed(topk(), {"": [torch.zeros(6, 2)]}, x()), TypeError, ("record[''][0]", "torch.int64", "torch.float32")),
    ("replay ran out", lambda t: replayed(topk(), {"": []}, x()), ValueError, ("record", "call 1", "0 call(s)")),
    ("relu target_k zero", lambda t: pm.ReLURouter(D, E, target_k=0), ValueError, ("target_k", f"[1, {E}]", "0")),
    ("relu target_k > E", lambda t: pm.ReLURouter(D, E, target_k=E + 1), ValueError, ("target_k", f"[1, {E}]", f"{E + 1}")),
    ("relu target_k float", lambda t: pm.ReLURouter(D, E, target_k=1.5), TypeError, ("target_k", "int", "1.5")),
    ("relu alpha < 1", lambda t: pm.ReLURouter(D, E, l1_coef_alpha=0.5), ValueError, ("l1_coef_alpha", ">= 1", "0.5")),
    ("relu l1 init", lambda t: pm.ReLURouter(D, E, l1_coef_init=-1.0), ValueError, ("l1_coef_init", ">= 0", "-1")),
    ("relu capacity", lambda t: pm.MoELayer(D, pm.ReLURouter(D, E), pm.MLPExperts(E, D, 16), 1.25), ValueError, ("capacity_factor", "None", "1.25")),
    ("relu flag", lambda t: pm.ReLURouter(D, E, load_balance="yes"), TypeError, ("load_balance", "True or False", "'yes'")),
    ("balance mode", lambda t: topk(balance="everything"), ValueError, ("balance", "'global'", "'everything'")),
    ("balance group type", lambda t: topk(balance="global", balance_group=0), TypeError, ("balance_group", "ProcessGroup", "int")),
    ("balance step model type", lambda t: pm.end_balance_step("model"), TypeError, ("model", "nn.Module", "str")),
    ("balance step no global router", lambda t: pm.end_balance_step(topk()), ValueError, ("model", "balance='global'", "got none")),
    ("balance step batch router", lambda t: topk().end_balance_step(), ValueError, ("end_balance_step", "balance='global'", "balance='batch'")),
]  # fmt: skip


@pytest.mark.parametrize(("name", "call", "error", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_nothing_else_escapes(name, call, error, fragments, tmp_path):
    try:
        call(tmp_path)
    except (ValueError, TypeError) as err:
        assert type(err) is error, f"{name}: expected {error.__name__}, got {err!r}"
        for fragment in fragments:
            assert fragment in str(err), f"{name}: message {str(err)!r} lacks {fragment!r}"
    except Exception as err:
        pytest.fail(f"{name}: {type(err).__name__} escaped instead of {error.__name__}: {err}")
    else:
        pytest.fail(f"{name}: no error raised")


def test_table_is_large_and_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 40
