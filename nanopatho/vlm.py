"""Vision-language model: ViT -> pixel-shuffle + MLP projector -> decoder LM (LLaVA / nanoVLM style).

The image is encoded into patch tokens; pixel shuffle (Idefics3 / nanoVLM) folds each s x s
block of neighbouring patches into one token (s^2 fewer tokens, s^2 x wider), a 2-layer GELU
MLP maps them to the LM width, and they replace the image placeholder tokens of the prompt.

    from nanopatho.presets import vlm_config
    from nanopatho.vlm import VLM
    vlm = VLM(vlm_config("toy", vocab_size=tok.vocab_size, image_token_id=tok.image_id))
    ids, mask = tok.render_chat(messages, n_image_tokens=vlm.n_image_tokens)   # "<image>" -> n copies
    logits, loss = vlm(input_ids, pixels, attention_mask=am, targets=targets, loss_mask=lm_mask)
    out = vlm.generate(prompt_ids, pixels, prompt_mask, max_new_tokens=64, temperature=0)
    out = vlm.generate(prompt_ids, pixels, prompt_mask, max_new_tokens=64, samples_per_prompt=8)   # GRPO groups
    logits, _ = vlm(prompt_ids, pixels, attention_mask=prompt_mask, continuations=(ids, mask, prompt_of_row))
"""

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from nanopatho.lm import LM, LMConfig
from nanopatho.shared_prefix import continuation_logits
from nanopatho.vit import ViT, ViTConfig, init_weights


@dataclass
class VLMConfig:
    vision: ViTConfig
    lm: LMConfig
    image_token_id: int
    pixel_shuffle: int = 2
    projector_hidden: Optional[int] = None  # None: the LM width
    pooled_token: bool = False  # one more image token: the ViT's pooled feature (mean or CLS) through its own MLP

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        return cls(vision=ViTConfig.from_dict(d.pop("vision")), lm=LMConfig.from_dict(d.pop("lm")), **d)


def pixel_shuffle(x, s):
    """(B, g*g, C) patch tokens -> (B, (g/s)^2, s*s*C): each s x s block of patches becomes one token."""
    B, N, C = x.shape
    g = int(N ** 0.5)
    assert g * g == N and g % s == 0, f"pixel shuffle needs a square grid divisible by {s}, got {N} tokens"
    x = x.view(B, g // s, s, g // s, s, C)  # (B, row block, row in block, col block, col in block, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, g/s, g/s, s, s, C)
    return x.reshape(B, (g // s) ** 2, s * s * C)


def mlp(d_in, hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class Projector(nn.Module):
    """pixel shuffle, then Linear -> GELU -> Linear into the LM's embedding space; with cfg.pooled_token
    the tower's pooled feature (what a linear probe or CLIP's head reads) follows as one more token."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.s = cfg.pixel_shuffle
        hidden = cfg.projector_hidden or cfg.lm.n_embd
        self.mlp = mlp(cfg.vision.n_embd * self.s * self.s, hidden, cfg.lm.n_embd)
        self.pooled = mlp(cfg.vision.n_embd, hidden, cfg.lm.n_embd) if cfg.pooled_token else None

    def forward(self, patch_tokens, pooled=None):
        x = self.mlp(pixel_shuffle(patch_tokens, self.s))  # (B, (g/s)^2, C_lm)
        if self.pooled is None:
            return x
        return torch.cat([x, self.pooled(pooled)[:, None]], dim=1)  # (B, (g/s)^2 + 1, C_lm)


class VLM(nn.Module):
    model_type = "vlm"

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.config = cfg
        self.vision = ViT(cfg.vision)
        self.projector = Projector(cfg)
        self.projector.apply(init_weights)
        self.lm = LM(cfg.lm)

    @property
    def n_image_tokens(self):
        return (self.config.vision.grid // self.config.pixel_shuffle) ** 2 + int(self.config.pooled_token)

    def image_embeddings(self, pixel_values):
        """(N_img, 3, H, W) -> (N_img, n_image_tokens, C_lm)"""
        patch_tokens, pooled = self.vision(pixel_values)  # (N_img, g*g, C_vit), (N_img, C_vit)
        return self.projector(patch_tokens, pooled)

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with each run of image placeholders replaced by one image's embeddings,
        images taken in reading order (row by row, left to right). (B, T) -> (B, T, C)"""
        x = self.lm.embed_tokens(input_ids)  # (B, T, C)
        is_image = input_ids == self.config.image_token_id  # (B, T)
        n_slots = int(is_image.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * self.n_image_tokens:
            raise ValueError(f"prompt has {n_slots} image placeholder tokens but {n_images} images x "
                             f"{self.n_image_tokens} tokens per image = {n_images * self.n_image_tokens} were given; "
                             f"render '<image>' with n_image_tokens={self.n_image_tokens}")
        if n_images == 0:
            return x
        feats = self.image_embeddings(pixel_values).to(x.dtype)  # (N_img, n_tok, C)
        return x.masked_scatter(is_image[..., None], feats.reshape(-1, feats.shape[-1]))  # (B, T, C)

    def forward(self, input_ids, pixel_values=None, *, attention_mask=None, targets=None, loss_mask=None, reduction="mean",
                continuations=None):
        """-> (logits (B, T, V), loss or None). continuations = (ids (b, N), mask (b, N), prompt_of_row (b,)):
        instead score b continuations of these B prompts, each prompt and image encoded once
        -> (logits (b, N, V) of the continuation tokens, None); see nanopatho.shared_prefix."""
        x = self.embed(input_ids, pixel_values)
        if continuations is not None:
            return continuation_logits(self.lm, x, attention_mask, *continuations), None
        if targets is not None:  # an image placeholder is never a prediction target
            targets = targets.masked_fill(targets == self.config.image_token_id, -1)
        return self.lm(None, targets, inputs_embeds=x, attention_mask=attention_mask, loss_mask=loss_mask, reduction=reduction)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kwargs):
        """Left-padded prompts with image placeholders -> lm.generate(...) (see LM.generate for kwargs).
        The placeholder token is never sampled: it only ever marks where image embeddings go."""
        kwargs.setdefault("suppress_ids", (self.config.image_token_id,))
        x = self.embed(input_ids, pixel_values)
        return self.lm.generate(input_ids, attention_mask, inputs_embeds=x, **kwargs)

    def freeze_vision(self, flag=True):
        """Stop (flag=True) or restart gradient flow into the ViT; the projector always trains."""
        self.vision.requires_grad_(not flag)

    def freeze_lm(self, flag=True):
        """Stop (flag=True) or restart updates of the LM's weights (LLaVA's alignment stage); gradients
        still flow through it into the projector."""
        self.lm.requires_grad_(not flag)

    def load_vision_from_clip(self, clip_state_dict):
        """Initialise the ViT from a PathoCLIP state dict (its `visual.vit.*` tensors); strict."""
        prefix = "visual.vit."
        vit_sd = {k[len(prefix):]: v for k, v in clip_state_dict.items() if k.startswith(prefix)}
        if not vit_sd:
            raise ValueError(f"no '{prefix}*' tensors in the state dict: is it a PathoCLIP checkpoint?")
        self.vision.load_state_dict(vit_sd, strict=True)
