"""End-to-end tests of `python -m nanopatho.classify` on a tiny random PathoCLIP checkpoint made here.

The CLI's probabilities are checked against the formula computed in-process with the pieces
`nanopatho.evaluate` scores with: p = softmax(exp(logit_scale) * f_img W^T), W from
build_zeroshot_classifier. Bad inputs go through the same run_cli entry point in-process.
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nanopatho.checkpoint import load, save_model
from nanopatho.classify import DEFAULT_TEMPLATES, main, read_prompts
from nanopatho.clip import PathoCLIP
from nanopatho.data import DataError, image_tensor, to_float
from nanopatho.evaluate import build_zeroshot_classifier, encode_texts
from nanopatho.generate import run_cli
from nanopatho.presets import clip_config, vlm_config
from nanopatho.tokenizer import Tokenizer
from nanopatho.vlm import VLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["an H&E image of adipose tissue.", "lymphocytes, mucus and tumour epithelium.",
         "a histopathology image of smooth muscle."] * 4
PROMPTS = {"0": {"classnames": {"ADI": ["adipose tissue", "fat"], "LYM": ["lymphocytes"], "MUC": ["mucus"]},
                 "templates": ["CLASSNAME.", "an H&E image of CLASSNAME."]}}


def shrink(vision):
    return dataclasses.replace(vision, image_size=32, n_layer=1, n_embd=32, n_head=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    tok = Tokenizer.train(TEXTS, vocab_size=290)
    cfg = clip_config("toy", tok.vocab_size)
    cfg = dataclasses.replace(cfg, vision=shrink(cfg.vision), embed_dim=16,
                              text=dataclasses.replace(cfg.text, n_layer=1, n_embd=32, n_head=2))
    torch.manual_seed(0)
    save_model(root / "clip", PathoCLIP(cfg), tok, {"data": str(root / "nodata")})
    vcfg = vlm_config("toy", tok.vocab_size, tok.image_id)
    lm = dataclasses.replace(vcfg.lm, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64)
    save_model(root / "vlm", VLM(dataclasses.replace(vcfg, vision=shrink(vcfg.vision), lm=lm)), tok)
    rng = np.random.default_rng(1)
    os.makedirs(root / "tiles")
    Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8), "RGB").save(root / "tiles" / "x.png")
    Image.fromarray(rng.integers(0, 255, (80, 64, 4), dtype=np.uint8), "RGBA").save(root / "tiles" / "y.png")
    Image.fromarray(rng.integers(0, 255, (33, 33), dtype=np.uint8), "L").save(root / "tiles" / "z.jpg")
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    (root / "broken.json").write_text(json.dumps({"0": {"classnames": {"ADI": ["fat"]}}}))
    return root


def cli(*args):
    return subprocess.run([sys.executable, "-m", "nanopatho.classify", "--device", "cpu", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def reference_probs(ckpt, image_path, prompts):
    """softmax(exp(logit_scale) * cos(image, class)) computed in-process with evaluate's classifier."""
    model, _, tok = load(ckpt, "cpu", expect="clip")
    model.eval()
    names, W = build_zeroshot_classifier(lambda texts: encode_texts(model, tok, texts, 8, "cpu"), prompts)  # (C, D)
    pixels = to_float(image_tensor(image_path, "test", model.config.vision.image_size)[None])  # (1, 3, S, S)
    with torch.no_grad():
        cos = model.encode_image(pixels) @ W.T  # (1, C)
        return names, (model.logit_scale.exp() * cos).softmax(-1)[0]


def test_folder_csv_matches_in_process_zeroshot(world):
    out = world / "preds.csv"
    r = cli("--ckpt", world / "clip", "--image", world / "tiles", "--prompts", world / "prompts.json",
            "--top_k", 2, "--out", out)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 + 3 + 1  # header, one row per image, "wrote ..."
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(row["image"]) for row in rows] == ["x.png", "y.png", "z.jpg"]
    for row in rows:
        probs = {c: float(row[c]) for c in PROMPTS["0"]["classnames"]}
        assert abs(sum(probs.values()) - 1) < 1e-5
        names, ref = reference_probs(world / "clip", row["image"], PROMPTS)
        assert row["prediction"] == names[int(ref.argmax())]
        assert float(row["probability"]) == max(probs.values())
        assert np.allclose([probs[n] for n in names], ref.numpy(), atol=1e-5)


def test_single_image_with_class_names_lists_top_k(world):
    image = world / "tiles" / "y.png"
    r = cli("--ckpt", world / "clip", "--image", image, "--classes", "adipose tissue, lymphocytes,mucus", "--top_k", 5)
    assert r.returncode == 0, r.stderr
    path, *ranked = r.stdout.splitlines()
    assert path == str(image) and len(ranked) == 3  # top_k capped at the number of classes
    shown = [(line.split(". ", 1)[1].rsplit(None, 1)) for line in ranked]
    probs = [float(p) for _, p in shown]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-3
    prompts = {"classnames": {c: [c] for c in ("adipose tissue", "lymphocytes", "mucus")},
               "templates": list(DEFAULT_TEMPLATES)}
    names, ref = reference_probs(world / "clip", image, prompts)
    assert shown[0][0].strip() == names[int(ref.argmax())]


def test_read_prompts_accepts_inner_dict_and_rejects_missing_templates(world):
    assert read_prompts(world / "prompts.json") == PROMPTS["0"]
    with pytest.raises(DataError, match="templates"):
        read_prompts(world / "broken.json")


@pytest.mark.parametrize("case, args, message", [
    ("vlm checkpoint", ["--ckpt", "vlm", "--image", "tiles", "--classes", "a,b"], "'vlm' model, but a 'clip'"),
    ("missing image", ["--ckpt", "clip", "--image", "nope.png", "--classes", "a,b"], "not found"),
    ("not an image", ["--ckpt", "clip", "--image", "prompts.json", "--classes", "a,b"], "not a readable image"),
    ("bad prompt file", ["--ckpt", "clip", "--image", "tiles", "--prompts", "broken.json"], "CLASSNAME"),
    ("prompt file not json", ["--ckpt", "clip", "--image", "tiles", "--prompts", "tiles/x.png"], "not valid JSON"),
    ("one class", ["--ckpt", "clip", "--image", "tiles", "--classes", "fat"], "at least two"),
    ("no classes", ["--ckpt", "clip", "--image", "tiles"], "no classes"),
])
def test_bad_input_is_one_line_and_exit_1(world, capsys, case, args, message):
    argv = [str(world / a) if i in (1, 3) or args[i - 1] == "--prompts" else a for i, a in enumerate(args)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv + ["--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, case
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bad_input_through_the_real_cli(world):
    r = cli("--ckpt", world / "vlm", "--image", world / "tiles", "--classes", "a,b")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
