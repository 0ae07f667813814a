"""End to end: the non-finite guard, with a NaN injected into the loss by --debug_nan_step.

--on_nonfinite skip: the run finishes, that one step is counted in metrics.jsonl, the weights
stay finite. --on_nonfinite stop: a one-line error and a non-zero exit, no traceback, and no
model written.

    python -m pytest -q tests/test_e2e_guard.py
"""

import os

import pytest
import torch

from e2e_util import SCRIPTS, assert_clean_failure, load_weights, metrics, run_script, tiny_world

NAN_STEP = 1  # 0-based optimizer step: the second of three


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


@pytest.mark.parametrize("script", SCRIPTS)
def test_nan_step_is_skipped_and_counted(script, world, tmp_path):
    proc = run_script(script, world, tmp_path, ["--max_steps", 3, "--save_every", 0, "--debug_nan_step", NAN_STEP,
                                                "--on_nonfinite", "skip"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(tmp_path)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert all(r["grad_norm"] == r["grad_norm"] for i, r in enumerate(rows) if i != NAN_STEP)  # finite elsewhere
    assert rows[NAN_STEP]["grad_norm"] != rows[NAN_STEP]["grad_norm"]  # NaN at the poisoned step
    for name, t in load_weights(tmp_path).items():
        assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_nan_step_stops_with_one_line(script, world, tmp_path):
    proc = run_script(script, world, tmp_path, ["--max_steps", 3, "--save_every", 1, "--debug_nan_step", NAN_STEP,
                                                "--on_nonfinite", "stop"])
    last = assert_clean_failure(proc, r"^error: non-finite gradient norm")
    assert "--on_nonfinite skip" in last
    assert not os.path.exists(tmp_path / "model.safetensors")
    rows = metrics(tmp_path)
    assert len(rows) == NAN_STEP  # the steps before the NaN were logged, the NaN step was not
