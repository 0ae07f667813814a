"""FSDP2 (--fsdp): parameters, gradients and optimizer state sharded over the ranks with
`torch.distributed.fsdp.fully_shard`, instead of replicated by DDP; and the ways back to full tensors.

    torchrun --nproc_per_node=8 train_sft.py --preset base --init out/pretrain --fsdp

What is sharded. Each block of the LM and of PathoCLIP's two towers is one FSDP unit (all-gathered just
before its forward, freed after); the root unit holds the rest. The VLM's vision tower and projector stay
in the root unit: a text-only batch skips them, and every rank must gather and reduce the same units in
the same order. For the same reason, when some rank's micro-batch has images and this rank's has none,
`unused_vision_zero` adds 0 * (vision + projector parameters) to its loss: every rank then reduces those
gradients, as DDP's find_unused_parameters does. A scalar parameter (PathoCLIP's logit scale) cannot be
sharded: it stays replicated and `average_unsharded_grads` averages its gradient by hand. On CUDA the
units compute in bf16 and reduce gradients in fp32 (MixedPrecisionPolicy); on the CPU all is fp32.

Checkpoints keep the single-process layout: `full_state` / `full_optimizer_state` gather every tensor to
rank 0's CPU (every rank must call them), and `load_full_state` / `load_full_optimizer_state` load such
a file into the shards, so a checkpoint written with --fsdp loads without it and the other way round.

Generation (RL rollouts), old log-probs, validation and rank-0 evaluation run a different number of
forwards on each rank, and a sharded forward is a collective. They run inside `unsharded(model)`: every
unit holds its full parameters and forwards need no collective (memory: the full model on each rank
while inside, as FSDP1's summon_full_params). RL's frozen KL reference is not sharded at all.

Two FSDP2 details this file handles: the root is fixed when sharding (FSDP otherwise takes the first
unit to run a forward, and RL generates with the LM's blocks before any forward of the whole model), and
`unsharded` ends with reset_iter_state (FSDP orders its backward all-gathers by the forwards it recorded;
forwards that differ between ranks would deadlock the next backward).
"""

import contextlib
import sys

import torch
import torch.nn as nn

from nanopatho import dist
from nanopatho.checkpoint import tied_names

# torch.distributed.fsdp / .tensor / .checkpoint take seconds to import: they are imported by the
# functions that use them, so a run without --fsdp never pays for them
ROOT_ONLY = {"VLM": ("vision.", "projector.")}  # kept in the root unit (see above), by model class


def is_sharded(model):
    fsdp_module = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    return fsdp_module is not None and isinstance(model, fsdp_module.FSDPModule)


def _class_name(model):
    return next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))  # FSDPVLM -> VLM


def _state_dict_api():
    import torch.distributed.checkpoint.state_dict as api
    return api


def shard(model, device):
    """fully_shard every block of every nn.ModuleList (but ROOT_ONLY's), then the root; in place. Every
    rank starts from rank 0's weights, as under DDP (each rank's init is seeded differently)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, 0)
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    keep = ROOT_ONLY.get(_class_name(model), ())
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.ModuleList) and not (name + ".").startswith(keep):
            for block in module:
                fully_shard(block, mesh=mesh, mp_policy=policy)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalars or None)
    # FSDP takes the first unit to run a forward for the root; RL's generation runs the LM's blocks
    # before any forward of the whole model, so the root is fixed here, as its first forward would
    model._get_fsdp_state()._lazy_init()
    return model


def average_unsharded_grads(model):
    """Mean over ranks of the gradients FSDP does not reduce (the replicated scalar parameters)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce_sum(p.grad).div_(dist.world_size())


def unused_vision_zero(model, has_images, device):
    """0 * the sum of the VLM's vision / projector parameters when another rank's micro-batch has images
    and this one's has none (a tensor to add to the loss), else 0. Collective: every rank calls it."""
    if not is_sharded(model) or _class_name(model) not in ROOT_ONLY:
        return 0.0
    any_images = dist.all_reduce_max(torch.tensor(float(has_images), device=device)).item() > 0
    if has_images or not any_images:
        return 0.0
    params = [p for n, p in model.named_parameters() if n.startswith(ROOT_ONLY["VLM"]) and p.requires_grad]
    return 0.0 * sum(p.sum() for p in params)


def full_state(model):
    """Every weight, gathered to rank 0's CPU, tied duplicates dropped ({} on other ranks). Collective."""
    api = _state_dict_api()
    state = api.get_model_state_dict(model, options=api.StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = tied_names(model)  # saved once, under the first name, as checkpoint.untied_state does
    return {k: v for k, v in state.items() if k not in tied}


def load_full_state(model, state):
    """Load full tensors (every rank passes the whole state) into the shards."""
    api = _state_dict_api()
    api.set_model_state_dict(model, state, options=api.StateDictOptions(full_state_dict=True, strict=False))


def _optimizer_names(model, optimizer):
    """Parameter names in the optimizer's own order: index i of optimizer.state_dict() is names[i]."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model, optimizer):
    """The optimizer's state in optimizer.state_dict()'s layout (parameters by index), gathered to rank 0
    (None on other ranks). Collective."""
    api = _state_dict_api()
    full = api.get_optimizer_state_dict(model, optimizer,
                                        options=api.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return None
    index = {n: i for i, n in enumerate(_optimizer_names(model, optimizer))}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model, optimizer, state):
    """Load a state in optimizer.state_dict()'s layout (every rank passes the whole state) into the shards."""
    names = _optimizer_names(model, optimizer)
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    full = {"state": {names[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
    api = _state_dict_api()
    api.set_optimizer_state_dict(model, optimizer, full, options=api.StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def unsharded(model):
    """Inside, every FSDP unit of `model` holds its full parameters and its forwards run no collective,
    so ranks may run different numbers of forwards. Every rank enters together, between optimizer steps
    (never inside a gradient-accumulation sequence); no-op unless sharded. On the way out FSDP forgets
    the forwards run inside (reset_iter_state)."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if is_sharded(m)]  # the root first
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()  # all-gather (collective)
    try:
        yield
    finally:
        model.reset_iter_state()  # reshards every unit, clears the recorded forward order
        for unit in units[1:]:  # the root keeps False: fully_shard's own choice for it
            unit.set_reshard_after_forward(True, recurse=False)
