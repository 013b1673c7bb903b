"""The sampler (generate.py): the KV-cache sampler against the cache-free oracle generate_naive and against
transformers' generate (greedy, Llama and GPT-2, with and without left padding; DynamicCache and StaticCache), top-k /
top-p and the draw, seeding, EOS (padding after it, early stop), pad_sequences, one StaticCache shared across batches.
"""
import pytest
import torch

import generate as generate_module
from generate import (
    apply_top_k,
    apply_top_p,
    generate,
    pad_sequences,
    sample_categorical,
    sample_next,
    sample_responses,
)
from tests.builders import (
    GEN_PAD,
    GEN_VOCAB,
    MODELS,
    ScriptedLM,
    gen_llama,
    gen_prompts,
    generate_naive,
)

SAME_LEN, MIXED_LEN = [7, 7, 7], [3, 9, 6, 1]


# ====================================================================================================
# The sampler (generate.py): the KV-cache sampler vs a cache-free oracle and vs transformers' generate
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# KV cache == no cache (greedy and sampled), with and without left padding
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("static", [False, True], ids=["DynamicCache", "StaticCache"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lengths", [SAME_LEN, MIXED_LEN])
def test_cache_matches_naive(name, lengths, static):
    model = MODELS[name]()
    ids, mask = pad_sequences(gen_prompts(lengths), GEN_PAD, side="left")
    fast = generate(model, ids, mask, 12, eos_token_id=None, pad_token_id=GEN_PAD, temperature=0, static=static)
    slow = generate_naive(model, ids, mask, 12, eos_token_id=None, pad_token_id=GEN_PAD, temperature=0)
    assert fast.shape == (len(lengths), 12)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("static", [False, True], ids=["DynamicCache", "StaticCache"])
def test_cache_matches_naive_sampling(static):
    # Same generator seed -> same draws: the cache changes nothing about the distribution sampled from.
    model = gen_llama(init=0.02)
    ids, mask = pad_sequences(gen_prompts(MIXED_LEN), GEN_PAD, side="left")
    kw = dict(eos_token_id=5, pad_token_id=GEN_PAD, temperature=0.9, top_p=0.95, top_k=40)
    fast = generate(model, ids, mask, 10, generator=torch.Generator().manual_seed(3), static=static, **kw)
    slow = generate_naive(model, ids, mask, 10, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(fast, slow)


@pytest.mark.slow
def test_compiled_static_decode_matches_naive():
    # torch.compile of the decode step (fullgraph: no graph break inside the model; on CUDA the same code
    # path records a CUDA graph). On the CPU it is slow to compile (~20 s) but checks the traced step.
    model = gen_llama()
    ids, mask = pad_sequences(gen_prompts(MIXED_LEN), GEN_PAD, side="left")
    eos = 7  # emitted by some rows: trimming and padding after EOS are compared too
    slow = generate_naive(model, ids, mask, 12, eos_token_id=eos, pad_token_id=GEN_PAD, temperature=0)
    for _ in range(2):  # the second call reuses the compiled step
        fast = generate(model, ids, mask, 12, eos_token_id=eos, pad_token_id=GEN_PAD, temperature=0,
                        static=True, compile=True)
        assert torch.equal(fast, slow)
    with pytest.raises(ValueError, match="static"):
        generate(model, ids, mask, 4, eos_token_id=None, pad_token_id=GEN_PAD, temperature=0, compile=True)


# ----------------------------------------------------------------------------------------------------
# greedy == HF generate (do_sample=False), Llama and GPT-2, with and without left padding
# ----------------------------------------------------------------------------------------------------
# GPT-2 matters here: its positions are absolute, so wrong position_ids under left padding change its
# output, while RoPE (Llama) only sees relative positions and would not notice a per-row shift.
@pytest.mark.parametrize("static", [False, True], ids=["DynamicCache", "StaticCache"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lengths", [SAME_LEN, MIXED_LEN])
def test_greedy_matches_hf_generate(name, lengths, static):
    model = MODELS[name]()
    ids, mask = pad_sequences(gen_prompts(lengths), GEN_PAD, side="left")
    eos, n_new = {"llama": 7, "gpt2": 52}[name], 12  # emitted by some rows: padding after EOS is compared too
    ours = generate(model, ids, mask, n_new, eos_token_id=eos, pad_token_id=GEN_PAD, temperature=0, static=static)
    hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                        eos_token_id=eos, pad_token_id=GEN_PAD)[:, ids.shape[1]:]  # new tokens only
    # Both pad after EOS and stop when every row has it; compare on the common length.
    n = min(ours.shape[1], hf.shape[1])
    assert n >= 8, "too few tokens compared: pick another eos"
    assert torch.equal(ours[:, :n], hf[:, :n])
    assert ours.shape[1] == hf.shape[1]


# ----------------------------------------------------------------------------------------------------
# top-k / top-p: top_p -> 0 and top_k = 1 are greedy; the draw itself
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [dict(top_p=1e-9), dict(top_k=1), dict(top_p=1e-9, top_k=1)])
def test_degenerate_sampling_is_greedy(knobs):
    model = gen_llama(init=0.02)  # a flat distribution: plain sampling would almost surely differ
    ids, mask = pad_sequences(gen_prompts(MIXED_LEN), GEN_PAD, side="left")
    greedy = generate(model, ids, mask, 10, eos_token_id=None, pad_token_id=GEN_PAD, temperature=0)
    sampled = generate(model, ids, mask, 10, eos_token_id=None, pad_token_id=GEN_PAD, temperature=1.0,
                       generator=torch.Generator().manual_seed(0), **knobs)
    assert torch.equal(greedy, sampled)
    plain = generate(model, ids, mask, 10, eos_token_id=None, pad_token_id=GEN_PAD, temperature=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert not torch.equal(greedy, plain)  # the check above is not vacuous


def test_apply_top_k_and_sample_top_p():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert torch.isinf(out).sum(-1).tolist() == [2, 2]
    assert torch.equal(out.argsort(-1, descending=True)[:, :2], torch.tensor([[1, 2], [2, 3]]))
    assert torch.equal(apply_top_k(logits, 0), logits)  # off
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.1, 0.4, 0.35, 0.15]]).repeat(200, 1)
    def sample_top_p(probs, p, g):
        return sample_categorical(torch.softmax(apply_top_p(probs.log(), p), -1), g)
    ids = sample_top_p(probs, 0.5, g)  # nucleus = {1, 2} (0.4 < 0.5, 0.4 + 0.35 >= 0.5)
    assert set(ids.tolist()) == {1, 2}
    assert set(sample_top_p(probs, 0.3, g).tolist()) == {1}
    assert torch.equal(sample_next(logits, 0, 1.0, 0, None), torch.tensor([1, 2]))


def test_top_p_keeps_what_transformers_keeps():
    """Ties at the cutoff (bf16-rounded logits) and prefixes whose mass equals p exactly: the kept set is
    TopPLogitsWarper's, row for row."""
    from transformers.generation.logits_process import TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(192, 50, generator=g) * 2).bfloat16().float()  # coarse: many ties
    logits[:8] = torch.tensor([2.0, 2.0, 1.0, 1.0, 0.0, 0.0] + [-30.0] * 44).log_softmax(-1)  # exact binary masses
    for p in (0.1, 0.25, 0.5, 0.75, 0.9, 0.95):
        ours = torch.isinf(apply_top_p(logits, p))
        theirs = torch.isinf(TopPLogitsWarper(top_p=p)(None, logits.clone()))
        assert torch.equal(ours, theirs), (p, (ours != theirs).any(-1).nonzero().flatten().tolist())


