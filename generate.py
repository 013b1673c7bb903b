"""Hand-written batched sampling with a KV cache (Algorithm 1, lines 2 and 7: y' ~ p_theta(.|x)).

Works on any Hugging Face causal LM (Llama, GPT-2, Mistral, ...): the only things used are the
standard forward arguments input_ids / attention_mask / position_ids / past_key_values (`cache` in
transformers 5.2x) / use_cache and `.logits`.

    ids, mask = pad_sequences(prompts, pad_id, side="left")  # (B, T), (B, T)
    # (B, n), n <= 128
    new = generate(model, ids, mask, 128, eos_id, pad_id, temperature=1.0, top_p=0.9)

`generate` never changes the model's mode (the caller puts it in eval mode: dropout off).
`sample_dataset` samples one response per prompt of a whole data set, the work shared by every
rank, in eval mode. The tests compare `generate` with a cache-free path and with transformers' own
`generate`.
"""
import contextlib
import inspect
import itertools
import math
import time

import torch
from transformers import DynamicCache

import fsdp


def pad_sequences(seqs, pad_id, side="left", width=0):
    """Pad a list of token-id lists into one tensor.

    Generation wants LEFT padding (every prompt ends at the last column, so the next token of every
    row is predicted from column -1); training wants RIGHT padding (positions 0..n-1 stay where they
    are).
    Returns input_ids (B, T) long and attention_mask (B, T) long, 1 on real tokens and 0 on padding;
    T is the longest sequence, or `width` if that is larger.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    T = max([width] + [len(s) for s in seqs])
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            continue
        row = torch.as_tensor(s, dtype=torch.long)
        if side == "left":
            ids[i, T - len(s):], mask[i, T - len(s):] = row, 1
        else:
            ids[i, :len(s)], mask[i, :len(s)] = row, 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------
# Sampling one token from (B, V) logits
# ----------------------------------------------------------------------------------------------------
def apply_top_k(logits, k):
    """Keep the k largest logits of each row, set the rest to -inf. (B, V) -> (B, V); k <= 0 means
    off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit of each row
    return logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th value are kept


def sample_categorical(probs, generator):
    """One draw per row: (B, V) probs -> (B,) token ids, without a GPU->CPU sync.

    argmax_v p_v / E_v with E_v ~ Exp(1) picks v with probability p_v (the "exponential race"). It
    is what torch.multinomial itself computes for one draw, so the same generator gives the same
    tokens; but multinomial first validates its input on the host (.item() calls), which on a GPU
    stalls the CPU at every decode step and defeats the CUDA-graph replay. What is lost is only that
    check: NaN logits would give a garbage token instead of an error (a policy that far gone already
    stops training at its NaN loss, dpo._train_loop).
    """
    e = torch.empty_like(probs).exponential_(1, generator=generator)  # (B, V), E_v ~ Exp(1)
    return (probs / e).argmax(dim=-1)


def apply_top_p(logits, p):
    """Nucleus filter, (B, V) -> (B, V): the definition of transformers' TopPLogitsWarper, step for
    step, so the kept set is the same on ties and on a prefix whose mass equals p exactly. Sort
    ascending, drop the tokens whose cumulative probability is <= 1 - p (the least likely ones,
    holding at most 1 - p together), always keep the most likely token (p -> 0 is greedy); the rest
    become -inf."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)  # (B, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop = cum <= (1 - p)
    drop[..., -1:] = False  # the most likely token stays
    return logits.masked_fill(drop.scatter(1, sorted_idx, drop), float("-inf"))


def sample_next(logits, temperature, top_p, top_k, generator):
    """(B, V) float32 logits -> (B,) token ids. temperature == 0 means greedy argmax (top_p / top_k
    unused)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_top_k(logits / temperature, top_k)
    if top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    return sample_categorical(torch.softmax(logits, dim=-1), generator)  # (B, V) probs -> (B,)


