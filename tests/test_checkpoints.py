"""Pre-emption (run/checkpoint.py): an update resumed from its step checkpoint, and sampling from its finished batches,
give the uninterrupted weights and tokens (1 process; FSDP2 on 2 gloo processes); SIGTERM stops at a step boundary;
ctrl-C mid-update and a full disk (a small tmpfs) while a step checkpoint or theta_t is written end with one line
saying how to resume, and lose nothing stored.
"""
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

import dpo
import fsdp
import generate as generate_module
import ldalign
import stages
from run import checkpoint, cli, lora, rundir
from tests.builders import (
    MINIMAL_RUN,
    SAMPLE_CFG,
    SAMPLE_TOK,
    _cli,
    _minimal_data,
    _run,
    _run_gloo,
    gen_llama,
    gen_prompts,
    tiny_llama,
)


# ====================================================================================================
# Pre-emption: step checkpoints of the update, sampling kept batch by batch, SIGTERM (checkpoint.py)
# ====================================================================================================
def _update_in_steps(folder, every=2, stop_after=0, term_after=0, optimizer="adamw", lora_r=0):
    """An LD-Align update of a tiny Llama (FSDP2 when world > 1) in 8 optimizer steps, with its step checkpoints in
    `folder` every `every` steps (folder None: none). stop_after: raise KeyboardInterrupt after that step (a kill);
    term_after: SIGTERM to the last rank after that step; lora_r > 0: rank-r adapters trained alone, as
    Stages.update begins them. Returns (full weights, step log)."""
    import signal
    torch.manual_seed(0)
    cpu, model = torch.device("cpu"), tiny_llama(seed=0).train()
    if lora_r:
        lora.add(model, lora.DEFAULT_TARGETS, lora_r)
        lora.begin(model, lora_r, seed=5)
    if fsdp.world() > 1:
        model = fsdp.parallelize(model, cpu)
    g = torch.Generator().manual_seed(1)
    pairs = [([1] + torch.randint(3, 64, (int(n),), generator=g).tolist(),
              torch.randint(3, 64, (int(m),), generator=g).tolist() + [2],
              torch.randint(3, 64, (int(k),), generator=g).tolist() + [2])
             for n, m, k in torch.randint(1, 6, (13, 3), generator=g)]
    ref_c, ref_r = dpo.reference_logps(model, pairs, 2, cpu)

    def on_step(step, steps):
        if step == stop_after:
            raise KeyboardInterrupt
        if step == term_after and fsdp.rank() == fsdp.world() - 1:
            os.kill(os.getpid(), signal.SIGTERM)
    ckpt = checkpoint.StepCheckpoint(folder, every, lambda m: None, "the test update") if folder else None
    # as Stages.update runs it: SIGTERM stops at the next step boundary, its step checkpoint written
    with checkpoint.stop_at_boundaries():
        hist = dpo.dpo_train(model, pairs, ref_c, ref_r, torch.linspace(0.5, 1.5, 13), beta=0.5, lr=1e-2, epochs=2,
                             batch_size=4, micro_batch_size=2, device=cpu, optimizer=optimizer, seed=3,
                             on_step=on_step, checkpointer=ckpt)
    sd = fsdp.full_state_dict(model) if fsdp.is_fsdp(model) else model.state_dict()
    return {k: v.clone() for k, v in sd.items()}, hist


def _resumes_exactly(folder, optimizer, lora_r=0):
    """Killed after step 3 (checkpoint of step 2), then SIGTERM after step 5 (checkpoint of step 6, at once): each
    rerun goes on from the latest checkpoint, and the update ends with the uninterrupted weights and step log, bit
    for bit. Returns what differs (empty: nothing)."""
    want, want_hist = _update_in_steps(None, optimizer=optimizer, lora_r=lora_r)
    with pytest.raises(KeyboardInterrupt):
        _update_in_steps(folder, stop_after=3, optimizer=optimizer, lora_r=lora_r)
    saved = sorted(os.listdir(folder))
    with pytest.raises(SystemExit) as stopped:
        _update_in_steps(folder, term_after=5, optimizer=optimizer, lora_r=lora_r)
    assert stopped.value.code == checkpoint.STOPPED
    saved.append(sorted(os.listdir(folder)))
    got, hist = _update_in_steps(folder, optimizer=optimizer, lora_r=lora_r)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    return differ + ([] if hist == want_hist else ["step log"]) + ([] if saved == ["step2", ["step6"]] else [saved])


