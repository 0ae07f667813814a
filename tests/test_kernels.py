"""Tests for nanopatho.kernels: the Triton fused policy loss vs the torch reference.

The kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before triton
is imported). The oracle is rl.policy_loss applied to float64 log-probs from a full
float64 log_softmax, differentiated by autograd. Shapes are tiny: the interpreter runs
each program (one token) in Python.

    python -m pytest -q tests/test_kernels.py
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import

import math
import subprocess
import sys

import pytest
import torch

from nanopatho import rl
from nanopatho.kernels import _use_triton, fused_policy_loss, token_logprobs, triton_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
RTOL = 1e-5  # fp32 kernel vs float64 oracle


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocabulary blocks of 64 columns, so V = 300 spans 5 blocks with a ragged tail (300 = 4*64 + 44)."""
    if triton_available():
        from nanopatho.kernels import policy_loss_triton
        monkeypatch.setattr(policy_loss_triton, "FWD_MAX_BLOCK_V", 64)
        monkeypatch.setattr(policy_loss_triton, "BWD_MAX_BLOCK_V", 64)


def reference(logits, ids, logp_old, adv, mask, *, temperature, eps_low, eps_high, logp_ref=None, beta=0.0,
              **agg_args):
    """(loss, stats, dlogits) from a float64 log_softmax + rl.policy_loss + autograd."""
    x = logits.detach().double().requires_grad_(True)  # (B, L, V)
    logp = torch.log_softmax(x / temperature, dim=-1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]  # (B, L)
    loss, stats = rl.policy_loss(logp, logp_old.double(), adv.double(), mask, eps_low=eps_low, eps_high=eps_high,
                                 logp_ref=None if logp_ref is None else logp_ref.double(), beta=beta, **agg_args)
    loss.backward()
    return loss.detach(), stats, x.grad


