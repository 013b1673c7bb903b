"""The run folder and resume (run/rundir.py, run/cli.py, ldalign.py): the settings check on a resume, kill and resume
(every stage), stale stages recomputed, corrupt files named, NaN stop (one line), bad data before compute,
parse_args, user errors as one line (exit 2, logged; unreadable input, an unwritable --out; train.sh: a bad option
before torchrun starts, a bad input after it, a venv that is not activated), a method's option given to a call that
does not run it (a warning), the lock (a dead or half-written one), a folder without its manifest, no pickle
checkpoints and no remote code by default.
"""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import dataset
import ldalign
import stages
from run import checkpoint, cli, options, rundir
from tests.builders import (
    GOOD,
    HERE,
    MINIMAL_RUN,
    TINY_RUN,
    _all_files,
    _check_run_folder,
    _cli,
    _cli_start,
    _cli_wait,
    _minimal_data,
    _run,
    _train_sh,
    _user_error,
    tiny_llama,
)


# ====================================================================================================
# Run folder and resume (rundir.py, ldalign.py): settings, interrupted runs, stops, command line, no pickle
# ====================================================================================================
def test_a_resume_with_other_settings_or_data_stops(tmp_path):
    cfg = dict(ldalign.DEFAULTS, out=str(tmp_path))
    p = str(tmp_path / "settings.json")
    def run(**kw):
        return rundir.RunDir(dict(cfg, **kw), stages.METHODS)
    run().check_settings(["ldalign"])
    run(seed=1, lr=2e-7).check_settings(["ldalign"])  # nothing stored yet: nothing bound
    run().bind("ldalign/iter1/policy")  # a stage of ldalign stored: the shared and ldalign's settings are bound
    run(T=5, micro_batch_size=4, gen_batch_size=7).check_settings(["ldalign"])  # free to change
    with pytest.raises(SystemExit, match="ldalign: --lr 1e-05 -> 2e-07"):
        run(lr=2e-7).check_settings(["ldalign"])
    with pytest.raises(SystemExit, match="shared: --seed 0 -> 1"):
        run(seed=1).check_settings(["dpo"])
    run(lr=2e-7).check_settings(["dpo"])  # a new method may use its own lr ...
    run(lr=2e-7).bind("dpo/iter1/policy")
    with pytest.raises(SystemExit, match="dpo: --lr 2e-07 -> 1e-05"):
        run().check_settings(["dpo"])  # ... and keeps it
    stored = json.load(open(p))
    assert stored["ldalign"]["lr"] == 1e-5 and stored["dpo"]["lr"] == 2e-7  # what is stored is left alone
    # stored samples of other prompts (the data file edited in place) are not silently reused or overwritten
    path = str(tmp_path / "samples.jsonl")
    rundir.write_jsonl(path, [{"x": "a", "y_prime_ids": [1]}])
    assert stages.read_samples(path, [dict(x="a")], cfg["data"]) == [[1]]
    with pytest.raises(SystemExit, match="other prompts"):
        stages.read_samples(path, [dict(x="b")], cfg["data"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "iter0/samples.jsonl/batch1", "guide", "ldalign/iter1/train",
                                   "ldalign/iter2/train", "ldalign/iter2/policy", "SIGTERM ldalign/iter2/step1"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, stage, uninterrupted):
    """Killed at a stage (LDALIGN_KILL_AT), or sent SIGTERM there (LDALIGN_TERM_AT), then rerun: the weights of the
    uninterrupted run, bit for bit. With --save_steps 2 (the uninterrupted run saved none: step checkpoints change
    nothing), an update killed half-way (after step 2 of 4) goes on from its step checkpoint, and reads back the
    reference log-probs of theta_{t-1} (not scored again);
    sampling killed after the first of its 2 batches samples only the second; SIGTERM after step 1 stops the run at
    step 2 (saved) with status 143. Nothing of the .partial folders is left."""
    out = str(tmp_path / "run")
    args = ["--out", out] + TINY_RUN + ["--save_steps", "2"]
    term, stage = stage.startswith("SIGTERM "), stage.removeprefix("SIGTERM ")
    p = _cli(args, env_extra={"LDALIGN_TERM_AT" if term else "LDALIGN_KILL_AT": stage})
    if term:
        assert p.returncode == checkpoint.STOPPED, p.stderr[-2000:]
        assert ("stopped by SIGTERM at step 2/4 of ldalign iteration 2; step checkpoint saved: rerun the same command "
                "to resume") in p.stdout
    else:
        assert p.returncode == 137 and f"LDALIGN_KILL_AT={stage}" in p.stdout
    assert not any(f.endswith(".tmp") for f in os.listdir(out))  # no half-written result left to trust
    log = _run(args)
    if stage.endswith(("/train", "/step1")):
        t = stage.split("/")[1][len("iter"):]
        assert f"[resume] ldalign iteration {t}: from the step checkpoint of step 2/4" in log
        assert "reference log-probs under theta_{t-1}: read back" in log
    if stage.endswith("/batch1"):
        assert "[resume] sampling y' ~ p_theta_0: 1 of 2 batches read back" in log
    assert not [f for f in _all_files(out) if ".partial" in f]
    resumed = _check_run_folder(out).state_dict()  # every iteration's metrics row too
    for k, v in uninterrupted.items():
        assert torch.equal(v, resumed[k]), k
    assert os.path.exists(os.path.join(out, "ldalign", "iter2", "eval.json"))


@pytest.mark.slow
def test_stale_stages_are_recomputed_and_corrupt_files_named(tmp_path):
    """A stored stage records the digests of what it was computed from (stages.json): iteration 1 redone with
    another lr makes iteration 2's samples and distances stale, and they are computed again. Checkpoints carry a
    sha256 manifest: a same-size corrupted model.safetensors stops the run naming it; so does a truncated file."""
    out = str(tmp_path / "run")
    args = ["--out", out] + TINY_RUN
    _run(args)
    s2 = json.load(open(os.path.join(out, "ldalign", "iter2", "distances.json")))["S"]
    shutil.rmtree(os.path.join(out, "ldalign", "iter1", "policy"))  # redo iteration 1 ...
    os.remove(os.path.join(out, "settings.json"))  # ... at another lr
    log = _run(args + ["--lr", "3e-4"])
    assert "[stale] ldalign/iter2/samples.jsonl was computed from another ldalign/iter1/policy" in log
    assert "[stale] ldalign/iter2/distances.jsonl" in log and "training the guide" not in log
    assert json.load(open(os.path.join(out, "ldalign", "iter2", "distances.json")))["S"] != s2
    ckpt = os.path.join(out, "ldalign", "iter2", "policy", "model.safetensors")
    data = bytearray(open(ckpt, "rb").read())
    data[-100:] = bytes(100)  # same size, other weights
    open(ckpt, "wb").write(bytes(data))
    p = _cli(args + ["--lr", "3e-4", "--T", "3"])
    assert p.returncode == 2 and f"error: {ckpt}: missing, truncated or corrupt" in p.stderr, p.stderr[-2000:]
    samples = os.path.join(out, "iter0", "samples.jsonl")
    text = open(samples).read()
    open(samples, "w").write(text[:len(text) // 2])  # cut mid-line
    p = _cli(args + ["--lr", "3e-4"])
    assert p.returncode == 2 and f"error: {samples}: corrupt or truncated" in p.stderr, p.stderr[-2000:]


def test_a_kill_while_a_stale_stage_is_rewritten_never_leaves_the_old_result_recorded_fresh(tmp_path):
    """stages.json never says a result was computed from inputs it was not computed from: a stage recomputed
    because its input changed, killed while its new result is written, is computed again by the rerun (the old
    result is not read back as the new one)."""
    run = rundir.RunDir(dict(ldalign.DEFAULTS, out=str(tmp_path / "run")), stages.METHODS)
    src = tmp_path / "input.txt"
    src.write_text("old")
    assert run.cached("r.json", lambda: {"from": "old"}, inputs=[str(src)]) == {"from": "old"}
    src.write_text("new")

    def killed(value, path):
        # a kill while the new result is written: nothing of it reaches path
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run.cached("r.json", lambda: {"from": "new"}, save=killed, inputs=[str(src)])
    assert run.cached("r.json", lambda: {"from": "new"}, inputs=[str(src)]) == {"from": "new"}
    # a kill while computing leaves the old result with its own record: stale, computed again
    src.write_text("newer")
    with pytest.raises(KeyboardInterrupt):
        run.cached("r.json", lambda: (_ for _ in ()).throw(KeyboardInterrupt), inputs=[str(src)])
    assert run.cached("r.json", lambda: {"from": "newer"}, inputs=[str(src)]) == {"from": "newer"}


@pytest.mark.slow
def test_theta_t_trained_from_another_theta_0_is_trained_again(tmp_path):
    """theta_t records what it was trained from (theta_{t-1}, the pairs' files): replace the weights of the
    --policy folder (theta_0) between two calls on one --out, and theta_1 is trained again from the new one."""
    from safetensors.torch import load_file, save_file
    data = _minimal_data(tmp_path)
    toy = str(tmp_path / "toy")
    _run(["--out", toy, "--data", data] + MINIMAL_RUN + ["--T", "1"])
    # theta_0 as a user's folder (no manifest: it is not one of the run's own checkpoints)
    policy = tmp_path / "theta0"
    shutil.copytree(os.path.join(toy, "sft"), policy)
    os.remove(policy / "manifest.json")
    out = str(tmp_path / "run")
    args = ["--out", out, "--data", data, "--policy", str(policy)] + MINIMAL_RUN + ["--T", "1"]
    _run(args)
    theta_1 = os.path.join(out, "ldalign", "iter1", "policy", "model.safetensors")
    before = open(theta_1, "rb").read()
    weights = load_file(policy / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, policy / "model.safetensors", metadata={"format": "pt"})
    log = _run(args)
    assert "[stale] iter0/samples.jsonl" in log
    assert "[stale] ldalign/iter1/policy was computed from another" in log
    assert open(theta_1, "rb").read() != before
    # and a third call with nothing changed keeps everything
    log = _run(args)
    assert "[stale]" not in log and "===== ldalign iteration" not in log


@pytest.mark.slow
def test_beta_1e30_stops_at_a_nan_in_one_line_and_a_rerun_at_a_lower_beta_works(tmp_path):
    """--beta 1e30 stops at a non-finite loss: one line (no traceback) with the hint "Lower --lr or --beta", exit
    status 2, in log.txt too; doing that on the same --out works: an iteration that produced nothing binds none of
    the update's settings."""
    data, out = _minimal_data(tmp_path), str(tmp_path / "run")
    args = ["--out", out, "--data", data] + MINIMAL_RUN + ["--T", "1"]
    p = _cli(args + ["--beta", "1e30"])
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert last.startswith("error: loss is ") and last.endswith("Lower --lr or --beta."), last
    assert open(os.path.join(out, "log.txt")).read().splitlines()[-1] == last
    _run(args + ["--beta", "0.1"])


@pytest.mark.slow
def test_nan_loss_stops_run_and_keeps_last_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    args = ["--out", out] + TINY_RUN
    args[args.index("--T") + 1] = "1"
    _run(args)
    ckpt = os.path.join(out, "ldalign", "iter1", "policy", "model.safetensors")
    before = open(ckpt, "rb").read()
    args[args.index("--T") + 1] = "2"
    os.remove(os.path.join(out, "settings.json"))  # allow the changed --lr on this folder
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --lr nan is refused before any compute (parse_args); a finite but absurd lr blows the weights up in one step
    p = subprocess.run([sys.executable, os.path.join(HERE, "ldalign.py")] + args + ["--lr", "1e30"], cwd=HERE, env=env,
                       timeout=600, capture_output=True, text=True)
    assert p.returncode != 0 and "at step 2/4 (gradient norm nan)" in p.stderr
    assert "last finished checkpoint" in p.stderr
    assert open(ckpt, "rb").read() == before  # theta_1 intact
    assert not os.path.exists(os.path.join(out, "ldalign", "iter2", "policy"))  # no theta_2 from a NaN update


def test_bad_data_fails_before_compute(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + '{"messages": "oops"}\n')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "ldalign.py"), "--out", str(tmp_path / "r"),
                        "--data", str(path)],
                       cwd=HERE, env=env, timeout=120, capture_output=True, text=True)
    assert p.returncode != 0 and f"{path}:2: 'messages' must be a list" in p.stderr
    assert not os.path.exists(tmp_path / "r" / "sft")  # nothing was trained


