"""Tests of the LD-Align reference implementation (CPU, tiny models built from configs, no downloads).

    python -m pytest -q -m "not slow"     # fast: every equation and every line of Algorithm 1
    python -m pytest -q                   # all; CI runs all (the README gives both times)

Slow (@pytest.mark.slow): the multi-process tests (gloo, torchrun), the end-to-end runs of ldalign.py and train.sh,
kill / resume, bench.py, and the inductor compile of the decode step. This file holds the paper's tests (arXiv
2404.06390), in its order; the engineering around it is tested in tests/, one file per concern (below). The fixtures
are in conftest.py; their builders and the shared helpers (tiny models, data, tokenizers, HF folders, the helpers
that run ldalign.py) in tests/builders.py.

Equation / Algorithm 1 line -> tests
    Eq. 1, log p(y|x) (sequence log-probs, the shift)
        test_sequence_logps_equals_minus_cross_entropy_on_response_only,
        test_sequence_logps_skips_shared_prompt_columns, test_collate_masks_prompt_and_padding
    Eq. 2, the guide T = (phi, psi) (Algorithm 1, line 4)
        test_guide_loss_decreases, test_decoder_uses_latent, test_recon_nll_matches_hand_computation,
        test_same_prompt_latent_diagnostic, test_save_load_roundtrip;
        slow: test_two_processes_train_the_guide_one_process_trains (tests/test_distributed.py)
    Algorithm 1, line 8: s_phi(x, y, y') = ||phi(x, y) - phi(x, y')||_2
        test_latent_distances, test_guide_sees_eos_only_after_a_finished_sample
    Algorithm 1, line 9: S = mean s, the weights s/S
        test_latent_weights_mean_one_and_errors
    Eq. 4 / Eq. 5, the loss and its gradient
        test_loss_equals_hand_computation, test_unit_weights_give_plain_dpo,
        test_gradient_matches_eq5_with_sigma_minus_z, test_weights_are_constants,
        test_ldalign_loss_rejects_mismatched_shapes, test_readme_copy_the_loss_snippet_equals_dpo
    Algorithm 1, line 10: the policy update theta_t, reference theta_{t-1}
        test_policy_equals_reference_at_step_zero, test_global_batches_fill_last_batch_with_zero_weight_items,
        test_dpo_train_moves_policy_towards_chosen, test_dpo_train_turns_dropout_off,
        test_nan_loss_stops_with_clear_message, test_train_loop_stops_on_a_nonfinite_gradient_with_a_finite_loss,
        test_bf16_autocast_training_sees_updated_weights, test_load_policy_keeps_this_runs_fp32_checkpoints_exact,
        test_compiled_blocks_compile_once_for_scoring_and_once_for_training
    Algorithm 1 end to end (lines 1-12 on the toy task, ldalign.py): lines 1-3 and 7 (y' from theta_0, then from
    theta_{t-1}), 4, 8, 9, 10 (trained from theta_{t-1}, its reference), and the loop over t (lines 5, 11, 12)
        fast: test_algorithm_1_loop_on_a_minimal_slice
        slow: test_end_to_end_tiny_run_then_resume, test_end_to_end_two_processes_fsdp2,
        test_compare_four_methods_with_reward_model, test_lm_eval_harness_scores_what_our_evaluation_scores,
        test_agreement_with_toy_judge_and_histogram_numbers
    Algorithm 1 end to end, the paper path (--preset paper on tiny HF folders: Mistral + zephyr's template, GPT-2 guide)
        fast: test_prompt_and_golden_tokens_follow_zephyr_template,
        test_compiled_decode_of_a_sliding_window_policy_compiles_once
        slow: test_paper_preset_one_process, test_paper_preset_two_processes_fsdp2,
        test_heldout_prompts_are_not_filtered_by_the_guides_context, test_guide_steps_do_not_depend_on_the_process_count
        and test_paper_preset_at_the_papers_lengths_in_one_process (pairs of 1024, prompts of 512, 256 new tokens)
    Section 5.1.4, the competing methods as the paper ran them (train.sh paper-baselines: SPIN's data recipe and
    per-iteration lr / beta, DPO, continual SFT on all of --data)
        fast: test_baseline_recipe_settings_are_checked_and_bound_per_method
        slow: test_paper_baselines_recipe_fills_every_row_of_table_1

The engineering, in tests/
    test_lora.py         Algorithm 1, line 10 on one GPU: LoRA (run/lora.py, --lora_r), the small preset (tiny Qwen2)
    test_sampler.py      generate.py: KV cache vs a cache-free oracle and HF generate, top-k / top-p, seeding, EOS
    test_distributed.py  FSDP2 / gloo: 2 processes == 1 (update, sampling, guide), rank-0 loading, two nodes (train.sh)
    test_data.py         dataset.py: JSONL / UTF-8 / Parquet errors with file:line, over-length, templates, shipped data
    test_rundir.py       the run folder and resume: settings, kill / resume, stale stages, NaN stop, user errors, lock
    test_checkpoints.py  pre-emption (run/checkpoint.py): step checkpoints, sampling resumed batch by batch, SIGTERM
    test_analysis.py     analysis.py (Sections 5.1.3, 5.2), reward models, Table 1 and provenance, seeds, watching a run
    test_plan.py         the memory plan (tools/plan.py, --plan)
    test_bench.py        tools/bench.py on the CPU; the GPU-only tests (skipped without CUDA; .ci/gpu runs them)
    builders.py          the builders and helpers the test files import by name (from tests.builders import ...)
"""
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import dataset
import dpo
import fsdp
import generate as generate_module
import ldalign
import stages
from guide import GuideModel, collate_guide, eval_guide, latent_distances, load_guide, save_guide
from run import cli, options, rundir
from tests.builders import (
    G_EOS,
    G_PAD,
    GOOD,
    HERE,
    LONG_SYSTEM,
    MINIMAL_RUN,
    N_EVAL,
    N_PREF,
    PAPER_RUN,
    PAPER_T,
    QA,
    TINY_RUN,
    ZEPHYR_TEMPLATE,
    _check_dpo_reference_uses_template_tokens,
    _check_paper_run,
    _check_run_folder,
    _check_same_stages,
    _first_turns,
    _paper_args,
    _paper_run,
    _read_jsonl,
    _run,
    _template_tokens,
    _tiny_reward_model,
    _toy_tok,
    _train_sh,
    _train_under_outer_autocast,
    _user_error,
    build_long_records,
    gen_gpt2,
    generate_naive,
    save_mistral_tokenizer,
    save_tiny_gpt2,
    synthetic_examples,
    tiny_guide,
    tiny_llama,
)


# ====================================================================================================
# Eq. 1: log p(y|x) = sum_j log p(y_j | x, y_<j), response tokens only, the shift pinned
# ====================================================================================================
def test_sequence_logps_equals_minus_cross_entropy_on_response_only():
    model = tiny_llama()
    prompts = [[1, 5, 6, 7], [1, 9]]
    responses = [[10, 11, 2], [12, 13, 14, 15, 2]]
    ids, mask, labels = dpo.collate(prompts, responses, pad_id=0)
    got = dpo.policy_logps(model, ids, mask, labels)
    # the pure function of (logits, labels) that policy_logps calls, on the model's logits of every position
    torch.testing.assert_close(dpo.sequence_logps(model(ids, attention_mask=mask).logits, labels), got)
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


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sequence_logps_skips_shared_prompt_columns(name):
    """start = the shortest prompt: the lm_head runs on positions start-1 .. T-1 only (logits_to_keep) and the
    numbers are those of the full computation; one column too far drops a response token and changes them.
    pair_logps passes the shortest prompt of its micro-batch."""
    model = {"llama": tiny_llama, "gpt2": lambda: gen_gpt2()}[name]()
    prompts, responses = [[1, 5, 6, 7], [1, 9, 4]], [[10, 11, 2], [12, 13, 14, 15, 2]]
    ids, mask, labels = dpo.collate(prompts, responses, pad_id=0)  # (2, 8): T = 8, shortest prompt 3
    seen = []
    model.lm_head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    full = dpo.policy_logps(model, ids, mask, labels)
    skip = dpo.policy_logps(model, ids, mask, labels, start=3)
    assert seen == [8, 6]  # positions 2 .. 7
    torch.testing.assert_close(skip, full, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(dpo.policy_logps(model, ids, mask, labels, start=4), full)
    seen.clear()
    torch.testing.assert_close(torch.cat(dpo.pair_logps(model, [(prompts[0], responses[0], responses[1])],
                                                        torch.device("cpu"))), dpo.policy_logps(
        model, *dpo.collate([prompts[0]] * 2, responses, pad_id=0)), rtol=1e-6, atol=1e-6)
    assert seen[0] == 9 - 4 + 1  # pair_logps: T = 9, prompt 4 -> positions 3 .. 8


def test_collate_masks_prompt_and_padding():
    ids, mask, labels = dpo.collate([[1, 5], [1, 6, 7]], [[8, 2], [9, 2]], pad_id=0)
    assert ids.tolist() == [[1, 5, 8, 2, 0], [1, 6, 7, 9, 2]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, 8, 2, -100], [-100, -100, -100, 9, 2]]


