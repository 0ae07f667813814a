"""Fused token-level clipped policy loss (GRPO / DAPO) from logits, with a Triton kernel and a torch path.

    from nanopatho.kernels import fused_policy_loss, token_logprobs
    loss, stats = fused_policy_loss(logits, ids, logp_old, advantages, mask, eps_low=0.2, eps_high=0.28)
    loss.backward()

logits (B, L, V) score ids (B, L) (row t scores ids[:, t]); the semantics, aggregation and stats
are those of nanopatho.rl.policy_loss applied to log softmax(logits / T)[ids].

impl picks the implementation:
  "auto"   the Triton kernel when logits are on CUDA and triton imports, else the torch path;
  "triton" the kernel (on a CPU only under TRITON_INTERPRET=1, set before triton is imported);
  "torch"  nanopatho.rl.token_logprobs_torch (row-chunked log-probs) + nanopatho.rl.policy_loss.
Triton is imported lazily, on the first Triton call: this package imports without triton.
"""

import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "torch")


def triton_available():
    """True when the triton package is installed (it is imported only when a kernel runs)."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(logits, impl):
    assert impl in IMPLS, f"impl must be one of {IMPLS}, got {impl!r}"
    if impl == "torch":
        return False
    if impl == "auto":
        return logits.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package (pip install triton), or use impl='torch'")
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "impl='triton' on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported, move logits to CUDA, or use impl='torch'")
    return True


def _kernels():
    from nanopatho.kernels import policy_loss_triton  # lazy: imports triton
    return policy_loss_triton


def _check_inputs(logits, ids, mask):
    assert logits.dim() == 3, f"logits must be (B, L, V), got {tuple(logits.shape)}"
    assert ids.shape == logits.shape[:2], f"ids {tuple(ids.shape)} must be (B, L) = {tuple(logits.shape[:2])}"
    assert mask is None or mask.shape == ids.shape, f"mask {tuple(mask.shape)} must match ids {tuple(ids.shape)}"


def token_logprobs(logits, ids, temperature=1.0, impl="auto"):
    """log softmax(logits / T)[ids] as fp32 (B, L), without grad (old and reference log-probs)."""
    _check_inputs(logits, ids, None)
    with torch.no_grad():
        if _use_triton(logits, impl):
            return _kernels().token_logprobs(logits, ids, temperature)
        from nanopatho import rl
        return rl.token_logprobs_torch(logits, ids, temperature).float()


def fused_policy_loss(logits, ids, logp_old, advantages, mask, *, temperature=1.0, eps_low=0.2, eps_high=0.2,
                      logp_ref=None, beta=0.0, agg="token-mean", num_tokens=None, max_len=None, impl="auto"):
    """rl.policy_loss computed from logits (B, L, V); returns (loss, stats) like rl.policy_loss.

    advantages are (B,) per sequence or (B, L) per token; mask (B, L) is 1 on tokens in the loss.
    Ids under mask 0 are ignored (they may be padding such as -1). Gradient flows to logits only.
    """
    _check_inputs(logits, ids, mask)
    from nanopatho import rl
    B, L, V = logits.shape
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(B, L)  # (B, L)
    valid = mask.bool()  # (B, L)
    ids = ids.masked_fill(~valid, 0)  # padding ids (e.g. -1) never index the vocabulary
    if not _use_triton(logits, impl):
        logp = rl.token_logprobs_torch(logits, ids, temperature)  # (B, L)
        return rl.policy_loss(logp, logp_old, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                              logp_ref=logp_ref, beta=beta, agg=agg, num_tokens=num_tokens, max_len=max_len)
    loss_tok, kl, clipped_low, clipped_high = _kernels().policy_loss_per_token(
        logits, ids, valid, logp_old, advantages, logp_ref,
        temperature=temperature, eps_low=eps_low, eps_high=eps_high, beta=beta)  # each (B, L)
    loss = rl.aggregate(loss_tok, mask, agg, num_tokens=num_tokens, max_len=max_len)
    stats = _stats(kl, clipped_low, clipped_high, valid, logp_ref is not None)
    return loss, stats


def _stats(kl, clipped_low, clipped_high, valid, has_ref):
    """The stats rl.policy_loss reports, from the kernel's per-token outputs (detached)."""
    n = valid.sum().clamp(min=1)
    stats = {
        "clip_frac": ((clipped_low | clipped_high) & valid).sum() / n,
        "clip_frac_low": (clipped_low & valid).sum() / n,
        "clip_frac_high": (clipped_high & valid).sum() / n,
    }
    if has_ref:
        stats["kl"] = (kl.detach() * valid).sum() / n
    return stats
