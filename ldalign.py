"""LD-Align: Algorithm 1 of arXiv 2404.06390, line for line, in main() (a banner per pseudocode line).

    python ldalign.py                                # the embedded default: the toy task, CPU
    python ldalign.py --method ldalign,spin,dpo,sft  # the competing methods, same epochs and batch
    python ldalign.py --preset paper --data ultrachat_50k.jsonl      # the paper's setting
    bash train.sh paper                              # the same, FSDP2 on 8 GPUs (torchrun)
    python ldalign.py --preset small --data train_sft.parquet   # Qwen2.5-0.5B-Instruct, 1 GPU
    python ldalign.py --preset paper --lora_r 64 --lora_base_dtype bfloat16 ...  # the 7B, 1 GPU
    python ldalign.py --out runs/x --T 5             # any default below, overridden as --key value
    python ldalign.py --preset paper --plan          # each stage's peak memory per GPU, no compute

Each stage writes its result under --out and a rerun reads back what is stored (kill it and start it
again: it goes on from the last finished stage). stages.py says which stage writes which file:

    config.json, log.txt        this call's settings, everything printed; lock.json while a run
                                holds the folder
    settings.json, stages.json  the settings the stored stages depend on (a rerun with other
                                values stops) and the digests of their inputs (a stage of changed
                                inputs is computed again)
    skipped.jsonl               (--overlength skip) every over-length record, file:line and why
    tokenizer/, sft/            (tiny preset) the BPE trained on the shipped data; theta_0, a tiny
                                Llama SFT-ed on D
    iter0/samples.jsonl         lines 1-3: y'_i ~ p_theta_0(.|x_i)
    iter0/eval.json             theta_0's greedy answers on the held-out prompts
    guide/                      line 4: T = (phi, psi) (HF safetensors, latent.safetensors,
                                guide_config.json); diagnostics.json (true / shuffled /
                                same-prompt h), agreement.json (Section 5.2 (2))
    M/iter{t}/samples.jsonl     line 7: y'_i ~ p_theta_{t-1}(.|x_i), M = ldalign, spin, dpo or sft
                                (t = 1 reuses iter0/samples.jsonl, unless
                                --reuse_line2_samples false)
    M/iter{t}/distances.jsonl   line 8: s_i = ||phi(x_i, y_i) - phi(x_i, y'_i)||_2, one row per pair
    M/iter{t}/distances.json    line 9: S = mean_i s_i, the weights s_i/S; the distribution of s
                                (Section 5.2 (1))
    M/iter{t}/policy/           line 10: theta_t (HF safetensors); train_metrics.jsonl: loss and
                                rewards per optimizer step, drawn in train_curves.png (matplotlib)
    M/iter{t}/pairs.trl.jsonl   (ldalign, spin) line 10's pairs and weights s_i/S as TRL's
                                DPOTrainer reads them (docs/trl.md, examples/trl_ldalign.py)
    M/iter{t}/eval.json         theta_t's greedy answers on held-out prompts: exact match, reward
    M/metrics.jsonl, results.md one row per iteration; comparison.md when several methods ran
    dpo/ref_logps_theta0.json   (dpo) the fixed reference's log-probs, computed in iteration 1
    tensorboard/M/              (--tensorboard true) the same numbers, as they come, for TensorBoard
    <stage>.partial/            while a stage runs, what a killed run goes on from: sampling's
                                finished batches; the update's reference log-probs and its latest
                                step checkpoint (--save_steps); removed once the stage is stored
"""
import sys

import torch

import dataset
import fsdp
from run import cli, options
from run.rundir import RunDir
from stages import METHODS, Stages