# ====================================================================================================
# Eq. 2: the guide T = (phi, psi) (guide.py), trained in Algorithm 1, line 4
# ====================================================================================================
# the Eq. 2 loss goes down
def test_guide_loss_decreases(trained):
    _, _, hist, before, after = trained
    assert len(hist) == 40 * 4 and {"step", "loss", "lr"} <= set(hist[0])
    first = sum(h["loss"] for h in hist[:4]) / 4
    last = sum(h["loss"] for h in hist[-4:]) / 4
    assert last < 0.5 * first, (first, last)
    assert after["nll_true_h"] < 0.5 * before["nll_true_h"]


# the decoder psi actually uses the latent h = phi(x, y)
def test_decoder_uses_latent(trained):
    _, ex, _, _, after = trained
    assert after["n"] == len(ex)
    # shuffled h must be clearly worse: without the right h, v (and 2 of the 3 content tokens) is a guess
    assert after["nll_shuffled_h"] > after["nll_true_h"] + 0.3, after


# response mask + next-token shift of the Eq. 2 reconstruction term, checked against cross_entropy by hand
def test_recon_nll_matches_hand_computation():
    guide = tiny_guide(seed=2).eval()
    examples = [([1, 11, 12], [30, 31, G_EOS]), ([1, 13], [32, 33, 34, 35, 36, G_EOS]),
                ([1, 14, 15, 16, 17], [37, G_EOS])]
    batch = collate_guide(examples, G_PAD)
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
            alone = collate_guide([examples[i]], G_PAD)
            torch.testing.assert_close(guide.recon_nll(**alone, h=h[i:i + 1])[0][0], nll[i], atol=1e-5, rtol=1e-5)
        # and the pad id itself does not matter
        torch.testing.assert_close(guide.recon_nll(**collate_guide(examples, 63), h=h)[0], nll, atol=1e-5, rtol=1e-5)
        # forward() = recon_nll(encode(...)); shuffle_h rolls the latent across the batch
        hh = guide.encode(**batch)
        torch.testing.assert_close(guide(**batch)[0], guide.recon_nll(**batch, h=hh)[0])
        torch.testing.assert_close(guide(**batch, shuffle_h=True)[0], guide.recon_nll(**batch, h=hh.roll(1, 0))[0])


