"""LD-Align, Algorithm 1 of arXiv 2404.06390, line for line.

    python ldalign.py                                   # embedded default: toy sorting task, CPU, ~5 min
    python ldalign.py --method ldalign,spin,dpo,sft     # the paper's competing methods, same epochs and batch
    python ldalign.py --preset paper --data ultrachat_50k.jsonl --out runs/paper    # the paper's setting
    torchrun --nproc_per_node=8 ldalign.py --preset paper ...                       # the same, FSDP2 on 8 GPUs
    python ldalign.py --out runs/x --T 5                # any default below can be overridden as --key value

The script is a flat sequence of stages; each writes its result under --out and a rerun skips the
stages whose result is already there (kill it and start it again: it goes on from the last finished stage).

    out/config.json                 the settings of this call (and log.txt, everything printed)
    out/settings.json               what the stored stages depend on: a rerun with other values stops
    out/skipped.jsonl               (--overlength skip) every over-length record, file:line and why
    out/tokenizer/                  (tiny preset) the byte-level BPE trained on the shipped data
    out/sft/                        (tiny preset) theta_0: a tiny Llama SFT-ed on the data (HF safetensors)
    out/iter0/samples.jsonl         Algorithm 1, lines 1-3: y'_i ~ p_theta_0(.|x_i);  iter0/eval.json: theta_0
    out/guide/                      Algorithm 1, line 4: guide T = (phi, psi) (HF safetensors + latent.safetensors,
                                    guide_config.json), diagnostics.json (true / shuffled / same-prompt h),
                                    agreement.json (Section 5.2 (2))
    out/M/iter{t}/samples.jsonl     line 7: y'_i ~ p_theta_{t-1}(.|x_i)       (M = the method: ldalign, spin, dpo, sft;
                                    t = 1 reuses iter0/samples.jsonl unless --reuse_line2_samples false)
    out/M/iter{t}/distances.jsonl   line 8: s_i = ||phi(x_i, y_i) - phi(x_i, y'_i)||_2, and the weight s_i/S
    out/M/iter{t}/distances.json    line 9: S = mean_i s_i, and the distribution (Section 5.2 (1))
    out/M/iter{t}/train_metrics.jsonl  line 10: loss, rewards, grad norm per optimizer step
    out/M/iter{t}/policy/           line 10: theta_t (HF safetensors: any HF tool loads it)
    out/M/iter{t}/eval.json         greedy answers on held-out prompts: exact match, mean reward
    out/M/metrics.jsonl, results.md one line per iteration;  out/comparison.md when several methods ran
    out/dpo/ref_logps_theta0.json   (dpo) the fixed reference's log-probs, computed in iteration 1
"""
import contextlib
import datetime
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

import analysis
import dpo
import generate
import guide as guide_lib

# ----------------------------------------------------------------------------------------------------
# Defaults: the embedded toy run. Every key can be overridden on the command line as --key value.
# ----------------------------------------------------------------------------------------------------
DEFAULTS = dict(
    preset="tiny",            # "tiny" (toy sorting task, builds everything from configs) or "paper"
    out="runs/tiny",          # run folder: every stage writes here, a rerun resumes from here
    data="data/sort_train.jsonl",      # SFT set D, UltraChat-style JSONL: (x, y) = first user / assistant turn
    eval_data="data/sort_eval.jsonl",  # held-out prompts for greedy exact match ("" to skip)
    max_examples=2000,        # Algorithm 1 runs on the first N records of --data (0 = all); the paper: 50k.
                              # The tiny preset's SFT of theta_0 uses all records, as the paper's SFT uses
                              # all of UltraChat 200k and LD-Align a 50k subset (Section 5.1.1).
    max_eval=200,             # held-out prompts scored per iteration
    overlength="error",       # prompt/response longer than the limits: "error" (file:line) or "skip" (logged)
    seed=0,
    # theta_0, the policy: "tiny" = SFT a tiny Llama on D from scratch, else any HF causal LM path/id
    policy="tiny",
    max_len=64,               # prompt + response tokens
    max_prompt_len=32,        # prompt tokens (after the chat template)
    max_new_tokens=32,        # length cap of sampled y' (max_prompt_len + max_new_tokens <= max_len)
    # tiny SFT of theta_0 (tiny preset only): a weak model, leaves room for alignment to help
    sft_steps=600, sft_lr=3e-3, sft_batch_size=32,
    # sampling y' ~ p_theta(.|x) (Algorithm 1, lines 2 and 7)
    temperature=1.0, top_p=1.0, top_k=0, gen_batch_size=128,
    gen_static=False,         # generate.py with a StaticCache (fixed shapes) instead of a DynamicCache; same tokens
    gen_compile=False,        # torch.compile the decode step (needs gen_static; CUDA graphs on GPU): compiles once
                              # per sampling stage (tens of seconds), worth it when sampling thousands of prompts
    reuse_line2_samples=True,  # iteration 1 samples from theta_0, like lines 1-3: reuse those samples
    # guide T = (phi, psi) (Section 4.1): "tiny" = tiny GPT-2s from config, else a GPT-2 path/id ("gpt2")
    guide="tiny", latent_dim=32,
    guide_epochs=3, guide_lr=1e-3, guide_batch_size=32,
    # the LD-Align update (Algorithm 1, line 10, Eq. 4)
    T=3,                      # iterations; the paper reports LD-Align 0, 1, 2
    # The method, or several separated by commas, run one after the other from the same theta_0 and guide, each
    # T iterations of `epochs` epochs at the same batch (an equal budget when their pair sets are equally large;
    # comparison.md lists each one's optimizer steps): the paper's table rows (Section 5.1.4).
    #   ldalign  weights s/S, ref theta_{t-1}          spin  weights 1, same loop (SPIN)
    #   dpo      annotated pairs from --pref_data, ref theta_0 fixed     sft  continual SFT on D
    method="ldalign",
    pref_data="data/sort_pairs.jsonl",  # for dpo: JSONL with prompt, chosen, rejected (UltraFeedback binarized)
    measure_S=True,           # dpo / sft: also sample y' and compute S each iteration (a diagnostic only)
    beta=0.1,
    # On the toy task AdamW at 1e-5 improves held-out accuracy a little; 3e-5 and above, or RMSprop at
    # 1e-5, lower it (DPO pushes down the likelihood of y and y' alike and the tiny policy starts to drop
    # numbers). The paper preset keeps SPIN's RMSprop at 5e-7.
    lr=1e-5, optimizer="adamw", warmup_ratio=0.1, max_grad_norm=1.0,
    epochs=2, batch_size=32, micro_batch_size=32,
    grad_ckpt=False,          # activation checkpointing of the policy (saves memory on 7B)
    compile=False,            # torch.compile each transformer block of the policy (compile_blocks): faster steps
    log_every=10,
    # evaluation (Section 5.1.3) and the analyses of Section 5.2
    reward_model="",          # any HF sequence-classification reward model (the paper: reward-model-deberta-v3-large-v2)
    judge="toy",              # who judges the ranking-agreement analysis: "toy" (edit distance to y) or "reward"
    agreement_n=200,          # prompts of D for the ranking-agreement analysis (two samples each; 0 = skip)
    trust_remote_code=False,  # passed to from_pretrained; only for checkpoints whose code you trust
)

METHODS = ("ldalign", "spin", "dpo", "sft")

# A rerun with the same --out resumes: finished stages are read back, not recomputed. These are the settings the
# stored stages depend on; a rerun that changes one of them stops (check_settings) instead of mixing two runs.
# The others (T, method, micro-batch and sampling batch, compile flags, logging) may change between calls.
SHARED_KEYS = ("data", "max_examples", "overlength", "seed", "policy", "max_len", "max_prompt_len", "max_new_tokens",
               "sft_steps", "sft_lr", "sft_batch_size", "temperature", "top_p", "top_k",
               "guide", "latent_dim", "guide_epochs", "guide_lr", "guide_batch_size",  # theta_0, iter0/, guide/
               "eval_data", "max_eval", "reward_model", "judge", "agreement_n")  # every eval.json, agreement.json
