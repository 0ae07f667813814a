"""GRPO / DAPO building blocks in plain torch: advantages, clipped loss, aggregation, filters.

This is the reference the RL trainer (train_rl.py) and the Triton kernels
(nanopatho.kernels, which import `aggregate` from here) are tested against.

    GRPO  (DeepSeekMath, Shao et al. 2024, eq. 3): group-normalised advantage, clip ε=0.2
          both sides, k3 KL to a frozen reference with weight β, "seq-mean-token-mean".
    DAPO  (Yu et al. 2025), objective eq. 8: clip-higher ε_low=0.2 / ε_high=0.28 (§3.1),
          dynamic sampling of informative groups (§3.2), token-level loss "token-mean" over
          the global batch (§3.3), overlong reward shaping (§3.4, eq. 13), β=0.
    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): advantage r − mean
          without the std, loss Σ M·L / (B · L_max) ("seq-mean-token-sum-norm").

Shapes: B completions (B = num_groups · group_size, a group's completions contiguous),
L completion positions. logp* and mask are (B, L); advantages (B,).

Usage (one update on a micro-batch; num_tokens is the valid-token count of the whole
optimiser batch summed over micro-batches and ranks):
    logp = token_logprobs_torch(logits, ids, temperature)                      # (B, L)
    loss, stats = policy_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.28,
                              agg="token-mean", num_tokens=global_tokens)
    loss.backward()
"""

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
SCALES = ("group", "batch", "none")

