"""A newcomer's path with released weights, on tiny random models built by transformers (no hub):
evaluate and classify an imported CLIP; then stage 1 (--lm_init a Qwen2 directory, --vision_init a CLIP
directory) -> SFT -> RL as real subprocesses, a few steps each.

    python -m pytest -q tests/test_hf_import_e2e.py
"""

import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from e2e_util import assert_clean_failure, copy_world, load_weights, metrics, run_script, tiny_world  # noqa: E402
from hf_util import from_dir, save_clip, save_qwen2  # noqa: E402
from nanopatho import classify, evaluate, hf_import  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("released"))
    return {"lm": save_qwen2(base, max_position_embeddings=512), "clip": save_clip(base)}


def test_evaluate_and_classify_run_on_an_imported_clip(world, released, tmp_path, capsys):
    data = copy_world(world, tmp_path / "data")["data"]  # + a labelled probe pool (9 test images: one per class)
    shutil.copy(os.path.join(data, "zeroshot_test.jsonl"), os.path.join(data, "zeroshot_train.jsonl"))
    out = tmp_path / "eval.json"
    evaluate.main(["--ckpt", released["clip"], "--data", data, "--tasks", "zeroshot,retrieval,linear_probe",
                   "--out", str(out), "--batch_size", "8"])
    results = json.load(open(out))["results"]
    assert results["zeroshot"]["n"] > 0 and 0 <= results["zeroshot"]["accuracy"] <= 1
    assert results["retrieval"]["n"] > 0 and "i2t_R@1" in results["retrieval"]
    assert "1shot_acc" in results["linear_probe"]
    image = os.path.join(world["data"], json.loads(open(os.path.join(world["data"], "zeroshot_test.jsonl")).readline())["image"])
    capsys.readouterr()
    classify.main(["--ckpt", released["clip"], "--image", image, "--classes", "adipose tissue,mucus,lymphocytes",
                   "--out", str(tmp_path / "preds.csv"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "1. " in printed and "adipose tissue" in printed
    row = open(tmp_path / "preds.csv").read().splitlines()[1].split(",")
    assert abs(sum(float(p) for p in row[3:]) - 1) < 1e-4


def test_pretrain_sft_rl_from_released_weights(world, released, tmp_path):
    """Stage 1 as LLaVA's alignment (vision and LM frozen: only the projector moves), then SFT, then GRPO."""
    pre, sft, rl = tmp_path / "pretrain", tmp_path / "sft", tmp_path / "rl"
    proc = run_script("train_pretrain.py", world, pre, ["--max_steps", 2, "--save_every", 0, "--lm_init", released["lm"],
                                                        "--vision_init", released["clip"], "--freeze_vision", "--freeze_lm",
                                                        "--projector_lr", 1e-2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qwen2 LM, 2 layers x 32" in proc.stdout
    rows = metrics(pre)
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)  # the projector trained
    weights = load_weights(pre)
    lm, tok = hf_import.load_lm(released["lm"])
    vit = hf_import.load_vision(released["clip"])
    assert all(torch.equal(weights[f"lm.{k}"], v) for k, v in lm.state_dict().items() if f"lm.{k}" in weights)
    assert all(torch.equal(weights[f"vision.{k}"], v) for k, v in vit.state_dict().items())
    hf = from_dir(released["lm"], "qwen2")  # the VLM's LM still is the released one, so its text logits are too
    vlm_lm = lm.__class__(lm.config)
    vlm_lm.load_state_dict({k[3:]: v for k, v in weights.items() if k.startswith("lm.")}, strict=False)
    ids = torch.randint(0, 300, (2, 12))
    assert (vlm_lm(ids)[0] - hf(input_ids=ids).logits).abs().max() < 1e-5
    assert json.load(open(pre / "config.json"))["model"]["image_token_id"] == tok.image_id

    proc = run_script("train_sft.py", world, sft, ["--max_steps", 2, "--save_every", 0, "--init", pre,
                                                   "--max_seq_len", 400])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not torch.equal(load_weights(sft)["lm.layers.0.mlp.up_proj.weight"], weights["lm.layers.0.mlp.up_proj.weight"])
    proc = run_script("train_rl.py", world, rl, ["--max_steps", 1, "--save_every", 0, "--init", sft, "--algo", "grpo",
                                                 "--lr", 1e-4])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(rl / "model.safetensors")


def test_released_lm_with_a_tokenizer_flag_is_a_clear_error(world, released, tmp_path):
    proc = run_script("train_pretrain.py", world, tmp_path / "out", ["--max_steps", 1, "--lm_init", released["lm"],
                                                                     "--tokenizer", os.path.join(world["data"], "tokenizer.json")])
    assert_clean_failure(proc, r"^error: --tokenizer .*: a released --lm_init uses its own tokenizer\.json$")


def test_build_model_dispatches_nanopatho_and_released_inits(world, released, tmp_path):
    """One code path for --lm_init / --vision_init: a nanopatho LM checkpoint keeps the data's tokenizer,
    a released LM brings its merged one; the grid must divide by --pixel_shuffle."""
    import train_pretrain
    from nanopatho import checkpoint
    from nanopatho.lm import LM
    from nanopatho.presets import lm_config
    from nanopatho.tokenizer import Tokenizer

    def build(*flags):
        return train_pretrain.build_model(train_pretrain.parse_config(
            train_pretrain.Config, train_pretrain.PRESETS, ["--data", world["data"], *map(str, flags)]))

    data_tok = Tokenizer.from_file(os.path.join(world["data"], "tokenizer.json"))
    base = LM(lm_config("toy", data_tok.vocab_size))
    checkpoint.save_model(str(tmp_path / "base_lm"), base, data_tok)
    model, tok = build("--lm_init", tmp_path / "base_lm")
    assert tok.vocab_size == data_tok.vocab_size and torch.equal(model.lm.layers[0].mlp.up_proj.weight,
                                                                 base.layers[0].mlp.up_proj.weight)
    model, tok = build("--lm_init", released["lm"], "--vision_init", released["clip"])
    assert tok.image_id == tok.token_to_id("<|image_pad|>") == model.config.image_token_id
    assert model.config.vision.class_token and model.n_image_tokens == 4  # 32 px / 8 = 4 x 4 patches, shuffle 2
    with pytest.raises(SystemExit):
        build("--vision_init", released["clip"], "--pixel_shuffle", 3)
