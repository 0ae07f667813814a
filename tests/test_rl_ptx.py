"""PPO-ptx in train_rl (--ptx_coef): the SFT term of Ouyang et al. 2022 eq. 2 added to every RL update.

    python -m pytest tests/test_rl_ptx.py -q

Pinned here: the update moves the weights by exactly gamma times the gradient of the SFT loss when the
policy term has no gradient (zero advantages, no KL); ptx_loss is the mean next-token loss of the reply
tokens, by hand on a stub and against a log-softmax of the model's own logits; the rows are SFT's
training rows (its held-out rows left out); mini-batch k is a fixed function of (seed, k).
"""

import copy
import os
import sys
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import train_rl  # noqa: E402
from e2e_rl_update_worker import IMAGE_ID, rollout_batch, tiny_vlm  # noqa: E402
from e2e_util import tiny_world  # noqa: E402
from nanopatho import checkpoint  # noqa: E402
from nanopatho.next_token import Examples  # noqa: E402


def ptx_rows(n_rows=6, seed=3):
    """Image conversations of random tokens: <bos> <image>*n text, loss on the last 4 tokens."""
    n_img = tiny_vlm().n_image_tokens
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for r in range(n_rows):
        text = torch.randint(5, 64, (6 + r % 3,), generator=g).tolist()
        ids = [1] + [IMAGE_ID] * n_img + text
        mask = [0] * (len(ids) - 4) + [1] * 4
        seqs.append((ids, mask))
    images = torch.randint(0, 256, (n_rows, 3, 32, 32), dtype=torch.uint8, generator=g)
    return Examples(seqs, list(range(n_rows)), images)


def config(**kw):
    base = dict(seed=0, ppo_epochs=1, num_minibatches=1, temperature=1.0, eps_low=0.2, eps_high=0.2, beta=0.0,
                agg="token-mean", max_new_tokens=6, loss_impl="torch", entropy_coef=0.0, grad_clip=0.0,
                on_nonfinite="stop", group_size=1, share_prefix=True, ptx_coef=0.5, ptx_batch=3)
    return types.SimpleNamespace(**{**base, **kw})


def sgd_update(model, cfg, adv, ptx_fn):
    batch, logp_old, _, _ = rollout_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_rl.update(cfg, model, optimizer, batch, logp_old, None, adv, batch["mask"].float(), torch.device("cpu"),
                    ptx=ptx_fn, step=2)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_update_adds_gamma_times_the_sft_gradient():
    cfg, rows = config(), ptx_rows()
    zero_adv = torch.zeros(8)
    model = tiny_vlm()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the reference: one SGD step (lr 1) on gamma * the SFT loss of mini-batch k = step * epochs * minibatches + 0
    ref = copy.deepcopy(model)
    (cfg.ptx_coef * train_rl.ptx_loss(cfg, ref, rows, 0, 2, "cpu")).backward()
    expected = {k: (p - p.grad).detach() for k, p in ref.named_parameters()}
    got = sgd_update(model, cfg, zero_adv, lambda k: train_rl.ptx_loss(cfg, model, rows, 0, k, "cpu"))
    moved = 0.0
    for k, want in expected.items():
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
        moved = max(moved, (got[k] - start[k]).abs().max().item())
    assert moved > 1e-4  # the SFT term did move the weights
    # without ptx, zero advantages and no KL give no gradient at all: the movement above is the SFT term's
    still = sgd_update(tiny_vlm(), cfg, zero_adv, None)
    for k, v in still.items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)


def test_ptx_loss_by_hand_on_a_stub():
    """ptx_loss = summed loss / number of target tokens (the mask marks 4 reply tokens per row)."""
    cfg, rows = config(ptx_batch=2), ptx_rows()

    class Stub(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, targets=None, loss_mask=None, reduction="sum",
                    pixel_values=None):
            return None, torch.tensor(12.0)

    assert train_rl.ptx_loss(cfg, Stub(), rows, 0, 0, "cpu").item() == pytest.approx(12.0 / (2 * 4))


