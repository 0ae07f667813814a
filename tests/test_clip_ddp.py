"""A real 2-process torchrun (gloo): clip_loss with features gathered *with gradient* gives the
same loss and parameter gradients as one process on the concatenated batch.

    python -m pytest -q tests/test_clip_ddp.py
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanopatho.clip import clip_loss

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ddp_clip_worker import TinyTowers, batch  # noqa: E402


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_rank_gradients_equal_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", os.path.join(HERE, "ddp_clip_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)

    torch.manual_seed(0)
    model = TinyTowers()
    loss = clip_loss(*model(*batch()))
    loss.backward()
    assert torch.allclose(ddp["loss"], loss.detach(), atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(ddp["grads"][name], p.grad, atol=1e-6), name

    # without the gathered negatives the gradient would differ: the test can fail
    local = TinyTowers()
    local.load_state_dict(model.state_dict())
    x_img, x_txt = batch()
    halves = [clip_loss(*local(x_img[s], x_txt[s])) for s in (slice(0, 4), slice(4, 8))]
    (sum(halves) / 2).backward()
    assert not torch.allclose(local.img.weight.grad, model.img.weight.grad, atol=1e-4)
