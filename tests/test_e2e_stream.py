"""End to end: --stream through the real scripts.

- SIGKILL mid-epoch + --resume of a streaming pretrain run (2 DataLoader workers) gives the weights and
  log of the uninterrupted streaming run, bitwise.
- 2 ranks x 2 workers (real torchrun, gloo): within an epoch no sample is read twice and every one once.
- --skip_bad_samples under torchrun (2 ranks x 2 workers) reports exactly the bad samples and shards
  the consumed batches skipped, summed over workers and ranks; without it the run stops with one line.
- CLIP, SFT (from a manifest with a UTF-8 byte-order mark and CRLF line ends) and RL train with --stream.

    python -m pytest -q tests/test_e2e_stream.py
"""

import io
import json
import os
import random
import shutil
import subprocess

import pytest
from PIL import Image

from e2e_util import (ROOT, assert_bitwise_equal, assert_clean_failure, command, env, kill, load_weights, metrics,
                      run_script, start_script, tiny_world, wait_for, write_shards, write_tar)
from nanopatho import checkpoint
from nanopatho.data import BOM

TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node=2"]
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
STREAM = ["--stream", "--num_workers", "2"]
TIMING_KEYS = {"elapsed", "gen_seconds", "score_seconds", "update_seconds"}
TIMEOUT = 600  # seconds a run may take on a loaded machine (each takes seconds on an idle one)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tiny_world(tmp_path_factory)
    w["shards"] = write_shards(w["data"], tmp_path_factory.mktemp("shards"), n_shards=4)
    return w


