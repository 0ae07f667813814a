"""The training plumbing shared by all four scripts: one copy, small functions.

    device = setup(cfg.seed, cfg.device)                     # torchrun-aware, seeds every RNG
    model = wrap(model, device, cfg.fsdp)                     # DDP (or FSDP2 with --fsdp) under torchrun
    opt = make_optimizer(model, lr, weight_decay)             # AdamW, decay only on matrices
    lr = lr_at(step, total, peak, warmup)                     # linear warmup + cosine
    with no_sync_unless(model, last_micro_step): loss.backward()
    grad_norm, ok = optimizer_step(model, opt, grad_clip, on_nonfinite="skip")
    log = MetricsLog(out_dir); log.write(step=step, loss=...)
    start, skipped, resumed = resume(cfg, model, opt, "sft", data=batches)   # --resume: weights, optimizer, data
    save_snapshot(cfg, step, model, tok, run_config, opt, skipped, data=batches); save_final(out_dir, model, tok, cfg)

Loss normalisation: every script divides its summed token loss by the number of
target tokens in the whole optimizer step, counted across micro-batches *and* ranks
(`global_count`). Averaging per micro-batch would weight a short micro-batch's tokens
more than a long one's (a known pitfall in RL and SFT code); dividing by the global count
makes k micro-batches x n ranks give exactly the gradient of one big batch.
"""

import contextlib
import json
import math
import os
import random
import sys

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanopatho import checkpoint, dist, fsdp
from nanopatho.checkpoint import CheckpointError
from nanopatho.data import DataError

NO_DECAY_KEYWORDS = ("pos_embed", "position", "logit_scale", "norm", "bias")


def setup(seed, device="auto"):
    """Start torchrun if present, seed every RNG (offset by rank), return the device."""
    device = dist.init(device)
    seed_everything(seed + dist.rank())
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator_for(seed, *keys):
    """A torch.Generator determined by (seed, keys): stateless randomness that survives resume."""
    g = torch.Generator()
    g.manual_seed(hash_ints(seed, *keys))
    return g


def hash_ints(*values):
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFF)) * 1099511628211) % 2**63
    return h


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_ddp(model, device, find_unused_parameters=False):
    """DDP when launched by torchrun. find_unused_parameters=True is needed when a rank's batch
    may leave parameters without a gradient (a text-only batch never touches the vision tower)."""
    if not dist.is_dist():
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


def wrap(model, device, use_fsdp=False, find_unused_parameters=False):
    """Under torchrun: FSDP2 in place with use_fsdp (nanopatho/fsdp.py), else DDP; the bare model otherwise."""
    if use_fsdp and dist.is_dist():
        return fsdp.shard(model, device)
    return wrap_ddp(model, device, find_unused_parameters)


