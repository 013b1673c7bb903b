"""Builders and shared helpers of the tests (CPU, tiny models built from configs, no downloads).

test_ldalign.py and the files in tests/ import what they use by name (`from tests.builders import tiny_llama, ...`);
the fixtures built from these are in conftest.py. HERE is the repository root. Importing this module sets one
intra-op thread (below): conftest.py imports it at collection, and so does every worker process that imports a test
module.

    tiny models            tiny_llama; the sampler's models gen_llama / gen_gpt2 (MODELS), gen_prompts, ScriptedLM
                           (a fake LM with a known greedy output), generate_naive (the cache-free oracle), SAMPLE_CFG
                           / SAMPLE_TOK (sample_dataset's settings in the multi-process and resumed sampling tests)
    the guide (Eq. 2)      tiny_config, tiny_guide, synthetic_examples (the `trained` fixture's)
    training               _train_under_outer_autocast (DPO inside a caller's autocast block)
    the toy task's data    GOOD (a good JSONL record), _toy_tok; _tiny_reward_model (for ldalign.py)
    running ldalign.py     TINY_RUN, _run, _check_run_folder (the `tiny_run` and `uninterrupted` fixtures'),
                           MINIMAL_RUN / _minimal_data (the fast tier's slice of the toy data), _check_same_stages (a
                           2-process run against 1); _cli_start / _cli_wait / _cli (a user's command line, exit status
                           not checked); _train_sh (its environment: _train_sh_env); _user_error (a one-line user
                           error in this process); _all_files
    several processes      _run_gloo (a worker in processes joined by gloo, torch.multiprocessing)
    the paper path         UltraChat / UltraFeedback-like records (QA), trained tokenizers (Mistral-like with
                           zephyr's template, GPT-2-like, DeBERTa-like), tiny HF folders (build_paper_inputs,
                           build_long_records), PAPER_RUN / _paper_args / _paper_run, the run folder's checks
                           (_check_paper_run, _check_dpo_reference_uses_template_tokens)
"""
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import dataset
import dpo
import fsdp
import generate as generate_module
import ldalign
from generate import sample_next
from guide import build_guide
from run import cli

# The repository root (the folder above tests/): ldalign.py, train.sh, tools/ and data/ are there
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# One intra-op thread in the test process, as in every ldalign.py the tests start (OMP_NUM_THREADS=1): the models
# are tiny, and a second thread mostly waits on the first; on a shared 2-core machine the fast tier took 255 s with
# two threads, 95 s with one. An OMP_NUM_THREADS set by the caller is left as it is.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


# ====================================================================================================
# Tiny models, and the sampler's oracle
# ====================================================================================================
def tiny_llama(vocab=64, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**dict(dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0), **kw))
    return LlamaForCausalLM(cfg).eval()


GEN_VOCAB = 96
GEN_PAD = 0


def gen_llama(init=0.2, seed=0):
    # init=0.2 (10x HF's default) spreads the logits, so greedy argmax is not decided by float near-ties.
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=GEN_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=init, bos_token_id=1, eos_token_id=2, pad_token_id=GEN_PAD)
    return LlamaForCausalLM(cfg).float().eval()


def gen_gpt2(init=0.2, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=GEN_VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=128,
                     initializer_range=init, bos_token_id=1, eos_token_id=2, pad_token_id=GEN_PAD)
    return GPT2LMHeadModel(cfg).float().eval()


@torch.no_grad()
def generate_naive(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                   temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """Cache-free reference for `generate` (the tests' oracle): re-runs the full sequence at every step.

    Same arguments, same result, same use of `generator`; O(n^2) instead of O(n) work per row.
    """
    B = input_ids.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T + step)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits[:, -1].float()  # (B, V)
        tok = sample_next(logits, temperature, top_p, top_k, generator)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        new_tokens.append(tok)
        if eos_token_id is not None:
            finished |= tok == eos_token_id
        if eos_token_id is not None and generate_module._all_finished(finished):
            break
        input_ids = torch.cat([input_ids, tok[:, None]], dim=-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=-1)
    if not new_tokens:
        return input_ids.new_zeros(B, 0)
    return torch.stack(new_tokens, dim=1)


def gen_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, GEN_VOCAB, (n,), generator=g).tolist() for n in lengths]


MODELS = {"llama": gen_llama, "gpt2": gen_gpt2}


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


# generate.sample_dataset's settings and tokenizer in the tests of sampling across ranks and of sampling resumed
# batch by batch
SAMPLE_CFG = dict(gen_batch_size=4, max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=0, gen_compile=False,
                  compile=False)
SAMPLE_TOK = SimpleNamespace(eos_token_id=7, pad_token_id=GEN_PAD)


# ====================================================================================================
# The guide T = (phi, psi) of Eq. 2 (guide.py), on synthetic examples
# ====================================================================================================
G_PAD, G_EOS = 0, 3


def tiny_config(dropout=0.0):
    # bos/eos set inside the tiny vocab (transformers 5 warns about the default 50256 otherwise); no dropout so
    # the tiny runs are deterministic and converge fast (dropout=0.1, GPT-2's own: train_guide must turn it off).
    return GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=G_EOS,
                      eos_token_id=G_EOS, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)


def tiny_guide(seed=0, latent_dim=8):
    torch.manual_seed(seed)
    return build_guide(tiny_config(), latent_dim)


def synthetic_examples():
    """8 prompts x 4 variations. y is a deterministic function of (x, v): given x alone the decoder can only guess
    v (>= log 4 nats on the first token), given h = phi(x, y) it can recover v, so it must use h.
    Ordered so that rolling by 1 always hands a row a latent with a different v."""
    ex = []
    for a in range(8):
        x = [1, 10 + a, 20 + (3 * a) % 8]
        for v in range(4):
            y = [30 + v, 40 + (a + v) % 8, 50 + (a * v) % 8, G_EOS]
            ex.append((x, y))
    return ex


