"""Checkpoints: safetensors weights + JSON config, written atomically; exact-resume state.

A stage's output directory looks like this:

    out/sft/
      config.json  model.safetensors  tokenizer.json       the final model (next stage reads these); config.json's
                                                           "code" names the git commit that trained it
      checkpoints/step_000200/                             a resumable snapshot, one per --save_every
          config.json model.safetensors tokenizer.json
          train_state.safetensors                          optimizer tensors + RNG byte states
          train_state.json                                 step, optimizer hyper-params, RNG states, counters
      metrics.jsonl

Usage:
    save_model(out_dir, model, tokenizer, run_config)           # final weights
    save_checkpoint(out_dir, step, model, tokenizer, run_config, optimizer, state, keep=3)
    model, config, tokenizer = load("out/sft", device)         # rebuilds the right class from config.json
    path = latest_checkpoint(out_dir); load_train_state(path, optimizer) -> state

Nothing here unpickles: only .safetensors and .json files are ever read. `load` also takes a
released Hugging Face / OpenCLIP directory (see nanopatho/hf_import.py).
A snapshot is written into `checkpoints/.tmp_step_N/` and renamed into place when
complete, so a crash mid-save leaves the previous snapshots intact; `latest_checkpoint`
ignores the temporary names.
"""

import functools
import importlib
import json
import os
import random
import shutil
import subprocess
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_CLASSES = {  # model_type -> (module, model class, config class)
    "vlm": ("nanopatho.vlm", "VLM", "VLMConfig"),
    "clip": ("nanopatho.clip", "PathoCLIP", "CLIPConfig"),
    "lm": ("nanopatho.lm", "LM", "LMConfig"),
    "vit": ("nanopatho.vit", "ViT", "ViTConfig"),  # a vision tower alone (data/synthpath/perception.py --out_dir)
}


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used, with a message saying why."""


def model_type_of(model):
    names = [c.__name__ for c in type(unwrap(model)).__mro__]  # FSDP2 makes the class FSDPVLM(FSDPModule, VLM)
    for kind, (_, cls_name, _) in MODEL_CLASSES.items():
        if cls_name in names:
            return kind
    raise CheckpointError(f"no model_type registered for class {names[0]}")


def unwrap(model):
    """The bare module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path, missing_hint=" (is this a nanopatho checkpoint directory?)"):
    """A JSON file, or a one-line CheckpointError naming the file (and the line of a syntax error)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing{missing_hint}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout nanopatho/ runs from


@functools.cache
def code_version(repo=PACKAGE_ROOT):
    """{"commit": short hash, "dirty": uncommitted changes to tracked files} of the git checkout `repo` (by
    default the one this package runs from), asked once per process; None outside a git checkout (a wheel)."""

    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": dirty}


def _write_files(directory, model, tokenizer, run_config, state=None):
    """config.json + model.safetensors + tokenizer.json into `directory`, each file atomically.
    `state`: the weights to write, when they are not model.state_dict() (FSDP: fsdp.full_state)."""
    os.makedirs(directory, exist_ok=True)
    model = unwrap(model)
    config = {"model_type": model_type_of(model), "model": model.config.to_dict(), "run": run_config or {},
              "code": code_version()}
    state = untied_state(model) if state is None else state
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"refusing to save non-finite weights ({name})")
    tmp = os.path.join(directory, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer.json.tmp"))
        os.replace(os.path.join(directory, "tokenizer.json.tmp"), os.path.join(directory, "tokenizer.json"))
    _write_json(os.path.join(directory, "config.json"), config)


def untied_state(model):
    """state_dict without the second name of a shared (tied) tensor: safetensors stores each
    tensor once, and loading re-ties through the model's own parameter sharing."""
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        state[k] = v.detach().contiguous().cpu()
    return state


def tied_names(model):
    """Names of parameters that are an earlier name's tensor (tied weights)."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def save_model(directory, model, tokenizer, run_config=None, state=None):
    """The stage's final model, readable by `load` and by the next stage."""
    _write_files(directory, model, tokenizer, run_config, state)


def build_model(config):
    """An untrained model of the class and shape described by a config.json dict."""
    kind = config.get("model_type")
    if kind not in MODEL_CLASSES:
        raise CheckpointError(f"unknown model_type {kind!r}; expected one of {sorted(MODEL_CLASSES)}")
    module_name, cls_name, cfg_name = MODEL_CLASSES[kind]
    module = importlib.import_module(module_name)
    model_config = getattr(module, cfg_name).from_dict(config["model"])
    return getattr(module, cls_name)(model_config)


