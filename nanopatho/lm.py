"""Decoder-only language model with the Qwen2 family's choices, and batched KV-cache generation.

    token embedding -> n_layer x [RMSNorm -> GQA attention with RoPE -> + ; RMSNorm -> SwiGLU MLP -> +]
    -> RMSNorm -> lm_head (optionally tied to the embedding)

Parameter names follow Qwen2 (embed_tokens, layers.i.self_attn.{q,k,v,o}_proj,
layers.i.mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, norm, lm_head),
so a Hugging Face Qwen2 state dict loads after dropping its "model." prefix
(see `from_qwen2_state_dict`).

    from nanopatho.lm import LM, LMConfig
    lm = LM(LMConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                     intermediate_size=128, max_seq_len=128))
    logits, loss = lm(ids, targets, attention_mask=mask)              # (B, T, V) fp32, scalar
    out = lm.generate(prompt_ids, prompt_mask, max_new_tokens=32, temperature=0.7, stop_ids=(eos,))
    out.ids, out.mask, out.logprobs                                    # (B, N) each

Padding may sit on either side: positions are cumsum(attention_mask) - 1, padded keys are
masked, and each query may always see itself so an all-padding row stays finite.
"""

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LMConfig:
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 6
    n_kv_head: int = 2
    n_embd: int = 192
    intermediate_size: int = 512
    max_seq_len: int = 512
    rope_base: float = 10000.0
    qkv_bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-6

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class GenerationOutput(NamedTuple):
    ids: torch.Tensor  # (B, N) long, pad_id after a row finished
    mask: torch.Tensor  # (B, N) bool, True on real generated tokens (stop token included)
    logprobs: torch.Tensor  # (B, N) fp32, log_softmax(logits / T) at the sampled token, 0 where mask is False


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w   (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_cos_sin(positions, head_dim, base):
    """RoPE tables (Su et al. 2021) for integer positions (B, T) -> cos, sin (B, 1, T, hd).

    theta_i = base^(-2i/hd), angle = pos * theta_i; the half-split layout of Qwen2 / Llama
    (the first hd/2 channels pair with the last hd/2)."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair (x1, x2) by the angle: (x1 cos - x2 sin, x2 cos + x1 sin). x: (B, h, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Preallocated keys/values, one (B, n_kv_head, T_max, hd) pair per layer, written in place.

    Allocated on the first write of each layer (so it takes the dtype autocast gives k and v),
    once per generate call; never grown with torch.cat."""

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def update(self, layer, k, v, start):
        """Write k, v (B, kvh, T, hd) at [start, start+T); return the filled prefix [0, start+T)."""
        B, kvh, T, hd = k.shape
        assert start + T <= self.max_len, f"KV cache overflow: {start + T} > {self.max_len}"
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, kvh, self.max_len, hd)
            self.v[layer] = v.new_empty(B, kvh, self.max_len, hd)
        self.k[layer][:, :, start:start + T] = k
        self.v[layer][:, :, start:start + T] = v
        return self.k[layer][:, :, :start + T], self.v[layer][:, :, :start + T]

    def repeat_rows(self, n):
        """Give each row n consecutive copies: (B, ...) -> (B*n, ...), after a prefill shared by n samples."""
        self.k = [t.repeat_interleave(n, 0) for t in self.k]
        self.v = [t.repeat_interleave(n, 0) for t in self.v]

    def keep_rows(self, rows):
        """Keep only these rows (long (b,)), in this order: generation drops the rows that have finished."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): n_head query heads share n_kv_head key/value heads."""

    def __init__(self, cfg: LMConfig, layer_idx):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, f"n_embd {cfg.n_embd} not divisible by n_head {cfg.n_head}"
        assert cfg.n_head % cfg.n_kv_head == 0, f"n_head {cfg.n_head} not a multiple of n_kv_head {cfg.n_kv_head}"
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start)  # (B, kvh, start+T, hd)
        # softmax(q k^T / sqrt(hd) + mask) v; a mask is never combined with is_causal
        gqa = self.n_kv_head != self.n_head
        if cache is not None and T == 1 and gqa:
            # one decoding step: fold the query heads sharing a kv head into the row axis, which is
            # cheaper than SDPA's general GQA path for a single query
            g = self.n_head // self.n_kv_head
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_head, g, self.head_dim), k, v,
                                               attn_mask=attn_mask)  # (B, kvh, g, hd)
            return self.o_proj(y.reshape(B, 1, -1))  # (B, 1, C): head order kvh-major = q's order
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