# ----------------------------------------------------------------------------------------------------
# The decode loop
# ----------------------------------------------------------------------------------------------------
# decode steps between two "is every row finished?" checks (each check is a GPU->CPU sync)
SYNC_EVERY = 16


def _all_finished(finished):
    """True when every row is finished, on THIS rank and, under torch.distributed, on ALL ranks.

    With FSDP every forward is a collective (parameters are all-gathered layer by layer), so all
    ranks must run the same number of decode steps: a rank whose rows all hit EOS early keeps
    stepping (emitting pad) until every rank is done, otherwise the others would wait forever in
    their next all-gather. generate() calls this at the same steps on every rank (every SYNC_EVERY
    steps), so the ranks agree.
    """
    done = torch.tensor([int(bool(finished.all()))], device=finished.device)
    return bool(fsdp.all_reduce(done, "min").item())  # 1 only if every rank reports 1


def forward_names(model):
    """The keyword names this model's forward takes, looked up once per generate() call (not per
    token): the name of its KV cache argument, and whether it takes `logits_to_keep`.

    transformers 5.2x renamed `past_key_values` to `cache` (the old name still works, with a
    warning). `logits_to_keep` (recent HF: Llama, GPT-2, Mistral, ...) makes the model skip the
    lm_head on every position but the last: (B, T, V) logits of a long prompt and a large vocabulary
    are big (dpo.sequence_logps checks for it too, to skip the prompt positions).
    """
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), ("logits_to_keep" in params)


def _last_logits(model, input_ids, attention_mask, position_ids, cache, cache_name, keep_last):
    """One forward, (B, t) new tokens -> float32 logits of the last position, (B, V).

    Sampling is done in float32 whatever the model's dtype (bf16 softmax/cumsum is too coarse for
    top_p).
    This is the function that `compile=True` hands to torch.compile for the decode step.
    """
    kwargs = {cache_name: cache, "logits_to_keep": 1} if keep_last else {cache_name: cache}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **kwargs)
    return out.logits[:, -1].float()  # (B, V)


# torch.compile'd decode steps, one per (mode, fullgraph): made once per process, reused
_COMPILED = {}


