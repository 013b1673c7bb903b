"""Speed of the two hot loops of LD-Align on one GPU, and what they imply for the paper's setting.

    # CUDA: a ~1.1B Llama in bf16; CPU: a tiny one (< 1 min)
    python tools/bench.py
    # the same, the policy wrapped with FSDP2 (fsdp.parallelize)
    torchrun --nproc_per_node=1 tools/bench.py
    # any default below can be overridden as --key value (on the CPU's tiny size add --dpo_batch 8)
    python tools/bench.py --grad_ckpt true --micro_batch 8
    # compiled blocks for the DPO update; two samplers
    python tools/bench.py --compile true --samplers hf,compile

Measures, on a Llama built from a config with random weights (nothing is downloaded):
  1. the sampler (Algorithm 1, lines 2 and 7): generate.generate with a DynamicCache, with a
     StaticCache, and with a StaticCache + torch.compile'd decode step (CUDA graphs), vs
     transformers' model.generate; same model, same random prompts, greedy, forced to the full
     length, in the same run; new tokens/s, decode steps/s, peak memory, and how many greedy tokens
     agree with HF's (bf16 near-ties may legitimately diverge late);
  2. the reference log-probs (dpo.reference_logps, forward only) and the DPO policy update
     (dpo.dpo_train: one forward of 2B sequences, backward, clipping, RMSprop), tokens/s and
     MFU = 6 N tokens/s / peak (2 N for the forward-only reference), also without the input
     embedding;
  3. a projection of the paper's wall time (7B, 50k pairs, 3 iterations, 8 GPUs) from those
     per-token costs.
Prints the tables and writes the numbers to --out (JSON, atomically) and the tables to the same
name with .md.
"""
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

if __package__ in (None, ""):  # run as a file (python tools/X.py): the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpo  # noqa: E402 (after the path)
import fsdp  # noqa: E402
import generate  # noqa: E402
from run.cli import defaults_help, read_overrides, report_errors  # noqa: E402
from run.rundir import write_atomic  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Defaults. Every key can be overridden as --key value (or --key=value; a bare --flag means true).
# 0 / "" means "take it from --size" (the SIZES table below).
# --------------------------------------------------------------------------------------------------
DEFAULTS = dict(
    # "1b" (default on CUDA) or "tiny" (default on CPU)
    size="",
    # the numbers, as JSON
    out="bench.json",
    seed=0,
    # Llama shape overrides
    layers=0, hidden=0, intermediate=0, heads=0, kv_heads=0, vocab=0,
    # sampler
    gen_batch=0, prompt_len=0, new_tokens=0,
    # prompts of random length in [prompt_len/2, prompt_len], left padded (else all equal)
    left_pad=False,
    # CUDA without FSDP: "bf16" (weights cast to bf16) or "autocast" (fp32 weights + bf16 autocast,
    # what ldalign.py does on one process); under FSDP: its bf16 mixed precision
    gen_dtype="bf16",
    # new tokens of the untimed warmup call of each sampler (0 = new_tokens: the allocator then
    # already holds the blocks of the full-length KV cache)
    warmup_new=0,
    # which samplers to time: HF (required; first, so that its numbers come back even if a compiled
    # sampler breaks the CUDA context) and generate.py's modes
    samplers="hf,dynamic,static,compile",
    # the "first K rows x first K tokens identical" check
    agree_rows=8, agree_tokens=16,
    # bytes/s for the decode roofline; 0 = 4.8e12 on an H200, 2.0e12 on an H100 PCIe, else 3.35e12
    # (H100 SXM)
    hbm_bw=0.0,
    # DPO update: "auto" = FSDP2 when launched by torchrun, "true", "false"
    fsdp="auto",
    # activation checkpointing (HF gradient_checkpointing_enable)
    grad_ckpt=False,
    # torch.compile each transformer block of the policy for the DPO update (ldalign --compile)
    compile=False,
    # tokens of the prompt and of each response (chosen and rejected)
    dpo_prompt=0, dpo_response=0,
    # pairs per optimizer step (global) and per forward
    dpo_batch=0, micro_batch=0,
    # untimed and timed optimizer steps
    dpo_warmup=0, dpo_steps=0,
    # the paper preset of ldalign.py (SPIN's choices)
    optimizer="rmsprop", lr=5e-7, beta=0.1,
    # 0 = bf16 dense peak: 989e12 (H100 SXM, H200), 756e12 (H100 PCIe); on CPU MFU is n/a
    peak_flops=0.0,
    skip_gen=False, skip_dpo=False,
)
SIZES = {
    # ~9M parameters (most in the 32k embeddings): the whole script runs in well under a minute on
    # 2 cores
    "tiny": dict(layers=4, hidden=128, intermediate=344, heads=4, kv_heads=2, vocab=32000,
                 gen_batch=4, prompt_len=16, new_tokens=16,
                 dpo_prompt=16, dpo_response=16, dpo_batch=4, micro_batch=2,
                 dpo_warmup=1, dpo_steps=3),
    # TinyLlama-1.1B's shape: 1,100,048,384 parameters (untied head), GQA with 4 kv heads
    "1b": dict(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000,
               gen_batch=64, prompt_len=256, new_tokens=256,
               dpo_prompt=256, dpo_response=256, dpo_batch=32, micro_batch=4,
               dpo_warmup=2, dpo_steps=5),
}
# The paper's setting (Section 5.1; what it leaves open follows SPIN, as ldalign.py's paper preset):
# Mistral-7B (zephyr-7b-sft-full); (512 + 256) tokens per sequence, at the cap.
PAPER = dict(params=7.24e9, pairs=50_000, prompt_tokens=512, response_tokens=256, new_tokens=256,
             iterations=3, epochs=2, gpus=8)