def padding_attn_mask(attention_mask):
    """(B, T) 0 = pad, k > 0 = the k-th sequence packed into the row (a 0/1 mask: one sequence per row)
    -> boolean (B, 1, T, T): causal AND key is real AND key is in the query's sequence, OR key is the
    query itself. A pad query sees every real key before it, as with a 0/1 mask (its output is dropped)."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T) key <= query
    seq = attention_mask.long()  # (B, T)
    same = (seq[:, :, None] == seq[:, None, :]) | (seq == 0)[:, :, None]  # (B, T, T) query row, key column
    allowed = causal & (seq > 0)[:, None, None, :] & same[:, None]  # (B, 1, T, T)
    return allowed | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


def positions_from_mask(attention_mask):
    """Position of each token among the real tokens of its sequence (B, T): cumsum(mask > 0) - 1 minus that
    count at the sequence's first token, so positions restart at 0 in each packed sequence; pads keep the
    count clamped to 0 (with a 0/1 mask: cumsum(mask) - 1, pads clamped to 0)."""
    seq = attention_mask.long()  # (B, T) 0 = pad, k = k-th sequence of the row
    real = seq > 0
    count = real.long().cumsum(dim=1) - 1  # (B, T) real tokens before this one in the row
    start = torch.full((seq.shape[0], int(seq.max()) + 1), seq.shape[1], dtype=torch.long, device=seq.device)
    start = start.scatter_reduce(1, seq, count, reduce="amin")  # (B, K+1) count at each sequence's first token
    offset = torch.where(real, start.gather(1, seq), 0)  # (B, T)
    return (count - offset).clamp(min=0)


# -----------------------------------------------------------------------------
# the model


class LM(nn.Module):
    model_type = "lm"

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual output projections by 1/sqrt(2 n_layer)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden_states(self, x, positions, attn_mask=None, cache=None, start=0):
        """Run the layers on embeddings x (B, T, C) at integer positions (B, T); final RMSNorm applied."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_base)  # (B, 1, T, hd)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache, start)
        return self.norm(x)  # (B, T, C)

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, attention_mask=None, loss_mask=None, reduction="mean"):
        assert (idx is None) != (inputs_embeds is None), "pass exactly one of idx and inputs_embeds"
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        assert T <= self.config.max_seq_len, f"sequence length {T} > max_seq_len {self.config.max_seq_len}"
        if attention_mask is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
            attn_mask = None  # plain causal attention
        else:
            positions = positions_from_mask(attention_mask)
            attn_mask = padding_attn_mask(attention_mask)
        logits = self.lm_head(self.hidden_states(x, positions, attn_mask)).float()  # (B, T, V)
        loss = None if targets is None else lm_loss(logits, targets, loss_mask, reduction)
        return logits, loss

    # -------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, idx, attention_mask=None, *, inputs_embeds=None, max_new_tokens, temperature=1.0,
                 top_k=None, top_p=None, stop_ids=(), pad_id=0, generator=None, suppress_ids=(), on_token=None,
                 samples_per_prompt=1):
        """Sample up to max_new_tokens continuations of a left-padded batch of prompts.

        idx (P, T) prompt ids (may be None when inputs_embeds (P, T, C) are given, e.g. by the VLM);
        attention_mask (P, T) 1=real 0=pad. Returns GenerationOutput(ids, mask, logprobs), each (B, N),
        B = P * samples_per_prompt, N <= max_new_tokens (the loop ends early once every row has emitted
        a stop id).
        logprobs are log_softmax(logits / T) of the *unfiltered* tempered distribution (T = 1 when
        greedy), the quantity RL's importance ratio needs (train_rl takes them as its old log-probs);
        top-k / top-p / suppress_ids only restrict what is drawn.
        suppress_ids can never be sampled (e.g. the VLM's image placeholder, an input-only token);
        on_token(tok (B,), alive (B,)) is called after every step, for streaming to a terminal.
        samples_per_prompt = n draws n samples of each prompt (output rows p*n .. p*n+n-1): the prompt
        is prefilled once and its keys / values copied to its n rows (GRPO's group of n completions).
        Rows that have emitted a stop id leave the decoder once they are a quarter of those still in it: with
        replies of mixed lengths most decode steps run on the long ones only. Every step draws one uniform
        per output row, so what a row samples does not depend on when the others stopped."""
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds  # (P, T, C)
        P, T, _ = x.shape
        device = x.device
        if attention_mask is None:
            attention_mask = torch.ones(P, T, dtype=torch.long, device=device)
        assert bool(attention_mask[:, -1].all()), "generate needs left-padded prompts (each row's last token real)"
        total = T + max_new_tokens
        assert total <= self.config.max_seq_len, \
            f"prompt {T} + max_new_tokens {max_new_tokens} > max_seq_len {self.config.max_seq_len}"
        cache = KVCache(self.config.n_layer, total)
        # prefill: the whole prompt at once, keys/values written to cache slots [0, T)
        h = self.hidden_states(x, positions_from_mask(attention_mask), padding_attn_mask(attention_mask), cache, 0)
        logits = self.lm_head(h[:, -1]).float()  # (P, V) left padding => last column is each row's last real token
        if samples_per_prompt > 1:  # each prompt's n samples start from its one prefill
            cache.repeat_rows(samples_per_prompt)
            logits = logits.repeat_interleave(samples_per_prompt, 0)  # (B, V), B = P * n
            attention_mask = attention_mask.repeat_interleave(samples_per_prompt, 0)  # (B, T)
        B = logits.shape[0]
        key_valid = torch.zeros(B, total, dtype=torch.bool, device=device)  # which cache slots hold real tokens
        key_valid[:, :T] = attention_mask.bool()
        next_pos = attention_mask.long().sum(dim=1)  # (B,) position of the first generated token
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)

        out_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        out_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
        out_logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        suppress = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
        # the decoder runs only on live (b,), the output rows not yet dropped; the cache, key_valid and next_pos
        # hold those b rows in live's order. A finished row runs on until a quarter of the b rows have
        # finished, then they all leave (each drop copies the cache: O(log B) copies, not B)
        live = torch.arange(B, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)  # (b,)
        n = 0
        for n in range(max_new_tokens):
            u = None if temperature == 0 else uniforms(B, generator, device)[live]  # (b,)
            tok, logprob = sample_next(logits, temperature, top_k, top_p, generator, suppress, u)  # (b,), (b,)
            alive = ~finished
            rows = live[alive]
            out_ids[rows, n], out_mask[rows, n], out_logprobs[rows, n] = tok[alive], True, logprob[alive]
            if on_token is not None:
                on_token(out_ids[:, n], out_mask[:, n])  # (B,), (B,)
            finished = finished | (alive & torch.isin(tok, stop))
            if n + 1 == max_new_tokens or bool(finished.all()):
                break
            if 4 * int(finished.sum()) >= len(live):
                keep = (~finished).nonzero().squeeze(1)  # (b',)
                live, tok, finished = live[keep], tok[keep], finished[keep]
                key_valid, next_pos = key_valid[keep], next_pos[keep]
                cache.keep_rows(keep)
            # decode: one token per row at slot T + n, position next_pos + n
            slot = T + n
            key_valid[:, slot] = True
            x = self.embed_tokens(tok[:, None])  # (b, 1, C); finished rows not yet dropped run on, their outputs unused
            positions = (next_pos + n)[:, None]  # (b, 1)
            h = self.hidden_states(x, positions, key_valid[:, None, None, :slot + 1], cache, slot)  # (b, 1, C)
            logits = self.lm_head(h[:, -1]).float()  # (b, V)
        N = n + 1 if max_new_tokens > 0 else 0
        return GenerationOutput(out_ids[:, :N], out_mask[:, :N], out_logprobs[:, :N])


