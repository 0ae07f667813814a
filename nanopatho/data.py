"""Data: manifests in the ecosystem's formats -> one internal form; images -> tensors; collators.

    from nanopatho.data import load_pairs, load_conversations, load_records, preload_images, augment
    pairs, n_bad = load_pairs("data/synthpath/captions_train.jsonl", skip_bad=True)
    images_u8, pairs, n_bad_img = preload_images(pairs, size=64)       # (N, 3, 64, 64) uint8
    x = augment(images_u8[:32], generator)                              # (32, 3, 64, 64) float32

Formats read:
- image-text pairs: JSONL {"image", "caption"}; CSV/TSV with open_clip's columns
  (`filepath`, `title`; .csv uses csv_sep, .tsv is always tab-separated); WebDataset tar
  shards ({key}.jpg|png + {key}.txt|json, read with the standard library's tarfile), a single
  .tar, a directory of .tar, or a list of .tar;
- conversations: ShareGPT / LLaMA-Factory {"messages": [{"role", "content"}], "images": [...]}
  and LLaVA {"image", "conversations": [{"from": "human"|"gpt", "value"}]}, as .jsonl or .json;
- records (MCQ / VQA / RL / zero-shot items): any JSON objects with required keys.
Internal items are dicts; image paths are absolute; every item carries "source": "file:line"
(for tar shards "shard.tar:key", for .json arrays "file.json:[index]").

Bad input never gives a bare traceback: it raises DataError with one line "file:line: what",
e.g. `captions_train.jsonl:17: image 'ab12.png' not found`. Manifest loaders check JSON,
keys, empty text, image existence and that image paths stay inside the data root (default:
the manifest's directory; allow_outside_root=True lifts that). Image decoding (zero-byte,
truncated, non-image, decompression-bomb-sized) is checked in load_image / preload_images.
With skip_bad=True a bad sample is skipped and counted instead; whole-file problems (missing
manifest, missing CSV column, unreadable tar) always raise. Files exported by Windows tools load:
a UTF-8 byte-order mark at the start of a JSONL / JSON / CSV file is dropped, and CRLF line ends
are whitespace. nanopatho/stream.py reads the same formats sample by sample (--stream).
"""

import csv
import io
import json
import os
import posixpath
import sys
import tarfile
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

# OpenAI CLIP's normalisation, also used by PLIP / CONCH / QuiltNet
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels (8192 x 8192): larger images are refused as decompression bombs
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")
ROLE_NAMES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
N_SKIP_MESSAGES = 5  # skip_bad prints the first few reasons so a user sees what is wrong
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Windows tools write at the start of a text file


class DataError(ValueError):
    """Bad input; the message is one line, "file:line: what"."""


# ---------------------------------------------------------------------------------------------
# reading manifests


def _skip_or_raise(rows, parse, skip_bad):
    """Apply parse(source, row) to every row; DataError -> raise, or skip and count."""
    items, n_skipped = [], 0
    for source, row in rows:
        try:
            items.append(parse(source, row))
        except DataError as e:
            if not skip_bad:
                raise
            n_skipped += 1
            if n_skipped <= N_SKIP_MESSAGES:
                print(f"skipping bad sample: {e}", file=sys.stderr)
    return items, n_skipped


