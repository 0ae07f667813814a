"""PathoCLIP: contrastive image-text training on the caption corpus, then its evaluation.

Patho-R1 trains PathoCLIP on the same captions as its continued pretraining to check
image-text alignment; here its image tower also seeds the VLM (train_pretrain.py
--vision_init out/clip). Loss: symmetric InfoNCE with a learnable temperature
(logit scale initialised to 1/0.07, clamped at 100 after every step). Under torchrun
each rank's features are gathered from every rank *with gradient*, so every rank's
loss sees the global batch's negatives (nanopatho/clip.py:clip_loss).

    python train_clip.py --preset toy                       # ~minutes on 2 CPU cores
    torchrun --nproc_per_node=8 train_clip.py --preset small
    torchrun --nproc_per_node=8 train_clip.py --preset base --train_file shards/ --stream --num_workers 6
    python train_clip.py --preset toy --vision_init out/base_vision  # the image tower from a pretrained ViT
    python train_clip.py --help

--stream reads the pairs sample by sample (nanopatho/stream.py): each pair is one training row
with its caption and, with --first_sentences, its first sentence as the caption pool, instead of
one row per unique image pooling every caption of that image (the preloaded path's grouping needs
the whole manifest in memory). A batch may then hold one image twice, a false negative that
matters on SynthPath's 2 captions per image and not on a large corpus.

Writes out_dir/{config.json, model.safetensors, tokenizer.json, metrics.jsonl, eval.json}.
"""

import dataclasses
import json
import os
import re
import time

import torch
from tqdm import tqdm

from nanopatho import dist, fsdp, hf_import, stream, training
from nanopatho.clip import PathoCLIP, clip_loss
from nanopatho.config import RunConfig, field, parse_config, to_dict
from nanopatho.data import augment, image_tensor, load_pairs, pad_sequences, preload_images, to_float
from nanopatho.evaluate import clip_text_ids, eval_clip
from nanopatho.presets import clip_config, count_params
from nanopatho.tokenizer import Tokenizer


