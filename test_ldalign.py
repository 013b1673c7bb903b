"""Tests of the LD-Align reference implementation (CPU, tiny models built from configs, no downloads).

    python -m pytest -q test_ldalign.py

Sections: the loss (Eq. 4/5), log-probs (the shift), data validation, the sampler (generate.py), the
guide (guide.py), FSDP2 on 2 processes, and an end-to-end run of ldalign.py.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dpo
import ldalign

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_llama(vocab=64, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    return LlamaForCausalLM(cfg).eval()


# ====================================================================================================
# Eq. 4 / Eq. 5: the loss
# ====================================================================================================
def test_loss_equals_hand_computation():
    pc, pr = torch.tensor([-3.0, -10.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -9.0]), torch.tensor([-3.0, -2.5])
    w, beta = torch.tensor([0.5, 1.5]), 0.1
    losses, cr, rj = dpo.ldalign_loss(pc, pr, rc, rr, w, beta)
    for i in range(2):
        z = beta * ((pc[i] - rc[i]).item() - (pr[i] - rr[i]).item())
        expected = -w[i].item() * math.log(1.0 / (1.0 + math.exp(-z)))  # -w log sigma(z)
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert cr[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert rj[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())


def test_unit_weights_give_plain_dpo():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8) * 5 for _ in range(4))
    beta = 0.3
    losses, _, _ = dpo.ldalign_loss(pc, pr, rc, rr, torch.ones(8), beta)
    dpo_losses = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))  # Rafailov et al. (2023), Eq. 7
    torch.testing.assert_close(losses, dpo_losses)


def test_gradient_matches_eq5_with_sigma_minus_z():
    """Eq. 5 (corrected): grad = -beta w sigma(-z) (grad log p(y) - grad log p(y')); the paper prints sigma(z)."""
    torch.manual_seed(0)
    pc, pr = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    rc, rr, w = torch.randn(5), torch.randn(5), torch.rand(5) * 2
    beta = 0.5
    losses, _, _ = dpo.ldalign_loss(pc, pr, rc, rr, w, beta)
    losses.sum().backward()
    z = beta * ((pc - pr) - (rc - rr)).detach()
    torch.testing.assert_close(pc.grad, -beta * w * torch.sigmoid(-z))  # d/d log p(y)
    torch.testing.assert_close(pr.grad, beta * w * torch.sigmoid(-z))  # d/d log p(y')
    assert not torch.allclose(pc.grad, -beta * w * torch.sigmoid(z))  # the printed sigma(z) is wrong


def test_weights_are_constants():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    losses, _, _ = dpo.ldalign_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), w, 0.1)
    assert not losses.requires_grad  # nothing flows into phi through s/S


def test_latent_weights_mean_one_and_errors():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0])
    w = dpo.latent_weights(s)
    torch.testing.assert_close(w, s / 3.0)  # S = mean s = 3 (Algorithm 1, line 9)
    assert w.mean().item() == pytest.approx(1.0)
    for bad, msg in ((torch.zeros(3), "mean distance S is 0"), (torch.tensor([1.0, float("nan")]), "NaN"),
                     (torch.tensor([1.0, float("inf")]), "NaN or inf"), (torch.tensor([]), "non-empty")):
        with pytest.raises(ValueError, match=msg):
            dpo.latent_weights(bad)


# ====================================================================================================
# log p(y|x): response tokens only, the shift pinned
# ====================================================================================================
def test_sequence_logps_equals_minus_cross_entropy_on_response_only():
    model = tiny_llama()
    prompts = [[1, 5, 6, 7], [1, 9]]
    responses = [[10, 11, 2], [12, 13, 14, 15, 2]]
    ids, mask, labels = dpo.collate(prompts, responses, pad_id=0)
    got = dpo.sequence_logps(model, ids, mask, labels)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        logits = model(seq).logits[0]  # (T, V), unpadded
        # token j of the sequence is predicted by logits[j - 1]; score only the response tokens
        ce = F.cross_entropy(logits[len(p) - 1:-1], seq[0, len(p):], reduction="sum")
        assert got[i].item() == pytest.approx(-ce.item(), rel=1e-5, abs=1e-5)
    # the classic off-by-one (scoring token j with logits[j]) gives a different number
    logits = model(ids, attention_mask=mask).logits.float()
    wrong = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    wrong = (wrong * (labels != dpo.IGNORE)).sum(-1)
    assert not torch.allclose(wrong, got)