METHOD_KEYS = ("reuse_line2_samples", "pref_data", "beta", "lr", "optimizer", "warmup_ratio", "max_grad_norm",
               "epochs", "batch_size")  # <method>/iter*/: each method its own (a later call may run dpo at its lr)

PRESETS = {
    "tiny": {},
    # The paper's setting (Section 5.1): zephyr-7b-sft-full (Mistral-7B SFT on UltraChat 200k), a GPT-2
    # guide, a 50k subset of UltraChat, beta 0.1, three iterations. What the paper leaves open follows SPIN
    # (lr 5e-7, RMSprop, 2 epochs, global batch 64, max length 1024, prompt 512, 256 new tokens).
    "paper": dict(
        out="runs/paper", policy="alignment-handbook/zephyr-7b-sft-full", guide="gpt2",
        data="data/ultrachat_50k.jsonl", eval_data="", max_examples=50000, overlength="skip",
        max_len=1024, max_prompt_len=512, max_new_tokens=256, temperature=1.0, gen_batch_size=64,
        gen_static=True, gen_compile=True,
        latent_dim=64, guide_epochs=1, guide_lr=5e-5, guide_batch_size=32,
        T=3, beta=0.1, lr=5e-7, optimizer="rmsprop", epochs=2, batch_size=64, micro_batch_size=2,
        grad_ckpt=True, log_every=10, pref_data="data/ultrafeedback_binarized.jsonl", measure_S=False,
        judge="reward", reward_model="OpenAssistant/reward-model-deberta-v3-large-v2", agreement_n=500),
}


def read_overrides(argv, defaults, help_text):
    """Command-line `--key value`, `--key=value` or a bare `--flag` (= true), keys checked against `defaults`,
    values typed like the default. -h / --help prints help_text. Shared with bench.py."""
    if "-h" in argv or "--help" in argv:
        print(help_text)
        raise SystemExit(0)
    raw, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise SystemExit(f"bad argument {a!r}: use --key value (keys: {', '.join(defaults)})")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            k, v = a[2:], argv[i + 1]
            i += 2
        else:
            k, v = a[2:], "true"  # bare flag
            i += 1
        if k not in defaults:
            raise SystemExit(f"unknown option --{k}; known: {', '.join(defaults)}")
        d = defaults[k]
        if isinstance(d, bool):
            if v.lower() not in ("1", "0", "true", "false"):
                raise SystemExit(f"--{k} takes true/false, got {v!r}")
            raw[k] = v.lower() in ("1", "true")
        else:
            try:
                raw[k] = type(d)(v)
            except ValueError:
                raise SystemExit(f"--{k} takes a {type(d).__name__}, got {v!r}") from None
    return raw


def parse_args(argv):
    """nanoGPT-style: defaults above, then the preset, then --key value pairs (typed like the default)."""
    src = open(os.path.abspath(__file__)).read()
    pairs = read_overrides(argv, DEFAULTS, __doc__ + "\n" + src[src.index("DEFAULTS = dict("):src.index("\ndef read_overrides")])
    preset = pairs.get("preset", DEFAULTS["preset"])
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}: {', '.join(PRESETS)}")
    cfg = dict(DEFAULTS, **PRESETS[preset])
    cfg.update(pairs)
    for m in cfg["method"].split(","):
        if m not in METHODS:
            raise SystemExit(f"--method takes {', '.join(METHODS)} (or several, comma-separated), got {m!r}")
    if cfg["judge"] not in ("toy", "reward") or (cfg["judge"] == "reward" and not cfg["reward_model"]):
        raise SystemExit("--judge is 'toy' or 'reward' (which needs --reward_model)")
    if cfg["gen_compile"] and not cfg["gen_static"]:
        raise SystemExit("--gen_compile true needs --gen_static true (a compiled decode step needs fixed shapes)")
    if cfg["overlength"] not in ("error", "skip"):
        raise SystemExit(f"--overlength is 'error' or 'skip', got {cfg['overlength']!r}")
    if cfg["temperature"] < 0 or not 0 < cfg["top_p"] <= 1 or cfg["top_k"] < 0:  # -1 would sample the argmin
        raise SystemExit("sampling needs --temperature >= 0 (0 = greedy), 0 < --top_p <= 1, --top_k >= 0 (0 = off)")
    if cfg["max_prompt_len"] + cfg["max_new_tokens"] > cfg["max_len"]:
        raise SystemExit("need max_prompt_len + max_new_tokens <= max_len (a sampled y' must fit in training)")
    return cfg


def check_settings(path, cfg, methods, rank):
    """settings.json: {"shared": SHARED_KEYS, <method>: METHOD_KEYS, ...} as the stored stages were computed.
    A section is written the first time it is needed; a rerun (resume) whose settings differ from a stored
    section stops here, before any compute and without touching what is stored."""
    want = {"shared": {k: cfg[k] for k in SHARED_KEYS}, **{m: {k: cfg[k] for k in METHOD_KEYS} for m in methods}}
    had = json.load(open(path)) if os.path.exists(path) else {}
    diff = [f"{sec}: --{k} {had[sec].get(k)!r} -> {v!r}" for sec, kv in want.items() if sec in had
            for k, v in kv.items() if had[sec].get(k) != v]
    if diff:
        raise SystemExit(f"{path}: this run folder's finished stages were computed with other settings "
                         f"({'; '.join(diff)}); a rerun would reuse them with the new ones. Pass the old values, "
                         f"or a new --out (or delete {path} to reuse them anyway).")
    if rank == 0 and any(sec not in had for sec in want):
        write_atomic(path, json.dumps(dict(had, **want), indent=2))