def load_state(model, path):
    """Load safetensors weights into `model` (FSDP-sharded or not), with a clear message when they do not fit."""
    from nanopatho import fsdp  # here, not at the top: fsdp imports this module

    state = checked_state(model, path)
    if fsdp.is_sharded(model):
        fsdp.load_full_state(model, state)
    else:
        model.load_state_dict(state, strict=False)  # only tied duplicates can be absent (checked_state)


def checked_state(model, path):
    """The safetensors weights at `path`, checked against `model`'s names and shapes."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing")
    state = load_file(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - tied_names(model))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            detail.append(f"shape of {k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}")
        raise CheckpointError(f"{path}: weights do not match config.json ({'; '.join(detail)})")
    return state


def load(directory, device="cpu", expect=None):
    """(model, config dict, tokenizer) from a checkpoint directory; `expect` (a model_type or a tuple of them)
    checks the model_type.
    A released Hugging Face / OpenCLIP directory (Qwen2, Llama, CLIP) is imported by nanopatho.hf_import."""
    from nanopatho import hf_import
    from nanopatho.tokenizer import Tokenizer

    if hf_import.is_released(directory):
        model, config, tokenizer = hf_import.load_pretrained(directory, expect)
        return model.to(device), config, tokenizer
    config = read_json(os.path.join(directory, "config.json"))
    expected = (expect,) if isinstance(expect, str) else expect
    if expected is not None and config.get("model_type") not in expected:
        raise CheckpointError(f"{directory}: holds a {config.get('model_type')!r} model, but a "
                              f"{' or '.join(map(repr, expected))} model is needed here")
    model = build_model(config)
    load_state(model, os.path.join(directory, "model.safetensors"))
    tok_path = os.path.join(directory, "tokenizer.json")
    if config["model_type"] == "vit" and not os.path.exists(tok_path):  # a vision tower reads no text
        return model.to(device), config, None
    if not os.path.exists(tok_path):
        raise CheckpointError(f"{tok_path}: missing")
    tokenizer = Tokenizer.from_file(tok_path)
    return model.to(device), config, tokenizer


# -----------------------------------------------------------------------------
# resumable snapshots

def rng_state():
    """Every RNG the loop may touch, split into tensors (safetensors) and JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    json_state = {
        "numpy": [np_state[0], np_state[1].tolist(), np_state[2], np_state[3], np_state[4]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, json_state


def set_rng_state(tensors, json_state):
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = json_state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = json_state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _optimizer_tensors(sd):
    """Flatten an optimizer state dict into name -> tensor plus the JSON-able rest."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state_dict(tensors, meta):
    """_optimizer_tensors' inverse."""
    state = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir, step, model, tokenizer, run_config, optimizer, state, keep=3, model_state=None,
                    optimizer_state=None):
    """Atomic snapshot `out_dir/checkpoints/step_{step}`; keeps the newest `keep` of them.

    `state` is the loop's JSON-able progress (step, data position, counters, ...). model_state /
    optimizer_state: the tensors to write when they are not the model's / optimizer's own state dicts
    (FSDP: gathered by fsdp.full_state / fsdp.full_optimizer_state)."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_files(tmp, model, tokenizer, run_config, model_state)
    tensors, optim_meta = _optimizer_tensors(optimizer.state_dict() if optimizer_state is None else optimizer_state)
    rng_tensors, rng_json = rng_state()
    save_file({**tensors, **rng_tensors}, os.path.join(tmp, "train_state.safetensors"))
    pause, _, at_step = os.environ.get("NANOPATHO_TEST_PAUSE_IN_SAVE", "0").partition("@")  # "seconds[@step]"
    pause = float(pause)
    if pause and (not at_step or int(at_step) == step):  # test hook: kill the process mid-save
        print(f"[checkpoint] pausing {pause}s inside save of step {step}", flush=True)
        time.sleep(pause)
    _write_json(os.path.join(tmp, "train_state.json"), {"state": state, "optimizer": optim_meta, "rng": rng_json})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the snapshot appears complete or not at all
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir):
    """Complete snapshots, oldest first (temporary, half-written ones are ignored)."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(out_dir):
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_train_state(path, model, optimizer):
    """Restore weights, optimizer and RNGs from a snapshot; return the loop's saved `state`."""
    from nanopatho import fsdp  # here, not at the top: fsdp imports this module

    model = unwrap(model)
    load_state(model, os.path.join(path, "model.safetensors"))
    meta = read_json(os.path.join(path, "train_state.json"))
    tensors = load_file(os.path.join(path, "train_state.safetensors"))
    optimizer_state = _optimizer_state_dict(tensors, meta["optimizer"])
    if fsdp.is_sharded(model):
        fsdp.load_full_optimizer_state(model, optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
    set_rng_state(tensors, meta["rng"])
    return meta["state"]