def test_sample_categorical_is_multinomial_without_a_host_sync():
    """The draw is torch.multinomial's own for one sample (same generator, same tokens) minus its host-side
    input check: on a GPU that check is a sync per decode step. The profiler counts .item()-style reads."""
    from torch.profiler import profile
    probs = torch.softmax(torch.randn(16, 300, generator=torch.Generator().manual_seed(1)) * 3, -1)
    for seed in range(3):
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        assert torch.equal(generate_module.sample_categorical(probs, torch.Generator().manual_seed(seed)), want)
    p = torch.tensor([[0.1, 0.2, 0.7]]).repeat(100_000, 1)  # and it samples the distribution
    freq = torch.bincount(generate_module.sample_categorical(p, torch.Generator().manual_seed(0)), minlength=3) / 1e5
    assert torch.allclose(freq, p[0], atol=0.01)

    def host_reads(fn):
        with profile() as prof:
            fn()
        return sum(e.name == "aten::_local_scalar_dense" for e in prof.events())
    g = torch.Generator().manual_seed(0)
    assert host_reads(lambda: torch.multinomial(probs, 1, generator=g)) > 0  # the check above is not vacuous
    for top_p, top_k in ((1.0, 0), (0.9, 50)):
        assert host_reads(lambda: sample_next(torch.randn(16, 300), 1.0, top_p, top_k, g)) == 0