# The samplers --samplers chooses from: generate.py in its three modes, and transformers' own
# generate (the baseline, required). Their names in the tables.
SAMPLERS = {"dynamic": "generate.py, DynamicCache",
            "static": "generate.py, StaticCache",
            "compile": "generate.py, StaticCache + torch.compile",
            "hf": "HF generate"}


# --------------------------------------------------------------------------------------------------
# Settings, processes, the model
# --------------------------------------------------------------------------------------------------
def parse_args(argv):
    """DEFAULTS, overridden by --key value; the 0 / "" ones then taken from --size; checked."""
    # --help prints the module docstring and the DEFAULTS block above, comments included
    help_text = __doc__ + "\n" + defaults_help(__file__)
    cfg = dict(DEFAULTS, **read_overrides(argv, DEFAULTS, help_text))
    cfg["size"] = cfg["size"] or ("1b" if torch.cuda.is_available() else "tiny")
    if cfg["size"] not in SIZES:
        raise SystemExit(f"--size is one of {', '.join(SIZES)}")
    for key, value in SIZES[cfg["size"]].items():
        cfg[key] = cfg[key] or value
    if cfg["fsdp"] not in ("auto", "true", "false") or cfg["gen_dtype"] not in ("bf16", "autocast"):
        raise SystemExit("--fsdp is auto/true/false; --gen_dtype is bf16/autocast")
    if cfg["dpo_batch"] % cfg["micro_batch"]:
        raise SystemExit("--dpo_batch must be a multiple of --micro_batch")
    keys = [key.strip() for key in cfg["samplers"].split(",")]
    if "hf" not in keys or any(key not in SAMPLERS for key in keys):
        raise SystemExit(f"--samplers: comma-separated from {', '.join(SAMPLERS)}; "
                         "'hf' (the baseline) is required")
    return cfg


@dataclass
class Setup:
    """What every phase needs: the settings, the processes, the model, the GPU's peak rates."""
    cfg: dict
    rank: int
    world: int
    device: torch.device
    use_fsdp: bool
    model_config: LlamaConfig
    n_params: int
    attn_implementation: str | None
    gpu: str
    # None on CPU: MFU is n/a
    peak_flops: float | None
    hbm_bw: float

    @property
    def cuda(self):
        return self.device.type == "cuda"


def setup_run(cfg):
    """Start the processes (under torchrun) and describe the model; nothing is allocated yet."""
    rank, world, device = fsdp.init()
    cuda = device.type == "cuda"
    use_fsdp = {"auto": "RANK" in os.environ, "true": True, "false": False}[cfg["fsdp"]]
    if (use_fsdp and "RANK" not in os.environ) or (world > 1 and not use_fsdp):
        raise SystemExit("--fsdp true needs torchrun; several processes need FSDP")
    hf_logging.set_verbosity_error()
    # eos_token_id=None: no token ends a row, so both samplers run exactly new_tokens steps
    # (generate.py skips the EOS check; HF adds no stopping criterion). Prompt ids avoid 0..2.
    model_config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], max_position_embeddings=4096, bos_token_id=1,
        eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    # shapes only, no memory: the exact count, embeddings and head included
    with torch.device("meta"):
        meta = LlamaForCausalLM(model_config)
    n_params = sum(p.numel() for p in meta.parameters())
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    # bf16 dense peak and HBM bandwidth: H100 SXM and H200 989 TFLOP/s (3.35 / 4.8 TB/s);
    # H100 PCIe 756 (2.0)
    peak_flops = cfg["peak_flops"] or ((756e12 if "PCIe" in gpu else 989e12) if cuda else None)
    hbm_bw = cfg["hbm_bw"] or (4.8e12 if "H200" in gpu else 2.0e12 if "PCIe" in gpu else 3.35e12)
    return Setup(cfg=cfg, rank=rank, world=world, device=device, use_fsdp=use_fsdp,
                 model_config=model_config, n_params=n_params,
                 attn_implementation=getattr(meta.config, "_attn_implementation", None),
                 gpu=gpu, peak_flops=peak_flops, hbm_bw=hbm_bw)


