"""The memory plan (tools/plan.py, `ldalign.py --plan`): its table and verdict without a run folder (the tiny preset's
in MiB), its option errors, a config.json that lacks a size, is cut short or has no model_type (one line);
slow: its shard bytes equal a real FSDP2 step's (2 gloo processes) and its activations are within a stated tolerance
of the saved ones; with LoRA its weight, gradient and optimizer bytes equal a real step's with adapters.
"""
import json
import os
import re

import pytest
import torch
import torch.distributed as dist
from transformers import GPT2Config

import dpo
import fsdp
import ldalign
from run import lora
from tests.builders import (
    _run_gloo,
    _user_error,
)
from tools import plan

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
    # a micro-batch of 2 pairs out of 32 per rank: each micro-batch's gradients reduce-scattered as it ends (FSDP2's
    # default) keeps no unsharded gradient; deferred to the step's last micro-batch (the comparison row, and
    # --defer_grad_sync true), the earlier micro-batches' unsharded fp32 gradients are counted
    assert m["n_micro"] == 16 and m["rows"]["update"]["accumulated"] == 0
    assert "| update (line 10), AC on, per-micro sync" in text and "| update (line 10), AC on, deferred sync" in text
    assert m["rows"]["update_sync_other"]["accumulated"] >= 4 * m["trainable"]
    assert "each micro-batch's gradients reduce-scattered as it ends" in text
    lines, fits = plan.report(ldalign.parse_args(argv), m, 2, 2.2)
    assert not fits and any(line.startswith("Verdict: DOES NOT FIT on 2 x 2.2 GiB") for line in lines)
    deferred = ldalign.main(argv + ["--defer_grad_sync", "true"])
    assert deferred["rows"]["update"]["accumulated"] >= 4 * m["trainable"]
    assert deferred["rows"]["update"]["accumulated"] == m["rows"]["update_sync_other"]["accumulated"]
    assert "keep every fp32 gradient unsharded (--defer_grad_sync true)" in capsys.readouterr().out


def test_plan_counts_the_steps_each_method_trains_and_the_save_overhead(tmp_path, capsys):
    """Steps per iteration as each method trains them: spin with --spin_keep_previous trains on 2N pairs from
    iteration 2 (twice ldalign's steps); the suggested --save_steps with what saving costs at the plan's step time
    and at a step twice as fast (an upper bound of the step: every sequence at max_len)."""
    policy, guide = _plan_folders(tmp_path)
    argv = ["--preset", "paper", "--plan", "--plan_world", "2", "--policy", policy, "--guide", guide,
            "--method", "ldalign,spin,dpo,sft", "--sft_data", "D", "--max_examples", "6400"]
    cfg = ldalign.parse_args(argv)
    assert plan.steps_per_iteration(cfg) == {"ldalign": (200, 200), "spin": (200, 400), "dpo": (200, 200),
                                             "sft": (200, 200)}
    # the paper preset's continual SFT reads every record of --data: the plan cannot count them
    assert plan.steps_per_iteration(dict(cfg, sft_data=""))["sft"] == (None, None)
    ldalign.main(argv)
    text = capsys.readouterr().out
    assert "  ldalign: 200 steps (~" in text and ") per iteration" in text
    assert "  spin: 200 steps (~" in text and "in iteration 1, 400 steps (~" in text
    save = next(line for line in text.splitlines() if line.startswith("Suggested --save_steps"))
    now, fast = (float(x) for x in re.findall(r"takes ([0-9.]+)% of the update .* ([0-9.]+)% at a step twice", save)[0])
    assert 0 < now < fast <= 2 * now, save


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


def test_a_config_json_without_the_model_sizes_is_refused_by_the_plan(tmp_path, capsys):
    """--policy DIR whose config.json is {"model_type": "llama", "vocab_size": 300} (a trial's): one line naming the
    file and every size it leaves to LlamaConfig's defaults (which made a 6.48B plan), not a plan. GPT-2's own
    spellings (n_embd, n_layer, n_head, n_positions) are sizes given; the shipped configs give them all."""
    policy, guide = tmp_path / "policy", tmp_path / "guide"
    policy.mkdir()
    guide.mkdir()
    (policy / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 300}))
    err = _user_error(["--plan", "--policy", str(policy)], capsys)
    assert err == (f"error: {policy}/config.json (--policy): no hidden_size, num_hidden_layers, num_attention_heads, "
                   "intermediate_size; the plan needs every size of the model from the file, not LlamaConfig's "
                   "defaults"), err
    sizes = dict(model_type="gpt2", vocab_size=96, n_embd=32, n_layer=1, n_head=2)
    (guide / "config.json").write_text(json.dumps(sizes))
    err = _user_error(["--plan", "--guide", str(guide)], capsys)
    assert err.startswith(f"error: {guide}/config.json (--guide): no n_positions; the plan needs"), err
    (guide / "config.json").write_text(json.dumps(dict(sizes, n_positions=64)))
    assert plan.read_config(dict(ldalign.DEFAULTS, guide=str(guide)), "guide").n_embd == 32
    paper = ldalign.parse_args(["--preset", "paper"])
    for option, name in (("policy", paper["policy"]), ("policy", "Qwen/Qwen2.5-0.5B-Instruct"), ("guide", "gpt2")):
        assert plan.read_config(dict(paper, **{option: name}), option).vocab_size > 30000, name