def test_same_prompt_latent_diagnostic(trained):
    """h(x, y') used for y (same prompt, other answer): the response-specific part of h, what s_phi measures."""
    guide, ex, _, _, after = trained
    partner = [4 * (i // 4) + (i % 4 + 1) % 4 for i in range(len(ex))]  # same prompt a, next variation v
    d = eval_guide(guide, ex, batch_size=8, pad_id=G_PAD, device="cpu", partner=partner[:-1] + [None])
    assert d["n_paired"] == len(ex) - 1 and d["nll_true_h"] == pytest.approx(after["nll_true_h"])
    assert d["nll_same_prompt_h"] > d["nll_true_h_paired"] + 0.3, d  # v is in h only: the partner's h lacks it


# save / load round trip, safetensors only
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
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp dirs left behind
    loaded = load_guide(out)
    assert isinstance(loaded, GuideModel) and loaded.latent_dim == 5
    batch = collate_guide(synthetic_examples()[:6], G_PAD)
    guide.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(**batch), guide.encode(**batch), atol=0, rtol=0)
        h = guide.encode(**batch)
        torch.testing.assert_close(loaded.recon_nll(**batch, h=h)[0], guide.recon_nll(**batch, h=h)[0],
                                   atol=0, rtol=0)


# ====================================================================================================
# Algorithm 1, line 8: s_phi(x, y, y') = ||phi(x, y) - phi(x, y')||_2
# ====================================================================================================
def test_latent_distances(trained):
    guide = trained[0]
    ex = synthetic_examples()
    triples = [(x, y, ex[(i + 1) % len(ex)][1]) for i, (x, y) in enumerate(ex)]
    triples += [(x, y, list(y)) for x, y in ex[:5]]  # identical response -> distance 0
    triples += [([1, 2], [5, 6, 7, 8, 9, G_EOS], [5, G_EOS])]  # different lengths inside one chunk
    d = latent_distances(guide, triples, batch_size=7, pad_id=G_PAD, device="cpu")
    assert d.shape == (len(triples),) and d.dtype == torch.float32
    assert (d >= 0).all()
    assert d[len(ex):len(ex) + 5].abs().max() < 1e-6
    assert d[:len(ex)].min() > 1e-3  # different responses really are apart
    # by hand: encode y's and y''s separately and take the norm of the difference
    guide.eval()
    with torch.no_grad():
        hy = guide.encode(**collate_guide([(x, y) for x, y, _ in triples], G_PAD))
        hp = guide.encode(**collate_guide([(x, yp) for x, _, yp in triples], G_PAD))
    ref = torch.linalg.vector_norm(hy - hp, dim=-1)
    torch.testing.assert_close(d, ref, atol=1e-5, rtol=1e-5)


def test_guide_sees_eos_only_after_a_finished_sample():
    """y' cut off by max_new_tokens has no EOS; the guide must not read it as a finished answer."""
    tok = _toy_tok()
    d = dict(x="sort: 3 1 2", y="1 2 3")
    d["guide_prompt_ids"], d["guide_response_ids"] = dataset.guide_ids(tok, d["x"], d["y"])
    done = tok("1 2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    (gx, gy, g_done), (_, _, g_cut) = dataset.guide_triples([d, d], tok, tok, [done, done[:-1]], 1024)
    assert g_done == done and gy[-1] == tok.eos_token_id  # golden y and a finished y' end with EOS
    assert g_cut == done[:-1]  # the cut-off one does not


# ====================================================================================================
# Algorithm 1, line 9: S = (1/N) sum_i s_phi, and the weights s/S
# ====================================================================================================
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
# Eq. 4 / Eq. 5: the loss -(s/S) log sigma(z) and its gradient
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


def test_ldalign_loss_rejects_mismatched_shapes():
    b = torch.zeros(4)
    with pytest.raises(ValueError, match="five"):
        dpo.ldalign_loss(b, b, b, b, torch.ones(4, 1), 0.1)  # would broadcast to (4, 4)


def test_readme_copy_the_loss_snippet_equals_dpo():
    """The README's "Copy the loss" block is what people paste into other trainers: run it, compare with dpo.py
    (the loss, the weights and the sequence log-probs)."""
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("## Copy the loss", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    ns = {}
    exec(block, ns)
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(6, generator=g) for _ in range(4))
    s = torch.rand(6, generator=g) + 0.1
    torch.testing.assert_close(ns["latent_weights"](s), dpo.latent_weights(s))
    # sequence_logps(logits, labels), Eq. 1: the same numbers as dpo.py's, on a tiny model's logits
    model = tiny_llama()
    ids, mask, labels = dpo.collate([[1, 5, 6, 7], [1, 9]], [[10, 11, 2], [12, 13, 14, 15, 2]], pad_id=0)
    logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(ns["sequence_logps"](logits, labels), dpo.sequence_logps(logits, labels))
    w = dpo.latent_weights(s)
    for beta in (0.1, 0.5):
        pc1, pc2 = pc.clone().requires_grad_(), pc.clone().requires_grad_()
        ours, theirs = dpo.ldalign_loss(pc1, pr, rc, rr, w, beta), ns["ldalign_loss"](pc2, pr, rc, rr, w, beta)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
        ours[0].mean().backward()
        theirs[0].mean().backward()
        torch.testing.assert_close(pc1.grad, pc2.grad)


# ====================================================================================================
# Algorithm 1, line 10: the policy update theta_t = argmax ..., with the reference theta_{t-1}
# ====================================================================================================
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


def test_dpo_train_turns_dropout_off():
    """A policy with dropout (GPT-2's default 0.1): the cached reference is an eval-mode forward, so with dropout on
    in training step 0 would not be log 2. dpo_train turns it off (modules and Llama-style float attributes)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    assert model.config.resid_pdrop == 0.1
    pairs = [([1, 5 + i % 3], [7, 8, 2], [9, 9, 2]) for i in range(8)]
    rc, rr = dpo.reference_logps(model, pairs, 8, torch.device("cpu"))
    model.train()
    pc, _ = dpo.pair_logps(model, pairs, torch.device("cpu"))
    assert not torch.allclose(pc.detach(), rc, atol=1e-4)  # dropout on: not the reference (the check is not vacuous)
    hist = dpo.dpo_train(model, pairs, rc, rr, torch.ones(8), beta=0.5, lr=1e-2, epochs=1, batch_size=8,
                         micro_batch_size=4, device=torch.device("cpu"), optimizer="adamw")
    assert hist[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    llama = tiny_llama()
    for attn in (m for m in llama.modules() if hasattr(m, "attention_dropout")):
        attn.attention_dropout = 0.1
    dpo.disable_dropout(llama)
    assert all(m.attention_dropout == 0.0 for m in llama.modules() if hasattr(m, "attention_dropout"))


def test_nan_loss_stops_with_clear_message():
    model = tiny_llama()
    pairs = [([1, 5], [7, 2], [9, 2])] * 4
    with pytest.raises(FloatingPointError, match="last finished checkpoint"):
        dpo.dpo_train(model, pairs, torch.zeros(4), torch.zeros(4), torch.full((4,), float("nan")), beta=0.1, lr=1e-3,
                      epochs=1, batch_size=4, micro_batch_size=4, device=torch.device("cpu"))


def test_train_loop_stops_on_a_nonfinite_gradient_with_a_finite_loss():
    model = tiny_llama()

    def loss_fn(idx, valid):  # value 0, gradient NaN (d sqrt(u)/du = inf at u = 0)
        w = model.lm_head.weight
        return torch.sqrt((w - w.detach()).abs().sum()), torch.zeros(0)
    with pytest.raises(FloatingPointError, match="loss is 0.0 at step 1/.*gradient norm nan"):
        dpo.train(model, 4, loss_fn, device=torch.device("cpu"), lr=1e-3, epochs=1, batch_size=4,
                  micro_batch_size=4, optimizer="adamw", warmup_ratio=0.1, max_grad_norm=1.0, seed=0,
                  log_every=1, log_fn=None, stats_names=[])


def test_bf16_autocast_training_sees_updated_weights(monkeypatch):
    """The GPU path of one process (fp32 weights, bf16 autocast), run on the CPU. Autocast caches the bf16 copy
    of each weight until its `with` block exits: a block around the optimizer steps would run every forward on
    the weights of before the first step, so training would barely move. fsdp.autocast wraps each forward only,
    and dpo.train_step drops the cache after each step: training under a caller's outer block equals training
    without one, and the loss falls."""
    monkeypatch.setattr(fsdp, "autocast", lambda device, model=None: torch.autocast("cpu", dtype=torch.bfloat16))
    losses, weights = _train_under_outer_autocast(torch.device("cpu"), outer=False)
    losses_outer, weights_outer = _train_under_outer_autocast(torch.device("cpu"), outer=True)
    assert losses_outer == losses
    for k in weights:
        torch.testing.assert_close(weights_outer[k], weights[k], rtol=0, atol=0)
    assert losses[-1] < 0.5 * losses[0]


def test_load_policy_keeps_this_runs_fp32_checkpoints_exact(tmp_path):
    """theta_t is saved with fp32 master weights; loading it back through bf16 (a way to
    halve CPU memory) would erase updates smaller than bf16's spacing. Its config may say bfloat16 (zephyr's
    does): the weights must still come back bit for bit. An outside theta_0 loads in its stored dtype."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.add_(1e-4)  # an update far below bf16's spacing at 1.0 (2^-7)
    # written as the run writes its checkpoints (atomic_path: with a manifest)
    with rundir.atomic_path(tmp_path / "theta1") as tmp:
        model.save_pretrained(tmp)
        cfg_path = os.path.join(tmp, "config.json")
        c = json.load(open(cfg_path))
        c["dtype"] = "bfloat16"
        open(cfg_path, "w").write(json.dumps(c))
    run_cfg = dict(policy="/models/zephyr-7b-sft-full", grad_ckpt=False, compile=False, trust_remote_code=False)
    loaded = stages.load_policy(str(tmp_path / "theta1"), run_cfg, torch.device("cpu"))
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a, b), n
    # the same folder given as --policy (an outside theta_0) follows its config: bf16, then cast to fp32
    outside = stages.load_policy(str(tmp_path / "theta1"), dict(run_cfg, policy=str(tmp_path / "theta1")),
                                 torch.device("cpu"))
    assert not torch.equal(outside.model.norm.weight, model.model.norm.weight)  # the check above is not vacuous