# ----------------------------------------------------------------------------------------------------
# seeding: same seed -> same samples, different seed -> different samples
# ----------------------------------------------------------------------------------------------------
def test_seeding():
    model = gen_llama(init=0.02)
    ps = gen_prompts([3, 8, 5, 2, 6])
    kw = dict(batch_size=2, max_new_tokens=8, eos_token_id=2, pad_token_id=GEN_PAD, temperature=1.0,
              top_p=1.0, top_k=0, device="cpu")
    a = sample_responses(model, ps, seed=0, **kw)
    b = sample_responses(model, ps, seed=0, **kw)
    c = sample_responses(model, ps, seed=1, **kw)
    assert a == b
    assert a != c
    assert len(a) == len(ps) and all(isinstance(t, int) for r in a for t in r)
    # a batch's samples depend on its own seed (seed + its first index), not on the batches before it
    assert sample_responses(model, ps[2:], seed=2, **kw) == a[2:]


# ----------------------------------------------------------------------------------------------------
# EOS: padding after it, early stop, stripping in sample_responses
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sync_every, calls", [(1, 3), (4, 4), (16, 10)])
def test_eos_padding_and_early_stop(monkeypatch, sync_every, calls):
    lens, stop = [2, 4, 3], [0, 2, 1]  # row 0 emits EOS first, row 1 after two tokens, row 2 after one
    model = ScriptedLM(lens, stop)
    ids, mask = pad_sequences([[5] * n for n in lens], GEN_PAD, side="left")
    monkeypatch.setattr(generate_module, "SYNC_EVERY", sync_every)
    out = generate(model, ids, mask, 10, eos_token_id=2, pad_token_id=GEN_PAD, temperature=0)
    assert out.tolist() == [[2, GEN_PAD, GEN_PAD], [10, 11, 2], [10, 2, GEN_PAD]]  # whatever SYNC_EVERY is
    # Checked every step: prefill + 2 decode steps, stopped as soon as all rows had EOS. Checked every 4th
    # step: one wasted decode step. Every 16th: all 10 steps run (the extra columns are cut off).
    assert model.calls == calls
    model.calls = 0
    assert generate(model, ids, mask, 2, eos_token_id=2, pad_token_id=GEN_PAD, temperature=0).shape == (3, 2)
    assert model.calls == 2  # max_new_tokens reached: no forward for a token never sampled
    resp = sample_responses(ScriptedLM(lens, [0, 2, 9]), [[5] * n for n in lens], batch_size=3,
                            max_new_tokens=4, eos_token_id=2, pad_token_id=GEN_PAD, temperature=0, top_p=1.0,
                            top_k=0, seed=0, device="cpu")
    assert resp == [[2], [10, 11, 2], [10, 11, 12, 13]]  # EOS kept, pad dropped, no EOS -> full length