def _compiled_step(device, fullgraph):
    """The decode step under torch.compile. On CUDA, mode="reduce-overhead" records the whole
    forward (every layer's kernels) as one CUDA graph and replays it each token. Why it pays: a
    decode step reads the weights once (about 1 ms for 2 GB of bf16 at H100 bandwidth), while eager
    mode issues hundreds of small kernels from Python per step, which can take several times longer
    than the GPU work itself. A graph needs fixed shapes and fixed addresses, hence the static KV
    cache and the full-length mask."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if (mode, fullgraph) not in _COMPILED:
        # Each (batch, cache length) pair is its own graph; prompt widths are bucketed (PAD_MULTIPLE),
        # but a long run still sees more shapes than dynamo's default limit of 8 recompilations.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[mode, fullgraph] = torch.compile(_last_logits, mode=mode, fullgraph=fullgraph,
                                                   dynamic=False)
    return _COMPILED[mode, fullgraph]


# static cache: prompt widths are left-padded up to a multiple of this (few distinct shapes)
PAD_MULTIPLE = 64


def static_width(n):
    """The prompt width a static-cache decode uses for prompts of up to n tokens: n rounded up to
    PAD_MULTIPLE."""
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def new_static_cache(model, length):
    """A transformers StaticCache for `length` positions; its (B, H, length, D) buffers are made at
    the prefill."""
    import copy

    from transformers import StaticCache
    config = model.config
    if getattr(config, "sliding_window", None) is not None and config.sliding_window >= length:
        # The window never slides inside this cache (Mistral / zephyr: 4096 positions): full-attention
        # layers attend the same way and keep their position in a tensor, while a sliding layer keeps
        # it in a Python int that torch.compile guards on (one recompilation per decoded token).
        config = copy.copy(config)
        config.sliding_window = None
    return StaticCache(config=config, max_cache_len=length)


@torch.no_grad()
def generate(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
             temperature=1.0, top_p=1.0, top_k=0, generator=None, static=False, compile=False, cache=None):
    """Sample up to max_new_tokens tokens after LEFT-padded prompts (Algorithm 1, lines 2 and 7).

    input_ids, attention_mask: (B, T), left padded (pad_sequences(..., side="left")).
    Returns the new tokens only, (B, n) long with n <= max_new_tokens: after a row emits
    eos_token_id, the rest of that row is pad_token_id; n stops at the step where every row is
    finished.

    The KV cache holds each layer's keys and values of everything already read, so each decode step
    feeds one token per row instead of the whole sequence (generate_naive):
      static=False  DynamicCache: grows by one column per step (a torch.cat per layer per step).
                    Simple.
      static=True   StaticCache: allocated once at its final length T + max_new_tokens and written
                    in place; every decode step has the same shapes and buffers, which is what
                    compile=True (torch.compile; CUDA graphs on GPU) needs. Same tokens as
                    static=False in fp32 (in bf16 the masked extra columns change the attention
                    sums' rounding: near-ties may flip).
                    `cache`: a StaticCache of this batch size and at least T + max_new_tokens
                    positions (T rounded up to PAD_MULTIPLE) to reuse; it is reset here (see
                    sample_responses for why).
    """
    if compile and not static:
        raise ValueError("compile=True needs static=True: a compiled decode step needs fixed shapes")
    cache_name, keep_last = forward_names(model)
    if static:
        # Extra left padding up to a multiple of PAD_MULTIPLE: masked, so the output is unchanged,
        # and the compiled step sees a handful of cache lengths instead of one per batch.
        extra = static_width(input_ids.shape[1]) - input_ids.shape[1]
        input_ids = torch.nn.functional.pad(input_ids, (extra, 0), value=pad_token_id)
        attention_mask = torch.nn.functional.pad(attention_mask, (extra, 0), value=0)
    B, T = input_ids.shape
    # Positions count real tokens only, so a left-padded prompt gets the same positions 0..len-1
    # as the same prompt unpadded (HF generate does the same). Pad columns get 0; they are masked anyway.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    if static:
        if cache is None:
            cache = new_static_cache(model, T + max_new_tokens)
        # Full-attention layers hold every position: T + max_new_tokens, or more for a reused cache.
        # Sliding-window layers (Mistral with a window shorter than that) hold the last `window`
        # positions only, by design.
        full = [layer.max_cache_len for layer in cache.layers if not layer.is_sliding]
        L = max(full) if full else T + max_new_tokens
        if L < T + max_new_tokens:
            raise ValueError(f"the StaticCache holds {L} positions; this call needs {T} + {max_new_tokens}")
        cache.reset()  # zero length; the same buffers
        # The mask is allocated at full length once: column T + s (the token of step s) is 1 from
        # the start, which is harmless: causal masking hides every column after the current position.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, L - T)], dim=-1)  # (B, L)
    else:
        # filled by the model in place: one (B, H, t, D) key and value per layer
        cache = DynamicCache()
    if compile:
        # FSDP2's per-module hooks cannot be traced into one graph: under FSDP the step is compiled
        # in pieces (one per block, the hooks run eagerly between them; with gathered_weights they
        # do nothing).
        step_fn = _compiled_step(input_ids.device, fullgraph=not fsdp.is_fsdp(model))
    else:
        step_fn = _last_logits
    # Prefill: one forward over the whole prompt fills the cache and gives the first token's logits.
    # Always eager: its shape changes with every batch, and it runs once per batch.
    logits = _last_logits(model, input_ids, attention_mask, position_ids, cache, cache_name,
                          keep_last)  # (B, V)
    position_ids = position_ids[:, -1:]  # (B, 1): the last prompt position of each row
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)  # (B,)
    new_tokens = []
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, top_k, generator)  # (B,)
        # finished rows emit padding
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        new_tokens.append(tok)
        if eos_token_id is not None:
            finished |= tok == eos_token_id
        if step == max_new_tokens - 1:
            break
        # Checking `finished` reads a GPU value on the CPU (a sync that stalls the launch queue),
        # so it is done every SYNC_EVERY steps; the few extra steps only emit padding and are cut
        # off below.
        if eos_token_id is not None and (step + 1) % SYNC_EVERY == 0 and _all_finished(finished):
            break
        # Decode: feed only the new token; the cache holds the keys/values of everything before it.
        if not static:
            ones = attention_mask.new_ones(B, 1)
            attention_mask = torch.cat([attention_mask, ones], dim=-1)  # (B, T+step+1)
        position_ids = position_ids + 1  # (B, 1)
        if compile and input_ids.is_cuda:
            # one token = one replay of the recorded graph
            torch.compiler.cudagraph_mark_step_begin()
        logits = step_fn(model, tok[:, None], attention_mask, position_ids, cache, cache_name,
                         keep_last)  # (B, V)
    if not new_tokens:
        return input_ids.new_zeros(B, 0)
    out = torch.stack(new_tokens, dim=1)  # (B, n)
    if eos_token_id is not None:
        is_eos = out == eos_token_id  # (B, n)
        # every row finished: cut the columns after the last row's EOS (what stopping at once
        # would give)
        if bool(is_eos.any(1).all()):
            out = out[:, :int(is_eos.float().argmax(1).max()) + 1]
    return out


def sample_responses(model, prompts, *, batch_size, max_new_tokens, eos_token_id, pad_token_id,
                     temperature, top_p, top_k, seed, device, static=False, compile=False, progress=None,
                     offsets=None, width=None, on_batch=None):
    """One response per prompt (lists of token ids in, lists of token ids out), batch_size prompts
    at a time.

    The batch starting at prompt b draws from a generator seeded with seed + b (seed + offsets[j]
    for the j-th batch, when the batches are some of a larger set's: sample_dataset): the same seed
    gives the same samples, and a batch's samples do not depend on the batches before it. Each
    response keeps its EOS token at the end if one was produced; what follows (pad) is dropped.
    progress(done, total) and on_batch(j, the j-th batch's responses) after each batch.

    static / compile: see generate(). With static=True every batch is left-padded to one width (the
    longest prompt, rounded up to PAD_MULTIPLE) and a short last batch is filled up with copies of
    its first prompt (their answers are dropped), so all batches share ONE StaticCache: the compiled
    decode step then keeps its buffers (a new cache per batch would mean a recompilation or a
    re-recorded CUDA graph per batch). Greedy answers are the same in both modes; sampled ones too,
    except in a filled-up last batch (the fill-up rows draw from the same generator).
    """
    B = batch_size
    width = width or (static_width(max([len(p) for p in prompts] + [1])) if static else 0)
    cache = new_static_cache(model, width + max_new_tokens) if static and prompts else None
    responses = []
    for j, b in enumerate(range(0, len(prompts), B)):
        batch = prompts[b:b + B]
        n_real = len(batch)
        if static:
            batch = batch + [batch[0]] * (B - n_real)  # fill-up rows: same shapes for every batch
        ids, mask = pad_sequences(batch, pad_token_id, side="left", width=width)  # (B, T)
        generator = torch.Generator(device).manual_seed(seed + (offsets[j] if offsets else b))
        new = generate(model, ids.to(device), mask.to(device), max_new_tokens, eos_token_id,
                       pad_token_id, temperature=temperature, top_p=top_p, top_k=top_k,
                       generator=generator, static=static, compile=compile, cache=cache)  # (B, n)
        for row in new[:n_real].tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[:row.index(eos_token_id) + 1]  # keep the EOS, drop the padding after it
            responses.append(row)
        if on_batch:
            on_batch(j, responses[b:])
        if progress:
            progress(b + n_real, len(prompts))
    return responses


def sampling_batches(n_prompts, batch_size):
    """The global batches of sample_dataset over n_prompts prompts: (first prompt, number of
    prompts) of each, all of batch_size prompts but the last."""
    bs = min(batch_size, max(1, n_prompts))
    return [(k, min(bs, n_prompts - k)) for k in range(0, n_prompts, bs)]


def sample_dataset(model, prompts, tok, cfg, seed, device, greedy=False, log=None, what="y'", done=None,
                   on_batch=None):
    """Algorithm 1, lines 2 / 7 (and greedy evaluation): one response per prompt (token-id lists)
    from the current policy, every rank returning all of them in order.

    The batches are global: batch k holds prompts k*B .. k*B + B - 1 and draws from a generator
    seeded by its first prompt's index, and the ranks share out whole batches; so N processes sample
    exactly what one process does.

    done: {first prompt of a batch: its responses} of batches sampled before (a killed run's, read
    back by the caller: stages.Stages.sample); they are not sampled again, and the others give the
    same tokens as in an uninterrupted run (each batch has its own generator).
    on_batch(first prompt, responses): after each batch of this rank's share, the same number of
    times on every rank (the caller may write the batch, or stop there: a collective is allowed); a
    share padded to the others' length repeats a batch, reported again with responses None."""
    bs, t0 = min(cfg["gen_batch_size"], max(1, len(prompts))), time.time()
    # the global batches, by their first prompt
    all_starts = [k for k, _ in sampling_batches(len(prompts), cfg["gen_batch_size"])]
    finished = dict(done or {})
    starts = [k for k in all_starts if k not in finished]  # what is left to sample
    n_batches = math.ceil(len(starts) / fsdp.world())
    # one width for all ranks
    width = static_width(max([len(p) for p in prompts] + [1])) if cfg["gen_static"] else None
    temperature = 0.0 if greedy else cfg["temperature"]
    model.eval()

    def progress(done_local, _):  # at about 25/50/75/100%
        k = math.ceil(done_local / bs)
        if log and (k == n_batches or k % max(1, n_batches // 4) == 0):
            n = min(done_local * fsdp.world(), len(prompts))
            log(f"  sampling {what}: {n}/{len(prompts)} prompts, {time.time() - t0:.0f}s")

    # this rank's own batches (shard_gather pads a share by repeating a batch)
    mine = set(starts[fsdp.rank()::fsdp.world()])

    # this rank's batches, by their first prompt -> their responses, one list per batch
    def sample_share(share):
        batches = [prompts[k:k + bs] for k in share]  # the last one may be short
        reported = set()

        def report(j, rows):
            own = share[j] in mine and share[j] not in reported
            reported.add(share[j])
            on_batch(share[j], rows if own else None)
        out = iter(sample_responses(
            model, [p for b in batches for p in b], batch_size=bs, max_new_tokens=cfg["max_new_tokens"],
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=temperature,
            top_p=cfg["top_p"], top_k=cfg["top_k"], seed=seed * 100003, device=device,
            static=cfg["gen_static"], compile=cfg["gen_compile"], progress=progress, offsets=share,
            width=width, on_batch=report if on_batch else None))
        return [list(itertools.islice(out, len(b))) for b in batches]

    # --compile compiles the blocks for training; decoding into a DynamicCache changes their input
    # shapes at every token (a recompilation each time), so unless the decode step itself is compiled
    # (--gen_compile, fixed shapes) the sampler runs the blocks eagerly.
    if cfg["compile"] and not cfg["gen_compile"]:
        eager = torch.compiler.set_stance("force_eager")
    else:
        eager = contextlib.nullcontext()
    with fsdp.gathered_weights(model), fsdp.autocast(device, model), eager:
        finished.update(zip(starts, fsdp.shard_gather(starts, sample_share)))
    return [y for k in all_starts for y in finished[k]]