def test_compiled_blocks_compile_once_for_scoring_and_once_for_training():
    """--compile: each block compiled in place. The log-prob forwards must not build a KV cache: with one, every
    block guards on its own cache layer and recompiles once per layer, and past torch.compile's limit of 8 the
    update silently runs eager. backend="eager" keeps the test fast (the guards are the same)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_llama(num_hidden_layers=10)
    for b in fsdp.transformer_blocks(model):
        b.compile(backend="eager")
    pairs = [([1, 5, 6], [7, 8, 2], [9, 9, 2]) for _ in range(4)]
    rc, rr = dpo.reference_logps(model, pairs, 4, torch.device("cpu"))
    dpo.dpo_train(model, pairs, rc, rr, torch.ones(4), beta=0.1, lr=1e-3, epochs=1, batch_size=4, micro_batch_size=4,
                  device=torch.device("cpu"), optimizer="adamw")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # eval mode, then train mode
    torch._dynamo.reset()


# ====================================================================================================
# Algorithm 1 end to end (ldalign.py on a slice of the toy task): its files, a rerun that resumes, 2 processes,
# the competing methods at equal budget with a reward model, and the Section 5.2 numbers
# ====================================================================================================
# MINIMAL_RUN (tests/builders.py): the fast tier's slice of the toy task (16 pairs, T = 2, one step per iteration)
def test_algorithm_1_loop_on_a_minimal_slice(tmp_path):
    """Algorithm 1, lines 1-12, in seconds: ldalign.py as a user runs it, checked through the run folder's files only.
      lines 1-3   iter0/samples.jsonl: a y' for every x_i, computed from theta_0 (stages.json names each stage's inputs)
      line 4      guide/: T = (phi, psi), trained once on y and y'
      lines 5-12  for t = 1..T, in order: ldalign/iter{t}/ with theta_t, and a metrics row per iteration
      line 7      the y' of iteration t computed from theta_{t-1} (t = 1 reuses theta_0's, lines 1-3)
      lines 8-9   one s_i >= 0 per pair, S = mean s, weights s/S of mean 1
      line 10     theta_t trained from theta_{t-1} with theta_{t-1} as the reference: at step 1 the implicit rewards
                  are 0 and the loss is log 2 (policy == reference, the weights average 1 over the batch of all pairs),
                  and the logged gradient norm is that of Eq. 4's loss at theta_{t-1}, recomputed here from the saved
                  theta_{t-1}, the y' and the distances (and not the one at theta_{t-2})"""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, T, n = str(tmp_path / "run"), 2, 16
    with open(os.path.join(HERE, "data", "sort_train.jsonl")) as f:
        (tmp_path / "train.jsonl").write_text("".join(f.readlines()[:64]))
    _run(["--out", out, "--data", str(tmp_path / "train.jsonl")] + MINIMAL_RUN,
         env_extra={"CUDA_VISIBLE_DEVICES": ""})  # on the CPU, in fp32: the numbers below
    beta = json.load(open(os.path.join(out, "config.json")))["beta"]  # the settings of the run
    stages = json.load(open(os.path.join(out, "stages.json")))  # stage -> {input: digest}
    theta = ["sft"] + [f"ldalign/iter{t}/policy" for t in range(1, T + 1)]  # theta_0 (the toy SFT), theta_1, ...
    assert list(stages["iter0/samples.jsonl"]) == [theta[0]]  # lines 1-3
    assert len(_read_jsonl(os.path.join(out, "iter0", "samples.jsonl"))) == n
    assert os.path.exists(os.path.join(out, "guide", "latent.safetensors"))  # line 4
    assert [r["iter"] for r in _read_jsonl(os.path.join(out, "ldalign", "metrics.jsonl"))] == list(range(T + 1))
    # (and distances.png, where matplotlib is installed)
    assert set(os.listdir(os.path.join(out, "ldalign"))) - {"distances.png"} == {"iter1", "iter2", "metrics.jsonl",
                                                                                  "results.md"}

    def eq4_grad_norm(policy, rows, w):
        """||grad of mean_i -w_i log sigma(z_i)|| at the reference (z = 0), computed by hand from a checkpoint."""
        tok = AutoTokenizer.from_pretrained(policy)
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)

        def logp(x, y):
            ids = torch.tensor([x + y])
            lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            return lp[len(x) - 1:].gather(1, ids[0, len(x):, None]).sum()
        loss = 0
        for r, wi in zip(rows, w):
            x = dataset.prompt_ids(tok, r["x"])
            ly, lyp = logp(x, dataset.response_ids(tok, r["x"], r["y"])), logp(x, r["y_prime_ids"])
            z = beta * ((ly - ly.detach()) - (lyp - lyp.detach()))  # 0, with the gradient of Eq. 5
            loss = loss - wi * F.logsigmoid(z) / len(rows)
        loss.backward()
        return math.sqrt(sum((p.grad ** 2).sum().item() for p in model.parameters() if p.grad is not None))

    for t in range(1, T + 1):
        it = os.path.join(out, "ldalign", f"iter{t}")
        # line 7: this iteration's y' (iteration 1: theta_0's, lines 1-3), sampled from theta_{t-1}
        [samples] = [k for k in stages[f"ldalign/iter{t}/distances.jsonl"] if k != "guide"]
        assert samples == ("iter0/samples.jsonl" if t == 1 else f"ldalign/iter{t}/samples.jsonl")
        assert list(stages[samples]) == [theta[t - 1]]
        rows = _read_jsonl(os.path.join(out, samples))
        # lines 8-9
        dist = _read_jsonl(os.path.join(it, "distances.jsonl"))
        assert [d["where"] for d in dist] == [r["where"] for r in rows] and len(rows) == n
        s = torch.tensor([d["s"] for d in dist])
        summary = json.load(open(os.path.join(it, "distances.json")))
        assert (s >= 0).all() and summary["S"] == pytest.approx(s.mean().item(), rel=1e-5)
        assert summary["weights"]["mean"] == pytest.approx(1.0, rel=1e-4)
        # line 10
        assert os.path.exists(os.path.join(out, theta[t], "model.safetensors"))
        assert os.path.exists(os.path.join(it, "eval.json"))
        [step] = _read_jsonl(os.path.join(it, "train_metrics.jsonl"))
        assert step["reward_chosen"] == pytest.approx(0, abs=1e-5)  # beta (log p_theta - log p_ref) of y ...
        assert step["reward_rejected"] == pytest.approx(0, abs=1e-5)  # ... and of y': 0 at the reference
        assert step["loss"] == pytest.approx(math.log(2), rel=1e-5)
        w = s / s.mean()
        assert step["grad_norm"] == pytest.approx(eq4_grad_norm(os.path.join(out, theta[t - 1]), rows, w), rel=1e-4)
        if t > 1:  # the check is not vacuous: theta_{t-2}, one update behind, gives another gradient (~1% off)
            assert step["grad_norm"] != pytest.approx(eq4_grad_norm(os.path.join(out, theta[t - 2]), rows, w), rel=1e-3)


@pytest.mark.slow
def test_end_to_end_tiny_run_then_resume(tmp_path):
    import shutil
    out = str(tmp_path / "run")
    log = _run(["--out", out] + TINY_RUN)
    assert "Algorithm 1, line 4" in log and "[ldalign iter 2] held-out greedy exact match" in log
    m1 = _check_run_folder(out)
    # a rerun of a finished run skips every stage and leaves the results as they were
    before = open(os.path.join(out, "ldalign", "metrics.jsonl")).read()
    log = _run(["--out", out] + TINY_RUN)
    assert "training the guide" not in log and "SFT of a tiny Llama" not in log and "=====" not in log
    assert open(os.path.join(out, "ldalign", "metrics.jsonl")).read() == before
    # a rerun with a setting the stored stages depend on stops at once, naming it, and changes nothing
    p = subprocess.run([sys.executable, os.path.join(HERE, "ldalign.py"), "--out", out] + TINY_RUN + ["--beta", "0.5"],
                       cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300, capture_output=True, text=True)
    assert p.returncode != 0 and "--beta 0.1 -> 0.5" in p.stderr and "settings.json" in p.stderr
    assert open(os.path.join(out, "ldalign", "metrics.jsonl")).read() == before
    # a run whose iteration 2 was lost (its policy never written) resumes at iteration 2, from theta_1
    shutil.rmtree(os.path.join(out, "ldalign", "iter2"))
    log = _run(["--out", out] + TINY_RUN)
    assert "iteration 1/2" not in log and "iteration 2/2" in log and "training the guide" not in log
    m2 = _check_run_folder(out)
    # every stage is seeded on its own, so the resumed run ends with exactly the uninterrupted weights
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


@pytest.mark.slow
def test_end_to_end_two_processes_fsdp2(tmp_path, tiny_run):
    """torchrun with 2 CPU processes: FSDP2 over gloo for SFT, sampling, guide, DPO and saving; no hang. Every stage
    computes what the 1-process run's does: theta_0 (SFT), the samples, the guide, s and S (_check_same_stages)."""
    from safetensors.torch import load_file
    out = str(tmp_path / "run2")
    log = _run(["--out", out] + TINY_RUN, nproc=2)
    assert "2 process(es)" in log
    _check_run_folder(out)
    # Require: theta_0, SFT-ed in global batches (measured: 5e-6)
    a, b = (load_file(os.path.join(run, "sft", "model.safetensors")) for run in (tiny_run, out))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)
    _check_same_stages(tiny_run, out, T=2)
    # line 10: theta_t. From the same theta_0 the update agrees to 1e-5 of its step; here theta_0's round-off
    # difference (above) grows through AdamW's first, sign-like steps: measured 0.6% and 1.4% of the step
    prev = a  # the 1-process run's theta_{t-1}
    for t in (1, 2):
        one, two = (load_file(os.path.join(run, "ldalign", f"iter{t}", "policy", "model.safetensors"))
                    for run in (tiny_run, out))
        diff = math.sqrt(sum(((one[k] - two[k]) ** 2).sum().item() for k in one))
        step = math.sqrt(sum(((one[k] - prev[k]) ** 2).sum().item() for k in one))
        assert step > 0 and diff < 5e-2 * step, (t, diff, step)
        prev = one


