"""Tests of the LD-Align reference implementation (CPU, tiny models built from configs, no downloads).

    python -m pytest -q -m "not slow"     # fast: every equation and every line of Algorithm 1, ~90 s on 2 cores
    python -m pytest -q                   # all (~10 min on 2 cores); CI runs all

Slow (@pytest.mark.slow): the multi-process tests (gloo, torchrun), the end-to-end runs of ldalign.py and train.sh,
kill / resume, bench.py, and the inductor compile of the decode step. The file follows the paper (arXiv 2404.06390)
in its order, then the engineering around it; the fixture builders and shared helpers (tiny models, data, tokenizers,
HF folders, the helpers that run ldalign.py) are in conftest.py.

Equation / Algorithm 1 line -> tests
    Eq. 1, log p(y|x) (sequence log-probs, the shift)
        test_sequence_logps_equals_minus_cross_entropy_on_response_only,
        test_sequence_logps_skips_shared_prompt_columns, test_collate_masks_prompt_and_padding
    Eq. 2, the guide T = (phi, psi) (Algorithm 1, line 4)
        test_guide_loss_decreases, test_decoder_uses_latent, test_recon_nll_matches_hand_computation,
        test_same_prompt_latent_diagnostic, test_save_load_roundtrip;
        slow: test_two_processes_train_the_guide_one_process_trains
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
    One GPU: line 10 with LoRA (lora.py, --lora_r), and the small preset (a tiny Qwen2 with Qwen2.5-Instruct's template)
        fast: test_lora_at_full_rank_steps_along_full_fine_tuning,
        test_lora_theta_t_is_saved_merged_and_reloads_to_the_same_logps,
        test_prompt_and_golden_tokens_follow_qwen_template,
        test_lora_targets_that_name_no_linear_layer_are_a_user_error_before_compute,
        test_lora_on_a_bf16_base_saves_theta_t_in_fp32_and_holds_what_a_reload_gives, test_lora_settings_are_checked
        slow: test_lora_fsdp2_two_processes_equal_one_process, test_small_preset_with_lora_end_to_end_then_resume

Engineering
    the sampler (generate.py): KV cache vs the cache-free oracle generate_naive and vs HF generate, top-k / top-p,
        seeding, EOS, pad_sequences, one StaticCache shared across batches
    FSDP2 / distributed: 2 processes == 1 process (the update, sampling, the guide and its s), one host copy of a
        checkpoint (rank 0 reads it), two nodes (train.sh) == 1 process, weights gathered once per generate(), equal
        decode steps
    data (dataset.py): JSONL / UTF-8 errors with file:line (SFT and preference files), Parquet and hub data sets
        (file:row), JSONL as real data looks (BOM, gzip, system message, text parts), over-length records,
        one prompt format (the toy template's system turn), golden tokens after the prompt, the shipped data, a
        mistyped local path, the toy tokenizer on a long run of one character
    run folder and resume (rundir.py, ldalign.py): settings check, kill and resume, NaN stop, bad data before
        compute, parse_args, no pickle, the lock (a dead or half-written one), a folder without its manifest,
        unreadable input and an unwritable --out as one-line errors
    pre-emption (checkpoint.py): an update resumed from its step checkpoint, and sampling from its finished
        batches, give the uninterrupted weights and tokens (1 process; FSDP2 on 2); SIGTERM stops at a boundary
    analysis (analysis.py, Sections 5.1.3 and 5.2): edit distance, toy judge, ranking agreement, histogram,
        PNG, reward models, the seeds report (means with 95% intervals); watching a run: train_curves.png,
        --tensorboard (its one-line error without the package; slow: the scalars of a killed and resumed run)
    Table 1 (harness.py) and provenance: lm-eval's version and each column's settings in table1.md, the chat
        template an option, --*_revision reaching every from_pretrained, config.json's resolved revisions and versions
    bench.py: smoke tests on the CPU with a tiny model
    the memory plan (plan.py, --plan): its table and verdict without a run folder, its option errors; slow: its
        shard bytes equal a real FSDP2 step's and its activations are within a stated tolerance of the saved ones;
        with LoRA its weight, gradient and optimizer bytes equal a real step's with adapters
    GPU only (skipped without CUDA): CUDA-graph decoding, bf16 training on one GPU
"""
import contextlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import analysis
import dataset
import dpo
import fsdp
import generate as generate_module
import guide as guide_lib
import ldalign
import stages
from conftest import (
    G_EOS,
    G_PAD,
    GEN_PAD,
    GEN_VOCAB,
    GOOD,
    HERE,
    LONG_SYSTEM,
    MIXED_LEN,
    MODELS,
    N_EVAL,
    N_PREF,
    PAPER_RUN,
    PAPER_T,
    QA,
    QWEN_SYSTEM,
    QWEN_TEMPLATE,
    RM_PROMPTS,
    RM_RESPONSES,
    SAME_LEN,
    TINY_RUN,
    ZEPHYR_TEMPLATE,
    ScriptedLM,
    _by_hand,
    _check_dpo_reference_uses_template_tokens,
    _check_paper_run,
    _check_run_folder,
    _check_same_stages,
    _cli,
    _cli_start,
    _cli_wait,
    _deberta_tokenizer,
    _first_turns,
    _gpt2_tokenizer,
    _paper_args,
    _paper_run,
    _read_jsonl,
    _run,
    _template_tokens,
    _tiny_deberta,
    _tiny_gpt2,
    _tiny_reward_model,
    _toy_tok,
    _toy_tok_dir,
    _train_sh,
    _train_sh_two_nodes,
    _train_under_outer_autocast,
    _write,
    build_long_records,
    build_paper_inputs,
    gen_gpt2,
    gen_llama,
    gen_prompts,
    generate_naive,
    save_mistral_tokenizer,
    save_qwen_tokenizer,
    save_tiny_gpt2,
    save_tiny_mistral,
    save_tiny_qwen,
    synthetic_examples,
    tiny_config,
    tiny_guide,
    tiny_llama,
)
from generate import (
    apply_top_k,
    apply_top_p,
    generate,
    pad_sequences,
    sample_categorical,
    sample_next,
    sample_responses,
)
from guide import GuideModel, collate_guide, eval_guide, latent_distances, load_guide, save_guide
from run import checkpoint, cli, lora, options, rundir
from tools import plan


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
    """The README's "Copy the loss" block is what people paste into other trainers: run it, compare with dpo.py."""
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("## Copy the loss", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    ns = {}
    exec(block, ns)
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(6, generator=g) for _ in range(4))
    s = torch.rand(6, generator=g) + 0.1
    torch.testing.assert_close(ns["latent_weights"](s), dpo.latent_weights(s))
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
# A minimal slice (the fast tier's run of Algorithm 1): 16 pairs, T = 2, one optimizer step per iteration (a global
# batch of all 16 pairs), lr 1e-3 so that theta_1 is visibly not theta_0. --data is the first 64 records of the shipped
# data: the toy SFT of theta_0 and its tokenizer read all of --data (of data/sort_train.jsonl, 2/3 of the run's time).
MINIMAL_RUN = ["--max_examples", "16", "--max_eval", "4", "--sft_steps", "5", "--T", "2", "--epochs", "1",
               "--batch_size", "16", "--micro_batch_size", "8", "--guide_epochs", "1", "--gen_batch_size", "16",
               "--agreement_n", "0", "--lr", "1e-3"]


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


# ====================================================================================================
# One GPU: Algorithm 1, line 10 with LoRA (lora.py, --lora_r), and the small preset (Qwen2.5-0.5B-Instruct)
# ====================================================================================================
def _pairs(n=6, vocab=64, seed=1):
    """n (x, y, y') id lists of a tiny vocabulary (1 = BOS, 2 = EOS)."""
    g = torch.Generator().manual_seed(seed)
    return [([1] + torch.randint(3, vocab, (3,), generator=g).tolist(),
             torch.randint(3, vocab, (4,), generator=g).tolist() + [2],
             torch.randint(3, vocab, (5,), generator=g).tolist() + [2]) for _ in range(n)]


def _eq4_loss(model, pairs, w, beta=0.5):
    """Eq. 4's mean loss at the reference (the model itself, detached): log 2, with Eq. 5's gradient."""
    pc, pr = dpo.pair_logps(model, pairs, torch.device("cpu"))
    losses, _, _ = dpo.ldalign_loss(pc, pr, pc.detach(), pr.detach(), w, beta)
    return losses.mean()


