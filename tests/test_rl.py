"""nanopatho.rl: every formula on a hand-computed case, plus property tests.

    python -m pytest -q tests/test_rl.py
(the DDP test re-runs this file under torchrun as its own 2-rank worker)
"""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanopatho.rl import (aggregate, clipped_token_loss, entropy_from_logits, group_advantages,
                          informative_groups, kl_k3, mask_truncated, overlong_penalty, policy_loss,
                          token_logprobs_torch)

# -----------------------------------------------------------------------------
# advantages


def test_group_advantages_hand_case():
    # group 1: [1, 0, 0, 1] mean .5, unbiased std sqrt(4·.25/3) = sqrt(1/3) = .57735 -> ±.5/.57735 = ±.86603
    # group 2: [.5, .5, .5, .5] all equal -> exactly 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4)
    s = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(a, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-6)
    assert torch.equal(a[4:], torch.zeros(4))


def test_group_advantages_three_values():
    # [3, 1, 2]: mean 2, unbiased std sqrt((1+1+0)/2) = 1 -> [1, -1, 0] / (1 + 1e-6)
    a = group_advantages(torch.tensor([3.0, 1.0, 2.0]), 3)
    assert torch.allclose(a, torch.tensor([1.0, -1.0, 0.0]) / (1 + 1e-6), atol=1e-7)


def test_group_advantages_equal_rewards_with_rounding_is_exactly_zero():
    # mean of three 0.1s is not exactly 0.1 in floating point; the flat group must still be 0
    a = group_advantages(torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), 3)
    assert torch.equal(a, torch.zeros(3, dtype=torch.float64))


def test_group_advantages_group_size_one_is_zero():
    for scale in ("group", "batch", "none"):
        a = group_advantages(torch.tensor([1.0, 0.0, 0.3]), 1, scale=scale)
        assert torch.equal(a, torch.zeros(3)), scale


def test_group_advantages_batch_and_none_scales():
    # groups [1, 0] and [1, 1]; means .5 and 1; r − mean = [.5, −.5, 0, 0]
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.allclose(group_advantages(r, 2, scale="none"), torch.tensor([0.5, -0.5, 0, 0]))
    # batch std (unbiased) of [1, 0, 1, 1]: mean .75, Σ(r−m)² = 3·.0625 + .5625 = .75, /3 = .25 -> std .5
    a = group_advantages(r, 2, scale="batch")
    assert torch.allclose(a, torch.tensor([0.5, -0.5, 0, 0]) / (0.5 + 1e-6), atol=1e-6)


def test_group_advantages_properties():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 4, (64,), generator=g).float()
    a = group_advantages(r, 8).view(8, 8)
    assert torch.allclose(a.sum(1), torch.zeros(8), atol=1e-5)          # zero-mean per group
    keep = informative_groups(r, 8)
    assert torch.allclose(a[keep].std(1), torch.ones(int(keep.sum())), atol=1e-4)  # unit std per group
    shift = group_advantages(r * 3 + 7, 8).view(8, 8)                  # affine-invariant
    assert torch.allclose(shift, a, atol=1e-4)

# -----------------------------------------------------------------------------
# filters, dynamic sampling, overlong shaping


def test_informative_groups_exact():
    r = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1, 0.5, 0.5, 0.5, 0.5000001], dtype=torch.float64)
    assert informative_groups(r, 3).tolist() == [False, False, True, True]
    assert informative_groups(torch.tensor([1.0, 0.0]), 1).tolist() == [False, False]


def test_overlong_penalty_three_regions():
    # L_max 20, L_cache 4 -> free up to 16; 18 is halfway into the buffer: (16 − 18) / 4 = −.5
    lengths = torch.tensor([0, 10, 16, 17, 18, 20, 21, 100])
    p = overlong_penalty(lengths, max_len=20, cache_len=4)
    assert torch.allclose(p, torch.tensor([0, 0, 0, -0.25, -0.5, -1.0, -1.0, -1.0]))
    # cache_len 0: a hard cliff just after max_len
    assert overlong_penalty(torch.tensor([20, 21]), 20, 0).tolist() == [0.0, -1.0]


def test_mask_truncated():
    mask = torch.ones(3, 4)
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.sum(1).tolist() == [4.0, 0.0, 4.0]

# -----------------------------------------------------------------------------
# per-token loss, KL, aggregation