def test_parse_args_rejects_bad_settings():
    assert ldalign.parse_args([])["top_p"] == 1.0
    for bad in (["--temperature", "-1"], ["--top_p", "0"], ["--top_p", "1.5"], ["--top_k", "-1"], ["--method", "ppo"],
                ["--gen_compile", "true"], ["--max_new_tokens", "64"], ["--overlength", "eror"]):
        with pytest.raises(SystemExit):
            ldalign.parse_args(bad)
    # every numeric setting is range-checked before any compute; each of these once ran and reported success,
    # trained the reversed objective, or failed hours later
    for bad, msg in ((["--beta", "0"], "--beta must be a finite number > 0"), (["--beta", "-1"], "--beta must be"),
                     (["--epochs", "0"], "--epochs must be > 0"), (["--T", "-1"], "--T must be > 0"),
                     (["--batch_size", "0"], "--batch_size must be > 0"), (["--lr", "nan"], "--lr must be a finite"),
                     (["--lr", "inf"], "--lr must be a finite"), (["--guide_lr", "-1e-3"], "--guide_lr must be"),
                     (["--warmup_ratio", "1"], "--warmup_ratio must be in"), (["--optimizer", "sgd"], "--optimizer is"),
                     (["--max_examples", "-5"], "--max_examples must be >= 0")):
        with pytest.raises(SystemExit, match=msg):
            ldalign.parse_args(bad)


