"""FSDP2 / distributed (fsdp.py, gloo on the CPU): 2 processes == 1 process (the update, sampling, the guide and its
s), one host copy of a checkpoint (rank 0 reads it), two nodes (train.sh) == 1 process, weights gathered once per
generate(), equal decode steps on every rank.

The gloo workers are defined here, next to their tests (torch.multiprocessing pickles a worker by its module);
test_fsdp2_two_processes_equal_one_process starts this file under python / torchrun (`tests/test_distributed.py
fsdp_worker OUT`).
"""
import os
import sys

if __name__ == "__main__":  # the tests below start this file with python / torchrun (a worker's name as argument):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root's modules

import contextlib
import json
import subprocess
import time

import numpy as np
import pytest
import torch

import dpo
import fsdp
import generate as generate_module
import guide as guide_lib
from generate import generate, pad_sequences
from tests.builders import (
    G_EOS,
    G_PAD,
    GEN_PAD,
    HERE,
    MINIMAL_RUN,
    SAMPLE_CFG,
    SAMPLE_TOK,
    ScriptedLM,
    _minimal_data,
    _read_jsonl,
    _run,
    _run_gloo,
    _train_sh,
    _train_sh_env,
    gen_llama,
    gen_prompts,
    save_tiny_mistral,
    tiny_config,
    tiny_guide,
    tiny_llama,
)


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


def _peak_mb():
    # VmHWM: this process's peak resident memory (ru_maxrss would count the parent's from before exec too)
    import re
    return int(re.search(r"VmHWM:\s*(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


def _shard_mb(model):
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
               for p in model.parameters()) / 2**20


RM_PAIRS = (["a b", "c d e", "f", "g h"], ["x", "y y", "z", "a"])


def _guide_and_rm_worker(rank, results, folder):
    """Rank `rank`'s growth of peak host memory while the reward model (analysis.load_reward_model) and then the
    stored guide (guide.place, as Stages.guide reads it back) are loaded under FSDP2; the guide's full weights
    (rank 0) and the reward model's scores of RM_PAIRS, every rank scoring its share."""
    import analysis
    torch.set_num_threads(1)
    cpu = torch.device("cpu")

    def guide(name):
        path = os.path.join(folder, name)
        return guide_lib.place(lambda: guide_lib.load_guide(path), lambda: guide_lib.saved_architecture(path), cpu)
    guide("small_guide")  # the one-time costs first (imports, the first DTensor and gloo calls)
    before = _peak_mb()
    rm = analysis.load_reward_model(os.path.join(folder, "rm"), device=cpu)
    grown_rm = _peak_mb() - before
    before = _peak_mb()
    g = guide("guide")
    grown_guide = _peak_mb() - before
    sd = fsdp.full_state_dict(g)
    scores = analysis.score_rewards(rm, *RM_PAIRS, cpu).tolist()
    results[rank] = dict(grown_rm=grown_rm, rm_shard=_shard_mb(rm[0]), grown_guide=grown_guide,
                         guide_shard=_shard_mb(g), scores=scores,
                         guide={k: v.clone() for k, v in sd.items()} if rank == 0 else None)


@pytest.mark.slow
def test_only_rank_0_reads_the_guide_and_the_reward_model_into_host_memory(tmp_path):
    """Under torchrun the guide (two GPT-2s) and the reward model reach the other ranks as the policy does
    (fsdp.from_rank0): rank 0 reads them, rank 1 builds them on the meta device and receives its shards. A ~200 MB
    guide and a ~100 MB reward model: rank 1's peak host memory grows by its shard (half of each) and a few MB,
    not by the whole model. The guide's weights are those of the stored guide, and the sharded reward model scores
    what one process scores, every rank scoring its share."""
    import functools

    from transformers import GPT2Config, GPT2ForSequenceClassification

    import analysis
    torch.manual_seed(0)
    conf = dict(vocab_size=2048, n_positions=256, n_embd=512, n_layer=8, n_head=8)
    guide_lib.save_guide(guide_lib.build_guide(GPT2Config(**conf), 32), str(tmp_path / "guide"))
    guide_lib.save_guide(tiny_guide(), str(tmp_path / "small_guide"))
    GPT2ForSequenceClassification(GPT2Config(**conf, num_labels=1, pad_token_id=0)).save_pretrained(tmp_path / "rm")
    _words_tokenizer().save_pretrained(tmp_path / "rm")
    guide_mb = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "guide") for f in fs) / 2**20
    rm_mb = os.path.getsize(tmp_path / "rm" / "model.safetensors") / 2**20
    assert 190 < guide_mb < 215 and 95 < rm_mb < 110
    results = _run_gloo(functools.partial(_guide_and_rm_worker, folder=str(tmp_path)))
    print({rank: {k: round(v) for k, v in r.items() if isinstance(v, float)} for rank, r in results.items()})
    # Measured: rank 1 +109 MB for the guide (its 101 MB shard), +56 MB for the reward model (its 50 MB shard)
    one = results[1]
    assert one["grown_guide"] - one["guide_shard"] < 0.15 * guide_mb and one["grown_guide"] < 0.6 * guide_mb
    assert one["grown_rm"] - one["rm_shard"] < 0.3 * rm_mb and one["grown_rm"] < 0.8 * rm_mb
    stored = guide_lib.load_guide(str(tmp_path / "guide")).state_dict()
    assert results[0]["guide"].keys() == stored.keys()
    assert all(torch.equal(results[0]["guide"][k], stored[k]) for k in stored)
    rm = analysis.load_reward_model(str(tmp_path / "rm"), device="cpu")
    alone = analysis.score_rewards(rm, *RM_PAIRS, torch.device("cpu")).tolist()
    assert results[0]["scores"] == results[1]["scores"] == pytest.approx(alone, rel=1e-5, abs=1e-6)


