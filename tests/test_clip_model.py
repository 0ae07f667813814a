"""PathoCLIP towers and the symmetric InfoNCE loss (hand case, float64 gradient reference, clamp).

    python -m pytest -q tests/test_clip_model.py
"""

import math

import torch
import torch.nn.functional as F

from nanopatho.clip import CLIPConfig, PathoCLIP, TextConfig, clip_loss
from nanopatho.vit import ViTConfig


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    cfg = CLIPConfig(vision=ViTConfig(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=16),
                     text=TextConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, max_len=12), embed_dim=8)
    return PathoCLIP(cfg).eval()


def test_loss_hand_case():
    # images e1, e2, e3; texts e1, e2, e1; scale ln 2 so exp(logits) are 1 or 2
    e = torch.eye(3)
    img, txt = e, torch.stack([e[0], e[1], e[0]])
    scale = torch.tensor(math.log(2.0))
    # image->text rows: [2,1,2] y0 -> log(5/2); [1,2,1] y1 -> log 2; [1,1,1] y2 -> log 3    => log 15 / 3
    # text->image rows: [2,1,1] y0 -> log 2; [1,2,1] y1 -> log 2; [2,1,1] y2 -> log 4        => log 16 / 3
    assert torch.allclose(clip_loss(img, txt, scale), torch.tensor(math.log(240.0) / 6))


def reference_loss(img, txt, scale):
    """Plain float64 CLIP loss, written from the formula."""
    logits = scale * img @ txt.t()
    n = img.shape[0]
    i2t = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(n)) / n
    t2i = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(n)) / n
    return (i2t + t2i) / 2


def test_loss_gradient_matches_float64_reference():
    torch.manual_seed(0)
    img64 = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1).requires_grad_()
    txt64 = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1).requires_grad_()
    s64 = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    ref = reference_loss(img64, txt64, s64)
    ref_grads = torch.autograd.grad(ref, (img64, txt64, s64))
    img, txt, s = (t.detach().float().requires_grad_() for t in (img64, txt64, s64))
    loss = clip_loss(img, txt, s)
    grads = torch.autograd.grad(loss, (img, txt, s))
    assert abs(loss.item() - ref.item()) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g.double(), r, atol=1e-6)


def test_logit_scale_init_and_clamp():
    model = tiny_clip()
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert math.isclose(model.logit_scale.item(), math.log(100), rel_tol=1e-6)
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 2.0  # inside the range: untouched


def test_encoders_unit_norm_and_forward():
    model = tiny_clip()
    pixels = torch.randn(3, 3, 16, 16)
    ids = torch.randint(1, 50, (3, 6))
    img_f, txt_f, scale = model(pixels, ids, torch.ones_like(ids))
    assert img_f.shape == txt_f.shape == (3, 8)
    assert torch.allclose(img_f.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(txt_f.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(scale, model.logit_scale.exp())
    clip_loss(img_f, txt_f, scale).backward()
    assert model.logit_scale.grad is not None and model.text.pos_embed.grad is not None


def test_text_pooled_at_last_real_token():
    model = tiny_clip()
    caption = [4, 9, 17, 2]  # ... ending in eos (2)
    alone = model.encode_text(torch.tensor([caption]))
    ids = torch.tensor([caption + [0, 0], [0, 0] + caption, caption + [7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    out = model.encode_text(ids, mask)
    assert torch.allclose(out, alone.expand(3, -1), atol=1e-5)  # right pad, left pad, junk under the pad
    shorter = model.encode_text(torch.tensor([caption[:3]]))
    assert not torch.allclose(shorter, alone, atol=1e-3)  # it is the last real token that is pooled
