"""Triton kernels for the fused token-level clipped policy loss (GRPO / DAPO).

Imported only through nanopatho.kernels (lazily: importing this module imports
triton). On a CPU, set TRITON_INTERPRET=1 *before* this module is imported to run
the kernels in Triton's interpreter, which is how the tests run them.

Every kernel gives one program to one token (one row of the (B*L, V) logits), so the
grid is (B*L,) on axis 0 (limit 2**31 - 1), never hitting the 65,535 limit of axes 1
and 2 however long the sequences are. Each program walks the vocabulary in blocks of
BLOCK_V columns with fp32 accumulators:

  forward   online log-sum-exp of z = logits / T, gather of z[id],
            logp = z[id] - lse, ratio, clip, k3 KL -> per-token loss, KL, clip flags, lse.
            Only the lse (B*L floats) is saved for backward, never a (B, L, V) tensor.
  backward  dlogits = (onehot(id) - exp(z - lse)) * dlogp / T, one pass over V;
            masked tokens get exact zeros.
  logprobs  the forward's lse + gather only (no grad), for old / reference log-probs.
"""

import torch
import triton
import triton.language as tl

# Launch settings on the GPU, from bench/tune_loss_kernel.py on an H200 (bf16, (8,1024,32000) and
# (4,2048,151936); bench/results/gpu_h200/): the forward at 4096 x 4 warps is within 7% of the best on
# both shapes, the backward varies <= 3% on the large one. Tests shrink the blocks to cover many.
FWD_MAX_BLOCK_V = 4096  # vocabulary columns per block in the forward and log-prob kernels
FWD_WARPS = 4  # warps per program (one row)
BWD_MAX_BLOCK_V = 2048  # and in the backward kernel
BWD_WARPS = 16


def block_size(V, cap):
    return min(triton.next_power_of_2(V), cap)


# -----------------------------------------------------------------------------
# kernels

@triton.jit
def _row_lse_and_target(row_ptr, target, V, inv_temp, n_cols, BLOCK_V: tl.constexpr):
    """lse = log sum_v exp(z_v) and z[target] for z = logits / T, over the first n_cols columns (0 or V)."""
    m = float("-inf")  # running max
    s = 0.0  # running sum of exp(z - m)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of -inf logits must not give nan
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
        m = m_new
    lse = m + tl.log(tl.where(s > 0, s, 1.0))  # a row with no columns read (masked) gives -inf, no warning
    z_target = tl.load(row_ptr + target, mask=n_cols > 0, other=0.0).to(tl.float32) * inv_temp
    return lse, z_target


