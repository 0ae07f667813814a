"""Stage 1 of Patho-R1: continued pretraining (knowledge infusion) of the VLM.

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
    python train_pretrain.py --preset small --lm_init Qwen2.5-0.5B --vision_init clip-vit-base-patch16 \
        --freeze_vision --align_steps 500 --lr 2e-5
    python train_pretrain.py --help
"""

import dataclasses
import os

import torch

from nanopatho import dist, hf_import, training
from nanopatho.config import field, parse_config, to_dict
from nanopatho.data import load_pairs, load_records, preload_images
from nanopatho.next_token import Examples, TrainConfig, train
from nanopatho.presets import count_params, vlm_config
from nanopatho.tokenizer import Tokenizer
from nanopatho.vlm import VLM


@dataclasses.dataclass
class Config(TrainConfig):
    out_dir: str = field("out/pretrain", "where checkpoints, metrics.jsonl and the final model go")
    train_file: str = field("captions_train.jsonl", "image-caption pairs: JSONL, CSV/TSV, or WebDataset .tar (relative to --data)")
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
    align_steps: int = field(0, "train only the projector for the first N steps")
    projector_lr: float = field(0.0, "peak learning rate of the projector (LLaVA's mm_projector_lr; 0 = --lr)")
    csv_img_key: str = field("filepath", "CSV column holding the image path")
    csv_caption_key: str = field("title", "CSV column holding the caption")
    csv_sep: str = field(",", "CSV separator")


PRESETS = {
    "toy": dict(max_steps=600, batch_size=16, lr=1e-3, warmup_steps=20, max_seq_len=160),
    "small": dict(max_steps=5000, batch_size=32, lr=3e-4, warmup_steps=200, max_seq_len=512, num_threads=0),
    "base": dict(max_steps=20000, batch_size=16, grad_accum=4, lr=1e-4, warmup_steps=500, max_seq_len=1024),
}


def resolve(cfg, name):
    return name if not name or os.path.isabs(name) else os.path.join(cfg.data, name)


def caption_examples(cfg, tokenizer, n_image_tokens, path, image_size):
    """Pairs -> Examples: `<|bos|> <image>*n caption <|eos|>`, loss on caption + eos."""
    pairs, skipped = load_pairs(path, skip_bad=cfg.skip_bad_samples, allow_outside_root=cfg.allow_outside_root,
                                csv_img_key=cfg.csv_img_key, csv_caption_key=cfg.csv_caption_key, csv_sep=cfg.csv_sep)
    images, pairs, bad = preload_images(pairs, image_size, skip_bad=cfg.skip_bad_samples, desc=os.path.basename(path))
    prefix = [tokenizer.bos_id] + [tokenizer.image_id] * n_image_tokens
    if cfg.max_seq_len < len(prefix) + 2:  # room for at least one caption token and <|eos|>
        training.fail(f"--max_seq_len {cfg.max_seq_len} is too small: <|bos|> and the image take {len(prefix)} "
                      f"tokens, so captions need at least {len(prefix) + 2}")
    seqs = []
    for p in pairs:
        text = tokenizer.encode(p["caption"])[: cfg.max_seq_len - len(prefix) - 1] + [tokenizer.eos_id]
        seqs.append((prefix + text, [0] * len(prefix) + [1] * len(text)))
    return Examples(seqs, list(range(len(pairs))), images), skipped + bad


def textbook_examples(cfg, tokenizer, path):
    """Text-only paragraphs -> `<|bos|> text <|eos|>`, loss on every text token."""
    records, skipped = load_records(path, ("text",), skip_bad=cfg.skip_bad_samples, image_key=None)
    seqs = []
    for r in records:
        ids = tokenizer.encode(r["text"])[: cfg.max_seq_len - 2] + [tokenizer.eos_id]
        seqs.append(([tokenizer.bos_id] + ids, [0] + [1] * len(ids)))
    return seqs, skipped


def mix(captions, textbook, ratio):
    """Repeat the textbook rows so they are about `ratio` of the combined examples."""
    if not textbook or ratio <= 0:
        return captions
    repeats = max(1, round(ratio * len(captions) / ((1 - ratio) * len(textbook))))
    seqs = captions.seqs + textbook * repeats
    image_index = captions.image_index + [-1] * (len(textbook) * repeats)
    return Examples(seqs, image_index, captions.images)


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
    train_caps, bad_train = caption_examples(cfg, tokenizer, model.n_image_tokens, resolve(cfg, cfg.train_file), size)
    use_textbook = cfg.textbook_file and not cfg.freeze_lm  # text-only rows would train nothing but the LM
    textbook, bad_text = textbook_examples(cfg, tokenizer, resolve(cfg, cfg.textbook_file)) if use_textbook else ([], 0)
    val_set, bad_val = caption_examples(cfg, tokenizer, model.n_image_tokens, resolve(cfg, cfg.val_file), size) \
        if cfg.val_file else (Examples([], [], torch.zeros(0, 3, size, size, dtype=torch.uint8)), 0)
    train_set = mix(train_caps, textbook, cfg.textbook_ratio)
    training.print0(f"[pretrain] {len(train_caps)} caption + {len(textbook)} textbook examples "
                    f"({len(train_set)} after mixing), {len(val_set)} val; skipped bad samples: "
                    f"{bad_train + bad_text + bad_val}; params: {count_params(model)}")
    model.to(device)
    summary = train(cfg, model, tokenizer, train_set, val_set, to_dict(cfg),
                    grad_filter=projector_only_until(cfg.align_steps) if cfg.align_steps else None, stage="pretrain")
    training.print0(f"[pretrain] done in {summary['seconds']:.0f}s: val loss {summary['final_val_loss']:.3f}, "
                    f"skipped steps {summary['skipped_steps']}, skipped samples {bad_train + bad_text + bad_val} "
                    f"-> {cfg.out_dir}")
    dist.shutdown()


if __name__ == "__main__":
    training.run(main)
