"""train_rl.collect: the rollouts of one step and what it logs about them.

    python -m pytest -q tests/test_rl_collect.py

rollout is replaced by a fake whose group rewards are fixed per round, so the bookkeeping is checked
by hand: GRPO keeps every group of its one round; DAPO (dynamic sampling, §3.2) keeps the informative
ones in order over rounds, stops once prompts_per_step are kept or after max_gen_rounds, cuts the batch
to prompts_per_step groups and otherwise trains on what there is; `informative` is the share of sampled
groups whose rewards differ (all-equal groups have zero advantage).
"""

import types

import torch

import train_rl
from nanopatho.rl import informative_groups

G = 2  # group size
ROUNDS = [[1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0],   # round 0: groups flat, mixed, flat, flat
          [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.3, 0.3],   # round 1: mixed, mixed, flat, flat
          [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]]   # round 2: every group mixed


def fake_rollout(cfg, model, tokenizer, items, images, indices, gen, device, calls, rounds):
    r = torch.tensor(rounds[len(calls)])  # (P*G,)
    calls.append(list(indices))
    return dict(reward=r, row=torch.arange(len(r)) + 100 * len(calls))


def run(monkeypatch, dynamic_sampling, rounds=ROUNDS, max_gen_rounds=3):
    calls = []
    monkeypatch.setattr(train_rl, "rollout", lambda *a: fake_rollout(*a, calls, rounds))
    cfg = types.SimpleNamespace(group_size=G, prompts_per_step=4, dynamic_sampling=dynamic_sampling,
                                max_gen_rounds=max_gen_rounds, stream=False, seed=0)
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
    assert informative_groups(batch["reward"], G).all()  # DAPO trains on no group of equal rewards


def test_dapo_stops_once_the_batch_is_full(monkeypatch):
    batch, info, calls = run(monkeypatch, dynamic_sampling=1, rounds=ROUNDS[1:], max_gen_rounds=10)
    assert len(calls) == 2  # 2 informative groups after round 0, 6 after round 1 >= 4: no third round
    assert batch["reward"].tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert info == dict(gen_rounds=2, groups_sampled=8, groups_kept=4, informative=6 / 8)


def test_dapo_trains_on_what_there_is_after_max_gen_rounds(monkeypatch):
    flat = [1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0]
    batch, info, calls = run(monkeypatch, dynamic_sampling=1, rounds=[flat, ROUNDS[0], flat], max_gen_rounds=3)
    assert len(calls) == 3
    assert batch["reward"].tolist() == [0.0, 1.0]  # the one informative group of three rounds
    assert info == dict(gen_rounds=3, groups_sampled=12, groups_kept=1, informative=1 / 12)
    batch, info, calls = run(monkeypatch, dynamic_sampling=1, rounds=[flat, flat], max_gen_rounds=2)
    assert batch["reward"].numel() == 0 and info["groups_kept"] == 0 and info["informative"] == 0.0