# -----------------------------------------------------------------------------
# advantages and group filters


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Outcome advantage of each completion, broadcast later over its tokens.

    scale="group" (GRPO, DeepSeekMath §4.1.2):  A_i = (r_i − mean_g) / (std_g + eps)
    scale="batch": A_i = (r_i − mean_g) / (std_batch + eps): group mean, std over the whole
        batch -- TRL's scale_rewards="batch" (TRL gathers the rewards of all processes
        first). Pass the global rewards under DDP, or the std is local.
    scale="none" (Dr. GRPO §3.2):  A_i = r_i − mean_g.
    std is the unbiased (n−1) one, as torch.std in TRL and verl; eps 1e-6 as verl (TRL: 1e-4).
    A group of size 1, or a group whose rewards are all equal, gets exactly 0: it carries
    no signal. (verl differs for size 1: it uses mean 0, std 1, so A_i = r_i.)
    """
    assert scale in SCALES, f"scale must be one of {SCALES}, got {scale!r}"
    assert rewards.dim() == 1 and rewards.numel() % group_size == 0, \
        f"rewards {tuple(rewards.shape)} must be (num_groups * {group_size},)"
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)  # (G, n)
    centred = r - r.mean(dim=1, keepdim=True)                       # (G, n)  r_i − mean_g
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # (G, 1) all equal
    if scale == "group" and group_size > 1:
        adv = centred / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch" and r.numel() > 1:
        adv = centred / (r.std() + eps)
    else:
        adv = centred
    return torch.where(flat, torch.zeros_like(adv), adv).view(-1)  # (B,)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic-sampling filter (§3.2; eq. 8's constraint 0 < |{o_i : correct}| < G):
    True for groups whose rewards are not all equal. Exact comparison; a group of size 1
    is never kept. Returns bool (num_groups,)."""
    r = rewards.view(-1, group_size)                                # (G, n)
    return r.amax(dim=1) != r.amin(dim=1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (§3.4, eq. 13), added to the task reward.

        R(y) = 0                                  |y| <= L_max − L_cache
             = ((L_max − L_cache) − |y|) / L_cache   L_max − L_cache < |y| <= L_max
             = −1                                 |y| > L_max
    Linear from 0 to −1 across the last cache_len tokens; cache_len=0 is a hard cliff.
    """
    assert 0 <= cache_len <= max_len, f"need 0 <= cache_len ({cache_len}) <= max_len ({max_len})"
    y = lengths.float()                                             # (B,)
    expected = max_len - cache_len
    ramp = (expected - y) / max(cache_len, 1)                       # (B,)
    penalty = torch.where(y <= expected, torch.zeros_like(y), ramp)
    return torch.where(y > max_len, torch.full_like(y, -1.0), penalty)


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: drop every token of completions cut off at the length limit
    (truncated (B,) bool: no stop token within max_new_tokens) from the loss. mask (B, L)."""
    return mask * (~truncated).to(mask.dtype).unsqueeze(1)          # (B, L)

# -----------------------------------------------------------------------------
# per-token losses and their aggregation


def clipped_token_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, *,
                       eps_low: float, eps_high: float):
    """PPO/GRPO clipped surrogate per token (DeepSeekMath eq. 3; DAPO §3.1 clip-higher):

        ρ = exp(logp − logp_old),  L = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)

    clipped_low  = ρ < 1 − ε_low  ∧ A < 0   (gradient zeroed: the min picks the constant)
    clipped_high = ρ > 1 + ε_high ∧ A > 0   (TRL's low/high clip ratios; verl logs instead
    "clipped surrogate larger", and by default adds a dual clip at 3 for A < 0, not here).
    advantages (B,) or (B, L). Returns (loss (B, L), clipped_low (B, L), clipped_high (B, L)).
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) | (B, L)
    ratio = torch.exp(logp - logp_old)                              # (B, L)
    unclipped = ratio * adv                                         # (B, L)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)                       # (B, L)
    clipped_low = (ratio < 1.0 - eps_low) & (adv < 0)
    clipped_high = (ratio > 1.0 + eps_high) & (adv > 0)
    return loss, clipped_low, clipped_high


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ ‖ π_ref) per token (DeepSeekMath eq. 4):

        k3 = exp(logp_ref − logp) − (logp_ref − logp) − 1   (≥ 0, unbiased)
    Not clamped (verl clamps to [−10, 10]); the trainer's non-finite guard covers blow-ups.
    """
    d = logp_ref - logp                                             # (B, L)
    return torch.exp(d) - d - 1.0


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str, num_tokens=None, max_len=None,
              num_seqs=None) -> torch.Tensor:
    """Masked per-token values (B, L) -> scalar. Shared with the Triton path.

    "token-mean" (DAPO eq. 8, §3.3):          Σ M·L / num_tokens
        num_tokens defaults to M.sum(); pass the GLOBAL count over all micro-batches and
        ranks, so the micro-batch losses sum to the full-batch token mean. DDP averages
        gradients over ranks, so under DDP backpropagate loss × world_size. (verl: global
        count × dp_size; TRL "dapo": num_items_in_batch / num_processes, the same; TRL
        "bnpo": the local micro-batch count, which weights tokens unequally.)
    "seq-mean-token-mean" (GRPO eq. 3): (1/num_seqs) Σ_i (Σ_t M·L / Σ_t M), num_seqs
        defaults to B (rows with no valid token count, contributing 0, as in TRL).
    "seq-mean-token-sum-norm" (Dr. GRPO §3.2): Σ M·L / (num_seqs · max_len), max_len
        defaults to L (as verl); Dr. GRPO and TRL ("dr_grpo") use the fixed generation budget
        max_completion_length -- pass max_len=max_new_tokens for a constant divisor.
    For micro-batches or ranks in the seq-mean modes, pass num_seqs = sequences in the whole
    batch over all ranks (and, under DDP, the same × world_size).
    """
    assert agg in AGG_MODES, f"agg must be one of {AGG_MODES}, got {agg!r}"
    assert values.shape == mask.shape and values.dim() == 2, \
        f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be (B, L)"
    m = mask.to(values.dtype)                                       # (B, L)
    masked = values * m                                             # (B, L)
    B, L = values.shape
    seqs = B if num_seqs is None else num_seqs
    if agg == "token-mean":
        tokens = m.sum() if num_tokens is None else num_tokens
        return masked.sum() / torch.clamp(torch.as_tensor(tokens, dtype=values.dtype, device=values.device), min=1)
    if agg == "seq-mean-token-mean":
        per_seq = masked.sum(dim=1) / m.sum(dim=1).clamp(min=1)     # (B,)
        return per_seq.sum() / seqs
    return masked.sum() / (seqs * (L if max_len is None else max_len))


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp(min=1)


