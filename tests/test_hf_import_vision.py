"""Importing released vision towers and CLIPs (nanopatho/hf_import.py) against transformers: tiny random
HF CLIP and SigLIP models saved with save_pretrained, and the same CLIP weights under OpenCLIP's names
(open_clip itself needs torchvision, which has no CPU wheel here). Features, embeddings and zero-shot
logits match; the ViT's new options are pinned by hand; the VLM takes 14 x 14 and 16 x 16 grids.

    python -m pytest -q tests/test_hf_import_vision.py
"""

import json
import math
import os

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from hf_util import from_dir, jitter, save, save_clip, save_siglip_vision, to_openclip_dir  # noqa: E402
from nanopatho import hf_import  # noqa: E402
from nanopatho.checkpoint import CheckpointError  # noqa: E402
from nanopatho.data import IMAGE_MEAN, IMAGE_STD, to_float  # noqa: E402
from nanopatho.evaluate import tokenize_texts  # noqa: E402
from nanopatho.lm import LMConfig  # noqa: E402
from nanopatho.vit import ViT, ViTConfig  # noqa: E402


def images(n=3, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def source_pixels(u8, mean, std):
    """What the released tower's own processor feeds it: (u / 255 - mean) / std."""
    return (u8.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# -----------------------------------------------------------------------------
# the ViT options, by hand


def test_quick_gelu_and_tanh_gelu_values():
    x = torch.tensor([1.0, -2.0])
    quick = ViT(ViTConfig(n_layer=1, mlp_act="quick_gelu")).blocks[0].mlp[1]
    assert torch.allclose(quick(x), torch.tensor([1 / (1 + math.exp(-1.702)), -2 / (1 + math.exp(3.404))]))
    tanh = ViT(ViTConfig(n_layer=1, mlp_act="gelu_tanh")).blocks[0].mlp[1]
    c = math.sqrt(2 / math.pi)
    assert torch.allclose(tanh(x), 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * x ** 3))))


def test_class_token_pre_norm_and_cls_pooling_by_hand():
    """n_layer = 0 leaves only embeddings and norms, so every output is computable by hand."""
    cfg = ViTConfig(image_size=16, patch_size=8, n_layer=0, n_head=2, n_embd=4, class_token=True, pre_norm=True,
                    conv_bias=False, pooling="cls")
    vit = ViT(cfg)
    assert vit.patch_embed.bias is None and vit.cls_token.shape == (4,)
    px = torch.randn(2, 3, 16, 16)
    patches = vit.patch_embed(px).flatten(2).transpose(1, 2) + vit.pos_embed  # (2, 4, 4)
    x = torch.cat([vit.cls_token.expand(2, 1, 4), patches], dim=1)
    x = vit.ln_f(vit.ln_pre(x))
    tokens, pooled = vit(px)
    assert tokens.shape == (2, 4, 4) and torch.allclose(tokens, x[:, 1:]) and torch.allclose(pooled, x[:, 0])
    mean_pooled = ViT(ViTConfig(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=4, class_token=True))
    tokens, pooled = mean_pooled(px)
    assert tokens.shape == (2, 4, 4) and torch.allclose(pooled, tokens.mean(1))  # OpenCLIP pool_type 'avg'
    with pytest.raises(AssertionError, match="pooling='cls' needs class_token"):
        ViTConfig(pooling="cls")


def test_default_config_keeps_the_toy_state_dict_names():
    names = set(ViT(ViTConfig(n_layer=1)).state_dict())
    assert names == {"patch_embed.weight", "patch_embed.bias", "pos_embed", "ln_f.weight", "ln_f.bias",
                     *(f"blocks.0.{m}.{p}" for m in ("ln_1", "attn.qkv", "attn.proj", "ln_2", "mlp.0", "mlp.2")
                       for p in ("weight", "bias"))}


