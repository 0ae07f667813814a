"""End to end: bad input through each script's real CLI, and the safety rules.

One row of a private copy of the tiny world is corrupted in each way the loaders know
(missing / empty / truncated / non-image / decompression-bomb image, malformed JSON, missing
key, empty text, a path escaping the data root). The script must stop with a single line
`error: file:line: ...` on stderr, a non-zero exit and no traceback; with --skip_bad_samples it
must finish and report how many samples it skipped. Every kind runs through train_pretrain.py,
a few through each other script.

    python -m pytest -q tests/test_e2e_bad_input.py
"""

import json
import os
import re
import struct
import zlib

import pytest

from e2e_util import MANIFEST, assert_clean_failure, copy_world, run_script, tiny_world
from nanopatho import checkpoint
from nanopatho.rewards import accuracy_reward, extract_answer, format_reward, reward

KINDS = ("missing_image", "zero_byte", "truncated", "not_image", "bomb", "bad_json", "missing_key", "empty_text",
         "escape")
MESSAGE = {"missing_image": "not found", "zero_byte": "empty (0 bytes)", "truncated": "truncated or corrupt",
           "not_image": "not a readable image", "bomb": "too large", "bad_json": "malformed JSON",
           "missing_key": "missing key", "empty_text": "empty text", "escape": "escapes the data root"}
SOME_KINDS = {"train_clip.py": ("truncated", "bad_json"), "train_sft.py": ("not_image", "empty_text"),
              "train_rl.py": ("bomb", "missing_key")}
CASES = [("train_pretrain.py", k) for k in KINDS] + [(s, k) for s, kinds in SOME_KINDS.items() for k in kinds]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


def bomb_png(width=100_000, height=100_000):
    """A PNG whose header claims width x height pixels (10^10 > MAX_IMAGE_PIXELS); no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def get_image(row):
    return row["images"][0] if "images" in row else row["image"]


def set_image(row, rel):
    if "images" in row:
        row["images"] = [rel]
    else:
        row["image"] = rel


def corrupt_row(row, kind, data, tag):
    """The manifest line for `row` corrupted in the way `kind` names (files it needs are written)."""
    def write(name, payload):
        with open(os.path.join(data, "images", name), "wb") as f:
            f.write(payload)
        return f"images/{name}"

    row = json.loads(json.dumps(row))
    if kind == "missing_image":
        set_image(row, f"images/no_such_tile_{tag}.png")
    elif kind == "zero_byte":
        set_image(row, write(f"zero_{tag}.png", b""))
    elif kind == "truncated":
        with open(os.path.join(data, get_image(row)), "rb") as f:
            good = f.read()
        set_image(row, write(f"truncated_{tag}.png", good[: len(good) // 2]))
    elif kind == "not_image":
        set_image(row, write(f"text_{tag}.png", b"this is a caption, not an image\n" * 8))
    elif kind == "bomb":
        set_image(row, write(f"bomb_{tag}.png", bomb_png()))
    elif kind == "bad_json":
        return json.dumps(row)[:-7]
    elif kind == "missing_key":
        del row[{"caption": "caption", "messages": "messages", "question": "answer"}[text_key(row)]]
    elif kind == "empty_text":
        if "messages" in row:
            row["messages"][-1]["content"] = ""
        else:
            row[text_key(row)] = ""
    elif kind == "escape":
        with open(os.path.join(data, get_image(row)), "rb") as f:
            good = f.read()
        outside = os.path.join(os.path.dirname(data), f"outside_{tag}.png")  # a real image, outside the root
        with open(outside, "wb") as f:
            f.write(good)
        set_image(row, f"../outside_{tag}.png")
    return json.dumps(row)


def text_key(row):
    return next(k for k in ("caption", "messages", "question") if k in row)


def corrupt(world, tmp_path, script, kinds, first_line=2):
    """Copy the world and corrupt lines first_line, first_line+1, ... of the script's manifest."""
    w = copy_world(world, tmp_path / "data")
    path = os.path.join(w["data"], MANIFEST[script])
    with open(path) as f:
        lines = f.read().splitlines()
    for i, kind in enumerate(kinds):
        n = first_line + i
        lines[n - 1] = corrupt_row(json.loads(lines[n - 1]), kind, w["data"], n)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return w