def test_collate_masks_prompt_and_padding():
    ids, mask, labels = dpo.collate([[1, 5], [1, 6, 7]], [[8, 2], [9, 2]], pad_id=0)
    assert ids.tolist() == [[1, 5, 8, 2, 0], [1, 6, 7, 9, 2]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, 8, 2, -100], [-100, -100, -100, 9, 2]]


def test_policy_equals_reference_at_step_zero():
    """With ref = theta_{t-1} = the policy, z = 0 and each pair's loss is w log 2 before the first update."""
    model = tiny_llama()
    pairs = [([1, 5], [7, 8, 2], [9, 2]), ([1, 6, 6], [3, 2], [4, 4, 2])]
    rc, rr = dpo.reference_logps(model, pairs, 2, torch.device("cpu"))
    pc, pr = dpo.pair_logps(model, pairs, torch.device("cpu"))
    w = torch.tensor([0.5, 1.5])
    losses, _, _ = dpo.ldalign_loss(pc, pr, rc, rr, w, 0.1)
    torch.testing.assert_close(losses.detach(), w * math.log(2))


def test_global_batches_fill_last_batch_with_zero_weight_items():
    batches = dpo.global_batches(10, 4, 1, seed=0, world=2)
    assert len(batches) == 3 and all(len(i) == 4 for i, _ in batches)
    assert sum(sum(v) for _, v in batches) == 10
    assert sorted(i for idx, v in batches for i, ok in zip(idx, v) if ok) == list(range(10))
    with pytest.raises(ValueError, match="multiple"):
        dpo.global_batches(10, 3, 1, seed=0, world=2)