# --------------------------------------------------------------------------------------------------
# Defaults: the embedded toy run. Every key can be overridden on the command line as --key value.
# --------------------------------------------------------------------------------------------------
DEFAULTS = dict(
    # "tiny" (toy sorting task, builds everything from configs), "paper" (8 GPUs), "small" (1 GPU)
    preset="tiny",
    out="runs/tiny",          # run folder: every stage writes here, a rerun resumes from here
    # SFT set D, UltraChat-style JSONL: (x, y) = the first user / assistant turn
    data="data/sort_train.jsonl",
    eval_data="data/sort_eval.jsonl",  # held-out prompts for greedy exact match ("" to skip)
    # Algorithm 1 runs on the first N records of --data (0 = all); the paper: 50k. The tiny preset's
    # SFT of theta_0 uses all records, as the paper's SFT uses all of UltraChat 200k and LD-Align a
    # 50k subset (Section 5.1.1).
    max_examples=2000,
    max_eval=200,             # held-out prompts scored per iteration
    # prompt / response longer than the limits: "error" (file:line) or "skip" (listed)
    overlength="error",
    seed=0,                   # every stage seeds its own randomness from it (--seed + t, ...)
    # theta_0, the policy: "tiny" = SFT a tiny Llama on D from scratch, else an HF causal LM path/id
    policy="tiny",
    max_len=64,               # prompt + response tokens
    max_prompt_len=32,        # prompt tokens (after the chat template)
    # length cap of sampled y' (max_prompt_len + max_new_tokens <= max_len)
    max_new_tokens=32,
    # tiny SFT of theta_0 (tiny preset only): a weak model, leaves room for alignment to help
    sft_steps=600, sft_lr=3e-3, sft_batch_size=32,
    # sampling y' ~ p_theta(.|x) (Algorithm 1, lines 2 and 7)
    temperature=1.0, top_p=1.0, top_k=0, gen_batch_size=128,
    # generate.py with a StaticCache (fixed shapes) instead of a DynamicCache; the same tokens
    gen_static=False,
    # torch.compile the decode step (needs gen_static; CUDA graphs on GPU): compiles once per
    # sampling stage (tens of seconds), worth it when sampling thousands of prompts
    gen_compile=False,
    reuse_line2_samples=True,  # iteration 1 samples from theta_0 like lines 1-3: reuse those
    # guide T = (phi, psi) (Section 4.1): "tiny" = tiny GPT-2s from config, else a GPT-2 path/id
    guide="tiny", latent_dim=32,
    # the guide's Eq. 2 training (Algorithm 1, line 4): AdamW, warmup, cosine decay, global batch
    guide_epochs=3, guide_lr=1e-3, guide_batch_size=32,
    # the LD-Align update (Algorithm 1, line 10, Eq. 4)
    T=3,                      # iterations; the paper reports LD-Align 0, 1, 2
    # The method, or several separated by commas, run one after the other from the same theta_0
    # and guide, each T iterations of `epochs` epochs at the same batch (an equal budget when their
    # pair sets are equally large; comparison.md lists each one's optimizer steps): the paper's
    # table rows (Section 5.1.4).
    #   ldalign  weights s/S, ref theta_{t-1}     spin  weights 1, the same loop (SPIN)
    #   dpo      annotated pairs from --pref_data, ref theta_0 fixed     sft  SFT on --sft_data
    method="ldalign",
    # for dpo: JSONL with prompt, chosen, rejected (UltraFeedback binarized)
    pref_data="data/sort_pairs.jsonl",
    measure_S=True,           # dpo / sft: also sample y' and compute S (a diagnostic only)
    # The competing methods as the paper ran them (Section 5.1.4; docs/reproduce.md, "Table 1's
    # rows"):
    # spin: iteration t >= 2 trains on the pairs of iterations t-1 and t (2N), all with the
    # reference theta_{t-1}, as SPIN's scripts do; false: this iteration's N pairs (equal budget)
    spin_keep_previous=False,
    # the update's lr / beta in iterations 1, 2, ..., comma-separated, at least T values ("": --lr,
    # --beta in every iteration): SPIN's scripts set them per iteration (train.sh paper-baselines)
    lr_per_iter="", beta_per_iter="",
    # sft: "D" = continual SFT on the N pairs of D (equal budget), else on all the records of this
    # file ("" = all of --data; the paper: all of UltraChat 200k, Section 5.1.1)
    sft_data="D",
    # the temperature of Eq. 4: the paper states 0.1 for its DPO baseline (Section 5.1.4) and none
    # for LD-Align; 0.1 is also SPIN's (this project's choice)
    beta=0.1,
    # On the toy task AdamW at 1e-5 keeps held-out accuracy within the noise of theta_0; 3e-5 and
    # above, or RMSprop at 1e-5, lower it (DPO pushes down the likelihood of y and y' alike and the
    # tiny policy starts to drop numbers). A larger beta (1-2) holds the policy nearer theta_{t-1}:
    # at lr 3e-5..1e-4 it no longer lowers a weaker theta_0, nor, over 5 seeds, raises it
    # (RESULTS.md, "A weaker theta_0"). The paper preset keeps SPIN's RMSprop at 5e-7.
    lr=1e-5, optimizer="adamw", warmup_ratio=0.1, max_grad_norm=1.0,
    # epochs per iteration; the global batch of pairs per optimizer step (split between processes);
    # the pairs per forward on each process (batch_size / processes / micro_batch_size accumulated)
    epochs=2, batch_size=32, micro_batch_size=32,
    # Several micro-batches per step under torchrun (FSDP2): false (FSDP2's default) reduce-scatters
    # each micro-batch's gradients, so a GPU keeps only its 1/world shard of them; true reduce-
    # scatters once per step (one collective per step, not per micro-batch) but keeps every fp32
    # gradient unsharded until the step's last micro-batch: 4 bytes per parameter per GPU (27 GiB
    # for a 7B). --plan shows both.
    defer_grad_sync=False,
    # LoRA (lora.py): 0 = full fine-tuning; r > 0 trains rank-r adapters on --lora_targets (A
    # orthogonal, B = 0), every other weight frozen; theta_t is saved merged (fp32), its adapters
    # beside (policy/adapter/, peft's layout). Each iteration's adapters start fresh on theta_{t-1}.
    lora_r=0,
    lora_alpha=0.0,           # scaling = lora_alpha / lora_r; 0 = lora_r (scaling 1)
    lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",  # attention and MLP
    # the frozen base's dtype in memory under LoRA: "bfloat16" halves it (one process only: the
    # 7B on one GPU). theta_{t-1} is then rounded to bf16 for every stage (as for inference; exact
    # for a bf16 theta_0 such as zephyr's); theta_t is saved in fp32: rounded theta_{t-1} + B A.
    lora_base_dtype="float32",
    # A step checkpoint of the update (sharded, torch.distributed.checkpoint) every save_steps
    # optimizer steps (0 = none; SIGTERM saves one at the next step anyway): a killed or pre-empted
    # update goes on from there. Sampling keeps each finished batch. Both are removed once stored.
    save_steps=50,
    grad_ckpt=False,          # activation checkpointing of the policy (saves memory on 7B)
    compile=False,            # torch.compile each transformer block of the policy: faster steps
    log_every=10,             # a line in log.txt every log_every optimizer steps (and the last)
    # also write every step's loss, rewards, margin, lr and grad norm and every iteration's S, exact
    # match, reward and loss to out/tensorboard/<method>/ (needs `pip install tensorboard`)
    tensorboard=False,
    # evaluation (Section 5.1.3) and the analyses of Section 5.2:
    # any HF sequence-classification reward model (the paper: reward-model-deberta-v3-large-v2)
    reward_model="",
    # who judges the ranking agreement: "toy" (edit distance to y) or "reward" (the reward model)
    judge="toy",
    agreement_n=200,          # prompts of D for the ranking agreement (two samples each; 0 = skip)
    trust_remote_code=False,  # passed to from_pretrained; only for checkpoints whose code you trust
    # The hub revision (branch, tag or commit) of --policy, --guide and --reward_model, passed to
    # every from_pretrained of that model ("" = the hub's default branch). Hub ids only: a local
    # folder is read as it is. config.json records the commit each model resolved to.
    policy_revision="", guide_revision="", reward_model_revision="",
    # --plan: print each stage's peak memory per GPU (tools/plan.py: config.json only, fake
    # tensors, no GPU, no data, no run folder) for --plan_world GPUs of --plan_gpu_gb GiB, then exit
    plan=False, plan_world=8, plan_gpu_gb=80.0,
    # the plan's step-checkpoint estimate: bf16 dense TFLOP/s per GPU (312: A100; 989: H100
    # SXM), the assumed MFU of the update, the write bandwidth to --out in GB/s (all ranks together)
    plan_tflops=312.0, plan_mfu=0.4, plan_disk_gbps=1.0,
)

# The paper's setting (Section 5.1): zephyr-7b-sft-full (Mistral-7B SFT on UltraChat 200k), a
# GPT-2 guide, a 50k subset of UltraChat, three iterations. What the paper leaves open follows
# SPIN (beta 0.1, lr 5e-7, RMSprop, 2 epochs, global batch 64, max length 1024, prompt 512, 256
# new tokens) or is this project's choice: the README's table gives each value's source.
PAPER = dict(
    out="runs/paper", policy="alignment-handbook/zephyr-7b-sft-full", guide="gpt2",
    data="data/ultrachat_50k.jsonl", eval_data="", max_examples=50000, overlength="skip",
    max_len=1024, max_prompt_len=512, max_new_tokens=256, temperature=1.0, gen_batch_size=64,
    gen_static=True, gen_compile=True,
    latent_dim=64, guide_epochs=1, guide_lr=5e-5, guide_batch_size=32,
    T=3, beta=0.1, lr=5e-7, optimizer="rmsprop", epochs=2, batch_size=64,
    # From the memory plan (docs/reproduce.md, "Memory plan"): 64 / 8 GPUs = 8 pairs per rank, so
    # 8 is one micro-batch per step: the fewest forward calls and one gradient reduce-scatter per
    # step. With activation checkpointing the update peaks at 17.7 GiB per GPU and sampling (26.6
    # GiB) is the largest stage, within 8 x 40 GB: a smaller micro-batch would save memory that no
    # stage needs. On 4 GPUs (16 pairs per rank) 8 is two per step, each reduce-scattered: 31.3 GiB,
    # within 4 x 40 GB; on 4 x 80 GB, 16 (one per step, 34.9 GiB) halves the reduce-scatters.
    micro_batch_size=8,
    grad_ckpt=True, log_every=10, pref_data="data/ultrafeedback_binarized.jsonl",
    # The plan's step checkpoint on 8 GPUs: fp32 weights + RMSprop state, 6.74 GiB per rank
    # (54 GiB in all), ~58 s at 1 GB/s; a step at most ~7.6 s (8 x 7.24B parameters x 131,072
    # tokens at 40% of 312 TFLOP/s per GPU: every pair at the 1,024-token cap). Every 153 steps
    # saving costs 4.7% of the update at that step time, 9.1% at a step twice as fast; a
    # pre-emption loses at most 153 steps (~19 min; 1,564 steps per iteration, SPIN's 3,126 from
    # iteration 2). On 4 GPUs the plan suggests 77. Estimated, not measured on a GPU.
    save_steps=153,
    measure_S=False, judge="reward", agreement_n=500,
    reward_model="OpenAssistant/reward-model-deberta-v3-large-v2",
    # SPIN's data recipe, and continual SFT on all of --data (the Section 5.1.4 rows)
    spin_keep_previous=True, sft_data="")