@pytest.mark.slow
def test_compare_four_methods_with_reward_model(tmp_path):
    out = str(tmp_path / "cmp")
    rm = _tiny_reward_model(str(tmp_path / "rm"))
    args = ["--out", out, "--method", "ldalign,spin,dpo,sft", "--reward_model", rm, "--judge", "reward",
            "--agreement_n", "32"] + TINY_RUN
    args[args.index("--T") + 1] = "1"
    log = _run(args)
    for m in ("ldalign", "spin", "dpo", "sft"):
        _check_run_folder(out, T=1, method=m)
        rows = [json.loads(line) for line in open(os.path.join(out, m, "metrics.jsonl"))]
        assert all(isinstance(r["reward"], float) for r in rows)  # Section 5.1.3: mean reward per method
        assert rows[1]["S"] is not None  # dpo and sft report S too (measure_S)
    spin_w = json.load(open(os.path.join(out, "spin", "iter1", "distances.json")))["weights"]
    assert spin_w["min"] == spin_w["max"] == 1.0  # SPIN: the same loop with weights 1
    ref = json.load(open(os.path.join(out, "dpo", "ref_logps_theta0.json")))
    assert len(ref["chosen"]) == 64  # DPO's fixed reference theta_0, cached
    table = open(os.path.join(out, "comparison.md")).read()
    assert all(m in table for m in ("ldalign", "spin", "dpo", "sft")) and "comparison (" in log
    assert "optimizer steps per iteration: ldalign 4, spin 4, dpo 4, sft 4" in table  # 64 pairs / batch 16
    agr = json.load(open(os.path.join(out, "guide", "agreement.json")))
    assert agr["judge"] == "reward" and agr["n"] == 32 and 0 <= agr["n_decided"] <= 32


