"""End-to-end tests of `python -m nanopatho.generate` on a tiny random VLM checkpoint made here.

A random model's reply rarely parses, so the tests pin the output structure (thinking / answer /
parse lines, one table row per image, the context-full reset) and the exit codes; bad inputs are
checked in-process through the same run_cli entry point (one line on stderr, exit 1, no traceback).
"""

import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nanopatho.checkpoint import save_model
from nanopatho.clip import PathoCLIP
from nanopatho.generate import first_turn, main, parse_status, render, run_cli, thinking_part
from nanopatho.presets import clip_config, vlm_config
from nanopatho.prompts import SYSTEM_PROMPT
from nanopatho.tokenizer import Tokenizer
from nanopatho.vlm import VLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [SYSTEM_PROMPT, "Which tissue is shown? Options: A) adipose B) mucus",
         "<think>dense purple nuclei, glands</think><answer>B</answer>", "Is this tumour? yes no"] * 4
STATUSES = ("ok", "answer-only", "none")


def tiny_vlm(tok, max_seq_len=256):
    cfg = vlm_config("toy", tok.vocab_size, tok.image_id)
    vision = dataclasses.replace(cfg.vision, image_size=32, n_layer=1, n_embd=32, n_head=2)
    lm = dataclasses.replace(cfg.lm, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64,
                             max_seq_len=max_seq_len)
    return VLM(dataclasses.replace(cfg, vision=vision, lm=lm))


def tiny_clip(tok):
    cfg = clip_config("toy", tok.vocab_size)
    vision = dataclasses.replace(cfg.vision, image_size=32, n_layer=1, n_embd=32, n_head=2)
    text = dataclasses.replace(cfg.text, n_layer=1, n_embd=32, n_head=2)
    return PathoCLIP(dataclasses.replace(cfg, vision=vision, text=text, embed_dim=16))


def write_images(folder):
    """Three PNGs of different modes and sizes, plus a text file that pretends to be a PNG."""
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), "RGB").save(f"{folder}/a_rgb.png")
    Image.fromarray(rng.integers(0, 255, (90, 70, 4), dtype=np.uint8), "RGBA").save(f"{folder}/b_rgba.png")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L").save(f"{folder}/c_grey.png")
    return [f"{folder}/a_rgb.png", f"{folder}/b_rgba.png", f"{folder}/c_grey.png"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    save_model(root / "vlm", tiny_vlm(tok), tok)
    save_model(root / "clip", tiny_clip(tok), tok)
    shutil.copytree(root / "vlm", root / "no_tok")
    os.remove(root / "no_tok" / "tokenizer.json")
    shutil.copytree(root / "vlm", root / "big_tok")  # a tokenizer with more tokens than the model
    big = Tokenizer.train(TEXTS + ["a different corpus with other words entirely"] * 4, 340)
    assert big.vocab_size > tok.vocab_size
    big.save(root / "big_tok" / "tokenizer.json")
    images = write_images(str(root / "tiles"))
    (root / "fake.png").write_text("not an image")
    return {"root": root, "tok": tok, "images": images}


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "nanopatho.generate", "--device", "cpu", *map(str, args)],
                          cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120)


def test_helpers_split_thinking_and_answer():
    reply = "<think>many nuclei</think><answer>B</answer>"
    assert thinking_part(reply) == "many nuclei" and parse_status(reply) == "ok"
    assert parse_status("text <answer>B</answer>") == "answer-only"
    assert parse_status("<think>unclosed") == "none" and thinking_part("<think>unclosed") == "unclosed"
    assert thinking_part("no tags") is None


def test_one_question_prints_thinking_answer_and_parse(world):
    r = cli("--ckpt", world["root"] / "vlm", "--image", world["images"][1], "--question", "Which tissue?",
            "--options", "A) adipose|B) mucus", "--max_new_tokens", 12, "--temperature", 0.8, "--top_p", 0.9,
            "--seed", 3)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("thinking: ") and lines[1].startswith("answer: ") and lines[2].startswith("parse: ")
    assert lines[2].removeprefix("parse: ") in STATUSES
    assert "\033[" not in r.stdout  # no ANSI codes when stdout is not a terminal