def build_model(setup, dtype, compile_blocks=False):
    """The Llama, with the same seed every time and so the same random weights; made directly on the
    device (fast even for 1B). Checkpointing and compiled blocks as fsdp.load_policy does them."""
    cfg = setup.cfg
    torch.manual_seed(cfg["seed"])
    with torch.device(setup.device):
        model = LlamaForCausalLM(setup.model_config)
    if cfg["grad_ckpt"]:
        # before wrapping, active in training mode only (newer HF renamed it)
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    if compile_blocks:
        fsdp.compile_blocks(model)
    model = model.to(dtype)
    return fsdp.parallelize(model, setup.device) if setup.use_fsdp else model


def new_record(setup):
    """The start of bench.json: the settings, the software and hardware, the model."""
    shape_keys = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")
    env = dict(torch=torch.__version__, transformers=transformers.__version__, device=setup.gpu,
               world=setup.world, fsdp=setup.use_fsdp, threads=torch.get_num_threads())
    model = dict(params=setup.n_params, attn=setup.attn_implementation,
                 shape={key: setup.cfg[key] for key in shape_keys})
    return dict(config=setup.cfg, env=env, model=model)


# --------------------------------------------------------------------------------------------------
# Helpers: printing on rank 0, CUDA synchronization and peak memory (no-ops and None on CPU)
# --------------------------------------------------------------------------------------------------
def log(msg=""):
    if fsdp.rank() == 0:
        print(msg, flush=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device, free=False):
    """Restart the peak-memory count. free=True (empty the allocator's cache) only between phases:
    an empty cache would be refilled by slow cudaMallocs inside the timed region."""
    if device.type == "cuda":
        if free:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device):
    """Peak GiB allocated since the last reset; None on CPU (printed as n/a)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def timed_call(fn, n, device):
    """fn(n) after a barrier, between synchronizations: (its output, seconds, peak GiB)."""
    fsdp.barrier()
    reset_peak_memory(device)
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(n)
    synchronize(device)
    return out, time.perf_counter() - t0, peak_memory_gb(device)


def random_ids(generator, n, vocab):
    """n random token ids, none of them 0..2 (pad/bos/old eos)."""
    return torch.randint(3, vocab, (n,), generator=generator).tolist()


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


# --------------------------------------------------------------------------------------------------
# 1. Sampler: generate.generate vs HF generate, greedy, full length, same model and prompts.
# --------------------------------------------------------------------------------------------------
class Sampler:
    """One of SAMPLERS on fixed prompts, greedy: sampler(n) -> the (B, n) new token ids, exactly n.

    As sample_responses does, a StaticCache sampler makes one cache of cache_len positions at its
    first call and reuses it in all later ones (warmup and timed); release() drops it once the
    sampler is done, so that it does not count in the next sampler's peak memory."""

    def __init__(self, key, model, ids, mask, cache_len):
        self.key, self.model, self.ids, self.mask, self.cache_len = key, model, ids, mask, cache_len
        self.static, self.compile = key in ("static", "compile"), key == "compile"
        self.cache = None

    def __call__(self, n):
        if self.key == "hf":
            out = self.model.generate(input_ids=self.ids, attention_mask=self.mask, do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            return out[:, self.ids.shape[1]:]
        if self.static and self.cache is None:
            self.cache = generate.new_static_cache(self.model, self.cache_len)
        return generate.generate(self.model, self.ids, self.mask, n, eos_token_id=None,
                                 pad_token_id=0, temperature=0.0, static=self.static,
                                 compile=self.compile, cache=self.cache)

    def release(self):
        self.cache = None


def make_prompts(cfg, rank, device):
    """Random prompts, each rank its own: prompt_len tokens each, or with --left_pad of random
    lengths in [prompt_len/2, prompt_len]. Returns (lengths, ids, mask); ids and mask (B, T), left
    padded."""
    batch, prompt_len = cfg["gen_batch"], cfg["prompt_len"]
    g = torch.Generator().manual_seed(cfg["seed"] + 1 + rank)
    if cfg["left_pad"]:
        lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g).tolist()
    else:
        lengths = [prompt_len] * batch
    prompts = [random_ids(g, n, cfg["vocab"]) for n in lengths]
    ids, mask = (t.to(device) for t in generate.pad_sequences(prompts, 0, side="left"))
    return lengths, ids, mask