PRESETS = {
    "tiny": {},
    "paper": PAPER,
    # One GPU of 24 GB (docs/reproduce.md, "One GPU"): Qwen2.5-0.5B-Instruct (0.49B, Qwen2
    # architecture, a chat template with a system turn; widely used, Apache-2.0) fully fine-tuned
    # from theta_0, the GPT-2 guide, the first 2,000 UltraChat 200k records, three iterations. The
    # paper preset's beta, epochs, lengths (1024: prompt 512, 256 new tokens), RMSprop, guide lr
    # and epochs. Differs: 2,000 records (not 50k); batch 32 and lr 1e-6 (125 optimizer steps per iteration, not 1,562
    # at 64 and 5e-7); the guide's batch 8, not 32. Memory (`--plan --plan_world 1 --plan_gpu_gb
    # 24`, 19.6 GiB usable): the guide's Eq. 2 on 32 rows of 1024 tokens needs 56 GiB (its two
    # GPT-2s' activations and 50,257-entry logits), on 8 rows 17.7 GiB, the largest stage; the
    # update (fp32 weights, gradients, RMSprop state 1.84 GiB each; micro-batches of 2 pairs,
    # checkpointed) 13.9 GiB; sampling 256 prompts at once 10.5 GiB (64: 5.4 GiB). The plan's
    # largest micro-batch is 3; 2 divides the 32 pairs of a step and keeps 5.7 GiB of margin,
    # and the guide is the largest stage either way. A step checkpoint every 39 steps (the
    # plan's suggestion). Every other value is the paper preset's.
    "small": dict(
        PAPER, out="runs/small", policy="Qwen/Qwen2.5-0.5B-Instruct", max_examples=2000,
        gen_batch_size=256, guide_batch_size=8, lr=1e-6, batch_size=32, micro_batch_size=2,
        agreement_n=200, save_steps=39),
}


