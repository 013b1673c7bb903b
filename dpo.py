"""The policy update of LD-Align: sequence log-probs, latent weights s/S, the Eq. 4 loss, the loop.

Read beside Section 4.2 of the paper (arXiv 2404.06390) and Algorithm 1, lines 9-10.

    ldalign_loss(...)    Eq. 4, a pure function of tensors: copy-paste it into your own trainer
    latent_weights(s)    s_i / S with S = mean_i s_i (Algorithm 1, line 9)
    sequence_logps(logits, labels)   log p_theta(y|x) summed over response tokens (Eq. 1), a pure
                         function of tensors, the shift spelled out: copy it with the loss
    policy_logps(model, ...)         the model call around it (logits only where a label is)
    dpo_train(...)       one iteration's update (Algorithm 1, line 10), fixed and cached reference;
                         its loop `train`: checkpointer.load() before it, checkpointer.save() inside
    sft_train(...)       plain SFT (Section 3): theta_0 for the toy task, and `--method sft`

Conventions: a "pair" is (prompt_ids, chosen_ids, rejected_ids), token-id lists. In LD-Align the
chosen response is the golden y from the SFT set D and the rejected one is the policy's own sample
y' (Section 4.2.2: "we regard y as the winner sample and y' as the loser sample"). Response ids
already end with EOS, so the model also learns where to stop.
"""
import inspect
import math
import time

import torch
import torch.nn.functional as F

import fsdp

IGNORE = -100  # label value of prompt and padding tokens: not part of log p(y|x)


# ----------------------------------------------------------------------------------------------------
# Eq. 4: the loss. Pure function of tensors, no model inside: this is the part to copy.
# ----------------------------------------------------------------------------------------------------
def ldalign_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 weights, beta):
    """Per-pair LD-Align loss (Eq. 4) and the implicit DPO rewards.

    policy_chosen_logps   (B,)  log p_theta(y|x), summed over the tokens of the golden response y
    policy_rejected_logps (B,)  log p_theta(y'|x), the policy's own sample y'
    ref_chosen_logps      (B,)  log p_ref(y|x), p_ref = p_{theta_{t-1}} (previous iteration, fixed)
    ref_rejected_logps    (B,)  log p_ref(y'|x)
    weights               (B,)  s_phi(x, y, y') / S_phi (Algorithm 1, line 9);
                                all ones gives plain DPO/SPIN
    beta                  float, the DPO temperature (0.1 in the paper, as in SPIN)
    returns losses (B,), chosen_rewards (B,), rejected_rewards (B,); the training loss is
    losses.mean(), the Monte-Carlo estimate of the expectation in Eq. 4.

    Gradient (Eq. 5, corrected):
        d losses_i / d theta = -beta * w_i * sigma(-z_i) * (grad log p(y) - grad log p(y')),
    because d/dz log sigma(z) = sigma(-z). The paper prints sigma(z); see README, errata.
    """
    shapes = [tuple(t.shape) for t in
              (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, weights)]
    # a (B, 1) weight would silently broadcast to a (B, B) loss
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError(f"ldalign_loss expects five (B,) tensors, got shapes {shapes}")
    # The weights are constants of the update: phi is frozen while theta moves (README, errata), so
    # no gradient may flow into them even if a caller passes a tensor that requires grad.
    weights = weights.detach()
    # (B,) log p_theta(y|x) - log p_theta(y'|x), and the same under p_ref
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    z = beta * (pi_logratios - ref_logratios)  # (B,) the argument of sigma in Eq. 4
    losses = -weights * F.logsigmoid(z)  # (B,) Eq. 4, one term of the expectation per pair
    # (B,) DPO implicit rewards of y and of y'
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def latent_weights(s):
    """w_i = s_i / S with S = (1/N) sum_i s_i (Algorithm 1, line 9). s: (N,) distances of the WHOLE
    data set.

    Section 4.2.2 prints S_phi as s / E[s], which would make every weight s/S_phi = E[s], the same
    constant for all pairs; Algorithm 1, line 9 defines S as the mean distance, which is what we
    use (README, errata). The weights then average to 1, so the loss scale, and with it the
    learning rate, matches plain DPO.
    """
    s = torch.as_tensor(s, dtype=torch.float64)
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"latent_weights expects a non-empty 1-D tensor of distances, "
                         f"got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError(f"latent_weights: {int((~torch.isfinite(s)).sum())} distances are NaN or inf; "
                         "check the guide model")
    if (s < 0).any():
        raise ValueError("latent_weights: distances are norms and cannot be negative")
    # S_phi(D, p_{theta_{t-1}}) = 1/N sum_i s_phi(x_i, y_i, y'_i)
    S = s.mean()  # Algorithm 1, line 9
    if not S > 0:
        raise ValueError("latent_weights: the mean distance S is 0: every sample y' has the same latent "
                         "as its golden y (the policy reproduces D, or the guide maps everything to one "
                         "point); nothing to weight")
    return (s / S).float()  # (N,)