@pytest.mark.slow
def test_user_errors_are_one_line_exit_2_and_logged(tmp_path):
    """A mistake the user can fix: one line naming the option or file:line, exit status 2, no traceback, also in
    log.txt once the run folder is known; nothing is computed and no settings are bound."""
    afile, adir, arr = tmp_path / "afile", tmp_path / "adir", tmp_path / "arr.jsonl"
    afile.write_text("x")
    adir.mkdir()
    arr.write_text(json.dumps([json.loads(GOOD)], indent=1))
    out = str(tmp_path / "r")
    cases = [(["--out", str(afile)], f"--out {afile} is a file"),
             (["--policy", "/nonexistent"], "--policy /nonexistent: no such folder (read as a local path"),
             (["--guide", str(adir)], f"--guide {adir}: a folder without config.json"),
             (["--data", str(adir)], f"{adir}: --data is a directory; expected a JSONL file"),
             (["--eval_data", str(arr)], f"{arr}:1: not valid JSON: Expecting value at column 1; the file "
                                         "starts like a JSON array. JSONL is expected"),
             (["--beta", "0"], "--beta must be a finite number > 0")]
    # the runs are independent (each its own --out), so they run side by side; each is checked on its own
    procs = [_cli_start(["--out", str(tmp_path / f"r{k}")] + args + ["--sft_steps", "1"])
             for k, (args, _) in enumerate(cases)]
    for (args, msg), proc in zip(cases, procs):
        p = _cli_wait(proc)
        assert p.returncode == 2 and p.stderr.strip() == f"error: {p.stderr.strip()[7:]}", (args, p.stderr[-2000:])
        assert msg in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # a hub id that is not cached, offline: at once, naming the option (not the hub client's retries)
    p = _cli(["--out", out, "--reward_model", "someorg/some-rm"], {"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2
    assert "--reward_model someorg/some-rm: not a local folder, and not in the Hugging Face cache" in p.stderr
    assert "error: --reward_model someorg/some-rm" in open(os.path.join(out, "log.txt")).read()
    assert not os.path.exists(os.path.join(out, "settings.json")) and not os.path.exists(os.path.join(out, "sft"))


@pytest.mark.slow
def test_train_sh_reports_a_user_error_once_under_torchrun(tmp_path):
    """Under torchrun every rank meets the same mistake in the input (the settings are good: torchrun starts): the
    user sees it once, as the last line, after torchrun's report, exit status 2."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "\n" + '{"messages": "oops"}\n')
    p = _train_sh(["tiny", "--data", str(bad), "--out", str(tmp_path / "r")], {"NPROC": "2"})
    assert p.returncode == 2 and p.stderr.count("error: ") == 1, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: 'messages' must be a list"), p.stderr[-3000:]


def test_a_mistyped_option_to_train_sh_prints_only_the_error():
    """`bash train.sh tiny --betta 0.1` (2 processes): the settings are checked before torchrun starts, so the user
    sees ldalign.py's one line and nothing of torchrun, exit status 2. docs/reproduce.md says to launch through
    train.sh (under a bare torchrun its report follows the line)."""
    p = _train_sh(["tiny", "--betta", "0.1"], {"NPROC": "2"})
    assert p.returncode == 2 and p.stdout == "", p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stderr.strip().startswith("error: unknown option --betta; known: preset, out,"), p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    docs = " ".join(open(os.path.join(HERE, "docs", "reproduce.md")).read().split())
    assert "**Launch through `train.sh`**, not a bare `torchrun ... ldalign.py`" in docs


@pytest.mark.slow
def test_train_sh_under_a_python_whose_venv_is_not_activated_finds_torchrun(tmp_path):
    """The suite run as `.venv/bin/python -m pytest` (no venv on PATH): _train_sh puts the running interpreter's
    folder first on PATH, where train.sh finds python and torchrun (not status 127); the run gets as far as reading
    its data, whose error is the last line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "oops"}\n')
    p = _train_sh(["tiny", "--data", str(bad), "--out", str(tmp_path / "r")], {"PATH": "/usr/bin:/bin"})
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:1: 'messages' must be a list"), p.stderr[-3000:]


def test_sft_data_given_to_an_ldalign_run_is_a_warning_in_the_log(tmp_path, capsys, monkeypatch):
    """--sft_data (read by --method sft alone), --pref_data (dpo) or --spin_keep_previous (spin) given to a call that
    does not run that method: a warning line in the log, not an error (`train.sh paper-baselines` passes the user's
    options to every method's call); a preset's values (the paper preset's --sft_data "") are not the user's."""
    monkeypatch.setattr(cli, "_LOG", [])  # this test's log.txt only
    out = tmp_path / "run"
    argv = ["--out", str(out), "--sft_data", "more.jsonl", "--pref_data", "pairs.jsonl", "--spin_keep_previous",
            "true"]
    _user_error(argv + ["--method", "ldalign,dpo", "--policy", "/nonexistent"], capsys)  # stops after the log's head
    log = (out / "log.txt").read_text()
    assert ("warning: --sft_data is read by --method sft alone, which --method ldalign,dpo does not run: ignored"
            in log) and "warning: --spin_keep_previous is read by --method spin alone" in log
    assert "--pref_data is read" not in log
    paper = ldalign.parse_args(["--preset", "paper"])
    assert options.ignored(paper, {}) == [] and options.ignored(dict(paper, method="sft"), {"sft_data": ""}) == []


@pytest.mark.slow
def test_run_folder_lock(tmp_path):
    """One run per folder: a live holder stops a second run at once, naming it; a dead holder's lock is taken over."""
    out = tmp_path / "r"
    out.mkdir()
    import socket
    (out / "lock.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then"}))
    p = _cli(["--out", str(out), "--beta", "0.1"])
    assert p.returncode == 2
    assert f"is in use by another run (pid {os.getpid()} on {socket.gethostname()}, started then)" in p.stderr
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "lock.json").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    p = _cli(["--out", str(out), "--policy", "/nonexistent"])  # gets past the lock, stops at the next check
    assert p.returncode == 2 and "--policy /nonexistent" in p.stderr and "in use" not in p.stderr
    assert not (out / "lock.json").exists()  # released when the process exits