# ====================================================================================================
# Training (dpo.py)
# ====================================================================================================
def _train_under_outer_autocast(device, outer):
    """DPO on 8 toy pairs with fsdp.autocast, inside a caller's own bf16 autocast block if `outer`.
    Returns the logged losses and the final weights."""
    pairs = [([1, 5 + i % 3], [7, 8, 2], [9, 9, 2]) for i in range(8)]
    model = tiny_llama().to(device)
    with fsdp.autocast(device, model):  # micro-batch 2 as in training (same shapes)
        rc, rr = dpo.reference_logps(model, pairs, 2, device)
    # (not `enabled=outer`: even a disabled autocast block keeps the cache alive until it exits)
    with torch.autocast(device.type, dtype=torch.bfloat16) if outer else contextlib.nullcontext():
        hist = dpo.dpo_train(model, pairs, rc, rr, torch.ones(8), beta=0.5, lr=1e-2, epochs=3, batch_size=4,
                             micro_batch_size=2, device=device, optimizer="adamw")
    return [h["loss"] for h in hist], model.state_dict()


# ====================================================================================================
# The toy task's data and tokenizer (dataset.py)
# ====================================================================================================


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


def _toy_tok():
    recs = dataset.load_sft_jsonl(os.path.join(HERE, "data", "sort_train.jsonl"), 300)
    return dataset.train_toy_tokenizer([t for r in recs for t in (r["x"], r["y"])])


# ====================================================================================================
# Reward models (Section 5.1.3)
# ====================================================================================================
def _tiny_reward_model(path):
    """A tiny GPT-2 sequence classifier (num_labels=1) with the toy tokenizer, saved as an HF checkpoint."""
    from transformers import GPT2ForSequenceClassification
    tok = _toy_tok()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128, num_labels=1,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ====================================================================================================
# Running ldalign.py (a slice of the toy task) and train.sh
# ====================================================================================================
TINY_RUN = ["--max_examples", "64", "--max_eval", "16", "--sft_steps", "30", "--T", "2", "--epochs", "1",
            "--batch_size", "16", "--micro_batch_size", "8", "--guide_epochs", "1", "--gen_batch_size", "32",
            "--lr", "1e-4"]


def _run(args, nproc=1, env_extra=None):
    """ldalign.py ARGS in `nproc` processes (torchrun when more than one); asserts exit status 0, returns stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    p = subprocess.run(launcher + [os.path.join(HERE, "ldalign.py")] + args, cwd=HERE, env=env, timeout=600,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _check_run_folder(out, T=2, method="ldalign"):
    """The files of a finished toy run (TINY_RUN) of `method`; returns its theta_T, loaded with transformers."""
    from transformers import AutoModelForCausalLM
    mdir = os.path.join(out, method)
    for t in range(1, T + 1):
        it = os.path.join(mdir, f"iter{t}")
        if method in ("ldalign", "spin"):
            rows = [json.loads(line) for line in open(os.path.join(it, "distances.jsonl"))]
            summary = json.load(open(os.path.join(it, "distances.json")))
            s = torch.tensor([r["s"] for r in rows])
            assert len(rows) == 64 and (s >= 0).all()
            assert summary["S"] == pytest.approx(s.mean().item(), rel=1e-5)  # Algorithm 1, line 9
            assert sum(summary["histogram"]["counts"]) == 64  # Section 5.2 (1), as numbers
            assert summary["weights"]["mean"] == pytest.approx(1.0, rel=1e-4)  # s/S averages to 1 (and is 1 for SPIN)
        assert os.path.exists(os.path.join(it, "policy", "model.safetensors"))
        assert not any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(os.path.join(it, "policy")))
        assert json.load(open(os.path.join(it, "policy", "config.json")))["architectures"] == ["LlamaForCausalLM"]
    samples = [json.loads(line) for line in open(os.path.join(out, "iter0", "samples.jsonl"))]
    assert len(samples) == 64 and all({"x", "y", "y_prime", "y_prime_ids", "where"} <= r.keys() for r in samples)
    assert os.path.exists(os.path.join(out, "guide", "latent.safetensors"))
    metrics = [json.loads(line) for line in open(os.path.join(mdir, "metrics.jsonl"))]
    assert [m["iter"] for m in metrics] == list(range(T + 1))
    assert os.path.exists(os.path.join(mdir, "results.md"))
    # theta_T is a plain HF checkpoint: any HF tool loads it
    return AutoModelForCausalLM.from_pretrained(os.path.join(mdir, f"iter{T}", "policy"))


# A minimal slice (the fast tier's run of Algorithm 1): 16 pairs, T = 2, one optimizer step per iteration (a global
# batch of all 16 pairs), lr 1e-3 so that theta_1 is visibly not theta_0. --data is the first 64 records of the shipped
# data: the toy SFT of theta_0 and its tokenizer read all of --data (of data/sort_train.jsonl, 2/3 of the run's time).
MINIMAL_RUN = ["--max_examples", "16", "--max_eval", "4", "--sft_steps", "5", "--T", "2", "--epochs", "1",
               "--batch_size", "16", "--micro_batch_size", "8", "--guide_epochs", "1", "--gen_batch_size", "16",
               "--agreement_n", "0", "--lr", "1e-3"]


def _minimal_data(tmp_path):
    """The first 64 records of the toy data (tokenizing all 8,000 is most of a minimal run's time)."""
    path = tmp_path / "train.jsonl"
    with open(os.path.join(HERE, "data", "sort_train.jsonl")) as f:
        path.write_text("".join(f.readlines()[:64]))
    return str(path)


def _check_same_stages(one, two, T, method="ldalign"):
    """The run folder `two` (2 processes) against `one` (1 process) of the same settings: the guide (line 4) and the
    distances s_i and S (lines 8-9) agree to float round-off. A stage compares only where its inputs are the same:
    s_i where the pair's y' is, S where every y' is (a sampled token can flip under round-off in the policy that
    samples it). Returns the largest differences: guide weights (abs), s (rel), S (rel)."""
    from safetensors.torch import load_file

    def rows(run, rel):
        return _read_jsonl(os.path.join(run, rel))
    # lines 1-3: theta_0's samples, every later stage's input
    assert rows(one, "iter0/samples.jsonl") == rows(two, "iter0/samples.jsonl")
    # line 4: the guide's weights
    gdiff = 0.0
    for part in ("encoder/model.safetensors", "decoder/model.safetensors", "latent.safetensors"):
        a, b = (load_file(os.path.join(run, "guide", part)) for run in (one, two))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=lambda m: f"guide {part} {k}: {m}")
            gdiff = max(gdiff, (a[k] - b[k]).abs().max().item())
    # lines 8-9: s_i and S of every iteration; iteration 1 reuses theta_0's samples (lines 2 and 7)
    sdiff, Sdiff = 0.0, []
    for t in range(1, T + 1):
        it = os.path.join(method, f"iter{t}")
        samples = os.path.join(it, "samples.jsonl")
        samples = samples if os.path.exists(os.path.join(one, samples)) else "iter0/samples.jsonl"
        ya, yb = ([r["y_prime_ids"] for r in rows(run, samples)] for run in (one, two))
        da, db = rows(one, os.path.join(it, "distances.jsonl")), rows(two, os.path.join(it, "distances.jsonl"))
        assert [r["where"] for r in da] == [r["where"] for r in db] and len(ya) == len(da)
        for y1, y2, r1, r2 in zip(ya, yb, da, db):
            if y1 == y2:
                assert r2["s"] == pytest.approx(r1["s"], rel=1e-5, abs=1e-6), (t, r1["where"])
                sdiff = max(sdiff, abs(r1["s"] - r2["s"]) / max(r1["s"], 1e-6))
        S1, S2 = (json.load(open(os.path.join(run, it, "distances.json")))["S"] for run in (one, two))
        if ya == yb:
            assert S2 == pytest.approx(S1, rel=1e-5), t
            Sdiff.append(abs(S1 - S2) / S1)
    assert Sdiff, "no iteration with the same y' in both runs: nothing compared"
    print(f"[1 vs 2 processes] guide weights {gdiff:.2g} (max abs), s {sdiff:.2g} (max rel), "
          f"S {Sdiff} (rel, per iteration with the same y')", flush=True)
    return gdiff, sdiff, Sdiff


