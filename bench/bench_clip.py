"""PathoCLIP training step (forward + symmetric InfoNCE + backward + AdamW), images/s, vs two peers.

Peers, each built from the toy preset's tower sizes (ViT 64px / patch 8, 4 x 128, 4 heads, MLP
512; text 3 x 128, 4 heads, context 64, vocab 4096; embed dim 128), random init:
  transformers `CLIPModel` (SDPA attention, exact GELU as PathoCLIP), loss from return_loss=True;
    its vision tower adds a class token (65 tokens per image vs 64) and a pre-LayerNorm, as CLIP does;
  open_clip `CLIP` (mean-pooled image tower, text pooled at the last token), trained with
    open_clip.ClipLoss. open_clip needs a torchvision built for the installed torch (see
    bench/README.md for the separate venv); when it does not import its row says why.
Every step sees the same batch (B images, B full-length captions). Repetitions alternate
nanopatho and the peers after warm-up; the figure is B / median step time.

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

TARGET = 1.1  # issue 10: nanopatho >= 1.1x the images/s of each peer


def open_clip_peer(cfg):
    """open_clip CLIP with PathoCLIP cfg's tower sizes, and its loss; raises ImportError when unavailable."""
    import open_clip

    v, t = cfg.vision, cfg.text
    vision_cfg = dict(image_size=v.image_size, patch_size=v.patch_size, layers=v.n_layer, width=v.n_embd,
                      head_width=v.n_embd // v.n_head, mlp_ratio=v.mlp_ratio, pool_type="avg")
    text_cfg = dict(context_length=t.max_len, vocab_size=t.vocab_size, width=t.n_embd, heads=t.n_head,
                    layers=t.n_layer, pool_type="last")
    return open_clip.CLIP(cfg.embed_dim, vision_cfg, text_cfg), open_clip.ClipLoss()


def hf_clip_peer(cfg):
    """transformers CLIPModel with PathoCLIP cfg's tower sizes; raises ImportError without transformers."""
    from transformers import CLIPConfig, CLIPModel

    v, t = cfg.vision, cfg.text
    text = dict(vocab_size=t.vocab_size, hidden_size=t.n_embd, intermediate_size=4 * t.n_embd, num_hidden_layers=t.n_layer,
                num_attention_heads=t.n_head, max_position_embeddings=t.max_len, hidden_act="gelu",
                pad_token_id=0, bos_token_id=1, eos_token_id=2)  # ids inside the vocabulary (its defaults are not)
    vision = dict(hidden_size=v.n_embd, intermediate_size=int(v.mlp_ratio * v.n_embd), num_hidden_layers=v.n_layer,
                  num_attention_heads=v.n_head, image_size=v.image_size, patch_size=v.patch_size, hidden_act="gelu")
    hf_cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)
    hf_cfg._attn_implementation = "sdpa"
    return CLIPModel(hf_cfg)


def step_fn(model, opt, loss_of):
    def run():
        opt.zero_grad(set_to_none=True)
        loss_of().backward()
        opt.step()
    return run


def peer_steps(cfg, pixels, ids, mask):
    """{peer name: step function} for every peer that builds here, and {peer name: why not} for the others."""
    steps, missing = {}, {}
    try:
        hf = hf_clip_peer(cfg).train()
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
        steps["transformers CLIPModel"] = step_fn(
            hf, opt, lambda: hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True).loss)
    except Exception as e:  # transformers missing
        missing["transformers CLIPModel"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    try:
        oc, oc_loss = open_clip_peer(cfg)
        opt = torch.optim.AdamW(oc.train().parameters(), lr=1e-4)
        steps["open_clip CLIP"] = step_fn(oc, opt, lambda: oc_loss(*oc(pixels, ids)))
    except Exception as e:  # open_clip missing, or its torchvision import failing against this torch
        missing["open_clip CLIP"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return steps, missing


def run(batch=128, warmup=2, reps=5, vocab_size=4096, clock="wall"):
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

    peers, missing = peer_steps(cfg, pixels, ids, mask)
    times = interleaved({"nanopatho": ours_step, **peers}, warmup=warmup, reps=reps, clock=clock)
    ours_ips = batch / median(times["nanopatho"])
    rows = []
    for name in ("transformers CLIPModel", "open_clip CLIP"):
        rows.append(dict(benchmark=f"PathoCLIP train step, images/s (toy, B={batch}) vs {name.split()[0]}",
                         nanopatho=ours_ips, peer=batch / median(times[name]) if name in times else None,
                         peer_name=name, target=TARGET,
                         note=f"median of {reps}" if name in times else f"{name.split()[0]} unavailable: {missing[name]}",
                         times={k: times[k] for k in ("nanopatho", name) if k in times}))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="wall time or this thread's CPU time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for r in run(args.batch, reps=args.reps, clock=args.clock):
        peer = "n/a" if r["peer"] is None else f"{r['peer']:.0f}  ratio {r['nanopatho'] / r['peer']:.2f}x"
        print(f"{r['benchmark']}: nanopatho {r['nanopatho']:.0f}  {r['peer_name']} {peer}  [{r['note']}]")


if __name__ == "__main__":
    main()
