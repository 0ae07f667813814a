"""Helpers for the end-to-end tests (tests/test_e2e_*.py): a tiny SynthPath world, a tiny
VLM to start SFT / RL from, and the four scripts run as real subprocesses with flags that
keep every run to a few seconds on two CPU cores.

    world = tiny_world(tmp_path_factory)          # {"data": dir, "init": VLM checkpoint dir}
    proc = run_script("train_sft.py", world, out_dir, ["--max_steps", "2"])
    weights = load_weights(out_dir)                 # name -> tensor of out_dir/model.safetensors
    shard_dir = write_shards(world["data"], tmp_path / "shards", n_shards=4)   # WebDataset copy of the captions
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_clip.py", "train_pretrain.py", "train_sft.py", "train_rl.py")
ERROR_LINE = re.compile(r"^error: \S+:\d+: .+")  # the one-line bad-input message: "error: file:line: what"

# Flags that make each script tiny: small batches, short sequences, no periodic evaluation.
TINY_ARGS = {
    "train_clip.py": ["--batch_size", "4", "--eval_every", "0", "--eval_tasks", "", "--warmup_steps", "2"],
    "train_pretrain.py": ["--batch_size", "2", "--max_seq_len", "64", "--eval_every", "0", "--eval_batches", "1",
                          "--warmup_steps", "2"],
    "train_sft.py": ["--batch_size", "2", "--max_seq_len", "128", "--eval_every", "0", "--eval_batches", "1",
                     "--val_every", "6", "--warmup_steps", "2"],
    # DAPO: dynamic sampling, overlong shaping (the crafted init's varied lengths give varied rewards)
    "train_rl.py": ["--algo", "dapo", "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "8",
                    "--overlong_cache", "8", "--max_gen_rounds", "2", "--eval_every", "0", "--eval_limit", "2",
                    "--lr", "1e-6"],
}
MANIFEST = {"train_clip.py": "captions_train.jsonl", "train_pretrain.py": "captions_train.jsonl",
            "train_sft.py": "sft_train.jsonl", "train_rl.py": "rl_train.jsonl"}
_WORLD = {}


def tiny_world(tmp_path_factory):
    """Build once per session: an 18-image SynthPath world and a VLM checkpoint for SFT / RL."""
    if not _WORLD:
        from data.synthpath.prepare import prepare
        base = tmp_path_factory.mktemp("e2e_world")
        data, init = str(base / "data"), str(base / "init")
        prepare(data, seed=1, image_size=64, n_train=18, n_val=9, n_test=9, n_test_qa=4, vocab_size=2000,
                progress=False, workers=1, textbook_examples=10, reading_per_level=20, reading_probe=8,
                reading_probe_near=8)
        make_init(data, init)
        _WORLD.update(data=data, init=init)
    return dict(_WORLD)


def make_init(data, out):
    """A toy VLM whose end-of-turn logit is a * h[0] (h = the final normalised hidden state): the
    untrained policy then stops after a random number of tokens, so completions differ in length,
    DAPO's overlong shaping gives groups different rewards and RL has something to update."""
    from nanopatho import checkpoint
    from nanopatho.presets import vlm_config
    from nanopatho.tokenizer import Tokenizer
    from nanopatho.vlm import VLM

    tok = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    torch.manual_seed(0)
    model = VLM(vlm_config("toy", tok.vocab_size, tok.image_id))
    with torch.no_grad():
        row = torch.zeros(model.lm.config.n_embd)
        row[0] = 8.0
        model.lm.embed_tokens.weight[tok.im_end_id] = row  # tied: also the lm_head row of <|im_end|>
    checkpoint.save_model(out, model, tok, {"note": "tests/e2e_util.py:make_init"})


def command(script, world, out_dir, extra=()):
    args = [sys.executable, os.path.join(ROOT, script), "--data", world["data"], "--out_dir", str(out_dir),
            "--device", "cpu", "--num_threads", "1", *TINY_ARGS[script]]
    if script in ("train_sft.py", "train_rl.py"):
        args += ["--init", world["init"]]
    return args + [str(a) for a in extra]


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_script(script, world, out_dir, extra=(), timeout=120, **env_extra):
    """Run a script to completion; returns the CompletedProcess (text stdout / stderr)."""
    return subprocess.run(command(script, world, out_dir, extra), cwd=ROOT, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def start_script(script, world, out_dir, extra=(), stderr_path=None, **env_extra):
    """Start a script in the background (stdout piped line by line, stderr to a file)."""
    err = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL
    return subprocess.Popen(command(script, world, out_dir, extra), cwd=ROOT, env=env(**env_extra),
                            stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stdout:
        proc.stdout.close()
    return proc.returncode


def wait_for(predicate, proc, timeout=60, poll=0.01):
    """Poll until predicate() is true; fails if the process ends first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the condition was met")
        time.sleep(poll)
    raise AssertionError("timed out waiting for the condition")


def metrics(out_dir):
    import json
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]  # the last piece may be half written


def load_weights(out_dir):
    return load_file(os.path.join(out_dir, "model.safetensors"))


def assert_bitwise_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k].float() - b[k].float()).abs().max():.3e})"


def assert_clean_failure(proc, pattern=ERROR_LINE):
    """Exit code != 0, no traceback, and stderr's last line is the one-line error."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.replace("\r", "\n").split("\n") if line.strip()][-1]
    assert re.match(pattern, last), f"last stderr line is not a one-line error: {last!r}"
    return last


def copy_world(world, dest):
    """A private copy of the world's data directory (to corrupt)."""
    shutil.copytree(world["data"], dest)
    return dict(world, data=str(dest))


def write_tar(path, samples):
    """samples: [(key, {extension: bytes})] -> a WebDataset shard (consecutive members per key)."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, payload in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def write_shards(data, out, n_shards, manifest="captions_train.jsonl"):
    """The manifest's image-caption pairs as n_shards WebDataset shards ({i:06d}.png + .txt), in order."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(data, manifest)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    per = -(-len(rows) // n_shards)
    for s in range(n_shards):
        samples = []
        for i, row in enumerate(rows[s * per:(s + 1) * per], s * per):
            with open(os.path.join(data, row["image"]), "rb") as img:
                samples.append((f"{i:06d}", {"png": img.read(), "txt": row["caption"].encode()}))
        write_tar(os.path.join(out, f"shard-{s:04d}.tar"), samples)
    return str(out)