def _words_tokenizer():
    """A word-level tokenizer of the letters a..z, with [PAD] 0 (the reward model's of the test above)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


# ----------------------------------------------------------------------------------------------------
# several nodes: train.sh passes NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT to torchrun
# ----------------------------------------------------------------------------------------------------
def _process_tree(pid):
    """pid and every process it started, and they started, ... (Linux /proc: each process's parent id)."""
    parent = {}
    for d in os.listdir("/proc"):
        try:
            # /proc/PID/stat: "pid (name) state ppid ..."; the name may hold spaces and parentheses
            parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    tree, new = [pid], [pid]
    while new:
        new = [c for c, p in parent.items() if p in new]
        tree += new
    return tree


def _train_sh_two_nodes(args, logs, timeout=300):
    """`bash train.sh ARGS` on two nodes that are both this host: two launchers with NNODES=2, NODE_RANK 0 and
    1, NPROC=1, MASTER_ADDR 127.0.0.1 and a free MASTER_PORT, as on two machines. Returns each node's exit status
    and output (also in logs/node0.log, logs/node1.log). When one node fails, or `timeout` seconds pass, both are
    killed with every process they started (torchrun starts its workers in sessions of their own). A port taken
    between choosing it and binding it (another program) is tried again with another."""
    import signal
    import socket
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = _train_sh_env(dict(NPROC="1", NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
        procs = []
        for r in (0, 1):
            with open(os.path.join(logs, f"node{r}.log"), "w") as f:
                procs.append(subprocess.Popen(["bash", os.path.join(HERE, "train.sh")] + args, cwd=HERE,
                                              env=dict(env, NODE_RANK=str(r)), stdout=f, stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        try:
            while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
                if time.time() > deadline:
                    break
                time.sleep(0.5)
        finally:
            for pid in [q for p in procs if p.poll() is None for q in _process_tree(p.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for p in procs:
                p.wait()
        out = [open(os.path.join(logs, f"node{r}.log")).read() for r in (0, 1)]
        if "address already in use" not in out[0].lower():
            return [(p.returncode, o) for p, o in zip(procs, out)]
    raise AssertionError(f"no free port in 3 tries:\n{out[0][-3000:]}")


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


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "fsdp_worker":
    _fsdp_worker(sys.argv[2])
