"""Stage 0: the base LM that stage 1 continues. A blank toy LM learns to read a question on
SynthPath's reading curriculum (data/synthpath/reading.py: copy a span, find a finding's option
letter, read an option, judge same or different), short contexts first and then the real length.

Patho-R1 continues a released VLM whose LM already reads; at real scale pass a released LM to
`train_pretrain.py --lm_init` instead. At toy scale this script is that LM's pretraining: one
base LM serves every seed of the speedrun, as one released model serves every Patho-R1 run.

    python -m nanopatho.base_lm --preset toy --data data/synthpath --out_dir out/base_lm
    python -m nanopatho.base_lm --preset toy --level_steps 300,300 --max_steps 1000   # a faster schedule
    torchrun --nproc_per_node=2 -m nanopatho.base_lm --preset toy
    python -m nanopatho.base_lm --preset toy --init out/base_lm --train_file reading_near.jsonl \
        --level_steps 200 --max_steps 1800 --out_dir out/base_lm_near                # the second phase
    python -m nanopatho.base_lm --help

Curriculum: the first level_steps[0] steps draw rows of level 0 (the bare question), the next
level_steps[1] of level 1 (+ the system prompt), the rest of level 2 (+ filler: the real prompt's
length and more); `--replay` of each batch is drawn from the earlier levels so no skill is lost. A file without some levels
(reading_near.jsonl holds levels 1 and 2) walks the levels it has, in order.
Second phase (the toy speedrun runs it): `--init` continues the first phase's LM on reading_near.jsonl,
the option walk on options that share a word ("mild pleomorphism", "marked pleomorphism"), as SynthPath's
tumour questions ask; the first phase's options share none.
Every --eval_every steps the held-out reading probe (names never trained on) is scored and logged
to metrics.jsonl as probe_option (letter top-1, chance 0.25), probe_same (yes/no top-1, chance 0.5),
probe_walk (option walks with every check right, the speedrun's gate) and probe_near_walk (the same on
options that share a word), with the rest of diagnose.probe_stats.
The output directory is an LM checkpoint (config.json model_type "lm", model.safetensors, tokenizer.json).
"""

import dataclasses
import os

import torch

from nanopatho import checkpoint, diagnose, dist, training
from nanopatho.config import field, parse_config, to_dict
from nanopatho.data import load_records
from nanopatho.lm import LM
from nanopatho.next_token import Examples, TrainConfig, train
from nanopatho.presets import count_params, lm_config
from nanopatho.tokenizer import Tokenizer


@dataclasses.dataclass
class Config(TrainConfig):
    out_dir: str = field("out/base_lm", "where checkpoints, metrics.jsonl and the base LM go")
    train_file: str = field("reading_train.jsonl", "reading conversations {'messages', 'level'} (relative to --data)")
    probe_file: str = field("reading_probe.jsonl", "held-out reading probe conversations ('' = none)")
    tokenizer: str = field("", "tokenizer.json (default: <data>/tokenizer.json); stage 1 must use the same")
    init: str = field("", "LM checkpoint to continue (same tokenizer) instead of a blank LM: a second phase")
    level_steps: str = field("600,600", "steps spent at each level before the last one, comma-separated")
    replay: float = field(0.25, "fraction of each batch drawn from earlier levels")
    level_batch: str = field("", "rows per micro-batch at each level, comma-separated ('' = --batch_size at every "
                                 "level); the short drills afford more rows than the long chats")
    val_rows: int = field(256, "rows held out of train_file for the validation loss")
    loss_on: str = field("all", "all = every token, as LM pretraining does | assistant = the replies only, as SFT does")


PRESETS = {
    # toy level_steps: 1,800 steps at the chat levels (was 300 + 300): the probe's same-or-different on new names
    # 0.62 -> 0.825, check 0.874 -> 0.944, for +2.2 min (the issue-15 note, session 7, has the curves)
    # toy pack=False: whether the walk forms is a coin flip on the float rounding of the whole run, and packing
    # (the same math, other rounding) turned base seeds 0 and 2, which pass padded on this machine, into misses
    # (probe walks 0.68 and 0.33 against 0.855 and 0.845; seed 3 stood at 0.26 after 2,600 first-phase steps);
    # padded, the first phase is bitwise the one on record (issue-15 notes, session 32)
    "toy": dict(max_steps=3600, batch_size=16, lr=1e-3, warmup_steps=50, max_seq_len=320, eval_every=200,
                weight_decay=0.0, augment=False, level_steps="1800,600", level_batch="16,8,8", pack=False),
    "small": dict(max_steps=10000, batch_size=64, lr=6e-4, warmup_steps=200, max_seq_len=512, augment=False),
    "base": dict(max_steps=20000, batch_size=64, lr=3e-4, warmup_steps=500, max_seq_len=1024, augment=False),
}


