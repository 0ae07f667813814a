r"""Stage 1 of Patho-R1: continued pretraining (knowledge infusion) of the VLM.

The model learns to continue each caption given its image (loss on caption tokens only:
`<|bos|><image x n> caption <|eos|>`), mixed with text-only "textbook" paragraphs that
state the world's rules (`--textbook_ratio` of the examples). `--vision_init out/clip`
starts the vision tower from PathoCLIP; `--lm_init out/base_lm` starts the language model from
a base LM that can already read (stage 0, `python -m nanopatho.base_lm`); `--align_steps N` first trains only the
projector (vision-language alignment), then everything; `--freeze_vision` / `--freeze_lm` keep
the vision tower / the language model fixed throughout (both: LLaVA's projector-only stage).
Both inits also take released local directories (nanopatho/hf_import.py): `--lm_init` a Qwen2 /
Qwen2.5 / Llama-family HF directory, whose own tokenizer.json the VLM then uses, and
`--vision_init` a HF CLIP / SigLIP or OpenCLIP directory.

    python train_pretrain.py --preset toy --vision_init out/clip --out_dir out/pretrain
    torchrun --nproc_per_node=8 train_pretrain.py --preset small --vision_init out/clip
    torchrun --nproc_per_node=8 train_pretrain.py --preset base --train_file shards/ --stream --num_workers 6 --fsdp
    python train_pretrain.py --preset small --lm_init Qwen2.5-0.5B --vision_init clip-vit-base-patch16 \
        --freeze_vision --align_steps 500 --lr 2e-5
    python train_pretrain.py --train_file captions_train.jsonl,captions_findings.jsonl \
        --reading_file reading_train.jsonl,reading_near.jsonl
    python train_pretrain.py --help

--stream reads the pairs sample by sample (nanopatho/stream.py) instead of decoding every image
first; the textbook paragraphs (text only, small) stay in memory and are mixed into each
micro-batch by a draw that depends on (seed, micro-batch, rank) only, so resuming stays exact.
"""

import dataclasses
import os

import torch

from nanopatho import dist, hf_import, stream, training
from nanopatho.config import field, parse_config, to_dict
from nanopatho.data import image_tensor, load_pairs, load_records, preload_images
from nanopatho.next_token import Examples, TrainConfig, collate_rows, manifest_paths, mix_text, reading_rows, train
from nanopatho.presets import count_params, vlm_config
from nanopatho.tokenizer import Tokenizer
from nanopatho.vlm import VLM


@dataclasses.dataclass
class Config(TrainConfig):
    out_dir: str = field("out/pretrain", "where checkpoints, metrics.jsonl and the final model go")
    train_file: str = field("captions_train.jsonl", "image-caption pairs: JSONL, CSV/TSV, or WebDataset .tar (relative to "
                                                    "--data; comma-separated list allowed without --stream)")
    val_file: str = field("captions_val.jsonl", "held-out image-caption pairs for the validation loss")
    textbook_file: str = field("textbook.jsonl", "text-only paragraphs {'text': ...} ('' = none)")
    textbook_ratio: float = field(0.2, "fraction of training examples that are textbook paragraphs")
    tokenizer: str = field("", "tokenizer.json (default: <data>/tokenizer.json)")
    vision_init: str = field("", "vision tower to start from: a PathoCLIP checkpoint, or a HF CLIP / SigLIP or "
                                 "OpenCLIP directory")
    lm_init: str = field("", "LM the VLM continues: a nanopatho LM checkpoint (stage 0's base LM, same tokenizer), or "
                             "a HF Qwen2 / Llama directory (its tokenizer.json is used, nanopatho's specials merged in)")
    freeze_vision: bool = field(False, "never update the vision tower")
    freeze_lm: bool = field(False, "never update the language model (with --freeze_vision: only the projector "
                                    "trains); textbook paragraphs are then left out")
    pixel_shuffle: int = field(2, "fold each s x s block of patches into one image token (the ViT grid must divide by s)")
    pooled_token: bool = field(False, "add one image token: the tower's pooled feature through its own MLP")
    align_steps: int = field(0, "train only the projector for the first N steps")
    projector_lr: float = field(0.0, "peak learning rate of the projector (LLaVA's mm_projector_lr; 0 = --lr)")
    csv_img_key: str = field("filepath", "CSV column holding the image path")
    csv_caption_key: str = field("title", "CSV column holding the caption")
    csv_sep: str = field(",", "CSV separator")