def sampler_model(setup, policy):
    """The model the samplers run, and its precision as the tables name it."""
    # under FSDP: the policy, bf16 through FSDP's mixed precision (fsdp.autocast is then off)
    if setup.use_fsdp:
        precision = "bf16 mixed precision" if setup.cuda else "fp32"
        return policy, f"FSDP2 {precision}, gathered_weights"
    # pure bf16 weights: no autocast needed
    if setup.cuda and setup.cfg["gen_dtype"] == "bf16":
        return build_model(setup, torch.bfloat16), "bf16 weights"
    # what ldalign.py does on one process: fp32 weights, bf16 autocast on CUDA
    precision = "fp32 weights + bf16 autocast" if setup.cuda else "fp32"
    return build_model(setup, torch.float32), precision


def time_sampler(sampler, n_new, warmup_new, device):
    """An untimed warmup call (CUDA context, cuBLAS, allocator, compilation), then the prefill alone
    (one new token: subtracted to get decode steps/s) and the full length. Returns (new ids,
    timings)."""
    t0 = time.perf_counter()
    sampler(warmup_new or n_new)
    warmup_s = time.perf_counter() - t0
    _, prefill_s, _ = timed_call(sampler, 1, device)
    out, seconds, peak_gb = timed_call(sampler, n_new, device)
    decode_steps_per_s = (n_new - 1) / max(seconds - prefill_s, 1e-9)
    return out, dict(seconds=seconds, warmup_s=warmup_s, prefill_s=prefill_s,
                     new_tokens_per_s=out.shape[0] * n_new / seconds,
                     decode_steps_per_s=decode_steps_per_s, peak_mem_gb=peak_gb)


def time_samplers(setup, keys, model, ids, mask, cache_len):
    """The samplers one after the other: ({key: timings or error}, {key: (B, N) new ids})."""
    cfg = setup.cfg
    batch, n_new = cfg["gen_batch"], cfg["new_tokens"]
    results, outputs = {}, {}
    for key in keys:
        name, sampler = SAMPLERS[key], Sampler(key, model, ids, mask, cache_len)
        # one failing (say, torch.compile on an unusual setup) still reports the others; not HF
        try:
            out, timings = time_sampler(sampler, n_new, cfg["warmup_new"], setup.device)
        except Exception as e:  # noqa: BLE001 (reported in the table and the JSON)
            results[key] = dict(name=name, error=f"{type(e).__name__}: {e}"[:500])
            log(f"  {name}: FAILED {results[key]['error']}")
            if key == "hf":
                raise
            continue
        finally:
            sampler.release()
        assert out.shape == (batch, n_new), out.shape
        outputs[key] = out
        results[key] = dict(name=name, **timings)
        if setup.cuda:
            torch.cuda.empty_cache()
    return results, outputs


def compare_with_hf(results, outputs, first_rows, first_tokens):
    """Add to each sampler's results its speed-up over HF generate and how far its greedy tokens
    agree with HF's (bf16 near-ties may legitimately diverge late)."""
    hf = outputs["hf"]
    n_new = hf.shape[1]
    for key, out in outputs.items():
        equal = out == hf
        # (B,) common prefix length
        first_diff = torch.where(equal.all(1), n_new, (~equal).float().argmax(1))
        results[key].update(speedup_vs_hf=results["hf"]["seconds"] / results[key]["seconds"],
                            token_match_frac=equal.float().mean().item(),
                            common_prefix_frac=(first_diff.float() / n_new).mean().item(),
                            first_k_identical=bool(equal[:first_rows, :first_tokens].all()))


def decode_roofline(setup, prompt_lengths, n_new):
    """Decode steps/s at the HBM bandwidth: decode is memory bound, and every step reads the bf16
    weights (less the embedding table) and the bf16 KV cache (at its mean length over the run)."""
    cfg = setup.cfg
    batch, head_dim = len(prompt_lengths), cfg["hidden"] // cfg["heads"]
    kv_bytes = (batch * (sum(prompt_lengths) / batch + n_new / 2)
                * cfg["layers"] * 2 * cfg["kv_heads"] * head_dim * 2)
    return setup.hbm_bw / (2 * (setup.n_params - cfg["vocab"] * cfg["hidden"]) + kv_bytes)


