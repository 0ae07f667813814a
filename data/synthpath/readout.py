"""Does the VLM's language model say what its vision tower sees?

data.synthpath.perception asks the features: a linear probe on the frozen tower reads, say, the mitotic
count of fresh tumour tiles at 0.5. This asks the language model on the same tiles: stage 1 reads
captions that name every finding by its level word ("Tumour findings: mitotic count is 3, pleomorphism
is mild, ..."; text.findings_caption), so the VLM is shown

    <|bos|> <image>*n Tumour findings: mitotic count is

and every level word of the finding ("0" ... "4") is scored by its log-likelihood as the continuation.
The most likely word is the LM's reading of the tile. Where the probe reads an attribute and the LM does
not, the loss is between the tower and the words (projector, stage 1), not in the pixels.

    python -m data.synthpath.readout --ckpt out/seed0/pretrain                  # stage 1, 600 tiles, ~20 s
    python -m data.synthpath.readout --ckpt out/seed0/pretrain --n 300 --out readout.json

Tiles: the --n held-out tiles of perception.py (world seed 200, the same draws), never in any training file.
Beside each accuracy: chance (1 / levels) and the majority level of these tiles, the score of a model that
ignores the image and always says the commonest word; "said" is how often the LM chose each word.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from data.synthpath import world
from data.synthpath.perception import tumour_draws
from nanopatho.data import pad_sequences, to_float

INTRO = "Tumour findings:"  # one of the findings captions' openings (text.findings_caption)
FINDINGS = {  # attribute -> (its phrase in the findings caption, its level words)
    "gland_formation": ("gland formation", world.GLANDS),
    "pleomorphism": ("pleomorphism", world.PLEO),
    "mitoses": ("mitotic count", tuple(str(k) for k in range(world.MAX_MITOSES + 1))),
    "necrosis": ("necrosis", ("absent", "present")),
    "mucin": ("mucin", ("absent", "present")),
}


def level_word(attrs, name):
    """The word the findings caption uses for attribute `name` of a tile: "poor", "3", "present"."""
    value = attrs[name]
    if isinstance(value, bool):
        return "present" if value else "absent"
    return str(value)


def continuation_ids(tokenizer, prompt, words):
    """ids of `prompt` and, for each word, the ids that follow them in the encoding of `prompt word`."""
    head = tokenizer.encode(prompt)
    tails = []
    for w in words:
        full = tokenizer.encode(f"{prompt} {w}")
        assert full[:len(head)] == head, f"{prompt!r} + {w!r} does not encode as the prompt's ids + the word's"
        tails.append(full[len(head):])
    return head, tails


@torch.no_grad()
def word_logprobs(model, tokenizer, images, prompt, words, batch_size=100):
    """(n, len(words)) log p(word | <|bos|> <image>*k prompt) for each uint8 image (n, 3, S, S): the sum of
    the word's token log-probabilities, the image and prompt encoded once for all words."""
    head, tails = continuation_ids(tokenizer, prompt, words)
    prompt_ids = torch.tensor([tokenizer.bos_id] + [tokenizer.image_id] * model.n_image_tokens + head)  # (Tp,)
    cont, cont_mask = pad_sequences(tails, tokenizer.pad_id)  # each (W, N), right-padded
    out = []
    for i in range(0, len(images), batch_size):
        pixels = to_float(images[i:i + batch_size])  # (B, 3, S, S)
        B, W = len(pixels), len(words)
        ids = cont.repeat(B, 1)  # (B*W, N): image b's words are rows b*W .. b*W+W-1
        mask = cont_mask.repeat(B, 1)  # (B*W, N)
        prompt_of_row = torch.arange(B).repeat_interleave(W)  # (B*W,)
        logits, _ = model(prompt_ids.expand(B, -1), pixels, attention_mask=torch.ones(B, len(prompt_ids), dtype=torch.long),
                          continuations=(ids, mask, prompt_of_row))  # (B*W, N, V)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0]  # (B*W, N)
        out.append((logp * mask).sum(1).view(B, W))  # (B, W)
    return torch.cat(out)  # (n, W)


def readout_stats(logp, truth, words):
    """Accuracy of argmax(logp) against truth (word indices), with chance, the majority level's score and how
    often each word was said. logp (n, W), truth (n,) long."""
    said = logp.argmax(1)  # (n,)
    counts = torch.bincount(truth, minlength=len(words))  # (W,)
    return {"n": len(truth), "accuracy": (said == truth).float().mean().item(), "chance": 1 / len(words),
            "majority": (counts.max() / len(truth)).item(),
            "said": {w: (said == k).float().mean().item() for k, w in enumerate(words)}}


def readout(model, tokenizer, images, attrs, batch_size=100):
    """{attribute: readout_stats} over the tiles, one prompt per finding."""
    model.eval()
    result = {}
    for name, (phrase, words) in FINDINGS.items():
        truth = torch.tensor([words.index(level_word(a, name)) for a in attrs])  # (n,)
        logp = word_logprobs(model, tokenizer, images, f"{INTRO} {phrase} is", words, batch_size)  # (n, W)
        result[name] = readout_stats(logp, truth, words)
    return result


def format_table(result):
    lines = [f"{'finding':16s} {'n':>5s} {'LM says':>8s} {'chance':>7s} {'majority':>9s}  said"]
    for name, s in result.items():
        said = " ".join(f"{w} {p:.2f}" for w, p in s["said"].items())
        lines.append(f"{name:16s} {s['n']:5d} {s['accuracy']:8.3f} {s['chance']:7.3f} {s['majority']:9.3f}  {said}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a VLM checkpoint directory; the prompt is stage 1's findings-caption format")
    p.add_argument("--n", type=int, default=600, help="held-out tumour tiles (perception.py's, world seed 200)")
    p.add_argument("--batch_size", type=int, default=100, help="tiles per forward")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    from nanopatho import checkpoint

    model, _, tokenizer = checkpoint.load(args.ckpt, "cpu", expect="vlm")
    images, attrs = tumour_draws(200, args.n, model.config.vision.image_size)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (n, 3, S, S) uint8
    result = readout(model, tokenizer, images, attrs, args.batch_size)
    print(f"{args.ckpt}: what the LM says after '{INTRO} <finding> is' on {args.n} held-out tumour tiles")
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ckpt": args.ckpt, "tiles": args.n, "readout": result}, f, indent=2)


if __name__ == "__main__":
    from nanopatho.training import run
    run(main)
