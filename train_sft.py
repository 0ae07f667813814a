r"""Stage 2 of Patho-R1: chain-of-thought supervised fine-tuning of the VLM.

Conversations (ShareGPT / LLaMA-Factory `{"messages", "images"}` or LLaVA
`{"image", "conversations"}`) are rendered with the chat template; the loss is on the
assistant's tokens only (its `<think>…</think><answer>…</answer>` and end marker), never
on the system prompt, the question, the image positions or padding. Every 20th
conversation is held out for the validation loss.

    python train_sft.py --preset toy --init out/pretrain --out_dir out/sft
    torchrun --nproc_per_node=8 train_sft.py --preset small --init out/pretrain
    torchrun --nproc_per_node=8 train_sft.py --preset base --init out/pretrain --stream --fsdp
    python train_sft.py --train_file sft_train.jsonl,sft_tumour.jsonl \
        --reading_file reading_train.jsonl,reading_near.jsonl
    python train_sft.py --help

--stream reads the conversations by seek, one at a time (nanopatho/stream.py), images decoded in
--num_workers processes; the held-out rows are every val_every-th line of the manifest (without
--stream: every val_every-th conversation that parsed, counted across the listed manifests in
order), of which the first eval_batches * batch_size * world are read for the validation loss.
"""

import dataclasses

import numpy as np
import torch

from nanopatho import checkpoint, dist, stream, training
from nanopatho.config import field, parse_config, to_dict
from nanopatho.data import DataError, image_tensor, load_conversations, preload_images
from nanopatho.next_token import Examples, TrainConfig, collate_rows, manifest_paths, mix_text, reading_rows, train
from nanopatho.presets import count_params


@dataclasses.dataclass
class Config(TrainConfig):
    out_dir: str = field("out/sft", "where checkpoints, metrics.jsonl and the final model go")
    init: str = field("out/pretrain", "VLM checkpoint to start from (stage 1 output)")
    train_file: str = field("sft_train.jsonl", "conversations, ShareGPT or LLaVA form (relative to --data; "
                                               "comma-separated list allowed without --stream)")
    val_every: int = field(20, "hold out every N-th conversation for the validation loss")
    freeze_vision: bool = field(False, "never update the vision tower")


PRESETS = {
    # toy: 900 steps (~2 epochs of sft_train + sft_tumour, 7,360 conversations). At 300 the greedy long
    # tumour chains often looped on one sentence and never closed (dev rows of rl_train, seed 0: 61 of 400
    # MCQ and 50 of 300 yes/no replies unparseable; at 500: 3 and 10). At 500 (one epoch of the larger mix)
    # tissue MCQ fell and glands / pleomorphism were half learnt: dev world seed 11, seed 0's stage 1,
    # MCQ 0.642 at 500, 0.718 at 700, 0.751 at 900 (issue 15, session-14 note)
    "toy": dict(max_steps=900, batch_size=16, lr=5e-4, warmup_steps=20, max_seq_len=320),
    "small": dict(max_steps=3000, batch_size=32, lr=1e-4, warmup_steps=100, max_seq_len=1024),
    "base": dict(max_steps=6000, batch_size=8, grad_accum=8, lr=2e-5, warmup_steps=200, max_seq_len=2048),
}


def render(cfg, tokenizer, conv, n_image_tokens):
    """A conversation -> (ids, assistant-only loss mask), its reply's tail cut at --max_seq_len."""
    if len(conv["images"]) > 1:
        raise DataError(f"{conv['source']}: {len(conv['images'])} images; one image per conversation is supported")
    ids, mask = tokenizer.render_chat(conv["messages"], n_image_tokens)
    if len(ids) > cfg.max_seq_len:  # keep the prompt, cut the reply's tail
        ids, mask = ids[: cfg.max_seq_len], mask[: cfg.max_seq_len]
        if ids.count(tokenizer.image_id) != n_image_tokens * len(conv["images"]):
            raise DataError(f"{conv['source']}: --max_seq_len {cfg.max_seq_len} cuts into the image tokens")
    return ids, mask


def read_conversations(cfg, paths):
    """The conversations of every manifest in `paths`, file by file in that order -> (conversations, n_skipped)."""
    convs, skipped = [], 0
    for path in paths:
        file_convs, file_skipped = load_conversations(path, skip_bad=cfg.skip_bad_samples,
                                                      allow_outside_root=cfg.allow_outside_root)
        convs += file_convs
        skipped += file_skipped
    return convs, skipped


def held_out(cfg, n):
    return bool(cfg.val_every) and n % cfg.val_every == cfg.val_every - 1


