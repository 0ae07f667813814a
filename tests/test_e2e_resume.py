"""End to end: exact resume after SIGKILL, and crash-safe snapshots (kill inside a save).

Each script is run uninterrupted, then again with a snapshot every step, killed with SIGKILL
at a random step, and restarted with --resume: the final weights must be bitwise equal, and
the metrics log must match row for row (timings aside).

    python -m pytest -q tests/test_e2e_resume.py
"""

import os
import random
import re

import pytest
import torch

from e2e_util import (SCRIPTS, assert_bitwise_equal, kill, load_weights, metrics, run_script, start_script,
                      tiny_world, wait_for)
from nanopatho import checkpoint
from nanopatho.presets import vlm_config
from nanopatho.training import make_optimizer
from nanopatho.vlm import VLM

STEPS = {"train_clip.py": 14, "train_pretrain.py": 14, "train_sft.py": 12, "train_rl.py": 6}
TIMING_KEYS = {"elapsed", "gen_seconds", "score_seconds", "update_seconds"}
_REFERENCE = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


def reference(script, world, tmp_path_factory):
    """The uninterrupted run (no snapshots at all), once per script."""
    if script not in _REFERENCE:
        out = tmp_path_factory.mktemp("ref_" + script[:-3])
        proc = run_script(script, world, out, ["--max_steps", STEPS[script], "--save_every", "0"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not os.path.exists(os.path.join(out, "checkpoints"))
        _REFERENCE[script] = (load_weights(out), metrics(out))
    return _REFERENCE[script]


def assert_same_log(rows, ref_rows):
    assert [r["step"] for r in rows] == list(range(1, len(ref_rows) + 1))
    for r, q in zip(rows, ref_rows):
        assert {k: v for k, v in r.items() if k not in TIMING_KEYS} == {k: v for k, v in q.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigkill_then_resume_is_bitwise_exact(script, world, tmp_path, tmp_path_factory):
    ref_weights, ref_rows = reference(script, world, tmp_path_factory)
    n = STEPS[script]
    kill_after = random.randint(2, n // 2)
    print(f"{script}: SIGKILL once {kill_after} of {n} steps are logged")
    out = tmp_path / "run"
    args = ["--max_steps", n, "--save_every", 1, "--keep_checkpoints", 2]
    proc = start_script(script, world, out, args)
    wait_for(lambda: len(metrics(out)) >= kill_after and checkpoint.latest_checkpoint(out), proc)
    assert kill(proc) == -9
    assert not os.path.exists(out / "model.safetensors")  # really killed before the end
    snap = checkpoint.latest_checkpoint(out)
    assert snap is not None

    resumed = run_script(script, world, out, args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {snap}" in resumed.stdout
    assert_bitwise_equal(load_weights(out), ref_weights)
    assert_same_log(metrics(out), ref_rows)


def test_kill_inside_save_keeps_previous_snapshot(world, tmp_path, tmp_path_factory):
    """Killed while snapshot K is half written: K-1 stays complete and loadable, the .tmp dir is
    ignored, keep_checkpoints is honoured, and --resume continues from K-1 to the exact result."""
    script, n = "train_pretrain.py", STEPS["train_pretrain.py"]
    ref_weights, ref_rows = reference(script, world, tmp_path_factory)
    k = random.randint(4, n - 2)
    out = tmp_path / "run"
    args = ["--max_steps", n, "--save_every", 1, "--keep_checkpoints", 2]
    proc = start_script(script, world, out, args, NANOPATHO_TEST_PAUSE_IN_SAVE=f"60@{k}")
    for line in proc.stdout:
        m = re.search(r"\[checkpoint\] pausing .* inside save of step (\d+)", line)
        if m and int(m.group(1)) == k:
            break
    else:
        raise AssertionError(f"no pause line for step {k}; rc {proc.wait()}")
    kill(proc)

    root = out / "checkpoints"
    assert (root / f".tmp_step_{k:06d}").is_dir()  # the half-written snapshot
    assert not (root / f".tmp_step_{k:06d}" / "train_state.json").exists()
    assert checkpoint.list_checkpoints(out) == [str(root / f"step_{s:06d}") for s in (k - 2, k - 1)]  # keep=2
    prev = checkpoint.latest_checkpoint(out)
    assert prev == str(root / f"step_{k - 1:06d}")
    model, config, tok = checkpoint.load(prev, expect="vlm")
    assert config["run"]["max_steps"] == n
    fresh = VLM(vlm_config("toy", tok.vocab_size, tok.image_id))
    state = checkpoint.load_train_state(prev, fresh, make_optimizer(fresh, 1e-3, 0.1))
    assert state["step"] == k - 1
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name

    resumed = run_script(script, world, out, args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {prev}" in resumed.stdout
    assert_bitwise_equal(load_weights(out), ref_weights)
    assert_same_log(metrics(out), ref_rows)
    assert checkpoint.list_checkpoints(out) == [str(root / f"step_{s:06d}") for s in (n - 2, n - 1)]
    assert not any(name.startswith(".tmp") for name in os.listdir(root))