def reading_examples(cfg, tokenizer, path):
    """Conversations -> (Examples, their levels). With --loss_on all the questions are predicted too
    (the next option letter after each option line, the finding copied from the question)."""
    if cfg.loss_on not in ("all", "assistant"):
        training.fail(f"--loss_on must be 'all' or 'assistant', got {cfg.loss_on!r}")
    records, _ = load_records(path, ("messages",), image_key=None)
    seqs, levels = [], []
    for r in records:
        ids, mask = tokenizer.render_chat(r["messages"], n_image_tokens=0)
        if len(ids) > cfg.max_seq_len:
            training.fail(f"{r['source']}: {len(ids)} tokens > --max_seq_len {cfg.max_seq_len}")
        seqs.append((ids, [1] * len(ids) if cfg.loss_on == "all" else mask))
        levels.append(int(r.get("level", 0)))
    return Examples(seqs, [-1] * len(seqs), torch.zeros(0, 3, 1, 1, dtype=torch.uint8)), levels


def split_rows(examples, levels, n_val):
    """The last n_val rows are the validation set (a fixed split); the rest train."""
    n = len(examples) - n_val
    part = lambda a, b: Examples(examples.seqs[a:b], examples.image_index[a:b], examples.images)  # noqa: E731
    return part(0, n), levels[:n], part(n, len(examples))


def level_at(step, level_steps):
    """The curriculum level of an optimizer step: level k for level_steps[k] steps, then the last level."""
    for level, n in enumerate(level_steps):
        if step < n:
            return level
        step -= n
    return len(level_steps)


def curriculum_sampler(cfg, levels):
    """sampler(step, micro) -> row indices: (1 - replay) of the batch from the step's level, the rest
    from the earlier levels; a pure function of (seed, step, micro, rank), so resume is exact."""
    level_steps = [int(s) for s in cfg.level_steps.split(",") if s]
    sizes = [int(s) for s in cfg.level_batch.split(",") if s]
    pools = {}
    for i, level in enumerate(levels):
        pools.setdefault(level, []).append(i)
    present = sorted(pools)  # the levels the rows hold, walked in order

    def sample(step, micro):
        k = min(level_at(step, level_steps), len(present) - 1)
        level = present[k]
        batch_size = sizes[min(level, len(sizes) - 1)] if sizes else cfg.batch_size
        g = training.generator_for(cfg.seed, step, micro, dist.rank(), 17)
        earlier = [i for lv in present[:k] for i in pools[lv]]
        n_replay = round(cfg.replay * batch_size) if earlier else 0
        now, old = pools[level], earlier or pools[level]
        picks = [now[int(j)] for j in torch.randint(len(now), (batch_size - n_replay,), generator=g)]
        return picks + [old[int(j)] for j in torch.randint(len(old), (n_replay,), generator=g)]
    return sample


def probe_scorer(tokenizer, path):
    """on_eval hook: the reading probe's top-1 on option letters and yes/no decisions."""
    convs = diagnose.load_probe(path)

    def score(model):
        stats = diagnose.probe_stats(checkpoint.unwrap(model), tokenizer, convs)
        return {f"probe_{k}": v["top1"] for k, v in stats.items()}
    return score


def initial_lm(cfg, tokenizer):
    """A blank LM of the preset's shape, or with --init the LM checkpoint to continue (its shape)."""
    if not cfg.init:
        return LM(lm_config(cfg.preset, tokenizer.vocab_size))
    model, _, _ = checkpoint.load(cfg.init, expect="lm")
    if model.config.vocab_size != tokenizer.vocab_size:
        training.fail(f"--init {cfg.init}: its vocabulary ({model.config.vocab_size} ids) is not the tokenizer's "
                      f"({tokenizer.vocab_size}); continue it with the tokenizer.json it was trained with")
    return model


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = training.setup(cfg.seed, cfg.device)
    tokenizer = Tokenizer.from_file(cfg.tokenizer or os.path.join(cfg.data, "tokenizer.json"))
    rows, levels = reading_examples(cfg, tokenizer, os.path.join(cfg.data, cfg.train_file))
    train_set, train_levels, val_set = split_rows(rows, levels, cfg.val_rows)
    model = initial_lm(cfg, tokenizer)
    training.print0(f"[base_lm] {len(train_set)} reading rows (levels {sorted(set(train_levels))}), "
                    + (f"continuing {cfg.init}, " if cfg.init else "") +
                    f"{len(val_set)} val; schedule {cfg.level_steps} then the last level; params: {count_params(model)}")
    model.to(device)
    on_eval = probe_scorer(tokenizer, os.path.join(cfg.data, cfg.probe_file)) if cfg.probe_file else None
    summary = train(cfg, model, tokenizer, train_set, val_set, to_dict(cfg), stage="base_lm",
                    sampler=curriculum_sampler(cfg, train_levels), on_eval=on_eval)
    probe = on_eval(model) if on_eval is not None else {}
    training.print0(f"[base_lm] done in {summary['seconds']:.0f}s: val loss {summary['final_val_loss']:.3f}, "
                    + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()) + f" -> {cfg.out_dir}")
    dist.shutdown()


if __name__ == "__main__":
    training.run(main)