def conversation_examples(cfg, tokenizer, n_image_tokens, image_size, convs=None):
    """Render every conversation of the --train_file manifests to (ids, assistant-only loss mask); split off
    validation rows (n counts over all the manifests, in order).
    convs: these conversations, all held out (--stream's validation rows), instead of the manifests'."""
    skipped, val_only = 0, convs is not None
    if convs is None:
        convs, skipped = read_conversations(cfg, manifest_paths(cfg.data, cfg.train_file))
    with_image = [{"image": c["images"][0], "source": c["source"]} for c in convs if c["images"]]
    images, kept, bad = preload_images(with_image, image_size, skip_bad=cfg.skip_bad_samples, desc="sft images")
    slot = {item["source"]: i for i, item in enumerate(kept)}
    train_rows, val_rows = ([], [], []), ([], [], [])
    for n, c in enumerate(convs):
        if c["images"] and c["source"] not in slot:
            continue  # its image was bad and skipped
        rows = val_rows if val_only or held_out(cfg, n) else train_rows
        rows[0].append(render(cfg, tokenizer, c, n_image_tokens))
        rows[1].append(slot.get(c["source"], -1))
    return Examples(train_rows[0], train_rows[1], images), Examples(val_rows[0], val_rows[1], images), skipped + bad


class ConversationPlan:
    """--stream: a conversation -> (ids, loss mask, uint8 image or None) in a worker; batches collated
    as the preloaded path's (same augmentation generators)."""

    def __init__(self, cfg, tokenizer, n_image_tokens, image_size):
        self.cfg, self.tokenizer, self.n_image_tokens, self.image_size = cfg, tokenizer, n_image_tokens, image_size
        self.rank = dist.rank()

    def rows(self, k):
        return self.cfg.batch_size

    def sample(self, conv):
        seq = render(self.cfg, self.tokenizer, conv, self.n_image_tokens)
        return seq, image_tensor(conv["images"][0], conv["source"], self.image_size) if conv["images"] else None

    def collate(self, samples, k):
        step, micro = divmod(k, self.cfg.grad_accum)
        gen = training.generator_for(self.cfg.seed, step, micro, self.rank)
        images = [image for _, image in samples if image is not None]
        return collate_rows([seq for seq, _ in samples], torch.stack(images) if images else None,
                            self.tokenizer.pad_id, gen, self.cfg.augment, self.cfg.pack,
                            [image is not None for _, image in samples])


def conversation_stream(cfg, tokenizer, n_image_tokens, image_size):
    """--stream: (train Stream over the manifest's training lines, the first held-out rows as Examples, bad)."""
    if "," in cfg.train_file:
        training.fail(f"--train_file {cfg.train_file}: --stream reads a single manifest; a comma-separated list "
                      f"needs the preloaded path (drop --stream)")
    (path,) = manifest_paths(cfg.data, cfg.train_file)
    source = stream.open_conversations(path, allow_outside_root=cfg.allow_outside_root)
    is_val = np.array([held_out(cfg, n) for n in range(len(source))], dtype=bool)
    n_val = cfg.eval_batches * cfg.batch_size * dist.world_size()  # all that validation_loss reads
    val_convs, bad = stream.head(source.select(is_val), n_val, cfg.skip_bad_samples)
    _, val_set, bad_images = conversation_examples(cfg, tokenizer, n_image_tokens, image_size, convs=val_convs)
    train_set = stream.Stream(source.select(~is_val), ConversationPlan(cfg, tokenizer, n_image_tokens, image_size),
                              seed=cfg.seed, num_workers=cfg.num_workers, skip_bad=cfg.skip_bad_samples)
    return train_set, val_set, bad + bad_images


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = training.setup(cfg.seed, cfg.device)
    model, _, tokenizer = checkpoint.load(cfg.init, expect="vlm")
    examples = conversation_stream if cfg.stream else conversation_examples
    train_set, val_set, bad = examples(cfg, tokenizer, model.n_image_tokens, model.config.vision.image_size)
    if cfg.reading_file:  # text-only reading rows, so SFT does not erase what stage 0 taught
        if cfg.stream:
            training.fail("--reading_file mixes into the preloaded conversations; it does not combine with --stream")
        train_set = mix_text(train_set, reading_rows(cfg, tokenizer), cfg.reading_ratio, subsample=True)
    if cfg.freeze_vision:
        model.freeze_vision()
    n_train = f"{len(train_set.source)} streamed" if cfg.stream else len(train_set)
    training.print0(f"[sft] {n_train} train / {len(val_set)} val conversations from {cfg.init}; "
                    f"skipped bad samples: {bad}; params: {count_params(model)}")
    model.to(device)
    summary = train(cfg, model, tokenizer, train_set, val_set, to_dict(cfg), stage="sft")
    bad += summary["bad_samples"]
    training.print0(f"[sft] done in {summary['seconds']:.0f}s: val loss {summary['final_val_loss']:.3f}, "
                    f"skipped steps {summary['skipped_steps']}, skipped samples {bad} -> {cfg.out_dir}")
    dist.shutdown()


if __name__ == "__main__":
    training.run(main)