@dataclasses.dataclass
class Config(RunConfig):
    train_file: str = field("captions_train.jsonl", "image-caption pairs: JSONL, CSV/TSV or WebDataset .tar")
    tokenizer: str = field("", "tokenizer.json (default: <data>/tokenizer.json)")
    out_dir: str = field("out/clip", "output directory")
    max_steps: int = field(400, "optimizer steps")
    batch_size: int = field(128, "image-text pairs per micro-batch per rank")
    grad_accum: int = field(1, "micro-batches per optimizer step (negatives stay within a micro-batch x ranks)")
    min_lr_ratio: float = field(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = field(30, "linear warmup steps")
    max_logit_scale: float = field(100.0, "clamp of the learned logit scale (1 / temperature)")
    augment: bool = field(True, "flips / rotations / stain jitter on training images")
    eval_every: int = field(200, "zero-shot accuracy every N steps (0 = only at the end)")
    eval_tasks: str = field("zeroshot,retrieval,linear_probe", "final evaluation tasks")
    save_every: int = field(200, "resumable snapshot every N steps (0 = only the final model)")
    csv_img_key: str = field("filepath", "CSV column holding the image path")
    csv_caption_key: str = field("title", "CSV column holding the caption")
    first_sentences: bool = field(True, "also train on each caption's first sentence alone (zero-shot prompts are short)")
    csv_sep: str = field(",", "CSV separator")
    vision_init: str = field("", "image tower to start from: a ViT checkpoint (data/synthpath/perception.py "
                                 "--out_dir), a PathoCLIP, or a HF CLIP / SigLIP / OpenCLIP directory ('' = random)")


PRESETS = {
    "toy": dict(max_steps=400, batch_size=128, lr=1e-3, warmup_steps=30),
    "small": dict(max_steps=10000, batch_size=256, lr=5e-4, warmup_steps=500),
    "base": dict(max_steps=30000, batch_size=512, lr=5e-4, warmup_steps=2000),
}


def first_sentence(text):
    """The caption up to its first sentence end: "H&E of fat. Thin membranes." -> "H&E of fat."."""
    m = re.match(r"\s*(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text.strip()


def caption_pool(cfg, tokenizer, caption, text_len):
    """Token ids of a caption and, with --first_sentences, of its first sentence when that differs."""
    texts = [caption]
    if cfg.first_sentences and first_sentence(caption) != caption:
        texts.append(first_sentence(caption))
    return [clip_text_ids(tokenizer, t, text_len) for t in texts]


def load_data(cfg, tokenizer, image_size, text_len):
    """Unique images (uint8) and, per image, the token ids of each of its captions."""
    path = cfg.train_file if os.path.isabs(cfg.train_file) else os.path.join(cfg.data, cfg.train_file)
    pairs, skipped = load_pairs(path, skip_bad=cfg.skip_bad_samples, allow_outside_root=cfg.allow_outside_root,
                                csv_img_key=cfg.csv_img_key, csv_caption_key=cfg.csv_caption_key, csv_sep=cfg.csv_sep)
    by_image = {}
    for p in pairs:
        key = p["image"] if isinstance(p["image"], str) else p["source"]
        by_image.setdefault(key, {"image": p["image"], "source": p["source"], "captions": []})
        by_image[key]["captions"] += caption_pool(cfg, tokenizer, p["caption"], text_len)
    images, kept, bad = preload_images(list(by_image.values()), image_size, skip_bad=cfg.skip_bad_samples,
                                       desc="clip images")
    return images, [item["captions"] for item in kept], skipped + bad


def collate_pairs(images, captions, pad_id, gen, use_aug):
    """uint8 images (B,3,S,S) and each one's caption pool -> pixels (B,3,S,S) and one randomly chosen
    caption per image, right-padded, on the CPU. The preloaded and the streaming path both use it."""
    pixels = augment(images, gen) if use_aug else to_float(images)  # (B, 3, S, S)
    pick = torch.randint(0, 1 << 30, (len(captions),), generator=gen).tolist()
    texts = [pool[pick[j] % len(pool)] for j, pool in enumerate(captions)]
    ids, mask = pad_sequences(texts, pad_id, side="right")  # (B, T) each
    return pixels, ids, mask


def preloaded(cfg, images, captions, pad_id):
    """The preloaded images behind the stream interface: micro-batch k = step * grad_accum + micro."""
    def make(k):
        step, micro = divmod(k, cfg.grad_accum)
        idx = training.batch_indices(len(captions), cfg.batch_size, k, cfg.seed, dist.rank(), dist.world_size())
        gen = training.generator_for(cfg.seed, step, micro, dist.rank())
        return collate_pairs(images[idx], [captions[i] for i in idx], pad_id, gen, cfg.augment)
    return stream.InMemory(make, cfg.grad_accum)


class PairPlan:
    """--stream: a pair -> (uint8 image, caption pool) in a worker; batches collated as the preloaded path's."""

    def __init__(self, cfg, tokenizer, image_size, text_len):
        self.cfg, self.tokenizer, self.image_size, self.text_len = cfg, tokenizer, image_size, text_len
        self.rank = dist.rank()

    def rows(self, k):
        return self.cfg.batch_size

    def sample(self, item):
        image = image_tensor(item["image"], item["source"], self.image_size)  # (3, S, S) uint8
        return image, caption_pool(self.cfg, self.tokenizer, item["caption"], self.text_len)

    def collate(self, samples, k):
        step, micro = divmod(k, self.cfg.grad_accum)
        gen = training.generator_for(self.cfg.seed, step, micro, self.rank)
        images, pools = zip(*samples)
        return collate_pairs(torch.stack(images), list(pools), self.tokenizer.pad_id, gen, self.cfg.augment)


def training_data(cfg, tokenizer, model):
    """(micro-batch source, bad samples skipped while loading): preloaded, or a stream.Stream with --stream."""
    size, text_len = model.config.vision.image_size, model.config.text.max_len
    path = cfg.train_file if os.path.isabs(cfg.train_file) else os.path.join(cfg.data, cfg.train_file)
    if cfg.stream:
        source = stream.open_pairs(path, allow_outside_root=cfg.allow_outside_root, csv_img_key=cfg.csv_img_key,
                                   csv_caption_key=cfg.csv_caption_key, csv_sep=cfg.csv_sep,
                                   shuffle_buffer_size=cfg.shuffle_buffer)
        training.print0(f"[clip] streaming {source.name} ({cfg.num_workers} workers); params: {count_params(model)}")
        return stream.Stream(source, PairPlan(cfg, tokenizer, size, text_len), seed=cfg.seed,
                             num_workers=cfg.num_workers, skip_bad=cfg.skip_bad_samples), 0
    images, captions, bad = load_data(cfg, tokenizer, size, text_len)
    training.print0(f"[clip] {len(captions)} images, {sum(map(len, captions))} captions; skipped bad samples: {bad}; "
                    f"params: {count_params(model)}")
    return preloaded(cfg, images, captions, tokenizer.pad_id), bad


def build_model(cfg, tokenizer):
    """The preset's PathoCLIP; with --vision_init the image tower is that checkpoint's ViT (its shapes, its
    weights) and only the projection, the text tower and the temperature start from scratch."""
    config = clip_config(cfg.preset, tokenizer.vocab_size)
    if not cfg.vision_init:
        return PathoCLIP(config)
    vit = hf_import.load_vision(cfg.vision_init)
    model = PathoCLIP(dataclasses.replace(config, vision=vit.config))
    model.visual.vit.load_state_dict(vit.state_dict())
    training.print0(f"[clip] image tower from {cfg.vision_init}")
    return model


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = training.setup(cfg.seed, cfg.device)
    tokenizer = Tokenizer.from_file(cfg.tokenizer or os.path.join(cfg.data, "tokenizer.json"))
    model = build_model(cfg, tokenizer)
    data, bad = training_data(cfg, tokenizer, model)
    model.to(device)
    ddp_model = training.wrap(model, device, cfg.fsdp)
    optimizer = training.make_optimizer(model, cfg.lr, cfg.weight_decay)
    start, skipped_steps, resumed = training.resume(cfg, model, optimizer, "clip", data=data)
    log = training.MetricsLog(cfg.out_dir, resume_step=start if resumed else None)
    t0 = time.time()
    bar = tqdm(range(start, cfg.max_steps), desc="clip", disable=not dist.is_main(), dynamic_ncols=True)
    for step in bar:
        lr = training.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        training.set_lr(optimizer, lr)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            pixels, ids, mask = (t.to(device) for t in next(data))
            with training.no_sync_unless(ddp_model, micro == cfg.grad_accum - 1), training.autocast(device):
                img_f, txt_f, scale = ddp_model(pixels, ids, mask)  # (B, D), (B, D), ()
                loss = clip_loss(img_f.float(), txt_f.float(), scale.float()) / cfg.grad_accum
                loss = loss * float("nan") if step == cfg.debug_nan_step else loss
                loss.backward()
            step_loss += loss.item()
        grad_norm, stepped = training.optimizer_step(ddp_model, optimizer, cfg.grad_clip, cfg.on_nonfinite)
        skipped_steps += 0 if stepped else 1
        model.clamp_logit_scale(cfg.max_logit_scale)
        row = dict(step=step + 1, loss=step_loss, lr=lr, grad_norm=grad_norm, logit_scale=model.logit_scale.exp().item(),
                   skipped_steps=skipped_steps, elapsed=time.time() - t0)
        last = step == cfg.max_steps - 1
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
            with fsdp.unsharded(model):  # rank 0 alone evaluates
                if dist.is_main():
                    row["zeroshot_acc"] = eval_clip(model, tokenizer, cfg.data, ["zeroshot"], device=device)["zeroshot"]["accuracy"]
            model.train()
        log.write(**row)
        bar.set_postfix(loss=f"{step_loss:.3f}", scale=f"{row['logit_scale']:.1f}")
        if training.snapshot_due(cfg, step):
            training.save_snapshot(cfg, step, model, tokenizer, to_dict(cfg), optimizer, skipped_steps, data=data)
        dist.barrier()
    data.close()
    bad += stream.total_bad(data, device)
    training.save_final(cfg.out_dir, model, tokenizer, to_dict(cfg))
    with fsdp.unsharded(model):
        if dist.is_main():
            final_eval(cfg, model, tokenizer, device, t0, skipped_steps, bad)
    dist.shutdown()


def final_eval(cfg, model, tokenizer, device, t0, skipped_steps, bad):
    """The final evaluation tasks -> out_dir/eval.json, and the closing line."""
    tasks = [t for t in cfg.eval_tasks.split(",") if t]
    results = eval_clip(model, tokenizer, cfg.data, tasks, device=device)
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({"ckpt": cfg.out_dir, "model_type": "clip", "data": cfg.data, "results": results}, f, indent=2)
    zs = results.get("zeroshot", {})
    chance = zs.get("chance", {}).get("accuracy", float("nan"))
    training.print0(f"[clip] done in {time.time() - t0:.0f}s: zero-shot acc {zs.get('accuracy', float('nan')):.3f} "
                    f"(chance {chance:.3f}), skipped steps {skipped_steps}, skipped samples {bad} -> {cfg.out_dir}")


if __name__ == "__main__":
    training.run(main)
