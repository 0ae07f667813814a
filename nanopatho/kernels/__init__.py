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
        return logits.is_cuda and _triton_imports()
    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package (pip install triton), or use impl='torch'")
    if not logits.is_cuda and not _kernels().INTERPRETED:
        raise RuntimeError(
            "impl='triton' on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported, move logits to CUDA, or use impl='torch'")
    return True


def _triton_imports():
    """True when the kernel module (and so triton) imports; auto falls back to torch otherwise."""
    try:
        _kernels()
        return True
    except ImportError:
        return False


def _kernels():
    from nanopatho.kernels import policy_loss_triton  # lazy: imports triton
    return policy_loss_triton


def _check_inputs(logits, ids, mask, temperature):
    """Shape contract; and ids counted by the loss must index the vocabulary (the kernel reads
    logits[id] unchecked). Costs one device sync."""
    assert temperature > 0, f"temperature must be > 0 (greedy samples are scored at T=1), got {temperature}"
    assert logits.dim() == 3, f"logits must be (B, L, V), got {tuple(logits.shape)}"
    assert ids.shape == logits.shape[:2], f"ids {tuple(ids.shape)} must be (B, L) = {tuple(logits.shape[:2])}"
    assert mask is None or mask.shape == ids.shape, f"mask {tuple(mask.shape)} must match ids {tuple(ids.shape)}"
    counted = ids if mask is None else ids.masked_fill(mask == 0, 0)  # (B, L)
    if ((counted < 0) | (counted >= logits.shape[-1])).any():
        raise ValueError(f"ids outside [0, {logits.shape[-1]}) at positions the loss counts (mask them out)")


def token_logprobs(logits, ids, temperature=1.0, impl="auto"):
    """log softmax(logits / T)[ids] as fp32 (B, L), without grad (old and reference log-probs).
    Negative ids (padding targets) are read as id 0, as in rl.token_logprobs_torch: mask them out."""
    ids = ids.clamp(min=0)  # (B, L)
    _check_inputs(logits, ids, None, temperature)
    with torch.no_grad():
        if _use_triton(logits, impl):
            return _kernels().token_logprobs(logits, ids, temperature)
        from nanopatho import rl
        return rl.token_logprobs_torch(logits, ids, temperature).float()


def fused_policy_loss(logits, ids, logp_old, advantages, mask, *, temperature=1.0, eps_low=0.2, eps_high=0.2,
                      logp_ref=None, beta=0.0, agg="token-mean", num_tokens=None, max_len=None, num_seqs=None,
                      impl="auto"):
    """rl.policy_loss applied to log softmax(logits / T)[ids]; returns (loss, stats) exactly as rl.policy_loss.

    logits (B, L, V) any float dtype; ids (B, L); logp_old, logp_ref (B, L); advantages (B,) or (B, L);
    mask (B, L) 1 on tokens in the loss. Ids under mask 0 are ignored (padding such as -1 is fine).
    Gradient flows to logits only. The Triton path writes the per-token loss (B, L) and aggregates
    it with rl.aggregate, the same code as the torch path; stats come from rl.policy_loss on the
    kernel's detached log-probs, so both paths report the same keys and meanings.
    """
    _check_inputs(logits, ids, mask, temperature)
    from nanopatho import rl
    B, L, V = logits.shape
    agg_args = dict(agg=agg, num_tokens=num_tokens, max_len=max_len, num_seqs=num_seqs)
    if not _use_triton(logits, impl):
        logp = rl.token_logprobs_torch(logits, ids, temperature)  # (B, L), row-chunked
        return rl.policy_loss(logp, logp_old, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                              logp_ref=logp_ref, beta=beta, **agg_args)
    valid = mask != 0  # (B, L)
    adv = advantages[:, None].expand(B, L) if advantages.dim() == 1 else advantages  # (B, L)
    loss_tok, _kl, _low, _high, logp = _kernels().policy_loss_per_token(
        logits, ids.masked_fill(~valid, 0), valid, logp_old, adv, logp_ref,
        temperature=temperature, eps_low=eps_low, eps_high=eps_high, beta=beta)  # each (B, L)
    loss = rl.aggregate(loss_tok, mask, **agg_args)
    _, stats = rl.policy_loss(logp, logp_old.float(), advantages, mask, eps_low=eps_low, eps_high=eps_high,
                              logp_ref=None if logp_ref is None else logp_ref.float(), beta=beta, **agg_args)
    return loss, stats