PRESETS = {
    # toy: 2,400 steps (600 -> 1,200 -> 2,400): the toy speedrun adds captions_findings.jsonl, 4,480 pairs, to the
    # 8,000 captions. At 1,200 the val loss still fell and the LM said the mitotic count at 0.33 where the tower holds
    # 0.54; at 2,400 it says 0.51, and SFT on it gains ~6 dev MCQ points (issue-15 notes, sessions 12-15)
    "toy": dict(max_steps=2400, batch_size=16, lr=1e-3, warmup_steps=20, max_seq_len=160),
    "small": dict(max_steps=5000, batch_size=32, lr=3e-4, warmup_steps=200, max_seq_len=512, num_threads=0),
    "base": dict(max_steps=20000, batch_size=16, grad_accum=4, lr=1e-4, warmup_steps=500, max_seq_len=1024),
}


def resolve(cfg, name):
    return name if not name or os.path.isabs(name) else os.path.join(cfg.data, name)


def caption_prefix(cfg, tokenizer, n_image_tokens):
    """`<|bos|> <image>*n`, checking that --max_seq_len leaves room for a caption token and <|eos|>."""
    prefix = [tokenizer.bos_id] + [tokenizer.image_id] * n_image_tokens
    if cfg.max_seq_len < len(prefix) + 2:
        training.fail(f"--max_seq_len {cfg.max_seq_len} is too small: <|bos|> and the image take {len(prefix)} "
                      f"tokens, so captions need at least {len(prefix) + 2}")
    return prefix


def caption_seq(cfg, tokenizer, prefix, caption):
    """(ids, loss mask) of `prefix caption <|eos|>`, the loss on caption + eos."""
    text = tokenizer.encode(caption)[: cfg.max_seq_len - len(prefix) - 1] + [tokenizer.eos_id]
    return prefix + text, [0] * len(prefix) + [1] * len(text)


def open_pairs(cfg, path):
    return stream.open_pairs(path, allow_outside_root=cfg.allow_outside_root, csv_img_key=cfg.csv_img_key,
                             csv_caption_key=cfg.csv_caption_key, csv_sep=cfg.csv_sep,
                             shuffle_buffer_size=cfg.shuffle_buffer)


def read_pairs(cfg, paths):
    """The pairs of every manifest in `paths`, file by file in that order -> (pairs, n_skipped)."""
    pairs, skipped = [], 0
    for path in paths:
        file_pairs, file_skipped = load_pairs(path, skip_bad=cfg.skip_bad_samples,
                                              allow_outside_root=cfg.allow_outside_root, csv_img_key=cfg.csv_img_key,
                                              csv_caption_key=cfg.csv_caption_key, csv_sep=cfg.csv_sep)
        pairs += file_pairs
        skipped += file_skipped
    return pairs, skipped


def caption_examples(cfg, tokenizer, n_image_tokens, paths, image_size, limit=None):
    """The pairs of the manifests `paths`, file by file -> Examples: `<|bos|> <image>*n caption <|eos|>`, loss
    on caption + eos. limit: only the first `limit` pairs of the one manifest, read as a stream (--stream's
    validation rows)."""
    if limit is None:
        pairs, skipped = read_pairs(cfg, paths)
    else:
        assert len(paths) == 1, f"a limit streams one manifest, got {paths}"
        pairs, skipped = stream.head(open_pairs(cfg, paths[0]), limit, cfg.skip_bad_samples)
    images, pairs, bad = preload_images(pairs, image_size, skip_bad=cfg.skip_bad_samples,
                                        desc=",".join(os.path.basename(path) for path in paths))
    prefix = caption_prefix(cfg, tokenizer, n_image_tokens)
    seqs = [caption_seq(cfg, tokenizer, prefix, p["caption"]) for p in pairs]
    return Examples(seqs, list(range(len(pairs))), images), skipped + bad