# ----------------------------------------------------------------------------------------------------
# Eq. 1: log p_theta(y|x) = sum_j log p_theta(y_j | x, y_<j), response tokens only.
# ----------------------------------------------------------------------------------------------------
def sequence_logps(logits, labels):
    """Sum of the log-probs of the labelled tokens of each sequence (Eq. 1): a pure function of
    tensors, to copy beside the loss (as Mitchell's DPO `_get_batch_logps`).

    logits: (B, L, V), the model's logits at L consecutive positions p .. p+L-1 of each sequence.
    labels: (B, L), the tokens at the same positions: the response tokens, IGNORE (-100) on the
        prompt and the padding.
    returns (B,) float32: sum over the response tokens of log p(token | everything before it).

    The shift: the logits at position j are the model's distribution for token j+1 (causal LM), so
    token j is scored by logits[j-1]. Dropping the last logit and the first label lines them up.
    Getting this off by one scores every token with its own logits, the classic bug in DPO code:
    test_ldalign.py pins it against -cross_entropy.
    """
    # positions p .. p+L-2; position j predicts token j+1
    logits = logits[:, :-1, :].float()  # (B, L-1, V)
    # tokens p+1 .. p+L-1: token j+1 lined up with the logits of position j
    targets = labels[:, 1:]  # (B, L-1)
    mask = targets != IGNORE  # (B, L-1) response tokens only
    logp = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1))
    logp = logp.squeeze(-1)  # (B, L-1)
    return (logp * mask).sum(-1)  # (B,) Eq. 1 in log space: a sum, not a mean (as in DPO)


def policy_logps(model, input_ids, attention_mask, labels, start=1):
    """log p_theta(y|x) of every sequence of a batch: the model's forward, then sequence_logps.

    input_ids, attention_mask: (B, T), right-padded prompt+response.
    labels: (B, T), equal to input_ids on response tokens and IGNORE (-100) on prompt and padding.
    start: no row has a labelled token before column `start` (the batch's shortest prompt; >= 1,
        since token 0 has no logits predicting it). Logits are then made only for positions
        start-1 .. T-1 (HF's `logits_to_keep`, when the model's forward takes it), so the lm_head
        and the fp32 log-softmax over the vocabulary skip the prompt columns that every row shares.
        Same result as start=1 (every position), less work and memory.
    returns (B,) float32.
    """
    T = input_ids.shape[1]
    takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": T - start + 1} if start > 1 and takes_logits_to_keep else {}
    start = start if keep else 1  # a model without logits_to_keep returns every position
    # use_cache=False: no KV cache to fill (scoring, not decoding). With one, every compiled block
    # (--compile) guards on its own cache layer's state and recompiles once per layer, past
    # torch.compile's limit.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   **keep).logits  # (B, T-start+1, V): positions start-1 .. T-1
    return sequence_logps(logits, labels[:, start - 1:])  # (B,)


def collate(prompts, responses, pad_id):
    """Right-pad prompt+response sequences and build labels that mask the prompt and the padding.

    returns input_ids (B, T) long, attention_mask (B, T) long (1 on real tokens, 0 on padding) and
    labels (B, T): the response tokens, IGNORE on the prompt x (given, not predicted) and padding.
    """
    seqs = [p + r for p, r in zip(prompts, responses)]
    T = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)  # (B, T)
    labels = torch.full_like(input_ids, IGNORE)  # (B, T)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
        labels[i, len(p):len(s)] = input_ids[i, len(p):len(s)]
    return input_ids, attention_mask, labels


def pair_logps(model, pairs, device):
    """log p(y|x) and log p(y'|x) of a micro-batch of pairs in ONE forward of 2B sequences.

    One forward instead of two (as in Mitchell's DPO `concatenated_forward`) keeps the FSDP
    collectives and the number of forward calls per step the same on every rank.
    returns chosen (B,), rejected (B,).
    """
    B = len(pairs)
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    pad_id = 0  # any id: padded positions are masked in attention and in labels
    input_ids, attention_mask, labels = (t.to(device) for t in collate(prompts, responses, pad_id))
    # no response token before this column (sequence_logps)
    start = max(1, min(len(p) for p in prompts))
    logps = policy_logps(model, input_ids, attention_mask, labels, start)  # (2B,)
    return logps[:B], logps[B:]