def parse_args(argv):
    """nanoGPT-style: DEFAULTS, then the preset, then --key value pairs (typed like the
    default); then every setting checked (run/options.py), before anything runs. --help prints
    this file's docstring and DEFAULTS with their comments."""
    help_text = __doc__ + "\n" + cli.defaults_help(__file__)
    pairs = cli.read_overrides(argv, DEFAULTS, help_text)
    preset = pairs.get("preset", DEFAULTS["preset"])
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}: {', '.join(PRESETS)}")
    cfg = dict(DEFAULTS, **PRESETS[preset])
    cfg.update(pairs)
    options.check(cfg, METHODS)
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    if cfg["plan"]:
        from tools import plan
        return plan.main(cfg)  # the memory plan: printed, nothing computed, no run folder
    rank, world, device = fsdp.init()
    run = RunDir(cfg, METHODS)
    run.log(f"LD-Align | preset={cfg['preset']} method={cfg['method']} T={cfg['T']} | "
            f"{world} process(es) on {device}")
    # an option that one method alone reads, given to a call that does not run it: a warning
    for line in options.ignored(cfg, cli.read_overrides(argv, DEFAULTS, "")):
        run.log(line)
    torch.manual_seed(cfg["seed"])
    # ----------------------------------------------------------------------------------------------
    # Require: D = {(x_i, y_i)}, guide T = (phi, psi), LLM theta_0. Every record is read and checked
    # now, before any compute: a bad line fails here, naming file:line.
    # ----------------------------------------------------------------------------------------------
    data = dataset.load(cfg, run)
    methods = cfg["method"].split(",")
    run.check_settings(methods)
    stages = Stages(run, data, cfg, device)
    stages.theta_0()  # the toy SFT-s its own; else --policy
    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, lines 1-3: for i = 1..N: generate y'_i ~ p_theta_0(.|x_i)   (printed y_i: errata)
    # ----------------------------------------------------------------------------------------------
    y0 = stages.sample(None, 0)
    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, line 4: (phi, psi) = argmax sum_i log p_psi(y_i | x_i, phi(x_i, y_i))
    #                                            + log p_psi(y'_i | x_i, phi(x_i, y'_i))   (Eq. 2)
    # ----------------------------------------------------------------------------------------------
    guide = stages.guide(y0)
    stages.theta0_reports(guide)  # theta_0 on held-out prompts; Section 5.2 (2)

    # ldalign, or a competitor (Section 5.1.4), from the same theta_0 and guide
    for method in methods:
        t_first = stages.resume(method)
        # ------------------------------------------------------------------------------------------
        # Algorithm 1, line 5: for t = 1..T
        # ------------------------------------------------------------------------------------------
        for t in range(t_first, cfg["T"] + 1):
            run.log(f"===== {method} iteration {t}/{cfg['T']}: theta_{t - 1} -> theta_{t} =====")
            y_prime = w = None
            # dpo and sft train on other pairs: they sample only to measure S (--measure_S)
            if stages.samples_each_iteration(method):
                # ----------------------------------------------------------------------------------
                # Algorithm 1, lines 6-7: for i = 1..N: generate y'_i ~ p_theta_{t-1}(.|x_i)
                # ----------------------------------------------------------------------------------
                y_prime = stages.sample(method, t - 1)
                # ----------------------------------------------------------------------------------
                # Algorithm 1, line 8: s_phi(x_i, y_i, y'_i) = ||phi(x_i, y_i) - phi(x_i, y'_i)||_2
                # ----------------------------------------------------------------------------------
                s = stages.distances(method, t, guide, y_prime)
                # ----------------------------------------------------------------------------------
                # Algorithm 1, line 9: S = (1/N) sum_i s_i; the weights w_i = s_i / S (SPIN: 1)
                # ----------------------------------------------------------------------------------
                w = stages.weights(method, t, s, y_prime)  # dpo.latent_weights(s)
            # --------------------------------------------------------------------------------------
            # Algorithm 1, line 10: theta_t = argmax_theta sum_i w_i log sigma(
            #     beta log p_theta(y_i|x_i) / p_theta_{t-1}(y_i|x_i)
            #     - beta log p_theta(y'_i|x_i) / p_theta_{t-1}(y'_i|x_i))                 (Eq. 4)
            # --------------------------------------------------------------------------------------
            stages.update(method, t, y_prime, w)  # dpo.dpo_train -> dpo.ldalign_loss
            stages.evaluate(method, t)
        # Algorithm 1, lines 11-12: end for; theta_T is <method>/iter{T}/policy
    stages.write_reports(methods)
    fsdp.finish()


if __name__ == "__main__":
    cli.report_errors(main)  # a user error: one line, exit status 2; a bug: its traceback
