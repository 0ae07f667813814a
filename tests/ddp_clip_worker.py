"""Worker for tests/test_clip_ddp.py (not a test itself): 2 gloo ranks, DDP, clip_loss.

    torchrun --standalone --nproc_per_node=2 tests/ddp_clip_worker.py OUT.pt

Each rank embeds its half of a fixed batch with a DDP-wrapped pair of projections, takes
clip_loss (features gathered with gradient), and backpropagates; rank 0 saves the averaged
gradients and the mean loss so the test can compare them with one process on the whole batch.
"""

import os
import sys

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanopatho import dist  # noqa: E402
from nanopatho.clip import clip_loss  # noqa: E402


class TinyTowers(torch.nn.Module):
    """Two linear 'towers' and a log-space scale: enough to carry gradients through clip_loss."""

    def __init__(self, d_in=6, d=4):
        super().__init__()
        self.img = torch.nn.Linear(d_in, d)
        self.txt = torch.nn.Linear(d_in, d)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x_img, x_txt):
        img_f = torch.nn.functional.normalize(self.img(x_img), dim=-1)
        txt_f = torch.nn.functional.normalize(self.txt(x_txt), dim=-1)
        return img_f, txt_f, self.logit_scale.exp()


def batch(n=8, d_in=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_in, generator=g)


def main(out_path):
    torch.set_num_threads(1)
    dist.init("cpu")
    torch.manual_seed(0)
    model = DDP(TinyTowers())
    x_img, x_txt = batch()
    b = x_img.shape[0] // dist.world_size()
    sl = slice(dist.rank() * b, (dist.rank() + 1) * b)
    loss = clip_loss(*model(x_img[sl], x_txt[sl]))
    loss.backward()  # DDP averages the gradients over ranks
    mean_loss = dist.all_reduce_sum(loss.detach().clone()) / dist.world_size()
    if dist.is_main():
        torch.save({"loss": mean_loss, "grads": {k: p.grad for k, p in model.module.named_parameters()}}, out_path)
    torch_dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
