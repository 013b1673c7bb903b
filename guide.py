"""The guiding model T = (phi, psi) of LD-Align (arXiv 2404.06390, Section 4.1).

A *conditional autoencoder* built from two GPT-2s:
  encoder phi(x, y) -> h in R^d   : what is it about this response y (to prompt x)?
  decoder psi(y | x, h)           : reconstruct y from the prompt x and the latent h.
It is trained with Eq. 2 (Algorithm 1, line 4) on golden pairs (x, y) from the SFT set AND on
generated pairs (x, y') from the current policy, and then used only through its encoder:
  s_phi(x, y, y') = || phi(x, y) - phi(x, y') ||_2          (Section 4.2.2, Algorithm 1, line 8)
which becomes the per-example weight of the DPO loss (Eq. 3/4, elsewhere in the project).

Deliberately NOT a VAE: Eq. 2 is a plain reconstruction objective with no KL / prior term, so phi
is a deterministic encoder and h is a point, not a distribution. (Adding a KL would also shrink all
distances towards each other, which is not what the paper's s_phi is meant to measure.)
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import dpo
import fsdp
from generate import pad_sequences


class GuideModel(nn.Module):
    def __init__(self, encoder: GPT2LMHeadModel, decoder: GPT2LMHeadModel, latent_dim: int):
        super().__init__()
        # phi's backbone; only encoder.transformer (GPT2Model) is used, lm_head is tied/idle
        self.encoder = encoder
        self.decoder = decoder  # psi: a full GPT-2 LM
        self.latent_dim = latent_dim
        # pooled hidden state -> h (n_embd -> d)
        self.to_latent = nn.Linear(encoder.config.n_embd, latent_dim)
        # h -> W_h h, added to the token embeddings (d -> n_embd)
        self.from_latent = nn.Linear(latent_dim, decoder.config.n_embd)

    # ---------------------------------------------------------------- phi
    def encode(self, input_ids, attention_mask, response_mask):
        """phi(x, y) -> h (B, d). input_ids = [x ; y] right-padded, response_mask = 1 on the y
        positions.

        Mean-pool over the RESPONSE tokens only. x is identical in y and y' (same prompt), so pooling
        over x would add a shared component that dilutes s_phi = ||phi(x,y) - phi(x,y')||; pooling
        over y makes the distance measure the responses. h is still conditioned on x: with causal
        attention every response position attends to all of x. (Mean rather than last token: no
        dependence on where EOS/padding sits.)
        """
        hid = self.encoder.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state  # (B, T, n_embd)
        m = (response_mask * attention_mask).unsqueeze(-1).to(hid.dtype)  # (B, T, 1)
        # clamp guards an empty response
        pooled = (hid * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, n_embd)
        return self.to_latent(pooled)  # (B, d)

    # ---------------------------------------------------------------- psi
    def recon_nll(self, input_ids, attention_mask, response_mask, h):
        """-log p_psi(y | x, h): summed NLL over response tokens (B,) and the number of those tokens
        (B,).

        Latent injection = "embedding injection" (Optimus, Li et al. 2020): W_h h is added to EVERY
        token embedding, so every position sees h directly (no need to route it through attention),
        and positions, labels and masks stay exactly those of the plain LM. The alternative would be
        a soft prefix (h mapped to k extra "virtual token" embeddings prepended to x), which shifts
        positions and needs masks/labels padded. GPT2Model adds its own position embeddings
        wpe(position_ids) to inputs_embeds; right padding means the default position_ids = arange(T)
        are correct.
        """
        wte = self.decoder.get_input_embeddings()
        # (B, T, n_embd) + (B, 1, n_embd)
        emb = wte(input_ids) + self.from_latent(h).to(wte.weight.dtype).unsqueeze(1)
        logits = self.decoder(inputs_embeds=emb, attention_mask=attention_mask,
                              use_cache=False).logits  # (B, T, V)
        # Next-token shift: logits at position j predict token j+1. So logits[:, :-1] are scored
        # against input_ids[:, 1:], and a target counts iff it is a (real, non-pad) response token.
        # The first response token y_1 is therefore predicted from the LAST prompt position (x must
        # be non-empty for it to count). fp32 for a stable log-softmax under bf16 autocast.
        logits = logits[:, :-1].float()  # (B, T-1, V)
        targets = input_ids[:, 1:]  # (B, T-1)
        # (B, T-1): prompt and padding masked
        tmask = (response_mask[:, 1:] * attention_mask[:, 1:]).to(logits.dtype)
        # (B, T-1) per-token -log p
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return (nll * tmask).sum(1), tmask.sum(1)  # (B,), (B,)

    def forward(self, input_ids, attention_mask, response_mask, shuffle_h=False):
        """One Eq. 2 term per row: -log p_psi(y | x, phi(x, y)). Rows can be golden (x, y) or
        generated (x, y')."""
        h = self.encode(input_ids, attention_mask, response_mask)  # (B, d)
        # diagnostic: give each row its neighbour's latent; a decoder that uses h must get worse
        if shuffle_h:
            h = h.roll(1, dims=0)
        return self.recon_nll(input_ids, attention_mask, response_mask, h)  # (B,), (B,)


# ==================================================================== build / save / load
def build_guide(model_name_or_config, latent_dim, revision=None) -> GuideModel:
    """str/path -> both encoder and decoder start from the same pre-trained GPT-2 (as in the paper),
    at hub revision `revision` (--guide_revision; None: the default branch);
    GPT2Config -> two independently randomly initialised GPT-2s (tiny tests)."""
    if isinstance(model_name_or_config, GPT2Config):
        enc, dec = GPT2LMHeadModel(model_name_or_config), GPT2LMHeadModel(model_name_or_config)
    else:
        enc = GPT2LMHeadModel.from_pretrained(model_name_or_config, revision=revision)
        dec = GPT2LMHeadModel.from_pretrained(model_name_or_config, revision=revision)
    return GuideModel(enc, dec, latent_dim)


def save_guide(guide, out_dir):
    """out_dir/{encoder,decoder}/ (HF safetensors), out_dir/latent.safetensors,
    out_dir/guide_config.json (and diagnostics.json, when the guide has them). The run writes it
    into a temporary folder renamed when complete (stages.Stages.guide): a crash never leaves a
    half-written guide."""
    os.makedirs(out_dir, exist_ok=True)
    guide.encoder.save_pretrained(os.path.join(out_dir, "encoder"))
    guide.decoder.save_pretrained(os.path.join(out_dir, "decoder"))
    # safetensors needs contiguous CPU tensors
    latent = {f"{name}.{k}": v.detach().cpu().contiguous()
              for name in ("to_latent", "from_latent")
              for k, v in getattr(guide, name).state_dict().items()}
    save_file(latent, os.path.join(out_dir, "latent.safetensors"))
    with open(os.path.join(out_dir, "guide_config.json"), "w") as f:
        json.dump({"latent_dim": guide.latent_dim, "encoder_n_embd": guide.encoder.config.n_embd,
                   "decoder_n_embd": guide.decoder.config.n_embd, "injection": "embedding",
                   "pooling": "mean_over_response"}, f, indent=2)
    if getattr(guide, "diagnostics", None) is not None:
        with open(os.path.join(out_dir, "diagnostics.json"), "w") as f:
            json.dump(guide.diagnostics, f, indent=1)


def load_guide(out_dir) -> GuideModel:
    with open(os.path.join(out_dir, "guide_config.json")) as f:
        cfg = json.load(f)
    enc = GPT2LMHeadModel.from_pretrained(os.path.join(out_dir, "encoder"))
    dec = GPT2LMHeadModel.from_pretrained(os.path.join(out_dir, "decoder"))
    guide = GuideModel(enc, dec, cfg["latent_dim"])
    state = load_file(os.path.join(out_dir, "latent.safetensors"))
    for name in ("to_latent", "from_latent"):
        getattr(guide, name).load_state_dict(
            {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")})
    return guide


# ==================================================================== data
def collate_guide(examples, pad_id):
    """examples: list of (x_ids, y_ids). Sequence = x ; y, RIGHT padded (positions 0..n-1 stay
    put)."""
    # (B, T), (B, T)
    ids, attn = pad_sequences([list(x) + list(y) for x, y in examples], pad_id, side="right")
    resp = torch.zeros_like(attn)  # (B, T)
    for i, (x, y) in enumerate(examples):
        resp[i, len(x):len(x) + len(y)] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ==================================================================== Eq. 2 training (Algorithm 1, line 4)
def train_guide(guide, examples, *, epochs, batch_size, lr, pad_id, seed, device, warmup_frac=0.1,
                weight_decay=0.0, log_every=10, log_fn=print):
    """Minimise L_guide (Eq. 2) over `examples` = golden (x, y) AND generated (x, y') pairs, mixed:
    each row is reconstructed from its OWN latent, so the two expectation terms of Eq. 2 are just
    two kinds of rows. The optimised loss is the per-token mean NLL over response tokens in the
    batch (sum NLL / #tokens), i.e. Eq. 2 up to length normalisation, so long responses do not
    dominate the step size.

    N processes train the guide that 1 process trains (up to float round-off):
    - `examples` is the whole list, the same on every rank, and batch_size is the GLOBAL batch.
      The batches are the update's (dpo.global_batches): one permutation of all examples per epoch,
      each global batch split between ranks (rank r takes every world-th row), an epoch's last
      batch filled up with rows of weight 0. Every rank thus runs the same number of forward calls
      (FSDP2's collectives hang otherwise), and the schedule has the same steps for any world.
    - Each rank divides its NLL sum by the token count of the whole global batch (all-reduced);
      FSDP2 (the whole GuideModel as root, so wte/from_latent are unsharded inside forward)
      averages the gradients over ranks, so the loss is multiplied by world: the gradient is that
      of the global batch's per-token mean.
    - Dropout is off (as in the update, dpo.disable_dropout). Its masks are drawn from each
      process's own random stream, in the shape of that process's rows, so 2 processes could
      never drop what 1 process drops; GPT-2 checkpoints come with dropout 0.1.
    The guide must already be on `device` (FSDP2-wrapped when world > 1, as place() makes it).
    Returns one metrics dict per optimiser step."""
    world, rank = fsdp.world(), fsdp.rank()
    if world > 1 and not fsdp.is_fsdp(guide):
        raise ValueError("train_guide in several processes needs an FSDP2-wrapped guide "
                         "(guide.place): nothing else averages the gradients over ranks")
    dpo.disable_dropout(guide)
    guide.train()
    batches = dpo.global_batches(len(examples), batch_size, epochs, seed, world)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = len(batches)
    warmup = max(1, int(warmup_frac * total))
    params = [p for p in guide.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_lambda(step):  # linear warmup, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    history = []
    for step, (idx, valid) in enumerate(batches, 1):
        # this rank's share of the global batch; fill-up rows weigh 0
        local_idx, local_valid = idx[rank::world], valid[rank::world]
        batch = _to(collate_guide([examples[i] for i in local_idx], pad_id), device)
        v = torch.tensor(local_valid, dtype=torch.float32, device=device)  # (b,)
        with fsdp.autocast(device, guide):
            nll_sum, n_tok = guide(**batch)  # (b,), (b,)
        nll_sum, n_tok = (nll_sum * v).sum(), (n_tok * v).sum()
        # NLL sum and token count of the GLOBAL batch, on every rank
        tot = fsdp.all_reduce(torch.stack([nll_sum.detach(), n_tok]))
        # per-token mean NLL: Eq. 2 as optimised (this rank's share of it)
        loss = nll_sum / tot[1].clamp(min=1.0)
        opt.zero_grad(set_to_none=True)
        (loss * world).backward()  # FSDP2 divides by world again: the global per-token mean
        gnorm = torch.nn.utils.clip_grad_norm_(guide.parameters(), 1.0)
        # a DTensor under FSDP2
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        opt.step()
        sched.step()
        rec = {"step": step, "epoch": (step - 1) // steps_per_epoch,
               "loss": (tot[0] / tot[1].clamp(min=1.0)).item(),
               "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
               "n_tokens": int(tot[1].item())}
        history.append(rec)
        if log_fn is not None and (step % log_every == 0 or step == 1 or step == total):
            log_fn(f"[guide] step {step}/{total} epoch {rec['epoch']} loss {rec['loss']:.4f} "
                   f"lr {rec['lr']:.2e}")
    return history


# ==================================================================== diagnostics and s_phi
@torch.no_grad()
def eval_guide(guide, examples, *, batch_size, pad_id, device, partner=None):
    """Per-token NLL of the reconstruction with the TRUE latent vs. with a SHUFFLED latent (h rolled
    by 1 over the whole example list, so a last batch of size 1 still gets someone else's h). If the
    decoder ignores h (posterior collapse: it just models p(y|x)), the two are equal; a useful guide
    has nll_shuffled_h clearly > nll_true_h.

    A shuffled h usually comes from another prompt, so that gap also counts what h knows about x.
    partner[i] = the index of an example with the same prompt and another response (y' for y, y for
    y'), or None: then nll_same_prompt_h reconstructs example i from its partner's h, and its gap
    over nll_true_h is what h knows about the response itself, the part that
    s_phi = ||phi(x, y) - phi(x, y')|| measures."""
    was_training = guide.training
    guide.eval()
    batches = [collate_guide(examples[b:b + batch_size], pad_id)
               for b in range(0, len(examples), batch_size)]
    with fsdp.autocast(device, guide):
        H = torch.cat([guide.encode(**_to(bt, device)).float() for bt in batches])  # (N, d)
        Hs = H.roll(1, dims=0)  # (N, d): example i gets example i-1's latent
        # has: (N,) rows with a same-prompt partner; Hp: (N, d) each row's partner's latent
        if partner:
            has = torch.tensor([p is not None for p in partner])
            Hp = H[torch.tensor([i if p is None else p for i, p in enumerate(partner)])]
        else:
            has = torch.zeros(len(examples), dtype=torch.bool)
            Hp = H
        tot = {"true": 0.0, "shuf": 0.0, "pair_true": 0.0, "pair_swap": 0.0, "pair_tok": 0.0}
        ntok, off = 0.0, 0
        for bt in batches:
            bt = _to(bt, device)
            B = bt["input_ids"].shape[0]
            s_true, cnt = guide.recon_nll(**bt, h=H[off:off + B])
            s_shuf, _ = guide.recon_nll(**bt, h=Hs[off:off + B])
            tot["true"] += s_true.sum().item()
            tot["shuf"] += s_shuf.sum().item()
            ntok += cnt.sum().item()
            m = has[off:off + B].to(s_true.device)  # (B,) rows that have a same-prompt partner
            if m.any():
                s_swap, _ = guide.recon_nll(**bt, h=Hp[off:off + B])
                tot["pair_true"] += s_true[m].sum().item()
                tot["pair_swap"] += s_swap[m].sum().item()
                tot["pair_tok"] += cnt[m].sum().item()
            off += B
    guide.train(was_training)
    ntok, ptok = max(ntok, 1.0), max(tot["pair_tok"], 1.0)
    out = {"nll_true_h": tot["true"] / ntok, "nll_shuffled_h": tot["shuf"] / ntok, "n": len(examples),
           "n_tokens": int(ntok)}
    if partner:  # over the rows with a partner only, both with their own h and with the partner's
        out.update(nll_true_h_paired=tot["pair_true"] / ptok, nll_same_prompt_h=tot["pair_swap"] / ptok,
                   n_paired=int(has.sum()))
    return out


@torch.no_grad()
def latent_distances(guide, triples, *, batch_size, pad_id, device):
    """s_i = || phi(x_i, y_i) - phi(x_i, y'_i) ||_2  (Section 4.2.2; Algorithm 1, line 8).
    Returns (N,) float32. y and y' of a chunk are encoded in ONE forward pass (2B rows, same padded
    length), so an identical pair gives an (up to kernel round-off) zero distance."""
    was_training = guide.training
    guide.eval()  # no dropout: phi must be a deterministic function
    out = []
    for b in range(0, len(triples), batch_size):
        chunk = triples[b:b + batch_size]
        B = len(chunk)
        # the y rows, then the y' rows
        rows = [(x, y) for x, y, _ in chunk] + [(x, yp) for x, _, yp in chunk]
        batch = _to(collate_guide(rows, pad_id), device)
        with fsdp.autocast(device, guide):
            h = guide.encode(**batch).float()  # (2B, d)
        out.append(torch.linalg.vector_norm(h[:B] - h[B:], dim=-1).cpu())  # (B,) Algorithm 1, line 8
    guide.train(was_training)
    return torch.cat(out).float() if out else torch.zeros(0)


# ==================================================================== the stages of Algorithm 1 (lines 4 and 8)
def place(read, build, device):
    """The guide that read() returns, on `device`. Under torchrun it is sharded like the policy, and
    read by rank 0 alone (one host copy of its two GPT-2s): every rank builds the architecture
    (build(), on the meta device), shards it with FSDP2 and receives its shards from rank 0
    (fsdp.from_rank0). encode / recon_nll are called directly (not through forward), so FSDP2 is
    told to all-gather around them too."""
    def wrap(guide):
        if fsdp.world() == 1:
            return guide.to(device)
        from torch.distributed.fsdp import register_fsdp_forward_method
        guide = fsdp.parallelize(guide, device)
        register_fsdp_forward_method(guide, "encode")
        register_fsdp_forward_method(guide, "recon_nll")
        return guide
    return fsdp.from_rank0(read, build, wrap, device)[0]


def architecture(encoder_config, decoder_config, latent_dim):
    """A guide of these GPT-2 configs with no weights read: what place() builds on the meta device."""
    return GuideModel(GPT2LMHeadModel(encoder_config), GPT2LMHeadModel(decoder_config), latent_dim)


def saved_architecture(out_dir):
    """The architecture of the guide saved in out_dir, from its config files alone (save_guide)."""
    with open(os.path.join(out_dir, "guide_config.json")) as f:
        latent_dim = json.load(f)["latent_dim"]
    return architecture(GPT2Config.from_pretrained(os.path.join(out_dir, "encoder")),
                        GPT2Config.from_pretrained(os.path.join(out_dir, "decoder")), latent_dim)


def fit(src, triples, cfg, pad_id, device, log):
    """Algorithm 1, line 4: a new guide (build_guide(src)) trained with Eq. 2 on golden (x, y) AND
    generated (x, y') pairs, triples = [(x, y, y')] in the guide's tokens, in global batches of
    --guide_batch_size split between ranks (train_guide: N processes train what 1 trains).
    Then the diagnostic: does the decoder use h? (guide.diagnostics, saved with the guide)."""
    log("[Algorithm 1, line 4] training the guide T = (phi, psi) on golden and generated responses "
        "(Eq. 2)")
    # the initial weights: GPT-2's (or, for a config, random) and random latent maps, seeded; under
    # torchrun made by rank 0 alone and sent to the others (place)
    torch.manual_seed(cfg["seed"])
    revision, d = cfg.get("guide_revision") or None, cfg["latent_dim"]

    def build():
        conf = src if isinstance(src, GPT2Config) else GPT2Config.from_pretrained(src, revision=revision)
        return architecture(conf, conf, d)
    guide = place(lambda: build_guide(src, d, revision), build, device)
    # the y rows, then the y' rows
    examples = [(gx, gy) for gx, gy, _ in triples] + [(gx, gyp) for gx, _, gyp in triples]
    # every rank gets all examples and the global batch size: the steps of one process
    train_guide(guide, examples, epochs=cfg["guide_epochs"], batch_size=cfg["guide_batch_size"],
                lr=cfg["guide_lr"], pad_id=pad_id, seed=cfg["seed"], device=device,
                log_every=cfg["log_every"] * 5, log_fn=lambda m: log("  " + m))
    # Reconstruct (training) examples with the true latent, another example's, and (for pairs with
    # y' != y) the same prompt's other response's: that last gap is what s_phi can see.
    differ = [i for i, (_, gy, gyp) in enumerate(triples) if gy != gyp]
    pick = torch.randperm(len(differ), generator=torch.Generator().manual_seed(0))[:512].tolist()
    # (every y' == y: no pairs)
    pick = [differ[k] for k in pick] or list(range(min(512, len(triples))))
    n = len(pick)
    # the picked y rows, then their y' rows: row k's partner is row k + n and the other way round
    picked = [examples[i] for i in pick] + [examples[len(triples) + i] for i in pick]
    partner = [k + n for k in range(n)] + list(range(n)) if differ else None
    guide.diagnostics = eval_guide(guide, picked, batch_size=cfg["guide_batch_size"], pad_id=pad_id,
                                   device=device, partner=partner)
    d = guide.diagnostics
    log(f"  guide reconstruction NLL/token: true h {d['nll_true_h']:.3f} "
        f"vs shuffled h {d['nll_shuffled_h']:.3f} (shuffled must be worse, or the decoder ignores h) "
        f"vs the same prompt's other response's h {d.get('nll_same_prompt_h', float('nan')):.3f} "
        f"(the part of h that s_phi measures)")
    return guide


def gathered(guide, src, revision=None):
    """The whole guide on rank 0, to save (None on the other ranks). Under FSDP2 every rank joins
    the gather of the full state dict, which rank 0 loads into a plain, unsharded copy
    (build_guide(src, revision)); in one process, the guide itself."""
    sd, plain = fsdp.full_state_dict(guide), guide
    if fsdp.rank() != 0:
        return None
    if sd is not None:
        plain = build_guide(src, guide.latent_dim, revision)
        plain.load_state_dict(sd)
        plain.diagnostics = guide.diagnostics
    return plain


def freeze(guide):
    """phi is frozen after line 4: the weights s_i/S are constants of the policy update (README,
    errata)."""
    guide.eval()
    for p in guide.parameters():
        p.requires_grad_(False)
    return guide


def distances(guide, triples, batch_size, pad_id, device):
    """Algorithm 1, line 8 over a data set: s_i for triples = [(x, y, y')] in the guide's tokens,
    every rank encoding its share (fsdp.shard_gather). Returns (N,) float32 on every rank."""
    def share_distances(share):
        return latent_distances(guide, share, batch_size=batch_size, pad_id=pad_id, device=device)

    with fsdp.gathered_weights(guide):
        return fsdp.shard_gather(triples, share_distances)
