"""Start from released weights: local Hugging Face / OpenCLIP directories -> nanopatho models with the
same outputs (tests/test_hf_import_*.py compare them with transformers). Nothing is downloaded.

What loads:
    LM    config.json model_type "qwen2" (Qwen2, Qwen2.5: q/k/v bias, rope theta, tied or untied)
          or "llama" (Llama, SmolLM2: no bias), with model.safetensors or sharded
          model-0000x-of-0000y.safetensors + model.safetensors.index.json, and tokenizer.json
    ViT   HF CLIPModel / CLIPVisionModel (OpenAI CLIP, PLIP), HF SiglipModel / SiglipVisionModel,
          OpenCLIP open_clip_config.json + open_clip_model.safetensors (QuiltNet, Patho-CLIP)
    CLIP  HF CLIPModel or OpenCLIP, image + text tower + tokenizer.json -> PathoCLIP (for
          nanopatho.evaluate / nanopatho.classify)
What is refused, with one line naming the file and the key: any other model_type, RoPE scaling,
sliding-window attention, biases or activations nanopatho's LM does not have, quantized weights,
layer scale, timm or HF-transformer towers, an unexpected tensor (a part nanopatho would drop),
a tensor of the wrong shape, a non-float dtype or non-finite values, and pickled weights
(.bin / .pt / .pth: unpickling can run code; the error says how to convert them once).

The model's own tokenizer.json is kept. nanopatho's special tokens are mapped onto the ones it
has (<|im_start|>, <|im_end|>, <|endoftext|>, <|image_pad|> / <|vision_pad|>, ...); the rest are
appended, and their embedding rows (and an untied lm_head's) are set to the mean of the trained
rows. Pixels: nanopatho feeds every tower (u - m0) / s0 with OpenAI CLIP's m0, s0 (data.to_float);
a tower trained with other constants (SigLIP: 0.5, 0.5) gets them folded into its patch embedding.

    from nanopatho import hf_import
    lm, tokenizer = hf_import.load_lm("Qwen2.5-0.5B")          # or a nanopatho LM checkpoint
    vit = hf_import.load_vision("clip-vit-base-patch16")       # or a PathoCLIP checkpoint
    clip, config, tokenizer = hf_import.load_pretrained("QuiltNet-B-16", expect="clip")

    python -m nanopatho.hf_import QuiltNet-B-16 --out out/quiltnet    # save as a nanopatho checkpoint
    python -m nanopatho.evaluate --ckpt QuiltNet-B-16 --tasks zeroshot,retrieval,linear_probe  # or directly
"""

import argparse
import os

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as HFTokenizer

from nanopatho import checkpoint, dist
from nanopatho.checkpoint import CheckpointError
from nanopatho.clip import CLIPConfig, PathoCLIP, TextConfig
from nanopatho.data import IMAGE_MEAN, IMAGE_STD
from nanopatho.lm import LM, LMConfig
from nanopatho.tokenizer import ALL_ADDABLE, Tokenizer
from nanopatho.vit import ViT, ViTConfig

KINDS = {"qwen2": "lm", "llama": "lm", "clip": "clip", "clip_vision_model": "vision", "siglip": "vision",
         "siglip_vision_model": "vision"}
REFUSED = {  # model types users are likely to try, and why they do not fit
    "qwen3": "per-head q/k RMSNorm is not implemented", "mistral": "sliding-window attention is not implemented",
    "gemma": "GeGLU MLP and (1 + w) RMSNorm are not implemented", "phi3": "fused qkv / gate_up layout",
    "qwen2_vl": "a whole VLM with M-RoPE: import its LM and vision tower separately",
    "qwen2_5_vl": "a whole VLM with M-RoPE: import its LM and vision tower separately",
    "siglip2": "NaFlex variable-resolution patches are not implemented",
}
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def note(message):
    if dist.is_main():
        print(f"[import] {message}", flush=True)


def read_json(path):
    return checkpoint.read_json(path, missing_hint="")