# -----------------------------------------------------------------------------
# loss and sampling


def lm_loss(logits, targets, loss_mask=None, reduction="mean"):
    """Token cross-entropy -log p(target). Targets < 0 and loss_mask == 0 are ignored.

    "mean" divides by the number of counted tokens (sum of the mask); "sum" returns the sum so a
    training loop can divide by the global token count over micro-batches and ranks."""
    assert reduction in ("mean", "sum"), f"reduction must be 'mean' or 'sum', got {reduction!r}"
    V = logits.shape[-1]
    nll = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1).clamp(min=0), reduction="none")  # (B*T,)
    weight = (targets.reshape(-1) >= 0).float()
    if loss_mask is not None:
        weight = weight * loss_mask.reshape(-1).float()
    total = (nll * weight).sum()
    return total if reduction == "sum" else total / weight.sum().clamp(min=1.0)


def filter_top_k_top_p(logits, top_k=None, top_p=None):
    """Set logits outside the top-k tokens, and outside the smallest set whose probability
    reaches top_p (nucleus, Holtzman et al. 2019), to -inf. logits (B, V); the argmax always survives."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        drop_sorted = mass_before >= top_p  # keep tokens until the kept mass reaches top_p
        drop_sorted[:, 0] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def uniforms(n, generator, device):
    """n draws of U[0, 1) for inverse-CDF sampling, fp64 (fp32 where MPS is involved), moved to device. They
    are drawn where the generator lives: train_rl's seeded generators are CPU ones, also for CUDA logits."""
    where = torch.device(device if generator is None else generator.device)
    wide = torch.float32 if "mps" in (where.type, torch.device(device).type) else torch.float64
    return torch.rand(n, dtype=wide, generator=generator, device=where).to(device)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, suppress=None, u=None):
    """logits (B, V) fp32 -> (token (B,), log_softmax(logits / T)[token] (B,)). temperature 0 = greedy (T = 1 for logprobs).
    suppress (long tensor of ids): never drawn, but kept in the log-prob's normaliser, as top-k / top-p:
    the log-prob is the full softmax's, the one a forward pass scores (RL's importance ratio).
    u (B,) fp64 in [0, 1): the uniforms of the inverse-CDF draw; drawn from generator when None."""
    scaled = logits if temperature == 0 else logits / temperature  # (B, V)
    drawn = scaled if suppress is None or not len(suppress) else scaled.index_fill(-1, suppress, float("-inf"))
    if temperature == 0:
        tok = drawn.max(dim=-1).indices  # (B,) faster than argmax on the CPU
    else:
        probs = filter_top_k_top_p(drawn, top_k, top_p).softmax(dim=-1)  # (B, V)
        # inverse CDF: the first token whose cumulative probability exceeds u ~ U[0, total); one random
        # number per row (torch.multinomial draws V exponentials per row: 20x slower at B=64, V=1.5k on a CPU)
        wide = torch.float32 if probs.device.type == "mps" else torch.float64  # fp64: each token keeps its exact share
        cdf = probs.to(wide).cumsum(dim=-1)  # (B, V)
        u = uniforms(cdf.shape[0], generator, cdf.device) if u is None else u
        u = u.to(cdf.dtype)[:, None] * cdf[:, -1:]  # (B, 1) ~ U[0, total)
        tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)  # (B,)
    # log p(tok) = z_tok - logsumexp(z): no (B, V) log-softmax needed
    return tok, scaled.gather(-1, tok[:, None]).squeeze(-1) - scaled.logsumexp(dim=-1)


def from_qwen2_state_dict(state_dict):
    """Rename a Hugging Face Qwen2ForCausalLM state dict to this LM's names (drop "model.")."""
    return {k.removeprefix("model."): v for k, v in state_dict.items() if "rotary_emb" not in k}