class CaptionPlan:
    """--stream: a pair -> (ids, loss mask, uint8 image) in a worker. Micro-batch k takes each of its
    rows from the textbook with probability textbook_ratio (drawn from (seed, k, rank)), the rest from
    the stream, and is collated as the preloaded path's (same augmentation generators)."""

    def __init__(self, cfg, tokenizer, n_image_tokens, image_size, textbook):
        self.cfg, self.tokenizer, self.image_size, self.textbook = cfg, tokenizer, image_size, textbook
        self.prefix, self.rank = caption_prefix(cfg, tokenizer, n_image_tokens), dist.rank()

    def _textbook_rows(self, k):
        gen = training.generator_for(self.cfg.seed, 11, k, self.rank)
        is_text = torch.rand(self.cfg.batch_size, generator=gen) < (self.cfg.textbook_ratio if self.textbook else 0)
        which = torch.randint(max(1, len(self.textbook)), (self.cfg.batch_size,), generator=gen)
        return is_text.tolist(), which.tolist()

    def rows(self, k):
        return self.cfg.batch_size - sum(self._textbook_rows(k)[0])

    def sample(self, item):
        image = image_tensor(item["image"], item["source"], self.image_size)  # (3, S, S) uint8
        return caption_seq(self.cfg, self.tokenizer, self.prefix, item["caption"]), image

    def collate(self, samples, k):
        captions, seqs, images = iter(samples), [], []
        is_text, which = self._textbook_rows(k)
        for text_row, j in zip(is_text, which):
            if text_row:
                seqs.append(self.textbook[j])
            else:
                seq, image = next(captions)
                seqs.append(seq)
                images.append(image)
        step, micro = divmod(k, self.cfg.grad_accum)
        gen = training.generator_for(self.cfg.seed, step, micro, self.rank)
        return collate_rows(seqs, torch.stack(images) if images else None, self.tokenizer.pad_id, gen, self.cfg.augment,
                            self.cfg.pack, [not t for t in is_text])


def textbook_examples(cfg, tokenizer, path):
    """Text-only paragraphs -> `<|bos|> text <|eos|>`, loss on every text token."""
    records, skipped = load_records(path, ("text",), skip_bad=cfg.skip_bad_samples, image_key=None)
    seqs = []
    for r in records:
        ids = tokenizer.encode(r["text"])[: cfg.max_seq_len - 2] + [tokenizer.eos_id]
        seqs.append(([tokenizer.bos_id] + ids, [0] + [1] * len(ids)))
    return seqs, skipped


def empty_examples(size):
    return Examples([], [], torch.zeros(0, 3, size, size, dtype=torch.uint8))


def streamed_data(cfg, tokenizer, model, size):
    """--stream: (train Stream, the first validation rows as Examples, bad samples skipped so far)."""
    if "," in cfg.train_file:
        training.fail(f"--train_file {cfg.train_file}: --stream reads a single source; a comma-separated list "
                      f"needs the preloaded path (drop --stream)")
    textbook, bad_text = ([], 0) if not cfg.textbook_file else \
        textbook_examples(cfg, tokenizer, resolve(cfg, cfg.textbook_file))
    n_val = cfg.eval_batches * cfg.batch_size * dist.world_size()  # all that validation_loss reads
    val_set, bad_val = caption_examples(cfg, tokenizer, model.n_image_tokens, [resolve(cfg, cfg.val_file)], size,
                                        n_val) if cfg.val_file else (empty_examples(size), 0)
    source = open_pairs(cfg, resolve(cfg, cfg.train_file))
    plan = CaptionPlan(cfg, tokenizer, model.n_image_tokens, size, textbook)
    train_set = stream.Stream(source, plan, seed=cfg.seed, num_workers=cfg.num_workers, skip_bad=cfg.skip_bad_samples)
    training.print0(f"[pretrain] streaming {source.name} ({cfg.num_workers} workers) + {len(textbook)} textbook "
                    f"examples, {len(val_set)} val; skipped bad samples so far: {bad_text + bad_val}; "
                    f"params: {count_params(model)}")
    return train_set, val_set, bad_text + bad_val


def init_lm(cfg):
    """(the --lm_init LM or None, the tokenizer). A released LM brings its own tokenizer; a nanopatho
    LM must share the tokenizer.json the data is tokenized with."""
    tok_path = cfg.tokenizer or os.path.join(cfg.data, "tokenizer.json")
    if cfg.lm_init and hf_import.is_released(cfg.lm_init):
        if cfg.tokenizer:
            training.fail(f"--tokenizer {cfg.tokenizer}: a released --lm_init uses its own tokenizer.json")
        return hf_import.load_lm(cfg.lm_init)
    tokenizer = Tokenizer.from_file(tok_path)
    if not cfg.lm_init:
        return None, tokenizer
    lm, lm_tokenizer = hf_import.load_lm(cfg.lm_init)
    if lm_tokenizer.vocab_size != tokenizer.vocab_size or lm.config.vocab_size != tokenizer.vocab_size:
        training.fail(f"--lm_init {cfg.lm_init}: its vocabulary ({lm.config.vocab_size} ids) is not the "
                      f"tokenizer's ({tokenizer.vocab_size}); train the base LM with the same tokenizer.json")
    return lm, tokenizer


