"""Tests for guide.py (the LD-Align guiding model, Section 4.1). Tiny random GPT-2s, CPU, no hub access."""
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config

from guide import (GuideModel, build_guide, collate_guide, eval_guide, latent_distances, load_guide,
                   save_guide, train_guide)

PAD, EOS = 0, 3


def tiny_config():
    # bos/eos set inside the tiny vocab (transformers 5 warns about the default 50256 otherwise); no dropout so
    # the tiny runs are deterministic and converge fast.
    return GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS,
                      eos_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_guide(seed=0, latent_dim=8):
    torch.manual_seed(seed)
    return build_guide(tiny_config(), latent_dim)


def synthetic_examples():
    """8 prompts x 4 variations. y is a deterministic function of (x, v): given x alone the decoder can only guess
    v (>= log 4 nats on the first token), given h = phi(x, y) it can recover v, so it must use h.
    Ordered so that rolling by 1 always hands a row a latent with a different v."""
    ex = []
    for a in range(8):
        x = [1, 10 + a, 20 + (3 * a) % 8]
        for v in range(4):
            y = [30 + v, 40 + (a + v) % 8, 50 + (a * v) % 8, EOS]
            ex.append((x, y))
    return ex


@pytest.fixture(scope="module")
def trained():
    guide = tiny_guide(seed=0)
    ex = synthetic_examples()
    before = eval_guide(guide, ex, batch_size=8, pad_id=PAD, device="cpu")
    hist = train_guide(guide, ex, epochs=40, batch_size=8, lr=3e-3, pad_id=PAD, seed=0, device="cpu",
                       log_every=40, log_fn=lambda s: None)
    after = eval_guide(guide, ex, batch_size=8, pad_id=PAD, device="cpu")
    return guide, ex, hist, before, after


# 1. Eq. 2 loss goes down
def test_guide_loss_decreases(trained):
    _, _, hist, before, after = trained
    assert len(hist) == 40 * 4 and {"step", "loss", "lr"} <= set(hist[0])
    first = sum(h["loss"] for h in hist[:4]) / 4
    last = sum(h["loss"] for h in hist[-4:]) / 4
    assert last < 0.5 * first, (first, last)
    assert after["nll_true_h"] < 0.5 * before["nll_true_h"]


# 2. the decoder actually uses the latent
def test_decoder_uses_latent(trained):
    _, ex, _, _, after = trained
    assert after["n"] == len(ex)
    # shuffled h must be clearly worse: without the right h, v (and 2 of the 3 content tokens) is a guess
    assert after["nll_shuffled_h"] > after["nll_true_h"] + 0.3, after


# 3. s_phi = ||phi(x,y) - phi(x,y')||_2
def test_latent_distances(trained):
    guide = trained[0]
    ex = synthetic_examples()
    triples = [(x, y, ex[(i + 1) % len(ex)][1]) for i, (x, y) in enumerate(ex)]
    triples += [(x, y, list(y)) for x, y in ex[:5]]  # identical response -> distance 0
    triples += [([1, 2], [5, 6, 7, 8, 9, EOS], [5, EOS])]  # different lengths inside one chunk
    d = latent_distances(guide, triples, batch_size=7, pad_id=PAD, device="cpu")
    assert d.shape == (len(triples),) and d.dtype == torch.float32
    assert (d >= 0).all()
    assert d[len(ex):len(ex) + 5].abs().max() < 1e-6
    assert d[:len(ex)].min() > 1e-3  # different responses really are apart
    # by hand: encode y's and y''s separately and take the norm of the difference
    guide.eval()
    with torch.no_grad():
        hy = guide.encode(**collate_guide([(x, y) for x, y, _ in triples], PAD))
        hp = guide.encode(**collate_guide([(x, yp) for x, _, yp in triples], PAD))
    ref = torch.linalg.vector_norm(hy - hp, dim=-1)
    torch.testing.assert_close(d, ref, atol=1e-5, rtol=1e-5)


# 4. save / load round trip, safetensors only
def test_save_load_roundtrip(tmp_path):
    guide = tiny_guide(seed=1, latent_dim=5)
    with torch.no_grad():
        guide.to_latent.bias.normal_()  # make sure the latent layers' non-default values survive
    out = tmp_path / "guide"
    save_guide(guide, out)
    save_guide(guide, out)  # overwriting an existing guide dir works too
    files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs]
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files), files
    for sub in ("encoder/model.safetensors", "decoder/model.safetensors", "latent.safetensors", "guide_config.json"):
        assert (out / sub).exists(), sub
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".guide-")]  # no temp dirs left behind
    loaded = load_guide(out)
    assert isinstance(loaded, GuideModel) and loaded.latent_dim == 5
    batch = collate_guide(synthetic_examples()[:6], PAD)
    guide.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(**batch), guide.encode(**batch), atol=0, rtol=0)
        h = guide.encode(**batch)
        torch.testing.assert_close(loaded.recon_nll(**batch, h=h)[0], guide.recon_nll(**batch, h=h)[0],
                                   atol=0, rtol=0)


# 5. response mask + next-token shift, checked against cross_entropy by hand
def test_recon_nll_matches_hand_computation():
    guide = tiny_guide(seed=2).eval()
    examples = [([1, 11, 12], [30, 31, EOS]), ([1, 13], [32, 33, 34, 35, 36, EOS]), ([1, 14, 15, 16, 17], [37, EOS])]
    batch = collate_guide(examples, PAD)
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    assert ids.shape == (3, 8) and attn.sum(1).tolist() == [6, 8, 7] and resp.sum(1).tolist() == [3, 6, 2]
    h = torch.randn(3, guide.latent_dim)
    with torch.no_grad():
        nll, cnt = guide.recon_nll(**batch, h=h)
        # hand: same injection, then score ONLY response tokens, token t predicted by logits at t-1
        emb = guide.decoder.transformer.wte(ids) + guide.from_latent(h)[:, None, :]
        logits = guide.decoder(inputs_embeds=emb, attention_mask=attn).logits  # (B, T, V)
        for i, (x, y) in enumerate(examples):
            pos = torch.arange(len(x), len(x) + len(y))  # positions of y in the row
            ref = F.cross_entropy(logits[i, pos - 1], ids[i, pos], reduction="sum")
            torch.testing.assert_close(nll[i], ref, atol=1e-5, rtol=1e-5)
            assert cnt[i].item() == len(y)
            # padding is invisible: the row alone (no padding) gives the same NLL
            alone = collate_guide([examples[i]], PAD)
            torch.testing.assert_close(guide.recon_nll(**alone, h=h[i:i + 1])[0][0], nll[i], atol=1e-5, rtol=1e-5)
        # and the pad id itself does not matter
        torch.testing.assert_close(guide.recon_nll(**collate_guide(examples, 63), h=h)[0], nll, atol=1e-5, rtol=1e-5)
        # forward() = recon_nll(encode(...)); shuffle_h rolls the latent across the batch
        hh = guide.encode(**batch)
        torch.testing.assert_close(guide(**batch)[0], guide.recon_nll(**batch, h=hh)[0])
        torch.testing.assert_close(guide(**batch, shuffle_h=True)[0], guide.recon_nll(**batch, h=hh.roll(1, 0))[0])
