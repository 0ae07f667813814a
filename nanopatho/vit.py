"""Vision Transformer encoder (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words").

Conv patch embedding -> learned position embeddings -> pre-norm transformer blocks -> final
LayerNorm. Returns every patch token (the VLM projects them into the LM) and a pooled vector
(PathoCLIP projects it into the joint space). nanopatho's own ViT has no class token and pools
by the mean of the normed patch tokens: as good for pathology tiles, and the patch grid stays
square for pixel shuffle.

Released towers need a few more options, all off by default (nanopatho/hf_import.py sets them):
    class_token  a learned token before the patches (CLIP, OpenCLIP); it never leaves the ViT
                 as a patch token, and pooling="cls" returns its final state
    pre_norm     LayerNorm on the embeddings before the first block (CLIP's ln_pre)
    mlp_act      gelu | quick_gelu (x * sigmoid(1.702 x), OpenAI CLIP) | gelu_tanh (SigLIP)
    conv_bias, norm_eps, mlp_dim   patch-embedding bias, LayerNorm eps, MLP width (0: mlp_ratio x n_embd)
The final LayerNorm is applied to every token (OpenCLIP and SigLIP; HF CLIP applies the same
LayerNorm to its pooled class token only, which gives the same pooled vector). A CLIP's final
projection into the joint space is PathoCLIP's `visual.proj` (clip.py), not part of the ViT.

    from nanopatho.vit import ViT, ViTConfig
    vit = ViT(ViTConfig(image_size=64, patch_size=8, n_layer=4, n_head=4, n_embd=128))
    tokens, pooled = vit(torch.randn(2, 3, 64, 64))       # (2, 64, 128), (2, 128)

Inputs at another resolution work: the position grid is resized with bicubic interpolation.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0
    class_token: bool = False
    pre_norm: bool = False
    mlp_act: str = "gelu"
    conv_bias: bool = True
    norm_eps: float = 1e-5
    mlp_dim: int = 0
    pooling: str = "mean"

    def __post_init__(self):
        assert self.mlp_act in ACTIVATIONS, f"mlp_act must be one of {sorted(ACTIVATIONS)}, got {self.mlp_act!r}"
        assert self.pooling in ("mean", "cls"), f"pooling must be 'mean' or 'cls', got {self.pooling!r}"
        assert self.pooling != "cls" or self.class_token, "pooling='cls' needs class_token=True"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    @property
    def grid(self):
        return self.image_size // self.patch_size


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


class Attention(nn.Module):
    """Multi-head self-attention. The ViT passes no mask (every patch sees every patch); the
    CLIP text tower reuses this block with a boolean (B, 1, T, T) causal-and-padding mask."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd {n_embd} not divisible by n_head {n_head}"
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, N, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, N, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # softmax(q k^T / sqrt(hd)) v, (B, nh, N, hd)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, n_embd, n_head, mlp_ratio=4.0, mlp_act="gelu", norm_eps=1e-5, mlp_dim=0):
        super().__init__()
        hidden = mlp_dim or int(n_embd * mlp_ratio)
        self.ln_1 = nn.LayerNorm(n_embd, eps=norm_eps)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=norm_eps)
        self.mlp = nn.Sequential(nn.Linear(n_embd, hidden), ACTIVATIONS[mlp_act](), nn.Linear(hidden, n_embd))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    model_type = "vit"

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(3, cfg.n_embd, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                     bias=cfg.conv_bias)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid * cfg.grid, cfg.n_embd) * 0.02)
        if cfg.class_token:  # its own position embedding is folded in: cls_token = class embedding + pos[0]
            self.cls_token = nn.Parameter(torch.randn(cfg.n_embd) * 0.02)
        if cfg.pre_norm:
            self.ln_pre = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.mlp_ratio, cfg.mlp_act, cfg.norm_eps, cfg.mlp_dim)
                                    for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.apply(init_weights)

    def position_embeddings(self, gh, gw):
        """Learned (1, g*g, C) grid, bicubically resized to (1, gh*gw, C) for another resolution."""
        if gh == gw == self.config.grid:
            return self.pos_embed
        g, C = self.config.grid, self.config.n_embd
        grid = self.pos_embed.float().reshape(1, g, g, C).permute(0, 3, 1, 2)  # (1, C, g, g)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)  # (1, C, gh, gw)
        return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, C).to(self.pos_embed.dtype)

    def forward(self, pixels):
        assert pixels.dim() == 4 and pixels.shape[1] == 3, f"expected (B, 3, H, W) pixels, got {tuple(pixels.shape)}"
        cfg = self.config
        x = self.patch_embed(pixels)  # (B, C, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = x + self.position_embeddings(gh, gw)
        if cfg.class_token:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1+N, C)
        if cfg.pre_norm:
            x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)  # (B, [1+]N, C)
        tokens = x[:, 1:] if cfg.class_token else x  # (B, N, C): patch tokens only, row-major
        return tokens, (x[:, 0] if cfg.pooling == "cls" else tokens.mean(dim=1))  # (B, N, C), (B, C)


def init_weights(m):
    """GPT-2-style init: N(0, 0.02) weights, zero biases (conv patch embed like a linear layer)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

