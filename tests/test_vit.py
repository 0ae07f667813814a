"""ViT encoder: shapes, pooling, patch order, position-embedding interpolation.

    python -m pytest -q tests/test_vit.py
"""

import torch

from nanopatho.vit import ViT, ViTConfig

CFG = ViTConfig(image_size=32, patch_size=8, n_layer=2, n_head=2, n_embd=16)


def test_shapes_and_pooling():
    torch.manual_seed(0)
    vit = ViT(CFG)
    tokens, pooled = vit(torch.randn(3, 3, 32, 32))
    assert tokens.shape == (3, 16, 16) and pooled.shape == (3, 16)
    assert torch.allclose(pooled, tokens.mean(1))


def test_patches_are_row_major():
    """Token i covers patch (i // g, i % g): pixel shuffle in the VLM relies on this order."""
    torch.manual_seed(0)
    vit = ViT(CFG)
    pixels = torch.zeros(1, 3, 32, 32)
    pixels[:, :, 8:16, 16:24] = 1.0  # patch row 1, col 2 -> token 1 * 4 + 2 = 6
    x = vit.patch_embed(pixels).flatten(2).transpose(1, 2)[0]  # (16, C)
    bias_only = vit.patch_embed.bias
    changed = [(x[i] - bias_only).abs().sum().item() > 0 for i in range(16)]
    assert changed.index(True) == 6 and sum(changed) == 1


def test_position_interpolation_new_resolution():
    torch.manual_seed(0)
    vit = ViT(CFG)
    tokens, pooled = vit(torch.randn(2, 3, 48, 48))  # 6 x 6 patches instead of 4 x 4
    assert tokens.shape == (2, 36, 16) and torch.isfinite(tokens).all()
    assert vit.position_embeddings(4, 4) is vit.pos_embed  # native grid: untouched
    # bicubic resize keeps a per-channel constant grid constant
    with torch.no_grad():
        vit.pos_embed.copy_(torch.arange(16.0).expand(1, 16, 16))
    pe = vit.position_embeddings(7, 5)
    assert pe.shape == (1, 35, 16)
    assert torch.allclose(pe, torch.arange(16.0).expand(1, 35, 16), atol=1e-5)


def test_bidirectional():
    """Every patch sees every patch: changing the last patch changes the first token."""
    torch.manual_seed(0)
    vit = ViT(CFG)
    pixels = torch.randn(1, 3, 32, 32)
    a, _ = vit(pixels)
    pixels[..., 24:, 24:] += 1
    b, _ = vit(pixels)
    assert not torch.allclose(a[0, 0], b[0, 0])


def test_config_roundtrip():
    assert ViTConfig.from_dict(CFG.to_dict()) == CFG
