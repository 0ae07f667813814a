"""Global-token normalisation of the stage 1/2 loop: k micro-batches of unequal token
counts give exactly the gradient of one big batch (and per-micro-batch averaging would not)."""

import torch

from nanopatho.next_token import Examples, accumulate_gradients, batch_loss_sum, make_batch
from nanopatho.presets import vlm_config
from nanopatho.vlm import VLM

VOCAB, IMAGE_ID, PAD = 64, 5, 0


def tiny_model():
    torch.manual_seed(0)
    cfg = vlm_config("toy", VOCAB, IMAGE_ID)
    cfg.lm.n_layer, cfg.vision.n_layer, cfg.vision.image_size = 1, 1, 32
    return VLM(cfg)


def examples(model, n_rows=8):
    g = torch.Generator().manual_seed(1)
    seqs, image_index = [], []
    for i in range(n_rows):
        n_text = 3 + 4 * i  # very unequal lengths
        text = torch.randint(10, VOCAB, (n_text,), generator=g).tolist()
        if i % 2 == 0:  # image rows: bos, image tokens (never targets), text
            ids = [1] + [IMAGE_ID] * model.n_image_tokens + text
            mask = [0] * (1 + model.n_image_tokens) + [1] * n_text
            image_index.append(i // 2)
        else:
            ids, mask = [1] + text, [0] + [1] * n_text
            image_index.append(-1)
        seqs.append((ids, mask))
    images = torch.randint(0, 256, (n_rows // 2, 3, 32, 32), dtype=torch.uint8, generator=g)
    return Examples(seqs, image_index, images)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_micro_batches_equal_one_full_batch():
    model = tiny_model()
    data = examples(model)
    full = make_batch(data, list(range(8)), PAD, None, False, "cpu")
    _, loss = model(full["input_ids"], full["pixel_values"], attention_mask=full["attention_mask"],
                    targets=full["targets"], loss_mask=full["loss_mask"], reduction="mean")
    loss.backward()
    g_full = grads(model)
    model.zero_grad()

    micro = [make_batch(data, rows, PAD, None, False, "cpu") for rows in ([0], [1, 2], [3, 4, 5], [6, 7])]
    step_loss, n_tokens = accumulate_gradients(model, micro, "cpu")
    assert n_tokens == sum(int(b["loss_mask"].sum()) for b in micro)
    assert abs(step_loss - loss.item()) < 1e-5
    torch.testing.assert_close(grads(model), g_full, rtol=1e-4, atol=1e-6)

    # the pitfall this guards against: averaging each micro-batch, then over micro-batches
    model.zero_grad()
    for b in micro:
        s, n = batch_loss_sum(model, b)
        (s / n / len(micro)).backward()
    assert not torch.allclose(grads(model), g_full, rtol=1e-3, atol=1e-5)


def test_packed_batch_gives_the_unpacked_loss_and_gradient():
    """Packing rows end to end (block-diagonal attention, positions restarting per row, images put in the
    packed reading order after augmentation) is the same computation as one padded row each."""
    model = tiny_model()
    data = examples(model)
    rows = [0, 7, 4, 3, 1, 2]  # image rows 0, 4, 2 (short to long), text rows; packed longest first
    out = {}
    for pack in (False, True):
        batch = make_batch(data, rows, PAD, torch.Generator().manual_seed(3), True, "cpu", pack=pack)
        s, n = batch_loss_sum(model, batch)
        s.backward()
        out[pack] = (batch, s.item(), int(n), grads(model))
        model.zero_grad()
    (padded, s0, n0, g0), (packed, s1, n1, g1) = out[False], out[True]
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows...
    assert packed["input_ids"].shape[1] <= padded["input_ids"].shape[1]  # ...none longer than the longest
    assert int((packed["attention_mask"] > 0).sum()) == int((padded["attention_mask"] > 0).sum())
    assert n1 == n0 and abs(s1 - s0) < 1e-4 * abs(s0)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    # the images travel with their rows: with the images in row order instead, the loss changes
    shuffled = dict(packed, pixel_values=padded["pixel_values"])
    assert abs(batch_loss_sum(model, shuffled)[0].item() - s0) > 1e-3


def test_image_positions_and_padding_are_never_targets():
    model = tiny_model()
    data = examples(model)
    batch = make_batch(data, [0, 1], PAD, None, False, "cpu")
    counted = batch["loss_mask"].bool() & (batch["targets"] >= 0)  # (B, T)
    assert not (batch["targets"][counted] == IMAGE_ID).any()
    assert counted.sum() == sum(sum(m[1:]) for _, m in (data.seqs[0], data.seqs[1]))


def test_tiny_model_overfits_one_conversation_and_reproduces_it_greedily():
    from nanopatho.tokenizer import Tokenizer

    tok = Tokenizer.train(["<think>crowded large nuclei, poor glands</think><answer>high grade</answer>"] * 10, 300)
    torch.manual_seed(0)
    cfg = vlm_config("toy", tok.vocab_size, tok.image_id)
    cfg.lm.n_layer, cfg.vision.n_layer, cfg.vision.image_size = 2, 1, 32
    model = VLM(cfg)
    reply = "<think>crowded large nuclei, poor glands</think><answer>high grade</answer>"
    messages = [{"role": "user", "content": "<image>\nWhat grade?"}, {"role": "assistant", "content": reply}]
    ids, mask = tok.render_chat(messages, model.n_image_tokens)
    data = Examples([(ids, mask)], [0], torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8,
                                                       generator=torch.Generator().manual_seed(0)))
    batch = make_batch(data, [0], tok.pad_id, None, False, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss_sum, n = batch_loss_sum(model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    assert (loss_sum / n).item() < 0.05
    prompt = tok.render_chat(messages[:1], model.n_image_tokens, add_generation_prompt=True)[0]
    out = model.generate(torch.tensor([prompt]), batch["pixel_values"], max_new_tokens=40, temperature=0.0,
                         stop_ids=(tok.im_end_id,), pad_id=tok.pad_id)
    generated = out.ids[0][out.mask[0]].tolist()
    assert generated == tok.encode(reply) + [tok.im_end_id]


def test_mix_text_reaches_the_ratio_by_repeating_or_subsampling():
    from nanopatho.next_token import Examples, mix_text
    base = Examples([([1, 2], [0, 1])] * 80, [0] * 80, None)
    few = [([i], [1]) for i in range(5)]
    mixed = mix_text(base, few, 0.2)  # 20 wanted: the 5 rows 4 times
    assert len(mixed) == 100 and mixed.image_index[80:] == [-1] * 20 and mixed.seqs[80:85] == few
    many = [([i], [1]) for i in range(200)]
    assert len(mix_text(base, many, 0.2)) == 280  # default: every row at least once (the textbook convention)
    mixed = mix_text(base, many, 0.2, subsample=True)  # 20 wanted of 200: every 10th row
    assert [s[0][0] for s in mixed.seqs[80:]] == list(range(0, 200, 10))
    assert mix_text(base, many, 0.0) is base and mix_text(base, [], 0.5) is base
