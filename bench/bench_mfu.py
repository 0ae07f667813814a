"""MFU: model FLOPs per second of a VLM pretrain step over the machine's matmul peak, both measured here.

Model FLOPs of one training step (forward + backward), PaLM appendix B / nanoGPT's estimate_mfu:
    6 * N * tokens                 every matmul weight (Linear and the patch-embedding conv) times the
                                   rows that pass through it: ViT on patches, projector on image tokens,
                                   LM on all B*T positions incl. lm_head; embeddings lookups, norms and
                                   biases are not counted
  + 12 * n_layer * C * T per token attention scores and values (QK^T, AV), forward + backward, counted
                                   in full although the LM's mask is causal (PaLM's convention), for the
                                   LM (T = sequence) and the ViT (T = patches per image)
Peak: the best of several large square torch.matmul calls, fp32 on the CPU (2 n^3 FLOPs each),
bf16 on a GPU, under the same thread count. MFU = model FLOP/s / peak FLOP/s.

    python bench/bench_mfu.py                        # CPU: toy VLM, batch 16 x 160, fp32
    python bench/bench_mfu.py --device cuda          # GPU: small VLM, batch 32 x 512, bf16 autocast + torch.compile
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.peers import median  # noqa: E402
from nanopatho.presets import vlm_config  # noqa: E402
from nanopatho.vlm import VLM  # noqa: E402

VOCAB, IMAGE_ID = 4096, 3


def matmul_peak(device, dtype, n, reps=5):
    """Best FLOP/s of an (n, n) @ (n, n) matmul: 2 n^3 FLOPs per call."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps + 1):  # the first call warms up
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_matmul_flops(model, *inputs):
    """6 * sum over matmul weights of (weight numel x rows through it), from one hooked forward."""
    total = [0]

    def hook(m, args, out):
        rows = out.numel() // m.weight.shape[0]  # Linear: B*T rows; Conv2d: B*gh*gw positions
        total[0] += 6 * m.weight.numel() * rows

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return total[0]


def attention_flops(cfg, batch, seq):
    """12 * L * C * T per token, for the LM over (batch, seq) and the ViT over batch images."""
    v, lm = cfg.vision, cfg.lm
    patches = v.grid ** 2
    return 12 * lm.n_layer * lm.n_embd * seq * batch * seq + 12 * v.n_layer * v.n_embd * patches * batch * patches


def make_batch(model, batch, seq, device):
    """One image per row at the start, then random caption tokens; targets = next token."""
    cfg, n_img = model.config, model.n_image_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(IMAGE_ID + 1, VOCAB, (batch, seq + 1), generator=g)
    ids[:, :n_img] = IMAGE_ID
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].contiguous().to(device), pixels.to(device)


def run(device="cpu", batch=None, seq=None, warmup=2, reps=5):
    device = torch.device(device)
    gpu = device.type == "cuda"
    preset = "small" if gpu else "toy"
    batch, seq = batch or (32 if gpu else 16), seq or (512 if gpu else 160)
    torch.manual_seed(0)
    model = VLM(vlm_config(preset, VOCAB, IMAGE_ID)).to(device).train()
    x, y, pixels = make_batch(model, batch, seq, device)
    flops = count_matmul_flops(model, x, pixels) + attention_flops(model.config, batch, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    step_model = torch.compile(model) if gpu else model
    dtype = torch.bfloat16 if gpu else torch.float32

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            _, loss = step_model(x, pixels, targets=y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    peaks = []
    for _ in range(reps):  # interleave the model step with the peak probe, so both see the same machine state
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        peaks.append(matmul_peak(device, dtype, 8192 if gpu else 2048, reps=2))
    achieved, peak = flops / median(times), max(peaks)
    mode = "bf16 autocast + torch.compile" if gpu else "fp32 eager"
    return [dict(benchmark=f"MFU, VLM pretrain step ({preset}, B={batch}, T={seq}, {mode})",
                 nanopatho=achieved / peak, peer=None, peer_name=None, target=None,
                 note=f"{achieved / 1e9:.1f} GFLOP/s model / {peak / 1e9:.1f} GFLOP/s {dtype} matmul peak; "
                      f"{flops / 1e9:.1f} GFLOP per step (6N*tokens + 12*L*C*T*tokens)",
                 model_flops_per_s=achieved, peak_flops_per_s=peak, flops_per_step=flops, times=times)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for r in run(args.device, args.batch, args.seq):
        print(f"{r['benchmark']}: MFU {100 * r['nanopatho']:.1f}%  [{r['note']}]")


if __name__ == "__main__":
    main()
