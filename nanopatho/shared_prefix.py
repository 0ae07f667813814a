"""Score many continuations of a few shared prompts: each prompt runs once, its continuations
attend to its keys and values.

GRPO samples G completions of every prompt. Scoring them (old / reference log-probs) and the
update's forward would otherwise run the same image and the same ~100-token prompt G times.
Here a prompt (a "prefix") runs through the LM once; each continuation row then runs only its
own tokens, with attention over [its prefix's keys/values, its own]. Every row gets exactly the
logits of the full prompt + continuation forward (tests/test_shared_prefix.py), and with grad the
prefix stays in the graph: indexing a prefix's keys/values for its rows sums, in backward, the
gradients of all its continuations into the one prefix computation, as G separate copies would.

    from nanopatho.shared_prefix import continuation_logits
    logits = continuation_logits(lm, prefix_embeds, prefix_mask, ids, mask, prefix_of_row)  # (b, N, V)

The VLM routes here from its forward (`vlm(prompt_ids, pixels, attention_mask=m, continuations=...)`),
so DDP sees an ordinary forward; train_rl.completion_logits is the caller.
"""

import torch

from nanopatho.lm import padding_attn_mask, positions_from_mask


class PrefixKV:
    """The cache LM.hidden_states writes through (same `update` as lm.KVCache), for one prefix pass
    followed by one continuation pass.

    Prefix pass: keys/values (u, kvh, Tp, hd) of the u prefixes are kept (with their graph).
    Continuation pass: row r attends to [keys of prefix prefix_of_row[r], its own keys] -> (b, kvh, Tp + T, hd)."""

    def __init__(self, n_layer, prefix_of_row):
        self.prefix_of_row = prefix_of_row  # (b,) index into the u prefixes
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def update(self, layer, k, v, start):
        if self.k[layer] is None:  # the prefix pass: keep each prefix's keys / values once
            self.k[layer], self.v[layer] = k, v
            return k, v
        k = torch.cat([self.k[layer][self.prefix_of_row], k], dim=2)  # (b, kvh, Tp + T, hd)
        v = torch.cat([self.v[layer][self.prefix_of_row], v], dim=2)
        return k, v


def continuation_attn_mask(prefix_mask, mask):
    """Boolean (b, 1, T, Tp + T) mask of continuation queries over [prefix keys, continuation keys]:
    a real prefix key, or a real continuation key at or before the query, or the query itself
    (the rows of lm.padding_attn_mask on the concatenated sequence that belong to the continuation)."""
    T = mask.shape[1]
    idx = torch.arange(T, device=mask.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T) key <= query
    own = (causal & mask.bool()[:, None, :]) | torch.eye(T, dtype=torch.bool, device=mask.device)  # (b, T, T)
    prefix = prefix_mask.bool()[:, None, :].expand(-1, T, -1)  # (b, T, Tp)
    return torch.cat([prefix, own], dim=2)[:, None]  # (b, 1, T, Tp + T)


def continuation_logits(lm, prefix_embeds, prefix_mask, ids, mask, prefix_of_row):
    """Logits scoring each continuation token, (b, N, V) fp32: row r, position t is the LM's
    prediction of ids[r, t] from prefix prefix_of_row[r] followed by ids[r, :t].

    prefix_embeds (u, Tp, C) left-padded prompt embeddings (image embeddings spliced in) and
    prefix_mask (u, Tp); ids, mask (b, N) right-padded continuations; prefix_of_row (b,) long.
    Equal to slicing LM(prompt + continuation)'s logits at positions Tp-1 .. Tp+N-2, which costs
    b full sequences instead of u prefixes + b continuations."""
    Tp, N = prefix_embeds.shape[1], ids.shape[1]
    assert Tp + N - 1 <= lm.config.max_seq_len, f"prefix {Tp} + continuation {N} > max_seq_len {lm.config.max_seq_len}"
    cache = PrefixKV(lm.config.n_layer, prefix_of_row)
    h = lm.hidden_states(prefix_embeds, positions_from_mask(prefix_mask), padding_attn_mask(prefix_mask), cache)
    first = h[:, -1][prefix_of_row, None]  # (b, 1, C): the prefix's last token predicts ids[:, 0]
    if N == 1:
        return lm.lm_head(first).float()
    inputs, inputs_mask = ids[:, :-1], mask[:, :-1].long()  # (b, N-1): tokens 0..N-2 predict tokens 1..N-1
    n_prefix = prefix_mask.long().sum(1)[prefix_of_row]  # (b,) real prefix tokens
    positions = (n_prefix[:, None] + inputs_mask.cumsum(1) - 1).clamp(min=0)  # (b, N-1) as cumsum(mask) - 1 overall
    attn = continuation_attn_mask(prefix_mask[prefix_of_row], inputs_mask)  # (b, 1, N-1, Tp + N-1)
    h = lm.hidden_states(lm.embed_tokens(inputs), positions, attn, cache, Tp)  # (b, N-1, C)
    return lm.lm_head(torch.cat([first, h], dim=1)).float()  # (b, N, V): one head matmul, no (b, N, V) concat