@pytest.mark.parametrize("full_rank", [True, False], ids=["r=in", "r<in"])
def test_lora_at_full_rank_steps_along_full_fine_tuning(full_rank):
    """What LoRA's first step does to the effective weight W + scaling * B @ A of every targeted projection.

    At step 0 B = 0: the model is theta_{t-1} exactly (the same loss), grad_A = scaling * B^T G = 0, and
    grad_B = scaling * G A^T, with G = dL/dW the gradient full fine-tuning takes. A step dB = -lr grad_B moves the
    effective weight by scaling * dB @ A = -lr scaling^2 G (A^T A). lora.begin draws A with orthonormal columns
    scaled by g = 1/sqrt(3) when r >= in (full rank): A^T A = g^2 I, so the LoRA step is full fine-tuning's step,
    times scaling^2 g^2: the same direction (cosine 1), checked here entry by entry. Below full rank (orthonormal
    rows) A^T A = g^2 P, the projection onto A's row space: G restricted to an r-dimensional subspace, still a
    descent direction (<G, G P> = |G P|^2 > 0) but not G's (the check is not vacuous)."""
    import copy
    full = tiny_llama(seed=0).train()
    model = copy.deepcopy(full)
    r = max(m.in_features for n, m in full.named_modules() if n.endswith("proj")) if full_rank else 4
    lora.add(model, lora.DEFAULT_TARGETS, r)
    lora.begin(model, alpha=2.0 * r, seed=7)  # scaling 2
    pairs, w = _pairs(), dpo.latent_weights(torch.rand(6, generator=torch.Generator().manual_seed(2)) + 0.5)
    loss_full, loss_lora = _eq4_loss(full, pairs, w), _eq4_loss(model, pairs, w)
    assert loss_lora.item() == pytest.approx(loss_full.item(), abs=1e-7) == pytest.approx(math.log(2), abs=1e-6)
    loss_full.backward()
    loss_lora.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)  # everything else frozen
    fulls = dict(full.named_modules())
    for name, m in lora.wrapped(model).items():
        G = fulls[name].weight.grad  # (out, in): full fine-tuning's gradient
        assert torch.count_nonzero(m.lora_A.grad) == 0  # B = 0 at step 0
        step = m.scaling * m.lora_B.grad @ m.lora_A  # (out, in): the effective weight's move per unit of -lr
        cos = F.cosine_similarity(step.flatten(), G.flatten(), dim=0).item()
        if full_rank:
            want = m.scaling ** 2 / 3 * G
            torch.testing.assert_close(step, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
            assert cos > 1 - 1e-5, (name, cos)
        else:
            assert 0 < cos < 0.99, (name, cos)


def test_lora_theta_t_is_saved_merged_and_reloads_to_the_same_logps(tmp_path):
    """theta_t = theta_{t-1} + scaling * B @ A, saved as a standard HF checkpoint (the plain model's names, fp32)
    with the adapters beside (policy/adapter/, peft's layout, in the manifest): reloaded (stages.load_policy, the
    run's own checkpoints: exact fp32, and wrapped again with inactive adapters) it gives the log-probs of the
    trained model, and base + scaling * B @ A from the adapter's files is the merged weight. Only the targeted
    weights moved."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    cpu = torch.device("cpu")
    theta0 = str(tmp_path / "theta0")
    with rundir.atomic_path(theta0) as tmp:
        tiny_llama(seed=0).save_pretrained(tmp)
        _toy_tok().save_pretrained(tmp)
    cfg = dict(policy="elsewhere", grad_ckpt=True, compile=False, trust_remote_code=False, lora_r=4,
               lora_targets="q_proj,v_proj,down_proj")
    model = stages.load_policy(theta0, cfg, cpu)
    assert len(lora.wrapped(model)) == 2 * 3 and not any(p.requires_grad for p in model.parameters())
    # per block: q_proj and v_proj (32 -> 32, 32 -> 16: GQA), down_proj (64 -> 32), 4 (in + out) each
    n_base = sum(p.numel() for p in tiny_llama().parameters())
    assert lora.numel(model) == (2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32)), n_base)
    lora.begin(model, alpha=8.0, seed=1)
    pairs = _pairs(8)
    rc, rr = dpo.reference_logps(model, pairs, 4, cpu)
    ref = AutoModelForCausalLM.from_pretrained(theta0, dtype=torch.float32)
    assert torch.equal(torch.cat([rc, rr]), torch.cat(dpo.reference_logps(ref, pairs, 4, cpu)))  # B = 0
    dpo.dpo_train(model, pairs, rc, rr, torch.ones(8), beta=0.5, lr=1e-2, epochs=2, batch_size=4,
                  micro_batch_size=2, device=cpu, optimizer="adamw")
    trained = torch.cat(dpo.reference_logps(model, pairs, 4, cpu))  # adapters on
    config = lora.merge(model)
    assert config == {"r": 4, "lora_alpha": 8.0, "target_modules": ["down_proj", "q_proj", "v_proj"]}
    merged = torch.cat(dpo.reference_logps(model, pairs, 4, cpu))  # adapters off, merged weights
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=0)
    out = str(tmp_path / "theta1")
    rundir.save_hf(model, _toy_tok(), out, adapter=(config, theta0))
    rundir.verify(out)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "model.safetensors"} <= set(manifest)
    saved = load_file(os.path.join(out, "model.safetensors"))
    before = load_file(os.path.join(theta0, "model.safetensors"))
    assert saved.keys() == before.keys() and {v.dtype for v in saved.values()} == {torch.float32}
    moved = {k for k in saved if not torch.equal(saved[k], before[k])}
    assert moved == {k for k in saved if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))}
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    acfg = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert acfg["peft_type"] == "LORA" and acfg["base_model_name_or_path"] == theta0 and acfg["r"] == 4
    for k in moved:
        a = adapter[f"base_model.model.{k[:-len('.weight')]}.lora_A.weight"]
        b = adapter[f"base_model.model.{k[:-len('.weight')]}.lora_B.weight"]
        torch.testing.assert_close(saved[k], before[k] + acfg["lora_alpha"] / acfg["r"] * b @ a, atol=1e-6, rtol=0)
    reloaded = stages.load_policy(out, cfg, cpu)
    assert torch.equal(torch.cat(dpo.reference_logps(reloaded, pairs, 4, cpu)), merged)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # what sampling, evaluation, lm-eval read
    torch.testing.assert_close(torch.cat(dpo.reference_logps(plain, pairs, 4, cpu)), merged, atol=1e-5, rtol=0)


def test_lora_targets_that_name_no_linear_layer_are_a_user_error_before_compute(tmp_path, capsys):
    """--lora_targets c_attn (GPT-2's name) on a Llama: one line naming the option and the model's linear layers,
    exit status 2, before theta_0 (the toy's SFT) is trained."""
    out = str(tmp_path / "run")
    with open(os.path.join(HERE, "data", "sort_train.jsonl")) as f:
        (tmp_path / "train.jsonl").write_text("".join(f.readlines()[:16]))
    with pytest.raises(SystemExit) as e:
        cli.report_errors(ldalign.main, ["--out", out, "--data", str(tmp_path / "train.jsonl"), "--max_examples", "8",
                                         "--lora_r", "2", "--lora_targets", "q_proj,c_attn"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--lora_targets q_proj,c_attn: c_attn is no nn.Linear of LlamaForCausalLM" in err and "down_proj" in err
    assert not os.path.exists(os.path.join(out, "sft"))


def test_lora_settings_are_checked(monkeypatch):
    """parse_args: --lora_alpha >= 0, targets given, a bf16 base only with LoRA and in one process."""
    for argv, msg in [(["--lora_alpha", "-1"], "--lora_alpha must be a finite number >= 0"),
                      (["--lora_r", "2", "--lora_targets", ","], "--lora_targets names no module"),
                      (["--lora_base_dtype", "bfloat16"], "needs --lora_r > 0 and one process"),
                      (["--lora_r", "2", "--lora_base_dtype", "float16"], "is 'float32' or 'bfloat16'")]:
        with pytest.raises(SystemExit, match=msg):
            ldalign.parse_args(argv)
    assert ldalign.parse_args(["--lora_r", "2", "--lora_base_dtype", "bfloat16"])["lora_base_dtype"] == "bfloat16"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="one process"):
        ldalign.parse_args(["--lora_r", "2", "--lora_base_dtype", "bfloat16"])


def test_lora_on_a_bf16_base_saves_theta_t_in_fp32_and_holds_what_a_reload_gives(tmp_path):
    """--lora_base_dtype bfloat16 (the 7B on one GPU): the frozen weights in bf16, A and B in fp32. theta_t is
    saved in fp32: bf16(theta_{t-1}) + scaling * B @ A, computed in fp32 (the update is not rounded away), the
    frozen weights exact; the model held in memory after the merge is bit for bit what reloading theta_t gives
    (its bf16 rounding), so a resumed run computes with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file
    cpu = torch.device("cpu")
    theta0 = str(tmp_path / "theta0")
    with rundir.atomic_path(theta0) as tmp:
        tiny_llama(seed=0).save_pretrained(tmp)
    cfg = dict(policy="elsewhere", grad_ckpt=False, compile=False, trust_remote_code=False, lora_r=4,
               lora_targets="q_proj,v_proj", lora_base_dtype="bfloat16")
    model = stages.load_policy(theta0, cfg, cpu)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    lora.begin(model, alpha=4.0, seed=1)
    pairs = _pairs(8)
    rc, rr = dpo.reference_logps(model, pairs, 4, cpu)
    dpo.dpo_train(model, pairs, rc, rr, torch.ones(8), beta=0.5, lr=1e-3, epochs=1, batch_size=4,
                  micro_batch_size=4, device=cpu, optimizer="adamw")
    out = str(tmp_path / "theta1")
    rundir.save_hf(model, _toy_tok(), out, adapter=(lora.merge(model), theta0))
    saved = load_file(os.path.join(out, "model.safetensors"))
    before = load_file(os.path.join(theta0, "model.safetensors"))
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    for k, v in saved.items():
        base = before[k].to(torch.bfloat16).float()  # theta_{t-1} as the update saw it
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            a, b = (adapter[f"base_model.model.{k[:-len('.weight')]}.lora_{x}.weight"] for x in "AB")
            torch.testing.assert_close(v, base + b @ a, atol=1e-7, rtol=0)
            assert not torch.equal(v.to(torch.bfloat16).float(), base)  # the update survives the next rounding
        else:
            assert torch.equal(v, base), k
    reloaded = stages.load_policy(out, cfg, cpu)
    held = model.state_dict()
    for k, v in reloaded.state_dict().items():
        if "lora_" not in k:  # the (inactive) adapters: lora.begin draws them again
            assert v.dtype == held[k].dtype and torch.equal(v, held[k]), k


def _lora_worker(folder, out):
    """Run under `python` or `torchrun`: one LoRA update of the policy in `folder` (stages.load_policy: FSDP2 when
    world > 1), theta_t saved merged into `out` with its adapters (rundir.save_hf)."""
    torch.set_num_threads(1)
    rank, world, device = fsdp.init()
    cfg = dict(policy="elsewhere", grad_ckpt=True, compile=False, trust_remote_code=False, lora_r=4,
               lora_targets=lora.DEFAULT_TARGETS)
    model = stages.load_policy(folder, cfg, device)
    lora.begin(model, alpha=8.0, seed=3)
    pairs = _pairs(13)  # 13 pairs: the last batch is filled up
    ref_c, ref_r = dpo.reference_logps(model, pairs, 2, device)
    w = dpo.latent_weights(torch.rand(len(pairs), generator=torch.Generator().manual_seed(1)) + 0.1)
    dpo.dpo_train(model, pairs, ref_c, ref_r, w, beta=0.5, lr=1e-2, epochs=1, batch_size=4, micro_batch_size=1,
                  device=device, optimizer="rmsprop", seed=3)
    rundir.save_hf(model, _toy_tok(), out, adapter=(lora.merge(model), folder))
    fsdp.finish()


@pytest.mark.slow
def test_lora_fsdp2_two_processes_equal_one_process(tmp_path):
    """--lora_r under torchrun, 2 CPU processes: the adapters are added before FSDP2 shards the model (frozen and
    trainable parameters in one unit; rank 0 reads the checkpoint), the update averages their gradients over
    ranks, the merge computes each rank's rows. theta_t and its adapters are those of one process."""
    from safetensors.torch import load_file
    env = dict(os.environ, OMP_NUM_THREADS="1")
    theta0 = str(tmp_path / "theta0")
    with rundir.atomic_path(theta0) as tmp:
        tiny_llama(seed=0).save_pretrained(tmp)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _lora_worker(theta0, one)  # one process: here
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                    "lora_worker", theta0, two], check=True, cwd=HERE, env=env, timeout=300)
    before = load_file(os.path.join(theta0, "model.safetensors"))
    a, b = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    assert a.keys() == b.keys() == before.keys()  # a plain checkpoint
    diff = math.sqrt(sum(((a[k] - b[k]) ** 2).sum().item() for k in a))
    step = math.sqrt(sum(((a[k] - before[k]) ** 2).sum().item() for k in a))
    print(f"[LoRA, 1 vs 2 processes] theta_1: {diff / step:.2g} of the step", flush=True)
    assert step > 0 and diff < 1e-3 * step
    a, b = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-3 * a[k].abs().max().item(), rtol=0)


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_prompt_and_golden_tokens_follow_qwen_template(tmp_path, system):
    """The small preset's policy format: Qwen2.5-Instruct's template puts its default system turn before x when
    the record has none, and the record's own system message otherwise; no BOS; the golden response is what the
    template puts after the prompt, ending with <|im_end|> (Qwen's eos)."""
    from transformers import AutoTokenizer
    save_qwen_tokenizer(str(tmp_path))
    json.dump({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
              open(tmp_path / "config.json", "w"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_template == QWEN_TEMPLATE and tok.bos_token is None and tok.eos_token == "<|im_end|>"
    x, y = QA[0]
    px, py = dataset.prompt_ids(tok, x, system), dataset.response_ids(tok, x, y, system)
    assert tok.decode(px) == (f"<|im_start|>system\n{system or QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{x}"
                              "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(py) == y + "<|im_end|>" and py[-1] == tok.eos_token_id
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": x}, {"role": "assistant", "content": y}]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert full[:len(px) + len(py)] == px + py  # the conversation's own tokens


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    """The paper path's tiny inputs (GPT-2 guide, DeBERTa RM, UltraChat-like records), with a tiny
    Qwen2.5-0.5B-Instruct as the policy."""
    inputs = build_paper_inputs(str(tmp_path_factory.mktemp("small_inputs")))
    inputs["policy"] = os.path.join(os.path.dirname(inputs["policy"]), "qwen")
    save_tiny_qwen(inputs["policy"])
    return inputs


# The small preset, shrunk to seconds: 8 pairs, T = 2, 1 optimizer step per iteration, no held-out evaluation
# (the paper path's tests score one); the prompts hold Qwen's long default system turn (in this tiny vocabulary
# ~60 tokens).
SMALL_RUN = ["--max_examples", "8", "--max_len", "160", "--max_prompt_len", "128", "--max_new_tokens", "16",
             "--T", "2", "--epochs", "1", "--batch_size", "8", "--micro_batch_size", "4", "--gen_batch_size", "8",
             "--agreement_n", "0", "--eval_data", "", "--lr", "1e-3", "--guide_epochs", "1",
             "--guide_batch_size", "16", "--gen_compile", "false"]


def _small_args(inputs, out, *extra):
    return ["--preset", "small", "--out", out, "--policy", inputs["policy"], "--guide", inputs["guide"],
            "--data", inputs["data"], "--reward_model", inputs["rm"], *SMALL_RUN, *extra]


@pytest.mark.slow
def test_small_preset_with_lora_end_to_end_then_resume(small_inputs, tmp_path):
    """`--preset small --lora_r 4` on a tiny Qwen2 with Qwen2.5-Instruct's tokenizer and template, 1 process:
    every theta_t is a plain Qwen2 checkpoint (fp32, tied embeddings, the same tokenizer and template) with its
    adapters beside, and only the targeted projections moved; the samples' prompts carry Qwen's system turn. A run
    that lost theta_2 resumes from theta_1 (reloaded, adapters drawn again from their seed) to the same bytes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = str(tmp_path / "run")
    log = _paper_run(_small_args(small_inputs, out, "--lora_r", "4"), name="small preset, LoRA r 4")
    assert "preset=small" in log and "[ldalign iter 2]" in log
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["optimizer"] == "rmsprop" and cfg["beta"] == 0.1 and cfg["judge"] == "reward" and cfg["lora_r"] == 4
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["ldalign"]["lora_r"] == 4  # theta_t binds its LoRA settings
    tok = AutoTokenizer.from_pretrained(small_inputs["policy"])
    sample = _read_jsonl(os.path.join(out, "iter0", "samples.jsonl"))[0]
    assert dataset.prompt_text(tok, sample["x"]).startswith("<|im_start|>system\nYou are Qwen")
    prev = load_file(os.path.join(small_inputs["policy"], "model.safetensors"))
    for t in (1, 2):
        pol = os.path.join(out, "ldalign", f"iter{t}", "policy")
        rundir.verify(pol)
        theta = load_file(os.path.join(pol, "model.safetensors"))
        assert theta.keys() == prev.keys() and {v.dtype for v in theta.values()} == {torch.float32}
        moved = {k for k in theta if not torch.equal(theta[k], prev[k].float())}
        assert moved and all(k.split(".")[-2].endswith("_proj") and k.endswith("weight") for k in moved), moved
        acfg = json.load(open(os.path.join(pol, "adapter", "adapter_config.json")))
        assert acfg["r"] == 4 and acfg["base_model_name_or_path"].endswith("policy" if t > 1 else "qwen")
        assert AutoTokenizer.from_pretrained(pol).chat_template == tok.chat_template
        prev = theta
    model = AutoModelForCausalLM.from_pretrained(pol)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    before = open(os.path.join(pol, "model.safetensors"), "rb").read()
    shutil.rmtree(os.path.join(out, "ldalign", "iter2"))
    log = _paper_run(_small_args(small_inputs, out, "--lora_r", "4"), name="small preset, LoRA, resume at 2")
    assert "ldalign iteration 2/2" in log and "ldalign iteration 1/" not in log
    assert open(os.path.join(pol, "model.safetensors"), "rb").read() == before


# ####################################################################################################
# Engineering
# ####################################################################################################


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


# ====================================================================================================
# FSDP2 / distributed (gloo, CPU)
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# 2 processes == 1 process: same reference log-probs, same losses, same updated weights
# ----------------------------------------------------------------------------------------------------
def _fsdp_worker(out_prefix):
    """Run under `python` or `torchrun`: one short LD-Align update of a tiny Llama, written to out_prefix."""
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    rank, world, device = fsdp.init()
    model = tiny_llama(seed=0).train()
    if world > 1:
        model = fsdp.parallelize(model, device)
    g = torch.Generator().manual_seed(1)
    pairs = [([1] + torch.randint(3, 64, (int(n),), generator=g).tolist(),
              torch.randint(3, 64, (int(m),), generator=g).tolist() + [2],
              torch.randint(3, 64, (int(k),), generator=g).tolist() + [2])
             for n, m, k in torch.randint(1, 6, (13, 3), generator=g)]  # 13 pairs: the last batch is filled up
    ref_c, ref_r = dpo.reference_logps(model, pairs, 2, device)  # each rank scores its share, all get all
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
        json.dump({"loss": [h["loss"] for h in hist], "ref": ref_c.tolist() + ref_r.tolist()},
                  open(out_prefix + ".json", "w"))
    fsdp.finish()


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------------------
# one host copy of the weights: under torchrun only rank 0 reads a checkpoint, the others receive their shards
# ----------------------------------------------------------------------------------------------------
def _every_rank_reads(path, exact_fp32, grad_ckpt=False):
    """fsdp.load_policy as it was before: every rank reads the whole checkpoint, then shards it."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if exact_fp32 else "auto")
    if grad_ckpt:
        m.activation_checkpointing_enable()
    return fsdp.parallelize(m, torch.device("cpu")).to(dtype=torch.float32)


def _differences(a, b):
    """Where two FSDP2 models differ: this rank's shards and buffers (values, dtypes), names, configs, ties."""
    sa, sb = a.state_dict(), b.state_dict()
    out = [] if sa.keys() == sb.keys() else ["state_dict keys"]
    for k in sa.keys() & sb.keys():
        x, y = sa[k], sb[k]
        if type(x) is not type(y) or x.dtype != y.dtype:
            out.append(f"{k}: type or dtype")
        elif not torch.equal(*(t.to_local() if hasattr(t, "to_local") else t for t in (x, y))):
            out.append(k)
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    out += [f"buffer {k}" for k in buffers_b if k not in buffers_a or buffers_a[k].dtype != buffers_b[k].dtype
            or not torch.equal(buffers_a[k], buffers_b[k])]
    if [n for n, _ in a.named_parameters()] != [n for n, _ in b.named_parameters()]:
        out.append("parameters")
    if a.config.to_dict() != b.config.to_dict() or a.generation_config != b.generation_config:
        out.append("config")
    tied = [m.get_output_embeddings().weight is m.get_input_embeddings().weight for m in (a, b)]
    return out + (["tied embeddings"] if tied[0] != tied[1] else [])


def _one_host_copy_worker(rank, results, folder):
    """Rank `rank`'s growth of peak host memory while fsdp.load_policy loads folder/policy, and the differences
    of what it loaded from what every rank reading the checkpoint loads."""
    import re
    torch.set_num_threads(1)

    def peak_mb():
        # VmHWM: this process's peak resident memory (ru_maxrss would count the parent's from before exec too)
        return int(re.search(r"VmHWM:\s*(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    # The tiny bf16 Mistral first: its load pays the one-time costs (imports, the first DTensor and gloo calls)
    cpu = torch.device("cpu")
    small = fsdp.load_policy(os.path.join(folder, "mistral"), cpu, exact_fp32=False, grad_ckpt=True)
    before = peak_mb()
    policy = fsdp.load_policy(os.path.join(folder, "policy"), cpu, exact_fp32=True)
    grown = peak_mb() - before
    shard = sum(p.to_local().numel() * p.element_size() for p in policy.parameters()) / 2**20
    results[rank] = dict(grown_mb=grown, shard_mb=shard, differ=_differences(
        policy, _every_rank_reads(os.path.join(folder, "policy"), exact_fp32=True)) + _differences(
        small, _every_rank_reads(os.path.join(folder, "mistral"), exact_fp32=False, grad_ckpt=True)))


@pytest.mark.slow
def test_only_rank_0_reads_the_checkpoint_into_host_memory(tmp_path):
    """Under torchrun fsdp.load_policy reads a checkpoint on rank 0 only; rank 1 builds the model on the meta
    device and receives its shards. A ~100 MB fp32 policy, as the run saves theta_t (tied embeddings, rotary
    inv_freq: a buffer no state dict holds): rank 1's peak host memory grows by its own shard (half the model)
    and a few MB, rank 0's by its shard and the whole model. Each rank's shards,
    buffers and config equal those of every rank reading the checkpoint, as before; so do those of a bf16-stored
    Mistral (an outside theta_0, cast to fp32) with activation checkpointing."""
    import functools
    policy = tiny_llama(vocab=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    policy.save_pretrained(tmp_path / "policy")
    save_tiny_mistral(str(tmp_path / "mistral"), vocab_size=96)
    model_mb = os.path.getsize(tmp_path / "policy" / "model.safetensors") / 2**20
    assert 95 < model_mb < 110
    results = _run_gloo(functools.partial(_one_host_copy_worker, folder=str(tmp_path)))
    print({rank: {k: round(v) for k, v in r.items() if k != "differ"} for rank, r in results.items()})
    assert results[0]["differ"] == results[1]["differ"] == []
    # Measured: rank 1 +57..63 MB (its 51 MB shard), rank 0 +153..154 MB; every rank reading the checkpoint
    # (the loading before): +126 MB on rank 1
    assert results[1]["grown_mb"] - results[1]["shard_mb"] < 0.3 * model_mb
    assert results[1]["grown_mb"] < 0.8 * model_mb
    assert results[0]["grown_mb"] - results[0]["shard_mb"] > 0.9 * model_mb


# ----------------------------------------------------------------------------------------------------
# several nodes: train.sh passes NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT to torchrun
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_nodes_get_what_one_process_gets(tmp_path):
    """train.sh on two nodes, both this host (_train_sh_two_nodes: two torchrun launchers, NNODES=2, NODE_RANK 0
    and 1, one process each): the minimal run of one process, as one process makes it. theta_0's samples are the
    same bytes (global sampling batches), and so are the steps and evaluations; S and the loss agree to float
    round-off (the guide trains on the global batches of one process, with their loss)."""
    data = _minimal_data(tmp_path)
    args = ["--data", data] + MINIMAL_RUN + ["--T", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run(["--out", one] + args)
    nodes = _train_sh_two_nodes(["tiny", "--out", two] + args, str(tmp_path), timeout=240)
    for rank, (status, out) in enumerate(nodes):
        assert status == 0, f"node {rank}:\n{out[-3000:]}"
    assert "2 process(es)" in nodes[0][1]
    assert open(os.path.join(one, "iter0", "samples.jsonl"), "rb").read() == \
        open(os.path.join(two, "iter0", "samples.jsonl"), "rb").read()
    rows = [_read_jsonl(os.path.join(out, "ldalign", "metrics.jsonl")) for out in (one, two)]
    assert [(r["iter"], r["steps"], r["exact_match"]) for r in rows[0]] == \
        [(r["iter"], r["steps"], r["exact_match"]) for r in rows[1]]
    assert rows[1][1]["S"] == pytest.approx(rows[0][1]["S"], rel=1e-5)
    assert rows[1][1]["loss"] == pytest.approx(rows[0][1]["loss"], abs=1e-5)


def test_train_sh_two_nodes_need_node_rank_and_master_addr():
    """NNODES > 1 without NODE_RANK (every node would be node 0) or MASTER_ADDR: one line, before torchrun."""
    for env in ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, {"NNODES": "2", "NODE_RANK": "1"}):
        p = _train_sh(["tiny"], env, timeout=60)
        assert p.returncode == 2 and p.stderr.startswith("NNODES=2 needs NODE_RANK (0 .. 1"), p.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------
# generation under FSDP2: the weights gathered once per generate(); ranks whose rows finish at different steps
# still take the same number of decode steps
# ----------------------------------------------------------------------------------------------------
def _gloo_process(rank, worker, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    worker(rank, results)
    dist.barrier()  # no rank leaves while another is still in a collective (it would abort that rank's gloo threads)
    dist.destroy_process_group()


def _run_gloo(worker, world=2):
    """worker(rank, results) in `world` processes joined by a gloo process group; returns what they put in results."""
    with tempfile.TemporaryDirectory() as d:
        results = mp.Manager().dict()
        mp.spawn(_gloo_process, args=(worker, world, os.path.join(d, "pg"), results), nprocs=world)
        return dict(results)


SAMPLE_CFG = dict(gen_batch_size=4, max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=0, gen_compile=False,
                  compile=False)
SAMPLE_TOK = SimpleNamespace(eos_token_id=7, pad_token_id=GEN_PAD)


def _sample_dataset(model, static):
    """generate.sample_dataset of 13 prompts (4 global batches of 4, the last short), sampled, seeded."""
    prompts = gen_prompts([3, 9, 5, 1, 7, 4, 8, 2, 6, 6, 3, 9, 5], seed=4)
    return generate_module.sample_dataset(model, prompts, SAMPLE_TOK, dict(SAMPLE_CFG, gen_static=static), 3,
                                          torch.device("cpu"))


def _sample_dataset_worker(rank, results):
    torch.set_num_threads(1)
    for static in (False, True):
        results[rank, static] = _sample_dataset(gen_llama(), static)
        results[rank, static, "fsdp"] = _sample_dataset(fsdp.parallelize(gen_llama(), torch.device("cpu")), static)


@pytest.mark.slow
def test_two_processes_sample_what_one_process_samples():
    """The sampling batches are global (same prompts, same seed per batch whatever the number of processes), so
    2 processes, plain or FSDP2-sharded, sample exactly the y' that 1 process does."""
    results = _run_gloo(_sample_dataset_worker)
    for static in (False, True):
        one = _sample_dataset(gen_llama(), static)
        assert len(one) == 13 and len({tuple(y) for y in one}) > 6  # sampled, not all alike
        for rank in (0, 1):
            assert results[rank, static] == one and results[rank, static, "fsdp"] == one, (rank, static)


def _gather_count_worker(rank, results):
    """FSDP2 over gloo: count the weight all-gathers of one generate() call with and without gathered_weights."""
    from torch.profiler import profile
    torch.set_num_threads(1)
    plain = gen_llama()
    ids, mask = pad_sequences(gen_prompts([3, 9] if rank == 0 else [5, 1], seed=rank), GEN_PAD, side="left")
    want = generate(plain, ids, mask, 12, eos_token_id=None, pad_token_id=GEN_PAD, temperature=0)
    model = fsdp.parallelize(gen_llama(), torch.device("cpu")).eval()
    n_fsdp = len(fsdp.gathered_weights(model).mods)
    for static in (False, True):
        for gathered in (True, False):
            with profile() as prof, (fsdp.gathered_weights(model) if gathered else contextlib.nullcontext()):
                got = generate(model, ids, mask, 12, eos_token_id=None, pad_token_id=GEN_PAD, temperature=0,
                               static=static)
            fsdp.reshard_all(model)
            n_gathers = sum(e.name == "fsdp::all_gather_copy_in" for e in prof.events())  # one per module gather
            results[rank, static, gathered] = (n_gathers, n_fsdp, torch.equal(got, want))
    # after sampling, training is back to FSDP2's own schedule: each block gathered in forward and again in
    # backward, the root (embeddings, head) once, kept for backward (FSDP2's root default, which leaving
    # gathered_weights must not overwrite)
    with profile() as prof:
        model.train()(ids, attention_mask=mask).logits.float().pow(2).mean().backward()
    results[rank, "train"] = sum(e.name == "fsdp::all_gather_copy_in" for e in prof.events())


@pytest.mark.slow
def test_fsdp_generation_gathers_weights_once():
    # Generation under FSDP must not all-gather the weights at every token. 12 tokens = 12 forwards.
    results = _run_gloo(_gather_count_worker)
    for rank in (0, 1):
        for static in (False, True):
            n_once, n_fsdp, same = results[rank, static, True]
            assert same and n_once == n_fsdp == 3  # one all-gather per FSDP module (2 blocks + root), in total
            n_every, _, same = results[rank, static, False]
            assert same and n_every >= 12  # the check is not vacuous: without it, at least one per token
        assert results[rank, "train"] == 2 * 2 + 1


def _steps_worker(rank, results):
    model = ScriptedLM([2], [0 if rank == 0 else 3])  # rank 0 is done at once, rank 1 after 4 tokens
    generate_module.SYNC_EVERY = 1  # (a fresh process) check at every step, so early stopping shows
    ids, mask = pad_sequences([[5, 5]], GEN_PAD, side="left")
    out = generate(model, ids, mask, 10, eos_token_id=2, pad_token_id=GEN_PAD, temperature=0)
    results[rank] = (out.tolist(), model.calls)


@pytest.mark.slow
def test_distributed_same_number_of_steps():
    results = _run_gloo(_steps_worker)
    assert results[0] == ([[2]], 4)  # kept stepping (emitting pad, cut off on return) for rank 1
    assert results[1] == ([[10, 11, 12, 2]], 4)


# ----------------------------------------------------------------------------------------------------
# the guide (Algorithm 1, lines 4 and 8): 2 processes (FSDP2) train the guide 1 process trains, and give its s
# ----------------------------------------------------------------------------------------------------
# 2 epochs of batches of 8 over 2 x 13 rows of mixed lengths: each epoch's last batch is filled up with 6 rows of
# weight 0, and the two ranks' halves of a batch hold different numbers of tokens
GUIDE_CFG = dict(seed=3, latent_dim=8, guide_epochs=2, guide_batch_size=8, guide_lr=3e-3, log_every=1)


def _guide_triples():
    g = torch.Generator().manual_seed(5)

    def ids(lo, hi):
        return torch.randint(4, 64, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    return [(ids(1, 6), ids(1, 8) + [G_EOS], ids(1, 8) + [G_EOS]) for _ in range(13)]


def _fit_guide():
    """guide.fit as Stages.guide calls it (FSDP2 when world > 1), from a GPT-2 config with dropout 0.1 (GPT-2's
    own), then guide.distances (line 8). Returns the full weights (numpy), s, S and the diagnostics."""
    cpu, triples = torch.device("cpu"), _guide_triples()
    g = guide_lib.fit(tiny_config(dropout=0.1), triples, GUIDE_CFG, G_PAD, cpu, log=lambda m: None)
    s = guide_lib.distances(guide_lib.freeze(g), triples, 4, G_PAD, cpu)
    sd = fsdp.full_state_dict(g) if fsdp.is_fsdp(g) else g.state_dict()
    return {k: v.detach().numpy().copy() for k, v in sd.items()}, s.tolist(), s.mean().item(), g.diagnostics


def _guide_worker(rank, results):
    torch.set_num_threads(1)
    # an unwrapped guide in 2 processes would train each rank on its half of every batch: refused
    with pytest.raises(ValueError, match="FSDP2"):
        guide_lib.train_guide(tiny_guide(), [([1], [5, G_EOS])] * 4, epochs=1, batch_size=2, lr=1e-3, pad_id=G_PAD,
                              seed=0, device="cpu")
    out = _fit_guide()
    if rank == 0:
        results["two"] = out


@pytest.mark.slow
def test_two_processes_train_the_guide_one_process_trains():
    """The guide's batches are global (dpo.global_batches) and its loss is the global batch's per-token mean, with
    dropout off: 2 processes (FSDP2) end with the weights of 1 process, and the same s, S and diagnostics, to float
    round-off (measured: weights 1.5e-6 max abs, s 7e-7 and S 7e-8 relative)."""
    results = _run_gloo(_guide_worker)
    w1, s1, S1, d1 = _fit_guide()
    w2, s2, S2, d2 = results["two"]
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-5, err_msg=k)
    assert s2 == pytest.approx(s1, rel=1e-5, abs=1e-6)
    assert S2 == pytest.approx(S1, rel=1e-5)
    assert d2 == pytest.approx(d1, rel=1e-5)
    # not vacuous: training moved the weights, and the pairs have different distances
    torch.manual_seed(GUIDE_CFG["seed"])
    init = guide_lib.build_guide(tiny_config(dropout=0.1), GUIDE_CFG["latent_dim"]).state_dict()
    assert max(np.abs(w1[k] - init[k].numpy()).max() for k in w1) > 1e-3
    assert len(set(s1)) == len(s1) and min(s1) > 0


# ====================================================================================================
# Data (dataset.py): bad input names file:line, before any compute
# ====================================================================================================
@pytest.mark.parametrize("bad, msg", [
    ('{"messages": [', "not valid JSON"),
    ('{"text": "no messages"}', "missing field 'messages'"),
    ('[1, 2]', "expected a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "'messages' must be a list starting with"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}), "roles"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}),
     "prompt .* is empty"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}),
     "response .* is empty"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}),
     "must be a string"),
])
def test_malformed_jsonl_rejected_with_file_and_line(tmp_path, bad, msg):
    path = _write(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError, match=f"{path}:3: .*{msg}"):
        dataset.load_sft_jsonl(path)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "sort: 1 2", "response": "\xff"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid UTF-8"):
        dataset.load_sft_jsonl(str(path))


def test_jsonl_as_real_data_looks(tmp_path):
    """A UTF-8 byte-order mark, gzip, a leading system message (kept, and in the prompt for generation and training
    alike), content as a list of text parts."""
    import gzip
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "sort: 3 1"}]},
                        {"role": "assistant", "content": "1 3"}]}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write(json.dumps(rec) + "\n")
    for name in ("bom.jsonl", "z.jsonl.gz"):
        [r] = dataset.load_sft_jsonl(str(tmp_path / name))
        assert (r["x"], r["y"], r["system"]) == ("sort: 3 1", "1 3", "Be brief.")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(_toy_tok_dir(tmp_path))
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    px = dataset.prompt_ids(tok, "sort: 3 1", "Be brief.")
    assert "Be brief." in tok.decode(px)
    ids, _, _ = dpo.collate([px], [dataset.response_ids(tok, "sort: 3 1", "1 3", "Be brief.")], 0)
    assert ids[0, :len(px)].tolist() == px  # training reads the same prompt tokens
    (tmp_path / "bad.jsonl").write_text('{"prompt": "abc\n')
    with pytest.raises(ValueError, match="not valid JSON: Invalid control character at column 16$"):  # one "at"
        dataset.load_sft_jsonl(str(tmp_path / "bad.jsonl"))