def test_eos_first_token_real_model():
    # eos := the token greedy emits first for every row (same prompt), so exactly one column comes back.
    model = gen_llama()
    ids, mask = pad_sequences([[4, 5, 6]] * 2, GEN_PAD, side="left")
    first = generate(model, ids, mask, 5, eos_token_id=None, pad_token_id=GEN_PAD, temperature=0)[0, 0].item()
    out = generate(model, ids, mask, 5, eos_token_id=first, pad_token_id=GEN_PAD, temperature=0)
    assert out.tolist() == [[first], [first]]


# ----------------------------------------------------------------------------------------------------
# pad_sequences
# ----------------------------------------------------------------------------------------------------
def test_pad_sequences():
    seqs = [[1, 2, 3], [4], []]
    ids, mask = pad_sequences(seqs, 9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad_sequences(seqs, 9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError):
        pad_sequences(seqs, 9, side="middle")


# ----------------------------------------------------------------------------------------------------
# StaticCache: one cache for every batch of sample_responses
# ----------------------------------------------------------------------------------------------------
def test_static_cache_of_a_sliding_window_model():
    """Mistral whose every layer slides (window 8, shorter than the padded prompt + new tokens): the StaticCache's
    layers hold 8 positions by design; greedy equals the DynamicCache path and the cache-free forward (the model's
    own definition; HF generate's sliding cache differs from it here), sampling too."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=GEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=8, bos_token_id=1, eos_token_id=2,
        pad_token_id=GEN_PAD)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ids, mask = pad_sequences(gen_prompts([6, 3, 10]), GEN_PAD, side="left")
    slow = generate_naive(model, ids, mask, 12, eos_token_id=None, pad_token_id=GEN_PAD, temperature=0)
    for static in (False, True):
        assert torch.equal(generate(model, ids, mask, 12, None, GEN_PAD, temperature=0, static=static), slow)
    kw = dict(temperature=1.0, top_p=0.9, top_k=0)
    a, b = (generate(model, ids, mask, 12, None, GEN_PAD, generator=torch.Generator().manual_seed(5), static=st, **kw)
            for st in (False, True))
    assert torch.equal(a, b)


def test_sample_responses_static_shares_one_cache():
    # static=True: one width, the short last batch filled up, ONE StaticCache reset for every batch; the
    # answers are those of the DynamicCache path: all of them when greedy; when sampling with the same seeds,
    # those of the full batches (the fill-up rows of the last batch also draw from its generator).
    model = gen_llama(init=0.05)
    ps = gen_prompts([3, 9, 5, 1, 7, 4, 8])  # batches of 3: the last one has a single prompt
    for temperature in (0.0, 1.0):
        kw = dict(batch_size=3, max_new_tokens=10, eos_token_id=7, pad_token_id=GEN_PAD, temperature=temperature,
                  top_p=1.0, top_k=0, seed=4, device="cpu")
        made = []
        real = generate_module.new_static_cache
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(generate_module, "new_static_cache", lambda *a: made.append(1) or real(*a))
            static = sample_responses(model, ps, static=True, **kw)
        assert len(made) == 1
        dynamic = sample_responses(model, ps, **kw)
        assert static == dynamic if temperature == 0 else static[:6] == dynamic[:6]
        assert len(static) == len(ps)
    ids, mask = pad_sequences(ps[:2], GEN_PAD, side="left")
    with pytest.raises(ValueError, match="holds 70 positions"):  # the prompt is padded to 64, + 10 new tokens
        generate(model, ids, mask, 10, eos_token_id=None, pad_token_id=GEN_PAD, static=True,
                 cache=generate_module.new_static_cache(model, 70))