@triton.jit
def _policy_loss_fwd_kernel(
    logits_ptr, stride_row, ids_ptr, mask_ptr, logp_old_ptr, adv_ptr, logp_ref_ptr,
    loss_ptr, kl_ptr, clip_low_ptr, clip_high_ptr, logp_ptr, lse_ptr,
    V, inv_temp, eps_low, eps_high, beta,
    HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row can exceed 2**31
    valid = tl.load(mask_ptr + row) != 0
    target = tl.load(ids_ptr + row)
    lse, z_target = _row_lse_and_target(
        logits_ptr + row * stride_row, target, V, inv_temp, tl.where(valid, V, 0), BLOCK_V)
    lse = tl.where(valid, lse, 0.0)  # masked tokens: logp = 0, every value below stays finite
    logp = z_target - lse
    adv = tl.load(adv_ptr + row).to(tl.float32)
    ratio = tl.exp(logp - tl.load(logp_old_ptr + row).to(tl.float32))  # rho = exp(logp - logp_old)
    ratio_clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    loss = tl.maximum(-ratio * adv, -ratio_clipped * adv)  # -min(rho A, clip(rho, 1-el, 1+eh) A)
    clip_low = (ratio < 1.0 - eps_low) & (adv < 0)
    clip_high = (ratio > 1.0 + eps_high) & (adv > 0)
    kl = 0.0
    if HAS_REF:
        log_r = tl.load(logp_ref_ptr + row).to(tl.float32) - logp
        kl = tl.exp(log_r) - log_r - 1.0  # k3 = exp(ref - logp) - (ref - logp) - 1
        loss = loss + beta * kl
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))
    tl.store(clip_low_ptr + row, (valid & clip_low).to(tl.int8))
    tl.store(clip_high_ptr + row, (valid & clip_high).to(tl.int8))
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _policy_loss_bwd_kernel(
    logits_ptr, stride_row, dlogits_ptr, ids_ptr, mask_ptr, logp_old_ptr, adv_ptr, logp_ref_ptr,
    lse_ptr, dloss_ptr, dkl_ptr,
    V, inv_temp, eps_low, eps_high, beta,
    HAS_REF: tl.constexpr, HAS_DKL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    valid = tl.load(mask_ptr + row) != 0
    target = tl.load(ids_ptr + row)
    lse = tl.load(lse_ptr + row)
    row_ptr = logits_ptr + row * stride_row
    z_target = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32) * inv_temp
    logp = z_target - lse
    adv = tl.load(adv_ptr + row).to(tl.float32)
    ratio = tl.exp(logp - tl.load(logp_old_ptr + row).to(tl.float32))
    clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    # d loss / d logp: -rho A on the unclipped branch, 0 where the clip is active
    dlogp_loss = tl.where(clipped, 0.0, -ratio * adv)
    dkl_dlogp = 0.0
    if HAS_REF:
        dkl_dlogp = 1.0 - tl.exp(tl.load(logp_ref_ptr + row).to(tl.float32) - logp)  # d k3 / d logp
        dlogp_loss = dlogp_loss + beta * dkl_dlogp
    dlogp = tl.load(dloss_ptr + row) * dlogp_loss
    if HAS_DKL:
        dlogp = dlogp + tl.load(dkl_ptr + row) * dkl_dlogp
    dlogp = tl.where(valid, dlogp, 0.0)
    scale = dlogp * inv_temp  # d logp / d logits = (onehot - softmax(z)) / T
    n_load = tl.where(valid, V, 0)  # masked tokens read no logits
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=cols < n_load, other=0.0).to(tl.float32) * inv_temp  # (BLOCK_V,)
        p = tl.exp(z - lse)
        grad = (tl.where(cols == target, 1.0, 0.0) - p) * scale
        grad = tl.where(valid, grad, 0.0)  # exact zeros on masked tokens
        tl.store(dlogits_ptr + row * V + cols, grad.to(dlogits_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _token_logprobs_kernel(logits_ptr, stride_row, ids_ptr, out_ptr, V, inv_temp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse, z_target = _row_lse_and_target(
        logits_ptr + row * stride_row, tl.load(ids_ptr + row), V, inv_temp, V, BLOCK_V)
    tl.store(out_ptr + row, z_target - lse)  # log softmax(logits / T)[id]


# True when this module was imported under TRITON_INTERPRET=1 (kernels then run on CPU tensors)
INTERPRETED = type(_token_logprobs_kernel).__name__ == "InterpretedFunction"


# -----------------------------------------------------------------------------
# launchers

def _rows(logits):
    """(B, L, V) -> (B*L, V) view with unit column stride (copies only if the last dim is strided)."""
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def _flat(x, dtype=None):
    x = x.reshape(-1)
    return (x if dtype is None else x.to(dtype)).contiguous()


class FusedPolicyLoss(torch.autograd.Function):
    """Per-token clipped policy loss (+ beta * k3) from logits; gradient flows to logits only.

    forward -> (loss_tok, kl, clipped_low, clipped_high, logp), each (B, L): fp32 loss (with beta * k3)
    and KL (differentiable), bool clip flags and fp32 logp (not differentiable), all zero on masked
    tokens. Aggregation over tokens is done by the caller in torch; its autograd supplies the
    per-token upstream weights dloss to the backward kernel.
    """

    @staticmethod
    def forward(ctx, logits, ids, mask, logp_old, advantages, logp_ref, temperature, eps_low, eps_high, beta):
        B, L, V = logits.shape
        rows = _rows(logits)  # (N, V)
        N = rows.shape[0]
        ids_f = _flat(ids, torch.int64)  # (N,)
        mask_f = _flat(mask != 0, torch.int8)  # (N,) 1 on tokens in the loss
        old_f = _flat(logp_old, torch.float32)
        adv_f = _flat(advantages, torch.float32)
        has_ref = logp_ref is not None
        ref_f = _flat(logp_ref, torch.float32) if has_ref else old_f  # placeholder pointer when absent
        out = dict(device=logits.device)
        loss = torch.empty(N, dtype=torch.float32, **out)
        kl = torch.empty(N, dtype=torch.float32, **out)
        clip_low = torch.empty(N, dtype=torch.int8, **out)
        clip_high = torch.empty(N, dtype=torch.int8, **out)
        logp = torch.empty(N, dtype=torch.float32, **out)
        lse = torch.empty(N, dtype=torch.float32, **out)
        BLOCK_V = block_size(V, FWD_MAX_BLOCK_V)
        _policy_loss_fwd_kernel[(N,)](
            rows, rows.stride(0), ids_f, mask_f, old_f, adv_f, ref_f,
            loss, kl, clip_low, clip_high, logp, lse,
            V, 1.0 / temperature, eps_low, eps_high, beta,
            HAS_REF=has_ref, BLOCK_V=BLOCK_V, num_warps=FWD_WARPS,
        )
        ctx.save_for_backward(rows, ids_f, mask_f, old_f, adv_f, ref_f, lse)
        ctx.args = (B, L, V, has_ref, 1.0 / temperature, eps_low, eps_high, beta, logits.dtype)
        clip_low, clip_high = clip_low.view(B, L).bool(), clip_high.view(B, L).bool()
        logp = logp.view(B, L)
        ctx.mark_non_differentiable(clip_low, clip_high, logp)
        return loss.view(B, L), kl.view(B, L), clip_low, clip_high, logp

    @staticmethod
    def backward(ctx, dloss, dkl, _dclip_low, _dclip_high, _dlogp):
        rows, ids_f, mask_f, old_f, adv_f, ref_f, lse = ctx.saved_tensors
        B, L, V, has_ref, inv_temp, eps_low, eps_high, beta, dtype = ctx.args
        N = rows.shape[0]
        if dloss is None:
            dloss = torch.zeros(N, dtype=torch.float32, device=rows.device)
        dloss = _flat(dloss, torch.float32)  # (N,) upstream weight of each token from the aggregation
        has_dkl = dkl is not None and has_ref
        dkl = _flat(dkl, torch.float32) if has_dkl else dloss  # placeholder pointer when absent
        dlogits = torch.empty(N, V, dtype=dtype, device=rows.device)
        _policy_loss_bwd_kernel[(N,)](
            rows, rows.stride(0), dlogits, ids_f, mask_f, old_f, adv_f, ref_f,
            lse, dloss, dkl,
            V, inv_temp, eps_low, eps_high, beta,
            HAS_REF=has_ref, HAS_DKL=has_dkl, BLOCK_V=block_size(V, BWD_MAX_BLOCK_V), num_warps=BWD_WARPS,
        )
        return dlogits.view(B, L, V), None, None, None, None, None, None, None, None, None


def policy_loss_per_token(logits, ids, mask, logp_old, advantages, logp_ref, *, temperature, eps_low, eps_high, beta):
    """Differentiable (w.r.t. logits) per-token loss and KL, plus clip flags and logp; see FusedPolicyLoss."""
    return FusedPolicyLoss.apply(
        logits, ids, mask, logp_old, advantages, logp_ref, float(temperature), float(eps_low), float(eps_high), float(beta))


def token_logprobs(logits, ids, temperature=1.0):
    """log softmax(logits / T)[ids] as fp32 (B, L), no grad, no (B, L, V) intermediate."""
    B, L, V = logits.shape
    rows = _rows(logits.detach())  # (N, V)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    _token_logprobs_kernel[(rows.shape[0],)](
        rows, rows.stride(0), _flat(ids, torch.int64), out, V, 1.0 / float(temperature),
        BLOCK_V=block_size(V, FWD_MAX_BLOCK_V), num_warps=FWD_WARPS)
    return out.view(B, L)
