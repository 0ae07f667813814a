"""End to end: DDP equivalence under `torchrun --nproc_per_node=2` (gloo, CPU).

Pretrain and SFT: one optimizer step on two ranks x batch b gives the weights of one process
with batch 2b (augmentation off: its generators are per rank by design). RL samples differently
per rank by design, so its update is checked directly (tests/e2e_rl_update_worker.py) for every
loss aggregation. CLIP and RL also run one step of the real script under torchrun.

    python -m pytest -q tests/test_e2e_ddp.py
"""

import os
import shutil
import subprocess

import pytest
import torch

from e2e_util import ROOT, command, env, load_weights, metrics, run_script, tiny_world

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


def torchrun_script(script, world, out_dir, extra):
    cmd = command(script, world, out_dir, extra)[1:]  # drop the python executable: torchrun starts it
    return subprocess.run(TORCHRUN + cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)


def assert_close_weights(a, b, reference=None, atol=1e-6):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-5), f"{k}: max diff {(a[k] - b[k]).abs().max():.3e}"
    if reference is not None:  # the step really moved the weights: the comparison can fail
        assert any(not torch.equal(a[k], reference[k]) for k in a)


@pytest.mark.parametrize("script", ["train_pretrain.py", "train_sft.py"])
def test_two_ranks_equal_one_process_with_double_batch(script, world, tmp_path):
    common = ["--max_steps", 1, "--save_every", 0, "--augment", "false"]
    ddp = torchrun_script(script, world, tmp_path / "ddp", common + ["--batch_size", 2])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_script(script, world, tmp_path / "one", common + ["--batch_size", 4])
    assert one.returncode == 0, one.stderr[-3000:]
    init = load_weights(world["init"]) if script == "train_sft.py" else None
    # AdamW's first step is lr * g / (|g| + eps): for the few gradients near eps (1e-8) the fp32 noise of
    # the all-reduce's summation order is amplified (measured: 7 of 2.8M weights off by 1-2e-6), so the
    # tolerance is 2% of this step's lr (5e-4); a wrong global batch flips update signs (~1e-3 diffs).
    assert_close_weights(load_weights(tmp_path / "ddp"), load_weights(tmp_path / "one"), init, atol=1e-5)
    assert metrics(tmp_path / "ddp")[0]["tokens"] == metrics(tmp_path / "one")[0]["tokens"]


def test_rl_update_two_ranks_equal_one_process(tmp_path):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import e2e_rl_update_worker as worker

    out = tmp_path / "ddp.pt"
    proc = subprocess.run(TORCHRUN + [os.path.join(ROOT, "tests", "e2e_rl_update_worker.py"), str(out)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    init = worker.tiny_vlm().state_dict()
    for agg in worker.AGGS:
        one = worker.updated_weights(agg, torch.arange(worker.B))
        assert_close_weights(ddp[agg], one, init)


@pytest.mark.parametrize("script", ["train_clip.py", "train_rl.py"])
def test_script_runs_one_step_under_torchrun(script, world, tmp_path):
    proc = torchrun_script(script, world, tmp_path, ["--max_steps", 1, "--save_every", 0])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == [1]
    weights = load_weights(tmp_path)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_resume_under_torchrun_is_bitwise_exact(world, tmp_path):
    """Two ranks, 4 SFT steps with a snapshot at step 2 (none after the last step: the final model is
    saved then); a copy without the final model, resumed under torchrun from that snapshot, ends with
    the same weights and log as the uninterrupted run."""
    args = ["--max_steps", 4, "--save_every", 2, "--keep_checkpoints", 2]
    full = torchrun_script("train_sft.py", world, tmp_path / "full", args)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    assert sorted(os.listdir(cut / "checkpoints")) == ["step_000002"]
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (cut / name).unlink()
    resumed = torchrun_script("train_sft.py", world, cut, args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout  # it did start from the snapshot, not from scratch
    assert "| 0/2 [" in resumed.stderr.replace("\r", "\n")  # the bar covers the 2 steps left (tqdm's first frame;
    # an intermediate frame such as 50% may be skipped by tqdm's refresh interval when steps are fast)
    full_w, cut_w = load_weights(tmp_path / "full"), load_weights(cut)
    assert all(torch.equal(full_w[k], cut_w[k]) for k in full_w)
    timing = {"elapsed"}
    rows = [{k: v for k, v in r.items() if k not in timing} for r in metrics(cut)]
    assert rows == [{k: v for k, v in r.items() if k not in timing} for r in metrics(tmp_path / "full")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
