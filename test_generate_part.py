"""Tests of generate.py: the KV-cache sampler against a cache-free reference and against HF's own generate.

Tiny random models built from configs (no downloads), float32, CPU. Run: python -m pytest -q test_generate_part.py
"""
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from generate import (apply_top_k, generate, generate_naive, pad_sequences, sample_next, sample_responses,
                      sample_top_p)

VOCAB = 96
PAD = 0


def tiny_llama(init=0.2, seed=0):
    # init=0.2 (10x HF's default) spreads the logits, so greedy argmax is not decided by float near-ties.
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=init, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).float().eval()


def tiny_gpt2(init=0.2, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=128,
                     initializer_range=init, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    return GPT2LMHeadModel(cfg).float().eval()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SAME_LEN, MIXED_LEN = [7, 7, 7], [3, 9, 6, 1]


# ----------------------------------------------------------------------------------------------------
# 1. KV cache == no cache (greedy), with and without left padding
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lengths", [SAME_LEN, MIXED_LEN])
def test_cache_matches_naive(name, lengths):
    model = MODELS[name]()
    ids, mask = pad_sequences(prompts(lengths), PAD, side="left")
    fast = generate(model, ids, mask, 12, eos_token_id=None, pad_token_id=PAD, temperature=0)
    slow = generate_naive(model, ids, mask, 12, eos_token_id=None, pad_token_id=PAD, temperature=0)
    assert fast.shape == (len(lengths), 12)
    assert torch.equal(fast, slow)


def test_cache_matches_naive_sampling():
    # Same generator seed -> same draws: the cache changes nothing about the distribution sampled from.
    model = tiny_llama(init=0.02)
    ids, mask = pad_sequences(prompts(MIXED_LEN), PAD, side="left")
    kw = dict(eos_token_id=5, pad_token_id=PAD, temperature=0.9, top_p=0.95, top_k=40)
    fast = generate(model, ids, mask, 10, generator=torch.Generator().manual_seed(3), **kw)
    slow = generate_naive(model, ids, mask, 10, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(fast, slow)


# ----------------------------------------------------------------------------------------------------
# 2. greedy == HF generate (do_sample=False), Llama and GPT-2, with and without left padding
# ----------------------------------------------------------------------------------------------------
# GPT-2 matters here: its positions are absolute, so wrong position_ids under left padding change its
# output, while RoPE (Llama) only sees relative positions and would not notice a per-row shift.
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lengths", [SAME_LEN, MIXED_LEN])
def test_greedy_matches_hf_generate(name, lengths):
    model = MODELS[name]()
    ids, mask = pad_sequences(prompts(lengths), PAD, side="left")
    eos, n_new = {"llama": 7, "gpt2": 52}[name], 12  # emitted by some rows: padding after EOS is compared too
    ours = generate(model, ids, mask, n_new, eos_token_id=eos, pad_token_id=PAD, temperature=0)
    hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                        eos_token_id=eos, pad_token_id=PAD)[:, ids.shape[1]:]  # new tokens only
    # Both pad after EOS and stop when every row has it; compare on the common length.
    n = min(ours.shape[1], hf.shape[1])
    assert n >= 8, "too few tokens compared: pick another eos"
    assert torch.equal(ours[:, :n], hf[:, :n])
    assert ours.shape[1] == hf.shape[1]


# ----------------------------------------------------------------------------------------------------
# 3./5. top_p -> 0 and top_k = 1 are greedy
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [dict(top_p=1e-9), dict(top_k=1), dict(top_p=1e-9, top_k=1)])
def test_degenerate_sampling_is_greedy(knobs):
    model = tiny_llama(init=0.02)  # a flat distribution: plain sampling would almost surely differ
    ids, mask = pad_sequences(prompts(MIXED_LEN), PAD, side="left")
    greedy = generate(model, ids, mask, 10, eos_token_id=None, pad_token_id=PAD, temperature=0)
    sampled = generate(model, ids, mask, 10, eos_token_id=None, pad_token_id=PAD, temperature=1.0,
                       generator=torch.Generator().manual_seed(0), **knobs)
    assert torch.equal(greedy, sampled)
    plain = generate(model, ids, mask, 10, eos_token_id=None, pad_token_id=PAD, temperature=1.0,
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
    ids = sample_top_p(probs, 0.5, g)  # nucleus = {1, 2} (0.4 < 0.5, 0.4 + 0.35 >= 0.5)
    assert set(ids.tolist()) == {1, 2}
    assert set(sample_top_p(probs, 0.3, g).tolist()) == {1}
    assert torch.equal(sample_next(logits, 0, 1.0, 0, None), torch.tensor([1, 2]))


# ----------------------------------------------------------------------------------------------------
# 4. same seed -> same samples, different seed -> different samples
# ----------------------------------------------------------------------------------------------------
def test_seeding():
    model = tiny_llama(init=0.02)
    ps = prompts([3, 8, 5, 2, 6])
    kw = dict(batch_size=2, max_new_tokens=8, eos_token_id=2, pad_token_id=PAD, temperature=1.0,
              top_p=1.0, top_k=0, device="cpu")
    a = sample_responses(model, ps, seed=0, **kw)
    b = sample_responses(model, ps, seed=0, **kw)
    c = sample_responses(model, ps, seed=1, **kw)
    assert a == b
    assert a != c
    assert len(a) == len(ps) and all(isinstance(t, int) for r in a for t in r)


# ----------------------------------------------------------------------------------------------------
# 6. EOS: padding after it, early stop, stripping in sample_responses
# ----------------------------------------------------------------------------------------------------
class ScriptedLM(torch.nn.Module):
    """A fake causal LM with a known greedy output: row b emits 10, 11, 12, ... and EOS (=2) after
    stop_after[b] tokens (counted from the row's prompt length, read off position_ids). Counts forwards."""

    def __init__(self, prompt_lens, stop_after, vocab=16):
        super().__init__()
        self.prompt_lens, self.stop_after, self.vocab, self.calls = prompt_lens, stop_after, vocab, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        self.calls += 1
        B, T = input_ids.shape
        k = position_ids[:, -1] + 1 - torch.tensor(self.prompt_lens)  # tokens generated so far per row
        nxt = torch.where(k >= torch.tensor(self.stop_after), 2, 10 + k)
        logits = torch.zeros(B, T, self.vocab)
        logits[torch.arange(B), -1, nxt] = 5.0
        return SimpleNamespace(logits=logits)


def test_eos_padding_and_early_stop():
    lens, stop = [2, 4, 3], [0, 2, 1]  # row 0 emits EOS first, row 1 after two tokens, row 2 after one
    model = ScriptedLM(lens, stop)
    ids, mask = pad_sequences([[5] * n for n in lens], PAD, side="left")
    out = generate(model, ids, mask, 10, eos_token_id=2, pad_token_id=PAD, temperature=0)
    assert out.tolist() == [[2, PAD, PAD], [10, 11, 2], [10, 2, PAD]]
    assert model.calls == 3  # prefill + 2 decode steps: stopped as soon as all rows had EOS
    model.calls = 0
    assert generate(model, ids, mask, 2, eos_token_id=2, pad_token_id=PAD, temperature=0).shape == (3, 2)
    assert model.calls == 2  # max_new_tokens reached: no forward for a token never sampled
    resp = sample_responses(ScriptedLM(lens, [0, 2, 9]), [[5] * n for n in lens], batch_size=3,
                            max_new_tokens=4, eos_token_id=2, pad_token_id=PAD, temperature=0, top_p=1.0,
                            top_k=0, seed=0, device="cpu")
    assert resp == [[2], [10, 11, 2], [10, 11, 12, 13]]  # EOS kept, pad dropped, no EOS -> full length


def test_eos_first_token_real_model():
    # eos := the token greedy emits first for every row (same prompt), so exactly one column comes back.
    model = tiny_llama()
    ids, mask = pad_sequences([[4, 5, 6]] * 2, PAD, side="left")
    first = generate(model, ids, mask, 5, eos_token_id=None, pad_token_id=PAD, temperature=0)[0, 0].item()
    out = generate(model, ids, mask, 5, eos_token_id=first, pad_token_id=PAD, temperature=0)
    assert out.tolist() == [[first], [first]]


# ----------------------------------------------------------------------------------------------------
# Distributed: ranks whose rows finish at different steps still take the same number of steps
# ----------------------------------------------------------------------------------------------------
def _dist_worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = ScriptedLM([2], [0 if rank == 0 else 3])  # rank 0 is done at once, rank 1 after 4 tokens
        ids, mask = pad_sequences([[5, 5]], PAD, side="left")
        out = generate(model, ids, mask, 10, eos_token_id=2, pad_token_id=PAD, temperature=0)
        results[rank] = (out.tolist(), model.calls)
    finally:
        dist.destroy_process_group()


def test_distributed_same_number_of_steps():
    with tempfile.TemporaryDirectory() as d:
        results = mp.Manager().dict()
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "pg"), results), nprocs=2)
        assert results[0] == ([[2, PAD, PAD, PAD]], 4)  # kept stepping (emitting pad) for rank 1
        assert results[1] == ([[10, 11, 12, 2]], 4)


# ----------------------------------------------------------------------------------------------------
# 7. pad_sequences
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