def no_sync_unless(model, sync):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) on accumulation micro-steps (sync on the last)."""
    if fsdp.is_sharded(model):
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, DDP) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with weight decay on weight matrices only: never on norms, biases,
    position embeddings or the CLIP logit scale. Parameters carrying an `lr_scale` attribute
    (train_pretrain.py --projector_lr) get groups of their own, trained at lr x lr_scale."""
    groups = {}  # (lr_scale, decays) -> params
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = p.dim() >= 2 and not any(k in name for k in NO_DECAY_KEYWORDS)
            groups.setdefault((getattr(p, "lr_scale", 1.0), decays), []).append(p)
    param_groups = [{"params": groups.pop((1.0, True), []), "weight_decay": weight_decay},
                    {"params": groups.pop((1.0, False), []), "weight_decay": 0.0}]
    for (scale, decays), params in groups.items():
        param_groups.append({"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale})
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, foreach=False)


def lr_at(step, total_steps, peak_lr, warmup_steps, min_ratio=0.1):
    """Linear warmup to peak_lr, then cosine decay to min_ratio * peak_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def global_count(local_count, device):
    """Number of target tokens in the optimizer step, summed over ranks."""
    t = torch.tensor(float(local_count), device=device)
    return max(dist.all_reduce_sum(t).item(), 1.0)


class NonFiniteError(RuntimeError):
    pass


def optimizer_step(model, optimizer, grad_clip, on_nonfinite="skip"):
    """Clip, check, step. Returns (grad_norm, stepped).

    A non-finite gradient norm (from a NaN/inf loss or an overflow) is caught here, at the
    step where it happens: with on_nonfinite="skip" the update is dropped (gradients
    zeroed, the caller counts it); with "stop" the run ends with a clear message.
    All ranks see the same all-reduced gradients, so they all take the same decision."""
    if fsdp.is_sharded(model):
        fsdp.average_unsharded_grads(model)
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        if on_nonfinite == "stop":
            raise NonFiniteError("non-finite gradient norm; stopping (use --on_nonfinite skip to skip such steps)")
        return grad_norm, False
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, True


class MetricsLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl (rank 0 only)."""

    def __init__(self, out_dir, resume_step=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.active = dist.is_main()
        if self.active:
            os.makedirs(out_dir, exist_ok=True)
            if resume_step is None:
                open(self.path, "w").close()
            else:
                self._truncate_after(resume_step)

    def _truncate_after(self, step):
        """On resume, drop lines logged after the snapshot so the log matches the weights."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip()]
        keep = [r for r in rows if json.loads(r).get("step", -1) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, **row):
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def batch_indices(n, batch_size, step, seed, rank=0, world=1):
    """Indices of this rank's share of the global batch at `step`.

    The sample order is a pure function of (seed, epoch), so a resumed run sees exactly the
    batches the uninterrupted run would have seen. The global batch (batch_size * world)
    is cut into contiguous rank slices."""
    global_bs = batch_size * world
    start = step * global_bs
    out = []
    while len(out) < global_bs:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=generator_for(seed, 7, epoch))
        out.extend(perm[offset:offset + global_bs - len(out)].tolist())
    return out[rank * batch_size:(rank + 1) * batch_size]


def length_grouped_order(lengths, global_bs, group, seed, epoch):
    """One epoch's sample order with rows of like length side by side (the idea of transformers'
    `group_by_length`): shuffle, keep a whole number of global batches, then within every run of
    `group` global batches sort by length, cut into global batches and shuffle those. A batch is
    padded to its longest row, so a few long rows (stage 0's reading rows among short captions) no
    longer pad most batches. The order is a pure function of (seed, epoch), as in batch_indices."""
    n = len(lengths) - len(lengths) % global_bs
    perm = torch.randperm(len(lengths), generator=generator_for(seed, 7, epoch))[:n]  # (n,)
    chunks = []
    for c, start in enumerate(range(0, n, group * global_bs)):
        rows = perm[start:start + group * global_bs]
        rows = rows[torch.argsort(lengths[rows], stable=True)]                      # shortest first
        batches = rows.view(-1, global_bs)                                          # (group, global_bs)
        chunks.append(batches[torch.randperm(len(batches), generator=generator_for(seed, 8, epoch, c))])
    return torch.cat(chunks).view(-1)  # (n,)


def grouped_batch_indices(lengths, batch_size, step, seed, group, rank=0, world=1):
    """batch_indices over length_grouped_order: this rank's share of the global batch at `step`
    (an epoch is len(lengths) // global batch steps; the few rows left over differ every epoch)."""
    global_bs = batch_size * world
    steps_per_epoch = len(lengths) // global_bs
    if steps_per_epoch == 0:
        return batch_indices(len(lengths), batch_size, step, seed, rank, world)
    epoch, j = divmod(step, steps_per_epoch)
    order = length_grouped_order(lengths, global_bs, group, seed, epoch)
    return order[j * global_bs + rank * batch_size:j * global_bs + (rank + 1) * batch_size].tolist()


def resume(cfg, model, optimizer, stage, data=None):
    """With --resume, restore the newest complete snapshot in cfg.out_dir (weights, optimizer, RNGs, and
    the position of `data`, a stream.Stream / InMemory). Returns (first step to run, skipped steps so far,
    whether a snapshot was loaded)."""
    snapshot = checkpoint.latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if snapshot is None:
        return 0, 0, False
    state = checkpoint.load_train_state(snapshot, model, optimizer)
    if data is not None:
        saved = state.get("data")  # one entry per rank
        data.resume_at(saved[min(dist.rank(), len(saved) - 1)] if saved else None, state["step"])
    print0(f"[{stage}] resumed from {snapshot} at step {state['step']}")
    return state["step"], state["skipped_steps"], True


def snapshot_due(cfg, step):
    """Whether a resumable snapshot is written after 0-based `step` (never after the last one:
    the final model is saved then). The same answer on every rank: saving is collective."""
    done = step + 1
    return bool(cfg.save_every) and done % cfg.save_every == 0 and done < cfg.max_steps


def save_snapshot(cfg, step, model, tokenizer, run_config, optimizer, skipped_steps, data=None):
    """Every rank calls this (it gathers FSDP shards and each rank's data position); rank 0 writes."""
    state = {"step": step + 1, "skipped_steps": skipped_steps}
    if data is not None and data.state() is not None:
        state["data"] = dist.all_gather_object(data.state())
    model_state = fsdp.full_state(model) if fsdp.is_sharded(model) else None
    optimizer_state = fsdp.full_optimizer_state(model, optimizer) if fsdp.is_sharded(model) else None
    if dist.is_main():
        checkpoint.save_checkpoint(cfg.out_dir, step + 1, model, tokenizer, run_config, optimizer, state,
                                   keep=cfg.keep_checkpoints, model_state=model_state, optimizer_state=optimizer_state)


def save_final(out_dir, model, tokenizer, run_config):
    """The stage's final model (checkpoint.save_model) from rank 0; every rank calls this (FSDP gathers)."""
    state = fsdp.full_state(model) if fsdp.is_sharded(model) else None
    if dist.is_main():
        checkpoint.save_model(out_dir, model, tokenizer, run_config, state=state)


def print0(*args, **kwargs):
    if dist.is_main():
        print(*args, **kwargs, flush=True)


def fail(message, code=2):
    """One clear line on stderr and a non-zero exit: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(main):
    """Run a script's main(argv). Bad input (file:line), an unusable checkpoint, or a run stopped
    by --on_nonfinite stop ends with one line on stderr and exit code 2, never a traceback;
    anything else is a bug and keeps its traceback."""
    try:
        main(sys.argv[1:])
    except (DataError, CheckpointError, FileNotFoundError, NonFiniteError) as e:
        fail(str(e))