def test_clipped_token_loss_hand_case_and_clip_flags():
    # ε_low .2, ε_high .28. Tokens (ρ, A) and the loss −min(ρA, clip(ρ)A):
    #  (1.5,  +1): clip -> 1.28, min(1.5, 1.28) = 1.28 -> −1.28, clipped_high
    #  (1.5,  −1): min(−1.5, −1.28) = −1.5 -> 1.5, not clipped (pessimistic branch)
    #  (0.5,  −1): clip -> .8, min(−.5, −.8) = −.8 -> .8, clipped_low
    #  (0.5,  +1): min(.5, .8) = .5 -> −.5, not clipped
    #  (1.1,  +2): inside -> −2.2
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0]])
    loss, low, high = clipped_token_loss(ratio.log(), torch.zeros_like(ratio), adv, eps_low=0.2, eps_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.28, 1.5, 0.8, -0.5, -2.2]]), atol=1e-6)
    assert low.tolist() == [[False, False, True, False, False]]
    assert high.tolist() == [[True, False, False, False, False]]


def test_clip_fractions_in_stats():
    # ε .2 both sides, per-token advantages. 4 valid tokens: (ρ .5, A −1) clipped low; (ρ 1.5, A +1)
    # clipped high; two at ρ 1. The masked (ρ 2, A +1) would be clipped high but is not counted.
    ratio = torch.tensor([[0.5, 1.5, 1.0], [1.0, 1.0, 2.0]])
    adv = torch.tensor([[-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    _, stats = policy_loss(ratio.log(), torch.zeros(2, 3), adv, mask, eps_low=0.2, eps_high=0.2)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 4)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 4)
    assert stats["clip_frac"].item() == pytest.approx(2 / 4)
    assert stats["ratio_max"].item() == pytest.approx(1.5)            # the masked 2.0 is not counted
    assert stats["ratio_mean"].item() == pytest.approx((0.5 + 1.5 + 1 + 1) / 4)


def test_kl_k3_hand_case():
    # d = ref − logp: d=0 -> 0; d=1 -> e − 2 = .71828; d=−1 -> e⁻¹ = .36788
    logp = torch.tensor([[0.0, -1.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0, -1.0]])
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([[0.0, math.e - 2, 1 / math.e]]), atol=1e-6)
    assert (kl_k3(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


def test_aggregate_modes_hand_case():
    # values [[1, 2, 3], [4, 5, 6]], mask [[1, 1, 0], [1, 0, 0]]: valid 1, 2 | 4
    v = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    m = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    # token-mean: (1+2+4)/3 = 7/3; with a global count of 7 tokens: 7/7 = 1
    assert aggregate(v, m, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate(v, m, "token-mean", num_tokens=7).item() == pytest.approx(1.0)
    # seq-mean-token-mean: ((1+2)/2 + 4/1) / 2 = (1.5 + 4) / 2 = 2.75; over 4 global sequences 5.5/4
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert aggregate(v, m, "seq-mean-token-mean", num_seqs=4).item() == pytest.approx(1.375)
    # seq-mean-token-sum-norm: 7 / (B·L) = 7/6; with max_len 10: 7/20
    assert aggregate(v, m, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)
    assert aggregate(v, m, "seq-mean-token-sum-norm", max_len=10).item() == pytest.approx(7 / 20)
    # all masked: 0, not NaN
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert aggregate(v, torch.zeros_like(m), agg).item() == 0.0


def test_policy_loss_beta_adds_k3_per_token_before_aggregation():
    # 1 sequence, 2 valid tokens, ρ = 1, A = 1 -> pg −1 each; k3(d=1) = e − 2. β = .5, seq-mean-token-mean:
    # ((−1 + .5(e−2)) + (−1 + .5(e−2))) / 2 = −1 + .5(e − 2) = −.64086
    logp = torch.tensor([[0.0, 0.0, 0.0]])
    ref = torch.tensor([[1.0, 1.0, 1.0]])
    loss, stats = policy_loss(logp, logp, torch.tensor([1.0]), torch.tensor([[1.0, 1, 0]]), eps_low=0.2,
                              eps_high=0.2, logp_ref=ref, beta=0.5, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-1 + 0.5 * (math.e - 2), abs=1e-6)
    assert stats["kl"].item() == pytest.approx(math.e - 2, abs=1e-6)
    assert stats["pg_loss"].item() == pytest.approx(-1.0)

# -----------------------------------------------------------------------------
# gradients


def reference_loss_f64(logp, logp_old, adv, mask, eps_low, eps_high, logp_ref, beta, agg, max_len):
    """Independent float64 implementation written token by token (PPO max-of-negatives form)."""
    B, L = logp.shape
    total, seq_terms, n_tok = 0.0, [], 0.0
    for i in range(B):
        row, row_tok = 0.0, 0.0
        for t in range(L):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logp[i, t] - logp_old[i, t])
            a = adv[i]
            surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high))
            d = logp_ref[i, t] - logp[i, t]
            row = row + surrogate + beta * (torch.exp(d) - d - 1)
            row_tok += 1
        seq_terms.append(row / max(row_tok, 1))
        total = total + row
        n_tok += row_tok
    if agg == "token-mean":
        return total / n_tok
    if agg == "seq-mean-token-mean":
        return sum(seq_terms) / B
    return total / (B * max_len)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_gradient_matches_float64_reference(agg):
    g = torch.Generator().manual_seed(1)
    B, L = 6, 7
    logp_old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    logp0 = logp_old + (torch.rand(B, L, generator=g, dtype=torch.float64) - 0.5) * 1.4  # ρ ∈ [.5, 2]
    logp_ref = logp_old + torch.randn(B, L, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.2], dtype=torch.float64)
    mask = (torch.rand(B, L, generator=g) > 0.25).double()
    mask[:, 0] = 1
    ratio = (logp0 - logp_old).exp()
    a = adv[:, None].expand(B, L)
    valid = mask > 0
    # coverage: every clip region with both advantage signs among the valid tokens
    for region in (ratio < 0.8, (ratio >= 0.8) & (ratio <= 1.28), ratio > 1.28):
        assert (region & (a > 0) & valid).any() and (region & (a < 0) & valid).any()
    kwargs = dict(eps_low=0.2, eps_high=0.28)
    ours = logp0.clone().requires_grad_(True)
    loss, _ = policy_loss(ours, logp_old, adv, mask, logp_ref=logp_ref, beta=0.05, agg=agg, max_len=9, **kwargs)
    loss.backward()
    ref = logp0.clone().requires_grad_(True)
    expected = reference_loss_f64(ref, logp_old, adv, mask, 0.2, 0.28, logp_ref, 0.05, agg, 9)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)
    assert (ours.grad[mask == 0] == 0).all()
    # float32 path agrees too
    ours32 = logp0.float().requires_grad_(True)
    loss32, _ = policy_loss(ours32, logp_old.float(), adv.float(), mask.float(), logp_ref=logp_ref.float(),
                            beta=0.05, agg=agg, max_len=9, **kwargs)
    loss32.backward()
    assert torch.allclose(ours32.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)


