"""PathoCLIP training step (forward + symmetric InfoNCE + backward + AdamW), images/s, vs open_clip.

The peer is open_clip's CLIP built from a custom model config with the same tower sizes as the
toy preset (ViT 64px / patch 8, 4 x 128, 4 heads, mean-pooled; text 3 x 128, 4 heads, context 64,
vocab 4096, pooled at the last token; embed dim 128), random init, trained with open_clip.ClipLoss.
Repetitions alternate A B A B after warm-up; the figure is B / median step time. When open_clip
does not import (it needs a torchvision built for the installed torch), only nanopatho is timed
and the row says why.

    python bench/bench_clip.py
    python bench/bench_clip.py --batch 64
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.peers import interleaved, median  # noqa: E402
from nanopatho.clip import PathoCLIP, clip_loss  # noqa: E402
from nanopatho.presets import clip_config  # noqa: E402

TARGET = 1.1  # issue 10: nanopatho >= 1.1x the images/s of open_clip


def open_clip_peer(cfg):
    """open_clip CLIP with PathoCLIP cfg's tower sizes, and its loss; raises ImportError when unavailable."""
    import open_clip

    v, t = cfg.vision, cfg.text
    vision_cfg = dict(image_size=v.image_size, patch_size=v.patch_size, layers=v.n_layer, width=v.n_embd,
                      head_width=v.n_embd // v.n_head, mlp_ratio=v.mlp_ratio, pool_type="avg")
    text_cfg = dict(context_length=t.max_len, vocab_size=t.vocab_size, width=t.n_embd, heads=t.n_head,
                    layers=t.n_layer, pool_type="last")
    return open_clip.CLIP(cfg.embed_dim, vision_cfg, text_cfg), open_clip.ClipLoss()


def step_fn(model, opt, loss_of):
    def run():
        opt.zero_grad(set_to_none=True)
        loss_of().backward()
        opt.step()
    return run


def run(batch=128, warmup=2, reps=5, vocab_size=4096):
    torch.manual_seed(0)
    cfg = clip_config("toy", vocab_size)
    ours = PathoCLIP(cfg).train()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)  # (B, 3, H, W)
    ids = torch.randint(1, vocab_size, (batch, cfg.text.max_len), generator=g)  # (B, T) full-length captions
    mask = torch.ones_like(ids)
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-4)

    def ours_step():
        step_fn(ours, opt_a, lambda: clip_loss(*ours(pixels, ids, mask)))()
        ours.clamp_logit_scale()

    fns = {"nanopatho": ours_step}
    try:
        peer, peer_loss = open_clip_peer(cfg)
        opt_b = torch.optim.AdamW(peer.train().parameters(), lr=1e-4)
        fns["peer"] = step_fn(peer, opt_b, lambda: peer_loss(*peer(pixels, ids)))
        note = f"median of {reps}"
    except Exception as e:  # open_clip missing, or its torchvision import failing against this torch
        note = f"open_clip unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    times = interleaved(fns, warmup=warmup, reps=reps)
    return [dict(benchmark=f"PathoCLIP train step, images/s (toy, B={batch})",
                 nanopatho=batch / median(times["nanopatho"]),
                 peer=batch / median(times["peer"]) if "peer" in times else None,
                 peer_name="open_clip CLIP", target=TARGET, note=note, times=times)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for r in run(args.batch, reps=args.reps):
        peer = "n/a" if r["peer"] is None else f"{r['peer']:.0f}"
        print(f"{r['benchmark']}: nanopatho {r['nanopatho']:.0f}  open_clip {peer}  [{r['note']}]")


if __name__ == "__main__":
    main()
