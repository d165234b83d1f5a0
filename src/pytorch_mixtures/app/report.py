"""The demo's picture: loss curves, expert loads over steps, MoD selection rate.

matplotlib is imported inside :func:`make_report` (the ``[cli]`` extra) and renders with Agg,
so the library never needs it and no display is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["make_report"]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (the first points average what exists)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def make_report(results: dict[str, Any], path: Path) -> None:
    """Write a 2 x 2 figure to ``path`` from :func:`~pytorch_mixtures.app.demo.run_demo`'s results.

    Panels: (a) training loss (smoothed) and held-out loss vs steps; (b) the same vs training
    FLOPs; (c) the MoE model's expert loads (share of slots per expert, every layer) over
    steps; (d) each MoD layer's selection rate: in training (top-k) and held-out causal routing.
    """
    # a bare Figure renders with Agg and never touches pyplot's global state or a display
    from matplotlib.figure import Figure

    models = {k: v for k, v in results["models"].items() if v["status"] == "ok"}
    tokens_per_step = results["train_config"]["batch_size"] * results["train_config"]["seq_len"]
    fig = Figure(figsize=(13, 9))
    axes = fig.subplots(2, 2)
    ax_steps, ax_flops, ax_load, ax_mod = axes.flat

    for kind, entry in models.items():
        steps = [h["step"] for h in entry["history"]]
        smooth = _smooth([h["loss"] for h in entry["history"]], 10)
        flops = [s * tokens_per_step * entry["flops_per_token"] for s in steps]
        (line,) = ax_steps.plot(steps, smooth, label=f"{kind} train", alpha=0.8)
        ax_flops.plot(flops, smooth, color=line.get_color(), label=f"{kind} train", alpha=0.8)
        eval_steps = [e["step"] for e in entry["evals"]]
        eval_loss = [e["loss"] for e in entry["evals"]]
        eval_flops = [s * tokens_per_step * entry["flops_per_token"] for s in eval_steps]
        for ax, xs in ((ax_steps, eval_steps), (ax_flops, eval_flops)):
            ax.plot(xs, eval_loss, "o--", color=line.get_color(), label=f"{kind} held-out")
    for ax, xlabel in ((ax_steps, "step"), (ax_flops, "training FLOPs")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats / byte)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax_steps.set_title("(a) loss vs steps (train: 10-step mean)")
    ax_flops.set_title("(b) loss vs training FLOPs")

    moe_kind = next((k for k, v in models.items() if v["history"][-1]["expert_load"]), None)
    if moe_kind is None:
        ax_load.text(0.5, 0.5, "no MoE model in this run", ha="center", va="center")
        ax_load.set_axis_off()
    else:
        history = models[moe_kind]["history"]
        # rows: layer-major, expert-minor; values: share of that layer's slots
        rows: list[list[float]] = []
        num_layers = len(history[-1]["expert_load"])
        num_experts = len(history[-1]["expert_load"][0])
        for layer in range(num_layers):
            for expert in range(num_experts):
                rows.append(
                    [
                        h["expert_load"][layer][expert] / max(sum(h["expert_load"][layer]), 1)
                        for h in history
                    ]
                )
        image = ax_load.imshow(
            rows,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(0.5, len(history) + 0.5, len(rows) - 0.5, -0.5),
        )
        fig.colorbar(image, ax=ax_load, label="share of the layer's slots")
        ax_load.set_yticks([layer * num_experts for layer in range(num_layers)])
        ax_load.set_yticklabels([f"layer {i} e0" for i in range(num_layers)])
        ax_load.set_xlabel("step")
        ax_load.set_title(
            f"(c) {moe_kind}: expert loads over steps (balanced = {1 / num_experts:.3f})"
        )

    mod_kinds = [k for k, v in models.items() if "mod_capacity_causal" in v]
    if not mod_kinds:
        missing = [k for k in ("mod", "mode") if k in results["models"]]
        note = "MoD: " + ("not available in this build" if missing else "not in this run")
        ax_mod.text(0.5, 0.5, note, ha="center", va="center")
        ax_mod.set_axis_off()
    else:
        for kind in mod_kinds:
            entry = models[kind]
            steps = [h["step"] for h in entry["history"]]
            per_step = [h["mod_capacity"] for h in entry["history"]]
            for layer in range(len(per_step[-1])):
                (line,) = ax_mod.plot(
                    steps, [r[layer] for r in per_step], label=f"{kind} L{layer} train (top-k)"
                )
                ax_mod.plot(
                    [e["step"] for e in entry["evals"]],
                    [e["mod_capacity"][layer] for e in entry["evals"]],
                    "o--",
                    color=line.get_color(),
                    label=f"{kind} L{layer} held-out causal",
                )
        ax_mod.axhline(results["size"]["mod_capacity"], color="gray", lw=0.8, ls=":")
        ax_mod.set_xlabel("step")
        ax_mod.set_ylabel("fraction of tokens processed")
        ax_mod.set_title("(d) MoD selection rate (dotted: target capacity)")
        ax_mod.legend(fontsize=7)
        ax_mod.grid(alpha=0.3)

    fig.suptitle(f"pytorch-mixtures demo: {results['data']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