def check_file(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")


def _json_rows(path):
    """(source, raw) for a .jsonl (raw = the line's bytes) or a .json array (raw = the object)."""
    check_file(path)
    if str(path).endswith(".json"):
        try:
            with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is dropped
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: malformed JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects")
        yield from ((f"{path}:[{i}]", obj) for i, obj in enumerate(data))
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.removeprefix(BOM) if lineno == 1 else line
            if line.strip():
                yield f"{path}:{lineno}", line


def _json_object(source, raw):
    """A JSONL line (bytes) or an already-parsed object -> dict, or DataError."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{source}: line is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _text(source, obj, key):
    """obj[key] as a non-empty string."""
    if obj.get(key) is None:
        raise DataError(f"{source}: missing key '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{source}: '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{source}: empty text in '{key}'")
    return value


def data_root(path, root):
    """The directory manifest image paths are relative to (default: the manifest's own)."""
    if root is None:
        root = os.path.dirname(os.path.abspath(path))
    return os.path.abspath(root)


def _image_path(source, rel, root, allow_outside_root):
    """A manifest's image path -> absolute path inside root that exists, or DataError."""
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"{source}: empty image path")
    full = os.path.normpath(os.path.join(root, rel))
    if not allow_outside_root and os.path.commonpath([root, full]) != root:
        raise DataError(f"{source}: image path '{rel}' escapes the data root {root} (allow_outside_root=True permits it)")
    if not os.path.isfile(full):
        raise DataError(f"{source}: image '{rel}' not found")
    return full


# ---------------------------------------------------------------------------------------------
# image-text pairs: JSONL, CSV/TSV, WebDataset tar shards


def _csv_rows(path, img_key, caption_key, sep):
    check_file(path)
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is dropped
        reader = csv.DictReader(f, delimiter=sep)
        try:
            columns = reader.fieldnames or []
            for key in (img_key, caption_key):
                if key not in columns:
                    raise DataError(f"{path}:1: missing column '{key}' (columns: {columns}; separator {sep!r})")
            for row in reader:
                yield f"{path}:{reader.line_num}", {"image": row[img_key], "caption": row[caption_key]}
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}:{reader.line_num + 1}: unreadable CSV ({str(e).splitlines()[0]})") from None


def _tar_rows(path):
    """(source "shard.tar:key", {extension: bytes}) per WebDataset sample, in shard order."""
    check_file(path)
    samples = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, base = posixpath.split(member.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)  # WebDataset: the key ends at the first dot
                key = posixpath.join(directory, stem)
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable tar shard ({str(e).splitlines()[0]})") from None
    yield from ((f"{path}:{key}", parts) for key, parts in samples.items())


def tar_pair(source, parts):
    """One WebDataset sample {extension: bytes} -> {"image": bytes, "caption", "source"}, or DataError."""
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if image is None:
        raise DataError(f"{source}: missing image (.jpg/.png) for this key")
    if "txt" in parts:
        try:
            text = {"caption": parts["txt"].decode("utf-8")}
        except UnicodeDecodeError:
            raise DataError(f"{source}: .txt is not valid UTF-8") from None
    elif "json" in parts:  # img2dataset-style metadata: {"caption": ...} (or "text")
        meta = _json_object(source, parts["json"])
        text = {"caption": meta.get("caption", meta.get("text"))}
    else:
        raise DataError(f"{source}: missing caption (.txt or .json) for this key")
    return {"image": image, "caption": _text(source, text, "caption").strip(), "source": source}


def shards(path):
    """A directory, a .tar, or a list/tuple of .tar -> list of shard paths."""
    if isinstance(path, (list, tuple)):
        return [os.fspath(p) for p in path]
    if os.path.isdir(path):
        shards = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".tar"))
        if not shards:
            raise DataError(f"{path}: no .tar shards in this directory")
        return shards
    return [path]


def json_pair(source, raw, root, allow_outside_root):
    """A JSONL line / JSON object / CSV row dict -> {"image": abs path, "caption", "source"}, or DataError."""
    obj = _json_object(source, raw)
    caption = _text(source, obj, "caption").strip()
    if obj.get("image") is None:
        raise DataError(f"{source}: missing key 'image'")
    return {"image": _image_path(source, obj["image"], root, allow_outside_root), "caption": caption, "source": source}


def is_tar(path):
    return isinstance(path, (list, tuple)) or os.path.isdir(path) or str(path).endswith(".tar")


def load_pairs(path, *, root=None, skip_bad=False, allow_outside_root=False,
               csv_img_key="filepath", csv_caption_key="title", csv_sep=","):
    """Image-text pairs -> ([{"image": abs path | bytes, "caption", "source"}], n_skipped)."""
    if is_tar(path):
        items, n_skipped = [], 0
        for shard in shards(path):
            shard_items, shard_skipped = _skip_or_raise(_tar_rows(shard), tar_pair, skip_bad)
            items += shard_items
            n_skipped += shard_skipped
        return items, n_skipped
    path = os.fspath(path)
    root = data_root(path, root)
    if path.endswith((".csv", ".tsv")):
        sep = "\t" if path.endswith(".tsv") else csv_sep
        rows = _csv_rows(path, csv_img_key, csv_caption_key, sep)
    elif path.endswith((".jsonl", ".json")):
        rows = _json_rows(path)
    else:
        raise DataError(f"{path}: unsupported pairs format (use .jsonl, .json, .csv, .tsv, .tar or a directory of .tar)")
    return _skip_or_raise(rows, lambda source, raw: json_pair(source, raw, root, allow_outside_root), skip_bad)


