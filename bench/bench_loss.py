"""Benchmark the GRPO/DAPO token-level clipped loss from logits, forward + backward.

Compares, on the same random batch (logits (B, L, V), sampled ids, old / ref log-probs,
advantages, a mask with ~10% padding):
  naive    full fp32 log_softmax(logits / T) + gather, then rl.policy_loss (what TRL does)
  chunked  nanopatho's torch path: rl.token_logprobs_torch in row chunks + rl.policy_loss
  triton   nanopatho's fused Triton kernel (CUDA only)
  liger    Liger-Kernel's triton_grpo_loss (CUDA only, when liger_kernel imports; inplace=False,
           so every method returns a fresh dlogits; its logits carry the extra (L+1)-th row it expects)

Time: mean wall time of one forward + backward (ms) after warm-up.
Memory, "peak extra": the peak above what was live just before the step (inputs, whose
logits dominate); it includes the dlogits gradient every method must return.
  CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step (exact allocator bytes).
  CPU:  each method runs in a fresh subprocess; peak RSS (getrusage ru_maxrss) minus the RSS just
        before the step, with MALLOC_MMAP_THRESHOLD_=65536 so glibc mmaps every tensor over 64 KiB and
        unmaps it on free: RSS then tracks live tensor bytes (plus a few MiB of first-step runtime
        allocations). Without it glibc's adaptive threshold keeps freed chunks resident and RSS overstates.

    python bench/bench_loss.py                       # CPU: scaled-down shapes, torch paths only (~1 min)
    python bench/bench_loss.py --device cuda         # GPU: (8,1024,32000), (4,2048,151936) bf16 + kernel check
    python bench/bench_loss.py --shapes 2x128x32000 --iters 5
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanopatho import rl  # noqa: E402
from nanopatho.kernels import fused_policy_loss  # noqa: E402

CPU_SHAPES = "4x256x16384,2x512x32000"
GPU_SHAPES = "8x1024x32000,4x2048x151936"
EPS_LOW, EPS_HIGH, BETA, TEMPERATURE = 0.2, 0.28, 0.04, 0.9


def make_batch(B, L, V, dtype, device, extra_row=False):
    g = torch.Generator(device=device).manual_seed(0)  # drawn where they live: a CPU draw of 1.2e9 logits takes a minute
    d = dict(generator=g, device=device)
    logits = torch.randn(B, L + int(extra_row), V, **d).to(dtype)  # (B, L[+1], V)
    ids = torch.randint(0, V, (B, L), **d)  # (B, L)
    logp_old = -torch.rand(B, L, **d) * 12.0  # (B, L), ratios both sides of the clip
    logp_ref = logp_old + 0.1 * torch.randn(B, L, **d)
    adv = torch.randn(B, **d)  # (B,)
    mask = (torch.rand(B, L, **d) > 0.1).float()  # (B, L)
    return dict(logits=logits.requires_grad_(True), ids=ids, logp_old=logp_old, logp_ref=logp_ref, adv=adv, mask=mask)


def step_naive(b):
    logp = torch.log_softmax(b["logits"].float() / TEMPERATURE, dim=-1)  # (B, L, V) fp32: the memory cost
    logp = logp.gather(-1, b["ids"][..., None]).squeeze(-1)  # (B, L)
    loss, _ = rl.policy_loss(logp, b["logp_old"], b["adv"], b["mask"], eps_low=EPS_LOW, eps_high=EPS_HIGH,
                             logp_ref=b["logp_ref"], beta=BETA)
    loss.backward()


def _fused(b, impl):
    loss, _ = fused_policy_loss(b["logits"], b["ids"], b["logp_old"], b["adv"], b["mask"], temperature=TEMPERATURE,
                                eps_low=EPS_LOW, eps_high=EPS_HIGH, logp_ref=b["logp_ref"], beta=BETA, impl=impl)
    loss.backward()
    return loss.detach()


def step_liger(b):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    out = triton_grpo_loss(logits=b["logits"], old_logp=b["logp_old"], ref_logp=b["logp_ref"], completion_ids=b["ids"],
                           advantages=b["adv"], completion_mask=b["mask"], temperature=TEMPERATURE, beta=BETA,
                           eps_low=EPS_LOW, eps_high=EPS_HIGH, inplace=False)
    loss = out[0] if isinstance(out, tuple) else out
    if loss.dim() > 0:  # older Liger returns the per-token loss: token-mean it
        loss = (loss * b["mask"]).sum() / b["mask"].sum()
    loss.backward()


STEPS = {"naive": step_naive, "chunked": lambda b: _fused(b, "torch"), "triton": lambda b: _fused(b, "triton"),
         "liger": step_liger}


def liger_available():
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: F401
        return True
    except ImportError:
        return False


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(method, B, L, V, dtype, device, iters, warmup):
    """(ms per forward + backward, peak extra bytes) of one method on one shape."""
    b = make_batch(B, L, V, dtype, device, extra_row=method == "liger")
    step = STEPS[method]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(b)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = rss_bytes()
        step(b)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is KiB on Linux
    for _ in range(warmup):
        b["logits"].grad = None
        step(b)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        b["logits"].grad = None
        step(b)
    sync()
    return 1000 * (time.perf_counter() - t0) / iters, peak


def measure_subprocess(method, shape, dtype, iters, warmup):
    """CPU: fresh processes per method so ru_maxrss is this method's own peak."""
    cmd = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--shapes", shape, "--dtype", dtype,
           "--iters", str(iters), "--warmup", str(warmup), "--one", method]
    runs = []
    for env in (dict(os.environ), dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")):  # time, then memory
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs[0]["ms"], runs[1]["peak"]  # the mmap threshold adds page faults: time is taken without it


CHECK_TOL = dict(loss_rel=1e-3, dlogits_rel=2e-2)  # bf16 logits; both paths accumulate in fp32


def check_kernel(dtype):
    """GPU: the kernel agrees with the chunked torch path, incl. B*L = 70,000 rows (> 65,535: axis-0 grid);
    raises when a difference exceeds CHECK_TOL."""
    for B, L, V in [(4, 1000, 32000), (1, 70000, 256)]:
        grads, losses = [], []
        for impl in ("torch", "triton"):
            b = make_batch(B, L, V, dtype, "cuda")
            losses.append(_fused(b, impl).item())
            grads.append(b["logits"].grad.float())
        rel = abs(losses[1] - losses[0]) / max(abs(losses[0]), 1e-12)
        gerr = ((grads[1] - grads[0]).abs().max() / grads[0].abs().max()).item()
        print(f"check ({B},{L},{V}) {str(dtype)[6:]}: loss rel diff {rel:.2e}, dlogits max diff / max {gerr:.2e}")
        if not (rel <= CHECK_TOL["loss_rel"] and gerr <= CHECK_TOL["dlogits_rel"]):
            raise SystemExit(f"kernel check FAILED on ({B},{L},{V}): tolerances {CHECK_TOL}")


def fmt_mib(n):
    return f"{n / 2**20:9.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where to run (default: cuda when available)")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated BxLxV (default cpu: {CPU_SHAPES}; cuda: {GPU_SHAPES})")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="logits dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 2 cpu, 10 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations (default: 1 cpu, 3 cuda)")
    p.add_argument("--no_check", action="store_true", help="cuda: skip the kernel-vs-torch agreement check")
    p.add_argument("--one", default=None, choices=list(STEPS), help=argparse.SUPPRESS)  # CPU worker mode
    args = p.parse_args()
    cuda = args.device == "cuda"
    shapes = args.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, dtype_name)
    iters = args.iters or (10 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.one:
        B, L, V = map(int, shapes.split("x"))
        ms, peak = measure(args.one, B, L, V, dtype, "cpu", iters, warmup)
        print(json.dumps({"ms": ms, "peak": peak}))
        return

    methods = ["naive", "chunked"] + (["triton"] + (["liger"] if liger_available() else []) if cuda else [])
    if cuda and not args.no_check:
        check_kernel(dtype)
    print(f"device {args.device}, logits {dtype_name}, fwd+bwd, {iters} iters after {warmup} warm-up; "
          f"peak extra = {'CUDA allocator' if cuda else 'RSS (fresh process)'} peak above the inputs")
    print(f"{'shape (B,L,V)':>20} {'method':>8} {'ms':>9} {'peak MiB':>9} {'time/naive':>10} {'mem/naive':>9}")
    for shape in shapes.split(","):
        B, L, V = map(int, shape.split("x"))
        rows = {}
        for m in methods:
            if cuda:
                rows[m] = measure(m, B, L, V, dtype, "cuda", iters, warmup)
                torch.cuda.empty_cache()
            else:
                rows[m] = measure_subprocess(m, shape, dtype_name, iters, warmup)
        ms0, mem0 = rows["naive"]
        for m, (ms, mem) in rows.items():
            print(f"{f'({B},{L},{V})':>20} {m:>8} {ms:9.1f} {fmt_mib(mem)} {ms / ms0:10.2f} {mem / mem0:9.2f}")


if __name__ == "__main__":
    main()
