"""Helpers for the import tests (tests/test_hf_import_*.py): tiny random models built with transformers and
saved with save_pretrained into a temp directory (nothing is downloaded), small tokenizer.json files shaped
like the released ones, and an OpenCLIP-layout copy of a HF CLIP model.

    d = save_qwen2(tmp_path, tie=True)                   # a Qwen2ForCausalLM directory + tokenizer.json
    hf = from_dir(d, "qwen2")                            # the transformers model read back from it
"""

import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

TEXTS = ["Dense sheets of small round lymphocytes with scant cytoplasm.",
         "Large empty polygonal fat cells separated by thin pink membranes.",
         "Pools of pale blue mucin with floating strips of epithelium.",
         "an H&E image of adipose tissue.", "a histopathology image of tumour epithelium."] * 4
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|image_pad|>"]
REASONING = ["<think>", "</think>", "<answer>", "</answer>"]


def bpe_tokenizer(path, specials, vocab_size=300, clip_style=False):
    """A byte-level BPE tokenizer.json: Qwen2-like (NFC, regex split) or CLIP-like (lowercase, '</w>' suffix)."""
    if clip_style:
        hf = HFTokenizer(models.BPE(end_of_word_suffix="</w>"))
        hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, end_of_word_suffix="</w>",
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        hf = HFTokenizer(models.BPE())
        hf.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated")
        hf.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(TEXTS, trainer)
    hf.save(str(path))
    return hf


def jitter(model, seed, scale=0.05):
    """Non-zero biases and non-unit norm weights, so a dropped or misnamed tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def save(model, directory, **kw):
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(str(directory), **kw)
    return str(directory)


def save_qwen2(tmp, name="qwen2", tie=True, vocab_size=320, specials=QWEN_SPECIALS + REASONING, seed=0,
               max_position_embeddings=96, **kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                      rope_theta=5000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, attn_implementation="sdpa")
    d = save(jitter(Qwen2ForCausalLM(cfg), seed), os.path.join(tmp, name), **kw)
    bpe_tokenizer(os.path.join(d, "tokenizer.json"), specials)
    return d


def save_llama(tmp, name="llama", tie=False, vocab_size=320, specials=None, seed=1, **kw):
    """SmolLM2-shaped: no biases, ChatML specials <|endoftext|> <|im_start|> <|im_end|> first."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=96, rope_theta=100000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, attn_implementation="sdpa")
    d = save(jitter(LlamaForCausalLM(cfg), seed), os.path.join(tmp, name), **kw)
    bpe_tokenizer(os.path.join(d, "tokenizer.json"), specials or ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return d


CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def clip_config(image_size=32, patch_size=8, vocab_size=300, act="quick_gelu"):
    from transformers import CLIPConfig
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=24, hidden_act=act, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size, hidden_act=act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def save_clip(tmp, name="clip", seed=2, **kw):
    """A CLIPModel directory + a CLIP-like tokenizer.json (<|startoftext|> id 0, <|endoftext|> id 1)."""
    from transformers import CLIPModel
    torch.manual_seed(seed)
    d = save(jitter(CLIPModel(clip_config(**kw)), seed), os.path.join(tmp, name))
    bpe_tokenizer(os.path.join(d, "tokenizer.json"), CLIP_SPECIALS, clip_style=True)
    return d


def save_siglip_vision(tmp, name="siglip", seed=3, image_size=32, patch_size=8):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                             image_size=image_size, patch_size=patch_size)
    return save(jitter(SiglipVisionModel(cfg), seed), os.path.join(tmp, name))


def from_dir(directory, kind):
    import transformers
    cls = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "clip": "CLIPModel",
           "siglip": "SiglipVisionModel", "clip_vision": "CLIPVisionModel"}[kind]
    return getattr(transformers, cls).from_pretrained(directory).eval()


# OpenCLIP's state-dict names for the same tensors (open_clip/model.py CLIP, open_clip/transformer.py):
# q/k/v stacked as attn.in_proj_*, fc1/fc2 as mlp.c_fc / c_proj, projections stored (C, D) for x @ proj.
def _openclip_block(sd, src, dst, n_layer):
    out = {}
    for i in range(n_layer):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for p in ("weight", "bias"):
            out[f"{d}attn.in_proj_{p}"] = torch.cat([sd[f"{s}self_attn.{x}_proj.{p}"] for x in "qkv"])
            for theirs, ours in (("layer_norm1", "ln_1"), ("self_attn.out_proj", "attn.out_proj"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{d}{ours}.{p}"] = sd[f"{s}{theirs}.{p}"]
    return out


def to_openclip_dir(hf_clip, directory, tokenizer_src, quick_gelu=True, mean=None, std=None):
    """Write hf_clip's weights in OpenCLIP's layout: open_clip_config.json + open_clip_model.safetensors."""
    sd = {k: v.detach().clone() for k, v in hf_clip.state_dict().items()}
    vc, tc = hf_clip.config.vision_config, hf_clip.config.text_config
    v, t = "vision_model.", "text_model."
    out = {"visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd[v + "embeddings.class_embedding"],
           "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": sd[v + "pre_layrnorm.weight"], "visual.ln_pre.bias": sd[v + "pre_layrnorm.bias"],
           "visual.ln_post.weight": sd[v + "post_layernorm.weight"], "visual.ln_post.bias": sd[v + "post_layernorm.bias"],
           "visual.proj": sd["visual_projection.weight"].T,
           "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
           "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
           "ln_final.weight": sd[t + "final_layer_norm.weight"], "ln_final.bias": sd[t + "final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T, "logit_scale": sd["logit_scale"],
           **_openclip_block(sd, v + "encoder.layers.", "visual.transformer.resblocks.", vc.num_hidden_layers),
           **_openclip_block(sd, t + "encoder.layers.", "transformer.resblocks.", tc.num_hidden_layers)}
    os.makedirs(directory, exist_ok=True)
    save_file({k: x.contiguous() for k, x in out.items()}, os.path.join(directory, "open_clip_model.safetensors"))
    model_cfg = {"embed_dim": hf_clip.config.projection_dim, "quick_gelu": quick_gelu,
                 "vision_cfg": {"image_size": vc.image_size, "layers": vc.num_hidden_layers, "width": vc.hidden_size,
                                "patch_size": vc.patch_size, "head_width": vc.hidden_size // vc.num_attention_heads,
                                "mlp_ratio": vc.intermediate_size / vc.hidden_size},
                 "text_cfg": {"context_length": tc.max_position_embeddings, "vocab_size": tc.vocab_size,
                              "width": tc.hidden_size, "heads": tc.num_attention_heads, "layers": tc.num_hidden_layers,
                              "mlp_ratio": tc.intermediate_size / tc.hidden_size}}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {}}
    if mean is not None:
        config["preprocess_cfg"] = {"mean": list(mean), "std": list(std)}
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump(config, f)
    if tokenizer_src:
        with open(tokenizer_src) as src, open(os.path.join(directory, "tokenizer.json"), "w") as dst:
            dst.write(src.read())
    return str(directory)
