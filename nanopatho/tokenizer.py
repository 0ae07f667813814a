"""Byte-level BPE tokenizer, its special tokens, and the chat template with loss masks.

The BPE itself is HF `tokenizers` (fast, battle-tested); this file adds what nanopatho needs
on top: named special-token ids, the "<image>" placeholder and a ChatML chat template.

    from nanopatho.tokenizer import Tokenizer
    tok = Tokenizer.train(texts, vocab_size=4096)        # captions + textbook + SFT text
    tok.save("tokenizer.json")
    tok = Tokenizer.from_file("tokenizer.json")          # ours, or a Qwen2 tokenizer.json
    ids, loss_mask = tok.render_chat(messages, n_image_tokens=16)
    prompt_ids = tok.render_prompt(format_question("Which tissue?"), n_image_tokens=16)

Chat template (ChatML, the one Qwen2 uses), for every message:

    <|im_start|>{role}\n{content}<|im_end|>\n

loss_mask is 1 on assistant content and on that message's <|im_end|>, 0 everywhere else
(nanochat's convention): the model learns to answer and to stop, never to write the user's
turn. Every "<image>" in a message becomes n_image_tokens copies of the image token; the VLM
later replaces those positions with projected vision features.

Loading a foreign tokenizer.json (e.g. Qwen2) maps our special tokens to the ones it has:
pad/bos/eos -> <|endoftext|> (bos: <|startoftext|> / <|begin_of_text|> / <s> first, eos:
<|end_of_text|> / </s> first), image -> <|image_pad|> or <|vision_pad|>, and <|im_start|> /
<|im_end|> by name. If pad, bos, eos, <|im_start|> or <|im_end|> cannot be found, loading fails
with an error naming the token: we never silently change the vocabulary a model was trained
with. Only the image, <think>, </think>, <answer>, </answer> tokens may be appended as new
special tokens (with a printed note), because a VLM / reasoning fine-tune has to learn them
anyway. Importing a released model (nanopatho/hf_import.py) passes `addable=ALL_ADDABLE`: it
may append the chat markers too, because it also grows the model's embedding for them.
"""

import re

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanopatho.data import DataError
from nanopatho.prompts import SYSTEM_PROMPT

SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "image": "<|image|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "think": "<think>",
    "think_end": "</think>",
    "answer": "<answer>",
    "answer_end": "</answer>",
}
IMAGE_PLACEHOLDER = "<image>"  # what datasets write in the user turn (LLaVA / ShareGPT convention)
ROLES = ("system", "user", "assistant")
# names other tokenizers (Qwen2 / Qwen2-VL) use for the same roles, tried after our own name
ALIASES = {"pad": ("<|endoftext|>", "<|end_of_text|>", "</s>"),
           "bos": ("<|startoftext|>", "<|begin_of_text|>", "<s>", "<|endoftext|>"),
           "eos": ("<|end_of_text|>", "</s>", "<|endoftext|>"),
           "image": ("<|image_pad|>", "<|vision_pad|>")}
# the only specials that loading may append to a foreign vocabulary
ADDABLE = ("image", "think", "think_end", "answer", "answer_end")
# what importing a released model may append (it extends the embedding for them)
ALL_ADDABLE = ADDABLE + ("im_start", "im_end")

_STRIP_FROM_TRAINING = re.compile("|".join(re.escape(t) for t in [*SPECIAL_TOKENS.values(), IMAGE_PLACEHOLDER]))


class Tokenizer:
    """A HF `tokenizers.Tokenizer` plus named special ids and the chat template."""

    def __init__(self, hf_tokenizer, special_ids):
        self.hf = hf_tokenizer
        self.special_ids = dict(special_ids)  # name -> id, every name in SPECIAL_TOKENS
        for name, idx in self.special_ids.items():
            setattr(self, f"{name}_id", idx)  # .pad_id .bos_id ... .answer_end_id

    # ----------------------------------------------------------------------------------------
    # building and loading

    @classmethod
    def train(cls, texts, vocab_size):
        """Train a byte-level BPE on an iterable of strings; specials get ids 0..9."""
        n_base = 256 + len(SPECIAL_TOKENS)
        assert vocab_size >= n_base, f"vocab_size must be >= {n_base} (256 bytes + specials), got {vocab_size}"
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
            show_progress=False,
        )
        # no merges are wasted on the markup: special strings are single ids anyway
        hf.train_from_iterator((_STRIP_FROM_TRAINING.sub(" ", t) for t in texts), trainer)
        return cls._from_hf(hf, "trained tokenizer")

    @classmethod
    def from_file(cls, path, addable=ADDABLE):
        return cls._from_hf(HFTokenizer.from_file(str(path)), str(path), addable)

    @classmethod
    def _from_hf(cls, hf, origin, addable=ADDABLE):
        vocab = hf.get_vocab(with_added_tokens=True)
        added = {t.content for t in hf.get_added_tokens_decoder().values()}
        special_ids = {}
        for name, token in SPECIAL_TOKENS.items():
            found = next((t for t in (token, *ALIASES.get(name, ())) if t in vocab), None)
            if found is None:
                if name not in addable:
                    names = " or ".join(repr(t) for t in (token, *ALIASES.get(name, ())))
                    raise DataError(f"{origin}: tokenizer has no {name} token ({names}); refusing to change its vocabulary")
                hf.add_special_tokens([token])
                print(f"note: {origin}: added special token {token!r} as id {hf.token_to_id(token)} (not in the file)")
                found = token
            elif found not in added:  # an ordinary vocab entry: make it atomic, keeping its id
                hf.add_special_tokens([found])
            special_ids[name] = hf.token_to_id(found)
        return cls(hf, special_ids)

    def save(self, path):
        self.hf.save(str(path))

    # ----------------------------------------------------------------------------------------
    # text <-> ids

    @property
    def vocab_size(self):
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        """Text -> ids; no bos/eos added; special-token strings map to their single id."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=False):
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token):
        return self.hf.token_to_id(token)

    # ----------------------------------------------------------------------------------------
    # chat template

    def _encode_content(self, content, n_image_tokens):
        """Message text -> ids, each "<image>" expanded to n_image_tokens image ids."""
        first, *rest = content.split(IMAGE_PLACEHOLDER)
        ids = self.encode(first)
        for piece in rest:
            ids += [self.image_id] * n_image_tokens + self.encode(piece)
        return ids

    def render_chat(self, messages, n_image_tokens, add_generation_prompt=False):
        """[{"role", "content"}] -> (ids, loss_mask); mask 1 only on assistant content + its <|im_end|>."""
        ids, loss_mask = [], []
        for message in messages:
            role, content = message["role"], message["content"]
            assert role in ROLES, f"unknown role {role!r}, expected one of {ROLES}"
            head = [self.im_start_id] + self.encode(f"{role}\n")  # <|im_start|>{role}\n
            body = self._encode_content(content, n_image_tokens) + [self.im_end_id]  # {content}<|im_end|>
            tail = self.encode("\n")
            trained = int(role == "assistant")
            ids += head + body + tail
            loss_mask += [0] * len(head) + [trained] * len(body) + [0] * len(tail)
        if add_generation_prompt:
            prompt = [self.im_start_id] + self.encode("assistant\n")
            ids += prompt
            loss_mask += [0] * len(prompt)
        return ids, loss_mask

    def render_prompt(self, question_text, n_image_tokens, system=SYSTEM_PROMPT):
        """System turn (if any) + user turn + "<|im_start|>assistant\\n": what generation starts from."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question_text})
        return self.render_chat(messages, n_image_tokens, add_generation_prompt=True)[0]