def refuse(path, what):
    raise CheckpointError(f"{path}: {what}; refusing to load it")


# -----------------------------------------------------------------------------
# safetensors files, read on demand and checked tensor by tensor


class Weights:
    """The tensors of one checkpoint (a safetensors file, or the shards of an index). get(key) checks
    the dtype (float) and the values (finite) of every tensor it reads and returns it in fp32."""

    def __init__(self, files, origin):
        self.origin, self.file_of, self.handles, self.used = origin, {}, {}, set()
        for path in files:
            try:
                self.handles[path] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
            self.file_of.update(dict.fromkeys(self.handles[path].keys(), path))

    def __contains__(self, key):
        return key in self.file_of

    def get(self, key):
        if key not in self.file_of:
            raise CheckpointError(f"{self.origin}: no tensor {key!r} (the config describes it)")
        path = self.file_of[key]
        t = self.handles[path].get_tensor(key)
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected a float type")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {key!r} has non-finite values")
        self.used.add(key)
        return t.float()

    def check_all_used(self, prefix="", ignore=()):
        """An unread tensor under `prefix` is a part of the model nanopatho would silently drop: refuse."""
        extra = [k for k in sorted(self.file_of) if k.startswith(prefix) and k not in self.used
                 and not any(pattern in k for pattern in ignore)]
        if extra:
            refuse(self.file_of[extra[0]], f"tensor {extra[0]!r} has no place in nanopatho's model "
                                           f"({len(extra)} such tensors: an architecture feature it does not implement)")


def refuse_pickled(directory):
    """Pickled weights only: name the file and say how to write a safetensors copy."""
    for name in sorted(os.listdir(directory)):
        if name.endswith(PICKLED):
            path = os.path.join(directory, name)
            out = os.path.join(directory, os.path.splitext(name)[0].replace("pytorch_model", "model") + ".safetensors")
            raise CheckpointError(
                f"{path}: pickled weights are never loaded (unpickling can run code); convert them once with "
                f"python -c \"import torch; from safetensors.torch import save_file; "
                f"sd = torch.load('{path}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
                f"save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, '{out}')\" "
                f"(sharded HF checkpoints: AutoModel.from_pretrained(DIR).save_pretrained(DIR) in transformers)")


def shard_files(index):
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' dict")
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        path = os.path.join(os.path.dirname(index), str(shard))
        if os.path.basename(str(shard)) != shard or not os.path.isfile(path):
            raise CheckpointError(f"{index}: shard {shard!r} is missing (or not a file name in this directory)")
        files.append(path)
    return files


def open_weights(directory, names):
    """Weights from the first of `names` present, whole or sharded (NAME.index.json); else an error."""
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return Weights([path], path)
        if os.path.isfile(path + ".index.json"):
            return Weights(shard_files(path + ".index.json"), path + ".index.json")
    refuse_pickled(directory)
    raise CheckpointError(f"{directory}: no {' or '.join(names)} (nor a sharded .index.json)")


def gather(weights, names):
    """{our name: source key, or [keys] concatenated on dim 0} -> {our name: fp32 tensor}."""
    return {ours: torch.cat([weights.get(k) for k in src]) if isinstance(src, list) else weights.get(src)
            for ours, src in names.items()}