def bench_samplers(setup, policy):
    """Phase 1 (Algorithm 1, lines 2 and 7): the chosen samplers on the same model and prompts,
    greedy, forced to the full length. Returns bench.json's "sampler" record."""
    cfg, device = setup.cfg, setup.device
    batch, prompt_len, n_new = cfg["gen_batch"], cfg["prompt_len"], cfg["new_tokens"]
    prompt_lengths, ids, mask = make_prompts(cfg, setup.rank, device)
    model, precision = sampler_model(setup, policy)
    amp = contextlib.nullcontext() if precision == "bf16 weights" else fsdp.autocast(device, model)
    model.eval()
    weights_gb = torch.cuda.memory_allocated() / 2**30 if setup.cuda else None
    keys = [key.strip() for key in cfg["samplers"].split(",")]
    cache_len = generate.static_width(prompt_len) + max(n_new, cfg["warmup_new"])
    # gathered_weights: under FSDP the weights are all-gathered once here, not at every decode step
    # (test_fsdp_generation_gathers_weights_once counts them); a no-op for a plain model
    with fsdp.gathered_weights(model), amp:
        results, outputs = time_samplers(setup, keys, model, ids, mask, cache_len)
    first_rows, first_tokens = min(cfg["agree_rows"], batch), min(cfg["agree_tokens"], n_new)
    compare_with_hf(results, outputs, first_rows, first_tokens)
    ours = [key for key in outputs if key != "hf"]
    best = max(ours, key=lambda key: results[key]["new_tokens_per_s"]) if ours else None
    roofline = decode_roofline(setup, prompt_lengths, n_new)
    return dict(batch=batch, prompt_len=prompt_len, new_tokens=n_new, left_pad=cfg["left_pad"],
                precision=precision, weights_gb=weights_gb, samplers=results, best=best,
                first_k=[first_rows, first_tokens],
                speedup_vs_hf=results[best]["speedup_vs_hf"] if best else None,
                roofline_decode_steps_per_s=roofline if setup.cuda else None,
                hbm_bw=setup.hbm_bw if setup.cuda else None)


# --------------------------------------------------------------------------------------------------
# 2. Reference log-probs (forward only) and the DPO update (forward + backward + optimizer step).
# --------------------------------------------------------------------------------------------------
def make_pairs(cfg, count):
    """count random (prompt, chosen, rejected) id lists, the same on every rank (dpo_train splits
    them)."""
    g = torch.Generator().manual_seed(cfg["seed"] + 7)
    prompt, response, vocab = cfg["dpo_prompt"], cfg["dpo_response"], cfg["vocab"]
    return [(random_ids(g, prompt, vocab), random_ids(g, response, vocab),
             random_ids(g, response, vocab)) for _ in range(count)]


def time_reference_logps(setup, policy, pairs, tokens_per_pair):
    """dpo.reference_logps over the pairs, every rank its share (as in ldalign.policy_update), after
    an untimed warmup. Returns (chosen log-probs, rejected log-probs, the "reference" record)."""
    micro_batch, device, world = setup.cfg["micro_batch"], setup.device, setup.world
    dpo.reference_logps(policy, pairs[:micro_batch * world], micro_batch, device)
    reset_peak_memory(device)
    synchronize(device)
    t0 = time.perf_counter()
    ref_chosen, ref_rejected = dpo.reference_logps(policy, pairs, micro_batch, device)
    synchronize(device)
    seconds, peak_gb = time.perf_counter() - t0, peak_memory_gb(device)
    # per GPU; MFU of a forward only: 2N FLOPs per token
    tokens_per_s = len(pairs) * tokens_per_pair / seconds / world
    mfu = 2 * setup.n_params * tokens_per_s / setup.peak_flops if setup.peak_flops else None
    record = dict(pairs=len(pairs), seconds=seconds, tokens_per_s=tokens_per_s,
                  peak_mem_gb=peak_gb, mfu=mfu)
    return ref_chosen, ref_rejected, record


def time_dpo_update(setup, policy, pairs, ref_chosen, ref_rejected, tokens_per_pair, warmup):
    """One epoch of dpo.dpo_train over the pairs, whose first `warmup` optimizer steps (optimizer
    state, allocator) are not timed. Returns bench.json's "dpo" record."""
    cfg, device, n_params, peak_flops = setup.cfg, setup.device, setup.n_params, setup.peak_flops
    batch, micro_batch, steps = cfg["dpo_batch"], cfg["micro_batch"], cfg["dpo_steps"]
    prompt, response = cfg["dpo_prompt"], cfg["dpo_response"]
    # dpo_train calls log_fn after every optimizer step (log_every=1): the time each step ends
    step_ends = []

    def stamp(_record):
        synchronize(device)
        step_ends.append(time.perf_counter())

    reset_peak_memory(device)
    # bf16 autocast around each forward inside (fsdp.autocast)
    history = dpo.dpo_train(policy, pairs, ref_chosen, ref_rejected, torch.ones(len(pairs)),
                            beta=cfg["beta"], lr=cfg["lr"], epochs=1, batch_size=batch,
                            micro_batch_size=micro_batch, device=device, optimizer=cfg["optimizer"],
                            warmup_ratio=0.0, seed=cfg["seed"], log_every=1, log_fn=stamp)
    peak_gb = peak_memory_gb(device)
    step_s = (step_ends[-1] - step_ends[warmup - 1]) / steps
    # per GPU; MFU = 6N FLOPs per token / peak, and without the input embedding (a lookup, no FLOPs)
    tokens_per_s = batch * tokens_per_pair / step_s / setup.world
    mfu = 6 * n_params * tokens_per_s / peak_flops if peak_flops else None
    non_embedding = n_params - cfg["vocab"] * cfg["hidden"]
    mfu_nonembedding = 6 * non_embedding * tokens_per_s / peak_flops if peak_flops else None
    # share of the 6N FLOPs per token that is not run: dpo.policy_logps skips the lm_head on the
    # prompt positions (all but the last) of every sequence
    head_skipped = cfg["vocab"] * cfg["hidden"] * (prompt - 1) / (n_params * (prompt + response))
    return dict(prompt=prompt, response=response, batch=batch, micro_batch=micro_batch,
                tokens_per_step=batch * tokens_per_pair, warmup_steps=warmup, timed_steps=steps,
                step_s=step_s, tokens_per_s=tokens_per_s, mfu=mfu, peak_mem_gb=peak_gb,
                mfu_nonembedding=mfu_nonembedding, first_loss=history[0]["loss"],
                last_loss=history[-1]["loss"], grad_ckpt=cfg["grad_ckpt"],
                optimizer=cfg["optimizer"], head_skipped_frac=head_skipped)