# ----------------------------------------------------------------------------------------------------
# Distributed: init, FSDP2 wrapping, rank-0 guard, and the two named gathers. Nothing else knows about it.
# ----------------------------------------------------------------------------------------------------
def init_distributed():
    """Same script under `python` (one process) and `torchrun` (one process per GPU, or per CPU worker)."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        # 60 minutes, not NCCL's default 10, before a collective gives up: the other ranks wait in a barrier
        # while rank 0 alone writes a 7B checkpoint (29 GB of fp32), which a slow disk can stretch past 10.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60),
                                device_id=torch.device("cuda", local_rank) if cuda else None)
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if cuda else "cpu")


def transformer_blocks(model):
    """The decoder blocks of an HF model (LlamaDecoderLayer, MistralDecoderLayer, GPT2Block, ...), found by
    HF's own `_no_split_modules`: the unit that fsdp_wrap shards and compile_blocks compiles."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def fsdp_wrap(model, device):
    """FSDP2: shard every transformer block, then the root (embeddings, final norm, head, extra layers).

    Block classes come from HF's own `_no_split_modules` (LlamaDecoderLayer, MistralDecoderLayer,
    GPT2Block, ...). On GPU, bf16 compute with fp32 master weights and fp32 gradient reduction; the fp32
    output cast goes on the root only (on a block it would feed fp32 into the next bf16 block's norm).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = device.type == "cuda"
    block_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   output_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for m in transformer_blocks(model):
        fully_shard(m, mesh=mesh, mp_policy=block_mp)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    return model


def load_policy(path, cfg, device, world):
    """A policy checkpoint, ready to sample and train: fp32 master weights on `device` (FSDP2-sharded when
    world > 1, whose mixed precision then computes in bf16), activation checkpointing / compiled blocks per cfg.

    theta_0 from outside (--policy) loads in the dtype it is stored in ("auto": zephyr's bf16 weights are 14 GB
    per process in CPU memory, not 28; the cast to fp32 below is exact). The checkpoints this run writes
    (theta_t, the toy theta_0) hold fp32 master weights and load as fp32 whatever their config.json says
    (zephyr's says bfloat16): a bf16 round trip on resume would erase most of an iteration's update, since at
    lr 5e-7 a weight moves far less than bf16's spacing (2^-8 of its size).
    """
    from transformers import AutoModelForCausalLM
    dtype = "auto" if path == cfg["policy"] else torch.float32
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg["trust_remote_code"])
    if cfg["grad_ckpt"]:
        m.gradient_checkpointing_enable()  # recompute activations in backward; HF turns the cache off in training only
    if cfg["compile"]:
        compile_blocks(m)
    if world > 1:
        m = fsdp_wrap(m, device)
    return m.to(device=device, dtype=torch.float32)


def compile_blocks(model):
    """torch.compile every transformer block in place, for the policy update (`--compile true`).

    Per block, not the whole model: the blocks are identical, so one compiled graph serves them all, and
    FSDP2's per-block hooks (all-gather before, reshard after) stay outside the graphs. Compiling fuses the
    elementwise work around the matmuls (RMSNorm, rotary, SwiGLU, residuals) that eager mode runs as
    separate memory-bound kernels. In place (`module.compile()`), so parameter names and checkpoints are
    unchanged. Call before fsdp_wrap (as torchtitan does).
    """
    for m in transformer_blocks(model):
        m.compile()


class gathered_weights:
    """Keep FSDP2 weights unsharded for a run of forward calls (generation, scoring), then reshard.

    Without it FSDP2 all-gathers every block's weights at every decode step. unshard/reshard are not
    recursive, so every FSDP module is switched. A no-op for an unsharded model.
    The root (embeddings, final norm, head) is left at FSDP2's own setting: it never reshards after forward
    (its weights are needed again at once in backward). Setting it back to True on exit, as for the blocks,
    would make every later training micro-batch all-gather the root a second time in backward.
    """

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule
        self.mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.blocks = [m for m in self.mods if m is not model]  # set_reshard_after_forward: blocks only

    def __enter__(self):
        for m in self.blocks:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self.mods:
            m.unshard()

    def __exit__(self, *exc):
        for m in self.mods:
            m.reshard()
        for m in self.blocks:
            m.set_reshard_after_forward(True, recurse=False)  # fsdp_wrap's setting for the blocks


def gather_floats(local_values, local_idx, n, device):
    """Named all-reduce: every rank scored its indices; sum into one (n,) tensor known to all ranks."""
    full = torch.zeros(n, dtype=torch.float64, device=device)
    full[torch.as_tensor(local_idx, dtype=torch.long, device=device)] = local_values.to(device, torch.float64)
    if dist.is_initialized():
        dist.all_reduce(full, op=dist.ReduceOp.SUM)
    return full.float().cpu()


def gather_lists(local_items, local_idx, n):
    """Named all-gather of Python lists (sampled token ids), reassembled in data-set order."""
    out = [None] * n
    parts = [(local_idx, local_items)]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (local_idx, local_items))
    for idx, items in parts:
        for i, item in zip(idx, items):
            out[i] = item
    return out


def shard_indices(n, rank, world):
    """This rank's indices rank, rank+world, ...; padded by repeating so every rank has the same count
    (equal numbers of forward calls on every rank, or FSDP collectives hang). Returns (padded, n_real)."""
    idx = list(range(rank, n, world))
    n_real = len(idx)
    per_rank = math.ceil(n / world)
    while len(idx) < per_rank:
        idx.append(idx[-1] if idx else 0)
    return idx, n_real


# ----------------------------------------------------------------------------------------------------
# Files: atomic writes, so a killed run never leaves a half-written result that a rerun would trust.
# ----------------------------------------------------------------------------------------------------
def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_distances(it_dir):
    """The s_i an iteration folder stored (distances.jsonl, Algorithm 1 line 8) as an (N,) tensor, or None."""
    path = os.path.join(it_dir, "distances.jsonl")
    return torch.tensor([r["s"] for r in read_jsonl(path)]) if os.path.exists(path) else None


def save_hf(model, tokenizer, out_dir, rank):
    """Save a causal LM as an HF checkpoint (config.json + model.safetensors + tokenizer), atomically.

    Under FSDP2 the full state dict is gathered to rank 0's CPU first (every rank must call this).
    """
    state_dict = None
    if dpo.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tmp = out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state_dict)  # safetensors is the default format
        cfg_path = os.path.join(tmp, "config.json")
        cfg = json.load(open(cfg_path))
        # FSDP2 renames the class (FSDPLlamaForCausalLM); store the real architecture name.
        cfg["architectures"] = [a[4:] if a.startswith("FSDP") else a for a in cfg.get("architectures") or []]
        write_atomic(cfg_path, json.dumps(cfg, indent=2))
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# Data: D = {(x_i, y_i)} from UltraChat-style JSONL, validated before any compute.
# ----------------------------------------------------------------------------------------------------
def jsonl_records(path, what):
    """Yield ("file:line", record) for each non-blank line of a JSONL file; a line that is not a JSON object
    raises ValueError naming file:line. Shared by the SFT and the preference data loaders."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} file not found")
    with open(path, "rb") as f:  # bytes: a bad UTF-8 sequence is then reported with its line like any other error
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry no record
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec


def load_sft_jsonl(path, max_examples=0):
    """Read (x, y) = (first user turn, first assistant turn) of each record; errors name file:line.

    A record is {"messages": [{"role": "user", "content": x}, {"role": "assistant", "content": y}, ...]}
    (UltraChat 200k's layout; later turns are ignored, as SPIN and the paper's 50k subset do), or
    {"prompt": x, "response": y}. Returns a list of dicts {x, y, where} where `where` is "file:line".
    """
    out = []
    for where, rec in jsonl_records(path, "data"):
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs[:2]):
                raise ValueError(f"{where}: 'messages' must be a list starting with a user and an assistant turn")
            if msgs[0].get("role") != "user" or msgs[1].get("role") != "assistant":
                raise ValueError(f"{where}: the first two messages must have roles 'user' then 'assistant', got "
                                 f"{msgs[0].get('role')!r} then {msgs[1].get('role')!r}")
            x, y = msgs[0].get("content"), msgs[1].get("content")
        elif "prompt" in rec and "response" in rec:
            x, y = rec["prompt"], rec["response"]
        else:
            raise ValueError(f"{where}: missing field 'messages' (or 'prompt' and 'response')")
        for name, v in (("prompt (user turn)", x), ("response (assistant turn)", y)):
            if not isinstance(v, str):
                raise ValueError(f"{where}: {name} must be a string, got {type(v).__name__}")
            if not v.strip():
                raise ValueError(f"{where}: {name} is empty")
        out.append({"x": x, "y": y, "where": where})
        if max_examples and len(out) >= max_examples:
            break
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def load_pref_jsonl(path, max_examples=0):
    """Annotated preference pairs for `--method dpo`: (x, chosen, rejected) with errors naming file:line.

    A record is UltraFeedback-binarized style, {"prompt": x, "chosen": [messages], "rejected": [messages]}
    (the response is the last assistant message of each list), or {"prompt": x, "chosen": str, "rejected": str}.
    """
    out = []
    for where, rec in jsonl_records(path, "preference data (needed by --method dpo)"):
        if not all(k in rec for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"{where}: a preference record needs the fields 'prompt', 'chosen' and 'rejected'")
        texts = {"prompt": rec["prompt"]}
        for k in ("chosen", "rejected"):
            v = rec[k]
            if isinstance(v, list):  # a conversation: the answer is its last assistant turn
                turns = [m.get("content") for m in v if isinstance(m, dict) and m.get("role") == "assistant"]
                if not turns:
                    raise ValueError(f"{where}: '{k}' has no assistant message")
                v = turns[-1]
            texts[k] = v
        for k, v in texts.items():
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{where}: '{k}' must be a non-empty string")
        out.append({"x": texts["prompt"], "chosen": texts["chosen"], "rejected": texts["rejected"], "where": where})
        if max_examples and len(out) >= max_examples:
            break
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def tokenize_pref(records, tok, cfg, skipped):
    """Policy tokens of (x, chosen, rejected), with the same length checks as tokenize_data."""
    kept = []
    for r in records:
        px, pc, pr = prompt_ids(tok, r["x"]), response_ids(tok, r["x"], r["chosen"]), response_ids(tok, r["x"], r["rejected"])
        if not too_long(r["where"], length_problems(px, [pc, pr], cfg), cfg, skipped):
            kept.append((px, pc, pr))
    if not kept:
        raise ValueError(f"{cfg['pref_data']}: every record is over-length")
    return kept


