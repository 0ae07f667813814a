"""Zero-shot classification of pathology images with a trained PathoCLIP checkpoint.

    python -m nanopatho.classify --ckpt out/clip --image tile.png                       # prompts of the training data
    python -m nanopatho.classify --ckpt out/clip --image tile.png --prompts data/synthpath/zeroshot_prompts.json
    python -m nanopatho.classify --ckpt out/clip --image tile.png --classes "adipose tissue,mucus,tumour epithelium"
    python -m nanopatho.classify --ckpt out/clip --image tiles/ --top_k 3 --out preds.csv   # a folder

Each class is one unit vector w_c, the mean of the encoded prompts "template x class synonym"
(evaluate.build_zeroshot_classifier, the classifier `nanopatho.evaluate` scores). An image
feature f (L2-normalised) gets the class probabilities CLIP's contrastive loss trains:

    p(c | image) = softmax_c( exp(logit_scale) * cos(f, w_c) )

--prompts takes a CONCH-format file {"0": {"classnames": {label: [synonyms]}, "templates": [..CLASSNAME..]}};
--classes "a,b,c" uses the class names with DEFAULT_TEMPLATES; with neither, the checkpoint's
training data directory (run config "data") must hold zeroshot_prompts.json.
One image prints its top-k list; several (files or a folder) print a table, and --out writes
a CSV with every class probability. Bad input prints one line "error: ..." and exits with status 1.
"""

import argparse
import csv
import json
import os

import torch

from nanopatho.data import DataError, to_float
from nanopatho.evaluate import build_zeroshot_classifier, encode_texts
from nanopatho.generate import (CLIError, autocast, check_device, default_device, image_paths, load_images,
                                load_model, run_cli)

DEFAULT_TEMPLATES = (
    "CLASSNAME.",
    "an image of CLASSNAME.",
    "an H&E image of CLASSNAME.",
    "an H&E stained image of CLASSNAME.",
    "a histopathology image of CLASSNAME.",
    "a photomicrograph of CLASSNAME.",
)


def read_prompts(path):
    """A CONCH-format prompt file, checked: {"classnames": {label: [synonym, ...]}, "templates": [...]}."""
    try:
        with open(path) as f:
            prompts = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: prompt file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}:{getattr(e, 'lineno', 0)}: not valid JSON") from None
    entry = prompts.get("0", prompts) if isinstance(prompts, dict) else None
    ok = (isinstance(entry, dict) and isinstance(entry.get("classnames"), dict) and entry["classnames"]
          and all(isinstance(s, list) and s for s in entry["classnames"].values())
          and isinstance(entry.get("templates"), list) and entry["templates"]
          and all(isinstance(t, str) and "CLASSNAME" in t for t in entry["templates"]))
    if not ok:
        raise DataError(f"{path}: expected {{\"classnames\": {{label: [synonyms]}}, \"templates\": "
                        f"[\"... CLASSNAME ...\"]}} (optionally under key \"0\")")
    return entry


def class_prompts(args, run_config):
    """The prompt dict from --classes, --prompts, or the training data's zeroshot_prompts.json."""
    if args.classes is not None:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        if len(names) < 2 or len(set(names)) != len(names):
            raise CLIError(f"--classes needs at least two distinct comma-separated names, got {names}")
        return {"classnames": {c: [c] for c in names}, "templates": list(DEFAULT_TEMPLATES)}
    if args.prompts is not None:
        return read_prompts(args.prompts)
    data = run_config.get("data")
    default = os.path.join(data or "", "zeroshot_prompts.json")
    if data and os.path.isfile(default):
        return read_prompts(default)
    why = f"{default} not found" if data else "the checkpoint names no training data directory"
    raise CLIError(f"no classes: give --prompts FILE.json or --classes \"a,b,c\" ({why})")


@torch.no_grad()
def class_probabilities(model, class_weights, images_u8, device, batch_size):
    """p = softmax(exp(logit_scale) * f W^T) for every image: (N, C)."""
    probs = []
    W = class_weights.to(device)  # (C, D)
    for i in range(0, len(images_u8), batch_size):
        pixels = to_float(images_u8[i:i + batch_size]).to(device)  # (B, 3, S, S)
        with autocast(device):
            feats = model.encode_image(pixels).float()  # (B, D) unit norm
        logits = model.logit_scale.exp().float() * feats @ W.T  # (B, C) scaled cosines
        probs.append(logits.softmax(dim=-1).cpu())
    return torch.cat(probs)  # (N, C)


def print_top_k(paths, class_names, probs, k):
    """One image: a ranked list. Several: one row per image with its top-k classes."""
    top_p, top_i = probs.topk(k, dim=-1)  # (N, k)
    if len(paths) == 1:
        print(paths[0])
        w = max(len(class_names[i]) for i in top_i[0].tolist())
        for rank, (p, i) in enumerate(zip(top_p[0].tolist(), top_i[0].tolist()), 1):
            print(f"  {rank}. {class_names[i]:<{w}}  {p:.4f}")
        return
    rows = [["image", *(f"top{r} (p)" for r in range(1, k + 1))]]
    for path, ps, idx in zip(paths, top_p.tolist(), top_i.tolist()):
        rows.append([os.path.basename(path), *(f"{class_names[i]} ({p:.4f})" for p, i in zip(ps, idx))])
    widths = [max(len(row[j]) for row in rows) for j in range(k + 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def write_csv(path, paths, class_names, probs):
    """image, prediction, its probability, then one probability column per class."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "prediction", "probability", *class_names])
        for p, row in zip(paths, probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            w.writerow([p, class_names[best], f"{row[best]:.6f}", *(f"{x:.6f}" for x in row)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="PathoCLIP zero-shot classification of pathology images.")
    p.add_argument("--ckpt", required=True, help="PathoCLIP checkpoint directory (train_clip.py output)")
    p.add_argument("--image", required=True, nargs="+", help="image file(s) or folder(s); any mode and size")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompts", default=None, help="CONCH-format zeroshot_prompts.json")
    group.add_argument("--classes", default=None, help='comma-separated class names: "adipose,mucus,tumour"')
    p.add_argument("--top_k", type=int, default=3, help="classes shown per image")
    p.add_argument("--out", default=None, help="write every class probability of every image to this CSV")
    p.add_argument("--batch_size", type=int, default=64, help="images (and prompts) per forward pass")
    p.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1, mps")
    args = p.parse_args(argv)
    check_device(p, args.device)
    if args.top_k < 1 or args.batch_size < 1:
        p.error("--top_k and --batch_size must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    paths = image_paths(args.image)
    model, config, tokenizer = load_model(args.ckpt, args.device, "clip")
    prompts = class_prompts(args, config.get("run", {}))
    images_u8 = load_images(paths, model.config.vision.image_size)  # (N, 3, S, S)
    class_names, W = build_zeroshot_classifier(
        lambda texts: encode_texts(model, tokenizer, texts, args.batch_size, args.device), prompts)  # (C, D)
    probs = class_probabilities(model, W, images_u8, args.device, args.batch_size)  # (N, C)
    print_top_k(paths, class_names, probs, min(args.top_k, len(class_names)))
    if args.out:
        write_csv(args.out, paths, class_names, probs)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