def test_dpo_train_moves_policy_towards_chosen():
    model = tiny_llama()
    pairs = [([1, 5 + i % 3], [7, 8, 2], [9, 9, 2]) for i in range(8)]
    rc, rr = dpo.reference_logps(model, pairs, 8, torch.device("cpu"))
    hist = dpo.dpo_train(model, pairs, rc, rr, torch.ones(8), beta=0.5, lr=1e-2, epochs=5, batch_size=4,
                         micro_batch_size=2, device=torch.device("cpu"), optimizer="adamw")
    assert hist[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert hist[-1]["loss"] < 0.5 * math.log(2) and hist[-1]["reward_acc"] == 1.0


def test_nan_loss_stops_with_clear_message():
    model = tiny_llama()
    pairs = [([1, 5], [7, 2], [9, 2])] * 4
    with pytest.raises(FloatingPointError, match="last finished checkpoint"):
        dpo.dpo_train(model, pairs, torch.zeros(4), torch.zeros(4), torch.full((4,), float("nan")), beta=0.1, lr=1e-3,
                      epochs=1, batch_size=4, micro_batch_size=4, device=torch.device("cpu"))


# ====================================================================================================
# Data: bad input names file:line, before any compute
# ====================================================================================================
def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


@pytest.mark.parametrize("bad, msg", [
    ('{"messages": [', "not valid JSON"),
    ('{"text": "no messages"}', "missing field 'messages'"),
    ('[1, 2]', "expected a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "'messages' must be a list starting with"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}), "roles"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}), "prompt .* is empty"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}), "response .* is empty"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}), "must be a string"),
])
def test_malformed_jsonl_rejected_with_file_and_line(tmp_path, bad, msg):
    path = _write(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError, match=f"{path}:3: .*{msg}"):
        ldalign.load_sft_jsonl(path)


def test_jsonl_reads_first_turn_and_prompt_response_form(tmp_path):
    multi = json.dumps({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]})
    path = _write(tmp_path, [multi, json.dumps({"prompt": "p", "response": "r"})])
    recs = ldalign.load_sft_jsonl(path)
    assert [(r["x"], r["y"], r["where"]) for r in recs] == [("q1", "a1", f"{path}:1"), ("p", "r", f"{path}:2")]


def _toy_tok():
    recs = ldalign.load_sft_jsonl(os.path.join(HERE, "data", "sort_train.jsonl"), 300)
    return ldalign.train_toy_tokenizer([t for r in recs for t in (r["x"], r["y"])])


def test_overlength_rejected_with_file_and_line_or_skipped(tmp_path):
    tok = _toy_tok()
    long_y = " ".join(str(i) for i in range(40))
    path = _write(tmp_path, [GOOD, json.dumps({"prompt": "sort: 1 2", "response": long_y})])
    cfg = dict(max_prompt_len=32, max_len=64, max_new_tokens=16, guide_max_len=128, overlength="error", data=path)
    with pytest.raises(ValueError, match=f"{path}:2: prompt \\+ response have .* > max_len=64"):
        ldalign.tokenize_data(ldalign.load_sft_jsonl(path), tok, tok, cfg, print)
    kept, skipped = ldalign.tokenize_data(ldalign.load_sft_jsonl(path), tok, tok, dict(cfg, overlength="skip"), print)
    assert len(kept) == 1 and skipped[0]["where"] == f"{path}:2"


def test_one_prompt_format_for_generation_and_training():
    tok = _toy_tok()
    px = ldalign.prompt_ids(tok, "sort: 3 1 2")
    assert px[0] == tok.bos_token_id and px.count(tok.bos_token_id) == 1
    assert tok.decode(px) == "<|bos|><|user|>sort: 3 1 2<|end|><|assistant|>"
    # the DPO batch is built from exactly these ids
    ids, _, labels = dpo.collate([px], [ldalign.response_ids(tok, "1 2 3")], 0)
    assert ids[0, :len(px)].tolist() == px and (labels[0, :len(px)] == dpo.IGNORE).all()
    assert ids[0, -1].item() == tok.eos_token_id


def test_shipped_data_is_reproducible_and_disjoint(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_sort", os.path.join(HERE, "data", "make_sort.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import random
    rng, seen = random.Random(0), set()
    ev, tr = mod.make_records(200, rng, seen), mod.make_records(2000, rng, seen)
    assert ev == [json.loads(l) for l in open(os.path.join(HERE, "data", "sort_eval.jsonl"))]
    assert tr == [json.loads(l) for l in open(os.path.join(HERE, "data", "sort_train.jsonl"))]
    assert not {r["prompt"] for r in ev} & {r["prompt"] for r in tr}


# ====================================================================================================
# FSDP2 on 2 processes (gloo, CPU) == 1 process: same losses, same updated weights
# ====================================================================================================
def _fsdp_worker(out_prefix):
    """Run under `python` or `torchrun`: one short LD-Align update of a tiny Llama, written to out_prefix."""
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    rank, world, device = ldalign.init_distributed()
    model = tiny_llama(seed=0).train()
    if world > 1:
        model = ldalign.fsdp_wrap(model, device)
    g = torch.Generator().manual_seed(1)
    pairs = [([1] + torch.randint(3, 64, (int(n),), generator=g).tolist(),
              torch.randint(3, 64, (int(m),), generator=g).tolist() + [2],
              torch.randint(3, 64, (int(k),), generator=g).tolist() + [2])
             for n, m, k in torch.randint(1, 6, (13, 3), generator=g)]  # 13 pairs: the last batch is filled up
    idx, n_real = ldalign.shard_indices(len(pairs), rank, world)
    rc, rr = dpo.reference_logps(model, [pairs[i] for i in idx], 2, device)
    ref_c = ldalign.gather_floats(rc[:n_real], idx[:n_real], len(pairs), device)
    ref_r = ldalign.gather_floats(rr[:n_real], idx[:n_real], len(pairs), device)
    w = dpo.latent_weights(torch.rand(len(pairs), generator=g) + 0.1)
    hist = dpo.dpo_train(model, pairs, ref_c, ref_r, w, beta=0.5, lr=1e-2, epochs=2, batch_size=4, micro_batch_size=1,
                         device=device, optimizer="adamw", seed=3)
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in sd.items()}, out_prefix + ".safetensors")
        json.dump({"loss": [h["loss"] for h in hist], "ref": ref_c.tolist() + ref_r.tolist()}, open(out_prefix + ".json", "w"))
    if world > 1:
        torch.distributed.destroy_process_group()


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    from safetensors.torch import load_file
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, __file__, "fsdp_worker", one], check=True, cwd=HERE, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                    "fsdp_worker", two], check=True, cwd=HERE, env=env, timeout=300)
    a, b = json.load(open(one + ".json")), json.load(open(two + ".json"))
    assert a["ref"] == pytest.approx(b["ref"], abs=1e-5)  # reference log-probs gathered across ranks
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)  # the global-batch loss at every step
    wa, wb = load_file(one + ".safetensors"), load_file(two + ".safetensors")
    assert wa.keys() == wb.keys()
    before = tiny_llama(seed=0).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-4)
    assert any(not torch.equal(wa[k], before[k]) for k in wa)  # the update did move the weights


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "fsdp_worker":
    _fsdp_worker(sys.argv[2])