@torch.no_grad()
def reference_logps(model, pairs, micro_batch_size, device):
    """Algorithm 1, line 10's p_{theta_{t-1}} terms, computed ONCE at the start of iteration t.

    The reference model of iteration t is theta_{t-1}, fixed for the whole iteration (SPIN-style).
    At the start of the iteration the policy IS theta_{t-1}, so scoring every pair now and caching
    the numbers replaces keeping a second 7B model in memory. Every rank scores its share of the
    pairs (fsdp.shard_gather).
    returns chosen (N,), rejected (N,) float32 on the CPU, on every rank.
    """
    was_training = model.training
    model.eval()

    def score(share):
        out_c, out_r = [], []
        for i in range(0, len(share), micro_batch_size):
            with fsdp.autocast(device, model):
                c, r = pair_logps(model, share[i:i + micro_batch_size], device)
            # kept on the device: one copy to the CPU at the end, not a sync per batch
            out_c.append(c.float())
            out_r.append(r.float())
        if not share:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(out_c).cpu(), torch.cat(out_r).cpu()

    chosen, rejected = fsdp.shard_gather(pairs, score)
    model.train(was_training)
    fsdp.reshard_all(model)
    return chosen, rejected


# ----------------------------------------------------------------------------------------------------
# The optimisation loop shared by DPO and SFT: optimizer, warmup, accumulation, clipping, logging.
# ----------------------------------------------------------------------------------------------------
def make_optimizer(model, name, lr, weight_decay=0.0):
    # the trainable parameters: all of them, or only the LoRA adapters (--lora_r, lora.py)
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":  # SPIN's choice, which the paper keeps for its SPIN-style iterations
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use 'adamw' or 'rmsprop'")