def policy_loss(logp, logp_old, advantages, mask, *, eps_low, eps_high, logp_ref=None, beta=0.0,
                agg="token-mean", num_tokens=None, max_len=None, num_seqs=None,
                entropy=None, entropy_coef=0.0):
    """GRPO / DAPO policy loss: per token  L = −min(ρA, clip(ρ)A) + β·k3 − c_H·H,  aggregated.

    β·k3 is added per token before aggregation (DeepSeekMath eq. 3 puts β·D_KL inside the
    per-token sum; TRL does exactly this). verl aggregates the KL separately with the same
    mode and adds kl_coef × that -- identical, since aggregation is linear. entropy (B, L),
    e.g. entropy_from_logits(...), is logged and, with entropy_coef > 0, a bonus (verl's
    entropy_coeff; off in GRPO/DAPO).

    Returns (loss, stats); stats are detached means over this call's valid tokens:
    pg_loss (the clipped part, aggregated), kl, clip_frac_low, clip_frac_high,
    clip_frac = (ρ < 1−ε_low ∧ A<0) ∨ (ρ > 1+ε_high ∧ A>0), ratio_mean, ratio_max, entropy.
    """
    assert logp.shape == logp_old.shape == mask.shape and (logp_ref is None or logp_ref.shape == logp.shape), \
        f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)}, mask {tuple(mask.shape)} must match"
    valid = mask != 0                                               # (B, L)
    # masked tokens read as logp = logp_old = logp_ref = 0, as in the Triton kernel: whatever a caller left
    # there (the sampler writes 0, so a real logp makes exp(logp_ref - logp) overflow) cannot make inf * 0 = nan
    logp, logp_old = logp.masked_fill(~valid, 0.0), logp_old.masked_fill(~valid, 0.0)  # (B, L) each
    logp_ref = None if logp_ref is None else logp_ref.masked_fill(~valid, 0.0)        # (B, L)
    pg_tok, low, high = clipped_token_loss(logp, logp_old, advantages, eps_low=eps_low, eps_high=eps_high)
    per_token = pg_tok                                              # (B, L)
    m = mask.to(logp.dtype)                                         # (B, L)
    kl = None
    if logp_ref is not None:
        kl = kl_k3(logp, logp_ref)                                  # (B, L)
        if beta != 0.0:
            per_token = per_token + beta * kl
    if entropy is not None and entropy_coef != 0.0:
        per_token = per_token - entropy_coef * entropy
    loss = aggregate(per_token, mask, agg, num_tokens=num_tokens, max_len=max_len, num_seqs=num_seqs)
    with torch.no_grad():
        ratio = torch.exp(logp - logp_old)                          # (B, L)
        stats = {
            "pg_loss": aggregate(pg_tok, mask, agg, num_tokens=num_tokens, max_len=max_len, num_seqs=num_seqs),
            "clip_frac_low": _masked_mean(low.to(m.dtype), m),
            "clip_frac_high": _masked_mean(high.to(m.dtype), m),
            "clip_frac": _masked_mean((low | high).to(m.dtype), m),
            "ratio_mean": _masked_mean(ratio, m),
            "ratio_max": torch.where(valid.any(), ratio.masked_fill(~valid, float("-inf")).amax(),
                                     ratio.new_tensor(1.0)),  # 1 when no token counts; no device sync
        }
        if kl is not None:
            stats["kl"] = _masked_mean(kl, m)
        if entropy is not None:
            stats["entropy"] = _masked_mean(entropy, m)
    return loss, {k: v.detach() for k, v in stats.items()}