def test_on_policy_first_step_loss_zero_gradient_nonzero():
    # First update on fresh samples: logp_old = logp.detach(), so ρ = 1 and nothing is clipped.
    # The loss value is −Σ A_i · 1 / ..., and with seq-mean-token-mean each sequence contributes −A_i,
    # so loss = −mean(A) = 0 after group normalisation. But ∂ρ/∂logp = ρ = 1, so the gradient is
    # −A_i ∇logp / (n · |o_i|): the policy-gradient itself. "Loss ≈ 0" in GRPO logs is expected.
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(4, 5, generator=g) * 2).requires_grad_(True)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    mask = torch.ones(4, 5)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.2, agg="seq-mean-token-mean")
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert logp.grad.abs().min() > 0
    assert torch.allclose(logp.grad, -adv[:, None].expand(4, 5) / (4 * 5), atol=1e-7)
    assert stats["clip_frac"].item() == 0.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_masked_tokens_never_reach_the_loss_whatever_they_hold(agg):
    """What sits under mask 0 does not count, even where exp of it overflows: the sampler writes logp_old = 0
    there (and score() logp_ref = 0), while the policy's own logp is real (-120: exp(0 + 120) is inf in fp32,
    and inf * 0 is nan)."""
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.2, 0.4])
    old = (-torch.rand(3, 5, generator=g)).masked_fill(mask == 0, 0.0)  # (3, 5)
    ref = (-torch.rand(3, 5, generator=g)).masked_fill(mask == 0, 0.0)  # (3, 5)
    base = -torch.rand(3, 5, generator=g)  # (3, 5)
    results = []
    for masked_logp in (-120.0, -0.5):
        logp = base.masked_fill(mask == 0, masked_logp).requires_grad_(True)
        loss, stats = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, logp_ref=ref, beta=0.04, agg=agg)
        loss.backward()
        results.append((loss.detach(), logp.grad, stats["kl"]))
    (loss_a, grad_a, kl_a), (loss_b, grad_b, kl_b) = results
    assert torch.isfinite(loss_a) and torch.isfinite(grad_a).all() and torch.isfinite(kl_a)
    assert torch.allclose(loss_a, loss_b) and torch.allclose(grad_a, grad_b) and torch.allclose(kl_a, kl_b)
    assert (grad_a[mask == 0] == 0).all() and (grad_a[mask == 1] != 0).all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batched_equals_full_batch(agg):
    # Summing micro-batch losses normalised by the GLOBAL counts equals the full-batch loss, grads too.
    g = torch.Generator().manual_seed(3)
    B, L = 8, 6
    logp_old = -torch.rand(B, L, generator=g) * 2
    logp0 = logp_old + (torch.rand(B, L, generator=g) - 0.5)
    ref = logp_old + 0.1 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg, max_len=L)
    full = logp0.clone().requires_grad_(True)
    loss_full, _ = policy_loss(full, logp_old, adv, mask, logp_ref=ref, **kw)
    loss_full.backward()
    micro = logp0.clone().requires_grad_(True)
    num_tokens = mask.sum()                                        # global: summed over micro-batches
    total = 0.0
    for s in range(0, B, 3):                                        # uneven micro-batches 3, 3, 2
        part, _ = policy_loss(micro[s:s + 3], logp_old[s:s + 3], adv[s:s + 3], mask[s:s + 3],
                              logp_ref=ref[s:s + 3], num_tokens=num_tokens, num_seqs=B, **kw)
        part.backward()
        total += part.item()
    assert total == pytest.approx(loss_full.item(), rel=1e-5)
    assert torch.allclose(micro.grad, full.grad, atol=1e-7)