def _cli_start(args, env_extra=None):
    """ldalign.py as a user runs it, started (stdout and stderr piped); _cli_wait ends it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "ldalign.py")] + args, cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli_wait(proc):
    """The completed process (no check of its exit status)."""
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _cli(args, env_extra=None):
    """ldalign.py as a user runs it; returns the completed process (no check of its exit status)."""
    return _cli_wait(_cli_start(args, env_extra))


def _train_sh_env(env_extra):
    """The environment of a train.sh the tests launch: the running interpreter's folder first on PATH, where
    train.sh finds python and torchrun (a virtual environment's python runs the tests without being activated)."""
    path = os.path.dirname(sys.executable) + os.pathsep + env_extra.get("PATH", os.environ.get("PATH", ""))
    return dict(os.environ, OMP_NUM_THREADS="1", **dict(env_extra, PATH=path))


def _train_sh(args, env_extra, timeout=300):
    """bash train.sh ARGS as a user runs it; returns the completed process (no check of its exit status)."""
    return subprocess.run(["bash", os.path.join(HERE, "train.sh")] + args, cwd=HERE, timeout=timeout,
                          env=_train_sh_env(env_extra), capture_output=True, text=True)


def _user_error(argv, capsys):
    """ldalign.py ARGV run in this process as the command line runs it (report_errors): a user error, whose one
    line (exit status 2, no traceback) is returned."""
    with pytest.raises(SystemExit) as e:
        cli.report_errors(ldalign.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err[-3000:]
    return err.strip()


def _all_files(folder):
    return [os.path.join(r, f) for r, ds, fs in os.walk(folder) for f in fs + ds]


# ====================================================================================================
# Workers in several processes on this host, joined by a gloo process group (torch.multiprocessing)
# ====================================================================================================
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


# ====================================================================================================
# The paper path (HF folders): every input of the paper's setting, built tiny, on disk, from configs
# ====================================================================================================
# zephyr-7b-sft-full's (and zephyr-7b-beta's) tokenizer_config.json "chat_template", verbatim. transformers
# renders it with trim_blocks / lstrip_blocks: a newline right after a {% %} tag is dropped, the one after }} kept,
# so [user x] + generation prompt is "<|user|>\nx</s>\n<|assistant|>\n".
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

# ----------------------------------------------------------------------------------------------------
# Data: short UltraChat-like conversations (first turn: what ldalign reads; second turn: what it must ignore)
# ----------------------------------------------------------------------------------------------------
QA = [
    ("How do I make a good cup of tea?",
     "Boil fresh water, pour it over the tea leaves and let them steep for three to five minutes. Remove the "
     "leaves, then add milk or lemon if you like."),
    ("What are the benefits of regular exercise?",
     "Regular exercise strengthens the heart, improves sleep and mood, helps control weight and lowers the risk "
     "of many chronic diseases."),
    ("Can you explain what photosynthesis is?",
     "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen. "
     "It happens mainly in the leaves."),
    ("Write a short poem about the sea.",
     "The sea rolls in with silver light,\nit hums a song into the night;\nthe waves return, the waves depart,\n"
     "and carry secrets from the heart."),
    ("What is the capital of France?",
     "The capital of France is Paris, a city known for its museums, its cafés and the Eiffel Tower."),
    ("Give me three tips for studying better.",
     "1. Study in short sessions with breaks.\n2. Test yourself instead of rereading.\n3. Sleep well before an "
     "exam."),
    ("How does a rainbow form?",
     "A rainbow forms when sunlight enters raindrops, bends, reflects inside them and splits into its colours "
     "on the way out."),
    ("Summarize the plot of Romeo and Juliet in two sentences.",
     "Two young lovers from feuding families in Verona marry in secret. A chain of misunderstandings leads to "
     "both of their deaths, which finally reconciles the families."),
    ("What should I pack for a weekend hiking trip?",
     "Pack sturdy shoes, a rain jacket, warm layers, a map, water, snacks, a first aid kit and a headlamp."),
    ("Why is the sky blue?",
     "Air molecules scatter short blue wavelengths of sunlight much more than red ones, so blue light reaches "
     "our eyes from every direction of the sky."),
    ("How can I reduce stress at work?",
     "Plan your day, take short breaks, say no to tasks you cannot finish, and talk to your manager when the "
     "workload is too high."),
    ("Translate 'good morning' into Spanish.",
     "'Good morning' in Spanish is 'buenos días'."),
    ("What is a healthy breakfast?",
     "A healthy breakfast combines protein, fibre and fruit, for example oatmeal with nuts and berries, or eggs "
     "with whole grain toast."),
    ("Explain the difference between weather and climate.",
     "Weather is what the atmosphere does on a given day. Climate is the average weather of a place over many "
     "years."),
    ("How do vaccines work?",
     "Vaccines show the immune system a harmless piece or copy of a germ, so it learns to recognise and fight "
     "the real germ quickly later."),
    ("Write a haiku about autumn.",
     "Red leaves drift and fall,\ncool wind whispers through the trees,\nthe year breathes slowly."),
    ("What are some good ways to save money?",
     "Track your spending, cook at home, cancel unused subscriptions and move a fixed amount to savings every "
     "month."),
    ("Who wrote Pride and Prejudice?",
     "Pride and Prejudice was written by Jane Austen and published in 1813."),
    ("How do I start learning to play the guitar?",
     "Start with a few basic chords, practise switching between them for ten minutes a day, and learn simple "
     "songs that use them."),
    ("What causes the seasons on Earth?",
     "The seasons are caused by the tilt of the Earth's axis, which changes how directly sunlight hits each "
     "hemisphere during the year."),
    ("Give me a simple recipe for pancakes.",
     "Mix one cup of flour, one egg, one cup of milk and a pinch of salt. Cook small ladles of batter in a hot "
     "pan until golden on both sides."),
    ("Why do cats purr?",
     "Cats purr when they are content, but also to calm themselves when they are stressed or hurt."),
    ("What is machine learning?",
     "Machine learning is a way of building computer programs that learn patterns from examples instead of "
     "following rules written by hand."),
    ("How can I improve my writing?",
     "Read widely, write every day, cut unnecessary words and ask others for honest feedback on your drafts."),
    ("What is the tallest mountain in the world?",
     "Mount Everest is the tallest mountain above sea level, at about 8,849 metres."),
    ("Describe a typical day of a nurse.",
     "A nurse checks on patients, gives medicine, records vital signs, talks with doctors and families, and "
     "often works long shifts."),
    ("How do plants drink water?",
     "Roots absorb water from the soil, and it rises through thin tubes in the stem to the leaves, where it "
     "evaporates."),
    ("What is the best way to learn a new language?",
     "Practise a little every day, speak with native speakers as early as possible, and listen to music or "
     "podcasts in the language."),
    ("Why is sleep important?",
     "Sleep lets the body repair itself and the brain store memories. Without enough sleep, focus and mood "
     "suffer."),
    ("Suggest a name for a small bakery.",
     "How about 'The Golden Crust'? It sounds warm and friendly and is easy to remember."),
    ("How do airplanes stay in the air?",
     "The wings are shaped so that air flows faster over the top, which creates lift that balances the weight "
     "of the plane."),
    ("What are the main causes of air pollution?",
     "The main causes are traffic, factories, burning coal for power, and fires in homes and fields."),
    ("Explain what a budget is.",
     "A budget is a plan that lists how much money you expect to earn and how you will spend and save it."),
    ("Give two examples of renewable energy.",
     "Solar power and wind power are two examples of renewable energy."),
    ("How do I care for a houseplant?",
     "Water it when the top of the soil is dry, give it bright indirect light and feed it a little fertiliser "
     "in spring."),
    ("What is the boiling point of water?",
     "At sea level, water boils at 100 degrees Celsius, or 212 degrees Fahrenheit."),
    ("Write one sentence to welcome new students.",
     "Welcome to our school: we are glad you are here and we cannot wait to learn with you!"),
    ("Why do leaves change colour in autumn?",
     "As days get shorter, trees stop making green chlorophyll, and the yellow and red pigments in the leaves "
     "become visible."),
    ("How can I be more productive in the morning?",
     "Wake up at the same time, avoid your phone for the first hour, and start with your most important task."),
    ("What is the role of the heart?",
     "The heart pumps blood through the body, carrying oxygen and nutrients to the organs and removing waste."),
    ("Recommend a classic novel for a teenager.",
     "'To Kill a Mockingbird' by Harper Lee is a classic that many teenagers enjoy and learn from."),
    ("How does recycling help the environment?",
     "Recycling saves raw materials and energy, and it keeps waste out of landfills and the oceans."),
    ("What is the difference between a virus and a bacterium?",
     "Bacteria are living single cells that can grow on their own; viruses are much smaller and can only "
     "multiply inside the cells of a host."),
    ("Describe the taste of a lemon.",
     "A lemon tastes very sour, with a fresh, bright and slightly bitter flavour."),
]
FOLLOW_UPS = ["Can you say more about that?", "Thanks! Could you give an example?", "Why is that?",
              "Can you make it shorter?"]
N_TRAIN, N_EVAL, N_PREF = 36, 8, 16


def _conversation(i, q, a):
    """An UltraChat 200k record: prompt, prompt_id and a four-turn conversation."""
    follow = FOLLOW_UPS[i % len(FOLLOW_UPS)]
    return {"prompt": q, "prompt_id": f"{i:064x}",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                         {"role": "user", "content": follow},
                         {"role": "assistant", "content": "Of course. " + a.split(".")[0] + "."}]}


def _preference(i, q, a):
    """An UltraFeedback-binarized record: chosen / rejected conversations; the answer is the last assistant turn."""
    bad = "I am not sure. " + " ".join(a.split()[:6]) + "."
    return {"prompt": q, "prompt_id": f"{i:064x}",
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
            "score_chosen": 8.0, "score_rejected": 3.0}


def _corpus():
    texts = []
    for q, a in QA:
        texts += [q, a]
    return texts + FOLLOW_UPS + ["I am not sure. Of course."]


# ----------------------------------------------------------------------------------------------------
# Tokenizers, trained with `tokenizers` on the texts above
# ----------------------------------------------------------------------------------------------------
def _trained_bpe(texts, vocab_size, pre_tokenizer, **trainer_kw):
    """(vocab, merges) of a BPE trained on `texts` with the given pre-tokenizer."""
    from tokenizers import Tokenizer, models, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_kw))
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _llama_vocab():
    """A SentencePiece-like BPE vocabulary laid out like Llama's / Mistral's: <unk>=0 <s>=1 </s>=2, the 256 byte
    tokens <0x00>..<0xFF> next (so "\\n" is <0x0A> = 13, as in Mistral's), then the learned pieces. Trained like
    SentencePiece (pieces never cross a word boundary; "\u2581" marks a word start) on texts with no newline, so
    that a newline, as in Mistral's vocabulary, only exists as its byte token."""
    from tokenizers import pre_tokenizers
    texts = [t.replace("\n", " ") for t in _corpus()]
    learned, merges = _trained_bpe(texts, 700, pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(learned, key=learned.get):
        vocab.setdefault(piece, len(vocab))
    return vocab, merges


def save_mistral_tokenizer(path, style="legacy"):
    """Save a zephyr-7b-sft-full-like tokenizer into `path`: tokenizer.json plus a tokenizer_config.json with
    zephyr's settings (LlamaTokenizer, add_bos_token, no pad token, model_max_length 2048) and chat template.

    style "legacy": the tokenizer.json of Mistral-7B-v0.1 / zephyr (normalizer Prepend("\u2581") + Replace(" ",
        "\u2581"), no pre-tokenizer), which transformers 5 loads as it is (TokenizersBackend, for model_type
        mistral). Every text piece between special tokens gets a "\u2581": "</s>\\n<|assistant|>" is
        </s> \u2581 <0x0A> ..., as in zephyr's own SFT data.
    style "metaspace": what transformers 5's LlamaTokenizer builds (Metaspace, prepend_scheme "first")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    vocab, merges = _llama_vocab()
    if style == "legacy":
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")])
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", 1)])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True, legacy=False, add_bos_token=True)
    tok.save_pretrained(path)
    # As on the hub: the template inside tokenizer_config.json (no chat_template.jinja), zephyr's other settings.
    tc_path = os.path.join(path, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, legacy=style == "legacy",
              model_max_length=2048, chat_template=ZEPHYR_TEMPLATE)
    tc.pop("pad_token", None)
    json.dump(tc, open(tc_path, "w"), indent=2)
    if os.path.exists(os.path.join(path, "chat_template.jinja")):
        os.remove(os.path.join(path, "chat_template.jinja"))


def gpt2_tokenizer(vocab_size=600):
    """Like GPT-2's: byte-level BPE, <|endoftext|> is bos, eos and unk; no pad token; no template. At 600 it needs
    ~1.25x the tiny Mistral's tokens for English; at 1200, ~0.86x, as GPT-2's 50k vocabulary against Mistral's 32k."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer
    vocab, merges = _trained_bpe(_corpus(), vocab_size, pre_tokenizers.ByteLevel(add_prefix_space=False),
                                 special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def deberta_like_tokenizer():
    """A WordLevel tokenizer with DeBERTa's pair template, [CLS] x [SEP] y [SEP] (as test_ldalign.py's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(_corpus(), trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tk.token_to_id("[CLS]")), ("[SEP]", tk.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


# ----------------------------------------------------------------------------------------------------
# The folders and files of the paper's setting, tiny
# ----------------------------------------------------------------------------------------------------
def save_tiny_mistral(path, vocab_size):
    """A tiny zephyr: MistralForCausalLM (GQA, sliding_window 4096 as Mistral-7B-v0.1), stored in bf16."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                        sliding_window=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    MistralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def save_tiny_gpt2(path, n_positions, vocab_size=600):
    """The guide's backbone: a tiny GPT2LMHeadModel and its own byte-level tokenizer (not the policy's)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    gtok = gpt2_tokenizer(vocab_size)
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(gtok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=gtok.bos_token_id, eos_token_id=gtok.eos_token_id)).save_pretrained(path)
    gtok.save_pretrained(path)


def build_paper_inputs(root, guide_positions=256):
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification
    os.makedirs(root, exist_ok=True)
    p = {k: os.path.join(root, k) for k in ("policy", "guide", "rm")}
    p.update(data=os.path.join(root, "ultrachat_train.jsonl"), eval_data=os.path.join(root, "ultrachat_test.jsonl"),
             pref_data=os.path.join(root, "ultrafeedback_binarized.jsonl"))

    save_mistral_tokenizer(p["policy"], "legacy")
    save_tiny_mistral(p["policy"], len(AutoTokenizer.from_pretrained(p["policy"])))
    save_tiny_gpt2(p["guide"], guide_positions)

    rtok = deberta_like_tokenizer()  # the paper's RM is reward-model-deberta-v3-large-v2: a tiny DeBERTa-v2 here
    torch.manual_seed(2)
    rm_cfg = DebertaV2Config(vocab_size=len(rtok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=512, type_vocab_size=0,
                             relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
                             position_buckets=16, max_relative_positions=-1, norm_rel_ebd="layer_norm",
                             share_att_key=True, num_labels=1, pad_token_id=rtok.pad_token_id, initializer_range=0.2)
    DebertaV2ForSequenceClassification(rm_cfg).save_pretrained(p["rm"])
    rtok.save_pretrained(p["rm"])

    def dump(path, recs):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    dump(p["data"], [_conversation(i, q, a) for i, (q, a) in enumerate(QA[:N_TRAIN])])
    dump(p["eval_data"], [_conversation(i, q, a) for i, (q, a) in enumerate(QA[N_TRAIN:N_TRAIN + N_EVAL], N_TRAIN)])
    dump(p["pref_data"], [_preference(i, q, a) for i, (q, a) in enumerate(QA[:N_PREF])])
    return p


# ----------------------------------------------------------------------------------------------------
# The paper's lengths: max_len 1024, prompts up to 512 tokens, 256 new tokens, a guide of 1024 positions
# ----------------------------------------------------------------------------------------------------
LONG_SYSTEM = "You are a helpful assistant. Answer in detail, in plain English."
ACCENTED = "días café naïve résumé "  # more guide tokens than policy tokens (1.07x): the guide's limit binds first


def _words(n, start=0):
    """The first n words of the QA answers run together, from word `start` on (cycled)."""
    words = [w for _, a in QA for w in a.split()]
    return " ".join(words[(start + i) % len(words)] for i in range(n))


def _longest(make, fits):
    """make(n) for the largest n with fits(make(n)) (fits holds for n = 1 and fails from some n on)."""
    lo, hi = 1, 2
    while fits(make(hi)):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(make(mid)) else (lo, mid)
    return make(lo)


def build_long_records(root, policy, guide):
    """UltraChat-like files at the paper's lengths, in the tokens of `policy` and `guide` (HF folders): --data
    with 4 records that fit (one at 512 prompt tokens and 1024 in all, with a system turn; one at 512 prompt
    tokens and a short answer; two short) and 3 that do not (a prompt over 512, prompt + answer over 1024, and
    one whose guide input is over 1024 while its policy tokens fit); --eval_data with a prompt of 512 tokens, a
    short one and one over 512. Every record has four turns (the run reads the first exchange). Returns
    {"data", "eval_data", "fate": file:line -> "kept" or the reason it is skipped}."""
    from transformers import AutoTokenizer
    tok, gtok = AutoTokenizer.from_pretrained(policy), AutoTokenizer.from_pretrained(guide)
    L = dict(max_len=1024, max_prompt_len=512, max_new_tokens=256)

    def tokens(x, y, system=None):
        """(policy prompt, policy response, guide prompt, guide response) token counts."""
        gx, gy = dataset.guide_ids(gtok, x, y)
        return (len(dataset.prompt_ids(tok, x, system)), len(dataset.response_ids(tok, x, y, system)), len(gx),
                len(gy))

    def prompt_fits(system, limit=L["max_prompt_len"]):
        return lambda x: tokens(x, "ok", system)[0] <= limit

    def total_fits(x, system=None, limit=L["max_len"]):
        return lambda y: sum(tokens(x, y, system)[:2]) <= limit
    x512 = _longest(lambda n: "Please read these notes, then answer. " + _words(n), prompt_fits(LONG_SYSTEM))
    y512 = _longest(lambda n: _words(n, 300), total_fits(x512, LONG_SYSTEM))
    x512b = _longest(lambda n: "Summarize these notes. " + _words(n, 150), prompt_fits(None))
    over_prompt = x512b + " " + _words(20, 600)
    x300 = _words(150, 50)  # ~300 tokens
    over_total = _longest(lambda n: _words(n, 400), total_fits(x300)) + " " + _words(20, 700)
    xacc = _longest(lambda n: ACCENTED * n, prompt_fits(None, 420))
    yacc = _longest(lambda n: ACCENTED * n, total_fits(xacc))
    train = [(LONG_SYSTEM, x512, y512, "kept"), (None, x512b, QA[0][1], "kept"), (None, QA[1][0], QA[1][1], "kept"),
             (None, over_prompt, QA[2][1], "max_prompt_len"), (None, QA[3][0], QA[3][1], "kept"),
             (None, x300, over_total, "max_len"), (None, xacc, yacc, "guide")]
    held_out = [(LONG_SYSTEM, x512, "kept"), (None, QA[4][0], "kept"), (None, over_prompt, "max_prompt_len")]
    # each record's fate, as its counts say (what the test expects the run to find)
    for system, x, y, fate in train:
        px, py, gx, gy = tokens(x, y, system)
        over = {"max_prompt_len": px > 512, "max_len": px + py > 1024, "guide": gx + max(gy, 257) > 1024}
        assert [k for k, v in over.items() if v] == ([] if fate == "kept" else [fate]), (fate, px, py, gx, gy)
    assert tokens(x512, y512, LONG_SYSTEM)[0] >= 500 and sum(tokens(x512, y512, LONG_SYSTEM)[:2]) >= 1000

    def record(i, system, x, y):
        turns = [{"role": "user", "content": x}, {"role": "assistant", "content": y},
                 {"role": "user", "content": FOLLOW_UPS[i % 4]}, {"role": "assistant", "content": "Of course."}]
        return {"prompt": x, "prompt_id": f"{i:064x}",
                "messages": ([{"role": "system", "content": system}] if system else []) + turns}
    p = {"data": os.path.join(root, "long_train.jsonl"), "eval_data": os.path.join(root, "long_test.jsonl")}
    with open(p["data"], "w") as f:
        f.writelines(json.dumps(record(i, s, x, y)) + "\n" for i, (s, x, y, _) in enumerate(train))
    with open(p["eval_data"], "w") as f:
        f.writelines(json.dumps(record(i, s, x, "A short answer.")) + "\n" for i, (s, x, _) in enumerate(held_out))
    p["fate"] = {f"{p['data']}:{i}": r[-1] for i, r in enumerate(train, 1)}
    p["fate"].update({f"{p['eval_data']}:{i}": r[-1] for i, r in enumerate(held_out, 1)})
    return p


# ----------------------------------------------------------------------------------------------------
# Running ldalign.py
# ----------------------------------------------------------------------------------------------------
PAPER_T = 2
MAX_EXAMPLES = 32
AGREEMENT_N = 8
# The paper preset, shrunk to seconds on 2 CPU cores. What is left of the preset: RMSprop, grad_ckpt, a static
# KV cache for sampling (gen_static), overlength "skip", judge "reward", measure_S false, the policy / guide /
# reward model read from HF folders. --gen_compile false: the preset's compiled decode step costs minutes of
# inductor compiles on a CPU (and see test_compiled_decode_of_a_sliding_window_policy_compiles_once).
PAPER_RUN = ["--max_examples", str(MAX_EXAMPLES), "--max_len", "96", "--max_prompt_len", "48",
             "--max_new_tokens", "24", "--T", str(PAPER_T), "--epochs", "1", "--batch_size", "8",
             "--micro_batch_size", "4", "--gen_batch_size", "16",
             "--agreement_n", str(AGREEMENT_N), "--lr", "1e-4", "--guide_epochs", "1", "--guide_batch_size", "16",
             "--gen_compile", "false"]
TIMES = {}  # wall seconds per ldalign.py run, printed as each one ends (pytest -s)


def _paper_args(inputs, out, method="ldalign,dpo"):
    return ["--preset", "paper", "--out", out, "--policy", inputs["policy"], "--guide", inputs["guide"],
            "--data", inputs["data"], "--eval_data", inputs["eval_data"], "--pref_data", inputs["pref_data"],
            "--reward_model", inputs["rm"], "--method", method] + PAPER_RUN


def _paper_run(args, nproc=1, name=None, expect_rc=0, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env_extra or {}))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    t0 = time.time()
    p = subprocess.run(launcher + [os.path.join(HERE, "ldalign.py")] + args, cwd=HERE, env=env, timeout=600,
                       capture_output=True, text=True)
    if name:
        TIMES[name] = time.time() - t0
        print(f"[timing] {name}: {TIMES[name]:.1f}s", flush=True)
    assert p.returncode == expect_rc, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _first_turns(path):
    """file:line -> (first user turn, first assistant turn), read here independently of ldalign."""
    return {f"{path}:{i}": (r["messages"][0]["content"], r["messages"][1]["content"])
            for i, r in enumerate(_read_jsonl(path), 1)}


def _template_tokens(tok, x, y):
    """(prompt ids, golden response ids) straight from zephyr's template on the whole first exchange:
    BOS + tokens of "<|user|>\\nx</s>\\n<|assistant|>\\ny</s>\\n", split where the templated prompt ends, the
    response running up to and including the </s> after y (how the SFT data of zephyr was tokenized)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([{"role": "user", "content": x}, {"role": "assistant", "content": y}],
                                   tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):] == y + tok.eos_token + "\n"
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    f = [tok.bos_token_id] + tok(full, add_special_tokens=False)["input_ids"]
    assert f[:len(p)] == p, "the templated prompt's tokens are not a prefix of the conversation's"
    end = f.index(tok.eos_token_id, len(p))
    return p, f[len(p):end + 1]


def _check_paper_run(out, inputs, methods=("ldalign", "dpo")):
    """The run folder of a paper-preset run: what every process count must produce."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["preset"] == "paper" and cfg["optimizer"] == "rmsprop" and cfg["grad_ckpt"] and cfg["gen_static"]
    assert cfg["judge"] == "reward" and cfg["overlength"] == "skip" and cfg["measure_S"] is False

    # D = the first MAX_EXAMPLES records (their first user / assistant turns), minus the listed over-length ones
    turns = _first_turns(inputs["data"])
    skipped_path = os.path.join(out, "skipped.jsonl")
    skipped = _read_jsonl(skipped_path) if os.path.exists(skipped_path) else []
    skipped_train = {s["where"] for s in skipped if s["where"].startswith(inputs["data"] + ":")}
    kept = [w for w in list(turns)[:MAX_EXAMPLES] if w not in skipped_train]
    assert len(kept) >= MAX_EXAMPLES - 4, skipped  # most records fit the limits
    samples = _read_jsonl(os.path.join(out, "iter0", "samples.jsonl"))
    assert [s["where"] for s in samples] == kept
    for s in samples:  # x is the FIRST user turn, y the first assistant turn (not the later turns)
        assert (s["x"], s["y"]) == turns[s["where"]]
        assert 1 <= len(s["y_prime_ids"]) <= 24 and isinstance(s["y_prime"], str)

    # the guide: trained from the GPT-2 folder (its architecture and context), frozen, with its analyses
    g = os.path.join(out, "guide")
    for part in ("encoder", "decoder"):
        gc = json.load(open(os.path.join(g, part, "config.json")))
        src = json.load(open(os.path.join(inputs["guide"], "config.json")))
        assert gc["model_type"] == "gpt2" and gc["n_positions"] == src["n_positions"]
        assert gc["vocab_size"] == src["vocab_size"]
        assert os.path.exists(os.path.join(g, part, "model.safetensors"))
    assert os.path.exists(os.path.join(g, "latent.safetensors"))
    diag = json.load(open(os.path.join(g, "diagnostics.json")))
    assert all(math.isfinite(diag[k]) for k in ("nll_true_h", "nll_shuffled_h"))
    agr = json.load(open(os.path.join(g, "agreement.json")))
    assert agr["judge"] == "reward" and agr["n"] == AGREEMENT_N

    ref_tok = AutoTokenizer.from_pretrained(inputs["policy"])
    for method in methods:
        mdir = os.path.join(out, method)
        rows = _read_jsonl(os.path.join(mdir, "metrics.jsonl"))
        assert [r["iter"] for r in rows] == list(range(PAPER_T + 1))
        assert all(isinstance(r["reward"], float) and math.isfinite(r["reward"]) for r in rows)  # Section 5.1.3
        for t in range(1, PAPER_T + 1):
            it = os.path.join(mdir, f"iter{t}")
            if method in ("ldalign", "spin"):
                dist = _read_jsonl(os.path.join(it, "distances.jsonl"))
                assert [d["where"] for d in dist] == kept  # one s_i per pair of D
                s = torch.tensor([d["s"] for d in dist])
                assert (s >= 0).all() and torch.isfinite(s).all()
                summary = json.load(open(os.path.join(it, "distances.json")))
                assert summary["n"] == len(kept) and summary["S"] == pytest.approx(s.mean().item(), rel=1e-5)
                assert rows[t]["S"] == pytest.approx(summary["S"], rel=1e-6)
                assert summary["weights"]["mean"] == pytest.approx(1.0, rel=1e-4)
            else:
                assert rows[t]["S"] is None  # the preset's measure_S false
            ev = json.load(open(os.path.join(it, "eval.json")))
            assert ev["n"] == N_EVAL and isinstance(ev["reward"], float)
            # theta_t: an HF checkpoint of the policy's architecture, with the policy's tokenizer and template
            pol = os.path.join(it, "policy")
            conf = json.load(open(os.path.join(pol, "config.json")))
            assert conf["architectures"] == ["MistralForCausalLM"] and conf["model_type"] == "mistral"
            assert conf["sliding_window"] == 4096 and conf["num_key_value_heads"] == 2
            assert os.path.exists(os.path.join(pol, "model.safetensors"))
            assert not any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(pol))
            with safe_open(os.path.join(pol, "model.safetensors"), "pt") as f:  # fp32 master weights, not bf16
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
            tok = AutoTokenizer.from_pretrained(pol)
            assert tok.chat_template == ZEPHYR_TEMPLATE
            conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
            assert tok.apply_chat_template(conv, tokenize=False) == "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
            assert tok.eos_token == "</s>" and tok.bos_token == "<s>"
            text = QA[0][1] + "\n" + QA[3][1]
            assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]  # the same tokenizer as theta_0's
        model = AutoModelForCausalLM.from_pretrained(os.path.join(mdir, f"iter{PAPER_T}", "policy"))
        assert type(model).__name__ == "MistralForCausalLM"
        assert os.path.exists(os.path.join(mdir, "results.md"))
    if len(methods) > 1:
        assert os.path.exists(os.path.join(out, "comparison.md"))


def _check_dpo_reference_uses_template_tokens(out, inputs):
    """DPO's cached reference log-probs (theta_0, fixed) are those of the golden responses tokenized the way
    zephyr's template puts them after the prompt: recompute them here from _template_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(inputs["policy"])
    model = AutoModelForCausalLM.from_pretrained(inputs["policy"], dtype=torch.bfloat16).float().eval()
    skipped = {s["where"] for s in _read_jsonl(os.path.join(out, "skipped.jsonl"))} \
        if os.path.exists(os.path.join(out, "skipped.jsonl")) else set()
    recs = [(f"{inputs['pref_data']}:{i}", r) for i, r in enumerate(_read_jsonl(inputs["pref_data"]), 1)][:MAX_EXAMPLES]
    recs = [r for w, r in recs if w not in skipped]
    ref = json.load(open(os.path.join(out, "dpo", "ref_logps_theta0.json")))
    assert len(ref["chosen"]) == len(recs) == len(ref["rejected"])

    def logp(prompt, response):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        return lp[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum().item()
    for r, c, j in zip(recs, ref["chosen"], ref["rejected"]):
        px, pc = _template_tokens(tok, r["prompt"], r["chosen"][-1]["content"])
        _, pr = _template_tokens(tok, r["prompt"], r["rejected"][-1]["content"])
        assert logp(px, pc) == pytest.approx(c, abs=1e-3)
        assert logp(px, pr) == pytest.approx(j, abs=1e-3)