def test_an_update_resumes_from_its_step_checkpoint_to_the_same_weights(tmp_path):
    for optimizer in ("adamw", "rmsprop"):
        assert _resumes_exactly(str(tmp_path / optimizer), optimizer) == [], optimizer
    # LoRA (issue 21): the adapters and their optimizer state resume as full fine-tuning does; the step
    # checkpoint holds the adapters alone (the frozen base is theta_{t-1}'s)
    assert _resumes_exactly(str(tmp_path / "lora"), "adamw", lora_r=4) == [], "lora"
    from torch.distributed.checkpoint import FileSystemReader
    held = FileSystemReader(str(tmp_path / "lora" / "step6")).read_metadata().state_dict_metadata
    weights = [k for k in held if k.startswith("model.")]
    assert weights and all(k.endswith((".lora_A", ".lora_B")) for k in weights), weights[:4]
    with pytest.raises(SystemExit, match="--save_steps must be >= 0"):
        ldalign.parse_args(["--save_steps", "-1"])


def _resume_worker(rank, results, folder):
    torch.set_num_threads(1)
    results[rank] = _resumes_exactly(folder, "rmsprop")


@pytest.mark.slow
def test_two_processes_resume_an_update_from_its_step_checkpoint(tmp_path):
    """FSDP2 on 2 processes: every rank writes its shards of the weights and of the RMSprop state; a rerun loads them
    and ends with the weights of an uninterrupted 2-process update exactly. SIGTERM reaches rank 1 only: both ranks
    stop at the same step (stop_requested is all-reduced)."""
    import functools
    results = _run_gloo(functools.partial(_resume_worker, folder=str(tmp_path / "steps")))
    assert results == {0: [], 1: []}


def test_sampling_resumes_at_the_first_unfinished_batch(tmp_path):
    """Stages.sample_in_batches writes each finished batch of sample_dataset to `parts`; killed after its 2nd batch,
    or stopped by SIGTERM after the 3rd, a rerun reads them back, samples only the others, and returns the tokens of
    an uninterrupted run."""
    import signal
    prompts = gen_prompts([3, 9, 5, 1, 7, 4, 8, 2, 6, 6, 3, 9, 5], seed=4)  # 4 batches of 4, the last short
    model, cpu = gen_llama(), torch.device("cpu")
    for static in (False, True):
        cfg, parts = dict(SAMPLE_CFG, gen_static=static), str(tmp_path / f"parts{static}")
        want = generate_module.sample_dataset(model, prompts, SAMPLE_TOK, cfg, 3, cpu)

        def sample(after_batch=None):
            # the stage's kill hook after its n-th batch (run.kill_point("<name>/batch<n>")) calls after_batch(n)
            hook = SimpleNamespace(kill_point=lambda at: after_batch and after_batch(int(at.rsplit("batch", 1)[1])))
            fake = SimpleNamespace(cfg=cfg, data=SimpleNamespace(tok=SAMPLE_TOK), device=cpu, log=lambda m: None,
                                   run=hook)
            return stages.Stages.sample_in_batches(fake, model, prompts, 3, parts, "samples", "y'")

        def kill_after(k):
            def hook(n):
                if n == k:
                    raise KeyboardInterrupt
            return hook
        with pytest.raises(KeyboardInterrupt):
            sample(kill_after(2))
        assert sorted(os.listdir(parts)) == ["batch0.json", "batch4.json"]
        with pytest.raises(SystemExit) as stopped:
            sample(lambda n: n == 1 and os.kill(os.getpid(), signal.SIGTERM))  # the 3rd batch, 1st of this call
        assert stopped.value.code == checkpoint.STOPPED and len(os.listdir(parts)) == 3
        calls = []
        assert sample(calls.append) == want and calls == [1]  # one batch left to sample
        assert sample(calls.append) == want and calls == [1]  # none left


# ====================================================================================================
# ctrl-C and a full disk: one line saying how to resume, nothing stored lost
# ====================================================================================================
def _update_args(tmp_path, out, epochs):
    """The minimal run (T 1) with 2 optimizer steps per epoch and a step checkpoint after each step (not the last)."""
    return ["--out", out, "--data", _minimal_data(tmp_path)] + MINIMAL_RUN + [
        "--T", "1", "--epochs", str(epochs), "--batch_size", "8", "--micro_batch_size", "8", "--save_steps", "1"]