def test_folder_batch_prints_one_row_per_image(world):
    r = cli("--ckpt", world["root"] / "vlm", "--image", world["root"] / "tiles", world["images"][0],
            "--question", "Is this tumour?", "--max_new_tokens", 8, "--batch_size", 2)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:3] == ["image", "parse", "answer"]
    assert [row.split()[0] for row in rows] == ["a_rgb.png", "b_rgba.png", "c_grey.png", "a_rgb.png"]
    assert all(row.split()[1] in STATUSES for row in rows)


def test_interactive_keeps_history_until_the_context_is_full(world):
    tok = world["tok"]
    model = tiny_vlm(tok)
    question = "Which tissue is shown?"
    room = model.config.lm.max_seq_len - len(render(tok, model, first_turn(question, None)))
    # turn 1 fits exactly, so turn 2 (longer history) cannot: the chat must restart, then answer again
    r = cli("--ckpt", world["root"] / "vlm", "--image", world["images"][2], "--interactive",
            "--max_new_tokens", room, stdin=f"{question}\n\n{question}\nexit\nnever asked\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("parse: ") == 2
    assert r.stdout.count("context full:") == 1
    assert r.stdout.index("context full:") > r.stdout.index("parse: ")


@pytest.mark.parametrize("case, args, message", [
    ("missing image", ["--ckpt", "vlm", "--image", "nope.png"], "not found"),
    ("not an image", ["--ckpt", "vlm", "--image", "fake.png"], "not a readable image"),
    ("empty folder", ["--ckpt", "vlm", "--image", "empty"], "holds no image files"),
    ("clip checkpoint", ["--ckpt", "clip", "--image", "tiles"], "'clip' model, but a 'vlm' model is needed"),
    ("missing checkpoint", ["--ckpt", "nowhere", "--image", "tiles"], "config.json: missing"),
    ("missing tokenizer", ["--ckpt", "no_tok", "--image", "tiles"], "tokenizer.json: missing"),
    ("mismatched tokenizer", ["--ckpt", "big_tok", "--image", "tiles"], "does not belong to this model"),
    ("two images interactive", ["--ckpt", "vlm", "--image", "tiles", "--interactive"], "one image"),
])
def test_bad_input_is_one_line_and_exit_1(world, capsys, case, args, message):
    root = world["root"]
    os.makedirs(root / "empty", exist_ok=True)
    argv = [str(root / a) if i % 2 else a for i, a in enumerate(args)] + ["--device", "cpu"]
    if "--interactive" not in args:
        argv += ["--question", "Which tissue?", "--max_new_tokens", "4"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, case
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bad_input_through_the_real_cli(world):
    r = cli("--ckpt", world["root"] / "clip", "--image", world["images"][0], "--question", "Which tissue?")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_streamer_prints_the_reply_as_tokens_arrive(capsys):
    import torch

    from nanopatho.generate import Streamer
    from nanopatho.tokenizer import Tokenizer

    tok = Tokenizer.train(["the tumour is high grade, with many mitoses ünïcode"] * 20, 300)
    reply = "<think>the tumour is high grade ü</think><answer>high</answer>"
    streamer = Streamer(tok)
    for t in tok.encode(reply) + [tok.im_end_id]:
        streamer(torch.tensor([t]), torch.tensor([True]))
    streamer.finish(reply)
    out = capsys.readouterr().out
    plain = out.replace("\033[2m", "").replace("\033[1m", "").replace("\033[0m", "")
    assert plain == reply + "\nparse: ok\n"
    assert "\033[2m" in out and "\033[1m" in out  # thinking dim, answer bold
