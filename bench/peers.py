"""Shared benchmark helpers: peer models built from nanopatho configs, and interleaved A/B timing.

    from bench.peers import qwen2_peer, interleaved, median
    hf = qwen2_peer(lm)                        # transformers Qwen2ForCausalLM with lm's config and weights
    times = interleaved({"nanopatho": step_a, "peer": step_b}, warmup=2, reps=5)   # A B A B ...
    times = interleaved(fns, clock="cpu")      # this thread's CPU time: steadier on a shared CPU machine

Peers are built from configs with random init and get nanopatho's weights copied in: nothing
is ever downloaded. transformers is a bench-only dependency (bench/requirements.txt).
"""

import statistics
import time

import torch


def qwen2_config(cfg):
    """nanopatho LMConfig -> an identical transformers Qwen2Config (SDPA attention, no sliding window)."""
    from transformers import Qwen2Config

    assert cfg.qkv_bias, "Qwen2 always has q/k/v biases: build the nanopatho LM with qkv_bias=True"
    return Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                       num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                       intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_seq_len,
                       rope_theta=cfg.rope_base, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                       hidden_act="silu", attention_dropout=0.0, use_sliding_window=False,
                       attn_implementation="sdpa")


def to_qwen2_state_dict(state_dict):
    """nanopatho LM state dict -> Qwen2ForCausalLM names: everything but lm_head gains the "model." prefix."""
    return {k if k.startswith("lm_head.") else "model." + k: v for k, v in state_dict.items()}


def qwen2_peer(lm):
    """A transformers Qwen2ForCausalLM with lm's config and a copy of its weights (fp32, same device)."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM(qwen2_config(lm.config)).to(next(lm.parameters()).device)
    hf.load_state_dict(to_qwen2_state_dict(lm.state_dict()), strict=True)
    return hf


CLOCKS = {"wall": time.perf_counter,  # elapsed time: what a user waits for on an idle machine
          "cpu": time.thread_time}  # CPU time of this thread: other processes' load leaves it (mostly) alone; CPU only


def interleaved(fns, warmup=1, reps=5, clock="wall"):
    """Time each callable in turn, A B A B ..., after `warmup` untimed rounds. -> {name: [seconds, ...]}"""
    now = CLOCKS[clock]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = now()
            fn()
            times[name].append(now() - t0)
    return times


def median(xs):
    return statistics.median(xs)


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