def test_micro_batched_token_mean_with_local_count_differs():
    # The bug the global count prevents: normalising each micro-batch by its own tokens.
    v = torch.tensor([[1.0, 1.0, 1.0], [5.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    full = aggregate(v, m, "token-mean")                           # 8 / 4 = 2
    local = sum(aggregate(v[i:i + 1], m[i:i + 1], "token-mean") for i in range(2)) / 2  # (1 + 5) / 2 = 3
    glob = sum(aggregate(v[i:i + 1], m[i:i + 1], "token-mean", num_tokens=4) for i in range(2))
    assert full.item() == pytest.approx(2.0) and local.item() == pytest.approx(3.0)
    assert glob.item() == pytest.approx(2.0)

# -----------------------------------------------------------------------------
# log-probs and entropy from logits


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_naive(chunk_rows, temperature):
    g = torch.Generator().manual_seed(4)
    B, L, V = 3, 5, 11
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (B, L), generator=g)
    w = torch.randn(B, L, generator=g, dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    out = token_logprobs_torch(a, ids, temperature, chunk_rows=chunk_rows)
    (out * w).sum().backward()
    b = logits.clone().requires_grad_(True)
    naive = torch.log_softmax(b / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)
    (naive * w).sum().backward()
    assert torch.allclose(out, naive, atol=1e-12)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_token_logprobs_non_contiguous_slice():
    # the trainer passes logits[:, prompt_len - 1 : -1]: a strided view, used without copying
    g = torch.Generator().manual_seed(8)
    full = torch.randn(3, 9, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 6, (3, 5), generator=g)
    for chunk_rows in (2, 5, 11):
        a = full.clone().requires_grad_(True)
        token_logprobs_torch(a[:, 2:7], ids, chunk_rows=chunk_rows).sum().backward()
        b = full.clone().requires_grad_(True)
        torch.log_softmax(b[:, 2:7], -1).gather(-1, ids[..., None]).sum().backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_token_logprobs_never_makes_a_full_fp32_tensor():
    # Record every tensor produced during forward + backward on bf16 logits: none in fp32 may be
    # as large as (B, L, V); the only full-size one is the bf16 gradient itself.
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    LargestFloat32.largest = max(LargestFloat32.largest, t.numel())
            return out

    B, L, V = 4, 16, 50
    logits = torch.randn(B, L, V).bfloat16().requires_grad_(True)
    ids = torch.randint(0, V, (B, L))
    with LargestFloat32():
        token_logprobs_torch(logits, ids, chunk_rows=8).sum().backward()
        entropy_from_logits(logits, chunk_rows=8).sum().backward()
    assert 0 < LargestFloat32.largest <= 8 * V * 2                    # a couple of chunks at most
    assert logits.grad.shape == (B, L, V)


def test_token_logprobs_bf16_and_negative_ids():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 9, generator=g).bfloat16().requires_grad_(True)
    ids = torch.tensor([[1, 2, 3, -1], [0, 8, -1, -1]])             # −1 = padding target
    out = token_logprobs_torch(logits, ids, chunk_rows=3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    naive = torch.log_softmax(logits.float(), -1).gather(-1, ids.clamp(min=0)[..., None]).squeeze(-1)
    assert torch.allclose(out, naive, atol=1e-6)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_entropy_matches_naive(chunk_rows):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]], dtype=torch.float64)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    h = entropy_from_logits(a, mask, temperature=0.8, chunk_rows=chunk_rows)
    (h * w).sum().backward()
    b = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(b / 0.8, -1)
    naive = -(logp.exp() * logp).sum(-1) * mask
    (naive * w).sum().backward()
    assert torch.allclose(h, naive, atol=1e-12) and torch.allclose(a.grad, b.grad, atol=1e-12)
    # uniform logits: entropy log V
    assert entropy_from_logits(torch.zeros(1, 1, 7)).item() == pytest.approx(math.log(7), abs=1e-6)


