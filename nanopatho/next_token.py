"""The next-token training loop shared by stage 1 (train_pretrain.py) and stage 2
(train_sft.py): both teach the VLM to continue token sequences that may hold an image,
with the loss only where a loss mask is on.

    examples = Examples(seqs=[(ids, loss_mask), ...], image_index=[i or -1, ...], images=uint8 (N,3,S,S))
    train(cfg, model, tokenizer, train_examples, val_examples, run_config)
    train(cfg, model, tokenizer, stream.Stream(source, plan, ...), val_examples, run_config)   # --stream

The training data is either preloaded Examples, batched here by training.batch_indices, or a
stream.Stream whose workers read, decode and collate samples (nanopatho/stream.py); both make
their batches with `collate_rows`, and the loop sees the same thing: one micro-batch after another.

One optimizer step = cfg.batch_size sequences x cfg.grad_accum micro-steps x world ranks.
The summed token loss of every micro-batch is divided by the number of target tokens in
the *whole* step (all micro-batches, all ranks), so accumulation and DDP give exactly the
gradient of one large batch (tests/test_next_token.py checks this).
"""

import dataclasses
import os
import time

import torch
from tqdm import tqdm

from nanopatho import dist, fsdp, stream, training
from nanopatho.config import RunConfig, field
from nanopatho.data import augment, collate_lm, load_conversations, to_float


@dataclasses.dataclass
class Examples:
    seqs: list          # [(ids, loss_mask)] token ids and 0/1 loss masks, unshifted
    image_index: list   # row -> index into images, or -1 for a text-only row
    images: torch.Tensor  # (N, 3, S, S) uint8

    def __len__(self):
        return len(self.seqs)


@dataclasses.dataclass
class TrainConfig(RunConfig):
    """Fields of the next-token stages on top of RunConfig (the scripts add their own)."""
    batch_size: int = field(16, "sequences per micro-batch per rank")
    grad_accum: int = field(1, "micro-batches per optimizer step")
    min_lr_ratio: float = field(0.1, "final learning rate as a fraction of the peak (cosine)")
    max_seq_len: int = field(256, "truncate sequences to this many tokens")
    augment: bool = field(True, "flips / 90-degree rotations / stain jitter on training images")
    eval_every: int = field(100, "validation loss every N steps (0 = only at the end)")
    eval_batches: int = field(4, "validation micro-batches per evaluation")
    reading_file: str = field("", "stage 0's reading conversations to mix in, text only (relative to --data; "
                                  "comma-separated list allowed; '' = none)")
    reading_ratio: float = field(0.1, "fraction of training rows that are --reading_file rows")
    pack: bool = field(True, "put each micro-batch's examples end to end in rows no longer than its longest "
                                 "example (block-diagonal attention, positions restart per example): the same loss "
                                 "and gradient as one padded row each, with fewer pad tokens computed")
    group_by_length: int = field(0, "batch rows of like length together, sorting within runs of N batches "
                                    "(0 = plain shuffle); fewer pad tokens when lengths vary")