def length_problems(px, responses, cfg):
    """What is over the limits in a prompt and its responses (policy tokens)."""
    problems = []
    if len(px) > cfg["max_prompt_len"]:
        problems.append(f"prompt has {len(px)} tokens > max_prompt_len={cfg['max_prompt_len']}")
    n = len(px) + max(len(r) for r in responses)
    if n > cfg["max_len"]:
        problems.append(f"prompt + response have {n} tokens > max_len={cfg['max_len']}")
    return problems


def too_long(where, problems, cfg, skipped):
    """--overlength error: raise naming file:line; skip: record it in `skipped` (skipped.jsonl). True if dropped."""
    if not problems:
        return False
    if cfg["overlength"] == "error":
        raise ValueError(f"{where}: {'; '.join(problems)} (raise the limits or pass --overlength skip)")
    skipped.append({"where": where, "why": "; ".join(problems)})
    return True


def prompt_ids(tokenizer, x):
    """The chat-templated prompt, as token ids: THE one function used for generation AND training.

    SPIN's public code generates with one prompt format and trains with another; a policy then learns
    from sequences it never produces. Here both paths call this function, so x's tokens are identical.
    """
    ids = tokenizer(prompt_text(tokenizer, x), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids  # exactly one BOS, whether or not the template writes it
    return ids


def prompt_text(tokenizer, x):
    """x in the policy's chat template, ending where the assistant's answer begins."""
    return tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True, tokenize=False)


def response_ids(tokenizer, x, y):
    """Golden response tokens as they follow x's prompt in one text, ending with EOS so the policy learns to stop.

    y is tokenized together with its templated prompt and cut at the prompt's length: that is how the SFT data
    was tokenized (whole conversations) and how the policy's samples y' come out. Tokenized alone, a SentencePiece
    tokenizer (Llama, Mistral / zephyr) starts y with a word-start piece ("_Hello") that the policy never emits
    after "<|assistant|>\n" ("Hello"): every golden y would differ from every sampled y' in its first token, a
    difference DPO learns at once and that says nothing about quality. (TRL's DPOTrainer splits the same way.)
    Where the prompt's last token would merge with y's first characters, there is no clean cut, and y is
    tokenized alone: the policy only ever continues the prompt's own tokens.
    """
    text = prompt_text(tokenizer, x)
    p = tokenizer(text, add_special_tokens=False)["input_ids"]
    both = tokenizer(text + y, add_special_tokens=False)["input_ids"]
    ids = both[len(p):] if both[:len(p)] == p else tokenizer(y, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def tokenize_data(records, tok, gtok, cfg, log):
    """Tokenize D for the policy (chat template) and the guide (plain text); check lengths up front.

    Over-length records raise with file:line (--overlength error) or are dropped and listed
    (--overlength skip), so a 7B run never dies on record 40,000 hours in.
    """
    kept, skipped = [], []
    for r in records:
        px, py = prompt_ids(tok, r["x"]), response_ids(tok, r["x"], r["y"])
        gx, gy = guide_ids(gtok, r["x"], r["y"])
        problems = length_problems(px, [py], cfg)
        if len(gx) + max(len(gy), cfg["max_new_tokens"] + 1) > cfg["guide_max_len"]:
            problems.append(f"guide input would exceed the guide's {cfg['guide_max_len']} positions")
        if not too_long(r["where"], problems, cfg, skipped):
            kept.append(dict(r, px=px, py=py, gx=gx, gy=gy))
    if skipped:
        log(f"skipped {len(skipped)} over-length records (listed in skipped.jsonl); kept {len(kept)}")
    if not kept:
        src = records[0]["where"].rsplit(":", 1)[0] if records else cfg["data"]  # --data or --eval_data
        raise ValueError(f"{src}: every record is over-length")
    return kept, skipped


def guide_ids(gtok, x, y):
    """The guide reads plain text, x then y (no chat template: GPT-2 has none); y ends with EOS (guide_triples
    removes it again from a sample y' that the length cap cut off before its EOS)."""
    gx = gtok(x + "\n", add_special_tokens=False)["input_ids"]
    gy = gtok(y, add_special_tokens=False)["input_ids"] + [gtok.eos_token_id]
    return gx, gy


# ----------------------------------------------------------------------------------------------------
# The embedded default: tokenizer and tiny models built from configs (no hub downloads).
# ----------------------------------------------------------------------------------------------------
TOY_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
                "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def train_toy_tokenizer(texts, vocab_size=300):
    """A real byte-level BPE trained with `tokenizers` on the shipped data, wrapped as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>")
    tok.chat_template = TOY_TEMPLATE
    return tok


def tiny_policy_config(tok, max_len):
    """About 0.83M parameters: learns the sorting task only partly after the short SFT (room to improve)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(128, max_len),
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=True)


def tiny_guide_config(gtok, n_positions):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=len(gtok), n_embd=64, n_layer=2, n_head=4, n_positions=n_positions,
                      bos_token_id=gtok.bos_token_id, eos_token_id=gtok.eos_token_id)


def place_guide(guide, device, world):
    """Move the guide to the device; under torchrun shard it like the policy. encode / recon_nll are
    called directly (not through forward), so FSDP2 must be told to all-gather around them too."""
    guide = guide.to(device)
    if world > 1:
        from torch.distributed.fsdp import register_fsdp_forward_method
        guide = fsdp_wrap(guide, device)
        register_fsdp_forward_method(guide, "encode")
        register_fsdp_forward_method(guide, "recon_nll")
    return guide