def build(cls, cfg, state, sources, origin):
    """cls(cfg) holding `state`: every parameter present with the config's shape, else the source key is named."""
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = cls(cfg)
    for name, p in model.named_parameters():
        if name not in state:
            raise CheckpointError(f"{origin}: nothing to load into {name}")
        if tuple(state[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{origin}: tensor {sources.get(name, name)} has shape {tuple(state[name].shape)}, "
                                  f"but its config.json gives {tuple(p.shape)}")
    model.load_state_dict(state, strict=False, assign=True)  # strict=False: a tied lm_head is not in `state`
    if isinstance(model, LM) and cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left unloaded"
    return model


# -----------------------------------------------------------------------------
# tokenizer merge


def merge_tokenizer(directory, rows):
    """The model's tokenizer.json with nanopatho's special tokens mapped or appended.
    Returns (tokenizer, appended ids, number of tokens before); rows = the model's embedding rows."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; the model's own tokenizer.json is needed (transformers' "
                              f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes one)")
    n_before = HFTokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    if n_before > rows:
        raise CheckpointError(f"{path}: {n_before} tokens but the model has {rows} embedding rows: not its tokenizer")
    tok = Tokenizer.from_file(path, addable=ALL_ADDABLE)
    added = sorted({i for i in tok.special_ids.values() if i >= n_before})
    mapped = ", ".join(f"{name} -> {tok.hf.id_to_token(i)!r}" for name, i in tok.special_ids.items() if i < n_before)
    appended = ", ".join(f"{tok.hf.id_to_token(i)!r} ({i})" for i in added) or "nothing"
    note(f"{path}: mapped {mapped}; added {appended}")
    return tok, added, n_before


def grow_rows(weight, n_rows, new_ids, n_trained):
    """(V, C) embedding -> (max(V, n_rows), C) with rows new_ids = the mean of the trained rows [0, n_trained)."""
    V, C = weight.shape
    if n_rows > V:
        weight = torch.cat([weight, weight.new_zeros(n_rows - V, C)])  # (n_rows, C)
    weight[new_ids] = weight[:n_trained].mean(dim=0)  # (C,) broadcast over the new rows
    return weight


# -----------------------------------------------------------------------------
# language models: Qwen2 / Qwen2.5 / Llama family

LM_DEFAULTS = {  # transformers' config defaults, for keys a config.json leaves out
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6),
}


def refuse_lm_features(c, path):
    """What nanopatho's LM does not implement is an error, never a silent mis-load."""
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    llama = c["model_type"] == "llama"
    heads = c.get("num_attention_heads", LM_DEFAULTS[c["model_type"]]["num_attention_heads"])
    hidden = c.get("hidden_size", LM_DEFAULTS[c["model_type"]]["hidden_size"])
    checks = [
        (rope_type != "default", f"rope_scaling type {rope_type!r} (only plain RoPE is implemented)"),
        (c.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor != 1 (RoPE on every channel only)"),
        (bool(c.get("use_sliding_window")) or (llama and c.get("sliding_window")),
         "sliding-window attention (not implemented)"),
        (any(t != "full_attention" for t in c.get("layer_types") or []), "layer_types other than full_attention"),
        (c.get("hidden_act", "silu") != "silu", f"hidden_act {c.get('hidden_act')!r} (the MLP is SwiGLU with silu)"),
        (llama and bool(c.get("attention_bias")), "attention_bias: true (q/k/v and o_proj biases; not implemented)"),
        (bool(c.get("mlp_bias")), "mlp_bias: true (not implemented)"),
        (c.get("head_dim") not in (None, hidden // heads), f"head_dim {c.get('head_dim')} != hidden_size / heads"),
        ("quantization_config" in c, "quantization_config (quantized weights are not implemented)"),
    ]
    for bad, what in checks:
        if bad:
            refuse(path, what)


def lm_config(c, path, weights):
    """A HF Qwen2 / Llama config.json dict -> LMConfig (tie inferred from the weights if the key is absent)."""
    refuse_lm_features(c, path)
    model_type = c["model_type"]
    c = {**LM_DEFAULTS[model_type], **{k: v for k, v in c.items() if v is not None}}
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    tie = c.get("tie_word_embeddings", "lm_head.weight" not in weights)
    return LMConfig(vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
                    n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"], n_embd=c["hidden_size"],
                    intermediate_size=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
                    rope_base=float(theta), qkv_bias=model_type == "qwen2", tie_embeddings=bool(tie),
                    norm_eps=float(c["rms_norm_eps"]))


def load_hf_lm(directory):
    """A HF Qwen2 / Llama directory -> (LM, merged tokenizer); the embedding grows for appended tokens."""
    path = os.path.join(directory, "config.json")
    c = read_json(path)
    weights = open_weights(directory, ("model.safetensors",))
    cfg = lm_config(c, path, weights)
    with torch.device("meta"):
        names = [n for n, _ in LM(cfg).named_parameters()]  # a tied lm_head appears once, as embed_tokens
    sources = {n: n if n.startswith("lm_head.") else "model." + n for n in names}
    state = gather(weights, sources)
    weights.check_all_used(ignore=("rotary_emb.inv_freq",) + (("lm_head.weight",) if cfg.tie_embeddings else ()))
    tokenizer, added, n_before = merge_tokenizer(directory, cfg.vocab_size)
    cfg.vocab_size = max(cfg.vocab_size, tokenizer.vocab_size)
    for name in ["embed_tokens.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"]):
        state[name] = grow_rows(state[name], cfg.vocab_size, added, n_before)
    note(f"{directory}: {c['model_type']} LM, {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, "
         f"rope theta {cfg.rope_base:g}, {'tied' if cfg.tie_embeddings else 'untied'} embeddings")
    return build(LM, cfg, state, sources, weights.origin), tokenizer


# -----------------------------------------------------------------------------
# vision towers: HF CLIP / SigLIP, OpenCLIP

VISION_DEFAULTS = {  # transformers' CLIPVisionConfig / SiglipVisionConfig defaults
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
HF_PIXELS = {"clip": (IMAGE_MEAN, IMAGE_STD), "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
HF_BLOCK = {"ln_1": "layer_norm1", "attn.proj": "self_attn.out_proj", "ln_2": "layer_norm2",
            "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
OPENCLIP_BLOCK = {"ln_1": "ln_1", "attn.proj": "attn.out_proj", "ln_2": "ln_2", "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}


def block_names(n_layer, dst, src, openclip):
    """Our blocks.{i}.* <- HF encoder.layers.{i}.* (q, k, v concatenated) or OpenCLIP resblocks.{i}.* (in_proj)."""
    names = {}
    for i in range(n_layer):
        d, s = f"{dst}{i}.", f"{src}{i}."
        for p in ("weight", "bias"):
            names.update({f"{d}{ours}.{p}": f"{s}{theirs}.{p}"
                          for ours, theirs in (OPENCLIP_BLOCK if openclip else HF_BLOCK).items()})
            qkv = [f"{s}self_attn.{x}_proj.{p}" for x in "qkv"]  # HF keeps them apart; OpenCLIP stacks them
            names[f"{d}attn.qkv.{p}"] = f"{s}attn.in_proj_{p}" if openclip else qkv
    return names


def square(value, what, path):
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            refuse(path, f"non-square {what} {value}")
        value = value[0]
    return int(value)


def hf_vit_config(vc, family, path):
    """A HF CLIPVisionConfig / SiglipVisionConfig dict -> ViTConfig."""
    vc = {**VISION_DEFAULTS[family], **{k: v for k, v in vc.items() if v is not None}}
    if vc["num_channels"] != 3:
        refuse(path, f"num_channels {vc['num_channels']} (RGB only)")
    if vc["hidden_act"] not in HF_ACT:
        refuse(path, f"vision hidden_act {vc['hidden_act']!r}")
    clip = family == "clip"
    return ViTConfig(image_size=square(vc["image_size"], "image_size", path),
                     patch_size=square(vc["patch_size"], "patch_size", path), n_layer=vc["num_hidden_layers"],
                     n_head=vc["num_attention_heads"], n_embd=vc["hidden_size"], mlp_dim=vc["intermediate_size"],
                     mlp_act=HF_ACT[vc["hidden_act"]], norm_eps=float(vc["layer_norm_eps"]), class_token=clip,
                     pre_norm=clip, conv_bias=not clip, pooling="cls" if clip else "mean")


def hf_vit_state(weights, cfg, p):
    """(state, sources) of a ViT from HF CLIP / SigLIP tensors under prefix p ("vision_model." or "")."""
    e = f"{p}embeddings."
    names = {"patch_embed.weight": e + "patch_embedding.weight", "ln_f.weight": p + "post_layernorm.weight",
             "ln_f.bias": p + "post_layernorm.bias",
             **block_names(cfg.n_layer, "blocks.", f"{p}encoder.layers.", False)}
    if cfg.conv_bias:
        names["patch_embed.bias"] = e + "patch_embedding.bias"
    if cfg.pre_norm:
        names.update({"ln_pre.weight": p + "pre_layrnorm.weight", "ln_pre.bias": p + "pre_layrnorm.bias"})
    state = gather(weights, names)
    pos = weights.get(e + "position_embedding.weight")  # ([1 +] N, C)
    if cfg.class_token:  # the class token's position embedding folded into it
        state["cls_token"], pos = weights.get(e + "class_embedding") + pos[0], pos[1:]
        names["cls_token"] = e + "class_embedding"
    state["pos_embed"], names["pos_embed"] = pos[None], e + "position_embedding.weight"
    return state, names


def openclip_vit_config(mc, path):
    """OpenCLIP model_cfg (its vision_cfg + quick_gelu) -> ViTConfig; unsupported options refused."""
    vc = mc.get("vision_cfg", {})
    for key in ("timm_model_name", "ls_init_value", "attentional_pool", "act_kwargs", "qk_norm",
                "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
        if vc.get(key):
            refuse(path, f"vision_cfg.{key} = {vc[key]!r} (not implemented)")
    if not isinstance(vc.get("layers", 12), int):
        refuse(path, "vision_cfg.layers is a list (a ResNet tower)")
    if vc.get("pos_embed_type", "learnable") != "learnable" or vc.get("pool_type", "tok") not in ("tok", "avg"):
        refuse(path, f"vision_cfg pos_embed_type / pool_type {vc.get('pos_embed_type')!r} / {vc.get('pool_type')!r}")
    width = vc.get("width", 768)
    return ViTConfig(image_size=square(vc.get("image_size", 224), "image_size", path),
                     patch_size=square(vc.get("patch_size", 16), "patch_size", path), n_layer=vc.get("layers", 12),
                     n_head=width // vc.get("head_width", 64), n_embd=width,
                     mlp_dim=int(width * vc.get("mlp_ratio", 4.0)),
                     mlp_act="quick_gelu" if mc.get("quick_gelu") else "gelu",
                     norm_eps=float((vc.get("norm_kwargs") or {}).get("eps", 1e-5)), class_token=True,
                     pre_norm=not vc.get("no_ln_pre", False), conv_bias=False,
                     pooling="cls" if vc.get("pool_type", "tok") == "tok" else "mean")


def openclip_vit_state(weights, cfg):
    v = "visual."
    names = {"patch_embed.weight": v + "conv1.weight", "ln_f.weight": v + "ln_post.weight",
             "ln_f.bias": v + "ln_post.bias", **block_names(cfg.n_layer, "blocks.", f"{v}transformer.resblocks.", True)}
    if cfg.pre_norm:
        names.update({"ln_pre.weight": v + "ln_pre.weight", "ln_pre.bias": v + "ln_pre.bias"})
    state = gather(weights, names)
    pos = weights.get(v + "positional_embedding")  # (1 + N, C)
    state["cls_token"], state["pos_embed"] = weights.get(v + "class_embedding") + pos[0], pos[1:][None]
    names.update(cls_token=v + "class_embedding", pos_embed=v + "positional_embedding")
    return state, names


def fold_pixel_norm(state, mean, std):
    """Let the patch embedding take nanopatho's pixels x = (u - m0) / s0 when the tower was trained on
    x' = (u - m) / s. Per channel x' = a x + d with a = s0 / s, d = (m0 - m) / s; the patch conv is linear
    with no padding, so  W * x' + b = (W a) * x + (b + sum_{c,i,j} W d).  Returns whether anything changed."""
    m0, s0 = torch.tensor(IMAGE_MEAN), torch.tensor(IMAGE_STD)
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    if torch.allclose(m, m0, rtol=0, atol=1e-6) and torch.allclose(s, s0, rtol=0, atol=1e-6):
        return False
    a, d = (s0 / s).view(1, 3, 1, 1), ((m0 - m) / s).view(1, 3, 1, 1)
    W = state["patch_embed.weight"]  # (C, 3, p, p)
    bias = state.get("patch_embed.bias", W.new_zeros(W.shape[0]))  # (C,)
    state["patch_embed.weight"] = W * a
    state["patch_embed.bias"] = bias + (W * d).sum(dim=(1, 2, 3))
    return True


def pixel_constants(directory, default):
    """image_mean / image_std of preprocessor_config.json or open_clip_config.json, else the family's default."""
    path = os.path.join(directory, "preprocessor_config.json")
    keys = ("image_mean", "image_std")
    if not os.path.isfile(path):
        path, keys = os.path.join(directory, "open_clip_config.json"), ("mean", "std")
    c = read_json(path) if os.path.isfile(path) else {}
    c = c.get("preprocess_cfg", c)
    mean, std = (tuple(c.get(k, d)) for k, d in zip(keys, default))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        refuse(path, f"pixel mean {mean} / std {std}: expected 3 values each, std > 0")
    return mean, std


def vit_source(directory, source):
    """(ViTConfig, state, sources, weights, prefix) of the vision tower of a released directory."""
    if source == "open_clip":
        path = os.path.join(directory, "open_clip_config.json")
        mc = read_json(path)
        mc = mc.get("model_cfg", mc)
        weights = open_weights(directory, ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors"))
        cfg = openclip_vit_config(mc, path)
        return (cfg, *openclip_vit_state(weights, cfg), weights, "visual.")
    path = os.path.join(directory, "config.json")
    c = read_json(path)
    family = "clip" if source.startswith("clip") else "siglip"
    weights = open_weights(directory, ("model.safetensors",))
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in weights.file_of) else ""
    cfg = hf_vit_config(c.get("vision_config", c if source.endswith("vision_model") else {}), family, path)
    return (cfg, *hf_vit_state(weights, cfg, prefix), weights, prefix)


def import_vit(directory, source):
    """A released vision tower -> (ViT, weights, prefix), normalisation folded in, unused tensors refused."""
    cfg, state, sources, weights, prefix = vit_source(directory, source)
    family = "siglip" if source.startswith("siglip") else "clip"
    mean, std = pixel_constants(directory, HF_PIXELS[family])
    if fold_pixel_norm(state, mean, std):
        cfg.conv_bias = True
        note(f"{directory}: pixel mean {mean} / std {std} folded into the patch embedding")
    head = prefix + "head."  # SigLIP's attention-pooling head
    weights.check_all_used(prefix, ("position_ids", "visual_projection", "visual.proj", head))
    if any(k.startswith(head) for k in weights.file_of):
        note(f"{directory}: SigLIP's attention-pooling head is not imported (pooled = mean of the patch tokens)")
    return build(ViT, cfg, state, sources, weights.origin), weights, prefix


# -----------------------------------------------------------------------------
# whole CLIP models: HF CLIPModel, OpenCLIP -> PathoCLIP


def hf_text_config(tc, path):
    tc = {**dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5),
          **{k: v for k, v in tc.items() if v is not None}}
    if tc["hidden_act"] not in HF_ACT:
        refuse(path, f"text hidden_act {tc['hidden_act']!r}")
    return TextConfig(vocab_size=tc["vocab_size"], n_layer=tc["num_hidden_layers"], n_head=tc["num_attention_heads"],
                      n_embd=tc["hidden_size"], max_len=tc["max_position_embeddings"], mlp_act=HF_ACT[tc["hidden_act"]],
                      norm_eps=float(tc["layer_norm_eps"]), mlp_dim=tc["intermediate_size"])


def hf_text_state(weights, cfg):
    t = "text_model."
    names = {"text.tok_embed.weight": t + "embeddings.token_embedding.weight",
             "text.pos_embed": t + "embeddings.position_embedding.weight",
             "text.ln_f.weight": t + "final_layer_norm.weight", "text.ln_f.bias": t + "final_layer_norm.bias",
             "text.proj.weight": "text_projection.weight", "visual.proj.weight": "visual_projection.weight",
             "logit_scale": "logit_scale", **block_names(cfg.n_layer, "text.blocks.", f"{t}encoder.layers.", False)}
    return gather(weights, names), names


def openclip_text_config(mc, path):
    tc = mc.get("text_cfg", {})
    for key in ("hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask", "proj_bias", "act_kwargs", "qk_norm",
                "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
        if tc.get(key):
            refuse(path, f"text_cfg.{key} = {tc[key]!r} (not implemented)")
    if tc.get("text_arch", "clip") != "clip" or tc.get("pool_type", "argmax") not in ("argmax", "eos") \
            or tc.get("proj_type", "linear") != "linear":
        refuse(path, "text_cfg text_arch / pool_type / proj_type other than clip / argmax|eos / linear")
    width = tc.get("width", 512)
    return TextConfig(vocab_size=tc.get("vocab_size", 49408), n_layer=tc.get("layers", 12), n_head=tc.get("heads", 8),
                      n_embd=width, max_len=tc.get("context_length", 77),
                      mlp_act="quick_gelu" if mc.get("quick_gelu") else "gelu",
                      norm_eps=float((tc.get("norm_kwargs") or {}).get("eps", 1e-5)),
                      mlp_dim=int(width * tc.get("mlp_ratio", 4.0)))


def openclip_text_state(weights, cfg):
    t = "text." if "text.token_embedding.weight" in weights else ""  # CustomTextCLIP nests its text tower
    names = {"text.tok_embed.weight": t + "token_embedding.weight", "text.pos_embed": t + "positional_embedding",
             "text.ln_f.weight": t + "ln_final.weight", "text.ln_f.bias": t + "ln_final.bias",
             **block_names(cfg.n_layer, "text.blocks.", f"{t}transformer.resblocks.", True)}
    state = gather(weights, names)
    # OpenCLIP multiplies x @ proj with proj (C, D): a Linear's weight is its transpose
    state["text.proj.weight"] = weights.get(t + "text_projection").T.contiguous()
    state["visual.proj.weight"] = weights.get("visual.proj").T.contiguous()
    state["logit_scale"] = weights.get("logit_scale").reshape(())
    names.update({"text.proj.weight": t + "text_projection", "visual.proj.weight": "visual.proj",
                  "logit_scale": "logit_scale"})
    return state, names


def load_clip(directory, source):
    """A released CLIP (HF CLIPModel or OpenCLIP) -> (PathoCLIP, merged tokenizer)."""
    vit, weights, _ = import_vit(directory, source)
    state = {f"visual.vit.{k}": v for k, v in vit.state_dict().items()}
    if source == "open_clip":
        path = os.path.join(directory, "open_clip_config.json")
        mc = read_json(path)
        mc = mc.get("model_cfg", mc)
        if "logit_bias" in weights:
            refuse(path, "a sigmoid-loss (SigLIP) OpenCLIP model; only its vision tower can be imported")
        text_cfg, embed_dim = openclip_text_config(mc, path), mc.get("embed_dim", 512)
        text_state, sources = openclip_text_state(weights, text_cfg)
    else:
        path = os.path.join(directory, "config.json")
        c = read_json(path)
        text_cfg, embed_dim = hf_text_config(c.get("text_config", {}), path), c.get("projection_dim", 512)
        text_state, sources = hf_text_state(weights, text_cfg)
    state.update(text_state)
    weights.check_all_used(ignore=("position_ids",))
    tokenizer, added, n_before = merge_tokenizer(directory, text_cfg.vocab_size)
    text_cfg.vocab_size = max(text_cfg.vocab_size, tokenizer.vocab_size)
    state["text.tok_embed.weight"] = grow_rows(state["text.tok_embed.weight"], text_cfg.vocab_size, added, n_before)
    cfg = CLIPConfig(vision=vit.config, text=text_cfg, embed_dim=embed_dim)
    return build(PathoCLIP, cfg, state, sources, weights.origin), tokenizer


# -----------------------------------------------------------------------------
# what a directory holds, and the entry points


def released_kind(directory):
    """(kind, source) of a released directory: kind "lm" | "clip" | "vision", source its model_type or
    "open_clip"; None for a nanopatho checkpoint (or a directory without a config)."""
    if os.path.isfile(os.path.join(directory, "open_clip_config.json")):
        return "clip", "open_clip"
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    c = read_json(path)
    if isinstance(c.get("model"), dict):  # nanopatho: {"model_type", "model", "run"}
        return None
    model_type = c.get("model_type")
    if model_type not in KINDS:
        why = REFUSED.get(model_type, "not an architecture nanopatho implements")
        raise CheckpointError(f"{path}: model_type {model_type!r} cannot be imported ({why}); supported: "
                              f"qwen2, llama (LMs), clip, clip_vision_model, siglip, siglip_vision_model, OpenCLIP")
    return KINDS[model_type], model_type


def is_released(directory):
    return released_kind(directory) is not None


def load_pretrained(directory, expect=None):
    """(model, config dict, tokenizer) of a released LM or CLIP directory, like checkpoint.load."""
    kind, source = released_kind(directory)
    expected = (expect,) if isinstance(expect, str) else expect
    if expected is not None and kind not in expected:
        raise CheckpointError(f"{directory}: holds a released {source} {kind}, but a "
                              f"{' or '.join(map(repr, expected))} model is needed here")
    if kind == "vision":
        raise CheckpointError(f"{directory}: a {source} vision tower only; use it as train_pretrain.py --vision_init")
    model, tokenizer = load_hf_lm(directory) if kind == "lm" else load_clip(directory, source)
    config = {"model_type": kind, "model": model.config.to_dict(),
              "run": {"imported_from": os.path.abspath(directory), "source": source}}
    return model, config, tokenizer


def load_lm(directory):
    """--lm_init: (LM, tokenizer) from a nanopatho LM checkpoint or a released Qwen2 / Llama directory."""
    model, _, tokenizer = checkpoint.load(directory, expect="lm")  # checkpoint.load dispatches released dirs here
    return model, tokenizer


def load_vision(directory):
    """--vision_init: a ViT from a PathoCLIP or ViT checkpoint, or a released CLIP / SigLIP / OpenCLIP directory."""
    found = released_kind(directory)
    if found is None:
        model, config, _ = checkpoint.load(directory, expect=("clip", "vit"))
        return model.visual.vit if config["model_type"] == "clip" else model
    kind, source = found
    if kind == "lm":
        raise CheckpointError(f"{directory}: holds a released {source} language model, not a vision tower")
    return import_vit(directory, source)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description="Import a released LM (Qwen2 / Llama) or CLIP (HF / OpenCLIP) directory "
                                            "and save it as a nanopatho checkpoint.")
    p.add_argument("src", help="a local HF or OpenCLIP directory (config.json or open_clip_config.json, "
                               "safetensors weights, tokenizer.json)")
    p.add_argument("--out", required=True, help="nanopatho checkpoint directory to write")
    args = p.parse_args(argv)
    model, config, tokenizer = load_pretrained(args.src)
    checkpoint.save_model(args.out, model, tokenizer, config["run"])
    note(f"wrote a nanopatho {config['model_type']!r} checkpoint to {args.out}")


if __name__ == "__main__":
    from nanopatho.training import run
    run(main)