def mix_text(examples, text_seqs, ratio, subsample=False):
    """Append text-only rows so they are about `ratio` of the combined examples: each row at least once,
    repeated to reach the ratio (stage 1's textbook paragraphs). subsample=True takes an evenly spaced
    subset instead when there are more rows than the ratio needs (stage 0's large reading corpus)."""
    if not text_seqs or ratio <= 0:
        return examples
    wanted = round(ratio * len(examples) / (1 - ratio))
    if subsample and wanted < len(text_seqs):
        extra = [text_seqs[i * len(text_seqs) // wanted] for i in range(wanted)]
    else:
        extra = text_seqs * max(1, round(wanted / len(text_seqs)))
    return Examples(examples.seqs + extra, examples.image_index + [-1] * len(extra), examples.images)


def manifest_paths(data, names):
    """A comma-separated file flag ("sft_train.jsonl,sft_tumour.jsonl") -> each file's path, relative to
    `data` unless absolute, in the listed order."""
    return [name if os.path.isabs(name) else os.path.join(data, name) for name in names.split(",")]


def reading_rows(cfg, tokenizer):
    """The reading rows of every --reading_file manifest, file by file (stages 1 and 2 mix them in)."""
    return [seq for path in manifest_paths(cfg.data, cfg.reading_file)
            for seq in reading_seqs(tokenizer, path, cfg.max_seq_len)]


def reading_seqs(tokenizer, path, max_seq_len):
    """Stage 0's reading conversations (data/synthpath/reading.py) -> [(ids, assistant-only loss mask)];
    rows longer than max_seq_len are left out, never cut (a cut row loses its answers)."""
    convs, _ = load_conversations(path)
    seqs = [tokenizer.render_chat(c["messages"], n_image_tokens=0) for c in convs]
    return [(ids, mask) for ids, mask in seqs if len(ids) <= max_seq_len]


def collate_rows(seqs, images, pad_id, generator, train_aug, pack=False, with_image=None):
    """[(ids, loss_mask)] and the uint8 images (n_img, 3, S, S) of the rows that have one, in row order
    (None: no image) -> model inputs on the CPU. The preloaded and the streaming path both use it.
    pack=True: collate_lm's packed rows, the images (augmented as unpacked) put in the packed reading
    order; with_image (n,) says which rows own an image."""
    batch = collate_lm(seqs, pad_id, pack=pack)
    order = batch.pop("order", None)  # (n,) rows in the packed reading order
    batch["pixel_values"] = None
    if images is not None and len(images):
        pixels = augment(images, generator) if train_aug else to_float(images)  # (n_img, 3, S, S)
        if order is not None:
            slot = {row: k for k, row in enumerate(r for r, has in enumerate(with_image) if has)}  # row -> its image
            pixels = pixels[[slot[r] for r in order.tolist() if r in slot]]
        batch["pixel_values"] = pixels
    return batch


def to_device(batch, device):
    return {k: None if v is None else v.to(device) for k, v in batch.items()}


def make_batch(examples, indices, pad_id, generator, train_aug, device, pack=False):
    """Collate rows `indices` into model inputs (packed: collate_rows); images in the order of their rows."""
    rows = [examples.image_index[i] for i in indices if examples.image_index[i] >= 0]
    batch = collate_rows([examples.seqs[i] for i in indices], examples.images[rows] if rows else None, pad_id,
                         generator, train_aug, pack, [examples.image_index[i] >= 0 for i in indices])
    return to_device(batch, device)


def preloaded(examples, cfg, pad_id, sampler=None):
    """Examples behind the stream interface: micro-batch k = step * grad_accum + micro. `sampler(step, micro)`
    returns its row indices (stage 0's curriculum); by default a fresh shuffle of all rows each epoch,
    with --group_by_length one whose batches hold rows of like length."""
    lengths = torch.tensor([len(ids) for ids, _ in examples.seqs]) if cfg.group_by_length else None  # (N,)

    def make(k):
        step, micro = divmod(k, cfg.grad_accum)
        if sampler:
            idx = sampler(step, micro)
        elif lengths is not None:
            idx = training.grouped_batch_indices(lengths, cfg.batch_size, k, cfg.seed, cfg.group_by_length,
                                                 dist.rank(), dist.world_size())
        else:
            idx = training.batch_indices(len(examples), cfg.batch_size, k, cfg.seed, dist.rank(), dist.world_size())
        gen = training.generator_for(cfg.seed, step, micro, dist.rank())
        return make_batch(examples, idx, pad_id, gen, cfg.augment, "cpu", cfg.pack)
    return stream.InMemory(make, cfg.grad_accum)


def batch_loss_sum(model, batch):
    """Summed next-token loss over the batch's target tokens, and their count. The model is a VLM,
    or a text-only LM (stage 0's base LM), which takes no pixel_values."""
    images = {} if batch["pixel_values"] is None else {"pixel_values": batch["pixel_values"]}
    _, loss_sum = model(batch["input_ids"], attention_mask=batch["attention_mask"], targets=batch["targets"],
                        loss_mask=batch["loss_mask"], reduction="sum", **images)
    n_tokens = (batch["loss_mask"] * (batch["targets"] >= 0)).sum()
    return loss_sum, n_tokens


def accumulate_gradients(model, batches, device, poison=False):
    """Backward over the step's micro-batches so the gradient is that of the mean token loss
    over every target token of the step, on every rank:

        loss = sum_{micro, rank} sum_tokens CE / N_global,   N_global = sum_{micro, rank} n_tokens

    DDP averages gradients over ranks, so each rank's share is multiplied by the world size.
    `poison` makes the loss NaN (testing the non-finite guard).
    Returns (the step's mean token loss, N_global)."""
    local_tokens = sum(int((b["loss_mask"] * (b["targets"] >= 0)).sum()) for b in batches)
    n_global = training.global_count(local_tokens, device)  # tokens in the whole optimizer step
    step_loss = 0.0
    for micro, batch in enumerate(batches):
        with training.no_sync_unless(model, micro == len(batches) - 1), training.autocast(device):
            loss_sum, _ = batch_loss_sum(model, batch)
            loss_sum = loss_sum + fsdp.unused_vision_zero(model, batch["pixel_values"] is not None, device)
            loss = loss_sum * dist.world_size() / n_global  # this micro-batch's share of the global mean
            loss = loss * float("nan") if poison else loss
            loss.backward()
        step_loss += loss.item() / dist.world_size()
    step_loss = dist.all_reduce_sum(torch.tensor(step_loss, device=device)).item()
    return step_loss, n_global


@torch.no_grad()
def validation_loss(model, examples, cfg, pad_id, device):
    """Mean token loss over the first eval_batches * batch_size validation rows (fixed)."""
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    n = min(len(examples), cfg.eval_batches * cfg.batch_size * dist.world_size())
    mine = list(range(dist.rank(), n, dist.world_size()))
    with fsdp.unsharded(model):  # ranks may hold different numbers of batches
        for start in range(0, len(mine), cfg.batch_size):
            batch = make_batch(examples, mine[start:start + cfg.batch_size], pad_id, None, False, device, cfg.pack)
            with training.autocast(device):
                loss_sum, n_tokens = batch_loss_sum(model, batch)
            total += loss_sum.float()
            count += n_tokens
    model.train()
    dist.all_reduce_sum(total)
    dist.all_reduce_sum(count)
    return (total / count.clamp(min=1)).item()


def train(cfg, model, tokenizer, train_set, val_set, run_config, grad_filter=None, stage="train", sampler=None,
          on_eval=None):
    """Run the optimizer loop; returns a summary dict. train_set: Examples or a stream.Stream.
    `grad_filter(step, model)` may drop gradients before the update (stage 1's projector-only phase);
    `sampler(step, micro)` picks preloaded rows (stage 0's curriculum); `on_eval(model)` -> {name: value}
    adds numbers to each evaluation's metrics row (stage 0's reading probe)."""
    device = next(model.parameters()).device
    preloaded_set = isinstance(train_set, Examples)
    # a text-only batch leaves the vision tower unused (a stream may hold such rows)
    text_only_rows = any(i < 0 for i in train_set.image_index) if preloaded_set else True
    ddp_model = training.wrap(model, device, cfg.fsdp, find_unused_parameters=text_only_rows)
    optimizer = training.make_optimizer(model, cfg.lr, cfg.weight_decay)
    data = preloaded(train_set, cfg, tokenizer.pad_id, sampler) if preloaded_set else train_set
    start_step, skipped_steps, resumed = training.resume(cfg, model, optimizer, stage, data=data)
    log = training.MetricsLog(cfg.out_dir, resume_step=start_step if resumed else None)
    bar = tqdm(range(start_step, cfg.max_steps), desc=stage, disable=not dist.is_main(), dynamic_ncols=True)
    t0, val = time.time(), float("nan")
    for step in bar:
        lr = training.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        training.set_lr(optimizer, lr)
        batches = [to_device(next(data), device) for _ in range(cfg.grad_accum)]
        step_loss, n_global = accumulate_gradients(ddp_model, batches, device, poison=step == cfg.debug_nan_step)
        if grad_filter is not None:
            grad_filter(step, model)
        grad_norm, stepped = training.optimizer_step(ddp_model, optimizer, cfg.grad_clip, cfg.on_nonfinite)
        skipped_steps += 0 if stepped else 1
        loss_t = step_loss
        last = step == cfg.max_steps - 1
        evaluated = (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last
        if evaluated:
            val = validation_loss(ddp_model, val_set, cfg, tokenizer.pad_id, device) if len(val_set) else float("nan")
        row = dict(step=step + 1, loss=loss_t, lr=lr, grad_norm=grad_norm, tokens=n_global,
                   skipped_steps=skipped_steps, elapsed=time.time() - t0)
        if evaluated:
            row["val_loss"] = val
            row.update(on_eval(model) if on_eval is not None else {})
        log.write(**row)
        bar.set_postfix(loss=f"{loss_t:.3f}", val=f"{val:.3f}", lr=f"{lr:.1e}")
        if training.snapshot_due(cfg, step):
            training.save_snapshot(cfg, step, model, tokenizer, run_config, optimizer, skipped_steps, data=data)
        dist.barrier()
    data.close()
    training.save_final(cfg.out_dir, model, tokenizer, run_config)
    return {"final_val_loss": val, "skipped_steps": skipped_steps, "seconds": time.time() - t0,
            "bad_samples": stream.total_bad(data, device)}