def test_unreadable_or_unwritable_files_are_one_line_user_errors(tmp_path, capsys, monkeypatch):
    """An --data that cannot be read, an --out that cannot be written, a --policy folder missing a weights file, a
    .parquet file that is not Parquet: one line naming the file, exit status 2, in log.txt when the run folder is
    writable. The tests run as root, whom no file mode stops: a read permission is denied here by a stand-in for
    open() (what a user without the permission meets), an I/O error comes from a file that root cannot read either
    (/proc/self/mem: its first page is never mapped), and an unwritable --out is a path under a regular file, or a
    stand-in for os.open that denies the lock file."""
    monkeypatch.setattr(cli, "_LOG", [])  # this test's log.txt files only
    import builtins
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD + "\n")

    def denied_open(path, *args, **kw):
        if os.fspath(path) == str(data):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return builtins.open(path, *args, **kw)

    def check(argv, msg, out, logged=True):
        err = _user_error(["--out", str(out)] + argv, capsys)
        assert msg in err, err
        assert not logged or (out / "log.txt").read_text().splitlines()[-1] == err

    with monkeypatch.context() as m:
        m.setattr(dataset, "open", denied_open, raising=False)
        check(["--data", str(data)], f"error: {data}: cannot read the --data file (Permission denied)", tmp_path / "r1")
    if os.path.isfile("/proc/self/mem"):
        check(["--data", "/proc/self/mem"], "error: /proc/self/mem: cannot read the --data file (Input/output error)",
              tmp_path / "r2")
    # --out: a path under a regular file; a run folder whose lock file cannot be created
    check([], f"error: --out {data}/run: cannot write the run folder (a part of its path is a file, not a folder)",
          tmp_path / "data.jsonl" / "run", logged=False)
    out = tmp_path / "readonly"
    out.mkdir()
    real_open = os.open

    def denied(path, *args, **kw):
        if os.fspath(path).endswith("lock.json"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kw)
    with monkeypatch.context() as m:
        m.setattr(os, "open", denied)
        check([], f"error: --out {out}: cannot write the run folder (Permission denied at {out}/lock.json)", out,
              logged=False)
    assert not os.path.exists(out / "log.txt")
    # --policy: an HF folder whose index names a shard that is missing; one without any weights file
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text("{}")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (policy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    (policy / shards[0]).write_bytes(b"")
    check(["--policy", str(policy)], f"error: --policy {policy}: the weights file {policy}/{shards[1]} named in "
                                     f"{policy}/model.safetensors.index.json is missing", tmp_path / "r3")
    os.remove(policy / "model.safetensors.index.json")
    check(["--policy", str(policy)], f"error: --policy {policy}: no weights file in the folder", tmp_path / "r4")
    # a .parquet file that is not Parquet
    pytest.importorskip("pyarrow")
    fake = tmp_path / "train.parquet"
    fake.write_text(GOOD + "\n")
    check(["--data", str(fake)], f"error: {fake}: not a Parquet file (", tmp_path / "r5")


def test_dpo_baseline_missing_reference_is_a_one_line_user_error(tmp_path, capsys, monkeypatch):
    """The DPO baseline's reference (theta_0's log-probs) can only be computed in iteration 1: later iterations
    without its file stop with one line naming it, exit status 2, also in log.txt."""
    monkeypatch.setattr(cli, "_LOG", [])
    run = rundir.RunDir(dict(ldalign.DEFAULTS, out=str(tmp_path / "run")), stages.METHODS)
    fake = SimpleNamespace(run=run, cfg=run.cfg, device=torch.device("cpu"))

    def main(argv):
        stages.Stages.reference(fake, "dpo", 2, None, [])
    with pytest.raises(SystemExit) as e:
        cli.report_errors(main, [])
    err = capsys.readouterr().err
    ref = run.path(stages.DPO_REFERENCE)
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {ref} is missing"), err
    assert open(run.path("log.txt")).read().endswith(err)


def test_an_empty_or_half_written_lock_is_taken_over(tmp_path):
    """lock.json written by a process that died while writing it (empty, or cut mid-JSON) names no holder: the lock
    is a dead run's, and the next run takes it over."""
    out = tmp_path / "run"
    out.mkdir()
    for text in ("", '{"pid": 12'):
        (out / "lock.json").write_text(text)
        rundir.RunDir(dict(ldalign.DEFAULTS, out=str(out)), stages.METHODS)
        assert json.loads((out / "lock.json").read_text())["pid"] == os.getpid()
        os.remove(out / "lock.json")


def test_a_run_folder_without_its_manifest_is_an_error(tmp_path):
    """A folder the run wrote itself (theta_t, the toy's sft/, guide/, tokenizer/) carries a manifest.json; without
    it its weights cannot be verified, and reading it stops, naming it. theta_0 given with --policy has none and
    loads as it is."""
    run = rundir.RunDir(dict(ldalign.DEFAULTS, out=str(tmp_path / "run")), stages.METHODS)
    model = tiny_llama()
    ckpt = run.path("ldalign", "iter1", "policy")
    with rundir.atomic_path(ckpt) as tmp:
        model.save_pretrained(tmp)
    os.remove(os.path.join(ckpt, "manifest.json"))
    cfg = dict(run.cfg, policy=str(tmp_path / "theta0"))
    with pytest.raises(cli.UserError, match=f"^{ckpt}: its manifest.json is missing"):
        stages.load_policy(ckpt, cfg, torch.device("cpu"))
    shutil.copytree(ckpt, cfg["policy"])
    stages.load_policy(cfg["policy"], cfg, torch.device("cpu"))
    # a stored stage's folder (the guide, the tokenizer, the toy's theta_0) is verified as it is read back

    def save(value, path):
        with rundir.atomic_path(path) as tmp:
            os.makedirs(tmp)
            open(os.path.join(tmp, "weights"), "w").write(value)
    run.cached("guide", lambda: "w", save=save, load=lambda path: None)
    os.remove(run.path("guide", "manifest.json"))
    with pytest.raises(cli.UserError, match=f"^{run.path('guide')}: its manifest.json is missing"):
        run.cached("guide", lambda: "w", save=save, load=lambda path: None)


def test_no_pickle_checkpoints_and_no_remote_code_by_default():
    for name in ("ldalign.py", "stages.py", "dpo.py", "guide.py", "generate.py", "dataset.py", "run/rundir.py",
                 "fsdp.py", "analysis.py", "run/checkpoint.py", "run/lora.py"):
        src = open(os.path.join(HERE, name)).read()
        assert "torch.load(" not in src or "weights_only=True" in src
        assert "trust_remote_code=True" not in src
    assert ldalign.DEFAULTS["trust_remote_code"] is False