def bench_dpo(setup, policy):
    """Phase 2: the reference log-probs, then the DPO policy update, on the same random pairs (fp32
    master weights, bf16 compute through fsdp.autocast on CUDA). Returns the "reference" and "dpo"
    records."""
    cfg = setup.cfg
    warmup = max(1, cfg["dpo_warmup"])
    pairs = make_pairs(cfg, cfg["dpo_batch"] * (warmup + cfg["dpo_steps"]))
    # non-pad tokens: the prompt twice (in the chosen and in the rejected sequence), both responses
    tokens_per_pair = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs) / len(pairs)
    ref_chosen, ref_rejected, reference = time_reference_logps(setup, policy, pairs,
                                                               tokens_per_pair)
    update = time_dpo_update(setup, policy, pairs, ref_chosen, ref_rejected, tokens_per_pair,
                             warmup)
    return reference, update


# --------------------------------------------------------------------------------------------------
# 3. Projection to the paper's setting.
# --------------------------------------------------------------------------------------------------
def project_to_paper(record):
    """Hours per iteration in the paper's setting (PAPER), from the measured per-token rates.

    The per-token cost scales with the parameter count; 8 GPUs scale perfectly (no communication
    cost); the prompt length's effects on decode and on attention FLOPs are ignored. Returns
    bench.json's "projection" record."""
    # tokens/s of the 7B = measured tokens/s x scale
    scale = record["model"]["params"] / PAPER["params"]
    seq = PAPER["prompt_tokens"] + PAPER["response_tokens"]
    pairs, new_tokens = PAPER["pairs"], PAPER["new_tokens"]
    epochs, gpus = PAPER["epochs"], PAPER["gpus"]
    # (stage, work per iteration, rate per GPU at 7B, seconds per iteration)
    rows = []
    if "sampler" in record:
        sampler = record["sampler"]
        sources = (("sample y' (generate.py)", sampler["best"]), ("sample y' (HF generate)", "hf"))
        for name, key in sources:
            if key is None:
                continue
            rate = sampler["samplers"][key]["new_tokens_per_s"] * scale
            rows.append((name, f"{pairs} x {new_tokens} new tok", rate,
                         pairs * new_tokens / rate / gpus))
    if "dpo" in record:
        rate = record["reference"]["tokens_per_s"] * scale
        rows.append(("reference log-probs", f"{pairs} x 2 x {seq} tok", rate,
                     pairs * 2 * seq / rate / gpus))
        rate = record["dpo"]["tokens_per_s"] * scale
        rows.append((f"DPO update ({epochs} epochs)", f"{epochs} x {pairs} x 2 x {seq} tok", rate,
                     epochs * pairs * 2 * seq / rate / gpus))
    per_iteration = sum(seconds for name, _, _, seconds in rows if "HF" not in name)
    notes = ("per-token cost x (7.24B / measured params); 8 GPUs scale perfectly; guide training, "
             "distances and evaluation ignored; every sequence at the 512+256 cap; decode rate "
             "measured at this run's batch and prompt")
    stages = {name: dict(work=work, tokens_per_s_per_gpu=rate, hours_per_iteration=seconds / 3600)
              for name, work, rate, seconds in rows}
    return dict(assumptions=dict(PAPER, param_scale=scale, perfect_scaling=True, notes=notes),
                stages=stages, hours_per_iteration=per_iteration / 3600,
                hours_total=PAPER["iterations"] * per_iteration / 3600)


