"""Dataclass -> argparse, with presets. Every field of a script's config is a --flag.

    @dataclass
    class Config:
        lr: float = field(3e-4, "peak learning rate")   # `field` below adds the help text
    PRESETS = {"toy": {}, "small": {"lr": 1e-4}}
    cfg = parse_config(Config, PRESETS, description=__doc__)

Precedence: dataclass default < preset (--preset NAME) < explicit --flag.
Booleans accept `--flag`, `--flag true|false`. `RunConfig` holds the fields every training
script shares; each script's Config extends it.
"""

import argparse
import dataclasses
import json


def field(default, help):
    """A dataclass field carrying its --help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _to_bool(text):
    value = str(text).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls, presets, description=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(presets),
                        help="a named set of defaults (explicit flags still win)")
    for f in dataclasses.fields(cls):
        if f.name == "preset":  # the config may record its preset; the flag is added above
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", type=_to_bool, nargs="?", const=True, default=None, help=help_text)
        elif isinstance(default, (int, float, str)) or default is None:
            kind = type(default) if default is not None else str
            parser.add_argument(f"--{f.name}", type=kind, default=None, help=help_text)
        else:
            raise TypeError(f"config field {f.name} has unsupported type {type(default).__name__}")
    return parser


def parse_config(cls, presets, argv=None, description=None):
    """Parse argv into an instance of the dataclass `cls`, applying --preset first."""
    parser = build_parser(cls, presets, description)
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset")
    values = dict(presets.get(preset, {})) if preset else {}
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    assert not unknown, f"preset {preset!r} sets unknown fields {sorted(unknown)}"
    values.update({k: v for k, v in args.items() if v is not None})
    if preset and "preset" in {f.name for f in dataclasses.fields(cls)}:
        values["preset"] = preset
    return cls(**values)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def dumps(cfg):
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


@dataclasses.dataclass
class RunConfig:
    """What every training script has: where, how long, how fast, and how to fail or resume."""
    preset: str = field("toy", "model/training size: toy | small | base")
    data: str = field("data/synthpath", "data directory (manifest paths are relative to it)")
    out_dir: str = field("out/run", "where checkpoints, metrics.jsonl and the final model go")
    seed: int = field(0, "random seed (data order, augmentation, sampling, init)")
    device: str = field("auto", "auto | cpu | cuda | mps")
    max_steps: int = field(300, "optimizer steps")
    lr: float = field(1e-3, "peak learning rate")
    warmup_steps: int = field(20, "linear warmup steps")
    weight_decay: float = field(0.1, "AdamW weight decay on weight matrices")
    grad_clip: float = field(1.0, "gradient-norm clip (0 = off)")
    save_every: int = field(100, "resumable snapshot every N steps (0 = only the final model)")
    keep_checkpoints: int = field(2, "how many snapshots to keep")
    resume: bool = field(False, "continue from the newest snapshot in out_dir")
    on_nonfinite: str = field("skip", "non-finite loss/grad: skip the step | stop the run")
    skip_bad_samples: bool = field(False, "skip (and count) bad samples instead of stopping")
    allow_outside_root: bool = field(False, "allow manifest paths outside the data directory")
    num_threads: int = field(0, "torch CPU threads (0 = torch default)")
    stream: bool = field(False, "read the training manifest sample by sample, images decoded in --num_workers "
                                "processes (corpora larger than memory); off: decode every image into memory first")
    num_workers: int = field(2, "--stream: DataLoader worker processes reading and decoding samples (0 = in the "
                                "main process); resuming bitwise needs the same number")
    shuffle_buffer: int = field(1000, "--stream with WebDataset shards: samples in each worker's shuffle buffer "
                                      "(sample locations, not bytes: no memory cost)")
    fsdp: bool = field(False, "under torchrun, shard parameters, gradients and optimizer state over the ranks "
                              "with FSDP2 (fully_shard) instead of replicating them with DDP")
    debug_nan_step: int = field(-1, "testing: make the loss NaN at this optimizer step (-1 = never)")
