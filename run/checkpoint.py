"""Step checkpoints and SIGTERM: a pre-empted update goes on from its last saved optimizer step, not its start.

torchtitan's CheckpointManager, for the update of one iteration (Algorithm 1, line 10). The stage makes it and
hands it to dpo's loop (stages.Stages.update), which calls load() before the loop and save() inside it:

    ckpt = StepCheckpoint(folder, every, log, what)    # folder: the stage's <name>.partial/ (rundir.RunDir.partial)
    with stop_at_boundaries():                         # SIGTERM now sets a flag instead of killing the process
        dpo.dpo_train(..., checkpointer=ckpt)          # inside:
            start, history = ckpt.load(model, opt)     #   before the loop: (0, []) when there is nothing to resume
            for step in range(start, total):
                ...                                    #   one optimizer step
                ckpt.save(model, opt, step + 1, total, history)   # writes every `every` steps, and at once
                                                                  # when SIGTERM came (then exits, status 143)

A step checkpoint is a folder step{k}/ in torch.distributed.checkpoint's sharded format: every rank writes its own
shards of the fp32 weights and of the optimizer state (FSDP2 DTensors; in one process, whole tensors); the tests
resume it with as many processes as saved it (1, 2). Beside them: meta.json (the step, and the step log up to it)
and each rank's RNG states (rng_rank{r}.safetensors). The lr is a function of the step, and the data order one of
the step and the seed (dpo.global_batches), so they need no state. The folder is written as step{k}.tmp and renamed
(rundir.atomic_path, with its sha256 manifest); the older one is removed only after that, so a kill at any moment
leaves a complete checkpoint. DCP's own .metadata file is a pickle; it is the run's own file, verified against the
manifest before DCP reads it, and every tensor is read with weights_only=True.

SIGTERM (what a scheduler sends before it kills a job): inside stop_at_boundaries() the handler only sets a flag;
at the next boundary (an optimizer step, a sampling batch: stop_requested(), agreed on by every rank) the work is
saved and the process exits with status 143 (128 + SIGTERM: the run is not finished) and one line saying how to
resume. Outside, SIGTERM kills at once, as by default: the stored stages are complete (rundir.atomic_path).
"""
import contextlib
import glob
import os
import re
import signal
import threading

import torch
import torch.distributed as dist

import fsdp
from run.cli import UserError
from run.rundir import _remove, atomic_path, read_json, verify, write_json, writing_into

# Exit status of a run stopped by SIGTERM at a boundary, its work saved: 128 + 15, what a shell reports for a
# process killed by SIGTERM (the run is not finished: `ldalign.py ... && next` does not go on).
STOPPED = 143

_SIGTERM = {"received": False}


def _on_sigterm(signum, frame):
    if not _SIGTERM["received"]:
        print("SIGTERM received: stopping at the next step or batch boundary, once its work is saved", flush=True)
    _SIGTERM["received"] = True


@contextlib.contextmanager
def stop_at_boundaries():
    """Within the block SIGTERM sets a flag (read by stop_requested) instead of killing the process. A SIGTERM that
    came after the block's last boundary is delivered again on leaving it: the process then stops as by default."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    _SIGTERM["received"] = False
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)  # (None: not set from Python)
        if _SIGTERM["received"]:
            _SIGTERM["received"] = False
            os.kill(os.getpid(), signal.SIGTERM)


def stop_requested():
    """Did SIGTERM reach any rank? Every rank calls this at the same boundary, and all get the same answer (under
    torchrun a scheduler signals every process, but not at the same instant)."""
    flag = torch.tensor([int(_SIGTERM["received"])])
    return bool(fsdp.all_reduce(flag, "sum").item())


def stop(log, message):
    """Leave the run after a SIGTERM, its work saved: one line (log.txt too), exit status STOPPED on every rank."""
    _SIGTERM["received"] = False  # acted on: stop_at_boundaries does not deliver it again
    log(f"stopped by SIGTERM {message}: rerun the same command to resume")
    raise SystemExit(STOPPED)


class StepCheckpoint:
    """The latest step checkpoint of one update, in `folder` (step{k}/). every: save after every `every` optimizer
    steps (0: only when SIGTERM comes). what: the update, for the log ("ldalign iteration 2")."""

    def __init__(self, folder, every, log, what):
        self.folder, self.every, self.log, self.what = folder, every, log, what

    def latest(self):
        """The folder of the last complete step checkpoint, or None (step{k}.tmp: one a kill interrupted)."""
        steps = [int(m.group(1)) for p in glob.glob(os.path.join(self.folder, "step*"))
                 if (m := re.fullmatch(r"step(\d+)", os.path.basename(p)))]
        return os.path.join(self.folder, f"step{max(steps)}") if steps else None

    def load(self, model, opt):
        """Load the latest step checkpoint into the model and the optimizer (every rank its shards) and this rank's
        RNG states. Returns (the step it was saved after, the step log up to it); (0, []) when there is none."""
        path = self.latest()
        if path is None:
            return 0, []
        # rank 0 checks every file against the manifest; a bad one stops every rank, rank 0 naming it
        err = ""
        if fsdp.rank() == 0:
            try:
                verify(path)
            except UserError as e:
                err = str(e)
        if fsdp.world() > 1:
            err = fsdp.broadcast_object(err)
        if err:
            raise UserError(err)
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        meta = read_json(os.path.join(path, "meta.json"))
        # The model's and the optimizer's own state dicts (the optimizer's state made by a step at lr 0), filled
        # in place from the checkpoint. The optimizer's param_groups (lr, betas, ...) are those of the settings:
        # the update's settings are the same (RunDir.partial), and the lr is set at every step.
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        model_sd, optim_sd = get_state_dict(model, opt)
        saved = trained_weights(model, model_sd)
        with _one_process_is_meant():
            dcp_load({"model": saved, "optimizer": optim_sd["state"]}, checkpoint_id=path,
                     no_dist=not dist.is_initialized())
        # (under LoRA the frozen weights are theta_{t-1}'s, as loaded)
        set_state_dict(model, opt, model_state_dict=saved, optim_state_dict=optim_sd,
                       options=StateDictOptions(strict=saved is model_sd))
        rng = os.path.join(path, f"rng_rank{fsdp.rank()}.safetensors")
        if os.path.exists(rng):  # (absent when resumed by more processes than saved it)
            from safetensors.torch import load_file
            states = load_file(rng)
            torch.set_rng_state(states["cpu"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state(states["cuda"])
        self.log(f"[resume] {self.what}: from the step checkpoint of step {meta['step']}/{meta['total']} ({path})")
        return meta["step"], meta["history"]

    def save(self, model, opt, step, total, history):
        """After optimizer step `step` of `total` (dpo.train calls it after every step): write a step checkpoint
        when `every` divides the step (not after the last one: theta_t is saved then), or when SIGTERM came;
        after SIGTERM exit (stop)."""
        stopping = stop_requested()
        if stopping or self.every and step % self.every == 0 and step < total:
            self.write(model, opt, step, total, history)
        if stopping:
            stop(self.log, f"at step {step}/{total} of {self.what}; step checkpoint saved")

    def write(self, model, opt, step, total, history):
        """step{step}/ written by every rank into step{step}.tmp, renamed by rank 0 once all have written; then
        the older step checkpoints are removed."""
        from safetensors.torch import save_file
        from torch.distributed.checkpoint import save as dcp_save
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(model, opt)
        model_sd = trained_weights(model, model_sd)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        path, rank = os.path.join(self.folder, f"step{step}"), fsdp.rank()
        # rank 0 owns the rename (atomic_path); the others write into the same temporary folder
        hashed = {}
        with atomic_path(path, hashed) if rank == 0 else writing_into(path) as tmp:
            fsdp.barrier()  # rank 0 has removed a step{step}.tmp left by a killed run
            with _one_process_is_meant():
                dcp_save({"model": model_sd, "optimizer": optim_sd["state"]}, checkpoint_id=tmp,
                         no_dist=not dist.is_initialized())
            save_file(rng, os.path.join(tmp, f"rng_rank{rank}.safetensors"))
            # Each rank hashes the files it wrote (DCP's __<rank>_<i>.distcp), all at once, for the manifest
            mine = [os.path.basename(p) for p in glob.glob(os.path.join(tmp, f"__{rank}_*.distcp"))]
            mine = {name: _sha256(os.path.join(tmp, name)) for name in mine + [f"rng_rank{rank}.safetensors"]}
            if dist.is_initialized():
                every = [None] * fsdp.world()
                dist.all_gather_object(every, mine)  # (also: every rank's files are written)
            else:
                every = [mine]
            if rank == 0:
                for h in every:
                    hashed.update(h)
                write_json(os.path.join(tmp, "meta.json"), {"step": step, "total": total, "world": fsdp.world(),
                                                            "history": history})
        # renamed: the older ones can go (one checkpoint is kept)
        if rank == 0:
            for old in glob.glob(os.path.join(self.folder, "step*")):
                if old != path:
                    _remove(old)
        fsdp.barrier()
        self.log(f"  [checkpoint] step {step}/{total} of {self.what} saved ({path})")


def trained_weights(model, model_sd):
    """The weights a step checkpoint holds: all of them, or under LoRA (a frozen base) only the trained
    adapters: the frozen weights are theta_{t-1}'s, which a resumed update has loaded already. At 7B with
    rank 64 that is 0.7 GB of adapters instead of 14.5 GB of bf16 base."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if len(trained) == len(list(model.parameters())):
        return model_sd
    kept = {k: v for k, v in model_sd.items() if k in trained}
    # (the state dict names every trained parameter as named_parameters does: none may be left out)
    assert len(kept) == len(trained), sorted(trained - set(kept))[:3]
    return kept


def _sha256(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _one_process_is_meant():
    """DCP warns that it saves or loads "in a single process" when there is no process group: that is meant."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