def test_ptx_loss_is_mean_negative_log_likelihood_of_reply_tokens():
    cfg, rows = config(ptx_batch=6), ptx_rows()
    model = tiny_vlm().eval()
    got = train_rl.ptx_loss(cfg, model, rows, 0, 0, "cpu")
    # all 6 rows in the batch: recompute from the model's logits, row by row, no padding
    cfg_idx = train_rl.training.batch_indices(len(rows), 6, 0, cfg.seed)
    gen = train_rl.training.generator_for(cfg.seed, 0, 1, 0)
    from nanopatho.data import augment  # the same flips / stain jitter the loss saw
    images = augment(rows.images[cfg_idx], gen)  # (6, 3, 32, 32)
    nll, n = 0.0, 0
    with torch.no_grad():
        for j, i in enumerate(cfg_idx):
            ids, mask = rows.seqs[i]
            x = torch.tensor([ids])
            logits, _ = model(x, pixel_values=images[j:j + 1])  # (1, T, V)
            logp = torch.log_softmax(logits[0, :-1].float(), -1)  # (T-1, V): position t predicts t+1
            for t in range(1, len(ids)):
                if mask[t]:
                    nll -= logp[t - 1, ids[t]].item()
                    n += 1
    assert n == 24
    assert got.item() == pytest.approx(nll / n, rel=1e-5)


def test_minibatch_k_is_fixed_by_seed_and_k():
    cfg, rows = config(ptx_batch=3), ptx_rows()
    model = tiny_vlm().eval()
    with torch.no_grad():
        a0, a0_again = (train_rl.ptx_loss(cfg, model, rows, 0, 0, "cpu") for _ in range(2))
        losses = {train_rl.ptx_loss(cfg, model, rows, 0, k, "cpu").item() for k in range(6)}
    assert a0.item() == a0_again.item()
    assert len(losses) > 1  # different k, different rows or augmentations


def test_load_ptx_takes_sft_training_rows_only(tmp_path_factory):
    world = tiny_world(tmp_path_factory)
    model, _, tok = checkpoint.load(world["init"], expect="vlm")
    cfg = types.SimpleNamespace(data=world["data"], ptx_file="sft_train.jsonl", skip_bad_samples=False,
                                allow_outside_root=False)
    rows, bad = train_rl.load_ptx(cfg, tok, model)
    with open(os.path.join(world["data"], "sft_train.jsonl")) as f:
        n_convs = sum(1 for line in f if line.strip())
    held_out = sum(1 for n in range(n_convs) if n % 20 == 19)  # train_sft.py's --val_every 20
    assert bad == 0 and len(rows) == n_convs - held_out
    assert all(sum(mask) > 0 for _, mask in rows.seqs)  # every row has reply tokens to learn
    cfg.ptx_file = "no_such_file.jsonl"
    with pytest.raises(Exception, match="no_such_file"):
        train_rl.load_ptx(cfg, tok, model)


def test_load_ptx_reads_a_comma_list_as_one_manifest(tmp_path_factory):
    """--ptx_file a,b (the toy speedrun's sft_train.jsonl,sft_tissue_tumour.jsonl): the rows of both files, in
    order, every 20th of the whole list held out, as train_sft.py --train_file a,b does."""
    world = tiny_world(tmp_path_factory)
    model, _, tok = checkpoint.load(world["init"], expect="vlm")
    cfg = types.SimpleNamespace(data=world["data"], ptx_file="sft_train.jsonl", skip_bad_samples=False,
                                allow_outside_root=False)
    one, _ = train_rl.load_ptx(cfg, tok, model)
    cfg.ptx_file = "sft_train.jsonl,sft_train.jsonl"
    two, _ = train_rl.load_ptx(cfg, tok, model)
    with open(os.path.join(world["data"], "sft_train.jsonl")) as f:
        n = sum(1 for line in f if line.strip())
    assert len(two) == 2 * n - sum(1 for k in range(2 * n) if k % 20 == 19)
    assert [ids for ids, _ in two.seqs[:len(one)]] == [ids for ids, _ in one.seqs]
