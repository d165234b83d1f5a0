"""``transformers.Trainer`` (with ``accelerate``) on upcycled and converted MoE models, CPU.

Two paths, two aux losses:

* a Llama upcycled with ``pm.interop.moeify``: the library's per-layer aux loss,
  ``pm.aux_loss(model)``, reaches Trainer through the forward hook of
  ``pm.interop.attach_aux_loss`` (``outputs.loss`` includes it);
* a Mixtral converted with ``pm.interop.from_hf_model`` (``output_router_logits=True``):
  ``transformers``' own ``router_aux_loss_coef * outputs.aux_loss``.

What "the same accounting" means under gradient accumulation, tested exactly: with identical
micro-batches (the data are two rows, repeated), ``gradient_accumulation_steps=2`` with batch 2
gives the same accumulated gradients at the optimizer step, and the same optimised loss, as one
batch of 4 (the aux loss of an optimizer step is its micro-batches' token-weighted mean, not
their sum). Resume: a run resumed from Trainer's checkpoint at step 2 ends at step 3 with the
parameters and step-3 loss of an uninterrupted run.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_models
import pytorch_mixtures as pm

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

VOCAB, SEQ = 53, 8


def rows(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` training rows; the second of each pair right-padded (labels -100 there)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        ids = torch.randint(2, VOCAB, (SEQ,), generator=gen)
        mask = torch.ones(SEQ, dtype=torch.long)
        if index % 2:
            mask[5:] = 0
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return out


def upcycled_llama() -> nn.Module:
    model = hf_models.tiny_llama(VOCAB, num_layers=2)
    # large coefficients so that a factor 2 on the aux loss would show in the gradients
    return pm.interop.moeify(
        model,
        num_experts=4,
        top_k=2,
        noise=0.1,
        balance_loss_coef=1.0,
        z_loss_coef=0.1,
        router_init_std=0.5,
        generator=torch.Generator().manual_seed(1),
    )


def converted_mixtral() -> nn.Module:
    model = hf_models.tiny_moe_lm("mixtral", VOCAB)
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 1.0
    model.router_aux_loss_coef = 1.0  # the model read the coefficient at construction
    return pm.interop.from_hf_model(model)


MODELS = {"upcycled_llama": upcycled_llama, "converted_mixtral": converted_mixtral}


def lm_and_aux(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM loss (by hand: shifted cross entropy, mean over label tokens) and the aux loss
    that should be added to it: the library's for upcycled models, transformers' for converted."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].flatten(0, 1)
    lm = F.cross_entropy(logits, batch["labels"][:, 1:].flatten(), ignore_index=-100)
    if getattr(out, "aux_loss", None) is not None:
        return lm, model.config.router_aux_loss_coef * out.aux_loss
    return lm, pm.aux_loss(model)


class RecordingTrainer(transformers.Trainer):
    """Sequential batches (identical micro-batches are then known) and the optimised loss of
    each optimizer step (the sum of its micro-batches' losses, as Trainer backpropagates)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self._pending = 0.0

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._pending += float(loss)
        return loss


class GradCallback(transformers.TrainerCallback):
    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref = trainer_ref

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer_ref[0]
        trainer.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )
        trainer.step_losses.append(trainer._pending)
        trainer._pending = 0.0


def make_trainer(model, data, out_dir, *, batch, accumulate=1, steps=1, optim="sgd", **extra):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        use_cpu=True,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        learning_rate=1e-2,
        optim=optim,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: gradients compared as computed
        logging_steps=1,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        **{"save_strategy": "no", **extra},
    )
    ref: list = []
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=data, callbacks=[GradCallback(ref)]
    )
    ref.append(trainer)
    return trainer


@pytest.mark.parametrize("path", sorted(MODELS))
def test_trainer_optimises_lm_plus_aux_loss(path, tmp_path):
    model = MODELS[path]()
    data = rows(4)
    batch = transformers.default_data_collator(data)
    reference = copy.deepcopy(model).train()
    lm, aux = lm_and_aux(reference, batch)
    assert float(aux.detach()) > 0.1  # the aux loss is not negligible here

    trainer = make_trainer(model, data, tmp_path, batch=4, steps=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    # the loss Trainer backpropagated at step 1 is the LM loss plus the aux loss
    torch.testing.assert_close(
        trainer.step_losses[0], float((lm + aux).detach()), atol=1e-5, rtol=1e-5
    )
    # the routers train (their gradient includes the aux loss's) and the logged loss is finite
    routers = [n for n in trainer.grads[0] if "router.gate" in n]
    assert routers and all(trainer.grads[0][n].abs().sum() > 0 for n in routers)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "router" in n)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("path", sorted(MODELS))
def test_accumulation_of_identical_micro_batches_equals_one_big_batch(path, tmp_path):
    data = rows(2)
    big = make_trainer(MODELS[path](), data * 2, tmp_path / "big", batch=4)
    big.train()
    accumulated = make_trainer(MODELS[path](), data * 2, tmp_path / "acc", batch=2, accumulate=2)
    accumulated.train()

    torch.testing.assert_close(accumulated.step_losses, big.step_losses, atol=1e-5, rtol=1e-5)
    got, want = accumulated.grads[0], big.grads[0]
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)

    # the check has teeth: counting the aux loss once per micro-batch (its sum over the two)
    # would change the routers' gradients by the aux loss's own gradient
    model = MODELS[path]().train()
    batch = transformers.default_data_collator(data)
    _, aux = lm_and_aux(model, batch)
    aux.backward()
    router = next(n for n in want if "router.gate" in n)
    aux_grad = dict(model.named_parameters())[router].grad
    assert aux_grad.abs().max() > 100 * 1e-6


@pytest.mark.slow  # three Trainer runs per path with checkpoints (about 20 s together)
@pytest.mark.parametrize("path", sorted(MODELS))
def test_resume_from_trainer_checkpoint_matches_uninterrupted_run(path, tmp_path):
    data = rows(6, seed=3)
    options = {"save_strategy": "steps", "save_steps": 2}
    whole = make_trainer(
        MODELS[path](), data, tmp_path / "whole", batch=2, steps=3, optim="adamw_torch", **options
    )
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()

    resumed_model = MODELS[path]()
    resumed = make_trainer(
        resumed_model, data, tmp_path / "resumed", batch=2, steps=3, optim="adamw_torch", **options
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert len(resumed.step_losses) == 1  # only step 3 ran
    torch.testing.assert_close(resumed.step_losses[0], whole.step_losses[2], atol=1e-6, rtol=1e-6)
    for (name, got), want in zip(
        resumed_model.named_parameters(), whole.model.parameters(), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=name)
