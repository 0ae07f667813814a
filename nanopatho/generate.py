"""Ask a trained nanopatho VLM about an image: one question, a chat, or a batch of images.

    python -m nanopatho.generate --ckpt out/rl_dapo --image tile.png --question "Which tissue is shown?"
    python -m nanopatho.generate --ckpt out/sft --image tile.png --question "Grade?" --options "A) low|B) high"
    python -m nanopatho.generate --ckpt out/sft --image tile.png --interactive        # multi-turn chat
    python -m nanopatho.generate --ckpt out/sft --image tiles/ --question "Is it tumour?"   # batch table

Any VLM checkpoint works (pretrain, SFT, RL). The prompt is the one every stage trains on: the
system prompt, then a user turn "<image>\\n{question}[\\nOptions: ...]", then the assistant
turn the model completes. The reply is shown split into its reasoning ("thinking:", the
<think> block) and its final answer ("answer:", the <answer> block), with a parse status:

    ok           exactly <think>..</think><answer>..</answer> (rewards.format_reward == 1)
    answer-only  an <answer>..</answer> block is there but the format around it is not
    none         no closed <answer> block (what an untrained model gives)

On a terminal, a single reply streams token by token as it is generated (the <think> part dim,
the <answer> part bold), then its parse status; piped output gets the three labelled lines.
In --interactive mode earlier turns stay in the context; when the next reply would not fit
in the LM's max_seq_len the conversation restarts from the current question (a message says so).
Any bad input (missing file, not an image, a CLIP checkpoint, a tokenizer that does not fit the
model) prints one line "error: ..." on stderr and exits with status 1. classify.py shares the
image and error helpers below.
"""

import argparse
import os
import sys

import torch

from nanopatho.checkpoint import CheckpointError
from nanopatho.checkpoint import load as load_checkpoint
from nanopatho.data import IMAGE_EXTS, DataError, image_tensor, pad_sequences, to_float
from nanopatho.prompts import SYSTEM_PROMPT, format_question
from nanopatho.rewards import ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, extract_answer, format_reward

EXIT_ERROR = 1


class CLIError(RuntimeError):
    """A bad command-line input, reported as one line."""


# -----------------------------------------------------------------------------
# helpers shared with classify.py: device, images, checkpoint, errors


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_device(parser, device):
    """Stop with a usage error on a device string torch does not know or a GPU that is not there."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        parser.error(f"--device {device!r} is not a torch device")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here")
    if kind == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {device}: MPS is not available here")


def autocast(device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def image_paths(args_images):
    """--image values (files and / or folders) -> image file paths; a folder gives its image files, sorted."""
    paths = []
    for item in args_images:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item)
                           if n.lower().rsplit(".", 1)[-1] in IMAGE_EXTS and not n.startswith("."))
            if not found:
                raise CLIError(f"{item}: folder holds no image files ({', '.join(IMAGE_EXTS)})")
            paths += found
        else:
            paths.append(item)  # a missing or unreadable file is reported by load_images
    return paths


def load_images(paths, size):
    """Any image files (any mode, any size) -> uint8 (N, 3, size, size): shorter side resized, centre crop."""
    return torch.stack([image_tensor(p, "--image", size) for p in paths])  # (N, 3, S, S)


def load_model(ckpt, device, kind):
    """(model, config, tokenizer) of the wanted kind ("vlm" or "clip"), checked against its tokenizer."""
    try:
        model, config, tokenizer = load_checkpoint(ckpt, device, expect=kind)
    except (CheckpointError, DataError):
        raise
    except Exception as e:  # a corrupt safetensors / tokenizer.json file: say which checkpoint, not where in Rust
        raise CLIError(f"{ckpt}: cannot load checkpoint ({type(e).__name__}: {one_line(e)})") from None
    cfg = model.config
    vocab = cfg.lm.vocab_size if kind == "vlm" else cfg.text.vocab_size
    if tokenizer.vocab_size > vocab:
        raise CLIError(f"{ckpt}/tokenizer.json: {tokenizer.vocab_size} tokens but the model has {vocab}: "
                       f"the tokenizer does not belong to this model")
    if kind == "vlm" and tokenizer.image_id != cfg.image_token_id:
        raise CLIError(f"{ckpt}/tokenizer.json: image token id {tokenizer.image_id} but the model uses "
                       f"{cfg.image_token_id}: the tokenizer does not belong to this model")
    return model.eval(), config, tokenizer


def one_line(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def run_cli(main, argv=None):
    """Run main(argv); a bad input becomes one line "error: ..." on stderr and exit status 1."""
    try:
        main(argv)
    except (CLIError, CheckpointError, DataError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)


# -----------------------------------------------------------------------------
# prompt, generation, display


def parse_options(text):
    """"A) adipose|B) mucus" -> ["A) adipose", "B) mucus"] (None when not given)."""
    if not text:
        return None
    return [o.strip() for o in text.split("|") if o.strip()]


def first_turn(question, options):
    """The message list of a new conversation: system prompt + the user turn holding the image."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": format_question(question, options)}]


