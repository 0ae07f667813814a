"""Can the toy vision tower see a tumour attribute in SynthPath's pixels at all?

The MCQ types other than the tissue (mitoses, grade, gland formation, pleomorphism) ask about
details of a 64-pixel tumour tile. Before blaming SFT or RL for near-chance answers, ask the
pixels: train the ViT with one linear head per attribute on the mean-pooled tokens, supervised
directly on the world's own labels (the strongest signal any stage could give it), on fresh
tiles from world.render, and score held-out tiles against the majority class. An attribute the
supervised ViT cannot learn here is beyond what captions, chains or rewards can teach it.

    python -m data.synthpath.perception                           # scratch ViT, toy size, ~3 min on 2 cores
    python -m data.synthpath.perception --init out/seed0/clip     # start from a PathoCLIP checkpoint's ViT
    python -m data.synthpath.perception --size 96 --steps 900     # would a larger tile help?
    python -m data.synthpath.perception --init out/seed0/sft --frozen   # is it already in a trained tower's features?
    python -m data.synthpath.perception --n_train 4000 --steps 1500 --out_dir out/base_vision   # the speedrun's stage 0v

--frozen fits only the linear heads (L-BFGS logistic regression on the standardised pooled features) and
leaves the tower as the checkpoint has it (a PathoCLIP or a VLM directory): it asks whether an earlier stage
already put the attribute into the features, which is what stage 1, SFT and RL build on. It also probes necrosis
and mucin, which the grade MCQ and the findings captions name but no head is trained on. What the language model
then says about the same tiles: data.synthpath.readout.

--out_dir keeps the supervised tower as a ViT checkpoint (+ eval.json with its held-out curve): the toy's stand-in
for the pretrained vision tower every real VLM starts from (train_clip.py --vision_init DIR). The speedrun trains it
once and every seed's PathoCLIP starts from it, as stage 0's base LM is shared (session notes of issue 15: contrastive
training on 1,120 tumour images does not teach a random tower the count or pleomorphism, direct labels do).

Tiles: --n_train from seed 100 and --n_test (600) held-out ones from seed 200 (disjoint draws), each the
generator's tumour class with attributes from world.sample_attributes. AdamW, batch 64; the
held-out accuracy of each head is printed every --eval_every steps.
"""

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.synthpath import world
from nanopatho.data import to_float
from nanopatho.presets import clip_config
from nanopatho.vit import ViT

ATTRIBUTES = {"mitoses": tuple(range(world.MAX_MITOSES + 1)), "pleomorphism": world.PLEO,
              "gland_formation": world.GLANDS, "grade": ("low", "high")}  # the supervised heads
PROBED = {**ATTRIBUTES, "necrosis": (False, True), "mucin": (False, True)}  # + findings only the --frozen probe reads


def tumour_draws(seed, n, size):
    """n fresh tumour tiles from world seed `seed`: uint8 (n, size, size, 3) and each tile's attributes dict."""
    rng = np.random.default_rng(seed)
    images, attrs = [], []
    for _ in range(n):
        attrs.append(world.sample_attributes(rng, "TUM"))
        images.append(world.render(rng, "TUM", attrs[-1], size))  # (size, size, 3) uint8
    return np.stack(images), attrs


def tumour_tiles(seed, n, size):
    """n tumour tiles (n, 3, size, size), normalised as every stage feeds its tower (data.to_float), and their
    labels {attribute of PROBED: (n,) class index}."""
    images, attrs = tumour_draws(seed, n, size)
    labels = {a: torch.tensor([classes.index(t[a]) for t in attrs]) for a, classes in PROBED.items()}
    return to_float(torch.from_numpy(images).permute(0, 3, 1, 2)), labels  # (n, 3, S, S)


def heads_for(n_embd):
    return nn.ModuleDict({a: nn.Linear(n_embd, len(c)) for a, c in ATTRIBUTES.items()})


@torch.no_grad()
def pooled_features(vit, x, batch=200):
    """Mean-pooled tower features (n, C) in eval mode."""
    vit.eval()
    return torch.cat([vit(x[i:i + batch])[1] for i in range(0, len(x), batch)])  # (n, C)


def held_out_accuracy(vit, heads, x, y):
    pooled = pooled_features(vit, x)  # (n, C)
    vit.train()
    with torch.no_grad():
        return {a: (heads[a](pooled).argmax(1) == y[a]).float().mean().item() for a in ATTRIBUTES}