def test_fold_pixel_norm_equals_the_source_normalisation():
    """conv(x_source) == conv'(x_nanopatho) for the folded weights, on random images (property)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=4, stride=4, bias=False)
    state = {"patch_embed.weight": conv.weight.detach().clone()}
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    assert hf_import.fold_pixel_norm(state, mean, std)
    u8 = images(size=16)
    folded = nn.functional.conv2d(to_float(u8), state["patch_embed.weight"], state["patch_embed.bias"], stride=4)
    assert torch.allclose(folded, conv(source_pixels(u8, mean, std)), atol=1e-5)
    assert not hf_import.fold_pixel_norm(dict(state), IMAGE_MEAN, IMAGE_STD)  # already nanopatho's constants


# -----------------------------------------------------------------------------
# vision towers against transformers


def clip_pixels(u8):
    return source_pixels(u8, IMAGE_MEAN, IMAGE_STD)


@pytest.mark.parametrize("whole", [True, False])
def test_hf_clip_vision_tower_matches(tmp_path, whole):
    """From a CLIPModel (vision_model.* tensors) and from a CLIPVisionModel directory."""
    d = save_clip(tmp_path)
    if not whole:
        d = save(from_dir(d, "clip").vision_model, tmp_path / "vision")
    vit = hf_import.load_vision(d)
    c = vit.config
    assert (c.class_token, c.pre_norm, c.conv_bias, c.mlp_act, c.pooling, c.grid) == (True, True, False, "quick_gelu", "cls", 4)
    hf = transformers.CLIPVisionModel.from_pretrained(d).eval()
    u8 = images()
    tokens, pooled = vit(to_float(u8))
    out = hf(pixel_values=clip_pixels(u8))
    assert (pooled - out.pooler_output).abs().max() < 1e-5
    patch = hf.post_layernorm(out.last_hidden_state[:, 1:])  # our ViT applies the final LayerNorm to every token
    assert tokens.shape == (3, 16, 48) and (tokens - patch).abs().max() < 1e-5


def test_siglip_patch_features_match_with_its_pixel_normalisation_folded(tmp_path, capsys):
    d = save_siglip_vision(tmp_path)
    vit = hf_import.load_vision(d)
    out = capsys.readouterr().out
    assert "(0.5, 0.5, 0.5) folded into the patch embedding" in out and "attention-pooling head is not imported" in out
    c = vit.config
    assert (c.class_token, c.pre_norm, c.conv_bias, c.mlp_act, c.norm_eps, c.mlp_dim) == (False, False, True, "gelu_tanh", 1e-6, 80)
    hf = from_dir(d, "siglip")
    u8 = images()
    tokens, _ = vit(to_float(u8))
    ref = hf(pixel_values=source_pixels(u8, (0.5,) * 3, (0.5,) * 3)).last_hidden_state
    assert (tokens - ref).abs().max() < 1e-5


def test_preprocessor_config_constants_are_folded(tmp_path):
    d = save_clip(tmp_path)
    mean, std = [0.6, 0.5, 0.4], [0.2, 0.2, 0.25]
    json.dump({"image_mean": mean, "image_std": std}, open(os.path.join(d, "preprocessor_config.json"), "w"))
    vit = hf_import.load_vision(d)
    assert vit.config.conv_bias  # the folded offset needs a bias the CLIP conv does not have
    hf = transformers.CLIPVisionModel.from_pretrained(d).eval()
    u8 = images()
    assert (vit(to_float(u8))[1] - hf(pixel_values=source_pixels(u8, mean, std)).pooler_output).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# whole CLIP: image and text embeddings, zero-shot logits

TEXTS = ["an H&E image of adipose tissue.", "Pools of pale blue mucin.", "lymphocytes"]


def assert_same_clip(clip, tok, hf):
    u8 = images()
    img = clip.encode_image(to_float(u8))
    ids, mask = tokenize_texts(tok, TEXTS, clip.config.text.max_len)  # nanopatho's own CLIP tokenisation
    assert ids[0, 0] == tok.bos_id == 0 and tok.eos_id == tok.pad_id == 1  # <|startoftext|>, <|endoftext|>
    txt = clip.encode_text(ids, mask)
    out = hf(input_ids=ids, attention_mask=mask, pixel_values=clip_pixels(u8))
    assert (img - out.image_embeds).abs().max() < 1e-5 and (txt - out.text_embeds).abs().max() < 1e-5
    assert (clip.logit_scale.exp() * img @ txt.T - out.logits_per_image).abs().max() < 1e-4  # zero-shot logits


def test_hf_clip_model_matches(tmp_path):
    d = save_clip(tmp_path)
    clip, config, tok = hf_import.load_pretrained(d, expect="clip")
    assert config["model_type"] == "clip" and clip.config.text.mlp_act == "quick_gelu"
    assert clip.config.text.vocab_size == tok.vocab_size == 307  # 300 + im_start, im_end, image, 4 reasoning markers
    assert_same_clip(clip, tok, from_dir(d, "clip"))


def test_openclip_layout_matches_the_same_weights(tmp_path):
    d = save_clip(tmp_path)
    hf = from_dir(d, "clip")
    oc = to_openclip_dir(hf, tmp_path / "openclip", os.path.join(d, "tokenizer.json"))
    clip, config, tok = hf_import.load_pretrained(oc, expect="clip")
    assert config["run"]["source"] == "open_clip"
    assert_same_clip(clip, tok, hf)
    assert torch.equal(hf_import.load_vision(oc).pos_embed, clip.visual.vit.pos_embed)


def test_openclip_gelu_flag_and_preprocess_constants(tmp_path):
    """quick_gelu absent means nn.GELU (OpenCLIP's default); preprocess_cfg mean / std are folded."""
    d = save_clip(tmp_path, act="gelu")
    hf = from_dir(d, "clip")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    vit = hf_import.load_vision(to_openclip_dir(hf, tmp_path / "oc", None, quick_gelu=False, mean=mean, std=std))
    assert vit.config.mlp_act == "gelu"
    u8 = images()
    ref = hf.vision_model(pixel_values=source_pixels(u8, mean, std)).pooler_output
    assert (vit(to_float(u8))[1] - ref).abs().max() < 1e-5


OPENCLIP_REFUSED = [
    (("vision_cfg", "timm_model_name", "vit_base_patch16_224"), r"vision_cfg\.timm_model_name"),
    (("vision_cfg", "ls_init_value", 1e-5), r"vision_cfg\.ls_init_value"),
    (("text_cfg", "hf_model_name", "microsoft/BiomedNLP-PubMedBERT"), r"text_cfg\.hf_model_name"),
    (("text_cfg", "pool_type", "last"), r"text_cfg text_arch / pool_type"),
]


@pytest.mark.parametrize("change,message", OPENCLIP_REFUSED)
def test_openclip_options_nanopatho_lacks_are_refused(tmp_path, change, message):
    d = save_clip(tmp_path)
    oc = to_openclip_dir(from_dir(d, "clip"), tmp_path / "oc", os.path.join(d, "tokenizer.json"))
    path = os.path.join(oc, "open_clip_config.json")
    config = json.load(open(path))
    section, key, value = change
    config["model_cfg"][section][key] = value
    json.dump(config, open(path, "w"))
    with pytest.raises(CheckpointError, match=r"open_clip_config\.json: " + message):
        hf_import.load_pretrained(oc)


def test_refusals_for_vision_sources(tmp_path):
    d = save_clip(tmp_path)
    oc = to_openclip_dir(from_dir(d, "clip"), tmp_path / "oc", None)
    os.rename(os.path.join(oc, "open_clip_model.safetensors"), os.path.join(oc, "open_clip_pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"open_clip_pytorch_model\.bin: pickled weights are never loaded"):
        hf_import.load_vision(oc)
    s = save_siglip_vision(tmp_path)
    with pytest.raises(CheckpointError, match="a siglip_vision_model vision tower only; use it as train_pretrain.py"):
        hf_import.load_pretrained(s)
    config = json.load(open(os.path.join(s, "config.json")))
    json.dump({**config, "model_type": "siglip2_vision_model"}, open(os.path.join(s, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"model_type 'siglip2_vision_model' cannot be imported"):
        hf_import.load_vision(s)


# -----------------------------------------------------------------------------
# the VLM on imported grids


@pytest.mark.parametrize("image_size,patch_size,n_tokens", [(56, 4, 49), (64, 4, 64)])
def test_vlm_pixel_shuffle_on_14_and_16_grids_with_the_class_token_dropped(image_size, patch_size, n_tokens):
    from nanopatho.vlm import VLM, VLMConfig
    vision = ViTConfig(image_size=image_size, patch_size=patch_size, n_layer=1, n_head=2, n_embd=16,
                       class_token=True, pre_norm=True, conv_bias=False, pooling="cls")
    lm = LMConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32, max_seq_len=96)
    vlm = VLM(VLMConfig(vision=vision, lm=lm, image_token_id=63))
    assert vlm.n_image_tokens == n_tokens
    pixels = torch.randn(2, 3, image_size, image_size)
    patches, _ = vlm.vision(pixels)
    assert patches.shape == (2, (image_size // patch_size) ** 2, 16)  # no class token among them
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, n_tokens), 63), torch.ones(2, 3, dtype=torch.long)], 1)
    logits, loss = vlm(ids, pixels, targets=ids)
    assert logits.shape == (2, n_tokens + 4, 64) and torch.isfinite(loss)
    jitter(vlm.vision, 0)  # the image reaches the logits
    assert not torch.allclose(vlm(ids, pixels)[0], vlm(ids, pixels.flip(-1))[0])
