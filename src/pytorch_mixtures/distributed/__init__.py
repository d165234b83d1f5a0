"""Expert parallelism over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

:func:`expert_parallel` shards the experts of every :class:`~pytorch_mixtures.MoELayer` in a
model over the ranks of a process group, in place: each of the W ranks keeps ``E / W``
consecutive experts (rank r owns global experts ``r*L .. r*L + L - 1``, ``L = E / W``) and the
routers stay replicated. A layer's forward then runs (GShard, Lepikhin et al. 2020; Switch,
Fedus et al. 2021)::

    route locally -> sort slots by global expert (unchanged dispatch)
      -> all_to_all the row counts -> all_to_all_single the rows to the experts' owners
      -> regroup received rows by local expert -> local experts
      -> undo the regrouping -> all_to_all_single the outputs back -> combine locally

Because experts are owned in contiguous blocks, the expert-sorted rows a rank sends to each
owner are already contiguous: no extra permutation on the send side. The two row exchanges go
through an autograd function whose backward is the reverse exchange, so input and weight
gradients flow back through the same path.

Guarantees (tested in ``tests/test_distributed.py`` on gloo at 2 and 4 ranks): for any rank's
local batch, the output and the input gradient equal the unsharded layer's on that batch, and
each expert's weight gradient equals the *sum over ranks* of the unsharded layer's gradients.

Composition with data parallelism over the non-expert parameters: :func:`ddp` (DDP) and
:func:`fully_shard` (FSDP2) exclude expert parameters from the data-parallel reduction and scale
expert gradients by ``1 / W`` so that every parameter's gradient is that of the mean loss over
ranks (expert gradients are already summed over ranks by the all-to-all backward; left
unscaled they are ``W`` times too large against the averaged data-parallel gradients, the
classic expert-parallel bug).

Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` use ``torch.distributed.checkpoint``
with the *unsharded* model's keys (stacked expert weights as ``DTensor`` sharded on the expert
dimension), so a checkpoint saved on N ranks loads on M ranks, or into an unsharded model in one
process; passing the optimizer saves and reshards its state too (training resumes on another
rank count). :func:`full_state_dict` gathers the unsharded state dict for export.

Global numbers: :func:`global_routing_stats` all-reduces a layer's routing statistics, and
:func:`clip_grad_norm_` clips by the norm over every rank's experts (a per-rank norm would
scale the replicated parameters differently on each rank).

Requirements: every rank of the group calls each MoE layer the same number of times, in the same
order, and all ranks run backward together; the layer's collectives otherwise wait forever. An
empty input (a rank with no tokens, or a Mixture-of-Depths block that selected none, whose
skipped expert-parallel layers then run on an empty slice) takes part with zero rows and
returns an empty output.

Modules: :mod:`~pytorch_mixtures.distributed.expert_parallel` (the all-to-all, the sharded
experts, :func:`expert_parallel`), :mod:`~pytorch_mixtures.distributed.data_parallel` (DDP,
FSDP2, gradient clipping, global routing statistics) and
:mod:`~pytorch_mixtures.distributed.checkpoint` (sharded state dicts and checkpoints); every
public name is re-exported here.

Shape legend: S rows (slots) on this rank, D model dim, E global experts, W ranks in the group,
L = E / W local experts, R rows received from all ranks.
"""

from .checkpoint import (
    full_state_dict,
    load_checkpoint,
    load_sharded_optimizer_state_dict,
    load_sharded_state_dict,
    save_checkpoint,
    sharded_optimizer_state_dict,
    sharded_state_dict,
)
from .data_parallel import clip_grad_norm_, ddp, fully_shard, global_routing_stats

# the function ``expert_parallel`` rebinds the package attribute of the same-named submodule:
# ``pm.distributed.expert_parallel`` is the function (the public API); reach the module by its
# path (``from pytorch_mixtures.distributed.expert_parallel import ...``)
from .expert_parallel import (
    ExpertParallelExperts,
    all_to_all_single,
    expert_parallel,
    expert_parameters,
    non_expert_parameters,
)

__all__ = [
    "ExpertParallelExperts",
    "all_to_all_single",
    "clip_grad_norm_",
    "ddp",
    "expert_parallel",
    "expert_parameters",
    "full_state_dict",
    "fully_shard",
    "global_routing_stats",
    "load_checkpoint",
    "load_sharded_optimizer_state_dict",
    "load_sharded_state_dict",
    "non_expert_parameters",
    "save_checkpoint",
    "sharded_optimizer_state_dict",
    "sharded_state_dict",
]