def linear_probe(vit, x, y, x_test, y_test, weight_decay=2e-3):
    """Held-out accuracy {attribute: acc} of a logistic regression per attribute on the frozen pooled features."""
    from nanopatho.evaluate import fit_logistic_regression

    f, f_test = pooled_features(vit, x), pooled_features(vit, x_test)  # (n, C), (m, C)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    f, f_test = (f - mu) / sd, (f_test - mu) / sd
    acc = {}
    for a, classes in PROBED.items():
        W, b = fit_logistic_regression(f, y[a], len(classes), weight_decay, max_iter=300)  # (C, K), (K,)
        acc[a] = ((f_test.double() @ W + b).argmax(1) == y_test[a]).float().mean().item()
    return acc


def majority(y):
    return {a: np.bincount(v.numpy()).max() / len(v) for a, v in y.items()}


def train(vit, x, y, x_test, y_test, *, steps, lr, batch=64, eval_every=150, seed=0, log=print):
    """Supervise vit + linear heads on every attribute at once; returns [(step, {attribute: accuracy})]."""
    heads = heads_for(vit.config.n_embd)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=g)  # (batch,)
        _, pooled = vit(x[idx])  # (batch, C)
        loss = sum(F.cross_entropy(heads[a](pooled), y[a][idx]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, held_out_accuracy(vit, heads, x_test, y_test)))
            log(f"step {step:5d}  loss {loss.item():.3f}  " + "  ".join(f"{a} {v:.3f}" for a, v in curve[-1][1].items()))
    return curve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="tile size in pixels (the toy preset's is 64)")
    p.add_argument("--init", default=None, help="a PathoCLIP or VLM checkpoint directory whose ViT to start from")
    p.add_argument("--frozen", action="store_true", help="fit linear heads only, on the frozen tower's features")
    p.add_argument("--n_train", type=int, default=3000, help="training tiles")
    p.add_argument("--n_test", type=int, default=600, help="held-out tiles (from another seed)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of batch 64 (ignored with --frozen)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 from scratch, 3e-4 from --init")
    p.add_argument("--eval_every", type=int, default=150, help="held-out accuracy every N steps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out_dir", default=None, help="save the trained tower there as a ViT checkpoint, with eval.json")
    p.add_argument("--out", default=None, help="--frozen: also write the held-out accuracies to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    x, y = tumour_tiles(100, args.n_train, args.size)
    x_test, y_test = tumour_tiles(200, args.n_test, args.size)
    print(f"{args.n_train} + {args.n_test} tumour tiles at {args.size} px in {time.time() - t0:.0f}s; held-out majority class: "
          + "  ".join(f"{a} {v:.3f}" for a, v in majority(y_test).items()))
    if args.init:
        from nanopatho.checkpoint import load
        model = load(args.init, "cpu")[0]
        vit = model.visual.vit if hasattr(model, "visual") else getattr(model, "vision", model)  # CLIP, VLM or ViT
    else:
        vit = ViT(dataclasses.replace(clip_config("toy", 8).vision, image_size=args.size))  # the toy tower
    if args.frozen:
        acc = linear_probe(vit, x, y, x_test, y_test)
        print("frozen features, held-out accuracy: " + "  ".join(f"{a} {v:.3f}" for a, v in acc.items()))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"tower": args.init, "frozen": acc, "majority": majority(y_test), "n_train": args.n_train,
                           "n_test": args.n_test}, f, indent=2)
    else:
        curve = train(vit, x, y, x_test, y_test, steps=args.steps, lr=args.lr or (3e-4 if args.init else 1e-3),
                      eval_every=args.eval_every)
        if args.out_dir:
            save(args.out_dir, vit, vars(args), curve, majority(y_test))
            print(f"[base_vision] done in {time.time() - t0:.0f}s: held-out " +
                  "  ".join(f"{a} {v:.3f}" for a, v in curve[-1][1].items()) + f" -> {args.out_dir}")
            return
    print(f"done in {time.time() - t0:.0f}s")


def save(out_dir, vit, run_config, curve, majority_acc):
    """out_dir/{config.json, model.safetensors} (a 'vit' checkpoint) and eval.json: the held-out accuracy curve."""
    from nanopatho.checkpoint import save_model

    save_model(out_dir, vit, None, run_config)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump({"model_type": "vit", "held_out_tiles": run_config["n_test"], "majority": majority_acc,
                   "curve": [{"step": s, **acc} for s, acc in curve]}, f, indent=2)


if __name__ == "__main__":
    main()