def test_a_plan_config_json_cut_short_or_without_model_type_is_one_line(tmp_path, capsys):
    """A config.json cut mid-way, one without "model_type", one of an architecture transformers does not know:
    one line naming the file (not a JSONDecodeError or KeyError traceback)."""
    policy = tmp_path / "policy"
    policy.mkdir()
    path = policy / "config.json"
    for text, msg in (('{"model_type": "llama", "hidden_si', "not valid JSON (Unterminated string"),
                      ('{"vocab_size": 300}', 'no "model_type" (the architecture'),
                      ('{"model_type": "nonesuch"}', "Unrecognized model identifier: nonesuch")):
        path.write_text(text)
        err = _user_error(["--plan", "--policy", str(policy)], capsys)
        assert err.startswith(f"error: {path} (--policy): {msg}"), err


def test_the_plan_of_the_tiny_preset_gives_its_verdict_in_the_tables_unit(capsys):
    """--plan on the tiny preset: its table is in MiB, and so is its verdict's largest stage (not "0.0 GiB")."""
    ldalign.main(["--plan"])
    text = capsys.readouterr().out
    verdict = next(line for line in text.splitlines() if line.startswith("Verdict:"))
    assert "peak/GPU MiB" in text and re.search(r", [1-9][0-9.]* MiB\)$", verdict), verdict


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


def _held_gradient_bytes(model):
    """The gradient bytes this rank holds: its sharded .grad and FSDP2's unsharded gradients kept between
    micro-batches when the reduce-scatter is deferred (FSDP2's own fields: the unsharded parameter's .grad, or an
    fp32 accumulator when the reduce dtype differs)."""
    from torch.distributed.fsdp import FSDPModule
    held = sum((p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).numel() * p.grad.element_size()
               for p in model.parameters() if p.grad is not None)
    for m in model.modules():
        group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
        for fp in group.fsdp_params if group else []:
            g = fp.unsharded_accumulated_grad
            if g is None and getattr(fp, "_unsharded_param", None) is not None:
                g = fp._unsharded_param.grad
            held += g.numel() * g.element_size() if g is not None else 0
    return held


def _sync_modes_worker(rank, results):
    """One optimizer step of dpo.train_step over two micro-batches of PLAN_PAIRS pairs per rank, FSDP2 on 2 gloo
    processes, in both gradient-sync modes: the gradient bytes held between the two micro-batches and the full
    weights after the step."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cpu = torch.device("cpu")
    out = {}
    for defer in (False, True):
        torch.manual_seed(0)
        model = fsdp.parallelize(LlamaForCausalLM(LlamaConfig(**PLAN_LLAMA)), cpu)
        opt = dpo.make_optimizer(model, "adamw", 1e-3)
        ids = torch.randint(3, PLAN_LLAMA["vocab_size"], (8, 2 * PLAN_PAIRS, PLAN_LEN),
                            generator=torch.Generator().manual_seed(1))
        held = []

        def loss_fn(idx, valid):
            if idx[0] > 1:  # this rank's second micro-batch (items r + 4, r + 6): what the first one left
                held.append(_held_gradient_bytes(model))
            x = ids[idx[0]]  # (2B, T): the micro-batch's pairs, the same in both modes
            logps = dpo.policy_logps(model, x, torch.ones_like(x), x, start=1)
            ones, zeros = torch.ones(PLAN_PAIRS), torch.zeros(PLAN_PAIRS)
            return dpo.ldalign_loss(logps[:PLAN_PAIRS], logps[PLAN_PAIRS:], zeros, zeros, ones, 0.1)[0].sum(), \
                torch.zeros(0)
        # 8 items, 4 per rank (rank r: r, r + 2, ...), micro-batches of 2 items: two per step
        dpo.train_step(model, opt, (list(range(8)), [True] * 8), loss_fn, 0, 10, device=cpu, lr=1e-3, warmup=1,
                       micro_batch_size=2, max_grad_norm=1.0, stats_names=[], defer_grad_sync=defer)
        out[defer] = dict(held=held[0], weights={k: v.clone() for k, v in fsdp.full_state_dict(model).items()})
    if rank == 0:
        results[rank] = dict(held={d: out[d]["held"] for d in out},
                             differ=max((out[False]["weights"][k] - out[True]["weights"][k]).abs().max().item()
                                        for k in out[False]["weights"]))
    else:
        results[rank] = dict(held={d: out[d]["held"] for d in out})


@pytest.mark.slow
def test_gradient_sync_modes_give_one_step_and_the_plans_gradient_bytes_in_two_gloo_processes():
    """Several micro-batches per step under FSDP2: reduce-scattered after each (the default) or deferred to the last
    (--defer_grad_sync true), one step gives the same weights to float round-off; between the micro-batches a rank
    holds its gradient shards in the first mode and every parameter's unsharded fp32 gradient in the second, and
    the plan (fake tensors, fake group of 2, policy_train in each mode) counts those same bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM
    planned = {}
    with plan.fake_world(2):
        for defer in (False, True):
            model = plan.sharded(lambda: LlamaForCausalLM(LlamaConfig(**PLAN_LLAMA)), bf16=False)
            with plan.fake_tensors():
                model.to_empty(device="cpu")
                rec = plan.policy_train(model, batch=PLAN_PAIRS, length=PLAN_LEN, vocab=PLAN_LLAMA["vocab_size"],
                                        optimizer="adamw", micro_batches=2, defer_grad_sync=defer)
            between = rec["marks"]["before_last_micro"]
            planned[defer] = between["grads"] + rec["accumulated"]
            n_params = sum(p.numel() for p in model.parameters())
    assert not dist.is_initialized()
    real = _run_gloo(_sync_modes_worker)
    assert real[0]["differ"] <= 1e-6, real[0]
    for rank in (0, 1):
        assert real[rank]["held"] == planned, (real[rank], planned)
    assert planned[True] == 4 * n_params and planned[False] < 0.6 * planned[True]


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