def lr_at(step, total_steps, warmup_steps, lr):
    """Linear warmup to lr, then linear decay to 0 (SPIN and the alignment-handbook use this shape)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def global_batches(n, batch_size, epochs, seed, world):
    """Index lists of the global batches of all epochs; every batch has exactly batch_size entries.

    The last batch of an epoch is filled up with repeated indices marked fake (valid=False); their
    weight is 0, so they add nothing to loss or gradient, but every rank still runs the same number
    of forward calls (FSDP collectives hang otherwise) and batch shapes stay fixed.
    """
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes {world}")
    out = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            valid = [True] * len(idx)
            while len(idx) < batch_size:  # fill the last batch
                idx.append(perm[len(idx) % n])
                valid.append(False)
            out.append((idx, valid))
    return out


def disable_dropout(model):
    """Dropout off for the DPO update (as TRL's DPOTrainer, disable_dropout=True, which SPIN's
    trainer derives from).

    The cached log p_ref comes from an eval-mode forward (reference_logps); with dropout on in
    training, log p_theta is a noisy, biased estimate of the same quantity, so even at step 0
    (policy == reference) z != 0 and the loss is not w log 2. Zephyr / Mistral / Llama have no
    dropout (attention_dropout = 0); GPT-2-style policies do (0.1).
    """
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        # Llama-style attention: a float, not a module
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def dpo_train(model, pairs, ref_chosen, ref_rejected, weights, *, beta, lr, epochs, batch_size,
              micro_batch_size, device, optimizer="rmsprop", warmup_ratio=0.1, max_grad_norm=1.0, seed=0,
              log_every=10, log_fn=None, on_step=None, checkpointer=None, defer_grad_sync=False):
    """Algorithm 1, line 10:
        theta_t = argmax_theta sum_i (s_i/S) log sigma(beta log-ratio(y) - beta log-ratio(y')).

    pairs: list of N (x, y, y') id lists, identical on every rank; ref_chosen/ref_rejected: (N,)
    cached log p_{theta_{t-1}} (see reference_logps); weights: (N,) s_i/S (latent_weights), or ones
    for SPIN. The model is updated in place; returns the step log (one dict per optimizer step).
    checkpointer: the update's step checkpoints, or None (see train).
    """
    weights = torch.as_tensor(weights, dtype=torch.float32)
    disable_dropout(model)

    def loss_fn(idx, valid):
        # one micro-batch: Eq. 4 summed over its pairs (fill-up items of the last batch weigh 0)
        pc, pr = pair_logps(model, [pairs[i] for i in idx], device)  # (b,), (b,)
        w = weights[idx] * torch.tensor(valid, dtype=torch.float32)  # (b,) fill-up items weigh 0
        rc_ref, rr_ref = ref_chosen[idx].to(device), ref_rejected[idx].to(device)
        losses, rc, rr = ldalign_loss(pc, pr, rc_ref, rr_ref, w.to(device), beta)
        v = torch.tensor(valid, dtype=torch.float32, device=device)
        stats = torch.stack([(rc * v).sum(), (rr * v).sum(), ((rc > rr).float() * v).sum(),
                             ((rc - rr) * v).sum()])
        return losses.sum(), stats

    return train(model, len(pairs), loss_fn, device=device, lr=lr, epochs=epochs,
                 batch_size=batch_size, micro_batch_size=micro_batch_size, optimizer=optimizer,
                 warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, seed=seed,
                 log_every=log_every, log_fn=log_fn,
                 stats_names=["reward_chosen", "reward_rejected", "reward_acc", "reward_margin"],
                 on_step=on_step, checkpointer=checkpointer, defer_grad_sync=defer_grad_sync)


def sft_train(model, examples, *, lr, epochs, batch_size, micro_batch_size, device, optimizer="adamw",
              warmup_ratio=0.1, max_grad_norm=1.0, seed=0, log_every=10, log_fn=None, max_steps=0,
              on_step=None, checkpointer=None, defer_grad_sync=False):
    """SFT objective of Section 3: max E[log p_theta(y|x)], here the per-token mean NLL of each
    response.

    examples: list of (x, y) id lists. Used to make theta_0 for the toy task and for `--method sft`.
    """
    def loss_fn(idx, valid):
        xs, ys = [examples[i][0] for i in idx], [examples[i][1] for i in idx]
        input_ids, attention_mask, labels = (t.to(device) for t in collate(xs, ys, 0))
        start = max(1, min(map(len, xs)))
        logp = policy_logps(model, input_ids, attention_mask, labels, start)  # (b,) summed
        n_tok = (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)  # (b,)
        v = torch.tensor(valid, dtype=torch.float32, device=device)
        nll = -(logp / n_tok) * v  # (b,) per-token NLL of each real example
        return nll.sum(), torch.zeros(0)

    return train(model, len(examples), loss_fn, device=device, lr=lr, epochs=epochs,
                 batch_size=batch_size, micro_batch_size=micro_batch_size, optimizer=optimizer,
                 warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, seed=seed,
                 log_every=log_every, log_fn=log_fn, stats_names=[], max_steps=max_steps,
                 on_step=on_step, checkpointer=checkpointer, defer_grad_sync=defer_grad_sync)


# ----------------------------------------------------------------------------------------------------
# The loop shared by dpo_train and sft_train (torchtitan's shape: the checkpointer's load()
# before it, its save() inside it), and one optimizer step.
# ----------------------------------------------------------------------------------------------------
def train(model, n_items, loss_fn, *, device, lr, epochs, batch_size, micro_batch_size,
          optimizer, warmup_ratio, max_grad_norm, seed, log_every, log_fn, stats_names,
          max_steps=0, on_step=None, checkpointer=None, defer_grad_sync=False):
    """loss_fn(idx, valid) -> (sum of per-item losses over the real items of this micro-batch, stats
    tensor summed the same way). Returns the step log, one dict per optimizer step. on_step(step,
    steps), if given, is called after each optimizer step.

    checkpointer: an object with load(model, opt) -> (step, step log up to it), called before the
    loop ((0, []) when there is nothing to go on from), and save(model, opt, step, total, history),
    called after every step, which saves when a checkpoint is due (run/checkpoint.py's
    StepCheckpoint: every --save_steps steps, and at a SIGTERM). A killed update goes on after its
    last saved step with that step's weights, optimizer state and step log: the lr and the batches
    are functions of the step. None: no checkpoints.

    Data parallel with FSDP2: each global batch is split between ranks (rank r takes every world-th
    index), each rank accumulates over micro-batches, and FSDP2 AVERAGES gradients over ranks.
    Dividing the local sum by (number of real items in the global batch / world) therefore gives
    exactly the gradient of the global-batch mean, whatever the world size (tested: 1 process ==
    2 processes).

    Several micro-batches per step: by default FSDP2 reduce-scatters every micro-batch's gradients
    as its backward ends, so a rank keeps only its 1/world shard of the fp32 gradients (torchtitan
    does this too). defer_grad_sync=True reduce-scatters once, after the step's last micro-batch:
    one collective per step instead of one per micro-batch, but every parameter's fp32 gradient is
    kept unsharded on every rank until then (4 bytes per parameter: 27 GiB per GPU for a 7B). The
    two give the same step up to float round-off (tested).
    """
    batches = global_batches(n_items, batch_size, epochs, seed, fsdp.world())
    if max_steps:
        # stop after max_steps optimizer steps (the schedule ends there)
        batches = batches[:max_steps]
    total = len(batches)
    warmup = max(1, int(warmup_ratio * total))
    opt = make_optimizer(model, optimizer, lr)
    model.train()
    # the step to go on after, and the step log up to it ((0, []): from the start)
    start, history = checkpointer.load(model, opt) if checkpointer else (0, [])
    t0 = time.time()
    for step in range(start, total):
        rec = train_step(model, opt, batches[step], loss_fn, step, total, device=device, lr=lr,
                         warmup=warmup, micro_batch_size=micro_batch_size,
                         max_grad_norm=max_grad_norm, stats_names=stats_names,
                         defer_grad_sync=defer_grad_sync)
        history.append(rec)
        if log_fn and (step % log_every == 0 or step + 1 == total):
            el = time.time() - t0
            eta = el / (step + 1 - start) * (total - step - 1)
            log_fn(dict(rec, elapsed_s=round(el, 1), eta_s=round(eta, 1)))
        if checkpointer:
            checkpointer.save(model, opt, step + 1, total, history)
        if on_step:
            on_step(step + 1, total)
    return history


def train_step(model, opt, batch, loss_fn, step, total, *, device, lr, warmup, micro_batch_size,
               max_grad_norm, stats_names, defer_grad_sync=False):
    """One optimizer step of train on the global batch `batch` (idx, valid); returns its record
    (a row of the step log). defer_grad_sync: see train."""
    world, rank = fsdp.world(), fsdp.rank()
    idx, valid = batch
    for group in opt.param_groups:
        group["lr"] = lr_at(step, total, warmup, lr)
    # this rank's share of the batch
    local_idx, local_valid = idx[rank::world], valid[rank::world]
    n_real = sum(valid)  # real items in the GLOBAL batch
    stats = 0.0
    micro = list(range(0, len(local_idx), micro_batch_size))
    for k, m in enumerate(micro):
        # FSDP2 reduce-scatters each micro-batch's gradients into the rank's shards (its default:
        # 1/world of the fp32 gradients kept); defer_grad_sync: only the step's last micro-batch's,
        # every parameter's fp32 gradient kept unsharded until then
        if fsdp.is_fsdp(model):
            model.set_requires_gradient_sync(not defer_grad_sync or k == len(micro) - 1)
        # the forward and the loss under autocast; backward and step run outside
        with fsdp.autocast(device, model):
            loss_sum, st = loss_fn(local_idx[m:m + micro_batch_size], local_valid[m:m + micro_batch_size])
        (loss_sum * world / n_real).backward()  # FSDP divides by world again: global-batch mean
        # Statistics stay on the device: a .cpu() here would make the CPU wait for this
        # backward before it could queue the next forward (the GPU idles meanwhile), and NCCL
        # reduces only GPU tensors.
        stats = stats + torch.cat([loss_sum.detach().float().reshape(1), st.float().to(loss_sum.device)])
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # DTensor under FSDP2
    opt.step()
    opt.zero_grad(set_to_none=True)
    # If a caller wraps this whole loop in its own `with torch.autocast`, the nested blocks above
    # do not empty autocast's cache, which still holds bf16 copies of the weights of before this
    # step: drop them.
    torch.clear_autocast_cache()
    stats = (fsdp.all_reduce(stats) / n_real).cpu()  # batch means over all ranks
    rec = {"step": step + 1, "steps": total, "loss": stats[0].item(), "lr": opt.param_groups[0]["lr"],
           "grad_norm": float(gnorm)}
    rec.update({k: v.item() for k, v in zip(stats_names, stats[1:])})
    # A finite loss can still come with an inf gradient, which has just been applied: stop now,
    # not one step later.
    if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
        raise FloatingPointError(
            f"loss is {rec['loss']} at step {step + 1}/{total} (gradient norm {rec['grad_norm']}); "
            "stopping before the weights are saved (the last finished checkpoint on disk is intact). "
            "Lower --lr or --beta.")
    return rec
