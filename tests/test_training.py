"""The training plumbing: schedule, data order, weight-decay groups, the non-finite guard."""

import copy
import math

import pytest
import torch

from nanopatho import training


def test_lr_schedule_hand_values():
    # warmup 10 steps to 1.0, cosine to 0.1 at step 110
    assert training.lr_at(0, 110, 1.0, 10) == pytest.approx(0.1)
    assert training.lr_at(9, 110, 1.0, 10) == pytest.approx(1.0)
    assert training.lr_at(10, 110, 1.0, 10) == pytest.approx(1.0)
    assert training.lr_at(60, 110, 1.0, 10) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert training.lr_at(110, 110, 1.0, 10) == pytest.approx(0.1)
    assert training.lr_at(500, 110, 1.0, 10) == pytest.approx(0.1)


def test_batch_indices_cover_each_epoch_once_and_are_stateless():
    n, bs = 10, 4
    seen = [i for step in range(5) for i in training.batch_indices(n, bs, step, seed=3)]  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert training.batch_indices(n, bs, 3, seed=3) == seen[12:16]  # a pure function of the step
    assert training.batch_indices(n, bs, 3, seed=4) != seen[12:16]


def test_batch_indices_rank_slices_partition_the_global_batch():
    full = training.batch_indices(17, 6, 2, seed=0)
    parts = [training.batch_indices(17, 3, 2, seed=0, rank=r, world=2) for r in range(2)]
    assert parts[0] + parts[1] == full


def test_grouped_batches_hand_case_each_batch_one_length():
    # 8 short rows and 8 long ones, global batch 4, one run of 4 batches: sorting puts the short rows in
    # two batches and the long ones in two, so no batch pads a short row to a long one's length
    lengths = torch.tensor([1, 9] * 8)
    epoch = [training.grouped_batch_indices(lengths, 4, step, seed=0, group=4) for step in range(4)]
    assert sorted(len(set(lengths[b].tolist())) for b in epoch) == [1, 1, 1, 1]
    assert sorted(i for b in epoch for i in b) == list(range(16))
    plain = [training.batch_indices(16, 4, step, seed=0) for step in range(4)]
    assert sum(len(set(lengths[b].tolist())) for b in plain) > 4  # a plain shuffle mixes them


def test_grouped_batches_cover_an_epoch_once_stateless_and_split_over_ranks():
    lengths = torch.randint(1, 50, (103,), generator=torch.Generator().manual_seed(0))
    per_epoch = 103 // 8  # 12 global batches of 8; 7 rows wait for a later epoch
    seen = [i for step in range(per_epoch) for i in training.grouped_batch_indices(lengths, 8, step, 5, group=3)]
    assert len(seen) == len(set(seen)) == per_epoch * 8
    assert training.grouped_batch_indices(lengths, 8, 4, 5, group=3) == seen[32:40]  # a pure function of the step
    nxt = training.grouped_batch_indices(lengths, 8, per_epoch, 5, group=3)
    assert nxt != seen[:8] and len(set(nxt)) == 8  # the next epoch is a fresh order
    parts = [training.grouped_batch_indices(lengths, 4, 4, 5, group=3, rank=r, world=2) for r in range(2)]
    assert parts[0] + parts[1] == seen[32:40]
    # within a run of `group` batches every batch spans a contiguous range of the sorted lengths
    run = [sorted(lengths[seen[8 * b:8 * b + 8]].tolist()) for b in range(3)]
    run.sort()
    assert all(a[-1] <= b[0] for a, b in zip(run, run[1:]))


def test_weight_decay_groups():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.norm = torch.nn.LayerNorm(3)
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 3))
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))

    m = M()
    opt = training.make_optimizer(m, 1e-3, 0.1)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert decay == {id(m.lin.weight)}
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_nonfinite_gradient_skips_or_stops():
    lin = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    before = [p.detach().clone() for p in lin.parameters()]
    (lin(torch.ones(1, 2)) * float("nan")).sum().backward()
    norm, stepped = training.optimizer_step(lin, opt, grad_clip=1.0, on_nonfinite="skip")
    assert not stepped and not math.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
    assert all(p.grad is None for p in lin.parameters())
    (lin(torch.ones(1, 2)) * float("inf")).sum().backward()
    with pytest.raises(training.NonFiniteError):
        training.optimizer_step(lin, opt, grad_clip=1.0, on_nonfinite="stop")
    lin(torch.ones(1, 2)).sum().backward()
    _, stepped = training.optimizer_step(lin, opt, grad_clip=1.0)
    assert stepped and not torch.equal(before[0], lin.weight)


def test_generator_for_is_deterministic_and_keyed():
    a = torch.rand(3, generator=training.generator_for(0, 1, 2))
    b = torch.rand(3, generator=training.generator_for(0, 1, 2))
    c = torch.rand(3, generator=training.generator_for(0, 2, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lr_scale_groups_step_like_a_separate_optimizer_at_the_scaled_rate():
    """--projector_lr: parameters carrying lr_scale form their own groups at lr x lr_scale. By hand: AdamW's
    first step moves a bias (no decay) by lr * g / (|g| + eps) = lr in size. Property: the step equals that of
    separate optimizers at lr and lr x lr_scale."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    start = copy.deepcopy(m)
    for p in m[1].parameters():
        p.lr_scale = 10.0
    opt = training.make_optimizer(m, 1e-3, 0.1)
    training.set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 2e-3, 2e-2, 2e-2]  # decay, no-decay, scaled decay, no-decay
    assert {id(p) for p in opt.param_groups[2]["params"]} == {id(m[1].weight)}
    x = torch.randn(5, 3)
    ref = copy.deepcopy(start)
    for model in (m, ref):
        model(x).pow(2).sum().backward()
    opt.step()
    assert torch.allclose((m[0].bias - start[0].bias).abs(), torch.full((4,), 2e-3), rtol=1e-4)
    assert torch.allclose((m[1].bias - start[1].bias).abs(), torch.full((2,), 2e-2), rtol=1e-4)
    for layer, lr in ((0, 2e-3), (1, 2e-2)):
        sep = training.make_optimizer(ref[layer], 1e-3, 0.1)
        training.set_lr(sep, lr)
        sep.step()
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(m.parameters(), ref.parameters()))
