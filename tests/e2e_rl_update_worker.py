"""Worker for tests/test_e2e_ddp.py: train_rl.update on a fixed rollout batch.

    torchrun --standalone --nproc_per_node=2 tests/e2e_rl_update_worker.py OUT.pt   # each rank: half the rows
    python tests/e2e_rl_update_worker.py OUT.pt                                       # one process: every row

Writes {agg: state_dict after the update} (rank 0). The same weights from both runs mean the
update's normalisers (global token / sequence counts, the world-size factor against DDP's
gradient averaging) make two ranks behave as one process on the whole batch. Plain SGD without
clipping, so a gradient that is off by a constant factor would show (Adam would hide it).
"""

import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import train_rl  # noqa: E402
from nanopatho import dist, training  # noqa: E402
from nanopatho.lm import LMConfig  # noqa: E402
from nanopatho.vit import ViTConfig  # noqa: E402
from nanopatho.vlm import VLM, VLMConfig  # noqa: E402

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
B, TP, N, IMAGE_ID = 8, 9, 6, 3  # rollout rows, prompt width, completion width, image token id


def tiny_vlm():
    torch.manual_seed(0)
    lm = LMConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, max_seq_len=64)
    vision = ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32)
    return VLM(VLMConfig(vision=vision, lm=lm, image_token_id=IMAGE_ID))


def rollout_batch():
    """A fixed batch: left-padded prompts holding one image each, completions of lengths 1..N,
    old / reference log-probs near the current policy's, random advantages."""
    model = tiny_vlm()
    n_img = model.n_image_tokens
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.zeros(B, TP, dtype=torch.long)  # (B, Tp), pad 0 on the left
    prompt_mask = torch.zeros(B, TP, dtype=torch.long)
    for b in range(B):
        pad = b % 3
        text = torch.randint(5, 64, (TP - pad - n_img - 1,), generator=g)
        prompt_ids[b, pad:] = torch.cat([torch.tensor([1] + [IMAGE_ID] * n_img), text])
        prompt_mask[b, pad:] = 1
    lengths = torch.tensor([1 + (3 * b) % N for b in range(B)])
    mask = torch.arange(N)[None, :] < lengths[:, None]  # (B, N) bool
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, pixels=torch.randn(B, 3, 32, 32, generator=g),
                 ids=torch.randint(5, 64, (B, N), generator=g) * mask, mask=mask)
    logp = train_rl.score(model, batch, 1.0, "torch")  # (B, N)
    logp_old = (logp + 0.3 * torch.randn(B, N, generator=g)) * mask  # ratios away from 1: some tokens clip
    logp_ref = (logp + 0.1 * torch.randn(B, N, generator=g)) * mask
    adv = torch.randn(B, generator=g)
    return batch, logp_old, logp_ref, adv


def config(agg):
    return types.SimpleNamespace(seed=0, ppo_epochs=2, num_minibatches=1, temperature=1.0, eps_low=0.2,
                                 eps_high=0.28, beta=0.04, agg=agg, max_new_tokens=N, loss_impl="torch",
                                 entropy_coef=0.01, grad_clip=0.0, on_nonfinite="stop",
                                 group_size=1, share_prefix=True)  # every row its own prompt: groups of 1


def updated_weights(agg, rows):
    """Weights after train_rl.update on batch rows `rows` (this rank's share)."""
    batch, logp_old, logp_ref, adv = rollout_batch()
    model = tiny_vlm()
    ddp_model = training.wrap_ddp(model, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    local = {k: v[rows] for k, v in batch.items()}
    train_rl.update(config(agg), ddp_model, optimizer, local, logp_old[rows], logp_ref[rows], adv[rows],
                    local["mask"].float(), torch.device("cpu"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(out):
    torch.set_num_threads(1)
    dist.init("cpu")
    share = B // dist.world_size()
    rows = torch.arange(dist.rank() * share, (dist.rank() + 1) * share)
    result = {agg: updated_weights(agg, rows) for agg in AGGS}
    if dist.is_main():
        torch.save(result, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
