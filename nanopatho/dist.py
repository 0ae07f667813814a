"""torchrun / DDP helpers: who am I, how many are we, and collective ops that
degrade to no-ops in a single process.

    torchrun --nproc_per_node=2 train_clip.py --preset toy     # gloo on CPU, nccl on GPU

`RANK` in the environment means we were launched by torchrun (nanoGPT's convention).
"""

import os
import time

import torch
import torch.distributed as dist


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def world_size():
    return dist.get_world_size() if is_dist() else 1


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main():
    return rank() == 0


def init(device="auto"):
    """Start the process group when launched by torchrun; return the torch.device to use."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    if "RANK" in os.environ and not is_dist():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device == "cuda":
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device(device)


def shutdown():
    """Leave the process group at the end of a run.

    A gloo worker thread may still hold the last collective's tensors when `wait()` returns; it
    frees them a moment later, and that needs the GIL. If the interpreter is already finalising,
    the thread cannot take the GIL and the process aborts with "terminate called without an active
    exception" (pytorch/pytorch#179291). A barrier, then a short sleep that releases the GIL, lets
    those threads finish first."""
    if is_dist():
        dist.barrier()
        time.sleep(0.1)
        dist.destroy_process_group()


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(x):
    """Sum a tensor over ranks (in place) and return it; identity in one process."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x):
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def broadcast(x, src=0):
    """Overwrite x (in place) with rank src's x; identity in one process."""
    if is_dist():
        dist.broadcast(x, src=src)
    return x


def all_gather_object(obj):
    """[rank 0's obj, rank 1's obj, ...] on every rank (any picklable object); [obj] in one process."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own slice,
    summed over every rank's loss (so global negatives contribute gradient)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (world * B, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss touched every slice
        b = grad.shape[0] // world_size()
        return grad[rank() * b:(rank() + 1) * b]


def all_gather_with_grad(x):
    """(B, ...) on each rank -> (world * B, ...) everywhere, differentiable; rank order."""
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)