# -----------------------------------------------------------------------------
# log-probs and entropy from logits, in blocks of positions (never a full fp32 (B, L, V) tensor)


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for bf16/fp16/fp32 logits, fp64 for fp64 (tests)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _blocks(B: int, L: int, rows: int):
    """(batch slice, position slice) blocks of about `rows` positions: whole sequences when
    L <= rows, else pieces of one sequence. Indexing (B, L, V) logits
    with them never copies the whole tensor, even when logits is a non-contiguous slice."""
    if L <= rows:
        step = max(rows // max(L, 1), 1)
        for b in range(0, B, step):
            yield slice(b, b + step), slice(0, L)
    else:
        for b in range(B):
            for t in range(0, L, rows):
                yield slice(b, b + 1), slice(t, t + rows)


class _TokenLogprobs(torch.autograd.Function):
    """logp = z[id] − logsumexp(z),  z = logits / T, block by block.

    Backward: ∂logp/∂logits = (onehot(id) − softmax(z)) / T, recomputed block by block from
    the saved log-sum-exp, so only (chunk_rows, V) fp32 temporaries ever exist."""

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk_rows):         # logits (B, L, V), ids (B, L)
        B, L, _ = logits.shape
        out = torch.empty(B, L, dtype=_acc_dtype(logits), device=logits.device)
        lse = torch.empty_like(out)
        for bs, ts in _blocks(B, L, chunk_rows):
            z = logits[bs, ts].to(out.dtype) / temperature         # (b, t, V)
            lse[bs, ts] = torch.logsumexp(z, dim=-1)
            out[bs, ts] = z.gather(-1, ids[bs, ts, None]).squeeze(-1) - lse[bs, ts]
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):                                    # grad_out (B, L)
        logits, ids, lse = ctx.saved_tensors
        T = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for bs, ts in _blocks(*lse.shape, ctx.chunk_rows):
            g = grad_out[bs, ts, None].to(lse.dtype) / T            # (b, t, 1)
            probs = torch.exp(logits[bs, ts].to(lse.dtype) / T - lse[bs, ts, None])  # (b, t, V)
            d = -probs * g
            d.scatter_add_(-1, ids[bs, ts, None], g)                # + onehot(id) · g
            grad[bs, ts] = d.to(grad.dtype)
        return grad, None, None, None


class _Entropy(torch.autograd.Function):
    """H = logsumexp(z) − Σ_v p_v z_v,  p = softmax(z), z = logits / T, block by block.
    Backward: ∂H/∂z_v = −p_v (z_v − Σ_u p_u z_u), then / T."""

    @staticmethod
    def forward(ctx, logits, temperature, chunk_rows):              # logits (B, L, V)
        B, L, _ = logits.shape
        out = torch.empty(B, L, dtype=_acc_dtype(logits), device=logits.device)
        for bs, ts in _blocks(B, L, chunk_rows):
            z = logits[bs, ts].to(out.dtype) / temperature         # (b, t, V)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)          # (b, t, 1)
            out[bs, ts] = lse.squeeze(-1) - (torch.exp(z - lse) * z).sum(-1)
        ctx.save_for_backward(logits)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):                                    # grad_out (B, L)
        (logits,) = ctx.saved_tensors
        T, acc = ctx.temperature, _acc_dtype(logits)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for bs, ts in _blocks(*logits.shape[:2], ctx.chunk_rows):
            z = logits[bs, ts].to(acc) / T                          # (b, t, V)
            p = torch.softmax(z, dim=-1)
            mean_z = (p * z).sum(-1, keepdim=True)                  # (b, t, 1)
            grad[bs, ts] = (-p * (z - mean_z) * grad_out[bs, ts, None].to(acc) / T).to(grad.dtype)
        return grad, None, None


def token_logprobs_torch(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                         chunk_rows: int = 256) -> torch.Tensor:
    """log π(id | ·) under the sampling distribution: log_softmax(logits / T) gathered at ids.

    logits (B, L, V) any float dtype, row t scoring ids[:, t] (a non-contiguous slice of the
    model's logits is fine, it is not copied); returns fp32 (B, L) (fp64 for fp64 logits),
    differentiable w.r.t. logits. Computed chunk_rows positions at a time, forward and
    backward, so memory beyond logits and its gradient is O(chunk_rows · V) -- the naive
    log_softmax + gather makes a full fp32 (B, L, V) copy. Negative ids (padding targets)
    are read as id 0: mask them out.
    """
    assert temperature > 0, f"temperature must be > 0 (greedy samples are scored at T=1), got {temperature}"
    assert logits.dim() == 3 and logits.shape[:2] == ids.shape, f"logits {tuple(logits.shape)} vs ids {tuple(ids.shape)}"
    return _TokenLogprobs.apply(logits, ids.clamp(min=0).long(), float(temperature), int(chunk_rows))


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0,
                        chunk_rows: int = 256) -> torch.Tensor:
    """Per-token entropy H = −Σ_v p_v log p_v of softmax(logits / T), fp32 (B, L), zero where
    mask == 0; chunked like token_logprobs_torch and differentiable (for the optional bonus).
    Log its masked mean."""
    assert temperature > 0, f"temperature must be > 0, got {temperature}"
    ent = _Entropy.apply(logits, float(temperature), int(chunk_rows))  # (B, L)
    return ent if mask is None else ent * mask.to(ent.dtype)
