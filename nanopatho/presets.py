"""Model presets (toy / small / base) and a parameter counter.

    toy   trains on 2 CPU cores in minutes: ViT 64px/8, 4x128; LM 4x192 (6 heads, 2 kv heads); CLIP text 3x128
    small one GPU, tens of millions of parameters: ViT-S/16 at 224px; LM 12x512 (8 heads, 2 kv heads)
    base  several GPUs: ViT-B/16 at 224px + a Qwen2-0.5B-shaped LM (24x896, 14 heads, 2 kv heads, rope 1e6)

    from nanopatho.presets import vlm_config, count_params
    cfg = vlm_config("toy", vocab_size=tok.vocab_size, image_token_id=tok.image_id)
    print(count_params(VLM(cfg)))      # {'vision': ..., 'projector': ..., 'lm': ..., 'total': ...}
"""

from nanopatho.clip import CLIPConfig, TextConfig
from nanopatho.lm import LMConfig
from nanopatho.vit import ViTConfig
from nanopatho.vlm import VLMConfig

PRESETS = ("toy", "small", "base")

_VIT = {
    "toy": dict(image_size=64, patch_size=8, n_layer=4, n_head=4, n_embd=128),
    "small": dict(image_size=224, patch_size=16, n_layer=12, n_head=6, n_embd=384),
    "base": dict(image_size=224, patch_size=16, n_layer=12, n_head=12, n_embd=768),
}
_LM = {
    "toy": dict(n_layer=4, n_head=6, n_kv_head=2, n_embd=192, intermediate_size=512, max_seq_len=512),
    "small": dict(n_layer=12, n_head=8, n_kv_head=2, n_embd=512, intermediate_size=1536, max_seq_len=1024),
    "base": dict(n_layer=24, n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864, max_seq_len=4096,
                 rope_base=1_000_000.0),
}
_TEXT = {
    "toy": dict(n_layer=3, n_head=4, n_embd=128, max_len=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384, max_len=77),
    "base": dict(n_layer=12, n_head=8, n_embd=512, max_len=77),
}
_EMBED_DIM = {"toy": 128, "small": 256, "base": 512}


def _check(preset):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def vit_config(preset):
    _check(preset)
    return ViTConfig(**_VIT[preset])


def lm_config(preset, vocab_size):
    _check(preset)
    return LMConfig(vocab_size=vocab_size, **_LM[preset])


def vlm_config(preset, vocab_size, image_token_id):
    return VLMConfig(vision=vit_config(preset), lm=lm_config(preset, vocab_size), image_token_id=image_token_id, pixel_shuffle=2)


def clip_config(preset, vocab_size):
    _check(preset)
    return CLIPConfig(vision=vit_config(preset), text=TextConfig(vocab_size=vocab_size, **_TEXT[preset]),
                      embed_dim=_EMBED_DIM[preset])


def count_params(model):
    """{top-level child name: parameter count, ..., "total": n}; a tied tensor is counted once."""
    counts = {}
    for name, p in model.named_parameters():  # named_parameters already skips repeated (tied) tensors
        part = name.split(".")[0]
        counts[part] = counts.get(part, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts
