"""The run folder: settings, log, and the one "stored -> read back, else compute and write atomically".

Every stage of a run writes its result under --out; a rerun (after a kill, a crash, or to add a method)
reads back what is stored and computes only the rest. How the run folder does that lives here; which stage
writes which file lives in stages.py, and docs/reproduce.md lists the files.

    run = RunDir(cfg, stages.METHODS)   # out/config.json, out/log.txt; run.log prints once (rank 0)
    run.check_settings(methods)         # out/settings.json: a rerun with other settings stops, naming them
    x = run.cached(name, compute, save, load, inputs)   # stored -> read back; else compute, write, barrier
    run.stored(name, inputs)            # is it stored, from these inputs? (a stale one is removed)
    run.save_policy(model, tok, "ldalign", 1, history)   # theta_1 as an HF checkpoint, its step log
    folder = run.partial(name, inputs, keys)  # name.partial/: a stage's finished pieces while it runs
    run.kill_point("ldalign/iter1/train")    # the tests' crash hook (LDALIGN_KILL_AT, LDALIGN_TERM_AT)

Written atomically means: into a sibling "<name>.tmp", then renamed over the name (atomic_path). A file or
folder that exists is therefore complete, and a killed run never leaves a half-written result a rerun would trust.
"""
import contextlib
import json
import os
import shutil

import fsdp
from run import cli, lora
from run.cli import UserError


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path, hashed=None):
    """Yield a temporary sibling path; write a file or a folder there; on success it replaces `path`.

    The one atomic-write helper of the project (files, JSON, checkpoints, the guide, the tokenizer, PNGs).
    A folder gets a manifest.json with the sha256 of each of its files (verify checks it when the folder is read
    back); hashed: {relative path: sha256} of files whose hashes the caller has (other processes wrote and hashed
    them: checkpoint.py), filled in before the block ends. On an exception the temporary is removed and `path`
    is left as it was; a full disk (cli.disk_full, looked at before the temporary is removed: it may be what filled
    the disk) becomes a cli.DiskFull naming `path` (the outermost write's, when writes are nested).
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    _remove(tmp)  # left over by a killed run
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        yield tmp
        if os.path.isdir(tmp):
            manifest = _sha256_of_files(tmp, skip=hashed or {})
            manifest.update(hashed or {})
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1)
        if os.path.isdir(path) and not os.path.islink(path):  # os.replace cannot overwrite a non-empty folder
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        full = _as_disk_full(e, path)  # (before the temporary, which may be what filled the disk, is removed)
        _remove(tmp)
        if full:
            raise full from e
        raise


@contextlib.contextmanager
def writing_into(path):
    """Yield the temporary of `path` that another process's atomic_path makes and renames (checkpoint.py: rank 0's,
    the other ranks write their shards into it); a full disk there is a cli.DiskFull naming `path`, as in
    atomic_path."""
    try:
        yield os.fspath(path) + ".tmp"
    except BaseException as e:
        full = _as_disk_full(e, path)
        if full:
            raise full from e
        raise


def _as_disk_full(e, path):
    """A cli.DiskFull naming `path` when the exception `e` of writing it came from a full disk (cli.disk_full, on
    the filesystem of `path`), else None. (DCP's CheckpointException is a BaseException; ctrl-C and exits are not a
    full disk's.)"""
    if isinstance(e, cli.DiskFull) or (not isinstance(e, (UserError, KeyboardInterrupt, SystemExit))
                                       and cli.disk_full(e, os.path.dirname(os.path.abspath(path)))):
        return cli.DiskFull(cli.disk_full_message(path))
    return None


MANIFEST = "manifest.json"


def _sha256_of_files(folder, skip=()):
    """{relative path: sha256} of every file under `folder` but the manifest itself and those in `skip`."""
    import hashlib
    out = {}
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST and rel not in skip:
                h = hashlib.sha256()
                with open(os.path.join(root, name), "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                out[rel] = h.hexdigest()
    return out


def verify(folder):
    """A folder this run wrote (a checkpoint, the guide, the tokenizer) is as its manifest.json says: every file
    there with its sha256. A truncated, corrupt or missing file raises UserError naming it, and so does a missing
    manifest (atomic_path writes one into every folder it makes). Only the run's own folders are verified:
    theta_0 given with --policy has no manifest (stages.load_policy)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: its {MANIFEST} is missing, so its files cannot be checked (this run wrote the "
                        f"folder with one); delete {folder} to recompute it")
    want, have = read_json(path), _sha256_of_files(folder)
    bad = [f for f, h in want.items() if have.get(f) != h]
    if bad:
        more = f" ({len(bad)} files differ)" if len(bad) > 1 else ""
        raise UserError(f"{os.path.join(folder, bad[0])}: missing, truncated or corrupt (its sha256 is not the one "
                        f"in {path}); delete {folder} to recompute it{more}")


def digest(path):
    """What a stage was computed from, in a few bytes: the sha256 of a file, or of a folder's manifest (a folder
    without one, e.g. theta_0 from --policy, by its path and its files' sizes and times)."""
    import hashlib
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return digest(os.path.join(path, MANIFEST))
    stats = sorted((f, os.path.getsize(os.path.join(r, f)), os.path.getmtime(os.path.join(r, f)))
                   for r, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else []
    return hashlib.sha256(json.dumps([os.path.abspath(path) if stats else path, stats]).encode()).hexdigest()


def provenance(cfg):
    """config.json's record of what the run read: {"revisions": {option: model_revision(...)}, "versions":
    {torch, transformers, lm_eval (None when not installed)}}."""
    from importlib import metadata
    versions = {}
    for package in ("torch", "transformers", "lm_eval"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"revisions": {k: model_revision(cfg[k], cfg.get(f"{k}_revision", ""))
                          for k in ("policy", "guide", "reward_model")}, "versions": versions}


def model_revision(name, revision=""):
    """Which model --policy / --guide / --reward_model `name` is, in a few bytes: None (none given), "tiny"; for a
    local folder "folder sha256:..." of its config.json and weights index (a single weights file: its name and
    size; the weights are not read); for a hub id the commit `revision` ("" = main) resolves to in the local Hugging
    Face cache, else asked of the hub, else "unresolved (...)" saying why (offline, say). Never raises."""
    import hashlib
    if not name or name == "tiny":
        return name or None
    if os.path.isdir(name):
        parts = []
        for f in sorted(os.listdir(name)):
            p = os.path.join(name, f)
            if f == "config.json" or f.endswith(".index.json"):
                parts.append([f, digest(p)])
            elif f.endswith((".safetensors", ".bin")) and os.path.isfile(p):
                parts.append([f, os.path.getsize(p)])
        return "folder sha256:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    from huggingface_hub import constants, try_to_load_from_cache
    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision or None)
    except Exception as e:  # noqa: BLE001 (a malformed id or revision: recorded, the loading names it)
        return f"unresolved ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if isinstance(cached, str):  # <cache>/models--org--name/snapshots/<commit>/config.json
        return os.path.basename(os.path.dirname(cached))
    if constants.HF_HUB_OFFLINE:
        return "unresolved (not in the local Hugging Face cache, HF_HUB_OFFLINE set)"
    try:
        from huggingface_hub import HfApi
        return HfApi().model_info(name, revision=revision or None, timeout=10).sha
    except Exception as e:  # noqa: BLE001 (offline, not found, gated: the run's loading says it in one line)
        return f"unresolved ({type(e).__name__})"


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
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt or truncated ({e}); delete it to recompute it") from None


def read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt or truncated ({e}); delete it to recompute it") from None


def save_hf(model, tokenizer, out_dir, adapter=None):
    """A causal LM as an HF checkpoint (config.json + model.safetensors + tokenizer), written atomically.
    Under FSDP2 the full state dict is gathered to rank 0's CPU first: every rank must call this.
    A LoRA-wrapped model (lora.py) is written under the plain names; adapter = (its config, theta_{t-1}'s path):
    its A and B go beside, into adapter/ (peft's layout)."""
    state_dict = fsdp.full_state_dict(model)
    if lora.wrapped(model):
        state_dict, adapter_tensors = lora.plain_state_dict(model, model.state_dict() if state_dict is None
                                                            else state_dict)
    if fsdp.rank() == 0:
        with atomic_path(out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)  # safetensors is the default format
            if adapter:
                lora.save_adapter(adapter_tensors, adapter[0], os.path.join(tmp, "adapter"), adapter[1])
            cfg = read_json(os.path.join(tmp, "config.json"))
            # FSDP2 renames the class (FSDPLlamaForCausalLM); store the real architecture name.
            cfg["architectures"] = [a[4:] if a.startswith("FSDP") else a for a in cfg.get("architectures") or []]
            write_json(os.path.join(tmp, "config.json"), cfg)
            tokenizer.save_pretrained(tmp)
    fsdp.barrier()


# ----------------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------------
# The settings the stored stages depend on; a rerun that changes one of them stops (check_settings) instead of
# mixing two runs. The others (T, method, micro-batch and sampling batch, compile flags, logging) may change.
SHARED_KEYS = ("data", "max_examples", "overlength", "seed", "policy", "max_len", "max_prompt_len", "max_new_tokens",
               "sft_steps", "sft_lr", "sft_batch_size", "temperature", "top_p", "top_k",
               "guide", "latent_dim", "guide_epochs", "guide_lr", "guide_batch_size",  # theta_0, iter0/, guide/
               "eval_data", "max_eval", "reward_model", "judge", "agreement_n",  # every eval.json, agreement.json
               "policy_revision", "guide_revision", "reward_model_revision",
               "lora_base_dtype")  # the policy every stage computes with
# Each method (Algorithm 1 and the competitors of Section 5.1.4: stages.METHODS) has its folder <method>/ and its
# section of settings.json (a later call may run dpo at its lr). The data a method's stages read is bound by any of
# them; the update's settings only by a saved theta_t (an update that stopped at a NaN binds nothing, and may be
# rerun at a lower --lr or --beta); the settings one method alone reads (its row's `binds`), in its section only.
METHOD_DATA_KEYS = ("reuse_line2_samples", "pref_data")
UPDATE_KEYS = ("beta", "lr", "optimizer", "warmup_ratio", "max_grad_norm", "epochs", "batch_size", "lr_per_iter",
               "beta_per_iter", "lora_r", "lora_alpha", "lora_targets")


class RunDir:
    def __init__(self, cfg, methods):
        """cfg: the settings; methods: {name: its row} (stages.METHODS), each row's `binds` the settings that
        method alone reads."""
        self.cfg, self.out = cfg, cfg["out"]
        self.own_keys = {m: tuple(row.binds) for m, row in methods.items()}
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UserError(f"--out {self.out} is a file; the run folder must be a folder (new or of an earlier run)")
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise UserError(_unwritable(self.out, e)) from None
        self.lock()
        cli.log_errors_to(self.path("log.txt"))
        if fsdp.rank() == 0:
            # all of this call's settings, what each model resolved to, and the library versions
            write_json(self.path("config.json"), dict(cfg, provenance=provenance(cfg)))

    def lock(self):
        """One run at a time in a folder: out/lock.json names the holder (pid, host, start time). A second run stops
        at once, naming it; the lock of a process that died (kill -9, a crash) on this host is taken over, and so is
        an empty or half-written one (its writer died while writing it). Rank 0 holds it for every rank of a
        torchrun; it is released when the process exits."""
        import atexit
        import socket
        import time
        path, me = self.path("lock.json"), {"pid": os.getpid(), "host": socket.gethostname(),
                                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        held = ""
        if fsdp.rank() == 0:
            try:
                held = self._take_lock(path, me)
            except OSError as e:
                held = _unwritable(self.out, e)
            if not held:
                atexit.register(lambda: _read_lock(path).get("pid") == me["pid"] and _remove(path))
        import torch
        if fsdp.all_reduce(torch.tensor([int(bool(held))]), "sum").item():  # every rank stops, rank 0 says why
            raise UserError(held or f"--out {self.out} is in use by another run (see {path})")

    def _take_lock(self, path, me):
        """Create lock.json holding `me`; returns "" when this process holds it, else why it cannot."""
        import time
        for _ in range(3):  # another try after removing a dead holder's lock
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                other = _read_lock(path)
                if not other:
                    # a live holder writes its few bytes at once: still unreadable a moment later, it is a dead one's
                    time.sleep(0.5)
                    other = _read_lock(path)
                if other.get("host") == me["host"] and other.get("pid") == me["pid"]:
                    return ""  # this process holds it already
                if not other or other.get("host") == me["host"] and not _alive(other.get("pid")):
                    _remove(path)  # its holder is gone
                    continue
                return (f"--out {self.out} is in use by another run (pid {other.get('pid')} on {other.get('host')}, "
                        f"started {other.get('started')}); wait for it, use another --out, or delete {path} if "
                        "that run is gone")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return ""
        return f"--out {self.out}: could not take {path} (other runs keep taking it over); try again"

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def log(self, msg):
        """Printed and appended to log.txt by rank 0 only."""
        if fsdp.rank() == 0:
            print(msg, flush=True)
            with open(self.path("log.txt"), "a") as f:
                f.write(msg + "\n")

    def check_settings(self, methods):
        """settings.json: {"shared": {key: value}, <method>: {key: value}, ...}: the settings the stored stages were
        computed with (bind writes them as a stage is stored). A rerun whose settings differ stops here, before any
        compute and without touching what is stored; a run that stored nothing binds nothing."""
        path, cfg = self.path("settings.json"), self.cfg
        had = read_json(path) if os.path.exists(path) else {}
        diff = [f"{sec}: --{k} {v!r} -> {cfg[k]!r}" for sec, kv in had.items() if sec == "shared" or sec in methods
                for k, v in kv.items() if cfg.get(k) != v]
        if diff:
            raise SystemExit(f"{path}: this run folder's finished stages were computed with other settings "
                             f"({'; '.join(diff)}); a rerun would reuse them with the new ones. Pass the old values, "
                             f"or a new --out (or delete {path} to reuse them anyway).")

    def bind(self, name):
        """Record in settings.json what the stage `name` (about to be stored) depends on: the toy tokenizer,
        --data; any other stage, the shared settings, and a method's stage (<method>/...) that method's data
        settings too (and its own: its row's `binds`); its theta_t (<method>/iter{t}/policy), also that method's
        update settings."""
        method = name.split("/")[0] if name.split("/")[0] in self.own_keys else None
        keys = {"shared": ("data",) if name == "tokenizer" else SHARED_KEYS}
        if method:
            keys[method] = METHOD_DATA_KEYS + self.own_keys[method] + (
                UPDATE_KEYS if name.endswith("/policy") else ())
        path = self.path("settings.json")
        had = read_json(path) if os.path.exists(path) else {}
        new = {sec: dict(had.get(sec, {}), **{k: self.cfg[k] for k in ks}) for sec, ks in keys.items()}
        if fsdp.rank() == 0 and any(had.get(sec) != kv for sec, kv in new.items()):
            write_json(path, dict(had, **new))

    def cached(self, name, compute, save=None, load=None, inputs=()):
        """The result of stage `name` (a file or folder under the run folder): read back when stored, else
        compute() on every rank (they share the work), save it, and return it.

        save(value, path) runs on every rank (an FSDP model is gathered by all of them) and writes atomically;
        load(path) reads it back. Defaults, by the name's ending: .json / .jsonl, written by rank 0.
        inputs: the files and folders the stage is computed from (the policy it sampled, the guide, ...); their
        digests are kept in stages.json, and a stored result whose inputs changed since (an iteration redone) is
        stale: it is computed again (stored). A stored folder is verified against its manifest before it is read.
        """
        path = self.path(name)
        if self.stored(name, inputs):
            self.log(f"[stored] {name}")
            if os.path.isdir(path):
                verify(path)
            return (load or _LOAD[os.path.splitext(name)[1]])(path)
        value = compute()
        # a kill after the compute, before anything is written
        self.kill_point(name)
        self.bind(name)
        self.record(name, inputs)
        (save or _SAVE[os.path.splitext(name)[1]])(value, path)
        # written before any rank reads it
        fsdp.barrier()
        self.remove_partial(name)
        return value

    def stored(self, name, inputs=()):
        """Is the result of stage `name` stored, and computed from `inputs` as they are now (stages.json)?
        A stale result is removed here: a result on disk is always the one its record describes."""
        path = self.path(name)
        if not os.path.exists(path):
            return False
        now = self._digests(inputs)
        then = self._records().get(name, now)
        if then == now:
            self.remove_partial(name)  # left by a kill between storing the result and removing it
            return True
        changed = [k for k in now if then.get(k) != now[k]]
        self.log(f"[stale] {name} was computed from another {', '.join(changed)}: computing it again")
        if fsdp.rank() == 0:
            _remove(path)
        fsdp.barrier()
        return False

    def record(self, name, inputs):
        """Write in stages.json what the result of `name`, about to be saved, is computed from. Any older result
        goes first, so that a kill at any point leaves either no result or one that its record describes."""
        if fsdp.rank() == 0:
            _remove(self.path(name))
            if inputs:
                write_json(self.path("stages.json"), dict(self._records(), **{name: self._digests(inputs)}))
        fsdp.barrier()

    def _records(self):
        path = self.path("stages.json")
        return read_json(path) if os.path.exists(path) else {}

    def _digests(self, inputs):
        return {os.path.relpath(p, self.out) if p.startswith(self.out) else p: digest(p) for p in inputs}

    def policy_path(self, method, t):
        """theta_t of `method`; theta_0 is shared by every method (the toy SFT, or --policy)."""
        return policy_path(self.out, self.cfg, method, t)  # the module's function below

    def save_policy(self, model, tokenizer, method, t, history, inputs):
        """theta_t (HF checkpoint), recorded as computed from `inputs` (theta_{t-1}, the pairs' files), and its
        training log (train_metrics.jsonl, one row per optimizer step)."""
        name = f"{method}/iter{t}/policy"
        self.bind(name)
        self.record(name, inputs)
        if fsdp.rank() == 0:
            write_jsonl(self.path(method, f"iter{t}", "train_metrics.jsonl"), history)
        # LoRA: theta_t = theta_{t-1} + scaling * B @ A, merged in fp32; the adapters beside (adapter/)
        adapter, base = lora.merge(model), self.policy_path(method, t - 1)
        # the adapter's base: theta_{t-1}'s folder (a hub id for a theta_0 given as one)
        base = os.path.abspath(base) if os.path.exists(base) else base
        save_hf(model, tokenizer, self.policy_path(method, t), adapter=adapter and (adapter, base))
        self.remove_partial(name)  # its step checkpoints
        self.kill_point(f"{method}/iter{t}/policy")  # a kill between saving theta_t and evaluating it

    def partial(self, name, inputs, keys):
        """The folder <name>.partial/ where stage `name` keeps what it has finished while it runs, so that a
        killed or pre-empted run goes on from there: sampling's finished batches; the update's reference
        log-probs and its latest step checkpoint (checkpoint.py). Reused only when made from the same `inputs`
        (their digests) and the same settings `keys` (its key.json), else emptied first; removed once the
        stage is stored. Every rank calls this."""
        path = self.path(name + ".partial")
        key = {"inputs": self._digests(inputs), "settings": {k: self.cfg[k] for k in keys}}
        key_path = os.path.join(path, "key.json")
        stale = os.path.exists(path) and (not os.path.exists(key_path) or read_json(key_path) != key)
        # every rank has looked before rank 0 changes anything
        fsdp.barrier()
        if stale:
            self.log(f"[stale] {name}.partial was made from other inputs or settings: {name} starts over")
            if fsdp.rank() == 0:
                _remove(path)
        if fsdp.rank() == 0 and not os.path.exists(key_path):
            write_json(key_path, key)
        fsdp.barrier()
        return path

    def remove_partial(self, name):
        """Remove <name>.partial/ (rank 0), once the result of `name` is stored."""
        if fsdp.rank() == 0:
            _remove(self.path(name + ".partial"))

    @staticmethod
    def kill_point(stage):
        """Test hook for the resume tests: LDALIGN_KILL_AT=<stage> kills the process here, as a crash or a
        pre-empted job would (no cleanup, no atexit); LDALIGN_TERM_AT=<stage> sends SIGTERM to the process of
        the last rank (the only one in one process), as a scheduler does first, and goes on; LDALIGN_INT_AT=<stage>
        sends SIGINT to every rank's process, as ctrl-C in a terminal does (KeyboardInterrupt). Stages: the names
        given to cached() ("sft", "guide", "iter0/samples.jsonl", ...), "<name>/batch<k>" (sampling's k-th
        batch on this rank written), "<method>/iter<t>/train" (half-way through the update),
        "<method>/iter<t>/step<k>" (after optimizer step k and its step checkpoint, if one) and
        "<method>/iter<t>/policy" (theta_t saved, not yet evaluated)."""
        if os.environ.get("LDALIGN_KILL_AT") == stage:
            print(f"LDALIGN_KILL_AT={stage}: killing the run here", flush=True)
            os._exit(137)
        if os.environ.get("LDALIGN_TERM_AT") == stage and fsdp.rank() == fsdp.world() - 1:
            import signal
            print(f"LDALIGN_TERM_AT={stage}: sending SIGTERM to rank {fsdp.rank()}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        if os.environ.get("LDALIGN_INT_AT") == stage:
            import signal
            print(f"LDALIGN_INT_AT={stage}: sending SIGINT (ctrl-C)", flush=True)
            # Python's own handler, as a terminal's foreground process has it (a background job ignores SIGINT)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), signal.SIGINT)


# Where a run folder keeps theta_t: RunDir's methods above, and harness.py reading a finished run folder.
def policy_path(out, cfg, method, t):
    """theta_t of `method` in the run folder `out` of the settings `cfg`; theta_0 is shared by every method."""
    if t == 0:
        return os.path.join(out, "sft") if cfg["policy"] == "tiny" else cfg["policy"]
    return os.path.join(out, method, f"iter{t}", "policy")


def first_unsaved(out, cfg, method, T=float("inf")):
    """The first t in 1..T whose theta_t of `method` is not saved in `out` (T + 1 when all are)."""
    t = 1
    while t <= T and os.path.isdir(policy_path(out, cfg, method, t)):
        t += 1
    return t


def _read_lock(path):
    """The holder a lock.json names ({} when it is missing, empty or half-written)."""
    try:
        with open(path) as f:
            other = json.load(f)
    except (OSError, ValueError):
        return {}
    return other if isinstance(other, dict) and "pid" in other and "host" in other else {}


def _unwritable(out, e):
    """Why the run folder `out` cannot be written, from the OSError `e` of creating or writing it."""
    why = "a part of its path is a file, not a folder" if isinstance(e, NotADirectoryError) else e.strerror or e
    where = f" at {e.filename}" if e.filename and os.path.abspath(e.filename) != os.path.abspath(out) else ""
    return f"--out {out}: cannot write the run folder ({why}{where}); give a folder you can write to"


def _alive(pid):
    """Is process `pid` running on this host?"""
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def _save_on_rank0(write):
    return lambda value, path: write(path, value) if fsdp.rank() == 0 else None


_SAVE = {".json": _save_on_rank0(write_json), ".jsonl": _save_on_rank0(write_jsonl)}
_LOAD = {".json": read_json, ".jsonl": read_jsonl}
