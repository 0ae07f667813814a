"""Starting PathoCLIP's image tower from a pretrained ViT: the 'vit' checkpoint (a vision tower alone, no
tokenizer), `hf_import.load_vision` on it, `train_clip.py --vision_init`, and the toy's stage-0 tower
(`data/synthpath/perception.py --out_dir`).

    python -m pytest -q tests/test_vision_init.py
"""

import json
import os

import pytest
import torch

import train_clip
from data.synthpath import perception
from e2e_util import run_script, tiny_world
from nanopatho import checkpoint, hf_import
from nanopatho.checkpoint import CheckpointError
from nanopatho.config import parse_config
from nanopatho.lm import LM
from nanopatho.presets import lm_config
from nanopatho.tokenizer import Tokenizer
from nanopatho.vit import ViT, ViTConfig

SMALL = ViTConfig(image_size=64, patch_size=8, n_layer=2, n_head=2, n_embd=64)  # not the toy preset's shape


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


def saved_vit(directory, seed=3):
    torch.manual_seed(seed)
    vit = ViT(SMALL)
    checkpoint.save_model(str(directory), vit, None, {"note": "tests/test_vision_init.py"})
    return vit


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_vit_checkpoint_round_trips_without_a_tokenizer(tmp_path):
    vit = saved_vit(tmp_path / "vit")
    assert not os.path.exists(tmp_path / "vit" / "tokenizer.json")
    model, config, tok = checkpoint.load(str(tmp_path / "vit"))
    assert config["model_type"] == "vit" and tok is None and isinstance(model, ViT)
    assert model.config == SMALL and same_state(model, vit)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x)[1], vit.eval()(x)[1], rtol=0, atol=0)
    assert same_state(hf_import.load_vision(str(tmp_path / "vit")), vit)
    with pytest.raises(CheckpointError, match="holds a 'vit' model, but a 'vlm' model is needed"):
        checkpoint.load(str(tmp_path / "vit"), expect="vlm")


def test_load_vision_refuses_a_language_model(tmp_path):
    tok = Tokenizer.train(["adipose tissue", "mucus pools"] * 20, 300)
    checkpoint.save_model(str(tmp_path / "lm"), LM(lm_config("toy", tok.vocab_size)), tok)
    with pytest.raises(CheckpointError, match="holds a 'lm' model, but a 'clip' or 'vit' model is needed here"):
        hf_import.load_vision(str(tmp_path / "lm"))


def test_train_clip_vision_init_takes_the_towers_shape_and_weights(world, tmp_path):
    tok = Tokenizer.from_file(os.path.join(world["data"], "tokenizer.json"))
    vit = saved_vit(tmp_path / "vit")
    plain = train_clip.build_model(parse_config(train_clip.Config, train_clip.PRESETS, ["--preset", "toy"]), tok)
    assert plain.config.vision.n_embd == 128 and plain.config.vision.n_layer == 4  # the toy preset's tower
    cfg = parse_config(train_clip.Config, train_clip.PRESETS, ["--preset", "toy", "--vision_init", str(tmp_path / "vit")])
    model = train_clip.build_model(cfg, tok)
    assert model.config.vision == SMALL and same_state(model.visual.vit, vit)
    assert model.visual.proj.weight.shape[1] == SMALL.n_embd
    assert model.config.text == plain.config.text  # only the image tower comes from --vision_init
    # a PathoCLIP checkpoint works as well: its image tower is taken, its text tower is not
    checkpoint.save_model(str(tmp_path / "clip"), model, tok)
    cfg.vision_init = str(tmp_path / "clip")
    again = train_clip.build_model(cfg, tok)
    assert same_state(again.visual.vit, vit) and not torch.equal(again.text.tok_embed.weight,
                                                                 model.text.tok_embed.weight)


def test_train_clip_cli_with_vision_init_at_lr_zero_keeps_the_tower_bitwise(world, tmp_path):
    vit = saved_vit(tmp_path / "vit")
    out = tmp_path / "clip"
    proc = run_script("train_clip.py", world, out, ["--max_steps", "2", "--lr", "0", "--vision_init", tmp_path / "vit"])
    assert proc.returncode == 0, proc.stderr
    assert f"image tower from {tmp_path / 'vit'}" in proc.stdout
    clip, config, _ = checkpoint.load(str(out), expect="clip")
    assert config["run"]["vision_init"] == str(tmp_path / "vit")
    assert same_state(clip.visual.vit, vit)  # AdamW at lr 0 (weight decay included) moves nothing


def test_perception_out_dir_writes_a_tower_train_clip_can_start_from(tmp_path):
    """The speedrun's stage-0 tower: a trained ViT checkpoint + eval.json with the held-out curve."""
    out = str(tmp_path / "base_vision")
    perception.main(["--size", "32", "--n_train", "12", "--steps", "2", "--eval_every", "1", "--threads", "1",
                     "--n_test", "20", "--out_dir", out])
    vit, config, tok = checkpoint.load(out)
    assert config["model_type"] == "vit" and tok is None and vit.config.image_size == 32
    assert config["run"]["steps"] == 2
    torch.manual_seed(0)
    fresh = ViT(vit.config)
    assert not same_state(vit, fresh)  # trained: two AdamW steps moved the seed-0 initial weights
    report = json.load(open(os.path.join(out, "eval.json")))
    assert [row["step"] for row in report["curve"]] == [1, 2]
    assert all(set(row) == {"step", *perception.ATTRIBUTES} for row in report["curve"])
    assert all(0 <= row[a] <= 1 and abs(row[a] * 20 - round(row[a] * 20)) < 1e-6
               for row in report["curve"] for a in perception.ATTRIBUTES)  # fractions of the 20 held-out tiles
    assert set(report["majority"]) == set(perception.PROBED)  # the held-out tiles carry every probed label
    assert same_state(hf_import.load_vision(out), vit)
    # the frozen linear probe reads a 'vit' checkpoint too, and --out keeps its numbers
    probe = str(tmp_path / "frozen.json")
    perception.main(["--size", "32", "--n_train", "12", "--n_test", "20", "--threads", "1", "--init", out, "--frozen",
                     "--out", probe])
    frozen = json.load(open(probe))
    assert frozen["tower"] == out and frozen["majority"] == report["majority"] and frozen["n_test"] == 20
    assert set(frozen["frozen"]) == set(perception.PROBED)  # the heads' attributes + necrosis and mucin
    assert all(abs(v * 20 - round(v * 20)) < 1e-6 for v in frozen["frozen"].values())
