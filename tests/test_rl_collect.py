"""train_rl.collect: the rollouts of one step and what it logs about them.

    python -m pytest -q tests/test_rl_collect.py

rollout is replaced by a fake whose group rewards are fixed per round, so the bookkeeping is checked
by hand: GRPO keeps every group of its one round, DAPO keeps the informative ones over rounds, and
`informative` is the share of sampled groups whose rewards differ (all-equal groups have zero advantage).
"""

import types

import torch

import train_rl

G = 2  # group size
ROUNDS = [[1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0],   # round 0: groups flat, mixed, flat, flat
          [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.3, 0.3],   # round 1: mixed, mixed, flat, flat
          [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]]   # round 2: every group mixed


def fake_rollout(cfg, model, tokenizer, items, images, indices, gen, device, calls):
    r = torch.tensor(ROUNDS[len(calls)])  # (P*G,)
    calls.append(list(indices))
    return dict(reward=r, row=torch.arange(len(r)) + 100 * len(calls))


def run(monkeypatch, dynamic_sampling):
    calls = []
    monkeypatch.setattr(train_rl, "rollout", lambda *a: fake_rollout(*a, calls))
    cfg = types.SimpleNamespace(group_size=G, prompts_per_step=4, dynamic_sampling=dynamic_sampling, max_gen_rounds=3,
                                stream=False, seed=0)
    questions = ([{}] * 16, None)
    batch, info = train_rl.collect(cfg, None, None, questions, step=0, device="cpu")
    return batch, info, calls


def test_grpo_keeps_its_one_round_and_logs_the_informative_share(monkeypatch):
    batch, info, calls = run(monkeypatch, dynamic_sampling=0)
    assert len(calls) == 1 and len(calls[0]) == 4
    assert batch["reward"].tolist() == ROUNDS[0]  # every group, flat ones included
    assert info == dict(gen_rounds=1, groups_sampled=4, groups_kept=4, informative=0.25)


def test_dapo_fills_with_informative_groups_over_rounds(monkeypatch):
    batch, info, calls = run(monkeypatch, dynamic_sampling=1)
    assert len(calls) == 3  # 1 informative group after round 0, 3 after round 1, 7 after round 2
    assert batch["reward"].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]  # in order, cut to 4 groups
    assert batch["row"].tolist() == [102, 103, 200, 201, 202, 203, 300, 301]
    assert info == dict(gen_rounds=3, groups_sampled=12, groups_kept=4, informative=7 / 12)
    flat = train_rl.rl.informative_groups(batch["reward"], G)
    assert flat.all()  # DAPO trains on no group of equal rewards
