"""PathoCLIP: a contrastive image-text model (Radford et al. 2021, "CLIP") and its DDP-aware loss.

Image tower: ViT -> mean-pooled patches -> linear projection. Text tower: token + learned
position embeddings -> causal pre-norm transformer -> the hidden state of the last real token
(the eos the caption ends with) -> linear projection. Both outputs are L2-normalised; a
learnable temperature (stored as its log, initialised to log(1/0.07), clamped at log 100)
scales their cosine similarities.

    from nanopatho.clip import PathoCLIP, clip_loss
    from nanopatho.presets import clip_config
    model = PathoCLIP(clip_config("toy", vocab_size=tok.vocab_size))
    img_f, txt_f, scale = model(pixels, ids, attention_mask)      # (B, D), (B, D), scalar
    loss = clip_loss(img_f, txt_f, scale); loss.backward(); opt.step(); model.clamp_logit_scale()

Under torchrun every rank compares its own B images and texts with the features gathered from
all ranks *with gradient*, so each rank sees world*B - 1 negatives (the OpenCLIP "local loss").
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopatho import dist
from nanopatho.lm import padding_attn_mask, positions_from_mask
from nanopatho.vit import Block, ViT, ViTConfig, init_weights


@dataclass
class TextConfig:
    vocab_size: int = 512
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    max_len: int = 64
    mlp_act: str = "gelu"  # gelu | quick_gelu (OpenAI CLIP) | gelu_tanh
    norm_eps: float = 1e-5
    mlp_dim: int = 0  # 0: 4 x n_embd

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


@dataclass
class CLIPConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    init_logit_scale: float = math.log(1 / 0.07)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        return cls(vision=ViTConfig.from_dict(d.pop("vision")), text=TextConfig.from_dict(d.pop("text")), **d)


class ImageTower(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.vit = ViT(cfg.vision)
        self.proj = nn.Linear(cfg.vision.n_embd, cfg.embed_dim, bias=False)
        init_weights(self.proj)

    def forward(self, pixels):
        _, pooled = self.vit(pixels)  # (B, C_v)
        return self.proj(pooled)  # (B, D)


class TextTower(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        t = cfg.text
        self.max_len = t.max_len
        self.tok_embed = nn.Embedding(t.vocab_size, t.n_embd)
        self.pos_embed = nn.Parameter(torch.randn(t.max_len, t.n_embd) * 0.01)
        self.blocks = nn.ModuleList(Block(t.n_embd, t.n_head, 4.0, t.mlp_act, t.norm_eps, t.mlp_dim) for _ in range(t.n_layer))
        self.ln_f = nn.LayerNorm(t.n_embd, eps=t.norm_eps)
        self.proj = nn.Linear(t.n_embd, cfg.embed_dim, bias=False)
        self.apply(init_weights)
        nn.init.normal_(self.tok_embed.weight, std=0.02)

    def forward(self, ids, attention_mask=None):
        B, T = ids.shape
        assert T <= self.max_len, f"text length {T} > max_len {self.max_len}"
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        x = self.tok_embed(ids) + self.pos_embed[positions_from_mask(attention_mask)]  # (B, T, C)
        mask = padding_attn_mask(attention_mask)  # (B, 1, T, T) causal and key-is-real
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_f(x)
        # the last real token of each row (padding may be on either side)
        last = T - 1 - attention_mask.long().flip(1).argmax(dim=1)  # (B,)
        pooled = x[torch.arange(B, device=ids.device), last]  # (B, C)
        return self.proj(pooled)  # (B, D)


class PathoCLIP(nn.Module):
    model_type = "clip"

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = ImageTower(cfg)
        self.text = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))  # log of the inverse temperature

    def encode_image(self, pixels):
        return F.normalize(self.visual(pixels), dim=-1)  # (B, D), unit norm

    def encode_text(self, ids, attention_mask=None):
        return F.normalize(self.text(ids, attention_mask), dim=-1)  # (B, D), unit norm

    def forward(self, pixels, ids, attention_mask=None):
        return self.encode_image(pixels), self.encode_text(ids, attention_mask), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self, max=100.0):
        """Keep the scale exp(logit_scale) in [1, max] (CLIP clamps at 100); call after each optimizer step."""
        self.logit_scale.clamp_(0.0, math.log(max))


def clip_loss(img_f, txt_f, scale):
    """Symmetric InfoNCE over L2-normalised features img_f, txt_f (B, D) and scale = exp(logit_scale):

        L = 1/2 [ CE(s * I T_all^T, y) + CE(s * T I_all^T, y) ],   y_i = rank * B + i

    In one process I_all = I, T_all = T and this is CLIP's loss. Under DDP the local rows meet
    the gathered (with gradient) global columns; each rank's mean over its own rows, averaged by
    DDP over ranks, equals the single-process loss on the concatenated batch."""
    B = img_f.shape[0]
    img_all = dist.all_gather_with_grad(img_f)  # (W*B, D)
    txt_all = dist.all_gather_with_grad(txt_f)  # (W*B, D)
    logits_per_image = scale * img_f @ txt_all.t()  # (B, W*B)
    logits_per_text = scale * txt_f @ img_all.t()  # (B, W*B)
    labels = torch.arange(B, device=img_f.device) + dist.rank() * B
    dtype = torch.promote_types(logits_per_image.dtype, torch.float32)  # fp32 (or fp64) softmax under bf16
    return 0.5 * (F.cross_entropy(logits_per_image.to(dtype), labels) + F.cross_entropy(logits_per_text.to(dtype), labels))