def run_fused(logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss, stats = fused_policy_loss(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), stats, x.grad


def make_batch(B, L, V, *, temperature=0.7, eps_low=0.2, eps_high=0.28, seed=0, dtype=torch.float32):
    """Random logits; logp_old set so tokens fall below, inside and above the clip range, with both
    advantage signs; one all-masked row whose ids are padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(B, L, V, generator=g)).to(dtype)  # (B, L, V)
    ids = torch.randint(0, V, (B, L), generator=g)  # (B, L)
    logp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, ids[..., None])[..., 0]  # (B, L)
    ratios = torch.tensor([0.5, 0.95, 1.0 + eps_high + 0.3])  # below / inside / above the clip range
    target_ratio = ratios[torch.arange(B * L) % 3].view(B, L)
    logp_old = (logp - target_ratio.double().log()).float()  # rho = target_ratio
    adv = torch.where(torch.arange(B * L).view(B, L) % 2 == 0, 1.0, -1.0) * torch.rand(B, L, generator=g).add(0.5)
    logp_ref = (logp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    mask = (torch.rand(B, L, generator=g) > 0.2).float()
    mask[1 % B] = 0.0
    ids[1 % B] = -1
    return dict(logits=logits, ids=ids, logp_old=logp_old, adv=adv, logp_ref=logp_ref, mask=mask)


def assert_close_rel(actual, expected, rtol):
    """|a - e| <= rtol * |e| + rtol * max|e|: relative, with a floor for entries near zero."""
    expected = expected.to(actual.dtype) if actual.dtype == torch.float64 else expected
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol,
                               atol=rtol * expected.double().abs().max().item())


# -----------------------------------------------------------------------------
# hand-computed case


@requires_triton
def test_hand_computed_two_word_vocab():
    """V = 2, logits (0, log 3): p(id=1) = 3/4; logp_old = log 1/2 so rho = 1.5 > 1 + 0.28.
    A = +1: clipped high, loss = -1.28, gradient 0.
    A = -1: unclipped branch, loss = max(1.5, 1.28) = 1.5, dlogp = -rho A = 1.5,
            dlogits = (onehot(1) - p) * 1.5 = (-1/4, 1/4) * 1.5 = (-0.375, 0.375)."""
    from nanopatho.kernels.policy_loss_triton import policy_loss_per_token
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]], requires_grad=True)  # (1, 2, 2)
    ids = torch.tensor([[1, 1]])
    logp_old = torch.full((1, 2), math.log(0.5))
    adv = torch.tensor([[1.0, -1.0]])
    loss, kl, low, high, logp = policy_loss_per_token(
        logits, ids, torch.ones(1, 2), logp_old, adv, None, temperature=1.0, eps_low=0.2, eps_high=0.28, beta=0.0)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 1.5]]))
    torch.testing.assert_close(logp, torch.full((1, 2), math.log(0.75)))
    assert high.tolist() == [[True, False]] and low.tolist() == [[False, False]]
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.0, 0.0], [-0.375, 0.375]]]))
    assert torch.equal(kl, torch.zeros(1, 2))


# -----------------------------------------------------------------------------
# property tests against the float64 oracle


AGGS = [("token-mean", {}), ("token-mean", {"num_tokens": 40}), ("seq-mean-token-mean", {}),
        ("seq-mean-token-sum-norm", {"max_len": 16})]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg,agg_args", AGGS)
def test_loss_and_grad_match_reference_fp32(small_blocks, impl, agg, agg_args):
    """V = 300 over ragged 64-wide blocks, odd L = 7, T = 0.7, beta = 0.05, eps 0.2 / 0.28, an all-masked row."""
    if impl == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    b = make_batch(3, 7, 300)
    kw = dict(temperature=0.7, eps_low=0.2, eps_high=0.28, logp_ref=b["logp_ref"], beta=0.05, agg=agg, **agg_args)
    ref_loss, ref_stats, ref_grad = reference(b["logits"], b["ids"], b["logp_old"], b["adv"], b["mask"], **kw)
    loss, stats, grad = run_fused(b["logits"], b["ids"], b["logp_old"], b["adv"], b["mask"], impl=impl, **kw)
    assert abs(loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    assert_close_rel(grad, ref_grad, RTOL)
    assert grad.dtype == torch.float32 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert stats.keys() == ref_stats.keys()
    for k in stats:
        assert abs(stats[k].item() - ref_stats[k].item()) <= 1e-5 * max(1.0, abs(ref_stats[k].item())), k


@requires_triton
def test_every_clip_region_flags_and_zero_gradient(small_blocks):
    """Per-token outputs vs rl.clipped_token_loss / rl.kl_k3; all 6 (region, sign) cells present;
    with beta = 0, clipped tokens get exactly zero gradient and unclipped ones do not."""
    from nanopatho.kernels.policy_loss_triton import policy_loss_per_token
    b = make_batch(4, 9, 100, eps_low=0.1, eps_high=0.3)
    valid = b["mask"] > 0
    logp64 = torch.log_softmax(b["logits"].double() / 0.7, -1).gather(-1, b["ids"].clamp(min=0)[..., None])[..., 0]
    ref_tok, ref_low, ref_high = rl.clipped_token_loss(logp64, b["logp_old"].double(), b["adv"].double(),
                                                       eps_low=0.1, eps_high=0.3)
    x = b["logits"].clone().requires_grad_(True)
    loss, kl, low, high, logp = policy_loss_per_token(
        x, b["ids"].clamp(min=0), valid, b["logp_old"], b["adv"], b["logp_ref"],
        temperature=0.7, eps_low=0.1, eps_high=0.3, beta=0.0)
    loss.sum().backward()
    assert torch.equal(low, ref_low & valid) and torch.equal(high, ref_high & valid)
    assert_close_rel(loss, torch.where(valid, ref_tok, 0.0), RTOL)
    assert_close_rel(kl, torch.where(valid, rl.kl_k3(logp64, b["logp_ref"].double()), 0.0), RTOL)
    assert_close_rel(logp, torch.where(valid, logp64, 0.0), RTOL)
    ratio = torch.exp(logp64 - b["logp_old"].double())
    cells = {(r, s) for r, s in zip(((ratio < 0.9).long() - (ratio > 1.3).long())[valid].tolist(),
                                    (b["adv"] > 0)[valid].tolist())}
    assert len(cells) == 6, cells
    row_zero = (x.grad == 0).all(-1)  # (B, L)
    assert torch.equal(row_zero, ~valid | low | high)


@requires_triton
def test_gradient_through_kl_output(small_blocks):
    """The KL output is differentiable too: d(sum loss + 3 sum kl) matches the oracle."""
    from nanopatho.kernels.policy_loss_triton import policy_loss_per_token
    b = make_batch(2, 5, 130)
    valid = b["mask"] > 0
    x = b["logits"].clone().requires_grad_(True)
    loss, kl, *_ = policy_loss_per_token(x, b["ids"].clamp(min=0), valid, b["logp_old"], b["adv"], b["logp_ref"],
                                         temperature=1.3, eps_low=0.2, eps_high=0.2, beta=0.1)
    (loss.sum() + 3.0 * kl.sum()).backward()
    x64 = b["logits"].double().requires_grad_(True)
    logp = torch.log_softmax(x64 / 1.3, -1).gather(-1, b["ids"].clamp(min=0)[..., None])[..., 0]
    tok, _, _ = rl.clipped_token_loss(logp, b["logp_old"].double(), b["adv"].double(), eps_low=0.2, eps_high=0.2)
    k3 = rl.kl_k3(logp, b["logp_ref"].double())
    ((tok + 0.1 * k3 + 3.0 * k3) * valid).sum().backward()
    assert_close_rel(x.grad, x64.grad, RTOL)


@requires_triton
def test_bf16_logits(small_blocks):
    """bf16 logits. The kernel upcasts each logit exactly and accumulates in fp32, so the loss keeps
    the fp32 tolerance against the oracle fed the same (upcast) bf16 values. dlogits are written in
    bf16 (8-bit mantissa, unit roundoff 2**-9 ~ 2e-3): a correctly rounded fp32 gradient differs by
    at most 2**-9 relative, so we allow 2**-7 (4 roundoffs) relative, with the same floor at max|ref|."""
    b = make_batch(3, 7, 300, dtype=torch.bfloat16)
    kw = dict(temperature=0.7, eps_low=0.2, eps_high=0.28, logp_ref=b["logp_ref"], beta=0.05)
    ref_loss, _, ref_grad = reference(b["logits"], b["ids"], b["logp_old"], b["adv"], b["mask"], **kw)
    loss, _, grad = run_fused(b["logits"], b["ids"], b["logp_old"], b["adv"], b["mask"], impl="triton", **kw)
    assert grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    assert_close_rel(grad, ref_grad, 2 ** -7)


@requires_triton
def test_masked_tokens_get_exact_zero_gradients():
    """Masked rows hold huge logits and padding ids: their gradient is exactly 0, nothing is nan;
    an all-masked batch gives loss 0 and an all-zero gradient."""
    b = make_batch(2, 5, 40)
    b["logits"][1] = 1e4
    kw = dict(eps_low=0.2, eps_high=0.28, logp_ref=b["logp_ref"], beta=0.1, impl="triton")
    loss, _, grad = run_fused(b["logits"], b["ids"], b["logp_old"], b["adv"], b["mask"], **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert torch.equal(grad[0][b["mask"][0] == 0], torch.zeros_like(grad[0][b["mask"][0] == 0]))
    for agg in rl.AGG_MODES:
        loss, _, grad = run_fused(b["logits"], b["ids"], b["logp_old"], b["adv"], torch.zeros(2, 5), agg=agg, **kw)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@requires_triton
def test_long_sequence_grid():
    """B * L = 1000 tokens, one program each on grid axis 0, with a small V. (The interpreter has no
    grid-size limits, so the 65,535 limit of axes 1 and 2 is exercised by the GPU bench's check.)"""
    b = make_batch(1, 1000, 12, seed=3)
    b["mask"][0] = 1.0
    b["ids"] = b["ids"].clamp(min=0)
    kw = dict(temperature=1.0, eps_low=0.2, eps_high=0.2, agg="seq-mean-token-mean")
    ref_loss, _, ref_grad = reference(b["logits"], b["ids"], b["logp_old"], b["adv"], b["mask"], **kw)
    loss, _, grad = run_fused(b["logits"], b["ids"], b["logp_old"], b["adv"], b["mask"], impl="triton", **kw)
    assert abs(loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    assert_close_rel(grad, ref_grad, RTOL)


# -----------------------------------------------------------------------------
# token_logprobs and dispatch


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_reference(small_blocks, impl, dtype):
    if impl == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    g = torch.Generator().manual_seed(1)
    logits = (3.0 * torch.randn(2, 9, 300, generator=g)).to(dtype)  # (B, L, V)
    ids = torch.randint(0, 300, (2, 9), generator=g)
    ids[0, 0] = -1  # padding reads as id 0, as rl.token_logprobs_torch
    ref = torch.log_softmax(logits.double() / 1.3, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    out = token_logprobs(logits.requires_grad_(True), ids, 1.3, impl=impl)
    assert out.dtype == torch.float32 and out.shape == (2, 9) and not out.requires_grad
    assert_close_rel(out, ref, RTOL)
    assert_close_rel(out, rl.token_logprobs_torch(logits.detach(), ids, 1.3), RTOL)


def test_dispatch_rules():
    cpu = torch.zeros(1, 2, 3)
    assert _use_triton(cpu, "auto") is False  # auto = triton on CUDA only
    assert _use_triton(cpu, "torch") is False
    with pytest.raises(AssertionError, match="impl must be one of"):
        _use_triton(cpu, "cuda")
    with pytest.raises(ValueError, match="ids outside"):
        fused_policy_loss(cpu, torch.tensor([[0, 3]]), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2))


def _run_python(code, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_imports_and_runs_without_triton():
    """With triton unimportable, the package imports, auto runs the torch path, and impl='triton'
    says what to install."""
    code = ("import sys\nsys.modules['triton'] = None  # import triton now fails; find_spec returns None\n"
            "import torch\nfrom nanopatho.kernels import fused_policy_loss\n"
            "x = torch.randn(1, 3, 5, requires_grad=True)\n"
            "args = (x, torch.tensor([[1, 2, 3]]), torch.zeros(1, 3), torch.ones(1), torch.ones(1, 3))\n"
            "loss, _ = fused_policy_loss(*args); loss.backward(); assert x.grad is not None\n"
            "try:\n    fused_policy_loss(*args, impl='triton')\nexcept RuntimeError as e:\n    print(e)\n")
    out = _run_python(code, {})
    assert out.returncode == 0, out.stderr
    assert "needs the triton package" in out.stdout


@requires_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch\nfrom nanopatho.kernels import fused_policy_loss\n"
            "args = (torch.randn(1, 3, 5), torch.tensor([[1, 2, 3]]), torch.zeros(1, 3), torch.ones(1), torch.ones(1, 3))\n"
            "try:\n    fused_policy_loss(*args, impl='triton')\nexcept RuntimeError as e:\n    print(e)\n")
    out = _run_python(code, {})
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout
