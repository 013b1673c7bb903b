"""Speed of the two hot loops of LD-Align on one GPU, and what they imply for the paper's setting.

    python bench.py                                     # CUDA: ~1.1B Llama, bf16; CPU: a tiny one (< 1 min)
    torchrun --nproc_per_node=1 bench.py                # the same, policy wrapped with FSDP2 (fsdp.parallelize)
    python bench.py --grad_ckpt true --micro_batch 8    # any default below can be overridden as --key value
                                                        # (on the CPU's tiny size add --dpo_batch 8)
    python bench.py --compile true --samplers hf,compile   # compiled blocks for the DPO update; two samplers

Measures, on a Llama built from a config with random weights (nothing is downloaded):
  1. the sampler (Algorithm 1, lines 2 and 7): generate.generate with a DynamicCache, with a StaticCache, and
     with a StaticCache + torch.compile'd decode step (CUDA graphs), vs transformers' model.generate; same model,
     same random prompts, greedy, forced to the full length, in the same run; new tokens/s, decode steps/s,
     peak memory, and how many greedy tokens agree with HF's (bf16 near-ties may legitimately diverge late);
  2. the reference log-probs (dpo.reference_logps, forward only) and the DPO policy update (dpo.dpo_train:
     one forward of 2B sequences, backward, clipping, RMSprop), tokens/s and MFU = 6 N tokens/s / peak
     (2 N for the forward-only reference), also without the input embedding;
  3. a projection of the paper's wall time (7B, 50k pairs, 3 iterations, 8 GPUs) from those per-token costs.
Prints a table and writes the numbers to --out (JSON, atomically) and the tables to the same name with .md.
"""
import contextlib
import os
import json
import sys
import time

import torch

import dpo
import fsdp
import generate
from cli import read_overrides
from rundir import write_atomic

# ----------------------------------------------------------------------------------------------------
# Defaults. Every key can be overridden as --key value (or --key=value; a bare --flag means true).
# 0 / "" means "take it from --size" (the SIZES table below).
# ----------------------------------------------------------------------------------------------------
DEFAULTS = dict(
    size="",               # "1b" (default on CUDA) or "tiny" (default on CPU)
    out="bench.json",      # the numbers, as JSON
    seed=0,
    layers=0, hidden=0, intermediate=0, heads=0, kv_heads=0, vocab=0,  # Llama shape overrides
    # sampler
    gen_batch=0, prompt_len=0, new_tokens=0,
    left_pad=False,        # prompts of random length in [prompt_len/2, prompt_len], left padded (else all equal)
    gen_dtype="bf16",      # CUDA without FSDP: "bf16" (weights cast to bf16) or "autocast" (fp32 weights + bf16
                           # autocast, what ldalign.py does on one process); under FSDP: its bf16 mixed precision
    warmup_new=0,          # new tokens of the untimed warmup call of each sampler (0 = new_tokens: the
                           # allocator then already holds the blocks of the full-length KV cache)
    samplers="hf,dynamic,static,compile",  # which samplers to time: HF (required; first, so that its numbers
                           # come back even if a compiled sampler breaks the CUDA context) and generate.py's modes
    agree_rows=8, agree_tokens=16,  # the "first K rows x first K tokens identical" check
    hbm_bw=0.0,            # bytes/s for the decode roofline; 0 = 4.8e12 on an H200, 2.0e12 on an H100 PCIe,
                           # else 3.35e12 (H100 SXM)
    # DPO update
    fsdp="auto",           # "auto" = FSDP2 when launched by torchrun, "true", "false"
    grad_ckpt=False,       # activation checkpointing (HF gradient_checkpointing_enable)
    compile=False,         # torch.compile each transformer block of the policy for the DPO update (ldalign --compile)
    dpo_prompt=0, dpo_response=0,  # tokens of the prompt and of each response (chosen and rejected)
    dpo_batch=0, micro_batch=0,    # pairs per optimizer step (global) and per forward
    dpo_warmup=0, dpo_steps=0,     # untimed and timed optimizer steps
    optimizer="rmsprop", lr=5e-7, beta=0.1,  # the paper preset of ldalign.py (SPIN's choices)
    peak_flops=0.0,        # 0 = bf16 dense peak: 989e12 (H100 SXM, H200), 756e12 (H100 PCIe); on CPU MFU is n/a
    skip_gen=False, skip_dpo=False,
)
SIZES = {
    # ~9M parameters (most in the 32k embeddings): the whole script runs in well under a minute on 2 cores
    "tiny": dict(layers=4, hidden=128, intermediate=344, heads=4, kv_heads=2, vocab=32000, gen_batch=4,
                 prompt_len=16, new_tokens=16, dpo_prompt=16, dpo_response=16, dpo_batch=4, micro_batch=2,
                 dpo_warmup=1, dpo_steps=3),
    # TinyLlama-1.1B's shape: 1,100,048,384 parameters (untied head), GQA with 4 kv heads
    "1b": dict(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, gen_batch=64,
               prompt_len=256, new_tokens=256, dpo_prompt=256, dpo_response=256, dpo_batch=32, micro_batch=4,
               dpo_warmup=2, dpo_steps=5),
}
# The paper's setting (Section 5.1; what it leaves open follows SPIN, as ldalign.py's paper preset).
PAPER = dict(params=7.24e9,     # Mistral-7B (zephyr-7b-sft-full)
             pairs=50_000, prompt_tokens=512, response_tokens=256,  # (512 + 256) tokens per sequence, at the cap
             new_tokens=256, iterations=3, epochs=2, gpus=8)


def parse_args(argv):
    src = open(os.path.abspath(__file__)).read()
    cfg = dict(DEFAULTS, **read_overrides(argv, DEFAULTS, __doc__ + "\n" + src[src.index("DEFAULTS = dict("):src.index("SIZES = {")]))
    cfg["size"] = cfg["size"] or ("1b" if torch.cuda.is_available() else "tiny")
    if cfg["size"] not in SIZES:
        raise SystemExit(f"--size is one of {', '.join(SIZES)}")
    for k, v in SIZES[cfg["size"]].items():
        cfg[k] = cfg[k] or v
    if cfg["fsdp"] not in ("auto", "true", "false") or cfg["gen_dtype"] not in ("bf16", "autocast"):
        raise SystemExit("--fsdp is auto/true/false; --gen_dtype is bf16/autocast")
    if cfg["dpo_batch"] % cfg["micro_batch"]:
        raise SystemExit("--dpo_batch must be a multiple of --micro_batch")
    return cfg


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world, device = fsdp.init()
    cuda = device.type == "cuda"
    use_fsdp = {"auto": "RANK" in os.environ, "true": True, "false": False}[cfg["fsdp"]]
    if (use_fsdp and "RANK" not in os.environ) or (world > 1 and not use_fsdp):
        raise SystemExit("--fsdp true needs torchrun; several processes need FSDP")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    def log(msg=""):
        if rank == 0:
            print(msg, flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def reset_mem(free=False):  # free=True only between phases: an empty allocator cache would be re-filled
        if cuda:                  # by slow cudaMallocs inside the timed region
            if free:
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb():  # None on CPU (printed as n/a)
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    # eos_token_id=None: no token ends a row, so both samplers run exactly new_tokens steps (generate.py
    # skips the EOS check; HF adds no stopping criterion). Prompt ids avoid 0..2 (pad/bos/old eos).
    mcfg = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                       num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       num_key_value_heads=cfg["kv_heads"], max_position_embeddings=4096, bos_token_id=1,
                       eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)

    def build(dtype, compile_blocks=False):
        """Same seed, same random weights; initialised directly on the device (fast even for 1B)."""
        torch.manual_seed(cfg["seed"])
        with torch.device(device):
            m = LlamaForCausalLM(mcfg)
        if cfg["grad_ckpt"]:
            # as fsdp.load_policy: before wrapping, active in training mode only (newer HF renamed it)
            (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
        if compile_blocks:
            fsdp.compile_blocks(m)  # as fsdp.load_policy with --compile true
        m = m.to(dtype)
        return fsdp.parallelize(m, device) if use_fsdp else m

    with torch.device("meta"):
        meta = LlamaForCausalLM(mcfg)  # shapes only, no memory
    n_params = sum(p.numel() for p in meta.parameters())  # exact, embeddings and head included
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    # bf16 dense peak and HBM bandwidth: H100 SXM and H200 989 TFLOP/s (3.35 / 4.8 TB/s); H100 PCIe 756 (2.0)
    peak_flops = cfg["peak_flops"] or ((756e12 if "PCIe" in gpu else 989e12) if cuda else None)
    hbm_bw = cfg["hbm_bw"] or (4.8e12 if "H200" in gpu else 2.0e12 if "PCIe" in gpu else 3.35e12)
    R = dict(config=cfg, env=dict(torch=torch.__version__, transformers=__import__("transformers").__version__,
                                  device=gpu, world=world, fsdp=use_fsdp, threads=torch.get_num_threads()),
             model=dict(params=n_params, attn=getattr(meta.config, "_attn_implementation", None),
                        shape={k: cfg[k] for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")}))
    log(f"bench | size={cfg['size']} Llama {n_params:,} parameters ({n_params / 1e9:.3f}B) | {world} process(es) on "
        f"{gpu} | FSDP2={use_fsdp} grad_ckpt={cfg['grad_ckpt']} | torch {torch.__version__}")
    policy = build(torch.float32) if use_fsdp else None  # under FSDP one model serves both phases

    # ------------------------------------------------------------------------------------------------
    # 1. Sampler: generate.generate vs HF generate, greedy, full length, same model and prompts.
    # ------------------------------------------------------------------------------------------------
    if not cfg["skip_gen"]:
        B, T, N = cfg["gen_batch"], cfg["prompt_len"], cfg["new_tokens"]
        g = torch.Generator().manual_seed(cfg["seed"] + 1 + rank)  # each rank its own prompts
        lens = torch.randint(T // 2, T + 1, (B,), generator=g).tolist() if cfg["left_pad"] else [T] * B
        prompts = [torch.randint(3, cfg["vocab"], (n,), generator=g).tolist() for n in lens]
        ids, mask = (t.to(device) for t in generate.pad_sequences(prompts, 0, side="left"))  # (B, T)
        if use_fsdp:  # bf16 through FSDP's mixed precision (fsdp.autocast is then off)
            gm, dtype_name = policy, "FSDP2 " + ("bf16 mixed precision" if cuda else "fp32") + ", gathered_weights"
        elif cuda and cfg["gen_dtype"] == "bf16":  # pure bf16 weights: no autocast needed
            gm, dtype_name = build(torch.bfloat16), "bf16 weights"
        else:  # what ldalign.py does on one process: fp32 weights, bf16 autocast on CUDA
            gm, dtype_name = build(torch.float32), "fp32 weights + bf16 autocast" if cuda else "fp32"
        amp = contextlib.nullcontext() if dtype_name == "bf16 weights" else fsdp.autocast(device, gm)
        gm.eval()
        weights_gb = torch.cuda.memory_allocated() / 2**30 if cuda else None
        # The samplers: generate.py in its three modes, and transformers' own generate (the baseline).
        # As sample_responses does: one StaticCache per sampler, reused by all its calls (warmup and timed),
        # dropped when that sampler is done (so it does not count in the next one's peak memory).
        L = generate.static_width(T) + max(N, cfg["warmup_new"])
        caches = {}

        def ours(static=False, compile=False):
            def run(n):
                if static and compile not in caches:
                    caches[compile] = generate.new_static_cache(gm, L)
                cache = caches.get(compile) if static else None
                return generate.generate(gm, ids, mask, n, eos_token_id=None, pad_token_id=0, temperature=0.0,
                                         static=static, compile=compile, cache=cache)
            return run
        samplers = {"dynamic": ("generate.py, DynamicCache", ours()),
                    "static": ("generate.py, StaticCache", ours(static=True)),
                    "compile": ("generate.py, StaticCache + torch.compile", ours(static=True, compile=True)),
                    "hf": ("HF generate", lambda n: gm.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                                max_new_tokens=n, min_new_tokens=n,
                                                                pad_token_id=0)[:, ids.shape[1]:])}
        chosen = [k.strip() for k in cfg["samplers"].split(",")]
        if "hf" not in chosen or any(k not in samplers for k in chosen):
            raise SystemExit(f"--samplers: comma-separated from {', '.join(samplers)}; 'hf' (the baseline) is required")

        def timed(fn, n):
            fsdp.barrier()
            reset_mem()
            sync()
            t0 = time.perf_counter()
            out = fn(n)
            sync()
            return out, time.perf_counter() - t0, peak_gb()

        results, outputs = {}, {}
        # gathered_weights: under FSDP the weights are all-gathered once here, not at every decode step
        # (test_fsdp_generation_gathers_weights_once counts them); a no-op for a plain model.
        with fsdp.gathered_weights(gm), amp:
            for key in chosen:
                name, fn = samplers[key]
                try:  # one sampler failing (say, torch.compile on an unusual setup) still reports the others
                    t0 = time.perf_counter()
                    fn(cfg["warmup_new"] or N)  # untimed: CUDA context, cuBLAS, allocator, compilation
                    warm_s = time.perf_counter() - t0
                    _, prefill_s, _ = timed(fn, 1)  # prefill + one argmax: subtracted to get decode steps/s
                    out, s, mem = timed(fn, N)
                except Exception as e:  # noqa: BLE001 (reported in the table and the JSON)
                    results[key] = dict(name=name, error=f"{type(e).__name__}: {e}"[:500])
                    log(f"  {name}: FAILED {results[key]['error']}")
                    if key == "hf":
                        raise
                    continue
                finally:
                    caches.clear()  # this sampler's StaticCache, if any
                assert out.shape == (B, N), out.shape
                outputs[key] = out
                results[key] = dict(name=name, seconds=s, warmup_s=warm_s, prefill_s=prefill_s,
                                    new_tokens_per_s=B * N / s, decode_steps_per_s=(N - 1) / max(s - prefill_s, 1e-9),
                                    peak_mem_gb=mem)
                if cuda:
                    torch.cuda.empty_cache()
        kr, kt = min(cfg["agree_rows"], B), min(cfg["agree_tokens"], N)
        for key, out in outputs.items():  # greedy agreement with HF generate (bf16 near-ties may diverge late)
            eq = out == outputs["hf"]  # (B, N)
            first_diff = torch.where(eq.all(1), N, (~eq).float().argmax(1))  # (B,) common prefix length
            results[key].update(speedup_vs_hf=results["hf"]["seconds"] / results[key]["seconds"],
                                token_match_frac=eq.float().mean().item(),
                                common_prefix_frac=(first_diff.float() / N).mean().item(),
                                first_k_identical=bool(eq[:kr, :kt].all()))
        kv_bytes = B * (sum(lens) / B + N / 2) * cfg["layers"] * 2 * cfg["kv_heads"] * (cfg["hidden"] // cfg["heads"]) * 2
        # decode is memory bound: every step reads the bf16 weights (less the embedding table) and the KV cache
        roofline = hbm_bw / (2 * (n_params - cfg["vocab"] * cfg["hidden"]) + kv_bytes)
        ok = [k for k in outputs if k != "hf"]
        best = max(ok, key=lambda k: results[k]["new_tokens_per_s"]) if ok else None
        R["sampler"] = dict(batch=B, prompt_len=T, new_tokens=N, left_pad=cfg["left_pad"], precision=dtype_name,
                            weights_gb=weights_gb, samplers=results, best=best, first_k=[kr, kt],
                            speedup_vs_hf=results[best]["speedup_vs_hf"] if best else None,
                            roofline_decode_steps_per_s=roofline if cuda else None, hbm_bw=hbm_bw if cuda else None)
        del gm, samplers, outputs  # under FSDP `policy` still holds the model; with --compile it is rebuilt
        reset_mem(free=True)       # below, and nothing here may keep the old one alive (and in its peak memory)

    # ------------------------------------------------------------------------------------------------
    # 2. Reference log-probs (forward only) and the DPO update (forward + backward + optimizer step).
    # ------------------------------------------------------------------------------------------------
    if not cfg["skip_dpo"]:
        if policy is None or cfg["compile"]:
            # fp32 master weights; bf16 compute via fsdp.autocast on CUDA. With --compile a fresh model with
            # compiled blocks (the sampler phase ran on an uncompiled one).
            policy = None
            reset_mem(free=True)
            policy = build(torch.float32, compile_blocks=cfg["compile"])
        P, Rl, bs, mb = cfg["dpo_prompt"], cfg["dpo_response"], cfg["dpo_batch"], cfg["micro_batch"]
        warm, steps = max(1, cfg["dpo_warmup"]), cfg["dpo_steps"]
        g = torch.Generator().manual_seed(cfg["seed"] + 7)  # identical pairs on every rank (dpo_train splits them)
        rnd = lambda n: torch.randint(3, cfg["vocab"], (n,), generator=g).tolist()
        pairs = [(rnd(P), rnd(Rl), rnd(Rl)) for _ in range(bs * (warm + steps))]
        tok_per_pair = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs) / len(pairs)  # non-pad tokens
        dpo.reference_logps(policy, pairs[:mb * world], mb, device)  # warmup
        reset_mem()
        sync()
        t0 = time.perf_counter()
        ref_c, ref_r = dpo.reference_logps(policy, pairs, mb, device)  # as in ldalign.policy_update: every rank its share
        sync()
        ref_s, ref_mem = time.perf_counter() - t0, peak_gb()
        ref_tok_s = len(pairs) * tok_per_pair / ref_s / world  # per GPU
        stamps = []

        def stamp(rec):  # dpo_train calls this after every optimizer step (log_every=1)
            sync()
            stamps.append(time.perf_counter())
        reset_mem()
        hist = dpo.dpo_train(policy, pairs, ref_c, ref_r, torch.ones(len(pairs)), beta=cfg["beta"], lr=cfg["lr"],
                             epochs=1, batch_size=bs, micro_batch_size=mb, device=device,
                             optimizer=cfg["optimizer"], warmup_ratio=0.0, seed=cfg["seed"], log_every=1,
                             log_fn=stamp)  # bf16 autocast around each forward inside (fsdp.autocast)
        step_s = (stamps[-1] - stamps[warm - 1]) / steps  # warmup steps (optimizer state, allocator) excluded
        tok_s = bs * tok_per_pair / step_s / world  # per GPU
        R["reference"] = dict(pairs=len(pairs), seconds=ref_s, tokens_per_s=ref_tok_s, peak_mem_gb=ref_mem,
                              mfu=2 * n_params * ref_tok_s / peak_flops if peak_flops else None)
        R["dpo"] = dict(prompt=P, response=Rl, batch=bs, micro_batch=mb, tokens_per_step=bs * tok_per_pair,
                        warmup_steps=warm, timed_steps=steps, step_s=step_s, tokens_per_s=tok_s,
                        mfu=6 * n_params * tok_s / peak_flops if peak_flops else None, peak_mem_gb=peak_gb(),
                        # the input embedding is a lookup, no FLOPs: MFU by the non-embedding count, for comparison
                        mfu_nonembedding=6 * (n_params - cfg["vocab"] * cfg["hidden"]) * tok_s / peak_flops
                        if peak_flops else None,
                        first_loss=hist[0]["loss"], last_loss=hist[-1]["loss"], grad_ckpt=cfg["grad_ckpt"],
                        optimizer=cfg["optimizer"],
                        # share of the 6N FLOPs per token that is not run: dpo.sequence_logps skips the lm_head
                        # on the prompt positions (all but the last) of every sequence
                        head_skipped_frac=cfg["vocab"] * cfg["hidden"] * (P - 1) / (n_params * (P + Rl)))

    # ------------------------------------------------------------------------------------------------
    # 3. Projection to the paper's setting. Per-token cost scales with the parameter count; 8 GPUs scale
    #    perfectly (no communication cost); prompt length effects on decode and attention FLOPs are ignored.
    # ------------------------------------------------------------------------------------------------
    scale = n_params / PAPER["params"]  # tokens/s of the 7B = measured tokens/s x scale
    seq = PAPER["prompt_tokens"] + PAPER["response_tokens"]
    rows = []  # (stage, work per iteration, rate per GPU at 7B, seconds per iteration)
    if "sampler" in R:
        for name, key in (("sample y' (generate.py)", R["sampler"]["best"]), ("sample y' (HF generate)", "hf")):
            if key is None:
                continue
            rate = R["sampler"]["samplers"][key]["new_tokens_per_s"] * scale
            rows.append((name, f"{PAPER['pairs']} x {PAPER['new_tokens']} new tok", rate,
                         PAPER["pairs"] * PAPER["new_tokens"] / rate / PAPER["gpus"]))
    if "dpo" in R:
        rate = R["reference"]["tokens_per_s"] * scale
        rows.append(("reference log-probs", f"{PAPER['pairs']} x 2 x {seq} tok", rate,
                     PAPER["pairs"] * 2 * seq / rate / PAPER["gpus"]))
        rate = R["dpo"]["tokens_per_s"] * scale
        rows.append((f"DPO update ({PAPER['epochs']} epochs)", f"{PAPER['epochs']} x {PAPER['pairs']} x 2 x {seq} tok",
                     rate, PAPER["epochs"] * PAPER["pairs"] * 2 * seq / rate / PAPER["gpus"]))
    per_iter = sum(s for name, _, _, s in rows if "HF" not in name)
    R["projection"] = dict(assumptions=dict(PAPER, param_scale=scale, perfect_scaling=True,
                                            notes="per-token cost x (7.24B / measured params); 8 GPUs scale perfectly; "
                                                  "guide training, distances and evaluation ignored; every sequence at "
                                                  "the 512+256 cap; decode rate measured at this run's batch and prompt"),
                           stages={name: dict(work=w, tokens_per_s_per_gpu=r, hours_per_iteration=s / 3600)
                                   for name, w, r, s in rows},
                           hours_per_iteration=per_iter / 3600, hours_total=PAPER["iterations"] * per_iter / 3600)

    # ------------------------------------------------------------------------------------------------
    # Report: a table on stdout, the numbers as JSON (rank 0, atomic).
    # ------------------------------------------------------------------------------------------------
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
    if "sampler" in R:
        s = R["sampler"]
        log(f"\nsampler: batch {s['batch']}, prompt {s['prompt_len']}{' (left-padded, ragged)' if s['left_pad'] else ''}, "
            f"{s['new_tokens']} new tokens, greedy, {s['precision']}; weights {f(s['weights_gb'], '.2f')} GiB")
        log(f"  {'per GPU':42s} {'new tok/s':>10s} {'decode steps/s':>14s} {'seconds':>8s} {'warmup s':>8s} "
            f"{'peak GiB':>8s} {'vs HF':>6s} {'= HF tokens':>11s}")
        for key, r in s["samplers"].items():
            if "error" in r:
                log(f"  {r['name']:42s} FAILED: {r['error'][:200]}")
                continue
            log(f"  {r['name']:42s} {r['new_tokens_per_s']:10.1f} {r['decode_steps_per_s']:14.1f} {r['seconds']:8.2f} "
                f"{r['warmup_s']:8.1f} {f(r['peak_mem_gb'], '.2f'):>8s} {r['speedup_vs_hf']:5.2f}x "
                f"{r['token_match_frac']:11.3f}")
        log(f"  decode roofline {f(s['roofline_decode_steps_per_s'], '.0f')} steps/s (HBM {f(s['hbm_bw'], '.3g')} B/s); "
            f"'= HF tokens': share of greedy tokens equal to HF's (first {s['first_k'][0]} rows x {s['first_k'][1]} "
            f"tokens identical: {', '.join(k for k, r in s['samplers'].items() if r.get('first_k_identical')) or 'none'})")
    if "dpo" in R:
        d, r = R["dpo"], R["reference"]
        log(f"\nDPO: {d['batch']} pairs/step (micro-batch {d['micro_batch']}), prompt {d['prompt']} + response "
            f"{d['response']} tokens, {d['tokens_per_step']:.0f} tokens/step, {d['optimizer']}, grad_ckpt={d['grad_ckpt']}")
        log(f"  {'':22s} {'tok/s/GPU':>11s} {'MFU':>7s} {'peak GiB':>9s}")
        log(f"  {'reference log-probs':22s} {r['tokens_per_s']:11.1f} {f(r['mfu'], '.3f'):>7s} "
            f"{f(r['peak_mem_gb'], '.2f'):>9s}  (forward only: MFU = 2N tok/s / peak)")
        log(f"  {'policy update':22s} {d['tokens_per_s']:11.1f} {f(d['mfu'], '.3f'):>7s} {f(d['peak_mem_gb'], '.2f'):>9s}"
            f"  ({d['step_s']:.3f} s/step over {d['timed_steps']} steps; loss {d['first_loss']:.4f} -> {d['last_loss']:.4f}; "
            f"MFU by non-embedding parameters {f(d['mfu_nonembedding'], '.3f')})")
    p = R["projection"]
    log(f"\nprojection to the paper: {PAPER['params'] / 1e9:.2f}B params (x{1 / scale:.2f} the measured per-token cost), "
        f"{PAPER['pairs']} pairs, {PAPER['iterations']} iterations x {PAPER['epochs']} epochs, {PAPER['gpus']} GPUs, "
        f"perfect scaling ASSUMED")
    log(f"  {'stage':28s} {'work per iteration':26s} {'tok/s/GPU (7B)':>15s} {'h/iteration':>12s} {'h total':>9s}")
    for name, w, rate, s_ in rows:
        log(f"  {name:28s} {w:26s} {rate:15.1f} {s_ / 3600:12.2f} {PAPER['iterations'] * s_ / 3600:9.2f}")
    log(f"  {'total (generate.py sampler)':28s} {'':26s} {'':15s} {p['hours_per_iteration']:12.2f} {p['hours_total']:9.2f}")
    log("  (guide training, distances and evaluation not included; sequences at the 512+256 cap)")
    if rank == 0:
        write_atomic(cfg["out"], json.dumps(R, indent=2))
        md = os.path.splitext(cfg["out"])[0] + ".md"
        write_atomic(md, markdown(R))
        log(f"\nwrote {cfg['out']} and {md} (the tables in Markdown, for the README)")
    fsdp.finish()


def markdown(R):
    """The measured tables as Markdown: what goes into the README, with the GPU and the software versions."""
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
    e, m = R["env"], R["model"]
    out = [f"Measured on {e['device']} ({e['world']} process(es), FSDP2 {e['fsdp']}), torch {e['torch']}, "
           f"transformers {e['transformers']}; Llama-shaped model with {m['params']:,} parameters, random weights.", ""]
    if "sampler" in R:
        s = R["sampler"]
        out += [f"Sampler: batch {s['batch']}, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, greedy, "
                f"{s['precision']}; decode roofline {f(s['roofline_decode_steps_per_s'], '.0f')} steps/s.", "",
                "| sampler | new tokens/s | decode steps/s | vs HF generate | peak GiB | tokens = HF's |",
                "|---|---|---|---|---|---|"]
        for r in s["samplers"].values():
            out.append(f"| {r['name']} | FAILED: {r['error'][:120]} | | | | |" if "error" in r else
                       f"| {r['name']} | {r['new_tokens_per_s']:.0f} | {r['decode_steps_per_s']:.1f} | "
                       f"{r['speedup_vs_hf']:.2f}x | {f(r['peak_mem_gb'], '.1f')} | {r['token_match_frac']:.3f} |")
        out.append("")
    if "dpo" in R:
        d, r = R["dpo"], R["reference"]
        out += [f"DPO: {d['batch']} pairs per step (micro-batch {d['micro_batch']}), prompt {d['prompt']} + response "
                f"{d['response']} tokens, {d['optimizer']}, activation checkpointing {d['grad_ckpt']}, compiled blocks "
                f"{R['config']['compile']}. MFU = 6 x parameters x tokens/s / peak bf16 FLOP/s; that count "
                f"includes the lm_head on prompt positions, which `dpo.sequence_logps` skips ({d['head_skipped_frac']:.1%} "
                f"of it here), the input embedding (a lookup: {f(d['mfu_nonembedding'], '.1%')} MFU without it), and "
                f"leaves out attention's own FLOPs.", "",
                "| stage | tokens/s per GPU | MFU | peak GiB |", "|---|---|---|---|",
                f"| reference log-probs (forward) | {r['tokens_per_s']:.0f} | {f(r['mfu'], '.1%')} | {f(r['peak_mem_gb'], '.1f')} |",
                f"| DPO policy update | {d['tokens_per_s']:.0f} | {f(d['mfu'], '.1%')} | {f(d['peak_mem_gb'], '.1f')} |", ""]
    p = R["projection"]
    out += ["Projected paper setting (7.24B, 50k pairs, 3 iterations x 2 epochs, 8 GPUs, perfect scaling assumed):", "",
            "| stage | work per iteration | tokens/s per GPU (7B) | hours per iteration |", "|---|---|---|---|"]
    out += [f"| {name} | {st['work']} | {st['tokens_per_s_per_gpu']:.0f} | {st['hours_per_iteration']:.2f} |"
            for name, st in p["stages"].items()]
    out += [f"| **total** (generate.py sampler) | | | **{p['hours_per_iteration']:.2f}** "
            f"(x3 = {p['hours_total']:.1f} h) |", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
