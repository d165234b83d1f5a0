"""Bad configuration and bad input get a clear ValueError/TypeError naming what was expected."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm

D, E = 8, 4


def layer(**kwargs) -> pm.MoELayer:
    return pm.MoELayer(D, pm.TopKRouter(D, E, 2, **kwargs), pm.MLPExperts(E, D, 16))


class WrongShape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :-1]


CASES = [
    # (name, call, exception type, text the message must contain)
    ("last dim", lambda: layer()(torch.randn(2, 3, D + 1)), ValueError, f"[..., {D}]"),
    ("int input", lambda: layer()(torch.ones(2, 3, D, dtype=torch.long)), TypeError, "floating"),
    ("top_k zero", lambda: pm.TopKRouter(D, E, 0), ValueError, "top_k"),
    ("top_k > E", lambda: pm.TopKRouter(D, E, E + 1), ValueError, f"[1, {E}]"),
    ("top_k float", lambda: pm.TopKRouter(D, E, 1.5), TypeError, "top_k"),
    ("capacity zero", lambda: pm.TopKRouter(D, E, capacity_factor=0.0), ValueError, "> 0"),
    ("capacity neg", lambda: layer(capacity_factor=-1.0), ValueError, "capacity_factor"),
    (
        "layer capacity",
        lambda: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E, D, 16), 0.0),
        ValueError,
        "capacity_factor",
    ),
    ("ec capacity", lambda: pm.ExpertChoiceRouter(D, E, 0.0), ValueError, "capacity_factor"),
    ("score func", lambda: pm.TopKRouter(D, E, score_func="tanh"), ValueError, "score_func"),
    ("jitter", lambda: pm.TopKRouter(D, E, jitter_noise=1.5), ValueError, "jitter_noise"),
    (
        "num_experts vs experts",
        lambda: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E + 1, D, 16)),
        ValueError,
        f"{E + 1} experts",
    ),
    (
        "num_experts kwarg",
        lambda: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E, D, 16), num_experts=E + 2),
        ValueError,
        "num_experts",
    ),
    (
        "empty list",
        lambda: pm.MoELayer(D, pm.TopKRouter(D, E), []),
        ValueError,
        "non-empty",
    ),
    ("dim mismatch", lambda: pm.MoELayer(D + 1, pm.TopKRouter(D, E), []), ValueError, "dim"),
    (
        "experts dim",
        lambda: pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E, D + 2, 16)),
        ValueError,
        "dim",
    ),
    ("no router", lambda: pm.MoELayer(D, None, pm.MLPExperts(E, D, 16)), TypeError, "router"),
    (
        "router type",
        lambda: pm.MoELayer(D, nn.Linear(D, E), pm.MLPExperts(E, D, 16)),
        TypeError,
        "Router",
    ),
    (
        "not a module",
        lambda: pm.MoELayer(D, pm.TopKRouter(D, E), [nn.Identity()] * (E - 1) + ["x"]),
        TypeError,
        f"experts[{E - 1}]",
    ),
    (
        "wrong expert output",
        lambda: pm.MoELayer(
            D, pm.TopKRouter(D, E, E), [nn.Identity()] * 2 + [WrongShape()] + [nn.Identity()]
        )(torch.randn(2, 3, D)),
        ValueError,
        "experts[2]",
    ),
    (
        "mask shape",
        lambda: layer()(torch.randn(2, 3, D), attention_mask=torch.ones(2, 4)),
        ValueError,
        "attention_mask",
    ),
    ("activation", lambda: pm.MLPExperts(E, D, 16, activation="nope"), ValueError, "activation"),
    ("hidden zero", lambda: pm.SwiGLUExperts(E, D, 0), ValueError, "hidden_dim"),
    ("heads", lambda: pm.MHSA(10, 3), ValueError, "num_heads"),
]


@pytest.mark.parametrize(("name", "call", "error", "text"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(name, call, error, text):
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value), f"{name}: message {info.value!r} lacks {text!r}"