# ---------------------------------------------------------------------------------------------
# conversations (ShareGPT / LLaMA-Factory and LLaVA) and generic records


def _conversation(source, obj, root, allow_outside_root):
    if "messages" in obj:
        turns = obj["messages"]
    elif "conversations" in obj:
        turns = obj["conversations"]
    else:
        raise DataError(f"{source}: missing key 'messages' (ShareGPT) or 'conversations' (LLaVA)")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: conversation must be a non-empty list of turns")
    messages = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():  # LLaMA-Factory's top-level system
        messages.append({"role": "system", "content": obj["system"]})
    for i, turn in enumerate(turns):
        where = f"{source}: turn {i}"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: expected an object")
        role = turn.get("role", turn.get("from"))
        if role not in ROLE_NAMES:
            raise DataError(f"{where}: unknown role {role!r} (expected one of {sorted(ROLE_NAMES)})")
        content_key = "content" if "content" in turn else "value"
        messages.append({"role": ROLE_NAMES[role], "content": _text(where, turn, content_key)})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{source}: conversation has no assistant turn")
    images = obj.get("images", obj.get("image"))
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise DataError(f"{source}: 'images' must be a path or a list of paths")
    n_placeholders = sum(m["content"].count("<image>") for m in messages)
    if n_placeholders != len(images):
        raise DataError(f"{source}: {n_placeholders} '<image>' placeholders but {len(images)} images")
    images = [_image_path(source, p, root, allow_outside_root) for p in images]
    return {"messages": messages, "images": images, "source": source}


def conversation(source, raw, root, allow_outside_root):
    """A JSONL line or JSON object -> {"messages", "images": [abs paths], "source"}, or DataError."""
    return _conversation(source, _json_object(source, raw), root, allow_outside_root)


def load_conversations(path, *, root=None, skip_bad=False, allow_outside_root=False):
    """Conversations -> ([{"messages": [{"role", "content"}], "images": [abs paths], "source"}], n_skipped)."""
    path = os.fspath(path)
    root = data_root(path, root)
    return _skip_or_raise(_json_rows(path), lambda source, raw: conversation(source, raw, root, allow_outside_root),
                          skip_bad)


def record(source, raw, required, root, allow_outside_root, image_key="image"):
    """A JSONL line or JSON object with the required keys -> dict with obj[image_key] absolute + "source"."""
    obj = dict(_json_object(source, raw))
    for key in required:
        if obj.get(key) is None:
            raise DataError(f"{source}: missing key '{key}'")
        if isinstance(obj[key], str):
            _text(source, obj, key)
    image = obj.get(image_key)
    if isinstance(image, list):
        obj[image_key] = [_image_path(source, p, root, allow_outside_root) for p in image]
    elif image is not None:
        obj[image_key] = _image_path(source, image, root, allow_outside_root)
    obj["source"] = source
    return obj


def load_records(path, required, *, root=None, skip_bad=False, allow_outside_root=False, image_key="image"):
    """JSON objects with the required keys (non-empty if text); obj[image_key] made absolute; + "source"."""
    path = os.fspath(path)
    root = data_root(path, root)
    return _skip_or_raise(_json_rows(path), lambda source, raw: record(source, raw, required, root, allow_outside_root,
                                                                       image_key), skip_bad)


# ---------------------------------------------------------------------------------------------
# images


