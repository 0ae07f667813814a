"""VLM: pixel shuffle, image splice, loss on image positions, generation, CLIP init; every preset builds.

    python -m pytest -q tests/test_vlm.py -s      # -s prints the parameter counts per preset
"""

import pytest
import torch

from nanopatho.clip import CLIPConfig, PathoCLIP, TextConfig
from nanopatho.lm import LMConfig
from nanopatho.presets import PRESETS, clip_config, count_params, lm_config, vit_config, vlm_config
from nanopatho.vit import ViTConfig
from nanopatho.vlm import VLM, VLMConfig, pixel_shuffle

IMG = 63  # image placeholder id
VIT = ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=16)  # 4 x 4 patches -> 4 tokens after shuffle


def tiny_vlm(seed=0):
    torch.manual_seed(seed)
    lm = LMConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=64)
    return VLM(VLMConfig(vision=VIT, lm=lm, image_token_id=IMG, pixel_shuffle=2)).eval()


def test_pixel_shuffle_hand_case():
    x = torch.arange(16.0).view(1, 16, 1)  # 4 x 4 grid, value = row * 4 + col
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 4)
    assert y[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_splice_puts_image_embeddings_at_placeholders():
    vlm = tiny_vlm()
    assert vlm.n_image_tokens == 4
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, 2, 3, 4],
                        [5, 6, 7, IMG, IMG, IMG, IMG, 8]])
    pixels = torch.randn(2, 3, 32, 32)
    x = vlm.embed(ids, pixels)
    feats = vlm.image_embeddings(pixels)  # (2, 4, 32)
    assert torch.equal(x[0, 1:5], feats[0]) and torch.equal(x[1, 3:7], feats[1])
    text = ids != IMG
    assert torch.equal(x[text], vlm.lm.embed_tokens(ids)[text])
    with pytest.raises(ValueError, match="image placeholder tokens"):
        vlm.embed(ids, pixels[:1])
    with pytest.raises(ValueError, match="n_image_tokens=4"):
        vlm.embed(ids[:, :5], pixels)  # row 1 keeps 2 of its 4 placeholders


def test_loss_ignores_image_positions():
    vlm = tiny_vlm()
    ids = torch.tensor([[1, 2, IMG, IMG, IMG, IMG, 3, 4, 5, 6]])
    pixels = torch.randn(1, 3, 32, 32)
    targets = torch.cat([ids[:, 1:], torch.tensor([[-1]])], 1)  # next token; positions 1..4 target the image
    logits, loss = vlm(ids, pixels, targets=targets)
    nll = -logits.log_softmax(-1)[0]
    counted = [t for t in range(9) if targets[0, t] != IMG]
    ref = sum(nll[t, targets[0, t]] for t in counted) / len(counted)
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    assert vlm.vision.patch_embed.weight.grad.abs().sum() > 0  # the image reaches the text loss


def test_generate_with_images_left_padded():
    vlm = tiny_vlm()
    p0 = [1, IMG, IMG, IMG, IMG, 2, 3]
    p1 = [IMG, IMG, IMG, IMG, 9]
    ids = torch.tensor([p0, [0, 0] + p1])
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    pixels = torch.randn(2, 3, 32, 32)
    out = vlm.generate(ids, pixels, mask, max_new_tokens=5, temperature=0)
    alone = vlm.generate(torch.tensor([p1]), pixels[1:], max_new_tokens=5, temperature=0)
    assert out.ids.shape == (2, 5)
    assert torch.equal(out.ids[1], alone.ids[0])
    assert torch.allclose(out.logprobs[1], alone.logprobs[0], atol=1e-5)