@pytest.mark.slow
def test_lm_eval_harness_scores_what_our_evaluation_scores(tmp_path):
    """bash train.sh eval (harness.py) cross-checked with the field's standard tool: a local lm-eval task (generation
    + exact match over the run's held-out prompts) through the harness with the chat template, on theta_0 and
    theta_1, gives the answers and the exact match of the project's own greedy evaluation, prompt for prompt."""
    pytest.importorskip("lm_eval")
    out = str(tmp_path / "run")
    args = ["--out", out, "--agreement_n", "0", "--sft_steps", "300"] + TINY_RUN
    args[args.index("--T") + 1] = "1"
    _run(args)
    held_out = str(tmp_path / "held_out.jsonl")
    with open(os.path.join(HERE, "data", "sort_eval.jsonl")) as f:
        open(held_out, "w").write("".join(f.readlines()[:16]))  # the run's --max_eval 16
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy_sort.yaml").write_text(
        f"task: toy_sort\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {held_out}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: \"{{messages[0].content}}\"\n"
        "doc_to_target: \"{{messages[1].content}}\"\n"
        "generation_kwargs:\n  until: [\"<|end|>\"]\n  do_sample: false\n  max_gen_toks: 32\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    p = _train_sh(["eval", out, "--tasks", "Sort=toy_sort:0:exact_match,none",
                   "--include_path", str(tmp_path / "tasks"), "--chat_template", "true"],
                  {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    table = json.load(open(os.path.join(out, "table1.json")))
    assert list(table["scores"]) == ["SFT (theta_0)", "ldalign 1"]
    for label, ev in (("SFT (theta_0)", "iter0/eval.json"), ("ldalign 1", "ldalign/iter1/eval.json")):
        ours = json.load(open(os.path.join(out, ev)))
        assert table["scores"][label]["Sort"] == pytest.approx(ours["exact_match"])
        assert [a.strip() for a in table["answers"][label]["Sort"][:len(ours["examples"])]] == \
            [e["answer"] for e in ours["examples"]]
    assert "| SFT (theta_0) |" in open(os.path.join(out, "table1.md")).read()


@pytest.mark.slow
def test_agreement_with_toy_judge_and_histogram_numbers(tmp_path):
    out = str(tmp_path / "run")
    args = ["--out", out, "--agreement_n", "32"] + TINY_RUN
    args[args.index("--T") + 1] = "1"
    _run(args)
    agr = json.load(open(os.path.join(out, "guide", "agreement.json")))
    assert agr["judge"] == "toy" and agr["n"] == 32
    if agr["n_decided"]:
        assert agr["agreement"] == pytest.approx(agr["agree"] / agr["n_decided"])
    hist = json.load(open(os.path.join(out, "ldalign", "iter1", "distances.json")))["histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1


# ====================================================================================================
# Algorithm 1 end to end: the paper path (HF folders), what users reproduce the paper with. Every input of the
# paper's setting is built tiny, on disk, from configs: a Mistral policy stored in bf16 like zephyr-7b-sft-full
# (sliding window 4096) with a Llama-style SentencePiece tokenizer and zephyr's chat template; a GPT-2 guide with
# its own byte-level BPE (no pad token); UltraChat-style multi-turn records, a held-out file, UltraFeedback-style
# preference records; a DeBERTa-v2 reward model. `ldalign.py --preset paper --method ldalign,dpo` runs on them
# with small overrides, in 1 process and in 2 (torchrun, FSDP2 over gloo). The builders, the runs (fixtures
# paper_inputs, one_process_run, two_process_run) and the checks of their run folders are in conftest.py.
# ====================================================================================================
@pytest.mark.parametrize("style", ["legacy", "metaspace"])
def test_prompt_and_golden_tokens_follow_zephyr_template(tmp_path, style):
    """dataset.prompt_ids / response_ids on a zephyr-style tokenizer: the prompt is BOS + the templated user turn
    (ending "<|assistant|>\\n"), and the golden response is exactly the tokens the template puts after it in the
    whole conversation (no word-start piece that the policy never emits after "\\n"), ending with </s>."""
    from transformers import AutoTokenizer
    path = str(tmp_path / "tok")
    save_mistral_tokenizer(path, style)
    json.dump({"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
              open(os.path.join(path, "config.json"), "w"))
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token is None and tok.chat_template == ZEPHYR_TEMPLATE  # as zephyr's: no pad token
    assert tok.convert_ids_to_tokens([13]) == ["<0x0A>"]  # a newline is Mistral's byte token 13
    for i, (x, y) in enumerate(QA):
        px, py = dataset.prompt_ids(tok, x), dataset.response_ids(tok, x, y)
        assert (px, py) == _template_tokens(tok, x, y), (i, tok.convert_ids_to_tokens(py)[:4])
        assert px.count(tok.bos_token_id) == 1 and px[0] == tok.bos_token_id
        # decoded, the word-start piece at the very start (and, legacy, after </s>) reads as a space
        gap = " " if style == "legacy" else ""
        assert tok.decode(px) == f"<s> <|user|>\n{x}</s>{gap}\n<|assistant|>\n"
        assert tok.decode(py, skip_special_tokens=True) == y and py[-1] == tok.eos_token_id
        assert not tok.convert_ids_to_tokens(py)[0].startswith("\u2581") or y[0] == " "
    if style == "legacy":  # zephyr's quirk: the text after </s> starts with a word-start piece
        px = dataset.prompt_ids(tok, QA[0][0])
        i = px.index(tok.eos_token_id)
        assert tok.convert_ids_to_tokens(px[i:i + 3]) == ["</s>", "\u2581", "<0x0A>"]


@pytest.mark.slow
def test_paper_preset_one_process(one_process_run, paper_inputs):
    out, log = one_process_run
    assert "preset=paper" in log and "1 process(es)" in log and "[Algorithm 1, line 4]" in log
    assert "##### method dpo" in log and "[dpo iter 2]" in log and "[ldalign iter 2]" in log
    _check_paper_run(out, paper_inputs)
    _check_dpo_reference_uses_template_tokens(out, paper_inputs)
    # a rerun of the finished run recomputes nothing; losing theta_2 resumes from theta_1 to the same weights
    pol = os.path.join(out, "ldalign", f"iter{PAPER_T}", "policy", "model.safetensors")
    before = open(pol, "rb").read()
    log = _paper_run(_paper_args(paper_inputs, out), name="1 process, rerun of the finished run")
    assert "training the guide" not in log and "=====" not in log
    shutil.rmtree(os.path.join(out, "ldalign", f"iter{PAPER_T}"))
    log = _paper_run(_paper_args(paper_inputs, out), name="1 process, resume at iteration 2")
    assert f"ldalign iteration {PAPER_T}/{PAPER_T}" in log and "ldalign iteration 1/" not in log
    assert "training the guide" not in log
    assert open(pol, "rb").read() == before
    _check_paper_run(out, paper_inputs)


@pytest.mark.slow
def test_paper_preset_two_processes_fsdp2(paper_inputs, one_process_run, two_process_run):
    """torchrun, 2 CPU processes: FSDP2 over gloo for the bf16-stored Mistral policy (sharded, then cast to fp32
    master weights) and the GPT-2 guide (dropout 0.1 in its config). Both runs start from the same theta_0, so
    every stage must compute what the one-process run's does: the samples, the guide, s and S
    (_check_same_stages), and theta_t of DPO (fixed preference pairs) and of LD-Align."""
    out, log = two_process_run
    assert "2 process(es)" in log and "##### method dpo" in log
    _check_paper_run(out, paper_inputs)
    _check_same_stages(one_process_run[0], out, T=PAPER_T)
    from safetensors.torch import load_file
    theta0 = {k: v.float() for k, v in load_file(os.path.join(paper_inputs["policy"], "model.safetensors")).items()}
    for method in ("dpo", "ldalign"):
        prev = theta0  # the 1-process run's theta_{t-1}
        for t in range(1, PAPER_T + 1):
            one = load_file(os.path.join(one_process_run[0], method, f"iter{t}", "policy", "model.safetensors"))
            two = load_file(os.path.join(out, method, f"iter{t}", "policy", "model.safetensors"))
            assert one.keys() == two.keys() == theta0.keys()
            diff = math.sqrt(sum(((one[k] - two[k]) ** 2).sum().item() for k in one))
            step = math.sqrt(sum(((one[k] - prev[k]) ** 2).sum().item() for k in one))
            print(f"[1 vs 2 processes] {method} theta_{t}: {diff / step:.2g} of the step", flush=True)
            assert step > 0 and diff < 1e-2 * step, (method, t, diff, step)
            prev = one


def test_compiled_decode_of_a_sliding_window_policy_compiles_once(paper_inputs, monkeypatch):
    """The preset's --gen_compile on the zephyr-shaped policy: one graph for a batch shape, not one per token.
    (Compiled with backend="eager": the guards, and so the recompilations, are dynamo's; no inductor compile.)"""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(paper_inputs["policy"])
    model = AutoModelForCausalLM.from_pretrained(paper_inputs["policy"], dtype=torch.float32).eval()
    prompts = [dataset.prompt_ids(tok, x) for x, _ in QA[:4]]
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(
        fn, backend="eager", fullgraph=kw.get("fullgraph", False), dynamic=kw.get("dynamic")))
    monkeypatch.setattr(generate_module, "_COMPILED", {})
    torch._dynamo.reset()
    counters.clear()
    # sample_responses raises dynamo's recompile limit; torch's own config.patch puts it back on exit (monkeypatch
    # would undo it with a delete, which torch 2.14's config module takes as hiding the key from later tests)
    try:
        with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
            out = generate_module.sample_responses(model, prompts, batch_size=4, max_new_tokens=8, eos_token_id=-1,
                                                   pad_token_id=tok.eos_token_id, temperature=0.0, top_p=1.0, top_k=0,
                                                   seed=0, device=torch.device("cpu"), static=True, compile=True)
            graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1, f"{graphs} graphs compiled for 8 decoded tokens of one batch shape"
    assert [len(r) for r in out] == [8] * 4


@pytest.mark.slow
def test_heldout_prompts_are_not_filtered_by_the_guides_context(paper_inputs, tmp_path):
    """A guide backbone with a short context (64 positions) must not change which held-out prompts are scored."""
    short = dict(paper_inputs, guide=str(tmp_path / "gpt2_64"))
    save_tiny_gpt2(short["guide"], n_positions=64)
    out = str(tmp_path / "run")
    # theta_0's evaluation (iter0/eval.json) comes before the agreement analysis; stop the run there (the resume
    # tests' hook)
    _paper_run(_paper_args(short, out, method="ldalign"),
               name="held-out vs guide context (killed after theta_0's evaluation)",
         expect_rc=137, env_extra={"LDALIGN_KILL_AT": "guide/agreement.json"})
    ev = json.load(open(os.path.join(out, "iter0", "eval.json")))
    skipped = [s for s in _read_jsonl(os.path.join(out, "skipped.jsonl")) if s["where"].startswith(short["eval_data"])]
    assert ev["n"] == N_EVAL, f"{N_EVAL - ev['n']} held-out prompts dropped: {skipped}"


@pytest.mark.slow
def test_guide_steps_do_not_depend_on_the_process_count(one_process_run, two_process_run):
    import re

    def guide_steps(log):
        return int(re.search(r"\[guide\] step 1/(\d+)", log).group(1))
    assert guide_steps(two_process_run[1]) == guide_steps(one_process_run[1])


# ====================================================================================================
# Section 5.1.4: the competing methods as the paper ran them (`bash train.sh paper-baselines`): SPIN's data
# recipe (iteration t trains on the pairs of t-1 and t, reference theta_{t-1}) at its lr and beta per iteration,
# DPO for one training at its lr, continual SFT on all of --data; one call each on the paper run's folder, so
# that harness.py (`bash train.sh eval`) finds every row of Table 1
# ====================================================================================================
def test_baseline_recipe_settings_are_checked_and_bound_per_method(tmp_path, capsys, monkeypatch):
    """--lr_per_iter / --beta_per_iter: numbers > 0, at least T of them; the toy keeps the equal-budget loop,
    the paper preset turns SPIN's data recipe and the whole SFT file on; a bad record of --sft_data fails as
    file:line before any compute; spin_keep_previous binds spin's section and sft_data sft's, no other."""
    bad = [(["--lr_per_iter", "5e-7,x,1e-7"], "--lr_per_iter takes finite numbers > 0, comma-separated"),
           (["--beta_per_iter", "0.1,0,0.1"], "--beta_per_iter takes finite numbers > 0"),
           (["--lr_per_iter", "nan,1e-7,1e-7"], "--lr_per_iter takes finite numbers > 0"),
           (["--lr_per_iter", "5e-7,1e-7", "--T", "3"], "--lr_per_iter has 2 value(s) for --T 3 iterations")]
    for argv, msg in bad:
        with pytest.raises(SystemExit) as e:
            ldalign.parse_args(argv)
        assert msg in str(e.value.code), (argv, e.value.code)
    cfg = ldalign.parse_args(["--lr_per_iter", "5e-7,5e-7,1e-7,1e-7", "--beta", "0.2"])
    assert [options.setting_at(cfg, "lr", t) for t in (1, 2, 3)] == [5e-7, 5e-7, 1e-7]
    assert options.setting_at(cfg, "beta", 3) == 0.2  # no --beta_per_iter: --beta in every iteration
    toy, paper = ldalign.parse_args([]), ldalign.parse_args(["--preset", "paper"])
    assert (toy["spin_keep_previous"], toy["sft_data"]) == (False, "D")
    assert (paper["spin_keep_previous"], paper["sft_data"]) == (True, "")

    monkeypatch.setattr(cli, "_LOG", [])
    sft = tmp_path / "sft.jsonl"
    sft.write_text(GOOD + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "run"
    err = _user_error(["--out", str(out), "--method", "sft", "--sft_data", str(sft)], capsys)
    assert err.startswith(f"error: {sft}:2: 'messages' must be a list starting with a user and an assistant"), err
    assert not os.path.exists(out / "tokenizer")  # read before the toy tokenizer is trained

    run = rundir.RunDir(dict(paper, out=str(tmp_path / "bind")), stages.METHODS)
    for name in ("spin/iter1/policy", "sft/iter1/policy", "ldalign/iter1/policy"):
        run.bind(name)
    sections = json.load(open(run.path("settings.json")))
    assert sections["spin"]["spin_keep_previous"] is True and sections["sft"]["sft_data"] == ""
    assert sections["spin"]["lr_per_iter"] == "" and "sft_data" not in sections["spin"]
    assert not {"spin_keep_previous", "sft_data"} & set(sections["ldalign"])
    run.cfg = dict(run.cfg, spin_keep_previous=False, sft_data="other.jsonl")
    run.check_settings(["ldalign"])  # neither is ldalign's
    with pytest.raises(SystemExit, match="spin: --spin_keep_previous True -> False"):
        run.check_settings(["spin"])
    with pytest.raises(SystemExit, match="sft: --sft_data '' -> 'other.jsonl'"):
        run.check_settings(["sft"])


@pytest.mark.slow
def test_paper_baselines_recipe_fills_every_row_of_table_1(paper_inputs, one_process_run, tmp_path, monkeypatch,
                                                           capsys):
    """`bash train.sh paper-baselines` prints (DRY_RUN=1) its three ldalign.py commands; each runs here, in this
    process, on a copy of the paper run's folder (ldalign, T 2), with PAPER_RUN's small shapes:
      spin  T 2, SPIN's lr / beta lists, --spin_keep_previous: iteration 1 trains on the N pairs of theta_0's
            samples; iteration 2 on 2N pairs, the first N those of iteration 1 (theta_0's y'), then theta_1's,
            every pair's reference log-probs those of theta_1 (recomputed here; theta_0's differ), weights 1,
            each iteration at its own lr (run here at 1e-4, 1e-5: the recipe's 5e-7 barely moves a tiny model)
      dpo   T 1 at lr 2e-7, beta 0.1, on --pref_data
      sft   T 1 at lr 1e-5 on every record of --data (not the --max_examples of D)
    Then harness.py lists theta_0 and every theta_t of the four methods, and a rerun trains nothing."""
    from transformers import AutoTokenizer

    from tools import harness
    out = str(tmp_path / "run")
    shutil.copytree(one_process_run[0], out)
    # the fixture's run has dpo at its own lr: removed (dpo/ and its settings), the recipe's DPO runs afresh
    shutil.rmtree(os.path.join(out, "dpo"))
    settings = json.load(open(os.path.join(out, "settings.json")))
    del settings["dpo"]
    json.dump(settings, open(os.path.join(out, "settings.json"), "w"))
    # PAPER_RUN's small shapes (the paper run's shared settings), but not its --lr and --T
    shapes = [a for i, a in enumerate(PAPER_RUN) if a not in ("--lr", "--T") and PAPER_RUN[i - 1] not in
              ("--lr", "--T")]
    env = dict(os.environ, DRY_RUN="1", SPIN_T="2", POLICY=paper_inputs["policy"], GUIDE=paper_inputs["guide"],
               DATA=paper_inputs["data"], REWARD_MODEL=paper_inputs["rm"], PREF_DATA=paper_inputs["pref_data"])
    p = subprocess.run(["bash", os.path.join(HERE, "train.sh"), "paper-baselines", "--out", out, "--eval_data",
                        paper_inputs["eval_data"]] + shapes, env=env, capture_output=True, text=True, check=True)
    commands = [c[c.index("ldalign.py") + 1:] for c in map(shlex.split, p.stdout.splitlines())]
    cfgs = [ldalign.parse_args(c) for c in commands]
    assert [c["method"] for c in cfgs] == ["spin", "dpo", "sft"] and {c["out"] for c in cfgs} == {out}
    assert all(c["preset"] == "paper" and c["data"] == paper_inputs["data"] for c in cfgs)
    spin_cfg, dpo_cfg, sft_cfg = cfgs
    assert (spin_cfg["T"], spin_cfg["spin_keep_previous"]) == (2, True)
    assert (spin_cfg["lr_per_iter"], spin_cfg["beta_per_iter"]) == ("5e-7,5e-7,1e-7,1e-7", "0.1,0.1,0.1,5.0")
    assert (dpo_cfg["T"], dpo_cfg["lr"], dpo_cfg["beta"], dpo_cfg["pref_data"]) == (1, 2e-7, 0.1,
                                                                                     paper_inputs["pref_data"])
    assert (sft_cfg["T"], sft_cfg["lr"], sft_cfg["sft_data"]) == (1, 1e-5, "")

    # every update's inputs, as the stages hand them to dpo.py
    calls = []
    real_dpo_train, real_sft_train = dpo.dpo_train, dpo.sft_train

    def dpo_train(model, pairs, ref_chosen, ref_rejected, weights, **kw):
        calls.append(SimpleNamespace(pairs=pairs, ref=(ref_chosen, ref_rejected), weights=weights, **kw))
        return real_dpo_train(model, pairs, ref_chosen, ref_rejected, weights, **kw)

    def sft_train(model, examples, **kw):
        calls.append(SimpleNamespace(pairs=examples, **kw))
        return real_sft_train(model, examples, **kw)
    monkeypatch.setattr(dpo, "dpo_train", dpo_train)
    monkeypatch.setattr(dpo, "sft_train", sft_train)
    monkeypatch.setattr(cli, "_LOG", [])
    spin_argv = commands[0] + ["--lr_per_iter", "1e-4,1e-5"]
    for argv in (spin_argv, commands[1], commands[2]):
        ldalign.main(argv)
    spin1, spin2, dpo1, sft1 = calls

    # spin: N pairs, then 2N: iteration 1's (theta_0's y') first, then theta_1's; reference theta_1 for all
    y0 = _read_jsonl(os.path.join(out, "iter0", "samples.jsonl"))
    y1 = _read_jsonl(os.path.join(out, "spin", "iter2", "samples.jsonl"))
    n = len(y0)
    assert [p[2] for p in spin1.pairs] == [r["y_prime_ids"] for r in y0]
    assert len(spin2.pairs) == 2 * n
    assert [p[2] for p in spin2.pairs] == [r["y_prime_ids"] for r in y0 + y1]
    assert [p[:2] for p in spin2.pairs[:n]] == [p[:2] for p in spin2.pairs[n:]] == [p[:2] for p in spin1.pairs]
    assert (spin2.weights == 1).all() and (spin1.lr, spin2.lr, spin1.beta, spin2.beta) == (1e-4, 1e-5, 0.1, 0.1)
    cpu = torch.device("cpu")
    theta_1 = stages.load_policy(os.path.join(out, "spin", "iter1", "policy"), spin_cfg, cpu)
    ref = dpo.reference_logps(theta_1, spin2.pairs, 4, cpu)
    theta_0 = stages.load_policy(paper_inputs["policy"], spin_cfg, cpu)
    ref0 = dpo.reference_logps(theta_0, spin2.pairs, 4, cpu)
    for got, want, other in zip(spin2.ref, ref, ref0):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
        assert (got - other).abs().max() > 1e-2  # not vacuous: theta_0's log-probs are others
    inputs = json.load(open(os.path.join(out, "stages.json")))["spin/iter2/policy"]
    assert {"iter0/samples.jsonl", "spin/iter2/samples.jsonl", "spin/iter1/policy"} <= set(inputs)
    _check_paper_run(out, paper_inputs, methods=("ldalign", "spin"))

    # dpo: one training at lr 2e-7 on the preference pairs; sft: at lr 1e-5 on every record of --data
    path = os.path.join(out, "skipped.jsonl")
    skipped = {s["where"] for s in _read_jsonl(path)} if os.path.exists(path) else set()
    prefs = [f"{paper_inputs['pref_data']}:{i}" for i in range(1, N_PREF + 1)]
    assert (dpo1.lr, dpo1.beta, len(dpo1.pairs)) == (2e-7, 0.1, len([w for w in prefs if w not in skipped]))
    assert sorted(os.listdir(os.path.join(out, "dpo"))) == ["iter1", "metrics.jsonl", "ref_logps_theta0.json",
                                                            "results.md"]
    tok = AutoTokenizer.from_pretrained(paper_inputs["policy"])
    records = [xy for w, xy in _first_turns(paper_inputs["data"]).items() if w not in skipped]
    assert len(records) > n  # more than D: --max_examples does not cut the SFT set
    assert sft1.pairs == [(dataset.prompt_ids(tok, x), dataset.response_ids(tok, x, y)) for x, y in records]
    assert sft1.lr == 1e-5 and not os.path.exists(os.path.join(out, "sft", "iter2"))

    # every row of Table 1: theta_0 and each method's theta_t, as harness.py (bash train.sh eval) reads them
    assert [label for label, _ in harness.models_of(out)] == ["SFT (theta_0)", "ldalign 1", "ldalign 2", "spin 1",
                                                              "spin 2", "dpo 1", "sft 1"]
    comparison = open(os.path.join(out, "comparison.md")).read()
    assert all(m in comparison for m in ("ldalign", "spin", "dpo", "sft"))
    # a rerun of the recipe trains nothing (theta_2 of spin is recorded from both samples files)
    capsys.readouterr()
    for argv in (spin_argv, commands[1], commands[2]):
        ldalign.main(argv)
    assert "=====" not in capsys.readouterr().out and len(calls) == 4
@pytest.mark.slow
def test_paper_preset_at_the_papers_lengths_in_one_process(paper_inputs, tmp_path, monkeypatch):
    """The paper preset's lengths, not shrunk: max_len 1024, prompts up to 512 tokens, 256 new tokens, a guide of
    1024 positions (GPT-2's), on the tiny zephyr-shaped policy (Mistral, GQA, zephyr's template with a system turn)
    and long four-turn records (build_long_records), end to end in this process (ldalign.main), T = 1. What each
    model is fed is read off its embedding tables (a global forward hook: the longest input, the largest id):
      - over-length records are listed in skipped.jsonl with their reason (prompt > 512, prompt + answer > 1024,
        a guide input over 1024 positions while the policy's tokens fit), the others make D;
      - y' ~ theta_0 runs to 256 tokens when no EOS comes, never further; prompts are left-padded to 512, and a
        short prompt behind ~480 pad positions is answered as it is alone;
      - the update's sequences reach 1000-1024 tokens (a pair of 512 + 512) and never pass 1024;
      - the guide reads at most 1024 positions; the reward model (DeBERTa, 512 positions) at most 512.
    The guide's tokenizer needs ~0.86x the policy's tokens for English (as GPT-2's against Mistral's): its longest
    input is x + y of the 512 + 512 pair (~830); the record it cannot hold is made of accented words (1.07x)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    guide = str(tmp_path / "gpt2_1024")
    save_tiny_gpt2(guide, n_positions=1024, vocab_size=1200)
    long = build_long_records(str(tmp_path), paper_inputs["policy"], guide)
    out = str(tmp_path / "run")
    seen = {}  # (rows, width) of an embedding table -> {"lengths": the input lengths it saw, "top": largest id}

    def record_input(module, args):
        if isinstance(module, torch.nn.Embedding):
            table = seen.setdefault((module.num_embeddings, module.embedding_dim), {"lengths": set(), "top": -1})
            table["lengths"].add(args[0].shape[-1])
            table["top"] = max(table["top"], int(args[0].max()))
    monkeypatch.setattr(cli, "_LOG", [])  # RunDir points the user-error log at this run's log.txt: not for later tests
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record_input)
    try:
        ldalign.main(["--preset", "paper", "--out", out, "--policy", paper_inputs["policy"], "--guide", guide,
                      "--reward_model", paper_inputs["rm"], "--data", long["data"], "--eval_data", long["eval_data"],
                      "--method", "ldalign", "--T", "1", "--epochs", "1", "--batch_size", "4", "--gen_batch_size", "4",
                      "--guide_batch_size", "4", "--guide_epochs", "1", "--agreement_n", "2", "--lr", "1e-4",
                      "--gen_compile", "false"])
    finally:
        hook.remove()
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert [cfg[k] for k in ("max_len", "max_prompt_len", "max_new_tokens")] == [1024, 512, 256]
    assert cfg["micro_batch_size"] == ldalign.PAPER["micro_batch_size"]  # the preset's (8: the 4 pairs at once)
    assert cfg["gen_static"] and cfg["grad_ckpt"] and cfg["overlength"] == "skip"
    # the records: skipped with their reason, or in D
    skipped = {r["where"]: r["why"] for r in _read_jsonl(os.path.join(out, "skipped.jsonl"))}
    why = {"max_prompt_len": "> max_prompt_len=512", "max_len": "> max_len=1024",
           "guide": "guide input would exceed the guide's 1024 positions"}
    assert sorted(skipped) == sorted(w for w, f in long["fate"].items() if f != "kept")
    for where, reason in skipped.items():
        assert why[long["fate"][where]] in reason, (where, reason)
    samples = _read_jsonl(os.path.join(out, "iter0", "samples.jsonl"))
    kept = [w for w, f in long["fate"].items() if f == "kept" and w.startswith(long["data"])]
    assert [r["where"] for r in samples] == kept
    # y' ~ theta_0: at most 256 tokens; a sample without EOS is cut at exactly 256
    tok = AutoTokenizer.from_pretrained(paper_inputs["policy"])
    lengths = [len(r["y_prime_ids"]) for r in samples]
    assert max(lengths) == 256 and all(n == 256 or r["y_prime_ids"][-1] == tok.eos_token_id
                                       for n, r in zip(lengths, samples)), lengths
    # what each model was fed (the tables of the tiny checkpoints: policy 64 wide, guide and RM 32)
    policy = seen[len(tok), 64]["lengths"]
    guide_positions = seen[1024, 32]  # GPT-2's wpe
    rm = seen[len(AutoTokenizer.from_pretrained(paper_inputs["rm"])), 32]["lengths"]
    print(f"[paper lengths] y' lengths {lengths}; longest input: policy {max(policy)}, guide "
          f"{max(guide_positions['lengths'])}, reward model {max(rm)}", flush=True)
    assert 1000 <= max(policy) <= 1024  # the update's longest pair: 512 + 512, padded to the micro-batch
    # the prefill of the one sampling batch: D's prompts left-padded to the longest, 500-512 tokens
    prompts = [dataset.prompt_ids(tok, r["x"], LONG_SYSTEM if i == 0 else None) for i, r in enumerate(samples)]
    longest = max(len(p) for p in prompts)
    assert 500 <= longest <= 512 and longest in policy and 1 in policy  # then one token per step
    # left padding at these lengths (a short prompt behind ~480 pad positions, the preset's StaticCache) changes
    # no token: greedy answers equal those of each prompt alone, without cache (generate_naive)
    model = AutoModelForCausalLM.from_pretrained(paper_inputs["policy"], dtype=torch.float32).eval()
    short = min(range(len(prompts)), key=lambda i: len(prompts[i]))
    pair = [prompts[0], prompts[short]]
    batched = generate_module.sample_responses(model, pair, batch_size=2, max_new_tokens=16, eos_token_id=-1,
                                               pad_token_id=tok.eos_token_id, temperature=0.0, top_p=1.0, top_k=0,
                                               seed=0, device=torch.device("cpu"), static=True)
    for p, y in zip(pair, batched):
        alone = generate_naive(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 16, -1,
                               tok.eos_token_id, temperature=0.0)
        assert alone[0].tolist() == y, len(p)
    assert max(guide_positions["lengths"]) <= 1024 and guide_positions["top"] <= 1023
    assert max(rm) <= 512
    # the stages' results at these lengths
    s = torch.tensor([r["s"] for r in _read_jsonl(os.path.join(out, "ldalign", "iter1", "distances.jsonl"))])
    assert len(s) == len(kept) and torch.isfinite(s).all() and (s >= 0).all()
    steps = _read_jsonl(os.path.join(out, "ldalign", "iter1", "train_metrics.jsonl"))
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"]) and math.isfinite(steps[0]["grad_norm"])
    ev = json.load(open(os.path.join(out, "ldalign", "iter1", "eval.json")))
    assert ev["n"] == 2 and math.isfinite(ev["reward"])