def _to_rgb(img):
    """Any PIL mode -> RGB. Transparency is composited on white (the slide background)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: rescale, PIL would clip at 255
        values = np.asarray(img, dtype=np.float64)
        full_scale = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(np.round(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


def load_image(image, source, max_pixels=MAX_IMAGE_PIXELS):
    """A path or encoded bytes -> PIL RGB image; any problem -> DataError naming source."""
    image = os.fspath(image) if isinstance(image, os.PathLike) else image
    name = f"image '{image}'" if isinstance(image, str) else "image data"
    if isinstance(image, str):
        if not os.path.isfile(image):
            raise DataError(f"{source}: {name} not found")
        if os.path.getsize(image) == 0:
            raise DataError(f"{source}: {name} is empty (0 bytes)")
        fp = image
    else:
        if len(image) == 0:
            raise DataError(f"{source}: {name} is empty (0 bytes)")
        fp = io.BytesIO(image)
    too_large = f"{source}: {name} is too large (decompression-bomb guard: more than {max_pixels} pixels)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                if img.size[0] * img.size[1] > max_pixels:  # checked on the header, before decoding
                    raise DataError(too_large)
                img.load()
                return _to_rgb(img)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(too_large) from None
    except UnidentifiedImageError:
        raise DataError(f"{source}: {name} is not a readable image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{source}: {name} is truncated or corrupt ({str(e).splitlines()[0]})") from None


def resize_center_crop(img, size):
    """Resize so the shorter side is `size` (bicubic), then crop the centre size x size."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_tensor(image, source, size, max_pixels=MAX_IMAGE_PIXELS):
    """A path or bytes -> uint8 tensor (3, size, size)."""
    img = resize_center_crop(load_image(image, source, max_pixels), size)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


def _single_image(item, key):
    image = item.get(key)
    if isinstance(image, list):
        if len(image) != 1:
            raise DataError(f"{item.get('source', '?')}: {len(image)} images under '{key}'; preload_images takes one per item")
        image = image[0]
    if image is None:
        raise DataError(f"{item.get('source', '?')}: missing key '{key}'")
    return image


def preload_images(items, size, *, key="image", skip_bad=False, desc="images", max_pixels=MAX_IMAGE_PIXELS):
    """Decode every item's image once -> (uint8 (N, 3, size, size), kept_items, n_skipped)."""
    out = torch.empty((len(items), 3, size, size), dtype=torch.uint8)  # (N, 3, S, S)
    kept, n_skipped, row_of_path = [], 0, {}
    for item in tqdm(items, desc=desc, disable=int(os.environ.get("RANK", "0")) != 0):
        try:
            image = _single_image(item, key)
            if isinstance(image, str) and image in row_of_path:  # several captions share one image
                out[len(kept)] = out[row_of_path[image]]
            else:
                out[len(kept)] = image_tensor(image, item.get("source", "?"), size, max_pixels)
                if isinstance(image, str):
                    row_of_path[image] = len(kept)
        except DataError as e:
            if not skip_bad:
                raise
            n_skipped += 1
            if n_skipped <= N_SKIP_MESSAGES:
                print(f"skipping bad image: {e}", file=sys.stderr)
            continue
        kept.append(item)
    return (out[: len(kept)].clone() if n_skipped else out), kept, n_skipped