# --------------------------------------------------------------------------------------------------
# Report: the tables on stdout (rank 0); the numbers as JSON and the tables as Markdown (rank 0,
# atomically).
# --------------------------------------------------------------------------------------------------
def print_sampler_table(sampler):
    ragged = " (left-padded, ragged)" if sampler["left_pad"] else ""
    log(f"\nsampler: batch {sampler['batch']}, prompt {sampler['prompt_len']}{ragged}, "
        f"{sampler['new_tokens']} new tokens, greedy, {sampler['precision']}; "
        f"weights {fmt(sampler['weights_gb'], '.2f')} GiB")
    log(f"  {'per GPU':42s} {'new tok/s':>10s} {'decode steps/s':>14s} {'seconds':>8s} "
        f"{'warmup s':>8s} {'peak GiB':>8s} {'vs HF':>6s} {'= HF tokens':>11s}")
    for r in sampler["samplers"].values():
        if "error" in r:
            log(f"  {r['name']:42s} FAILED: {r['error'][:200]}")
            continue
        log(f"  {r['name']:42s} {r['new_tokens_per_s']:10.1f} {r['decode_steps_per_s']:14.1f} "
            f"{r['seconds']:8.2f} {r['warmup_s']:8.1f} {fmt(r['peak_mem_gb'], '.2f'):>8s} "
            f"{r['speedup_vs_hf']:5.2f}x {r['token_match_frac']:11.3f}")
    identical = [key for key, r in sampler["samplers"].items() if r.get("first_k_identical")]
    first_rows, first_tokens = sampler["first_k"]
    log(f"  decode roofline {fmt(sampler['roofline_decode_steps_per_s'], '.0f')} steps/s "
        f"(HBM {fmt(sampler['hbm_bw'], '.3g')} B/s); '= HF tokens': share of greedy tokens equal "
        f"to HF's (first {first_rows} rows x {first_tokens} tokens identical: "
        f"{', '.join(identical) or 'none'})")


def print_dpo_table(reference, update):
    log(f"\nDPO: {update['batch']} pairs/step (micro-batch {update['micro_batch']}), prompt "
        f"{update['prompt']} + response {update['response']} tokens, "
        f"{update['tokens_per_step']:.0f} tokens/step, {update['optimizer']}, "
        f"grad_ckpt={update['grad_ckpt']}")
    log(f"  {'':22s} {'tok/s/GPU':>11s} {'MFU':>7s} {'peak GiB':>9s}")
    log(f"  {'reference log-probs':22s} {reference['tokens_per_s']:11.1f} "
        f"{fmt(reference['mfu'], '.3f'):>7s} {fmt(reference['peak_mem_gb'], '.2f'):>9s}"
        f"  (forward only: MFU = 2N tok/s / peak)")
    log(f"  {'policy update':22s} {update['tokens_per_s']:11.1f} {fmt(update['mfu'], '.3f'):>7s} "
        f"{fmt(update['peak_mem_gb'], '.2f'):>9s}"
        f"  ({update['step_s']:.3f} s/step over {update['timed_steps']} steps; "
        f"loss {update['first_loss']:.4f} -> {update['last_loss']:.4f}; "
        f"MFU by non-embedding parameters {fmt(update['mfu_nonembedding'], '.3f')})")


def print_projection_table(projection):
    scale, iterations = projection["assumptions"]["param_scale"], PAPER["iterations"]
    log(f"\nprojection to the paper: {PAPER['params'] / 1e9:.2f}B params "
        f"(x{1 / scale:.2f} the measured per-token cost), {PAPER['pairs']} pairs, "
        f"{iterations} iterations x {PAPER['epochs']} epochs, {PAPER['gpus']} GPUs, "
        f"perfect scaling ASSUMED")
    log(f"  {'stage':28s} {'work per iteration':26s} {'tok/s/GPU (7B)':>15s} {'h/iteration':>12s} "
        f"{'h total':>9s}")
    for name, stage in projection["stages"].items():
        hours = stage["hours_per_iteration"]
        log(f"  {name:28s} {stage['work']:26s} {stage['tokens_per_s_per_gpu']:15.1f} "
            f"{hours:12.2f} {iterations * hours:9.2f}")
    log(f"  {'total (generate.py sampler)':28s} {'':26s} {'':15s} "
        f"{projection['hours_per_iteration']:12.2f} {projection['hours_total']:9.2f}")
    log("  (guide training, distances and evaluation not included; sequences at the 512+256 cap)")


def print_tables(record):
    if "sampler" in record:
        print_sampler_table(record["sampler"])
    if "dpo" in record:
        print_dpo_table(record["reference"], record["dpo"])
    print_projection_table(record["projection"])


