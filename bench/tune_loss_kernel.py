"""Sweep the Triton policy-loss kernel's launch settings on a GPU (issue 18): block width and warps,
forward and backward separately.

One program handles one token row; the settings are how many vocabulary columns it reads per
loop step (BLOCK_V) and how many warps share that row. Few warps per row let more rows run at
once on each multiprocessor; more warps hide the latency of one long row. Each setting is
checked against the torch path (loss and dlogits) before it is timed, with
triton.testing.do_bench (median ms). The kernels are timed alone (policy_loss_per_token): the forward
by itself, the backward as forward + backward with the forward at its best setting; then the whole
fused_policy_loss (input check, aggregation, stats) at the best settings. Liger-Kernel's triton_grpo_loss is timed beside
it when it imports. The winner goes into nanopatho/kernels/policy_loss_triton.py by hand.

    python bench/tune_loss_kernel.py                           # (8,1024,32000) and (4,2048,151936), bf16
    python bench/tune_loss_kernel.py --shapes 8x1024x32000
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_loss import BETA, EPS_HIGH, EPS_LOW, TEMPERATURE, liger_available, make_batch, step_liger  # noqa: E402
from nanopatho.kernels import fused_policy_loss  # noqa: E402

FWD_GRID = [(block, warps) for block in (1024, 2048, 4096) for warps in (1, 2, 4, 8)]
BWD_GRID = [(block, warps) for block in (2048, 4096, 8192) for warps in (4, 8, 16)]


def set_launch(fwd=None, bwd=None):
    from nanopatho.kernels import policy_loss_triton as k
    if fwd:
        k.FWD_MAX_BLOCK_V, k.FWD_WARPS = fwd
    if bwd:
        k.BWD_MAX_BLOCK_V, k.BWD_WARPS = bwd


def loss_of(b, impl):
    loss, _ = fused_policy_loss(b["logits"], b["ids"], b["logp_old"], b["adv"], b["mask"], temperature=TEMPERATURE,
                                eps_low=EPS_LOW, eps_high=EPS_HIGH, logp_ref=b["logp_ref"], beta=BETA, impl=impl)
    return loss


def fwd_bwd(b, impl):
    b["logits"].grad = None
    loss_of(b, impl).backward()


def kernel_fwd(b):
    """The forward kernel alone: no input checks or stats (fused_policy_loss adds those)."""
    from nanopatho.kernels import policy_loss_triton as k
    return k.policy_loss_per_token(b["logits"], b["ids"], b["mask"], b["logp_old"], b["adv"][:, None].expand_as(b["ids"]),
                                   b["logp_ref"], temperature=TEMPERATURE, eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA)


def kernel_fwd_bwd(b):
    b["logits"].grad = None
    kernel_fwd(b)[0].sum().backward()


def agrees(b, ref_loss, ref_grad):
    fwd_bwd(b, "triton")
    loss = loss_of(b, "triton").item()
    gerr = ((b["logits"].grad.float() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    return abs(loss - ref_loss) / abs(ref_loss) < 1e-3 and gerr < 2e-2


def sweep(shape):
    from triton.testing import do_bench
    B, L, V = shape
    b = make_batch(B, L, V, torch.bfloat16, "cuda")
    fwd_bwd(b, "torch")
    ref_loss, ref_grad = loss_of(b, "torch").item(), b["logits"].grad.float().clone()
    print(f"\n(B,L,V) = {shape}, bf16 logits: {b['logits'].numel() * 2 / 2**20:.0f} MiB")
    best_fwd, best_ms = None, float("inf")
    for cfg in FWD_GRID:
        set_launch(fwd=cfg)
        ok = agrees(b, ref_loss, ref_grad)
        with torch.no_grad():
            ms = do_bench(lambda: kernel_fwd(b))
        print(f"  forward  block {cfg[0]:5d} warps {cfg[1]:2d}: {ms:7.3f} ms {'ok' if ok else 'WRONG'}")
        if ok and ms < best_ms:
            best_fwd, best_ms = cfg, ms
    set_launch(fwd=best_fwd)
    best_bwd, best_total = None, float("inf")
    for cfg in BWD_GRID:
        set_launch(bwd=cfg)
        ok = agrees(b, ref_loss, ref_grad)
        ms = do_bench(lambda: kernel_fwd_bwd(b))
        print(f"  fwd+bwd  block {cfg[0]:5d} warps {cfg[1]:2d}: {ms:7.3f} ms {'ok' if ok else 'WRONG'}")
        if ok and ms < best_total:
            best_bwd, best_total = cfg, ms
    print(f"  best: forward {best_fwd} {best_ms:.3f} ms, backward {best_bwd}, fwd+bwd {best_total:.3f} ms (kernels alone)")
    set_launch(bwd=best_bwd)
    ms = do_bench(lambda: fwd_bwd(b, "triton"))
    print(f"  fused_policy_loss fwd+bwd at the best settings (input check, aggregation, stats): {ms:.3f} ms")
    if liger_available():
        bl = make_batch(B, L, V, torch.bfloat16, "cuda", extra_row=True)

        def liger_step():
            bl["logits"].grad = None
            step_liger(bl)
        ms = do_bench(liger_step)
        print(f"  liger fwd+bwd: {ms:.3f} ms")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8x1024x32000,4x2048x151936", help="comma-separated BxLxV")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_loss_kernel.py needs a CUDA device (the kernel's launch settings only matter there)")
    for s in args.shapes.split(","):
        sweep(tuple(int(x) for x in s.split("x")))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