def build_model(cfg):
    """The VLM and its tokenizer: preset shapes, or those of the --vision_init tower and the --lm_init LM."""
    vit = hf_import.load_vision(cfg.vision_init) if cfg.vision_init else None
    lm, tokenizer = init_lm(cfg)
    mcfg = vlm_config(cfg.preset, tokenizer.vocab_size, tokenizer.image_id)
    mcfg.pixel_shuffle = cfg.pixel_shuffle
    mcfg.pooled_token = cfg.pooled_token
    if vit is not None:
        mcfg.vision = vit.config  # the VLM sees images exactly as the tower was trained
    if lm is not None:
        mcfg.lm = lm.config  # the VLM continues the LM with its exact shape
    if mcfg.vision.grid % cfg.pixel_shuffle:
        training.fail(f"--pixel_shuffle {cfg.pixel_shuffle} does not divide the vision grid {mcfg.vision.grid} "
                      f"(image_size {mcfg.vision.image_size} / patch_size {mcfg.vision.patch_size})")
    model = VLM(mcfg)
    if lm is not None:
        model.lm.load_state_dict(lm.state_dict(), strict=True)
    if vit is not None:
        model.vision.load_state_dict(vit.state_dict(), strict=True)
    if cfg.freeze_vision:
        model.freeze_vision()
    if cfg.freeze_lm:
        model.freeze_lm()
    if cfg.projector_lr:  # the fresh projector may take a larger step than pretrained towers (training.make_optimizer)
        if cfg.lr <= 0:
            training.fail(f"--projector_lr {cfg.projector_lr} needs a positive --lr (it is applied as a multiple of it)")
        for p in model.projector.parameters():
            p.lr_scale = cfg.projector_lr / cfg.lr
    return model, tokenizer


def projector_only_until(align_steps):
    """Alignment phase: drop every gradient but the projector's for the first N steps."""
    def grad_filter(step, model):
        if step < align_steps:
            for name, p in model.named_parameters():
                if not name.startswith("projector."):
                    p.grad = None
    return grad_filter


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = training.setup(cfg.seed, cfg.device)
    model, tokenizer = build_model(cfg)
    size = model.config.vision.image_size
    if cfg.stream:
        if cfg.reading_file:
            training.fail("--reading_file mixes into the preloaded pairs; it does not combine with --stream")
        train_set, val_set, bad = streamed_data(cfg, tokenizer, model, size)
    else:
        train_caps, bad_train = caption_examples(cfg, tokenizer, model.n_image_tokens,
                                                 manifest_paths(cfg.data, cfg.train_file), size)
        use_text = not cfg.freeze_lm  # text-only rows would train nothing but the (frozen) LM
        textbook, bad_text = textbook_examples(cfg, tokenizer, resolve(cfg, cfg.textbook_file)) \
            if cfg.textbook_file and use_text else ([], 0)
        val_set, bad_val = caption_examples(cfg, tokenizer, model.n_image_tokens, [resolve(cfg, cfg.val_file)], size) \
            if cfg.val_file else (empty_examples(size), 0)
        train_set, bad = mix_text(train_caps, textbook, cfg.textbook_ratio), bad_train + bad_text + bad_val
        reading = reading_rows(cfg, tokenizer) if cfg.reading_file and use_text else []
        train_set = mix_text(train_set, reading, cfg.reading_ratio, subsample=True)
        training.print0(f"[pretrain] {len(train_caps)} caption + {len(textbook)} textbook + {len(reading)} reading "
                        f"examples ({len(train_set)} after mixing), {len(val_set)} val; skipped bad samples: {bad}; "
                        f"params: {count_params(model)}")
    model.to(device)
    summary = train(cfg, model, tokenizer, train_set, val_set, to_dict(cfg),
                    grad_filter=projector_only_until(cfg.align_steps) if cfg.align_steps else None, stage="pretrain")
    bad += summary["bad_samples"]
    training.print0(f"[pretrain] done in {summary['seconds']:.0f}s: val loss {summary['final_val_loss']:.3f}, "
                    f"skipped steps {summary['skipped_steps']}, skipped samples {bad} -> {cfg.out_dir}")
    dist.shutdown()


if __name__ == "__main__":
    training.run(main)