def markdown(record):
    """The measured tables as Markdown: what goes into docs/reproduce.md, with the GPU and the software
    versions."""
    env, model = record["env"], record["model"]
    out = [f"Measured on {env['device']} ({env['world']} process(es), FSDP2 {env['fsdp']}), "
           f"torch {env['torch']}, transformers {env['transformers']}; Llama-shaped model with "
           f"{model['params']:,} parameters, random weights.", ""]
    if "sampler" in record:
        sampler = record["sampler"]
        out += [f"Sampler: batch {sampler['batch']}, prompt {sampler['prompt_len']}, "
                f"{sampler['new_tokens']} new tokens, greedy, {sampler['precision']}; "
                f"decode roofline {fmt(sampler['roofline_decode_steps_per_s'], '.0f')} steps/s.",
                "",
                "| sampler | new tokens/s | decode steps/s | vs HF generate | peak GiB "
                "| tokens = HF's |", "|---|---|---|---|---|---|"]
        for r in sampler["samplers"].values():
            if "error" in r:
                out.append(f"| {r['name']} | FAILED: {r['error'][:120]} | | | | |")
                continue
            out.append(f"| {r['name']} | {r['new_tokens_per_s']:.0f} | "
                       f"{r['decode_steps_per_s']:.1f} | {r['speedup_vs_hf']:.2f}x | "
                       f"{fmt(r['peak_mem_gb'], '.1f')} | {r['token_match_frac']:.3f} |")
        out.append("")
    if "dpo" in record:
        update, reference = record["dpo"], record["reference"]
        out += [f"DPO: {update['batch']} pairs per step (micro-batch {update['micro_batch']}), "
                f"prompt {update['prompt']} + response {update['response']} tokens, "
                f"{update['optimizer']}, activation checkpointing {update['grad_ckpt']}, compiled "
                f"blocks {record['config']['compile']}. MFU = 6 x parameters x tokens/s / peak "
                f"bf16 FLOP/s; that count includes the lm_head on prompt positions, which "
                f"`dpo.policy_logps` skips ({update['head_skipped_frac']:.1%} of it here), the "
                f"input embedding (a lookup: {fmt(update['mfu_nonembedding'], '.1%')} MFU without "
                f"it), and leaves out attention's own FLOPs.", "",
                "| stage | tokens/s per GPU | MFU | peak GiB |", "|---|---|---|---|"]
        stages = (("reference log-probs (forward)", reference), ("DPO policy update", update))
        for name, r in stages:
            out.append(f"| {name} | {r['tokens_per_s']:.0f} | {fmt(r['mfu'], '.1%')} | "
                       f"{fmt(r['peak_mem_gb'], '.1f')} |")
        out.append("")
    projection = record["projection"]
    out += ["Projected paper setting (7.24B, 50k pairs, 3 iterations x 2 epochs, 8 GPUs, "
            "perfect scaling assumed):", "",
            "| stage | work per iteration | tokens/s per GPU (7B) | hours per iteration |",
            "|---|---|---|---|"]
    for name, stage in projection["stages"].items():
        out.append(f"| {name} | {stage['work']} | {stage['tokens_per_s_per_gpu']:.0f} | "
                   f"{stage['hours_per_iteration']:.2f} |")
    out += [f"| **total** (generate.py sampler) | | | **{projection['hours_per_iteration']:.2f}** "
            f"(x3 = {projection['hours_total']:.1f} h) |", ""]
    return "\n".join(out)


def write_outputs(record, path):
    """bench.json (the numbers) and, next to it, bench.md (the tables in Markdown); both atomic."""
    write_atomic(path, json.dumps(record, indent=2))
    md_path = os.path.splitext(path)[0] + ".md"
    write_atomic(md_path, markdown(record))
    log(f"\nwrote {path} and {md_path} (the tables in Markdown, for docs/reproduce.md)")


# --------------------------------------------------------------------------------------------------
# main: the phases in order
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    setup = setup_run(cfg)
    record = new_record(setup)
    n_params = setup.n_params
    log(f"bench | size={cfg['size']} Llama {n_params:,} parameters ({n_params / 1e9:.3f}B) | "
        f"{setup.world} process(es) on {setup.gpu} | FSDP2={setup.use_fsdp} "
        f"grad_ckpt={cfg['grad_ckpt']} | torch {torch.__version__}")
    # under FSDP one model serves both phases
    policy = build_model(setup, torch.float32) if setup.use_fsdp else None
    if not cfg["skip_gen"]:
        record["sampler"] = bench_samplers(setup, policy)
        # the samplers' model and outputs went with bench_samplers (under FSDP `policy` holds it)
        reset_peak_memory(setup.device, free=True)
    if not cfg["skip_dpo"]:
        # fp32 master weights. With --compile a fresh model with compiled blocks (the samplers ran
        # an uncompiled one), and nothing may keep the old one alive (and in its peak memory)
        if policy is None or cfg["compile"]:
            policy = None
            reset_peak_memory(setup.device, free=True)
            policy = build_model(setup, torch.float32, compile_blocks=cfg["compile"])
        record["reference"], record["dpo"] = bench_dpo(setup, policy)
    record["projection"] = project_to_paper(record)
    print_tables(record)
    if setup.rank == 0:
        write_outputs(record, cfg["out"])
    fsdp.finish()


if __name__ == "__main__":
    report_errors(main)  # a user error: one line, exit status 2; a bug: its traceback