def test_freeze_and_load_vision_from_clip():
    vlm = tiny_vlm()
    torch.manual_seed(1)
    text = TextConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, max_len=8)
    clip = PathoCLIP(CLIPConfig(vision=VIT, text=text, embed_dim=8))
    vlm.load_vision_from_clip(clip.state_dict())
    for k, v in vlm.vision.state_dict().items():
        assert torch.equal(v, clip.visual.vit.state_dict()[k])
    with pytest.raises(ValueError, match="visual.vit"):
        vlm.load_vision_from_clip(vlm.state_dict())
    vlm.freeze_vision()
    assert not any(p.requires_grad for p in vlm.vision.parameters())
    assert all(p.requires_grad for p in vlm.projector.parameters())
    vlm.freeze_vision(False)
    assert all(p.requires_grad for p in vlm.vision.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds(preset):
    vocab = 151936 if preset == "base" else 4096
    device = "cpu" if preset == "toy" else "meta"
    with torch.device(device):
        vlm = VLM(vlm_config(preset, vocab, image_token_id=3))
        clip = PathoCLIP(clip_config(preset, vocab))
    cv, cc = count_params(vlm), count_params(clip)
    print(f"\n{preset}: VLM {cv}\n{preset}: CLIP {cc}")
    assert cv["total"] == sum(p.numel() for p in vlm.parameters())
    if preset == "base":  # Qwen2-0.5B's published size with tied embeddings
        assert cv["lm"] == 494_032_768
    if preset == "toy":
        ids = torch.full((1, vlm.n_image_tokens + 2), 3)
        ids[0, -2:] = torch.tensor([5, 6])
        logits, _ = vlm(ids, torch.randn(1, 3, 64, 64))
        assert logits.shape == (1, vlm.n_image_tokens + 2, vocab)
    for cfg, cls in [(vlm.config, VLMConfig), (clip.config, CLIPConfig)]:
        assert cls.from_dict(cfg.to_dict()) == cfg
    assert lm_config(preset, vocab).vocab_size == vocab and vit_config(preset).image_size in (64, 224)
    with pytest.raises(ValueError, match="unknown preset"):
        vit_config("huge")


def test_generate_never_samples_the_image_placeholder_and_streams():
    torch.manual_seed(0)
    from nanopatho.presets import vlm_config
    from nanopatho.vlm import VLM
    cfg = vlm_config("toy", 40, 7)
    cfg.lm.n_layer, cfg.vision.n_layer, cfg.vision.image_size = 1, 1, 32
    model = VLM(cfg)
    with torch.no_grad():
        model.lm.lm_head.weight[7] += 50.0  # make the placeholder by far the likeliest token
    ids = torch.tensor([[1] + [7] * model.n_image_tokens + [3, 4]])
    seen = []
    out = model.generate(ids, torch.randn(1, 3, 32, 32), max_new_tokens=6, temperature=1.0,
                         generator=torch.Generator().manual_seed(0), on_token=lambda tok, alive: seen.append(int(tok[0])))
    assert 7 not in out.ids.tolist()[0]
    assert seen == out.ids[0].tolist()


def test_pooled_token_follows_the_patch_tokens():
    torch.manual_seed(0)
    lm = LMConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=64)
    vlm = VLM(VLMConfig(vision=VIT, lm=lm, image_token_id=IMG, pixel_shuffle=2, pooled_token=True)).eval()
    assert vlm.n_image_tokens == 5  # 4 pixel-shuffled patch tokens + the pooled one
    pixels = torch.randn(2, 3, 32, 32)
    feats = vlm.image_embeddings(pixels)  # (2, 5, 32)
    patches, pooled = vlm.vision(pixels)  # (2, 16, 16), (2, 16)
    assert torch.allclose(pooled, patches.mean(1), atol=1e-6)  # the toy ViT pools by the mean
    assert torch.allclose(feats[:, :4], vlm.projector.mlp(pixel_shuffle(patches, 2)), atol=1e-6)
    assert torch.allclose(feats[:, 4], vlm.projector.pooled(pooled), atol=1e-6)
    restored = VLM(VLMConfig.from_dict(vlm.config.to_dict()))  # the flag survives a checkpoint's config
    assert restored.n_image_tokens == 5
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, IMG, 2, 3]])
    logits, loss = vlm(ids, pixels[:1], targets=torch.cat([ids[:, 1:], torch.tensor([[-1]])], 1))
    loss.backward()
    assert vlm.projector.pooled[0].weight.grad.abs().sum() > 0  # the pooled token reaches the text loss
