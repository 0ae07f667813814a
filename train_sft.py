"""Stage 2 of Patho-R1: chain-of-thought supervised fine-tuning of the VLM.

Conversations (ShareGPT / LLaMA-Factory `{"messages", "images"}` or LLaVA
`{"image", "conversations"}`) are rendered with the chat template; the loss is on the
assistant's tokens only (its `<think>…</think><answer>…</answer>` and end marker), never
on the system prompt, the question, the image positions or padding. Every 20th
conversation is held out for the validation loss.

    python train_sft.py --preset toy --init out/pretrain --out_dir out/sft
    torchrun --nproc_per_node=8 train_sft.py --preset small --init out/pretrain
    python train_sft.py --help
"""

import dataclasses
import os

import torch

from nanopatho import checkpoint, dist, training
from nanopatho.config import field, parse_config, to_dict
from nanopatho.data import DataError, load_conversations, preload_images
from nanopatho.next_token import Examples, TrainConfig, mix_text, reading_seqs, train
from nanopatho.presets import count_params


@dataclasses.dataclass
class Config(TrainConfig):
    out_dir: str = field("out/sft", "where checkpoints, metrics.jsonl and the final model go")
    init: str = field("out/pretrain", "VLM checkpoint to start from (stage 1 output)")
    train_file: str = field("sft_train.jsonl", "conversations, ShareGPT or LLaVA form (relative to --data)")
    val_every: int = field(20, "hold out every N-th conversation for the validation loss")
    freeze_vision: bool = field(False, "never update the vision tower")


PRESETS = {
    "toy": dict(max_steps=300, batch_size=16, lr=5e-4, warmup_steps=20, max_seq_len=320),
    "small": dict(max_steps=3000, batch_size=32, lr=1e-4, warmup_steps=100, max_seq_len=1024),
    "base": dict(max_steps=6000, batch_size=8, grad_accum=8, lr=2e-5, warmup_steps=200, max_seq_len=2048),
}


def conversation_examples(cfg, tokenizer, n_image_tokens, image_size):
    """Render every conversation to (ids, assistant-only loss mask); split off validation rows."""
    path = cfg.train_file if os.path.isabs(cfg.train_file) else os.path.join(cfg.data, cfg.train_file)
    convs, skipped = load_conversations(path, skip_bad=cfg.skip_bad_samples, allow_outside_root=cfg.allow_outside_root)
    for c in convs:
        if len(c["images"]) > 1:
            raise DataError(f"{c['source']}: {len(c['images'])} images; one image per conversation is supported")
    with_image = [{"image": c["images"][0], "source": c["source"]} for c in convs if c["images"]]
    images, kept, bad = preload_images(with_image, image_size, skip_bad=cfg.skip_bad_samples, desc="sft images")
    slot = {item["source"]: i for i, item in enumerate(kept)}
    train_rows, val_rows = ([], [], []), ([], [], [])
    for n, c in enumerate(convs):
        if c["images"] and c["source"] not in slot:
            continue  # its image was bad and skipped
        ids, mask = tokenizer.render_chat(c["messages"], n_image_tokens)
        if len(ids) > cfg.max_seq_len:  # keep the prompt, cut the reply's tail
            ids, mask = ids[: cfg.max_seq_len], mask[: cfg.max_seq_len]
            if ids.count(tokenizer.image_id) != n_image_tokens * len(c["images"]):
                raise DataError(f"{c['source']}: --max_seq_len {cfg.max_seq_len} cuts into the image tokens")
        rows = val_rows if cfg.val_every and n % cfg.val_every == cfg.val_every - 1 else train_rows
        rows[0].append((ids, mask))
        rows[1].append(slot.get(c["source"], -1))
    return Examples(train_rows[0], train_rows[1], images), Examples(val_rows[0], val_rows[1], images), skipped + bad


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = training.setup(cfg.seed, cfg.device)
    model, _, tokenizer = checkpoint.load(cfg.init, expect="vlm")
    train_set, val_set, bad = conversation_examples(cfg, tokenizer, model.n_image_tokens,
                                                    model.config.vision.image_size)
    if cfg.reading_file:  # text-only reading rows, so SFT does not erase what stage 0 taught
        path = cfg.reading_file if os.path.isabs(cfg.reading_file) else os.path.join(cfg.data, cfg.reading_file)
        train_set = mix_text(train_set, reading_seqs(tokenizer, path, cfg.max_seq_len), cfg.reading_ratio)
    if cfg.freeze_vision:
        model.freeze_vision()
    training.print0(f"[sft] {len(train_set)} train / {len(val_set)} val conversations from {cfg.init}; "
                    f"skipped bad samples: {bad}; params: {count_params(model)}")
    model.to(device)
    summary = train(cfg, model, tokenizer, train_set, val_set, to_dict(cfg), stage="sft")
    training.print0(f"[sft] done in {summary['seconds']:.0f}s: val loss {summary['final_val_loss']:.3f}, "
                    f"skipped steps {summary['skipped_steps']}, skipped samples {bad} -> {cfg.out_dir}")
    dist.shutdown()


if __name__ == "__main__":
    training.run(main)