def render(tokenizer, model, messages):
    return tokenizer.render_chat(messages, model.n_image_tokens, add_generation_prompt=True)[0]


def room(model, prompt_ids):
    """How many tokens can still be generated after this prompt."""
    return model.config.lm.max_seq_len - len(prompt_ids)


@torch.no_grad()
def generate(model, tokenizer, prompts, images_u8, args, generator, on_token=None):
    """Left-padded batch of prompts (one image each) -> list of reply texts, up to the first end marker.
    on_token(tok (B,), alive (B,)) is called after every decoding step (streaming)."""
    device = args.device
    budget = min(args.max_new_tokens, min(room(model, p) for p in prompts))
    ids, mask = pad_sequences(prompts, tokenizer.pad_id, side="left")  # (B, T), (B, T)
    pixels = to_float(images_u8).to(device)  # (B, 3, S, S)
    with autocast(device):
        out = model.generate(ids.to(device), pixels, mask.to(device), max_new_tokens=budget,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             stop_ids=(tokenizer.im_end_id, tokenizer.eos_id), pad_id=tokenizer.pad_id,
                             generator=generator, on_token=on_token)
    stops = {tokenizer.im_end_id, tokenizer.eos_id}
    replies = []
    for row_ids, row_mask in zip(out.ids.cpu(), out.mask.cpu()):  # (N,), (N,)
        toks = [t for t in row_ids[row_mask].tolist() if t not in stops]
        replies.append(tokenizer.decode(toks, skip_special=False).strip())
    return replies


def parse_status(reply):
    """ok: strict <think>..</think><answer>..</answer>; answer-only: an answer block; none: no answer."""
    if format_reward(reply) == 1.0:
        return "ok"
    return "answer-only" if extract_answer(reply) is not None else "none"


def thinking_part(reply):
    """The text inside the first <think>..</think> (up to <answer> or the end when unclosed); None if absent."""
    start = reply.find(THINK_OPEN)
    if start < 0:
        return None
    start += len(THINK_OPEN)
    ends = [i for i in (reply.find(THINK_CLOSE, start), reply.find(ANSWER_OPEN, start)) if i >= 0]
    return reply[start:min(ends, default=len(reply))].strip()


def style(text, code):
    """ANSI style for a terminal: 2 = dim, 1 = bold, 0 = plain."""
    return f"\033[{code}m{text}\033[0m" if code else text


def print_reply(reply):
    """thinking: / answer: / parse: lines; the raw reply too when it does not parse cleanly."""
    thinking, answer, status = thinking_part(reply), extract_answer(reply), parse_status(reply)
    print(f"thinking: {thinking if thinking is not None else '-'}")
    print(f"answer: {answer if answer is not None else '-'}")
    print(f"parse: {status}")
    if status != "ok":
        print(f"raw: {reply if reply else '(empty reply)'}")


class Streamer:
    """Prints row 0 of a generation as it happens: the <think> part dim, the <answer> part bold.

    Byte-level BPE can split a character over tokens, so the whole reply is decoded again at each
    step and only the new, complete characters are printed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""
        self.stops = {tokenizer.im_end_id, tokenizer.eos_id}

    def __call__(self, tok, alive):
        token = int(tok[0])
        if not bool(alive[0]) or token in self.stops:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special=False)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return  # half a character, or a re-segmentation: wait for the next token
        new, self.shown = text[len(self.shown):], text
        in_think = text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE)
        in_answer = text.rfind(ANSWER_OPEN) > text.rfind("</answer>")
        print(style(new, 2 if in_think else 1 if in_answer else 0), end="", flush=True)

    def finish(self, reply):
        print()
        print(f"parse: {parse_status(reply)}")


def flat(text, width):
    """One table cell: whitespace squeezed, cut to width."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def print_table(paths, replies):
    """One row per image: image, parse status, the extracted answer (or the raw reply when there is none)."""
    names = [os.path.basename(p) for p in paths]
    w = max(len("image"), *map(len, names))
    print(f"{'image':<{w}}  {'parse':<11}  answer")
    for name, reply in zip(names, replies):
        answer = extract_answer(reply)
        cell = answer if answer is not None else f"(raw) {reply}" if reply else "(empty reply)"
        print(f"{name:<{w}}  {parse_status(reply):<11}  {flat(cell, 100)}")


