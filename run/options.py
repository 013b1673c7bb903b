"""What each setting of ldalign.py accepts: check(cfg) runs before anything else (ldalign.parse_args).

    options.check(cfg, methods)    # every bad value named at once, on one line (SystemExit: exit status 2)
    options.setting_at(cfg, "lr", t)    # --lr of iteration t: its --lr_per_iter value when given, else --lr
    options.ignored(cfg, given)    # warnings: options given for a method that --method does not run

Each check names the option and the value it got; a user reads it as one line (run/cli.py's report_errors).
"""
import importlib.util
import math
import os

# The range of every numeric setting (NaN fails every comparison).
POSITIVE_INT = ("max_len", "max_prompt_len", "max_new_tokens", "sft_steps", "sft_batch_size",
                "gen_batch_size", "latent_dim", "guide_epochs", "guide_batch_size", "T", "epochs",
                "batch_size", "micro_batch_size", "log_every")
NONNEGATIVE_INT = ("max_examples", "max_eval", "top_k", "agreement_n", "lora_r", "save_steps")
POSITIVE_FINITE = ("sft_lr", "guide_lr", "beta", "lr", "max_grad_norm")


def check(cfg, methods):
    """Every setting of cfg in its range, and the settings consistent with each other; `methods`: the names
    --method may take. Raises SystemExit naming each bad option and its value."""
    for m in cfg["method"].split(","):
        if m not in methods:
            raise SystemExit(f"--method takes {', '.join(methods)} (or several, comma-separated), got {m!r}")
    no_reward_model = cfg["judge"] == "reward" and not cfg["reward_model"]
    if cfg["judge"] not in ("toy", "reward") or no_reward_model:
        raise SystemExit("--judge is 'toy' or 'reward' (which needs --reward_model)")
    if cfg["gen_compile"] and not cfg["gen_static"]:
        raise SystemExit("--gen_compile true needs --gen_static true (a compiled decode step needs fixed shapes)")
    for k in ("policy", "guide", "reward_model"):
        if cfg[f"{k}_revision"] and (cfg[k] in ("", "tiny") or os.path.isdir(cfg[k])):
            raise SystemExit(f"--{k}_revision is for a hub id; --{k} {cfg[k]!r} is "
                             f"{'a local folder' if cfg[k] not in ('', 'tiny') else 'not one'}")
    if cfg["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        raise SystemExit("--tensorboard true needs the tensorboard package: pip install tensorboard")
    if cfg["overlength"] not in ("error", "skip"):
        raise SystemExit(f"--overlength is 'error' or 'skip', got {cfg['overlength']!r}")
    bad = [f"--{k} must be > 0, got {cfg[k]!r}" for k in POSITIVE_INT if not cfg[k] > 0]
    # (top_k -1 would keep the argmin)
    bad += [f"--{k} must be >= 0, got {cfg[k]!r}" for k in NONNEGATIVE_INT if not cfg[k] >= 0]
    bad += [f"--{k} must be a finite number > 0, got {cfg[k]!r}" for k in POSITIVE_FINITE
            if not 0 < cfg[k] < math.inf]
    if not 0 <= cfg["temperature"] < math.inf:
        bad.append(f"--temperature must be >= 0 (0 = greedy), got {cfg['temperature']!r}")
    if not 0 < cfg["top_p"] <= 1:
        bad.append(f"--top_p must be in (0, 1], got {cfg['top_p']!r}")
    if not 0 <= cfg["lora_alpha"] < math.inf:
        bad.append(f"--lora_alpha must be a finite number >= 0 (0 = lora_r), got {cfg['lora_alpha']!r}")
    if cfg["lora_base_dtype"] not in ("float32", "bfloat16"):
        bad.append(f"--lora_base_dtype is 'float32' or 'bfloat16', got {cfg['lora_base_dtype']!r}")
    elif cfg["lora_base_dtype"] == "bfloat16" and not (cfg["lora_r"] and os.environ.get("WORLD_SIZE", "1") == "1"):
        bad.append("--lora_base_dtype bfloat16 needs --lora_r > 0 and one process (under torchrun the base is "
                   "sharded in fp32)")
    if cfg["lora_r"] and not cfg["lora_targets"].strip(", "):
        bad.append("--lora_targets names no module (e.g. q_proj,v_proj)")
    if not 0 <= cfg["warmup_ratio"] < 1:
        bad.append(f"--warmup_ratio must be in [0, 1), got {cfg['warmup_ratio']!r}")
    for k in ("lr", "beta"):
        # (NaN and inf fail the range check)
        try:
            values = per_iteration(cfg, k)
        except ValueError:
            values = [math.nan]
        if not all(0 < v < math.inf for v in values):
            bad.append(f"--{k}_per_iter takes finite numbers > 0, comma-separated, got {cfg[k + '_per_iter']!r}")
        elif values and len(values) < cfg["T"]:
            bad.append(f"--{k}_per_iter has {len(values)} value(s) for --T {cfg['T']} iterations")
    if cfg["optimizer"] not in ("adamw", "rmsprop"):
        bad.append(f"--optimizer is 'adamw' or 'rmsprop', got {cfg['optimizer']!r}")
    # --plan's GPUs and assumptions
    if not cfg["plan_world"] > 0:
        bad.append(f"--plan_world must be > 0, got {cfg['plan_world']!r}")
    bad += [f"--{k} must be a finite number > 0, got {cfg[k]!r}"
            for k in ("plan_gpu_gb", "plan_tflops", "plan_disk_gbps") if not 0 < cfg[k] < math.inf]
    if not 0 < cfg["plan_mfu"] <= 1:
        bad.append(f"--plan_mfu must be in (0, 1], got {cfg['plan_mfu']!r}")
    if bad:
        raise SystemExit("; ".join(bad))
    if cfg["max_prompt_len"] + cfg["max_new_tokens"] > cfg["max_len"]:
        raise SystemExit("need max_prompt_len + max_new_tokens <= max_len (a sampled y' must fit in training)")
    # torchrun's processes: the global batches are split between them
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for k in ("batch_size", "guide_batch_size"):
        if cfg[k] % world:
            raise SystemExit(f"--{k} {cfg[k]} must be a multiple of the number of processes ({world})")


# The options that one method alone reads (stages.METHODS): given on the command line to a call that does not run
# that method, they are ignored, and the log says so (a warning, not an error: `train.sh paper-baselines` passes the
# user's options to each method's call). A preset's values are not the user's: only the options given count.
READ_BY = {"sft_data": "sft", "pref_data": "dpo", "spin_keep_previous": "spin"}


def ignored(cfg, given):
    """A warning line for each option of READ_BY among `given` (the options on the command line: read_overrides'
    keys) whose method --method does not run."""
    methods = cfg["method"].split(",")
    return [f"warning: --{k} is read by --method {m} alone, which --method {cfg['method']} does not run: ignored"
            for k, m in READ_BY.items() if k in given and m not in methods]


# The per-iteration settings. SPIN's scripts set the lr and beta per iteration (train.sh paper-baselines cites
# them); a list per setting, rather than one option per method, because a method's settings are already its
# own: each call on a run folder runs its methods at its --lr, --beta (run/rundir.py binds them per method).
def per_iteration(cfg, key):
    """The values of --{key}_per_iter for iterations 1, 2, ... ([] when not given); ValueError if one is not a
    number (check tells the user)."""
    text = cfg[f"{key}_per_iter"]
    return [float(v) for v in text.split(",")] if text else []


def setting_at(cfg, key, t):
    """--lr or --beta of iteration t: its --{key}_per_iter value when given, else the one value."""
    values = per_iteration(cfg, key)
    return values[t - 1] if values else cfg[key]