@pytest.mark.parametrize("script,kind", CASES)
def test_bad_row_stops_with_file_and_line(script, kind, world, tmp_path):
    w = corrupt(world, tmp_path, script, [kind])
    proc = run_script(script, w, tmp_path / "out", ["--max_steps", 1, "--save_every", 0])
    last = assert_clean_failure(proc)
    assert re.match(rf"^error: {re.escape(os.path.join(w['data'], MANIFEST[script]))}:2: ", last), last
    assert MESSAGE[kind] in last, last
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("script", ["train_pretrain.py", *SOME_KINDS])
def test_skip_bad_samples_finishes_and_counts(script, world, tmp_path):
    kinds = KINDS if script == "train_pretrain.py" else SOME_KINDS[script]
    w = corrupt(world, tmp_path, script, kinds)
    proc = run_script(script, w, tmp_path / "out", ["--max_steps", 1, "--save_every", 0, "--skip_bad_samples"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    counts = [int(n) for n in re.findall(r"skipped bad samples:? (\d+)", proc.stdout)]
    assert counts and counts[0] == len(kinds), proc.stdout
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


def test_outside_root_only_with_flag(world, tmp_path):
    """A manifest path leaving the data root is refused (above) unless --allow_outside_root."""
    w = corrupt(world, tmp_path, "train_pretrain.py", ["escape"])
    proc = run_script("train_pretrain.py", w, tmp_path / "out", ["--max_steps", 1, "--save_every", 0,
                                                                 "--allow_outside_root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped bad samples: 0" in proc.stdout


def test_checkpoint_dir_reads_no_pickle_and_checks_config(world, tmp_path):
    """SFT from an init dir holding a planted pickle (never opened) and then from one whose
    config.json does not match its tensors (a one-line error)."""
    import shutil
    init = tmp_path / "init"
    shutil.copytree(world["init"], init)
    marker = tmp_path / "pickle_ran"
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")  # unpickling runs `touch`
    for name in ("pytorch_model.bin", "train_state.pt", "model.pt", "optimizer.pt"):
        (init / name).write_bytes(payload)
    args = ["--max_steps", 1, "--save_every", 0, "--init", init]
    proc = run_script("train_sft.py", world, tmp_path / "out", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()

    with open(init / "config.json") as f:
        config = json.load(f)
    config["model"]["lm"]["n_layer"] += 1
    with open(init / "config.json", "w") as f:
        json.dump(config, f)
    proc = run_script("train_sft.py", world, tmp_path / "out2", args)
    last = assert_clean_failure(proc, r"^error: .*model\.safetensors: weights do not match config\.json")
    assert "missing" in last
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(str(init))


HOSTILE = [
    "__import__('os').system('touch {m}')",
    "<think>x</think><answer>__import__('os').system('touch {m}')</answer>",
    "<think>x</think><answer>eval(\"open('{m}', 'w')\")</answer>",
    "<answer>{{{{ open('{m}','w') }}}}</answer>",
]


@pytest.mark.parametrize("kind,answer", [("mcq", "A"), ("yesno", "yes"), ("short", "mucus")])
@pytest.mark.parametrize("template", HOSTILE)
def test_rewards_never_evaluate_model_text(kind, answer, template, tmp_path):
    marker = tmp_path / "pwned"
    text = template.format(m=marker)
    values = [reward(text, answer, kind), format_reward(text), accuracy_reward(text, answer, kind)]
    extract_answer(text)
    assert all(isinstance(v, float) and v == v for v in values)
    assert not marker.exists()
    assert accuracy_reward(text, answer, kind) == 0.0


def test_sft_max_seq_len_cutting_the_image_is_a_clear_error(world, tmp_path):
    """A --max_seq_len that ends before a conversation's image tokens: one line, not a traceback."""
    proc = run_script("train_sft.py", world, tmp_path, ["--max_steps", 1, "--max_seq_len", 24])
    last = assert_clean_failure(proc)
    assert "cuts into the image tokens" in last


def test_pretrain_max_seq_len_below_the_image_is_a_clear_error(world, tmp_path):
    """Stage 1 puts <|bos|> and every image token before the caption: a shorter --max_seq_len is an error."""
    proc = run_script("train_pretrain.py", world, tmp_path, ["--max_steps", 1, "--max_seq_len", 12])
    last = assert_clean_failure(proc, re.compile(r"^error: .+"))
    assert "--max_seq_len 12 is too small" in last