def torchrun(args, timeout=TIMEOUT):
    return subprocess.run(TORCHRUN + args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(world, tmp_path):
    """36 pairs in 4 shards, 2 workers: each worker's epoch is 18 pairs, ~20 steps of this run."""
    args = ["--max_steps", 10, "--train_file", world["shards"], *STREAM]
    ref = run_script("train_pretrain.py", world, tmp_path / "ref", args + ["--save_every", 0], timeout=TIMEOUT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    proc = start_script("train_pretrain.py", world, out, args + ["--save_every", 1, "--keep_checkpoints", 2])
    kill_after = random.randint(2, 6)
    wait_for(lambda: len(metrics(out)) >= kill_after and checkpoint.latest_checkpoint(out), proc, timeout=TIMEOUT)
    assert kill(proc) == -9
    assert not os.path.exists(out / "model.safetensors")
    snap = checkpoint.latest_checkpoint(out)
    with open(os.path.join(snap, "train_state.json")) as f:
        positions = json.load(f)["state"]["data"][0]["positions"]
    assert all(epoch == 0 and 0 < cursor < 18 for epoch, cursor in positions), positions  # mid-epoch, both roles
    resumed = run_script("train_pretrain.py", world, out,
                         args + ["--save_every", 1, "--keep_checkpoints", 2, "--resume"], timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {snap}" in resumed.stdout
    assert_bitwise_equal(load_weights(out), load_weights(tmp_path / "ref"))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(tmp_path / "ref"))


@needs_torchrun
def test_two_ranks_two_workers_read_each_sample_once_per_epoch(tmp_path):
    """8 shards x 6 samples; 4 rank x worker slots read 2 shards (12 samples, 4 batches of 3) per epoch."""
    (tmp_path / "shards").mkdir()
    for s in range(8):
        write_tar(tmp_path / "shards" / f"s{s}.tar",
                  [(f"{i:03d}", {"png": png((i, i, 0)), "txt": b"c"}) for i in range(6 * s, 6 * s + 6)])
    proc = torchrun([os.path.join(ROOT, "tests", "stream_ranks_worker.py"), str(tmp_path / "shards"), str(tmp_path),
                     "16", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [row for r in (0, 1) for row in json.load(open(tmp_path / f"rank{r}.json"))]
    for epoch in (0, 1):
        sources = [src for row in rows if row["epoch"] == epoch for src in row["sources"]]
        assert len(sources) == len(set(sources)) == 48, epoch
    ranks = [{src for row in json.load(open(tmp_path / f"rank{r}.json")) if row["epoch"] == 0 for src in row["sources"]}
             for r in (0, 1)]
    assert not ranks[0] & ranks[1] and len(ranks[0]) == len(ranks[1]) == 24


def bad_corpus(world, out):
    """4 shards of 6 good pairs each (from the world's images), with the bad samples after position 2:
    shard 0 has a non-image at position 3, shard 1 a pair without caption at position 3, shard 2 a 7th
    sample cut inside its image (a bad sample, and its shard cannot be read to the end): 4 to skip."""
    rows = [json.loads(line) for line in open(os.path.join(world["data"], "captions_train.jsonl"))][:24]
    image = lambda r: open(os.path.join(world["data"], r["image"]), "rb").read()  # noqa: E731
    os.makedirs(out)
    for s in range(4):
        samples = [(f"{6 * s + i:04d}", {"png": image(r), "txt": r["caption"].encode()})
                   for i, r in enumerate(rows[6 * s:6 * s + 6])]
        if s == 0:
            samples.insert(3, ("bad_image", {"png": b"not an image" * 50, "txt": b"a caption"}))
        if s == 1:
            samples.insert(3, ("no_caption", {"png": image(rows[0])}))
        if s == 2:
            samples.append(("cut", {"png": image(rows[0]), "txt": b"a caption"}))
        path = write_tar(os.path.join(out, f"shard-{s}.tar"), samples)
        if s == 2:
            data = open(path, "rb").read()
            cut_at = data.index(b"cut.png") + 512 + 100  # 100 bytes into the last image
            open(path, "wb").write(data[:cut_at])
    return out


@needs_torchrun
def test_skip_bad_samples_counts_over_ranks_and_workers(world, tmp_path):
    """4 slots, one shard each per epoch; 8 steps of 2 pairs = each role's epoch 0 (3 batches) + one batch
    of epoch 1 (whose first pairs are good), so every bad sample of epoch 0 is met once: 4 in all."""
    shards = bad_corpus(world, str(tmp_path / "shards"))
    args = ["--max_steps", 8, "--save_every", 0, "--train_file", shards, "--textbook_file", "", "--shuffle_buffer", 0,
            *STREAM]
    proc = torchrun(command("train_pretrain.py", world, tmp_path / "out", args + ["--skip_bad_samples"])[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped samples 4 ->" in proc.stdout, proc.stdout[-2000:]
    failed = run_script("train_pretrain.py", world, tmp_path / "out2", args, timeout=TIMEOUT)
    assert_clean_failure(failed, r"^error: \S+shard-\d\.tar(:\w+)?: (image data is not a readable image|missing "
                                 r"caption|\.png is cut short|unreadable tar shard)")


def crlf_bom_copy(data, name, copy_name):
    """data/name rewritten next to it as a Windows tool writes it: byte-order mark, CRLF line ends."""
    with open(os.path.join(data, name), "rb") as f:
        lines = [line.rstrip(b"\n") for line in f if line.strip()]
    with open(os.path.join(data, copy_name), "wb") as f:
        f.write(BOM + b"\r\n".join(lines) + b"\r\n")
    return copy_name


@pytest.mark.parametrize("script", ["train_clip.py", "train_sft.py", "train_rl.py"])
def test_every_stage_trains_with_stream(script, world, tmp_path):
    extra = ["--eval_max_new_tokens", 8] if script == "train_rl.py" else []
    if script == "train_sft.py":
        extra = ["--train_file", crlf_bom_copy(world["data"], "sft_train.jsonl", "sft_train_windows.jsonl")]
    proc = run_script(script, world, tmp_path / "out", ["--max_steps", 2, "--save_every", 0, *STREAM, *extra],
                      timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped samples 0" in proc.stdout and "stream" in proc.stdout
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2]