def test_parquet_and_hub_data_as_downloaded(tmp_path):
    """UltraChat 200k and UltraFeedback binarized as their Parquet files (pyarrow), with the same checks, the errors
    naming file:row; a hub data set name:split without the datasets package says what is missing."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    def turn(role, text):
        return {"content": text, "role": role}
    chat = [{"prompt": f"sort: {i} 1", "prompt_id": str(i), "messages": [turn("user", f"sort: {i} 1"),
             turn("assistant", f"1 {i}"), turn("user", "why?"), turn("assistant", "ascending")]} for i in (3, 5)]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "train_sft.parquet")
    recs = dataset.load_sft_jsonl(str(tmp_path / "train_sft.parquet"))
    assert [(r["x"], r["y"], r["where"]) for r in recs] == [
        ("sort: 3 1", "1 3", f"{tmp_path}/train_sft.parquet:row 1"),
        ("sort: 5 1", "1 5", f"{tmp_path}/train_sft.parquet:row 2")]
    chat[1]["messages"][1]["content"] = " "
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=f"{tmp_path}/bad.parquet:row 2: response .* is empty"):
        dataset.load_sft_jsonl(str(tmp_path / "bad.parquet"))
    prefs = [{"prompt": "sort: 3 1", "prompt_id": "3", "chosen": [turn("user", "sort: 3 1"), turn("assistant", "1 3")],
              "rejected": [turn("user", "sort: 3 1"), turn("assistant", "3 1")], "score_chosen": 9.0,
              "score_rejected": 2.0}]
    pq.write_table(pa.Table.from_pylist(prefs), tmp_path / "train_prefs.parquet")
    [p] = dataset.load_pref_jsonl(str(tmp_path / "train_prefs.parquet"))
    assert (p["x"], p["chosen"], p["rejected"]) == ("sort: 3 1", "1 3", "3 1")
    import importlib.util
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match="--data HuggingFaceH4/ultrachat_200k:train_sft: a hub data set .* needs "
                                             "the datasets package"):
            dataset.load_sft_jsonl("HuggingFaceH4/ultrachat_200k:train_sft")


def test_a_mistyped_local_path_with_a_colon_is_no_such_file():
    """data/sort_trian.jsonl:train reads like a hub data set name:split, but its name is a local file's: the error
    says that no such file exists (not that the datasets package is needed)."""
    with pytest.raises(cli.UserError, match="^data/sort_trian.jsonl:train: no such --data file \\(data/sort_trian"
                                            ".jsonl does not exist either; a hub data set is given as name:split"):
        dataset.load_sft_jsonl("data/sort_trian.jsonl:train")
    for name in ("data/x", "./x", "runs/a/b", "x.json", "x.jsonl.gz", "x.parquet"):
        assert dataset._looks_local(name), name
    for name in ("HuggingFaceH4/ultrachat_200k", "trl-lib/ultrafeedback_binarized", "imdb"):
        assert not dataset._looks_local(name), name


def test_toy_template_renders_a_system_turn(tmp_path):
    """A system message is a turn of its own (<|system|>), not an assistant turn: a special token of the toy
    tokenizer when D has a system message, after the other special tokens (whose ids stay the same)."""
    plain = _toy_tok()
    recs = dataset.load_sft_jsonl(os.path.join(HERE, "data", "sort_train.jsonl"), 300)
    tok = dataset.train_toy_tokenizer([t for r in recs for t in (r["x"], r["y"])] + ["Be brief."], system=True)
    assert dataset.prompt_text(tok, "sort: 3 1", "Be brief.") == \
        "<|bos|><|system|>Be brief.<|end|><|user|>sort: 3 1<|end|><|assistant|>"
    sys_id = tok.convert_tokens_to_ids("<|system|>")
    assert dataset.prompt_ids(tok, "sort: 3 1", "Be brief.")[:2] == [tok.bos_token_id, sys_id]
    assert sys_id == 5 and tok.decode([sys_id], skip_special_tokens=True) == ""
    assert [tok.convert_tokens_to_ids(t) for t in ("<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>")] \
        == [plain.convert_tokens_to_ids(t) for t in ("<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>")]
    assert "<|system|>" not in plain.get_vocab()  # the shipped data has no system message: its tokenizer as before
    # dataset.load trains the toy tokenizer with <|system|> when a record of D has a system message
    path = tmp_path / "d.jsonl"
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sort: 3 1"},
                        {"role": "assistant", "content": "1 3"}]}
    path.write_text(json.dumps(rec) + "\n" + GOOD + "\n")
    run = rundir.RunDir(dict(ldalign.DEFAULTS, out=str(tmp_path / "run")), stages.METHODS)
    cfg = dict(run.cfg, data=str(path), eval_data="", max_examples=0)
    data = dataset.load(cfg, run)
    sys_id = data.tok.convert_tokens_to_ids("<|system|>")
    assert data.D[0]["prompt_ids"][:2] == [data.tok.bos_token_id, sys_id] and sys_id not in data.D[1]["prompt_ids"]


def test_toy_tokenizer_trains_fast_on_a_long_run_of_one_character():
    """A record that is one run of 100,000 identical emoji (400 KB) is one pre-tokenized word, and the BPE trainer's
    time grows with the square of a word's length (minutes for this one): the toy tokenizer learns from
    pieces of at most dataset.TOY_BPE_PIECE characters, and still tokenizes the record whole."""
    import time
    long = "\U0001F600" * 100_000
    start = time.time()
    tok = dataset.train_toy_tokenizer(["sort: 3 1", "1 3", long])
    assert time.time() - start < 20
    assert tok.decode(tok(long, add_special_tokens=False)["input_ids"]) == long


def test_jsonl_reads_first_turn_and_prompt_response_form(tmp_path):
    multi = json.dumps({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]})
    path = _write(tmp_path, [multi, json.dumps({"prompt": "p", "response": "r"})])
    recs = dataset.load_sft_jsonl(path)
    assert [(r["x"], r["y"], r["where"]) for r in recs] == [("q1", "a1", f"{path}:1"), ("p", "r", f"{path}:2")]


def test_pref_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    p.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": [{"role": "user", "content": "q"}],
                                          "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=f"{p}:2: 'chosen' has no assistant message"):
        dataset.load_pref_jsonl(str(p))
    p.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=f"{p}:2: a preference record needs .*; missing 'rejected'$"):
        dataset.load_pref_jsonl(str(p))
    p.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=f"{p}:2: 'chosen' \\(a string, or a list of messages .*\\) must be a string"):
        dataset.load_pref_jsonl(str(p))
    recs = dataset.load_pref_jsonl(os.path.join(HERE, "data", "sort_pairs.jsonl"))
    assert len(recs) == 2000 and all(r["chosen"] != r["rejected"] for r in recs)
    # over-length pairs: an error naming file:line, or (skip) listed like the SFT records
    long = " ".join(str(i) for i in range(40))
    p.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": long}) + "\n")
    cfg = dict(max_prompt_len=32, max_len=64, overlength="error", pref_data=str(p))
    with pytest.raises(ValueError, match=f"{p}:2: prompt \\+ response have .* > max_len=64"):
        dataset.tokenize_pref(dataset.load_pref_jsonl(str(p)), _toy_tok(), cfg, [])
    skipped = []
    kept = dataset.tokenize_pref(dataset.load_pref_jsonl(str(p)), _toy_tok(), dict(cfg, overlength="skip"), skipped)
    assert len(kept) == 1 and skipped[0]["where"] == f"{p}:2"


def test_overlength_rejected_with_file_and_line_or_skipped(tmp_path):
    tok = _toy_tok()
    long_y = " ".join(str(i) for i in range(40))
    path = _write(tmp_path, [GOOD, json.dumps({"prompt": "sort: 1 2", "response": long_y})])
    cfg = dict(max_prompt_len=32, max_len=64, max_new_tokens=16, guide_max_len=128, overlength="error", data=path)
    with pytest.raises(ValueError, match=f"{path}:2: prompt \\+ response have .* > max_len=64"):
        dataset.tokenize_data(dataset.load_sft_jsonl(path), tok, tok, cfg, print)
    kept, skipped = dataset.tokenize_data(dataset.load_sft_jsonl(path), tok, tok, dict(cfg, overlength="skip"), print)
    assert len(kept) == 1 and skipped[0]["where"] == f"{path}:2"


def test_one_prompt_format_for_generation_and_training():
    tok = _toy_tok()
    px = dataset.prompt_ids(tok, "sort: 3 1 2")
    assert px[0] == tok.bos_token_id and px.count(tok.bos_token_id) == 1
    assert tok.decode(px) == "<|bos|><|user|>sort: 3 1 2<|end|><|assistant|>"
    # the DPO batch is built from exactly these ids
    ids, _, labels = dpo.collate([px], [dataset.response_ids(tok, "sort: 3 1 2", "1 2 3")], 0)
    assert ids[0, :len(px)].tolist() == px and (labels[0, :len(px)] == dpo.IGNORE).all()
    assert ids[0, -1].item() == tok.eos_token_id


def test_golden_response_tokens_are_those_that_follow_the_prompt():
    """A SentencePiece-style tokenizer (Metaspace, word-start piece only at the start of a text, as Llama /
    Mistral): y alone starts with "_Hello", y after the prompt with "Hello", which is what the policy samples.
    response_ids must give the latter, or golden y and sampled y' differ in their first token, always."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>"]
    tk.train_from_iterator(["Hello world, hello there"] * 10, trainers.BpeTrainer(
        vocab_size=60, special_tokens=specials, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
                                  unk_token="<unk>")
    tok.chat_template = dataset.TOY_TEMPLATE
    x, y = "Hello there", "Hello world"
    py = dataset.response_ids(tok, x, y)
    joint = tok(dataset.prompt_text(tok, x) + y, add_special_tokens=False)["input_ids"]
    assert joint[-len(py) + 1:] == py[:-1] and py[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(py[0]) == "Hello"
    alone = tok(y, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone[0]) == "\u2581Hello"  # the check above is not vacuous
    assert dataset.prompt_ids(tok, x) == joint[:-len(py) + 1]  # prompt + response = the one joint text (the template
    # writes the BOS)


def test_shipped_data_is_reproducible_and_disjoint(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_sort", os.path.join(HERE, "data", "make_sort.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import random
    rng, seen = random.Random(0), set()
    ev, tr = mod.make_records(200, rng, seen), mod.make_records(8000, rng, seen)
    assert ev == [json.loads(line) for line in open(os.path.join(HERE, "data", "sort_eval.jsonl"))]
    assert tr == [json.loads(line) for line in open(os.path.join(HERE, "data", "sort_train.jsonl"))]
    assert not {r["prompt"] for r in ev} & {r["prompt"] for r in tr}


# ====================================================================================================
# Run folder and resume (rundir.py, ldalign.py): settings, interrupted runs, stops, command line, no pickle
# ====================================================================================================
def test_a_resume_with_other_settings_or_data_stops(tmp_path):
    cfg = dict(ldalign.DEFAULTS, out=str(tmp_path))
    p = str(tmp_path / "settings.json")
    def run(**kw):
        return rundir.RunDir(dict(cfg, **kw), stages.METHODS)
    run().check_settings(["ldalign"])
    run(seed=1, lr=2e-7).check_settings(["ldalign"])  # nothing stored yet: nothing bound
    run().bind("ldalign/iter1/policy")  # a stage of ldalign stored: the shared and ldalign's settings are bound
    run(T=5, micro_batch_size=4, gen_batch_size=7).check_settings(["ldalign"])  # free to change
    with pytest.raises(SystemExit, match="ldalign: --lr 1e-05 -> 2e-07"):
        run(lr=2e-7).check_settings(["ldalign"])
    with pytest.raises(SystemExit, match="shared: --seed 0 -> 1"):
        run(seed=1).check_settings(["dpo"])
    run(lr=2e-7).check_settings(["dpo"])  # a new method may use its own lr ...
    run(lr=2e-7).bind("dpo/iter1/policy")
    with pytest.raises(SystemExit, match="dpo: --lr 2e-07 -> 1e-05"):
        run().check_settings(["dpo"])  # ... and keeps it
    stored = json.load(open(p))
    assert stored["ldalign"]["lr"] == 1e-5 and stored["dpo"]["lr"] == 2e-7  # what is stored is left alone
    # stored samples of other prompts (the data file edited in place) are not silently reused or overwritten
    path = str(tmp_path / "samples.jsonl")
    rundir.write_jsonl(path, [{"x": "a", "y_prime_ids": [1]}])
    assert stages.read_samples(path, [dict(x="a")], cfg["data"]) == [[1]]
    with pytest.raises(SystemExit, match="other prompts"):
        stages.read_samples(path, [dict(x="b")], cfg["data"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "iter0/samples.jsonl/batch1", "guide", "ldalign/iter1/train",
                                   "ldalign/iter2/train", "ldalign/iter2/policy", "SIGTERM ldalign/iter2/step1"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, stage, uninterrupted):
    """Killed at a stage (LDALIGN_KILL_AT), or sent SIGTERM there (LDALIGN_TERM_AT), then rerun: the weights of the
    uninterrupted run, bit for bit. With --save_steps 2 (the uninterrupted run saved none: step checkpoints change
    nothing), an update killed half-way (after step 2 of 4) goes on from its step checkpoint, and reads back the
    reference log-probs of theta_{t-1} (not scored again);
    sampling killed after the first of its 2 batches samples only the second; SIGTERM after step 1 stops the run at
    step 2 (saved) with status 143. Nothing of the .partial folders is left."""
    out = str(tmp_path / "run")
    args = ["--out", out] + TINY_RUN + ["--save_steps", "2"]
    term, stage = stage.startswith("SIGTERM "), stage.removeprefix("SIGTERM ")
    p = _cli(args, env_extra={"LDALIGN_TERM_AT" if term else "LDALIGN_KILL_AT": stage})
    if term:
        assert p.returncode == checkpoint.STOPPED, p.stderr[-2000:]
        assert ("stopped by SIGTERM at step 2/4 of ldalign iteration 2; step checkpoint saved: rerun the same command "
                "to resume") in p.stdout
    else:
        assert p.returncode == 137 and f"LDALIGN_KILL_AT={stage}" in p.stdout
    assert not any(f.endswith(".tmp") for f in os.listdir(out))  # no half-written result left to trust
    log = _run(args)
    if stage.endswith(("/train", "/step1")):
        t = stage.split("/")[1][len("iter"):]
        assert f"[resume] ldalign iteration {t}: from the step checkpoint of step 2/4" in log
        assert "reference log-probs under theta_{t-1}: read back" in log
    if stage.endswith("/batch1"):
        assert "[resume] sampling y' ~ p_theta_0: 1 of 2 batches read back" in log
    assert not [f for f in _all_files(out) if ".partial" in f]
    resumed = _check_run_folder(out).state_dict()  # every iteration's metrics row too
    for k, v in uninterrupted.items():
        assert torch.equal(v, resumed[k]), k
    assert os.path.exists(os.path.join(out, "ldalign", "iter2", "eval.json"))


@pytest.mark.slow
def test_stale_stages_are_recomputed_and_corrupt_files_named(tmp_path):
    """A stored stage records the digests of what it was computed from (stages.json): iteration 1 redone with
    another lr makes iteration 2's samples and distances stale, and they are computed again. Checkpoints carry a
    sha256 manifest: a same-size corrupted model.safetensors stops the run naming it; so does a truncated file."""
    out = str(tmp_path / "run")
    args = ["--out", out] + TINY_RUN
    _run(args)
    s2 = json.load(open(os.path.join(out, "ldalign", "iter2", "distances.json")))["S"]
    shutil.rmtree(os.path.join(out, "ldalign", "iter1", "policy"))  # redo iteration 1 ...
    os.remove(os.path.join(out, "settings.json"))  # ... at another lr
    log = _run(args + ["--lr", "3e-4"])
    assert "[stale] ldalign/iter2/samples.jsonl was computed from another ldalign/iter1/policy" in log
    assert "[stale] ldalign/iter2/distances.jsonl" in log and "training the guide" not in log
    assert json.load(open(os.path.join(out, "ldalign", "iter2", "distances.json")))["S"] != s2
    ckpt = os.path.join(out, "ldalign", "iter2", "policy", "model.safetensors")
    data = bytearray(open(ckpt, "rb").read())
    data[-100:] = bytes(100)  # same size, other weights
    open(ckpt, "wb").write(bytes(data))
    p = _cli(args + ["--lr", "3e-4", "--T", "3"])
    assert p.returncode == 2 and f"error: {ckpt}: missing, truncated or corrupt" in p.stderr, p.stderr[-2000:]
    samples = os.path.join(out, "iter0", "samples.jsonl")
    text = open(samples).read()
    open(samples, "w").write(text[:len(text) // 2])  # cut mid-line
    p = _cli(args + ["--lr", "3e-4"])
    assert p.returncode == 2 and f"error: {samples}: corrupt or truncated" in p.stderr, p.stderr[-2000:]


def test_a_kill_while_a_stale_stage_is_rewritten_never_leaves_the_old_result_recorded_fresh(tmp_path):
    """stages.json never says a result was computed from inputs it was not computed from: a stage recomputed
    because its input changed, killed while its new result is written, is computed again by the rerun (the old
    result is not read back as the new one)."""
    run = rundir.RunDir(dict(ldalign.DEFAULTS, out=str(tmp_path / "run")), stages.METHODS)
    src = tmp_path / "input.txt"
    src.write_text("old")
    assert run.cached("r.json", lambda: {"from": "old"}, inputs=[str(src)]) == {"from": "old"}
    src.write_text("new")

    def killed(value, path):
        # a kill while the new result is written: nothing of it reaches path
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run.cached("r.json", lambda: {"from": "new"}, save=killed, inputs=[str(src)])
    assert run.cached("r.json", lambda: {"from": "new"}, inputs=[str(src)]) == {"from": "new"}
    # a kill while computing leaves the old result with its own record: stale, computed again
    src.write_text("newer")
    with pytest.raises(KeyboardInterrupt):
        run.cached("r.json", lambda: (_ for _ in ()).throw(KeyboardInterrupt), inputs=[str(src)])
    assert run.cached("r.json", lambda: {"from": "newer"}, inputs=[str(src)]) == {"from": "newer"}


def _minimal_data(tmp_path):
    """The first 64 records of the toy data (tokenizing all 8,000 is most of a minimal run's time)."""
    path = tmp_path / "train.jsonl"
    with open(os.path.join(HERE, "data", "sort_train.jsonl")) as f:
        path.write_text("".join(f.readlines()[:64]))
    return str(path)


@pytest.mark.slow
def test_theta_t_trained_from_another_theta_0_is_trained_again(tmp_path):
    """theta_t records what it was trained from (theta_{t-1}, the pairs' files): replace the weights of the
    --policy folder (theta_0) between two calls on one --out, and theta_1 is trained again from the new one."""
    from safetensors.torch import load_file, save_file
    data = _minimal_data(tmp_path)
    toy = str(tmp_path / "toy")
    _run(["--out", toy, "--data", data] + MINIMAL_RUN + ["--T", "1"])
    # theta_0 as a user's folder (no manifest: it is not one of the run's own checkpoints)
    policy = tmp_path / "theta0"
    shutil.copytree(os.path.join(toy, "sft"), policy)
    os.remove(policy / "manifest.json")
    out = str(tmp_path / "run")
    args = ["--out", out, "--data", data, "--policy", str(policy)] + MINIMAL_RUN + ["--T", "1"]
    _run(args)
    theta_1 = os.path.join(out, "ldalign", "iter1", "policy", "model.safetensors")
    before = open(theta_1, "rb").read()
    weights = load_file(policy / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, policy / "model.safetensors", metadata={"format": "pt"})
    log = _run(args)
    assert "[stale] iter0/samples.jsonl" in log
    assert "[stale] ldalign/iter1/policy was computed from another" in log
    assert open(theta_1, "rb").read() != before
    # and a third call with nothing changed keeps everything
    log = _run(args)
    assert "[stale]" not in log and "===== ldalign iteration" not in log


@pytest.mark.slow
def test_an_update_stopped_at_a_nan_binds_none_of_its_settings(tmp_path):
    """--beta 1e30 stops at a non-finite loss with the hint "Lower --lr or --beta"; doing that on the same --out
    works: an iteration that produced nothing binds none of the update's settings."""
    data = _minimal_data(tmp_path)
    args = ["--out", str(tmp_path / "run"), "--data", data] + MINIMAL_RUN + ["--T", "1"]
    p = _cli(args + ["--beta", "1e30"])
    assert p.returncode != 0 and "Lower --lr or --beta" in p.stderr, p.stderr[-2000:]
    _run(args + ["--beta", "0.1"])


@pytest.mark.slow
def test_nan_loss_stops_run_and_keeps_last_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    args = ["--out", out] + TINY_RUN
    args[args.index("--T") + 1] = "1"
    _run(args)
    ckpt = os.path.join(out, "ldalign", "iter1", "policy", "model.safetensors")
    before = open(ckpt, "rb").read()
    args[args.index("--T") + 1] = "2"
    os.remove(os.path.join(out, "settings.json"))  # allow the changed --lr on this folder
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --lr nan is refused before any compute (parse_args); a finite but absurd lr blows the weights up in one step
    p = subprocess.run([sys.executable, os.path.join(HERE, "ldalign.py")] + args + ["--lr", "1e30"], cwd=HERE, env=env,
                       timeout=600, capture_output=True, text=True)
    assert p.returncode != 0 and "at step 2/4 (gradient norm nan)" in p.stderr
    assert "last finished checkpoint" in p.stderr
    assert open(ckpt, "rb").read() == before  # theta_1 intact
    assert not os.path.exists(os.path.join(out, "ldalign", "iter2", "policy"))  # no theta_2 from a NaN update


def test_bad_data_fails_before_compute(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + '{"messages": "oops"}\n')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "ldalign.py"), "--out", str(tmp_path / "r"),
                        "--data", str(path)],
                       cwd=HERE, env=env, timeout=120, capture_output=True, text=True)
    assert p.returncode != 0 and f"{path}:2: 'messages' must be a list" in p.stderr
    assert not os.path.exists(tmp_path / "r" / "sft")  # nothing was trained


def test_parse_args_rejects_bad_settings():
    assert ldalign.parse_args([])["top_p"] == 1.0
    for bad in (["--temperature", "-1"], ["--top_p", "0"], ["--top_p", "1.5"], ["--top_k", "-1"], ["--method", "ppo"],
                ["--gen_compile", "true"], ["--max_new_tokens", "64"], ["--overlength", "eror"]):
        with pytest.raises(SystemExit):
            ldalign.parse_args(bad)
    # every numeric setting is range-checked before any compute; each of these once ran and reported success,
    # trained the reversed objective, or failed hours later
    for bad, msg in ((["--beta", "0"], "--beta must be a finite number > 0"), (["--beta", "-1"], "--beta must be"),
                     (["--epochs", "0"], "--epochs must be > 0"), (["--T", "-1"], "--T must be > 0"),
                     (["--batch_size", "0"], "--batch_size must be > 0"), (["--lr", "nan"], "--lr must be a finite"),
                     (["--lr", "inf"], "--lr must be a finite"), (["--guide_lr", "-1e-3"], "--guide_lr must be"),
                     (["--warmup_ratio", "1"], "--warmup_ratio must be in"), (["--optimizer", "sgd"], "--optimizer is"),
                     (["--max_examples", "-5"], "--max_examples must be >= 0")):
        with pytest.raises(SystemExit, match=msg):
            ldalign.parse_args(bad)


@pytest.mark.slow
def test_user_errors_are_one_line_exit_2_and_logged(tmp_path):
    """A mistake the user can fix: one line naming the option or file:line, exit status 2, no traceback, also in
    log.txt once the run folder is known; nothing is computed and no settings are bound."""
    afile, adir, arr = tmp_path / "afile", tmp_path / "adir", tmp_path / "arr.jsonl"
    afile.write_text("x")
    adir.mkdir()
    arr.write_text(json.dumps([json.loads(GOOD)], indent=1))
    out = str(tmp_path / "r")
    cases = [(["--out", str(afile)], f"--out {afile} is a file"),
             (["--policy", "/nonexistent"], "--policy /nonexistent: no such folder (read as a local path"),
             (["--guide", str(adir)], f"--guide {adir}: a folder without config.json"),
             (["--data", str(adir)], f"{adir}: --data is a directory; expected a JSONL file"),
             (["--eval_data", str(arr)], f"{arr}:1: not valid JSON: Expecting value at column 1; the file "
                                         "starts like a JSON array. JSONL is expected"),
             (["--beta", "0"], "--beta must be a finite number > 0")]
    # the runs are independent (each its own --out), so they run side by side; each is checked on its own
    procs = [_cli_start(["--out", str(tmp_path / f"r{k}")] + args + ["--sft_steps", "1"])
             for k, (args, _) in enumerate(cases)]
    for (args, msg), proc in zip(cases, procs):
        p = _cli_wait(proc)
        assert p.returncode == 2 and p.stderr.strip() == f"error: {p.stderr.strip()[7:]}", (args, p.stderr[-2000:])
        assert msg in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # a hub id that is not cached, offline: at once, naming the option (not the hub client's retries)
    p = _cli(["--out", out, "--reward_model", "someorg/some-rm"], {"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2
    assert "--reward_model someorg/some-rm: not a local folder, and not in the Hugging Face cache" in p.stderr
    assert "error: --reward_model someorg/some-rm" in open(os.path.join(out, "log.txt")).read()
    assert not os.path.exists(os.path.join(out, "settings.json")) and not os.path.exists(os.path.join(out, "sft"))


@pytest.mark.slow
def test_train_sh_reports_a_user_error_once_under_torchrun(tmp_path):
    """Under torchrun every rank meets the same mistake: the user sees it once, as the last line, exit status 2."""
    p = _train_sh(["tiny", "--beta", "0", "--out", str(tmp_path / "r")], {"NPROC": "2"})
    assert p.returncode == 2 and p.stderr.count("error: ") == 1, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == "error: --beta must be a finite number > 0, got 0.0"


@pytest.mark.slow
def test_run_folder_lock(tmp_path):
    """One run per folder: a live holder stops a second run at once, naming it; a dead holder's lock is taken over."""
    out = tmp_path / "r"
    out.mkdir()
    import socket
    (out / "lock.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then"}))
    p = _cli(["--out", str(out), "--beta", "0.1"])
    assert p.returncode == 2
    assert f"is in use by another run (pid {os.getpid()} on {socket.gethostname()}, started then)" in p.stderr
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "lock.json").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    p = _cli(["--out", str(out), "--policy", "/nonexistent"])  # gets past the lock, stops at the next check
    assert p.returncode == 2 and "--policy /nonexistent" in p.stderr and "in use" not in p.stderr
    assert not (out / "lock.json").exists()  # released when the process exits


def _user_error(argv, capsys):
    """ldalign.py ARGV run in this process as the command line runs it (report_errors): a user error, whose one
    line (exit status 2, no traceback) is returned."""
    with pytest.raises(SystemExit) as e:
        cli.report_errors(ldalign.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err[-3000:]
    return err.strip()


def test_unreadable_or_unwritable_files_are_one_line_user_errors(tmp_path, capsys, monkeypatch):
    """An --data that cannot be read, an --out that cannot be written, a --policy folder missing a weights file, a
    .parquet file that is not Parquet: one line naming the file, exit status 2, in log.txt when the run folder is
    writable. The tests run as root, whom no file mode stops: a read permission is denied here by a stand-in for
    open() (what a user without the permission meets), an I/O error comes from a file that root cannot read either
    (/proc/self/mem: its first page is never mapped), and an unwritable --out is a path under a regular file, or a
    stand-in for os.open that denies the lock file."""
    monkeypatch.setattr(cli, "_LOG", [])  # this test's log.txt files only
    import builtins
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD + "\n")

    def denied_open(path, *args, **kw):
        if os.fspath(path) == str(data):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return builtins.open(path, *args, **kw)

    def check(argv, msg, out, logged=True):
        err = _user_error(["--out", str(out)] + argv, capsys)
        assert msg in err, err
        assert not logged or (out / "log.txt").read_text().splitlines()[-1] == err

    with monkeypatch.context() as m:
        m.setattr(dataset, "open", denied_open, raising=False)
        check(["--data", str(data)], f"error: {data}: cannot read the --data file (Permission denied)", tmp_path / "r1")
    if os.path.isfile("/proc/self/mem"):
        check(["--data", "/proc/self/mem"], "error: /proc/self/mem: cannot read the --data file (Input/output error)",
              tmp_path / "r2")
    # --out: a path under a regular file; a run folder whose lock file cannot be created
    check([], f"error: --out {data}/run: cannot write the run folder (a part of its path is a file, not a folder)",
          tmp_path / "data.jsonl" / "run", logged=False)
    out = tmp_path / "readonly"
    out.mkdir()
    real_open = os.open

    def denied(path, *args, **kw):
        if os.fspath(path).endswith("lock.json"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kw)
    with monkeypatch.context() as m:
        m.setattr(os, "open", denied)
        check([], f"error: --out {out}: cannot write the run folder (Permission denied at {out}/lock.json)", out,
              logged=False)
    assert not os.path.exists(out / "log.txt")
    # --policy: an HF folder whose index names a shard that is missing; one without any weights file
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text("{}")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (policy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    (policy / shards[0]).write_bytes(b"")
    check(["--policy", str(policy)], f"error: --policy {policy}: the weights file {policy}/{shards[1]} named in "
                                     f"{policy}/model.safetensors.index.json is missing", tmp_path / "r3")
    os.remove(policy / "model.safetensors.index.json")
    check(["--policy", str(policy)], f"error: --policy {policy}: no weights file in the folder", tmp_path / "r4")
    # a .parquet file that is not Parquet
    pytest.importorskip("pyarrow")
    fake = tmp_path / "train.parquet"
    fake.write_text(GOOD + "\n")
    check(["--data", str(fake)], f"error: {fake}: not a Parquet file (", tmp_path / "r5")


def test_dpo_baseline_missing_reference_is_a_one_line_user_error(tmp_path, capsys, monkeypatch):
    """The DPO baseline's reference (theta_0's log-probs) can only be computed in iteration 1: later iterations
    without its file stop with one line naming it, exit status 2, also in log.txt."""
    monkeypatch.setattr(cli, "_LOG", [])
    run = rundir.RunDir(dict(ldalign.DEFAULTS, out=str(tmp_path / "run")), stages.METHODS)
    fake = SimpleNamespace(run=run, cfg=run.cfg, device=torch.device("cpu"))

    def main(argv):
        stages.Stages.reference(fake, "dpo", 2, None, [])
    with pytest.raises(SystemExit) as e:
        cli.report_errors(main, [])
    err = capsys.readouterr().err
    ref = run.path(stages.DPO_REFERENCE)
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {ref} is missing"), err
    assert open(run.path("log.txt")).read().endswith(err)


def test_an_empty_or_half_written_lock_is_taken_over(tmp_path):
    """lock.json written by a process that died while writing it (empty, or cut mid-JSON) names no holder: the lock
    is a dead run's, and the next run takes it over."""
    out = tmp_path / "run"
    out.mkdir()
    for text in ("", '{"pid": 12'):
        (out / "lock.json").write_text(text)
        rundir.RunDir(dict(ldalign.DEFAULTS, out=str(out)), stages.METHODS)
        assert json.loads((out / "lock.json").read_text())["pid"] == os.getpid()
        os.remove(out / "lock.json")


def test_a_run_folder_without_its_manifest_is_an_error(tmp_path):
    """A folder the run wrote itself (theta_t, the toy's sft/, guide/, tokenizer/) carries a manifest.json; without
    it its weights cannot be verified, and reading it stops, naming it. theta_0 given with --policy has none and
    loads as it is."""
    run = rundir.RunDir(dict(ldalign.DEFAULTS, out=str(tmp_path / "run")), stages.METHODS)
    model = tiny_llama()
    ckpt = run.path("ldalign", "iter1", "policy")
    with rundir.atomic_path(ckpt) as tmp:
        model.save_pretrained(tmp)
    os.remove(os.path.join(ckpt, "manifest.json"))
    cfg = dict(run.cfg, policy=str(tmp_path / "theta0"))
    with pytest.raises(cli.UserError, match=f"^{ckpt}: its manifest.json is missing"):
        stages.load_policy(ckpt, cfg, torch.device("cpu"))
    shutil.copytree(ckpt, cfg["policy"])
    stages.load_policy(cfg["policy"], cfg, torch.device("cpu"))
    # a stored stage's folder (the guide, the tokenizer, the toy's theta_0) is verified as it is read back

    def save(value, path):
        with rundir.atomic_path(path) as tmp:
            os.makedirs(tmp)
            open(os.path.join(tmp, "weights"), "w").write(value)
    run.cached("guide", lambda: "w", save=save, load=lambda path: None)
    os.remove(run.path("guide", "manifest.json"))
    with pytest.raises(cli.UserError, match=f"^{run.path('guide')}: its manifest.json is missing"):
        run.cached("guide", lambda: "w", save=save, load=lambda path: None)


def test_no_pickle_checkpoints_and_no_remote_code_by_default():
    for name in ("ldalign.py", "stages.py", "dpo.py", "guide.py", "generate.py", "dataset.py", "run/rundir.py",
                 "fsdp.py", "analysis.py", "run/checkpoint.py", "run/lora.py"):
        src = open(os.path.join(HERE, name)).read()
        assert "torch.load(" not in src or "weights_only=True" in src
        assert "trust_remote_code=True" not in src
    assert ldalign.DEFAULTS["trust_remote_code"] is False


# ----------------------------------------------------------------------------------------------------
# Pre-emption: step checkpoints of the update, sampling kept batch by batch, SIGTERM (checkpoint.py)
# ----------------------------------------------------------------------------------------------------
def _update_in_steps(folder, every=2, stop_after=0, term_after=0, optimizer="adamw", lora_r=0):
    """An LD-Align update of a tiny Llama (FSDP2 when world > 1) in 8 optimizer steps, with its step checkpoints in
    `folder` every `every` steps (folder None: none). stop_after: raise KeyboardInterrupt after that step (a kill);
    term_after: SIGTERM to the last rank after that step; lora_r > 0: rank-r adapters trained alone, as
    Stages.update begins them. Returns (full weights, step log)."""
    import signal
    torch.manual_seed(0)
    cpu, model = torch.device("cpu"), tiny_llama(seed=0).train()
    if lora_r:
        lora.add(model, lora.DEFAULT_TARGETS, lora_r)
        lora.begin(model, lora_r, seed=5)
    if fsdp.world() > 1:
        model = fsdp.parallelize(model, cpu)
    g = torch.Generator().manual_seed(1)
    pairs = [([1] + torch.randint(3, 64, (int(n),), generator=g).tolist(),
              torch.randint(3, 64, (int(m),), generator=g).tolist() + [2],
              torch.randint(3, 64, (int(k),), generator=g).tolist() + [2])
             for n, m, k in torch.randint(1, 6, (13, 3), generator=g)]
    ref_c, ref_r = dpo.reference_logps(model, pairs, 2, cpu)

    def on_step(step, steps):
        if step == stop_after:
            raise KeyboardInterrupt
        if step == term_after and fsdp.rank() == fsdp.world() - 1:
            os.kill(os.getpid(), signal.SIGTERM)
    ckpt = checkpoint.StepCheckpoint(folder, every, lambda m: None, "the test update") if folder else None
    # as Stages.update runs it: SIGTERM stops at the next step boundary, its step checkpoint written
    with checkpoint.stop_at_boundaries():
        hist = dpo.dpo_train(model, pairs, ref_c, ref_r, torch.linspace(0.5, 1.5, 13), beta=0.5, lr=1e-2, epochs=2,
                             batch_size=4, micro_batch_size=2, device=cpu, optimizer=optimizer, seed=3,
                             on_step=on_step, checkpointer=ckpt)
    sd = fsdp.full_state_dict(model) if fsdp.is_fsdp(model) else model.state_dict()
    return {k: v.clone() for k, v in sd.items()}, hist


def _resumes_exactly(folder, optimizer, lora_r=0):
    """Killed after step 3 (checkpoint of step 2), then SIGTERM after step 5 (checkpoint of step 6, at once): each
    rerun goes on from the latest checkpoint, and the update ends with the uninterrupted weights and step log, bit
    for bit. Returns what differs (empty: nothing)."""
    want, want_hist = _update_in_steps(None, optimizer=optimizer, lora_r=lora_r)
    with pytest.raises(KeyboardInterrupt):
        _update_in_steps(folder, stop_after=3, optimizer=optimizer, lora_r=lora_r)
    saved = sorted(os.listdir(folder))
    with pytest.raises(SystemExit) as stopped:
        _update_in_steps(folder, term_after=5, optimizer=optimizer, lora_r=lora_r)
    assert stopped.value.code == checkpoint.STOPPED
    saved.append(sorted(os.listdir(folder)))
    got, hist = _update_in_steps(folder, optimizer=optimizer, lora_r=lora_r)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    return differ + ([] if hist == want_hist else ["step log"]) + ([] if saved == ["step2", ["step6"]] else [saved])


def test_an_update_resumes_from_its_step_checkpoint_to_the_same_weights(tmp_path):
    for optimizer in ("adamw", "rmsprop"):
        assert _resumes_exactly(str(tmp_path / optimizer), optimizer) == [], optimizer
    # LoRA (issue 21): the adapters and their optimizer state resume as full fine-tuning does; the step
    # checkpoint holds the adapters alone (the frozen base is theta_{t-1}'s)
    assert _resumes_exactly(str(tmp_path / "lora"), "adamw", lora_r=4) == [], "lora"
    from torch.distributed.checkpoint import FileSystemReader
    held = FileSystemReader(str(tmp_path / "lora" / "step6")).read_metadata().state_dict_metadata
    weights = [k for k in held if k.startswith("model.")]
    assert weights and all(k.endswith((".lora_A", ".lora_B")) for k in weights), weights[:4]
    with pytest.raises(SystemExit, match="--save_steps must be >= 0"):
        ldalign.parse_args(["--save_steps", "-1"])


def _resume_worker(rank, results, folder):
    torch.set_num_threads(1)
    results[rank] = _resumes_exactly(folder, "rmsprop")


@pytest.mark.slow
def test_two_processes_resume_an_update_from_its_step_checkpoint(tmp_path):
    """FSDP2 on 2 processes: every rank writes its shards of the weights and of the RMSprop state; a rerun loads them
    and ends with the weights of an uninterrupted 2-process update exactly. SIGTERM reaches rank 1 only: both ranks
    stop at the same step (stop_requested is all-reduced)."""
    import functools
    results = _run_gloo(functools.partial(_resume_worker, folder=str(tmp_path / "steps")))
    assert results == {0: [], 1: []}


def test_sampling_resumes_at_the_first_unfinished_batch(tmp_path):
    """Stages.sample_in_batches writes each finished batch of sample_dataset to `parts`; killed after its 2nd batch,
    or stopped by SIGTERM after the 3rd, a rerun reads them back, samples only the others, and returns the tokens of
    an uninterrupted run."""
    import signal
    prompts = gen_prompts([3, 9, 5, 1, 7, 4, 8, 2, 6, 6, 3, 9, 5], seed=4)  # 4 batches of 4, the last short
    model, cpu = gen_llama(), torch.device("cpu")
    for static in (False, True):
        cfg, parts = dict(SAMPLE_CFG, gen_static=static), str(tmp_path / f"parts{static}")
        want = generate_module.sample_dataset(model, prompts, SAMPLE_TOK, cfg, 3, cpu)

        def sample(after_batch=None):
            # the stage's kill hook after its n-th batch (run.kill_point("<name>/batch<n>")) calls after_batch(n)
            hook = SimpleNamespace(kill_point=lambda at: after_batch and after_batch(int(at.rsplit("batch", 1)[1])))
            fake = SimpleNamespace(cfg=cfg, data=SimpleNamespace(tok=SAMPLE_TOK), device=cpu, log=lambda m: None,
                                   run=hook)
            return stages.Stages.sample_in_batches(fake, model, prompts, 3, parts, "samples", "y'")

        def kill_after(k):
            def hook(n):
                if n == k:
                    raise KeyboardInterrupt
            return hook
        with pytest.raises(KeyboardInterrupt):
            sample(kill_after(2))
        assert sorted(os.listdir(parts)) == ["batch0.json", "batch4.json"]
        with pytest.raises(SystemExit) as stopped:
            sample(lambda n: n == 1 and os.kill(os.getpid(), signal.SIGTERM))  # the 3rd batch, 1st of this call
        assert stopped.value.code == checkpoint.STOPPED and len(os.listdir(parts)) == 3
        calls = []
        assert sample(calls.append) == want and calls == [1]  # one batch left to sample
        assert sample(calls.append) == want and calls == [1]  # none left


def _all_files(folder):
    return [os.path.join(r, f) for r, ds, fs in os.walk(folder) for f in fs + ds]


# ====================================================================================================
# Analysis (analysis.py): the toy judge, the Section 5.2 analyses, reward-model scoring (Section 5.1.3)
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# the toy judge: word edit distance to the golden answer
# ----------------------------------------------------------------------------------------------------
def test_word_edit_distance_small_cases():
    d = analysis.word_edit_distance
    assert d("1 2 3", "1 2 3") == 0
    assert d("1 2 3", "1  2\t3 ") == 0  # words, not characters: whitespace does not count
    assert d("1 2 3", "1 9 3") == 1  # one substitution
    assert d("1 2 3", "1 3") == 1  # one deletion
    assert d("1 3", "1 2 3") == 1  # one insertion
    assert d("", "") == 0
    assert d("", "a b c") == 3 and d("a b c", "") == 3
    assert d("a b c d", "b a d c") == 3  # no transpositions in plain Levenshtein: 2 swaps cost 3 here
    assert d("12 3", "1 23") == 2  # "12" is one word, not two


def test_toy_judge_orders_answers():
    j = analysis.toy_judge
    golden = "22 53 93"
    assert j("22 53 93", golden) == 0.0
    assert j(" 22 53  93 ", golden) == 0.0  # an exact match up to whitespace
    one_off = j("22 93 93", golden)
    two_off = j("93 22 53", golden)
    assert one_off == -1.0
    assert two_off < one_off < 0.0
    assert j("", golden) == -3.0
    assert isinstance(j("x", golden), float)


# ----------------------------------------------------------------------------------------------------
# Section 5.2 (2): ranking agreement of s_phi with a judge
# ----------------------------------------------------------------------------------------------------
def test_ranking_agreement_hand_made():
    #          pair:   0     1     2            3     4     5
    dist_a = [0.1, 0.9, 0.3, 0.4, 0.5, 0.8]
    dist_b = [0.5, 0.2, 0.3 + 1e-8, 0.7, 0.5, 0.6]
    judge_a = [0.0, -1.0, 0.0, -2.0, -1.0, -4.0]
    judge_b = [-2.0, -3.0, -1.0, -2.0, -1.0, -1.0]
    # 0: distance prefers a (smaller), judge prefers a (higher)          -> agree
    # 1: distance prefers b, judge prefers a                             -> disagree
    # 2: distances tie (|diff| <= 1e-6)                                  -> not decided
    # 3: judge ties                                                      -> not decided
    # 4: both tie                                                        -> not decided
    # 5: distance prefers b, judge prefers b                             -> agree
    r = analysis.ranking_agreement(dist_a, dist_b, judge_a, judge_b)
    assert r["n"] == 6
    assert r["n_decided"] == 3
    assert r["agree"] == 2
    assert r["agreement"] == pytest.approx(2 / 3)
    assert r["judge_ties"] == 2  # pairs 3, 4
    assert r["distance_ties"] == 2  # pairs 2, 4
    json.dumps(r)
    # torch / numpy inputs give the same answer
    r2 = analysis.ranking_agreement(torch.tensor(dist_a), np.array(dist_b), torch.tensor(judge_a), judge_b)
    assert r2 == r


def test_ranking_agreement_edges():
    # judge ties are exact: a tiny difference in judge scores is a preference
    r = analysis.ranking_agreement([0.1], [0.2], [-1.0], [-1.0 + 1e-12])
    assert r["judge_ties"] == 0 and r["n_decided"] == 1 and r["agree"] == 0
    # nothing decided -> agreement None (not a division by zero)
    r = analysis.ranking_agreement([0.1, 0.2], [0.1, 0.3], [0.0, -1.0], [-1.0, -1.0])
    assert r["n_decided"] == 0 and r["agreement"] is None
    r = analysis.ranking_agreement([], [], [], [])
    assert r["n"] == 0 and r["agreement"] is None
    with pytest.raises(ValueError):
        analysis.ranking_agreement([0.1, 0.2], [0.1], [0.0], [0.0])
    # identical samples are a tie for both, even if rounding gave them different scores; NaN is refused
    r = analysis.ranking_agreement([0.1, 0.1], [0.3, 0.1 + 1e-5], [0.0, 0.5], [-1.0, 0.5 + 1e-7], same=[False, True])
    assert r["n_decided"] == 1 and r["agree"] == 1 and r["judge_ties"] == 1 and r["distance_ties"] == 1
    with pytest.raises(ValueError, match="finite"):
        analysis.ranking_agreement([float("nan")], [0.1], [0.0], [1.0])


# ----------------------------------------------------------------------------------------------------
# Section 5.2 (1): the distribution of s_phi (histogram numbers and PNG)
# ----------------------------------------------------------------------------------------------------
def test_table1_avg_is_the_papers_mean_relative_improvement():
    """Table 1's AVG column, from the paper's own rows: SPIN 4.56%, LD-Align 2 6.00% over Zephyr-sft."""
    from tools import harness
    cols = [c for c, _, _, _ in harness.TABLE1]
    rows = {"SFT (theta_0)": [43.7, 82.1, 62.1, 55.7, 30.8, 44.4, 63.5],
            "spin 1": [48.7, 81.7, 65.1, 60.4, 33.6, 45.4, 61.2],
            "ldalign 3": [50.3, 82.5, 66.2, 60.7, 33.2, 45.9, 63.3]}
    md = harness.table({k: dict(zip(cols, [v / 100 for v in vs])) for k, vs in rows.items()}, cols)
    assert "| spin 1 | 48.7 | 81.7 | 65.1 | 60.4 | 33.6 | 45.4 | 61.2 | 4.56% |" in md
    assert md.splitlines()[-1].endswith("| 6.00% |")


# ----------------------------------------------------------------------------------------------------
# Table 1's settings (harness.py) and what a run read (--*_revision, config.json's provenance)
# ----------------------------------------------------------------------------------------------------
def test_harness_tasks_name_columns_of_table_1_or_spell_them_out():
    """--tasks: table1, a few of its columns by name (the small preset's eval), or COLUMN=TASK:FEWSHOT:KEY;..."""
    from tools import harness
    assert harness.parse_tasks("table1") == harness.TABLE1
    assert [c for c, _, _, _ in harness.parse_tasks("TruthfulQA,PIQA,ARC")] == ["TruthfulQA", "PIQA", "ARC"]
    assert harness.parse_tasks("ARC") == [r for r in harness.TABLE1 if r[0] == "ARC"]
    assert harness.parse_tasks("Sort=toy_sort:0:exact_match,none") == [("Sort", "toy_sort", 0, "exact_match,none")]
    for bad in ("TruthfulQA,MMLU", "Sort=toy_sort"):
        with pytest.raises(cli.UserError, match="--tasks"):
            harness.parse_tasks(bad)


def test_harness_records_lm_eval_version_settings_and_passes_template_and_revision(tmp_path, monkeypatch):
    """harness.main with lm-eval's model and simple_evaluate replaced by fakes: plain prompts by default,
    --chat_template true applies the template (few-shot as turns), theta_0 of a hub id is read at the run's
    --policy_revision; table1.md names lm-eval's version and each column's task, shots, metric and prompt, and
    table1.json keeps every metric."""
    pytest.importorskip("lm_eval")
    import lm_eval
    import lm_eval.models.huggingface as hf
    import lm_eval.tasks

    from tools import harness
    seen = []

    class FakeLM:
        def __init__(self, **kw):
            seen.append(("model", kw))

    def fake_evaluate(model, tasks, num_fewshot, **kw):
        seen.append((tasks[0], dict(kw, num_fewshot=num_fewshot)))
        return {"results": {tasks[0]: {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6, "r@1,none": 0.4,
                                       "exact_match,strict-match": 0.3}},
                "samples": {tasks[0]: [{"filtered_resps": [(-1.0, False)]}]}}
    monkeypatch.setattr(hf, "HFLM", FakeLM)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path: None)  # (indexes every task: slow)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    run = tmp_path / "run"
    run.mkdir()
    json.dump({"policy": "org/zephyr", "policy_revision": "v1.0"}, open(run / "config.json", "w"))
    harness.main([str(run)])
    model, *calls = seen
    assert model[1]["pretrained"] == "org/zephyr" and model[1]["revision"] == "v1.0"
    assert [c[0] for c in calls] == [t for _, t, _, _ in harness.TABLE1]
    assert all(not kw["apply_chat_template"] and not kw["fewshot_as_multiturn"] for _, kw in calls)
    assert [kw["num_fewshot"] for _, kw in calls] == [s for _, _, s, _ in harness.TABLE1]
    md = open(run / "table1.md").read()
    assert md.startswith(f"lm-evaluation-harness {lm_eval_version()}, no chat template")
    assert "| HellaSwag | hellaswag | 0 | acc,none | plain (no chat template) |" in md
    assert "| GSM8k | gsm8k_cot | 8 | exact_match,strict-match | plain (no chat template) |" in md
    out = json.load(open(run / "table1.json"))
    assert out["lm_eval"] == lm_eval_version() and out["chat_template"] is False
    assert out["metrics"]["SFT (theta_0)"]["ARC"] == {"acc,none": 0.5, "acc_norm,none": 0.6, "r@1,none": 0.4,
                                                      "exact_match,strict-match": 0.3}
    seen.clear()
    harness.main([str(run), "--chat_template", "true", "--tasks", "A=piqa:0:acc,none;G=gsm8k_cot:8:acc,none"])
    assert [(kw["apply_chat_template"], kw["fewshot_as_multiturn"]) for _, kw in seen[1:]] == [(True, False),
                                                                                             (True, True)]
    assert "| G | gsm8k_cot | 8 | acc,none | chat template, few-shot as turns |" in open(run / "table1.md").read()
    with pytest.raises(cli.UserError, match="--chat_template is true or false"):
        harness.main([str(run), "--chat_template", "yes"])


def lm_eval_version():
    from importlib import metadata
    return metadata.version("lm_eval")


def _fake_hub_cache(root, repo, commits):
    """A Hugging Face cache holding repo's config.json at each {revision: commit} (refs/<revision> -> commit)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    for rev, sha in commits.items():
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / rev).write_text(sha)
        (folder / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / sha / "config.json").write_text("{}")


def test_config_json_records_each_models_revision_and_the_versions(tmp_path, monkeypatch):
    """config.json's provenance: a hub id's commit as the local cache resolves its revision (a revision not in
    the cache offline: "unresolved", and --policy_revision reaches the check of the model source); a local folder's
    digest of config.json and weights (it changes with its config); "tiny"; torch, transformers, lm-eval versions."""
    import importlib.util
    from importlib import metadata

    import transformers
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "hub", "org/zephyr", {"main": "a" * 40, "v1": "b" * 40})
    assert rundir.model_revision("org/zephyr") == "a" * 40
    assert rundir.model_revision("org/zephyr", "v1") == "b" * 40
    assert rundir.model_revision("org/zephyr", "v2").startswith("unresolved (not in the local Hugging Face cache")
    dataset.check_model_source("policy", "org/zephyr", "v1")
    with pytest.raises(cli.UserError, match="--policy org/zephyr: .* at revision v2; HF_HUB_OFFLINE"):
        dataset.check_model_source("policy", "org/zephyr", "v2")
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text('{"a": 1}')
    (rm / "model.safetensors").write_bytes(b"0" * 10)
    first = rundir.model_revision(str(rm))
    assert first.startswith("folder sha256:") and rundir.model_revision(str(rm)) == first
    (rm / "config.json").write_text('{"a": 2}')
    assert rundir.model_revision(str(rm)) != first
    cfg = ldalign.parse_args(["--out", str(tmp_path / "run"), "--reward_model", str(rm)])
    rundir.RunDir(cfg, stages.METHODS)
    prov = json.load(open(tmp_path / "run" / "config.json"))["provenance"]
    assert prov["revisions"] == {"policy": "tiny", "guide": "tiny", "reward_model": rundir.model_revision(str(rm))}
    assert prov["versions"] == {"torch": metadata.version("torch"), "transformers": transformers.__version__,
                                "lm_eval": metadata.version("lm_eval") if importlib.util.find_spec("lm_eval")
                                else None}
    for bad in (["--policy_revision", "v1"], ["--reward_model", str(rm), "--reward_model_revision", "v1"]):
        with pytest.raises(SystemExit, match="_revision is for a hub id"):
            ldalign.parse_args(bad)


def test_revision_reaches_every_from_pretrained_of_its_model(monkeypatch):
    """--policy_revision, --guide_revision and --reward_model_revision are passed to the from_pretrained calls
    of the policy (tokenizer, weights; the config under torchrun), the guide and the reward model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2LMHeadModel

    class Seen(Exception):
        pass

    def fake(cls, name, *args, **kw):
        raise Seen(name, kw.get("revision"))
    for c in (AutoTokenizer, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2LMHeadModel):
        monkeypatch.setattr(c, "from_pretrained", classmethod(fake))
    cfg = dict(ldalign.DEFAULTS, policy="org/policy", policy_revision="p1", guide_revision="g1",
               reward_model_revision="r1", max_examples=4, data=os.path.join(HERE, "data", "sort_train.jsonl"),
               eval_data="")
    loads = [lambda: stages.load_policy("org/policy", cfg, torch.device("cpu")),
             lambda: guide_lib.build_guide("org/guide", 4, revision="g1"),
             lambda: analysis.load_reward_model("org/rm", device="cpu", revision="r1")]
    monkeypatch.setattr(dataset, "check_model_source", lambda *a: None)
    loads.append(lambda: dataset.load(cfg, SimpleNamespace(log=print)))
    got = []
    for load in loads:
        with pytest.raises(Seen) as e:
            load()
        got.append(e.value.args)
    assert got == [("org/policy", "p1"), ("org/guide", "g1"), ("org/rm", "r1"), ("org/policy", "p1")]


def test_seeds_report_means_intervals_and_paired_difference(tmp_path):
    """`bash train.sh seeds`' tables: mean over seeds with the 95% t-interval; each method's change from theta_0 and
    ldalign - spin, paired by seed."""
    em = {"ldalign": [0.60, 0.62, 0.58], "spin": [0.59, 0.60, 0.58]}
    for k in range(3):
        for m, v in em.items():
            os.makedirs(tmp_path / f"seed{k}" / m)
            rundir.write_jsonl(str(tmp_path / f"seed{k}" / m / "metrics.jsonl"),
                               [{"iter": 0, "exact_match": 0.5}, {"iter": 1, "exact_match": v[k]}])
    analysis.seeds_report(str(tmp_path))
    stats = json.load(open(tmp_path / "seeds.json"))["mean_and_halfwidth"]
    mean, half = stats["ldalign iter 1"]
    assert mean == pytest.approx(0.60) and half == pytest.approx(4.303 * 0.02 / math.sqrt(3))  # t(2 df) = 4.303
    assert stats["ldalign iter 0"] == [0.5, 0.0]
    diffs = json.load(open(tmp_path / "seeds.json"))["paired_mean_and_halfwidth"]
    d, dh = diffs["ldalign - spin iter 1"]  # differences 0.01, 0.02, 0.00
    assert d == pytest.approx(0.01) and dh == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    d, dh = diffs["spin - theta_0 iter 1"]  # differences 0.09, 0.10, 0.08 from theta_0's 0.5
    assert d == pytest.approx(0.09) and dh == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    md = open(tmp_path / "seeds.md").read()
    assert "| 1 | 0.600 +- 0.050 | 0.590 +- 0.025 |" in md  # the means, then the paired differences
    assert "| 1 | 0.100 +- 0.050 | 0.090 +- 0.025 | 0.010 +- 0.025 |" in md


@pytest.mark.slow
def test_train_sh_seeds_folder_first_seed_and_settings(tmp_path):
    """`OUT=... FIRST_SEED=3 SEEDS=2 bash train.sh seeds --key value`: seed 3's run goes to OUT/seed3 with the given
    settings; a user error there stops the study at once (no seed 4, no report), shown once as the last line."""
    out = tmp_path / "study"
    p = _train_sh(["seeds", "--beta", "2.0", "--data", "missing.jsonl"],
                  {"OUT": str(out), "FIRST_SEED": "3", "SEEDS": "2"})
    assert p.returncode == 2 and p.stderr.count("error: ") == 1, p.stderr[-3000:]
    assert "missing.jsonl" in p.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(out)) == ["seed3"]
    cfg = json.load(open(out / "seed3" / "config.json"))
    assert (cfg["seed"], cfg["beta"], cfg["method"]) == (3, 2.0, "ldalign,spin,dpo,sft")


def test_distance_histogram_shapes_and_json():
    s = torch.rand(137, generator=torch.Generator().manual_seed(0)) * 3.0
    h = analysis.distance_histogram(s, bins=10)
    assert len(h["edges"]) == 11 and len(h["counts"]) == 10
    assert sum(h["counts"]) == 137 and h["n"] == 137 and h["outside"] == 0
    assert h["mean"] == pytest.approx(float(s.double().mean()))
    assert h["std"] == pytest.approx(float(s.double().std(unbiased=False)))
    q = h["quantiles"]
    assert h["edges"][0] <= q["p10"] <= q["p50"] <= q["p90"] <= h["edges"][-1]
    assert all(type(c) is int for c in h["counts"]) and all(type(e) is float for e in h["edges"])
    assert json.loads(json.dumps(h)) == h  # plain JSON types all the way down
    # a fixed range (same bins for every iteration): values outside it are counted in "outside"
    h2 = analysis.distance_histogram([0.5, 1.5, 2.5, 9.0], bins=3, range_=(0.0, 3.0))
    assert h2["counts"] == [1, 1, 1] and h2["outside"] == 1 and h2["edges"] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        analysis.distance_histogram([])
    with pytest.raises(ValueError):
        analysis.distance_histogram([1.0, float("nan")])


def test_save_histogram_png_without_matplotlib(tmp_path, monkeypatch):
    # None in sys.modules makes `import matplotlib...` raise ImportError, as if it were not installed.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "sub" / "hist.png"
    assert analysis.save_histogram_png({"iter 1": [0.1, 0.2, 0.3]}, str(path)) is False
    assert not path.exists() and not (tmp_path / "sub").exists()


def test_save_histogram_png_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")  # optional dependency: runs only where it is installed
    path = tmp_path / "hist.png"
    ok = analysis.save_histogram_png({"iter 1": [0.5, 0.7, 0.9, 1.2], "iter 2": torch.tensor([0.2, 0.3, 0.4])},
                                     str(path))
    assert ok is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["hist.png"]  # the temp file was renamed, not left behind


# ----------------------------------------------------------------------------------------------------
# Watching a run: train_curves.png and TensorBoard (--tensorboard)
# ----------------------------------------------------------------------------------------------------
def test_save_curves_png_with_and_without_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    history = [{"step": k, "steps": 3, "loss": 0.7 - 0.1 * k, "lr": 1e-3, "grad_norm": 1.0 + k, "reward_chosen": 0.1,
                "reward_rejected": -0.1, "reward_acc": 0.5, "reward_margin": 0.2} for k in (1, 2, 3)]
    sft = [{k: h[k] for k in ("step", "steps", "loss", "lr", "grad_norm")} for h in history]  # no rewards: 3 panels
    for name, rows in (("dpo.png", history), ("sft.png", sft)):
        assert analysis.save_curves_png(rows, str(tmp_path / name), title="ldalign, iteration 1") is True
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["dpo.png", "sft.png"]  # no temp file left behind
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert analysis.save_curves_png(history, str(tmp_path / "none.png")) is False
    assert not (tmp_path / "none.png").exists()


def test_tensorboard_without_the_package_is_a_one_line_error_before_compute(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.report_errors(ldalign.main, ["--out", str(out), "--tensorboard", "true"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err == "error: --tensorboard true needs the tensorboard package: pip install tensorboard\n"
    assert not out.exists()  # before anything ran
    assert ldalign.parse_args(["--out", str(out)])["tensorboard"] is False  # the default needs no package


@pytest.mark.slow
def test_watching_a_run_tensorboard_scalars_and_train_curves(tmp_path):
    """--tensorboard true: out/tensorboard/ldalign/steps holds train/<key> for every optimizer step, numbered across
    iterations, as train_metrics.jsonl has it; out/tensorboard/ldalign/iterations holds iteration/<key> per
    iteration (theta_0 as 0), as metrics.jsonl has it; beside each train_metrics.jsonl a train_curves.png. A resumed
    run writes the killed iteration's steps and metrics.jsonl's rows again: TensorBoard shows each once."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, T = str(tmp_path / "run"), 2
    # 8 pairs in batches of 4: 2 optimizer steps per iteration
    args = ["--out", out, "--data", _minimal_data(tmp_path)] + MINIMAL_RUN + [
        "--max_examples", "8", "--batch_size", "4", "--micro_batch_size", "4", "--tensorboard", "true",
        "--log_every", "100"]
    # killed half-way through iteration 2's update (after its step 1, global step 3), then resumed
    p = _cli(args, env_extra={"LDALIGN_KILL_AT": "ldalign/iter2/train"})
    assert p.returncode == 137, p.stdout[-2000:] + p.stderr[-2000:]
    log = _run(args)
    assert "step 1/2 loss" in log and "step 2/2 loss" in log  # the log: the first step and the last, as before

    def scalars(run):
        board = EventAccumulator(os.path.join(out, "tensorboard", "ldalign", run))
        board.Reload()
        return {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}
    assert len(os.listdir(os.path.join(out, "tensorboard", "ldalign", "steps"))) == 2  # the killed run's, the resumed's
    steps = [r for t in range(1, T + 1) for r in _read_jsonl(os.path.join(out, f"ldalign/iter{t}/train_metrics.jsonl"))]
    assert len(steps) == 2 * T
    train = scalars("steps")
    keys = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_acc", "lr", "grad_norm")
    assert sorted(train) == sorted(f"train/{k}" for k in keys)
    for k in keys:
        assert train[f"train/{k}"] == [(n + 1, pytest.approx(r[k], rel=1e-6, abs=1e-7)) for n, r in enumerate(steps)], k
    rows = _read_jsonl(os.path.join(out, "ldalign", "metrics.jsonl"))
    it = scalars("iterations")
    assert sorted(it) == ["iteration/S", "iteration/exact_match", "iteration/loss"]  # no --reward_model: no reward
    assert it["iteration/exact_match"] == [(r["iter"], pytest.approx(r["exact_match"])) for r in rows]
    assert it["iteration/S"] == [(r["iter"], pytest.approx(r["S"], rel=1e-6)) for r in rows[1:]]  # none at 0
    assert it["iteration/loss"] == [(r["iter"], pytest.approx(r["loss"], rel=1e-6)) for r in rows[1:]]
    for t in range(1, T + 1):
        png = os.path.join(out, "ldalign", f"iter{t}", "train_curves.png")
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# Section 5.1.3: reward models
# ----------------------------------------------------------------------------------------------------
def _check_scores(model, tok):
    s = analysis.reward_scores(model, tok, RM_PROMPTS, RM_RESPONSES, batch_size=16, device="cpu")
    assert s.shape == (len(RM_PROMPTS),) and s.dtype == torch.float32
    assert torch.isfinite(s).all()
    assert float(s.max() - s.min()) > 1e-3  # different pairs, different rewards: the comparison below means something
    for i in (0, 2):
        assert float(s[i]) == pytest.approx(_by_hand(model, tok, RM_PROMPTS[i], RM_RESPONSES[i]), abs=1e-4)
    # Batched (padded, mixed lengths) vs one at a time (no padding): padding must not change a score.
    s1 = analysis.reward_scores(model, tok, RM_PROMPTS, RM_RESPONSES, batch_size=1, device="cpu")
    torch.testing.assert_close(s, s1, atol=1e-4, rtol=0)
    return s


@pytest.mark.parametrize("arch", ["deberta-v2", "gpt2"])
def test_reward_model_roundtrip(tmp_path, arch):
    if arch == "deberta-v2":
        tok = _deberta_tokenizer()
        model = _tiny_deberta(tok)
    else:
        tok = _gpt2_tokenizer(with_pad=True)
        model = _tiny_gpt2(tok, pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path))

    rm, rtok = analysis.load_reward_model(str(tmp_path), device="cpu")
    assert not rm.training  # eval mode: no dropout in the scores
    assert type(rm).__name__ == type(model).__name__
    s = _check_scores(rm, rtok)
    # the loaded checkpoint scores like the model that was saved
    s0 = analysis.reward_scores(model.eval(), tok, RM_PROMPTS, RM_RESPONSES, device="cpu")
    torch.testing.assert_close(s, s0, atol=1e-5, rtol=0)
    assert analysis.reward_scores(rm, rtok, [], [], device="cpu").shape == (0,)
    with pytest.raises(ValueError):
        analysis.reward_scores(rm, rtok, RM_PROMPTS, RM_RESPONSES[:2], device="cpu")


def test_reward_model_without_pad_token():
    # GPT-2's own tokenizer has no pad token and its config no pad id: reward_scores borrows eos for the
    # duration, and leaves both the tokenizer and the model's config as they were.
    tok = _gpt2_tokenizer(with_pad=False)
    assert tok.pad_token is None
    model = _tiny_gpt2(tok, pad_token_id=None).eval()
    _check_scores(model, tok)
    assert tok.pad_token is None and model.config.pad_token_id is None


def test_reward_scores_truncates_to_max_length():
    tok = _deberta_tokenizer()
    model = _tiny_deberta(tok).eval()
    long_x = " ".join(["sort"] * 200)  # longer than the model's 64 positions
    s = analysis.reward_scores(model, tok, [long_x, "hello"], ["1 2 3", "world"], max_length=32, device="cpu")
    assert s.shape == (2,) and torch.isfinite(s).all() and not math.isnan(float(s[0]))


# ====================================================================================================
# bench.py: the GPU benchmark script, smoke-tested on the CPU with a tiny model
# ====================================================================================================
def _bench_run(tmp_path, launcher, extra=()):
    out = tmp_path / "b.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    bench = os.path.join(HERE, "tools", "bench.py")
    p = subprocess.run(launcher + [bench, "--size", "tiny", "--out", str(out), *extra], cwd=HERE, env=env,
                       timeout=400, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not os.path.exists(str(out) + ".tmp")  # written atomically
    md = (tmp_path / "b.md").read_text()  # the same numbers as Markdown tables, for the README
    assert "| generate.py, DynamicCache |" in md and "| DPO policy update |" in md and "**total**" in md
    return json.loads(out.read_text()), p.stdout


def _bench_check(r, stdout, samplers="dynamic,static,compile,hf"):
    s, d, ref, proj = r["sampler"], r["dpo"], r["reference"], r["projection"]
    assert r["model"]["params"] > 1e6
    assert set(s["samplers"]) == set(samplers.split(",")) and s["best"] in s["samplers"] and s["best"] != "hf"
    for key, x in s["samplers"].items():
        assert "error" not in x, x
        assert x["new_tokens_per_s"] > 0 and x["decode_steps_per_s"] > 0 and x["seconds"] > 0
        assert x["speedup_vs_hf"] > 0 and 0 <= x["token_match_frac"] <= 1
        if r["env"]["device"] == "cpu":  # fp32: the greedy tokens of every sampler must agree exactly
            assert x["token_match_frac"] == 1.0 and x["first_k_identical"]
    assert d["tokens_per_s"] > 0 and d["step_s"] > 0 and ref["tokens_per_s"] > 0
    assert d["tokens_per_step"] == d["batch"] * 2 * (d["prompt"] + d["response"])  # chosen + rejected, no padding
    assert abs(d["first_loss"] - math.log(2)) < 1e-2  # step 0: policy == reference, every pair's loss is log 2
    assert len(proj["stages"]) == 4 and proj["hours_total"] > 0
    assert math.isclose(proj["hours_total"], 3 * proj["hours_per_iteration"])
    for word in ("sampler:", "generate.py, DynamicCache", "HF generate", "policy update", "projection to the paper"):
        assert word in stdout


@pytest.mark.slow
def test_bench_tiny_cpu(tmp_path):
    # every sampler (the compiled decode step included) and the policy update with compiled blocks
    r, stdout = _bench_run(tmp_path, [sys.executable], ["--left_pad", "true", "--compile", "true"])
    _bench_check(r, stdout)
    assert r["env"]["world"] == 1 and r["sampler"]["left_pad"] is True and r["config"]["compile"] is True


@pytest.mark.slow
def test_bench_tiny_fsdp_two_processes(tmp_path):
    """torchrun, 2 CPU processes: FSDP2 policy, generation inside gathered_weights (the compiled decode step
    too: under FSDP it is compiled in pieces around the hooks); no hang, same JSON."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r, stdout = _bench_run(tmp_path, launcher, ["--grad_ckpt", "true", "--samplers", "dynamic,compile,hf"])
    _bench_check(r, stdout, "dynamic,compile,hf")
    assert r["env"]["world"] == 2 and r["env"]["fsdp"] is True


# ====================================================================================================
# GPU only (skipped without CUDA): paths the CPU cannot take. A session with a GPU runs them with
# `python -m pytest -q test_ldalign.py -k cuda` (.ci/gpu does, before the benchmark).
# ====================================================================================================
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_graph_decode_equals_dynamic_cache_and_hf_generate(name):
    """compile=True on CUDA is mode="reduce-overhead": every decode step replays one recorded CUDA graph, whose
    output buffer the next replay overwrites. Greedy, fp32: the same tokens as the eager DynamicCache path over
    several batches sharing one StaticCache (the last one filled up), and as HF generate on one batch."""
    dev = torch.device("cuda")
    model = MODELS[name]().to(dev)
    ps = gen_prompts([3, 9, 5, 1, 7, 4, 8])
    eos = {"llama": 7, "gpt2": 52}[name]
    kw = dict(batch_size=3, max_new_tokens=20, eos_token_id=eos, pad_token_id=GEN_PAD, temperature=0.0,
              top_p=1.0, top_k=0, seed=0, device=dev)
    for _ in range(2):  # the second round replays the recorded graphs
        assert sample_responses(model, ps, static=True, compile=True, **kw) == sample_responses(model, ps, **kw)
    ids, mask = (t.to(dev) for t in pad_sequences(ps[:3], GEN_PAD, side="left"))
    ours = generate(model, ids, mask, 20, eos_token_id=None, pad_token_id=GEN_PAD, temperature=0, static=True,
                    compile=True)
    hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                        pad_token_id=GEN_PAD)[:, ids.shape[1]:]
    assert torch.equal(ours, hf)


@cuda_only
def test_cuda_one_gpu_bf16_training_sees_updated_weights():
    """The real one-GPU path (fp32 weights, fsdp.autocast = bf16 autocast): a caller's autocast block around
    training changes nothing, and the loss falls (test_bf16_autocast_training_sees_updated_weights on CPU)."""
    losses, _ = _train_under_outer_autocast(torch.device("cuda"), outer=False)
    losses_outer, _ = _train_under_outer_autocast(torch.device("cuda"), outer=True)
    # approx: the backward, too, runs under the outer block (its bf16 casts may round differently); stale
    # weights are off by far more (0.47 instead of 0.27 at step 2 on the CPU)
    assert losses_outer == pytest.approx(losses, abs=2e-2)
    assert abs(losses[0] - math.log(2)) < 2e-2 and losses[-1] < 0.5 * losses[0]  # step 0: policy == reference


# ====================================================================================================
# The memory plan (plan.py, `ldalign.py --plan`): FSDPMemTracker over fake tensors and a fake process group,
# checked against the real FSDP2 shards and the saved activations of a real step in 2 gloo processes
# ====================================================================================================
PLAN_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
PLAN_PAIRS, PLAN_LEN = 2, 48
# the plan's activations after the forward (every tensor the forward made that is still alive) over the bytes
# autograd saved for backward in the real step (distinct storages, weights excluded): measured 1.068
PLAN_ACT_TOLERANCE = 0.15


def _plan_folders(root):
    """A policy and a guide folder holding config.json only: all that --plan reads."""
    from transformers import MistralConfig
    policy, guide = os.path.join(root, "policy"), os.path.join(root, "guide")
    MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=4096).save_pretrained(policy)
    GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(guide)
    return policy, guide


def test_plan_prints_every_stage_and_a_verdict_without_a_run_folder(tmp_path, capsys):
    """--plan with the paper preset (config.json of tiny folders): a table of every stage of Algorithm 1 and the
    baselines, the verdict, the largest batches, the step checkpoint; no run folder, no data read, no process group
    left behind; the same numbers on too small a GPU give DOES NOT FIT."""
    policy, guide = _plan_folders(tmp_path)
    out = tmp_path / "run"
    argv = ["--preset", "paper", "--plan", "--plan_world", "2", "--plan_gpu_gb", "40", "--policy", policy,
            "--guide", guide, "--out", str(out), "--data", str(tmp_path / "missing.jsonl"), "--micro_batch_size", "2"]
    m = ldalign.main(argv)
    text = capsys.readouterr().out
    for stage in ("sample y' (lines 2, 7), batch 64", "guide training (line 4)", "distances (line 8)",
                  "reference log-probs, 4 seqs", "update (line 10), AC on", "update (line 10), AC off",
                  "sft baseline"):
        assert f"| {stage}" in text, text
    assert "Verdict: FITS on 2 x 40 GiB" in text and "--micro_batch_size 32 with --grad_ckpt true" in text
    assert "Suggested --save_steps" in text
    assert not out.exists() and not dist.is_initialized()
    # a micro-batch of 2 pairs out of 32 per rank: the earlier micro-batches' unsharded fp32 gradients are counted
    assert m["n_micro"] == 16 and m["rows"]["update"]["accumulated"] >= 4 * m["trainable"]
    lines, fits = plan.report(ldalign.parse_args(argv), m, 2, 2.2)
    assert not fits and any(line.startswith("Verdict: DOES NOT FIT on 2 x 2.2 GiB") for line in lines)


def test_plan_option_errors_are_one_line(tmp_path, capsys):
    """--plan_world / --plan_gpu_gb / the plan's assumptions out of range, a batch that does not split over the
    GPUs, a hub id without a shipped config: one line each, before anything is built."""
    for bad, msg in ((["--plan_world", "0"], "--plan_world must be > 0"),
                     (["--plan_gpu_gb", "0"], "--plan_gpu_gb must be a finite number > 0"),
                     (["--plan_gpu_gb", "nan"], "--plan_gpu_gb must be a finite number > 0"),
                     (["--plan_disk_gbps", "-1"], "--plan_disk_gbps must be"), (["--plan_mfu", "1.5"], "--plan_mfu")):
        with pytest.raises(SystemExit, match=msg):
            ldalign.parse_args(["--plan"] + bad)
    assert "multiples of --plan_world 3" in _user_error(["--preset", "paper", "--plan", "--plan_world", "3"], capsys)
    err = _user_error(["--plan", "--policy", "someorg/some-model", "--plan_world", "2"], capsys)
    assert err.startswith("error: --policy someorg/some-model: --plan reads a local folder's config.json")
    assert not dist.is_initialized()


def _plan_real_step_worker(rank, results):
    """One real LD-Align step of PLAN_LLAMA under FSDP2 (gloo, fp32 on the CPU): this rank's bytes of parameter,
    gradient and AdamW-state shards, and the bytes autograd saves for backward in the forward."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = fsdp.parallelize(LlamaForCausalLM(LlamaConfig(**PLAN_LLAMA)), torch.device("cpu"))
    opt = dpo.make_optimizer(model, "adamw", 1e-3)
    ids = torch.randint(3, PLAN_LLAMA["vocab_size"], (2 * PLAN_PAIRS, PLAN_LEN))
    saved = {}

    def pack(t):
        # activations only: not the (gathered) weights nor views of them
        base = t if t._base is None else t._base
        if not (base.is_leaf and base.requires_grad):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = dpo.policy_logps(model, ids, torch.ones_like(ids), ids, start=1)
    ones, zeros = torch.ones(PLAN_PAIRS), torch.zeros(PLAN_PAIRS)
    dpo.ldalign_loss(logps[:PLAN_PAIRS], logps[PLAN_PAIRS:], zeros, zeros, ones, 0.1)[0].sum().backward()

    def local_bytes(tensors):
        # a DTensor's shard on this rank; AdamW's step counts are plain tensors
        return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)
    grads = local_bytes(p.grad for p in model.parameters())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    state = local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    results[rank] = dict(params=local_bytes(model.parameters()), grads=grads, optimizer=state,
                         saved=sum(saved.values()))


@pytest.mark.slow
def test_plan_equals_real_shards_and_saved_activations_in_two_gloo_processes():
    """The plan's per-rank bytes of parameters, gradients and AdamW state (fake tensors, fake process group of 2)
    equal the real FSDP2 shards' after one real step in 2 gloo processes; its activations after the forward are
    within PLAN_ACT_TOLERANCE above the bytes the real forward saved for backward (saved_tensors_hooks: distinct
    storages, weights excluded), never below them (the plan also counts what the forward made and did not save)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    with plan.fake_world(2):
        model = plan.sharded(lambda: LlamaForCausalLM(LlamaConfig(**PLAN_LLAMA)), bf16=False)
        with plan.fake_tensors():
            model.to_empty(device="cpu")
            rec = plan.policy_train(model, batch=PLAN_PAIRS, length=PLAN_LEN, vocab=PLAN_LLAMA["vocab_size"],
                                    optimizer="adamw", micro_batches=1)
        params = plan.shard_bytes(model)
    assert not dist.is_initialized()
    real = _run_gloo(_plan_real_step_worker)
    for rank in (0, 1):
        assert real[rank]["params"] == params
        assert real[rank]["grads"] == rec["marks"]["after_backward"]["grads"]
        assert real[rank]["optimizer"] == rec["marks"]["after_step"]["optimizer"]
        act = rec["marks"]["after_forward"]["activations"]
        assert real[rank]["saved"] <= act <= (1 + PLAN_ACT_TOLERANCE) * real[rank]["saved"], (act, real[rank])


@pytest.mark.slow
def test_plan_with_lora_counts_what_a_real_step_with_adapters_holds(tmp_path, capsys):
    """--lora_r: the plan's bytes of weights (a bf16 base, fp32 adapters), gradients and RMSprop state on one GPU
    (fake tensors, a fake group of 1, lora.add and lora.begin as the run) equal those of a real tiny model with
    adapters after one real step in this process: the adapters' gradients and state only. The whole plan with
    LoRA (--preset paper, tiny config folders) prints the adapters' line and counts the adapters as trainable;
    a bf16 base over several GPUs is refused, as under torchrun."""
    from transformers import LlamaConfig, LlamaForCausalLM
    targets, r = "q_proj,v_proj", 4
    with plan.fake_world(1):
        model = plan.sharded(lambda: LlamaForCausalLM(LlamaConfig(**PLAN_LLAMA)), bf16=False, lora_r=r,
                             lora_targets=targets, base_dtype=torch.bfloat16)
        with plan.fake_tensors():
            model.to_empty(device="cpu")
            lora.begin(model, r, 0)
            rec = plan.policy_train(model, batch=PLAN_PAIRS, length=PLAN_LEN, vocab=PLAN_LLAMA["vocab_size"],
                                    optimizer="rmsprop", micro_batches=1)
        params = plan.shard_bytes(model)
    assert not dist.is_initialized()
    # the real step: one process, no FSDP2, the run's LoRA calls
    torch.manual_seed(0)
    real = lora.cast_base(lora.add(LlamaForCausalLM(LlamaConfig(**PLAN_LLAMA)), targets, r), torch.bfloat16)
    lora.begin(real, r, 0)
    opt = dpo.make_optimizer(real, "rmsprop", 1e-3)
    ids = torch.randint(3, PLAN_LLAMA["vocab_size"], (2 * PLAN_PAIRS, PLAN_LEN))
    logps = dpo.policy_logps(real, ids, torch.ones_like(ids), ids, start=1)
    ones, zeros = torch.ones(PLAN_PAIRS), torch.zeros(PLAN_PAIRS)
    dpo.ldalign_loss(logps[:PLAN_PAIRS], logps[PLAN_PAIRS:], zeros, zeros, ones, 0.1)[0].sum().backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in real.parameters() if p.grad is not None)
    opt.step()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    adapters, _ = lora.numel(real)
    assert params == sum(p.numel() * p.element_size() for p in real.parameters())
    assert rec["marks"]["after_backward"]["grads"] == grads == 4 * adapters
    assert rec["marks"]["after_step"]["optimizer"] == state >= 4 * adapters
    # the whole plan with LoRA on one GPU
    policy, guide = _plan_folders(tmp_path)
    argv = ["--preset", "paper", "--plan", "--plan_world", "1", "--policy", policy, "--guide", guide,
            "--lora_r", "2", "--lora_base_dtype", "bfloat16", "--micro_batch_size", "64"]
    m = ldalign.main(argv)
    assert "LoRA rank 2 on q_proj" in capsys.readouterr().out
    assert m["trainable"] < m["base_params"] and m["rows"]["update"]["grads"] == 4 * m["trainable"]
    assert "is for one process: --plan_world 1, not 2" in _user_error(argv[:4] + ["2"] + argv[5:], capsys)
    assert not dist.is_initialized()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "fsdp_worker":
    _fsdp_worker(sys.argv[2])
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "lora_worker":
    _lora_worker(sys.argv[2], sys.argv[3])
