"""The run folder: settings, log, and the one "stored -> read back, else compute and write atomically".

Every stage of a run writes its result under --out; a rerun (after a kill, a crash, or to add a method) reads
back what is stored and computes only the rest. Everything about that lives here:

    run = RunDir(cfg)                        # out/config.json, out/log.txt; run.log prints once (rank 0)
    run.check_settings(methods)              # out/settings.json: a rerun with other settings stops, naming them
    x = run.cached("iter0/samples.jsonl", compute)   # stored -> read back; else compute, write atomically, barrier
    t_first = run.first_unsaved(method, T)   # resume point: the first iteration whose theta_t is not saved
    run.save_policy(model, tok, "ldalign/iter1/policy")   # theta_t as an HF checkpoint (safetensors)
    run.kill_point("ldalign/iter1/train")    # the tests' crash hook (LDALIGN_KILL_AT)

Written atomically means: into a sibling "<name>.tmp", then renamed over the name (atomic_path). A file or
folder that exists is therefore complete, and a killed run never leaves a half-written result a rerun would trust.
"""
import contextlib
import json
import os
import shutil

import fsdp


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; write a file or a folder there; on success it replaces `path`.

    The one atomic-write helper of the project (files, JSON, checkpoints, the guide, the tokenizer, PNGs).
    On an exception the temporary is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    _remove(tmp)  # left over by a killed run
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):  # os.replace cannot overwrite a non-empty folder
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def write_atomic(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_hf(model, tokenizer, out_dir):
    """A causal LM as an HF checkpoint (config.json + model.safetensors + tokenizer), written atomically.
    Under FSDP2 the full state dict is gathered to rank 0's CPU first: every rank must call this."""
    state_dict = fsdp.full_state_dict(model)
    if fsdp.rank() == 0:
        with atomic_path(out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)  # safetensors is the default format
            cfg = read_json(os.path.join(tmp, "config.json"))
            # FSDP2 renames the class (FSDPLlamaForCausalLM); store the real architecture name.
            cfg["architectures"] = [a[4:] if a.startswith("FSDP") else a for a in cfg.get("architectures") or []]
            write_json(os.path.join(tmp, "config.json"), cfg)
            tokenizer.save_pretrained(tmp)
    fsdp.barrier()


# ----------------------------------------------------------------------------------------------------
# Command line: --key value over a dict of typed defaults (ldalign.py and bench.py)
# ----------------------------------------------------------------------------------------------------
def read_overrides(argv, defaults, help_text):
    """`--key value`, `--key=value` or a bare `--flag` (= true), keys checked against `defaults`, values typed
    like the default. -h / --help prints help_text."""
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


# ----------------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------------
# The settings the stored stages depend on; a rerun that changes one of them stops (check_settings) instead of
# mixing two runs. The others (T, method, micro-batch and sampling batch, compile flags, logging) may change.
SHARED_KEYS = ("data", "max_examples", "overlength", "seed", "policy", "max_len", "max_prompt_len", "max_new_tokens",
               "sft_steps", "sft_lr", "sft_batch_size", "temperature", "top_p", "top_k",
               "guide", "latent_dim", "guide_epochs", "guide_lr", "guide_batch_size",  # theta_0, iter0/, guide/
               "eval_data", "max_eval", "reward_model", "judge", "agreement_n")  # every eval.json, agreement.json
METHOD_KEYS = ("reuse_line2_samples", "pref_data", "beta", "lr", "optimizer", "warmup_ratio", "max_grad_norm",
               "epochs", "batch_size")  # <method>/iter*/: each method its own (a later call may run dpo at its lr)


class RunDir:
    def __init__(self, cfg):
        self.cfg, self.out = cfg, cfg["out"]
        os.makedirs(self.out, exist_ok=True)
        if fsdp.rank() == 0:
            write_json(self.path("config.json"), cfg)  # all of this call's settings

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def log(self, msg):
        """Printed and appended to log.txt by rank 0 only."""
        if fsdp.rank() == 0:
            print(msg, flush=True)
            with open(self.path("log.txt"), "a") as f:
                f.write(msg + "\n")

    def check_settings(self, methods):
        """settings.json: {"shared": SHARED_KEYS, <method>: METHOD_KEYS, ...} as the stored stages were computed.
        A section is written the first time it is needed; a rerun whose settings differ from a stored section
        stops here, before any compute and without touching what is stored."""
        path, cfg = self.path("settings.json"), self.cfg
        want = {"shared": {k: cfg[k] for k in SHARED_KEYS}, **{m: {k: cfg[k] for k in METHOD_KEYS} for m in methods}}
        had = read_json(path) if os.path.exists(path) else {}
        diff = [f"{sec}: --{k} {had[sec].get(k)!r} -> {v!r}" for sec, kv in want.items() if sec in had
                for k, v in kv.items() if had[sec].get(k) != v]
        if diff:
            raise SystemExit(f"{path}: this run folder's finished stages were computed with other settings "
                             f"({'; '.join(diff)}); a rerun would reuse them with the new ones. Pass the old values, "
                             f"or a new --out (or delete {path} to reuse them anyway).")
        if fsdp.rank() == 0 and any(sec not in had for sec in want):
            write_json(path, dict(had, **want))

    def cached(self, name, compute, save=None, load=None):
        """The result of stage `name` (a file or folder under the run folder): read back when stored, else
        compute() on every rank (they share the work), save it, and return it.

        save(value, path) runs on every rank (an FSDP model is gathered by all of them) and writes atomically;
        load(path) reads it back. Defaults, by the name's ending: .json / .jsonl, written by rank 0.
        """
        path = self.path(name)
        if os.path.exists(path):
            self.log(f"[stored] {name}")
            return (load or _LOAD[os.path.splitext(name)[1]])(path)
        value = compute()
        self.kill_point(name)  # a kill after the compute, before anything is written
        (save or _SAVE[os.path.splitext(name)[1]])(value, path)
        fsdp.barrier()  # written before any rank reads it
        return value

    def first_unsaved(self, method, T):
        """Resume point of a method: the first t in 1..T whose theta_t is not saved (T + 1 when all are)."""
        t = 1
        while t <= T and os.path.isdir(self.path(method, f"iter{t}", "policy")):
            t += 1
        return t

    def policy_path(self, method, t):
        """theta_t of `method`; theta_0 is shared by every method (the toy SFT, or --policy)."""
        if t == 0:
            return self.path("sft") if self.cfg["policy"] == "tiny" else self.cfg["policy"]
        return self.path(method, f"iter{t}", "policy")

    def save_policy(self, model, tokenizer, method, t, history):
        """theta_t (HF checkpoint) and its training log (train_metrics.jsonl, one row per optimizer step)."""
        if fsdp.rank() == 0:
            write_jsonl(self.path(method, f"iter{t}", "train_metrics.jsonl"), history)
        save_hf(model, tokenizer, self.policy_path(method, t))
        self.kill_point(f"{method}/iter{t}/policy")  # a kill between saving theta_t and evaluating it

    @staticmethod
    def kill_point(stage):
        """Test hook for the resume tests: LDALIGN_KILL_AT=<stage> kills the process here, as a crash or a
        pre-empted job would (no cleanup, no atexit). Stages: the names given to cached() ("sft", "guide",
        "iter0/samples.jsonl", ...), "<method>/iter<t>/train" (half-way through the update) and
        "<method>/iter<t>/policy" (theta_t saved, not yet evaluated)."""
        if os.environ.get("LDALIGN_KILL_AT") == stage:
            print(f"LDALIGN_KILL_AT={stage}: killing the run here", flush=True)
            os._exit(137)


def _save_on_rank0(write):
    return lambda value, path: write(path, value) if fsdp.rank() == 0 else None


_SAVE = {".json": _save_on_rank0(write_json), ".jsonl": _save_on_rank0(write_jsonl)}
_LOAD = {".json": read_json, ".jsonl": read_jsonl}