def to_float(images_u8):
    """uint8 (B, 3, H, W) -> normalised float32 (B, 3, H, W): (x / 255 - mean) / std."""
    mean = torch.tensor(IMAGE_MEAN, device=images_u8.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images_u8.device).view(3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


# Ruifrok & Johnston (2001) stain optical-density vectors (rows: haematoxylin, eosin, DAB; columns R, G, B)
_STAIN_OD = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_STAIN_OD = (_STAIN_OD / _STAIN_OD.norm(dim=1, keepdim=True)).float()


def stain_jitter(x, alpha, beta):
    """HED stain jitter (Tellez et al. 2018) on x in [0, 1], (B, 3, H, W).

    Optical density OD = -ln(I) with I = (255 x + 1) / 256 (never 0); stain concentrations
    C = OD M^-1 (M = stain vectors); C' = alpha C + beta per image and stain; back with
    I' = exp(-C' M). alpha = 1, beta = 0 is the identity.
    """
    M = _STAIN_OD.to(x.device)
    od = -torch.log((x * 255.0 + 1.0) / 256.0)  # (B, 3, H, W)
    conc = torch.einsum("bchw,cs->bshw", od, torch.linalg.inv(M))  # (B, 3 stains, H, W)
    conc = conc * alpha.view(-1, 3, 1, 1) + beta.view(-1, 3, 1, 1)
    od = torch.einsum("bshw,sc->bchw", conc, M)  # (B, 3, H, W)
    return ((torch.exp(-od) * 256.0 - 1.0) / 255.0).clamp(0.0, 1.0)


def augment(images_u8, generator, *, stain_scale=0.05, stain_shift=0.02):
    """Train-time augmentation -> normalised float32 (B, 3, H, W).

    Per image: horizontal / vertical flip (p = 0.5 each), a rotation by k * 90 degrees
    (k uniform in 0..3), and mild HED stain jitter: alpha ~ U(1 - stain_scale, 1 + stain_scale),
    beta ~ U(-stain_shift, stain_shift) in optical-density units. Tissue has no up or left,
    so the 8 dihedral symmetries are free data. Deterministic given the generator.
    """
    B, C, H, W = images_u8.shape
    assert C == 3 and H == W, f"augment expects square (B, 3, S, S) images, got {tuple(images_u8.shape)}"
    dev = generator.device
    hflip = torch.rand(B, generator=generator, device=dev) < 0.5
    vflip = torch.rand(B, generator=generator, device=dev) < 0.5
    rot = torch.randint(0, 4, (B,), generator=generator, device=dev)
    alpha = 1.0 + stain_scale * (2.0 * torch.rand(B, 3, generator=generator, device=dev) - 1.0)
    beta = stain_shift * (2.0 * torch.rand(B, 3, generator=generator, device=dev) - 1.0)
    hflip, vflip, rot = hflip.to(images_u8.device), vflip.to(images_u8.device), rot.to(images_u8.device)
    x = images_u8.clone()  # (B, 3, S, S)
    x[hflip] = x[hflip].flip(-1)
    x[vflip] = x[vflip].flip(-2)
    for k in (1, 2, 3):
        x[rot == k] = torch.rot90(x[rot == k], k, dims=(-2, -1))
    x = stain_jitter(x.float() / 255.0, alpha.to(x.device), beta.to(x.device))  # (B, 3, S, S) in [0, 1]
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# collators


def pad_sequences(seqs, pad_value, side="right"):
    """list of id lists -> (LongTensor (B, T), attention_mask LongTensor (B, T), 1 = real token)."""
    assert seqs, "pad_sequences needs at least one sequence"
    assert side in ("right", "left"), f"side must be 'right' or 'left', got {side!r}"
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_value, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def pack_rows(lengths, capacity):
    """First-fit decreasing: row lengths -> bins (lists of row indices) whose lengths sum to <= capacity.
    Longest rows first, each into the first bin with room; a row longer than capacity gets a bin alone."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep their order
        j = next((j for j, r in enumerate(room) if lengths[i] <= r), len(bins))
        if j == len(bins):
            bins.append([])
            room.append(capacity)
        bins[j].append(i)
        room[j] -= lengths[i]
    return bins


def collate_lm(examples, pad_id, pack=False):
    """[(ids, loss_mask)] -> next-token batch, right-padded, each (B, T-1) with T the longest ids.

    input_ids = ids[:-1], targets = ids[1:], loss_mask = mask[1:] (the mask of the token being
    predicted); padded positions get input pad_id, target -1, loss_mask 0, attention 0.

    pack=True puts several examples end to end in one row (pack_rows, rows no longer than the longest
    example, so never more rows or columns than unpacked): attention_mask then holds k = 1, 2, ... for
    the k-th example of its row (0 = pad), which the LM reads as block-diagonal causal attention with
    positions restarting at each example, and "order" (n,) lists the examples in reading order (row by
    row, left to right). Every example's logits, and so the summed loss and its gradient, are those of
    the unpacked batch; only fewer pad tokens are computed.
    """
    for ids, mask in examples:
        assert len(ids) == len(mask) and len(ids) >= 2, "each example needs >= 2 ids and a mask of the same length"
    n = [len(ids) - 1 for ids, _ in examples]  # next-token positions of each example
    bins = pack_rows(n, max(n)) if pack else [[i] for i in range(len(examples))]

    def rows(part):  # part(i) -> a list for example i; each bin's lists joined end to end
        return [[x for i in b for x in part(i)] for b in bins]
    input_ids, _ = pad_sequences(rows(lambda i: examples[i][0][:-1]), pad_id)
    targets, _ = pad_sequences(rows(lambda i: examples[i][0][1:]), -1)
    loss_mask, _ = pad_sequences(rows(lambda i: examples[i][1][1:]), 0)
    segments, _ = pad_sequences([[k + 1 for k, i in enumerate(b) for _ in range(n[i])] for b in bins], 0)
    batch = {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask.float(), "attention_mask": segments}
    if pack:
        batch["order"] = torch.tensor([i for b in bins for i in b], dtype=torch.long)  # (n,)
    return batch