def _ends_with_one_line(p, out, line, status):
    """The run `p` ended with exit status `status` and `line` as the last line of stderr and of log.txt, with no
    traceback."""
    assert p.returncode == status and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == line, p.stderr[-3000:]
    assert open(os.path.join(out, "log.txt")).read().splitlines()[-1] == line


@pytest.mark.slow
def test_ctrl_c_mid_update_says_how_to_resume(tmp_path):
    """ctrl-C (SIGINT) after step 1 of 2: one line saying that the same command resumes, exit status 130, the step
    checkpoint of step 1 kept; the same command then goes on from it."""
    out = str(tmp_path / "run")
    args = _update_args(tmp_path, out, epochs=1)
    p = _cli(args, {"LDALIGN_INT_AT": "ldalign/iter1/step1"})
    _ends_with_one_line(p, out, f"interrupted (ctrl-C); what was stored is kept: {cli.RESUME}", cli.INTERRUPTED)
    assert "step1" in os.listdir(os.path.join(out, "ldalign", "iter1", "policy.partial"))
    log = _run(args)
    assert "[resume] ldalign iteration 1: from the step checkpoint of step 1/2" in log


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs (a filesystem that fills up) at tmp_path/disk, unmounted afterwards. Skipped where mounting is
    not allowed (it needs root; CI runs as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a full disk needs a small tmpfs")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)]).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=True)  # (busy: detached now, freed when unused)


def _fill(disk, leave):
    """A file on `disk` that leaves `leave` bytes free; returns its path."""
    path = os.path.join(disk, "filler")
    with open(path, "wb") as f:
        f.write(bytes(shutil.disk_usage(disk).free - int(leave)))
    return path


@pytest.mark.slow
def test_a_full_disk_while_a_step_checkpoint_or_theta_t_is_written_is_one_line(tmp_path, small_disk):
    """The run folder on a small tmpfs, filled up (a real full disk) while the update writes its step checkpoint of
    step 2 (torch's zip writer says only "unexpected pos"), then while theta_1 is saved (safetensors: "No space left
    on device"): each time one line naming what was being written and saying that the same command resumes once
    space is freed, exit status 2, and every file stored before (the earlier stages, the last complete step
    checkpoint) the same bytes. With the space freed the same command finishes."""
    out = str(small_disk / "run")
    args = _update_args(tmp_path, out, epochs=2)  # 4 steps: step checkpoints after steps 1, 2 and 3
    partial, theta_1 = (os.path.join(out, "ldalign", "iter1", p) for p in ("policy.partial", "policy"))

    def fails_writing(path, leave):
        # (the run's records, rewritten by every call, aside: its log, settings and lock, what each stage is from)
        records = {"log.txt", "config.json", "lock.json", "settings.json", "stages.json"}
        stored = rundir._sha256_of_files(out, skip=records)
        filler = _fill(small_disk, leave)
        p = _cli(args)
        _ends_with_one_line(p, out, f"error: {cli.disk_full_message(path)}", 2)
        after = rundir._sha256_of_files(out)
        assert {f: after.get(f) for f in stored} == stored  # nothing stored lost
        assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
        os.remove(filler)
    assert _cli(args, {"LDALIGN_KILL_AT": "ldalign/iter1/step1"}).returncode == 137  # step 1's checkpoint saved
    weights = os.path.getsize(os.path.join(out, "sft", "model.safetensors"))
    # weights + AdamW's two moments: 3x the policy's fp32 weights, where 1.5x is left
    fails_writing(os.path.join(partial, "step2"), leave=1.5 * weights)
    rundir.verify(os.path.join(partial, "step1"))
    assert _cli(args, {"LDALIGN_KILL_AT": "ldalign/iter1/step4"}).returncode == 137  # steps 2, 3 saved, not theta_1
    fails_writing(theta_1, leave=weights / 2)
    rundir.verify(os.path.join(partial, "step3"))
    log = _run(args)
    assert "[resume] ldalign iteration 1: from the step checkpoint of step 3/4" in log
    assert os.path.exists(os.path.join(theta_1, "model.safetensors")) and not os.path.exists(partial)