def save_guide_ckpt(guide, guide_src, latent_dim, guide_dir, diag, rank):
    """Save the guide with guide.save_guide (rank 0 writes). Under FSDP2 every rank joins the gather of
    the full state dict, which rank 0 loads into a plain, unsharded copy."""
    plain = guide
    if dpo.is_fsdp(guide):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(guide, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            plain = guide_lib.build_guide(guide_src, latent_dim)
            plain.load_state_dict(sd)
    if rank == 0:
        guide_lib.save_guide(plain, guide_dir)
        write_atomic(os.path.join(guide_dir, "diagnostics.json"), json.dumps(diag, indent=1))
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# Stages used inside Algorithm 1
# ----------------------------------------------------------------------------------------------------
def sample_stage(model, tok, data, path, cfg, seed, ctx, greedy=False, what="y'"):
    """Algorithm 1, lines 2 / 7: one response per prompt from the current policy; every rank samples its
    share, all ranks end with all samples; rank 0 writes them. Skipped when `path` already exists."""
    if path and os.path.exists(path):  # written atomically: if it is there, it is complete
        recs = read_jsonl(path)
        if [r["x"] for r in recs] != [d["x"] for d in data]:
            raise SystemExit(f"{path} holds samples for other prompts than the {len(data)} of {cfg['data']} (was the "
                             "file changed?); delete it, or use a new --out")
        ctx["log"](f"[skip] {path} exists")
        return [r["y_prime_ids"] for r in recs]
    rank, world, device = ctx["rank"], ctx["world"], ctx["device"]
    idx, n_real = shard_indices(len(data), rank, world)
    t0 = time.time()
    model.eval()
    # --compile compiles the blocks for training; decoding into a DynamicCache changes their input shapes at
    # every token (a recompilation each time), so unless the decode step itself is compiled (--gen_compile,
    # fixed shapes) the sampler runs the blocks eagerly.
    eager = torch.compiler.set_stance("force_eager") if cfg["compile"] and not cfg["gen_compile"] else contextlib.nullcontext()
    bs = cfg["gen_batch_size"]
    n_batches = math.ceil(len(idx) / bs)

    def progress(done_local, _):  # at about 25/50/75/100%
        k = math.ceil(done_local / bs)
        if k == n_batches or k % max(1, n_batches // 4) == 0:
            ctx["log"](f"  sampling {what}: {min(done_local * world, len(data))}/{len(data)} prompts, {time.time() - t0:.0f}s")
    with gathered_weights(model), dpo.autocast(device, model), eager:
        local = generate.sample_responses(
            model, [data[i]["px"] for i in idx], batch_size=bs, max_new_tokens=cfg["max_new_tokens"],
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,  # main() sets a pad token if missing
            temperature=0.0 if greedy else cfg["temperature"], top_p=cfg["top_p"], top_k=cfg["top_k"],
            seed=seed * 100003 + rank * 1009, device=device, static=cfg["gen_static"], compile=cfg["gen_compile"],
            progress=progress)
    ids = gather_lists(local[:n_real], idx[:n_real], len(data))
    if path and rank == 0:
        write_jsonl(path, [{"where": d["where"], "x": d["x"], "y": d["y"],
                            "y_prime": tok.decode(y, skip_special_tokens=True), "y_prime_ids": y}
                           for d, y in zip(data, ids)])
    return ids


def evaluate(model, tok, eval_data, path, cfg, ctx, rm=None):
    """Greedy answers on held-out prompts: exact match (meaningful on checkable tasks such as the toy) and,
    with --reward_model, the mean reward r = RM(x, y) of Section 5.1.3. Returns {"exact_match", "reward"}."""
    if not eval_data:
        return {"exact_match": None, "reward": None}
    if os.path.exists(path):
        res = json.load(open(path))
        return {"exact_match": res["exact_match"], "reward": res.get("reward")}
    ids = sample_stage(model, tok, eval_data, None, cfg, 0, ctx, greedy=True, what="greedy eval answers")
    answers = [tok.decode(y, skip_special_tokens=True).strip() for y in ids]
    hits = [a == d["y"].strip() for a, d in zip(answers, eval_data)]
    rewards = score_rewards(rm, [d["x"] for d in eval_data], answers, ctx).tolist() if rm else None
    res = {"exact_match": sum(hits) / len(hits), "reward": None if rewards is None else sum(rewards) / len(rewards)}
    if ctx["rank"] == 0:
        write_atomic(path, json.dumps(dict(res, n=len(hits), examples=[
            {"x": d["x"], "golden": d["y"], "answer": a, "correct": h, "reward": None if rewards is None else rewards[i]}
            for i, (d, a, h) in enumerate(list(zip(eval_data, answers, hits))[:20])]), indent=1))
    return res


def score_rewards(rm, prompts, responses, ctx):
    """Section 5.1.3: r = RM(x, y) with an HF sequence-classification reward model (kept on the CPU between
    uses so it takes no GPU memory during training). Every rank scores everything: it is small and cheap."""
    model, rtok = rm
    model.to(ctx["device"])
    r = analysis.reward_scores(model, rtok, prompts, responses, device=ctx["device"])
    model.to("cpu")
    return r


def distances_stage(guide, triples, cfg, ctx, pad_id):
    """Algorithm 1, line 8 for a list of (x, y, y') in guide tokens: every rank encodes its share, all get all."""
    rank, world, device = ctx["rank"], ctx["world"], ctx["device"]
    idx, n_real = shard_indices(len(triples), rank, world)
    with gathered_weights(guide), dpo.autocast(device, guide):
        s_local = guide_lib.latent_distances(guide, [triples[i] for i in idx], batch_size=cfg["guide_batch_size"],
                                             pad_id=pad_id, device=device)
    return gather_floats(s_local[:n_real], idx[:n_real], len(triples), device)


def agreement_stage(model, tok, gtok, guide, data, cfg, ctx, path, rm):
    """Section 5.2 (2): for each prompt sample two responses y'_a, y'_b; the one farther from y in the latent
    space is ranked lower; a judge ranks them too; report how often the two rankings agree.
    The paper's judge is GPT-4; here "toy" = closeness to the golden answer (0 for an exact match, else minus
    the word edit distance), or "reward" = the reward model."""
    if os.path.exists(path):
        return json.load(open(path))
    sub = data[:cfg["agreement_n"]]
    ya = sample_stage(model, tok, sub, None, cfg, cfg["seed"] + 7, ctx, what="y'_a")
    yb = sample_stage(model, tok, sub, None, cfg, cfg["seed"] + 8, ctx, what="y'_b")
    sa = distances_stage(guide, guide_triples(sub, tok, gtok, ya, cfg["guide_max_len"]), cfg, ctx, gtok.eos_token_id)
    sb = distances_stage(guide, guide_triples(sub, tok, gtok, yb, cfg["guide_max_len"]), cfg, ctx, gtok.eos_token_id)
    ta = [tok.decode(y, skip_special_tokens=True).strip() for y in ya]
    tb = [tok.decode(y, skip_special_tokens=True).strip() for y in yb]
    if cfg["judge"] == "toy":
        ja = [analysis.toy_judge(a, d["y"]) for a, d in zip(ta, sub)]
        jb = [analysis.toy_judge(b, d["y"]) for b, d in zip(tb, sub)]
    else:
        ja = score_rewards(rm, [d["x"] for d in sub], ta, ctx).tolist()
        jb = score_rewards(rm, [d["x"] for d in sub], tb, ctx).tolist()
    same = [a == b for a, b in zip(ya, yb)]  # identical samples: a tie, whatever rounding does to their scores
    res = dict(analysis.ranking_agreement(sa.tolist(), sb.tolist(), ja, jb, same=same), judge=cfg["judge"])
    if ctx["rank"] == 0:
        write_atomic(path, json.dumps(dict(res, examples=[
            {"x": d["x"], "y": d["y"], "a": a, "b": b, "s_a": float(x), "s_b": float(y), "judge_a": p, "judge_b": q}
            for d, a, b, x, y, p, q in list(zip(sub, ta, tb, sa, sb, ja, jb))[:20]]), indent=1))
    return res


def die_at(stage):
    """Test hook for the resume tests: LDALIGN_DIE_AT=<stage> kills the process there, as a crash or a
    pre-empted job would (no cleanup, no atexit). Stages: sft, samples0, guide, <method>.iter<t>.train / .eval."""
    if os.environ.get("LDALIGN_DIE_AT") == stage:
        print(f"LDALIGN_DIE_AT={stage}: killing the run here", flush=True)
        os._exit(137)


def guide_triples(data, tok, gtok, y_prime_ids, guide_max_len):
    """(x, y, y') in the guide's own tokens: y' is decoded from the policy's ids and re-encoded.

    The guide's tokenizer (GPT-2's) can need more tokens for y' than the policy's did, so y' is cut to
    the guide's context (golden y was checked against it up front, in tokenize_data)."""
    out = []
    for d, yp in zip(data, y_prime_ids):
        gyp = guide_ids(gtok, d["x"], tok.decode(yp, skip_special_tokens=True))[1]
        if not yp or yp[-1] != tok.eos_token_id:
            gyp = gyp[:-1]  # cut off at max_new_tokens: no EOS, so the guide sees an unfinished answer as one
        out.append((d["gx"], d["gy"], gyp[:guide_max_len - len(d["gx"])]))
    return out


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world, device = init_distributed()
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "log.txt")

    def log(msg):
        """Rank-0 guard: one process prints and writes the log."""
        if rank == 0:
            print(msg, flush=True)
            with open(log_path, "a") as f:
                f.write(msg + "\n")

    ctx = dict(rank=rank, world=world, device=device, log=log)
    torch.manual_seed(cfg["seed"])
    log(f"LD-Align | preset={cfg['preset']} method={cfg['method']} T={cfg['T']} | {world} process(es) on {device}")
    if rank == 0:
        write_atomic(os.path.join(out, "config.json"), json.dumps(cfg, indent=2))  # all of this call's settings

    # ------------------------------------------------------------------------------------------------
    # Require: D = {(x_i, y_i)}, guide T = (phi, psi), LLM theta_0. Everything is read and checked here,
    # before any compute: a bad line fails now, naming file:line.
    # ------------------------------------------------------------------------------------------------
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our own progress lines are enough

    tiny = cfg["policy"] == "tiny"
    records = load_sft_jsonl(cfg["data"], 0 if tiny else cfg["max_examples"])
    eval_records = load_sft_jsonl(cfg["eval_data"], cfg["max_eval"]) if cfg["eval_data"] else []
    tok_dir = os.path.join(out, "tokenizer")
    if tiny:
        if rank == 0 and not os.path.isdir(tok_dir):
            texts = [t for r in records for t in (r["x"], r["y"])]
            tok = train_toy_tokenizer(texts)
            tok.save_pretrained(tok_dir + ".tmp")
            shutil.rmtree(tok_dir, ignore_errors=True)
            os.replace(tok_dir + ".tmp", tok_dir)
        if dist.is_initialized():
            dist.barrier()  # on every rank, whatever it saw: a rank that found the folder already written by a
            # fast rank 0 and skipped the barrier would leave rank 0 waiting in it forever
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = AutoTokenizer.from_pretrained(cfg["policy"], trust_remote_code=cfg["trust_remote_code"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked everywhere; any id will do
    if cfg["guide"] == "tiny":
        gtok = tok  # the toy guide reads the toy tokenizer's ids
        guide_src = tiny_guide_config(gtok, n_positions=2 * cfg["max_len"])
        cfg["guide_max_len"] = guide_src.n_positions
    else:
        gtok = AutoTokenizer.from_pretrained(cfg["guide"])
        guide_src = cfg["guide"]
        cfg["guide_max_len"] = GPT2Config.from_pretrained(cfg["guide"]).n_positions
    data, skipped = tokenize_data(records, tok, gtok, cfg, log)
    eval_data, eval_skipped = tokenize_data(eval_records, tok, gtok, cfg, log) if eval_records else ([], [])
    skipped += eval_skipped  # one skipped.jsonl for every file; each entry names its file:line
    sft_pairs = [(d["px"], d["py"]) for d in data]  # all records: the SFT set of theta_0 (tiny preset)
    if cfg["max_examples"]:
        data = data[:cfg["max_examples"]]  # D of Algorithm 1: a subset, as in the paper (50k of 200k)
    log(f"D: {len(data)} pairs from {cfg['data']}; held-out: {len(eval_data)}")
    methods = cfg["method"].split(",")
    pref_pairs = tokenize_pref(load_pref_jsonl(cfg["pref_data"], cfg["max_examples"]), tok, cfg, skipped) \
        if "dpo" in methods else None
    if skipped and rank == 0:
        write_jsonl(os.path.join(out, "skipped.jsonl"), skipped)  # every over-length record, file:line and why
    # The data is good; does this folder's stored work fit these settings? (a rerun resumes from it)
    check_settings(os.path.join(out, "settings.json"), cfg, methods, rank)
    rm = None
    if cfg["reward_model"]:  # loaded now: a wrong path fails before hours of compute
        rm = analysis.load_reward_model(cfg["reward_model"], device=torch.device("cpu"),
                                        trust_remote_code=cfg["trust_remote_code"])

    # theta_0. For the toy task we make it: a tiny Llama SFT-ed on all records (Section 3's objective).
    sft_dir = os.path.join(out, "sft")
    if tiny and not os.path.isdir(sft_dir):
        log(f"[theta_0] SFT of a tiny Llama on all {len(sft_pairs)} records of {cfg['data']}: {cfg['sft_steps']} steps")
        torch.manual_seed(cfg["seed"])  # every rank builds the same initial weights (FSDP2 does not broadcast them)
        model = AutoModelForCausalLM.from_config(tiny_policy_config(tok, cfg["max_len"]))
        epochs = math.ceil(cfg["sft_steps"] * cfg["sft_batch_size"] / len(sft_pairs))
        model = model.to(device)
        if world > 1:
            model = fsdp_wrap(model, device)
        dpo.sft_train(model, sft_pairs, lr=cfg["sft_lr"], epochs=epochs, batch_size=cfg["sft_batch_size"],
                      micro_batch_size=cfg["sft_batch_size"], device=device, optimizer="adamw",
                      seed=cfg["seed"], log_every=50, max_steps=cfg["sft_steps"],
                      log_fn=lambda r: log(f"  sft step {r['step']}/{r['steps']} nll/token {r['loss']:.3f}"))
        die_at("sft")
        save_hf(model, tok, sft_dir, rank)
        del model
    theta0_path = sft_dir if tiny else cfg["policy"]

    # theta_0's own evaluation, its samples (lines 1-3), the guide (line 4) and the Section 5.2 ranking
    # analysis: shared by every method. theta_0 is loaded only if one of them is still to do.
    os.makedirs(os.path.join(out, "iter0"), exist_ok=True)
    guide_dir = os.path.join(out, "guide")
    samples0 = os.path.join(out, "iter0", "samples.jsonl")
    agreement_path = os.path.join(guide_dir, "agreement.json")
    todo = [not os.path.exists(os.path.join(out, "iter0", "eval.json")) and eval_data, not os.path.exists(samples0),
            not os.path.isdir(guide_dir), cfg["agreement_n"] > 0 and not os.path.exists(agreement_path)]
    model = load_policy(theta0_path, cfg, device, world) if any(todo) else None
    if model is not None:
        log(f"theta_0: {theta0_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    ev0 = evaluate(model, tok, eval_data, os.path.join(out, "iter0", "eval.json"), cfg, ctx, rm)
    log(f"[iter 0] theta_0 held-out greedy exact match {ev0['exact_match']} | mean reward {ev0['reward']}")

    # ------------------------------------------------------------------------------------------------
    # Algorithm 1, lines 1-3: for i = 1..N, generate y'_i ~ p_{theta_0}(.|x_i)
    # (the paper writes y_i; it is the generated y'_i, README errata)
    # ------------------------------------------------------------------------------------------------
    log("[Algorithm 1, lines 1-3] sampling y' ~ p_theta_0 for every x in D")
    y0 = sample_stage(model, tok, data, samples0, cfg, cfg["seed"], ctx)  # a rerun reads the file instead
    die_at("samples0")

    # ------------------------------------------------------------------------------------------------
    # Algorithm 1, line 4: (phi, psi) = argmax sum_i log p_psi(y_i|x_i, phi(x_i,y_i)) + log p_psi(y'_i|x_i, phi(x_i,y'_i))
    # Eq. 2 over golden AND generated responses; trained once, then frozen for all T iterations.
    # ------------------------------------------------------------------------------------------------
    if os.path.isdir(guide_dir):
        log(f"[skip] guide: {guide_dir} exists")
        guide = place_guide(guide_lib.load_guide(guide_dir), device, world)
    else:
        log("[Algorithm 1, line 4] training the guide T = (phi, psi) on golden and generated responses (Eq. 2)")
        torch.manual_seed(cfg["seed"])
        guide = place_guide(guide_lib.build_guide(guide_src, cfg["latent_dim"]), device, world)
        triples = guide_triples(data, tok, gtok, y0, cfg["guide_max_len"])
        examples = [(gx, gy) for gx, gy, _ in triples] + [(gx, gyp) for gx, _, gyp in triples]  # y and y'
        idx, _ = shard_indices(len(examples), rank, world)  # this rank's share; FSDP2 averages the gradients
        guide_lib.train_guide(guide, [examples[i] for i in idx], epochs=cfg["guide_epochs"],
                              batch_size=cfg["guide_batch_size"], lr=cfg["guide_lr"], pad_id=gtok.eos_token_id,
                              seed=cfg["seed"], device=device, log_every=cfg["log_every"] * 5,
                              log_fn=lambda m: log("  " + m))
        # Does the decoder use h? Reconstruct (training) examples with the true latent, another example's, and
        # (for pairs with y' != y) the same prompt's other response's: that last gap is what s_phi can see.
        pairs_diff = [i for i, (_, gy, gyp) in enumerate(triples) if gy != gyp]
        pick = torch.randperm(len(pairs_diff), generator=torch.Generator().manual_seed(0))[:512].tolist()
        pick = [pairs_diff[k] for k in pick] or list(range(min(512, len(triples))))  # (every y' == y: no pairs)
        n = len(pick)
        diag = guide_lib.eval_guide(guide, [examples[i] for i in pick] + [examples[len(triples) + i] for i in pick],
                                    batch_size=cfg["guide_batch_size"], pad_id=gtok.eos_token_id, device=device,
                                    partner=[k + n for k in range(n)] + list(range(n)) if pairs_diff else None)
        log(f"  guide reconstruction NLL/token: true h {diag['nll_true_h']:.3f} vs shuffled h "
            f"{diag['nll_shuffled_h']:.3f} (shuffled must be worse, or the decoder ignores h) vs the same prompt's "
            f"other response's h {diag.get('nll_same_prompt_h', float('nan')):.3f} (the part of h that s_phi measures)")
        die_at("guide")
        save_guide_ckpt(guide, guide_src, cfg["latent_dim"], guide_dir, diag, rank)
    guide.eval()
    for p in guide.parameters():
        p.requires_grad_(False)  # phi is frozen: s_i/S are constants of the policy update (README errata)

    if cfg["agreement_n"] > 0:  # Section 5.2 (2), on theta_0's samples
        agr = agreement_stage(model, tok, gtok, guide, data, cfg, ctx, agreement_path, rm)
        log(f"[Section 5.2] ranking agreement, latent distance vs {agr['judge']} judge: {agr['agree']}/"
            f"{agr['n_decided']} = {agr['agreement']} (pairs where both rank strictly; {agreement_path})")
    del model

    for method in methods:
        mdir = os.path.join(out, method)  # each method's iterations live in their own folder
        results_path = os.path.join(mdir, "metrics.jsonl")
        os.makedirs(mdir, exist_ok=True)
        # Resume: theta_{t-1} is the newest finished iteration's policy (or theta_0).
        t_start = 1
        while t_start <= cfg["T"] and os.path.isdir(os.path.join(mdir, f"iter{t_start}", "policy")):
            t_start += 1
        if t_start == 1 and rank == 0:
            write_jsonl(results_path, [{"iter": 0, "S": None, "loss": None, **ev0}])

        def record_iteration(model, t, S, hist):
            """theta_t's held-out evaluation and its row in metrics.jsonl (after theta_t is saved)."""
            it = os.path.join(mdir, f"iter{t}")
            ev = evaluate(model, tok, eval_data, os.path.join(it, "eval.json"), cfg, ctx, rm)
            q = max(1, len(hist) // 4)
            loss = sum(h["loss"] for h in hist[-q:]) / q
            log(f"[{method} iter {t}] held-out greedy exact match {ev['exact_match']} | mean reward {ev['reward']} | "
                f"S {_fmt(S, '.4f')} | loss (last quarter) {loss:.4f}")
            if rank == 0:
                prev = read_jsonl(results_path) if os.path.exists(results_path) else []
                write_jsonl(results_path, [r for r in prev if r["iter"] != t] +
                            [{"iter": t, "S": S, "loss": loss, "steps": len(hist), **ev}])  # steps: optimizer steps of t

        model = None
        last = t_start - 1  # the newest finished iteration; a run killed after saving theta_last but before its
        # evaluation and metrics row would otherwise never get them (a finished policy means "skip")
        recorded = {r["iter"] for r in read_jsonl(results_path)} if os.path.exists(results_path) else set()
        if last >= 1 and last not in recorded:
            it = os.path.join(mdir, f"iter{last}")
            log(f"[resume] iteration {last} of {method} saved its policy but not its evaluation: evaluating it now")
            model = load_policy(os.path.join(it, "policy"), cfg, device, world)
            s = read_distances(it)
            record_iteration(model, last, None if s is None else float(s.mean()),
                             read_jsonl(os.path.join(it, "train_metrics.jsonl")))
        if t_start <= cfg["T"]:
            policy_path = theta0_path if t_start == 1 else os.path.join(mdir, f"iter{t_start - 1}", "policy")
            log(f"##### method {method}: iterations {t_start}..{cfg['T']}, starting from {policy_path}")
            if model is None:  # (already loaded above when theta_{t_start-1} had to be evaluated first)
                model = load_policy(policy_path, cfg, device, world)

        # --------------------------------------------------------------------------------------------
        # Algorithm 1, line 5: for t = 1..T
        # --------------------------------------------------------------------------------------------
        for t in range(t_start, cfg["T"] + 1):
            it = os.path.join(mdir, f"iter{t}")
            os.makedirs(it, exist_ok=True)
            log(f"===== {method} iteration {t}/{cfg['T']}: theta_{t - 1} -> theta_{t} =====")
            S, s = None, None
            if method in ("ldalign", "spin") or cfg["measure_S"]:
                # Algorithm 1, lines 6-7: for i = 1..N, generate y'_i ~ p_{theta_{t-1}}(.|x_i)
                # (printed as theta_{T-1}; it is the previous iteration's policy, README errata)
                if t == 1 and cfg["reuse_line2_samples"]:
                    log("[line 7] theta_{t-1} = theta_0: reusing the samples of lines 1-3 (same distribution)")
                    y_prime = y0
                else:
                    log(f"[line 7] sampling y' ~ p_theta_{t - 1}")
                    y_prime = sample_stage(model, tok, data, os.path.join(it, "samples.jsonl"), cfg, cfg["seed"] + t, ctx)

                # Algorithm 1, line 8: s_phi(x_i, y_i, y'_i) = ||phi(x_i, y_i) - phi(x_i, y'_i)||_2
                dist_path = os.path.join(it, "distances.jsonl")
                s = read_distances(it)
                if s is None:
                    triples = guide_triples(data, tok, gtok, y_prime, cfg["guide_max_len"])
                    s = distances_stage(guide, triples, cfg, ctx, gtok.eos_token_id)

                # Algorithm 1, line 9: S_phi(D, p_{theta_{t-1}}) = (1/N) sum_i s_i;  weights w_i = s_i / S
                w = dpo.latent_weights(s) if method == "ldalign" else torch.ones(len(s))  # SPIN: all ones
                S = float(s.mean())
                if rank == 0 and not os.path.exists(dist_path):
                    identical = sum(d["py"] == yp for d, yp in zip(data, y_prime))
                    # Section 5.2 (1): the distribution of the distances, as numbers (and a PNG at the end)
                    write_atomic(os.path.join(it, "distances.json"), json.dumps(
                        {"S": S, "n": len(s), "n_identical_to_golden": identical, "min": float(s.min()),
                         "max": float(s.max()), "histogram": analysis.distance_histogram(s.tolist())}, indent=1))
                    write_jsonl(dist_path, [{"where": d["where"], "s": float(si), "weight": float(wi)}
                                            for d, si, wi in zip(data, s, w)])
                log(f"[lines 8-9] distances: S = mean s = {S:.4f}, min {float(s.min()):.4f}, max {float(s.max()):.4f}")

            def train_log(r):
                extra = f"reward acc {r['reward_acc']:.2f} margin {r['reward_margin']:.3f} " if "reward_acc" in r else ""
                log(f"  step {r['step']}/{r['steps']} loss {r['loss']:.4f} {extra}lr {r['lr']:.2e} | "
                    f"{r['elapsed_s']:.0f}s, eta {r['eta_s']:.0f}s")
                if r["step"] * 2 >= r["steps"]:
                    die_at(f"{method}.iter{t}.train")  # a kill half-way through the update

            budget = dict(lr=cfg["lr"], epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                          micro_batch_size=cfg["micro_batch_size"], device=device, optimizer=cfg["optimizer"],
                          warmup_ratio=cfg["warmup_ratio"], max_grad_norm=cfg["max_grad_norm"],
                          seed=cfg["seed"] + 1000 * t, log_every=cfg["log_every"], log_fn=train_log)
            if method == "sft":  # Continual SFT (Section 5.1.4): the same budget spent on log p(y|x)
                log(f"[sft] continual SFT: {cfg['epochs']} epoch(s) over {len(data)} pairs of D")
                hist = dpo.sft_train(model, [(d["px"], d["py"]) for d in data], **budget)
            else:
                if method == "dpo":
                    # DPO on annotated pairs (Section 5.1.4): the reference stays theta_0 in every iteration, so
                    # its log-probs are computed at t = 1 (when the policy is theta_0) and kept in a file.
                    pairs, w = pref_pairs, torch.ones(len(pref_pairs))
                    ref_path = os.path.join(mdir, "ref_logps_theta0.json")
                    if t == 1:
                        ref_c, ref_r = reference_stage(model, pairs, cfg, ctx)
                        if rank == 0:
                            write_atomic(ref_path, json.dumps({"chosen": ref_c.tolist(), "rejected": ref_r.tolist()}))
                    elif not os.path.exists(ref_path):  # the policy is theta_{t-1} now: it cannot stand in for theta_0
                        raise FileNotFoundError(f"{ref_path} is missing: DPO's reference is theta_0, and only iteration 1 "
                                                f"can compute it; delete {mdir} to rerun the DPO baseline from the start")
                    else:
                        ref = json.load(open(ref_path))
                        ref_c, ref_r = torch.tensor(ref["chosen"]), torch.tensor(ref["rejected"])
                else:
                    # Algorithm 1, line 10: theta_t = argmax_theta sum_i (s_i/S) log sigma(
                    #     beta log p_theta(y|x)/p_{theta_{t-1}}(y|x) - beta log p_theta(y'|x)/p_{theta_{t-1}}(y'|x))
                    # Reference = theta_{t-1} = the policy right now: score every pair once, cache, then train.
                    pairs = [(d["px"], d["py"], yp) for d, yp in zip(data, y_prime)]
                    log("[line 10] reference log-probs under theta_{t-1} (computed once, cached)")
                    ref_c, ref_r = reference_stage(model, pairs, cfg, ctx)
                log(f"[line 10] {'weighted ' if method == 'ldalign' else ''}DPO ({method}): {cfg['epochs']} epoch(s) "
                    f"over {len(pairs)} pairs")
                hist = dpo.dpo_train(model, pairs, ref_c, ref_r, w, beta=cfg["beta"], **budget)  # bf16: dpo.autocast
            if rank == 0:
                write_jsonl(os.path.join(it, "train_metrics.jsonl"), hist)
            save_hf(model, tok, os.path.join(it, "policy"), rank)
            die_at(f"{method}.iter{t}.eval")  # a kill between saving theta_t and evaluating it
            record_iteration(model, t, S, hist)
        del model

        # A table a person reads, and the distances' distribution per iteration (Section 5.2 (1)).
        if rank == 0:
            table = format_table(read_jsonl(results_path))
            write_atomic(os.path.join(mdir, "results.md"), table)
            log(f"{method}:\n{table}")
            hists = {f"iter {t}": s.tolist() for t in range(1, cfg["T"] + 1)
                     if (s := read_distances(os.path.join(mdir, f"iter{t}"))) is not None}
            if hists and not analysis.save_histogram_png(hists, os.path.join(mdir, "distances.png")):
                log("(pip install matplotlib for distances.png; the numbers are in iter*/distances.json)")

    # Every method run in this folder so far, this call's or earlier calls' (e.g. `--method dpo --lr 2e-7` alone).
    summaries = {m: read_jsonl(p) for m in METHODS if os.path.exists(p := os.path.join(out, m, "metrics.jsonl"))}
    if rank == 0 and len(summaries) > 1:
        steps = ", ".join(f"{m} {rows[-1].get('steps', '?')}" for m, rows in summaries.items())
        head = (f"comparison ({cfg['T']} iterations x {cfg['epochs']} epochs, batch {cfg['batch_size']}; optimizer "
                f"steps per iteration: {steps}; each method at the settings in settings.json)")
        table = format_comparison(summaries)
        write_atomic(os.path.join(out, "comparison.md"), head + "\n\n" + table)
        log(f"{head}:\n{table}")
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing; a rank that leaves early aborts the other's gloo threads
        dist.destroy_process_group()


def reference_stage(model, pairs, cfg, ctx):
    """log p_ref(y|x), log p_ref(y'|x) of every pair under the current policy: each rank its share, gathered."""
    idx, n_real = shard_indices(len(pairs), ctx["rank"], ctx["world"])
    with dpo.autocast(ctx["device"], model):
        rc, rr = dpo.reference_logps(model, [pairs[i] for i in idx], cfg["micro_batch_size"], ctx["device"])
    return (gather_floats(rc[:n_real], idx[:n_real], len(pairs), ctx["device"]),
            gather_floats(rr[:n_real], idx[:n_real], len(pairs), ctx["device"]))


def _fmt(v, f):
    return "-" if v is None else format(v, f)


def format_table(rows):
    lines = ["| iteration | held-out exact match | mean reward | S (mean distance) | loss |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['iter']} | {_fmt(r['exact_match'], '.3f')} | {_fmt(r.get('reward'), '.3f')} | "
                     f"{_fmt(r['S'], '.4f')} | {_fmt(r['loss'], '.4f')} |")
    return "\n".join(lines) + "\n"


def format_comparison(summaries):
    """One row per iteration, per method: held-out exact match, mean reward, and S (mean latent distance)."""
    methods = list(summaries)
    head = "| iteration | " + " | ".join(f"{m}: exact match / reward / S" for m in methods) + " |"
    lines = [head, "|---|" + "---|" * len(methods)]
    iters = sorted({r["iter"] for rows in summaries.values() for r in rows})
    for t in iters:
        cells = []
        for m in methods:
            r = next((r for r in summaries[m] if r["iter"] == t), None)
            cells.append("-" if r is None else f"{_fmt(r['exact_match'], '.3f')} / {_fmt(r.get('reward'), '.3f')} / "
                                               f"{_fmt(r['S'], '.4f')}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