def test_policy_loss_end_to_end_from_logits_with_entropy_bonus():
    # The loss is differentiable all the way to the logits, and the entropy bonus pushes entropy up.
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 5, generator=g).requires_grad_(True)
    ids = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.ones(2, 3)
    logp = token_logprobs_torch(logits, ids)
    ent = entropy_from_logits(logits, mask)
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(2), mask, eps_low=0.2, eps_high=0.2,
                              entropy=ent, entropy_coef=1.0)
    loss.backward()                                                 # A = 0: only −H remains
    assert stats["entropy"].item() == pytest.approx(ent.mean().item())
    stepped = logits.detach() - 1.0 * logits.grad
    assert entropy_from_logits(stepped).mean() > ent.mean()

# -----------------------------------------------------------------------------
# a real 2-process torchrun (gloo) equals one process


def ddp_case():
    """A tiny policy (linear head over fixed features) and one rollout batch, same on every rank."""
    g = torch.Generator().manual_seed(9)
    B, L, V, C = 8, 6, 7, 4
    feats = torch.randn(B, L, C, generator=g)
    ids = torch.randint(0, V, (B, L), generator=g)
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 6, 4])                 # uneven: local counts != global / 2
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    adv = group_advantages(torch.randint(0, 2, (B,), generator=g).float(), 4)
    torch.manual_seed(0)
    head = torch.nn.Linear(C, V)
    with torch.no_grad():
        logp_old = token_logprobs_torch(head(feats), ids) + 0.3 * torch.randn(B, L, generator=g)
    return head, feats, ids, mask, adv, logp_old


def ddp_worker(out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nanopatho import dist as nd
    nd.init("cpu")
    world, rank = nd.world_size(), nd.rank()
    head, feats, ids, mask, adv, logp_old = ddp_case()
    model = DDP(head)
    part = slice(rank * 4, rank * 4 + 4)                            # each rank rolls out its own 4
    num_tokens = nd.all_reduce_sum(mask[part].sum())               # GLOBAL valid-token count
    logp = token_logprobs_torch(model(feats[part]), ids[part])
    loss, _ = policy_loss(logp, logp_old[part], adv[part], mask[part], eps_low=0.2, eps_high=0.28,
                          num_tokens=num_tokens)
    (loss * world).backward()                                       # DDP averages grads: undo the 1/world
    total = nd.all_reduce_sum(loss.detach().clone())
    if rank == 0:
        torch.save({"loss": total, "grads": {n: p.grad for n, p in head.named_parameters()}}, out_path)
    del model                      # free DDP's gloo reducer before the group: else rare SIGABRT at exit
    dist.barrier()
    nd.shutdown()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_rank_torchrun_equals_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", os.path.abspath(__file__), str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    head, feats, ids, mask, adv, logp_old = ddp_case()
    loss, _ = policy_loss(token_logprobs_torch(head(feats), ids), logp_old, adv, mask, eps_low=0.2, eps_high=0.28)
    loss.backward()
    assert torch.allclose(ddp["loss"], loss.detach(), atol=1e-6)
    for name, p in head.named_parameters():
        assert torch.allclose(ddp["grads"][name], p.grad, atol=1e-6), name


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