# -----------------------------------------------------------------------------
# the three modes


def ask_once(model, tokenizer, paths, images_u8, args, generator):
    """One question about one image (reply shown in full) or about several (a table)."""
    prompt = render(tokenizer, model, first_turn(args.question, parse_options(args.options)))
    if room(model, prompt) < 1:
        raise CLIError(f"the prompt is {len(prompt)} tokens, the model's context is {model.config.lm.max_seq_len}")
    if len(paths) == 1 and sys.stdout.isatty():
        streamer = Streamer(tokenizer)
        streamer.finish(generate(model, tokenizer, [prompt], images_u8, args, generator, on_token=streamer)[0])
        return
    replies = []
    for i in range(0, len(paths), args.batch_size):
        batch = images_u8[i:i + args.batch_size]
        replies += generate(model, tokenizer, [prompt] * len(batch), batch, args, generator)
    if len(paths) == 1:
        print_reply(replies[0])
    else:
        print_table(paths, replies)


def chat(model, tokenizer, image_u8, args, generator):
    """Questions from stdin, one per line, about one image; earlier turns stay in the context.

    A turn needs room for --max_new_tokens after its prompt; when the history leaves less, the
    conversation restarts (same image) from the current question. EOF or "exit" / "quit" ends."""
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    messages, options = [], parse_options(args.options)
    max_len = model.config.lm.max_seq_len
    print("ask about the image; an empty line is skipped, 'exit' or EOF quits")
    while True:
        if tty:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        question = line.strip()
        if not line or question in ("exit", "quit"):
            return
        if not question:
            continue
        if messages:
            turn = messages + [{"role": "user", "content": question}]
        else:
            turn = first_turn(question, options)
        prompt = render(tokenizer, model, turn)
        if messages and room(model, prompt) < args.max_new_tokens:
            print(f"context full: {len(prompt)} prompt tokens + {args.max_new_tokens} new tokens > max_seq_len "
                  f"{max_len}; starting a new conversation about the same image")
            turn = first_turn(question, options)
            prompt = render(tokenizer, model, turn)
        if room(model, prompt) < 1:
            raise CLIError(f"the question alone fills the model's context ({len(prompt)} >= {max_len} tokens)")
        if tty:
            streamer = Streamer(tokenizer)
            reply = generate(model, tokenizer, [prompt], image_u8, args, generator, on_token=streamer)[0]
            streamer.finish(reply)
        else:
            reply = generate(model, tokenizer, [prompt], image_u8, args, generator)[0]
            print_reply(reply)
        messages = turn + [{"role": "assistant", "content": reply}]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Ask a nanopatho VLM checkpoint about pathology images.")
    p.add_argument("--ckpt", required=True, help="VLM checkpoint directory (pretrain, SFT or RL output)")
    p.add_argument("--image", required=True, nargs="+", help="image file(s) or folder(s); any mode and size")
    p.add_argument("--question", default=None, help="the question (needed unless --interactive)")
    p.add_argument("--options", default=None, help='multiple-choice options, "|"-separated: "A) adipose|B) mucus"')
    p.add_argument("--interactive", action="store_true", help="chat about one image, questions read from stdin")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (with temperature > 0)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens (temperature > 0)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="reply length budget in tokens")
    p.add_argument("--batch_size", type=int, default=16, help="images per generation batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1, mps")
    args = p.parse_args(argv)
    check_device(p, args.device)
    if args.interactive == (args.question is not None):
        p.error("give exactly one of --question and --interactive")
    if args.temperature < 0 or args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--temperature must be >= 0, --max_new_tokens and --batch_size >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    paths = image_paths(args.image)
    if args.interactive and len(paths) != 1:
        raise CLIError(f"--interactive chats about one image, got {len(paths)}")
    model, _, tokenizer = load_model(args.ckpt, args.device, "vlm")
    images_u8 = load_images(paths, model.config.vision.image_size)  # (N, 3, S, S)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.interactive:
        chat(model, tokenizer, images_u8, args, generator)
    else:
        ask_once(model, tokenizer, paths, images_u8, args, generator)


if __name__ == "__main__":
    run_cli(main)
