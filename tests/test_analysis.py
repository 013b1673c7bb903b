"""Analysis (analysis.py, Sections 5.1.3 and 5.2): word edit distance and the toy judge, ranking agreement, Table 1's
AVG, the distance histogram (numbers and PNG), reward models (tiny DeBERTa-v2 / GPT-2 classifiers, built here);
Table 1's settings (tools/harness.py) and provenance (lm-eval's version, --*_revision, config.json's revisions); the
seeds report (means with 95% intervals); watching a run: train_curves.png and --tensorboard.
"""
import importlib.util
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import analysis
import dataset
import guide as guide_lib
import ldalign
import stages
from run import cli, rundir
from tests.builders import (
    HERE,
    MINIMAL_RUN,
    _cli,
    _minimal_data,
    _read_jsonl,
    _run,
    _train_sh,
)


# ====================================================================================================
# Analysis (analysis.py): the toy judge, the Section 5.2 analyses, reward-model scoring (Section 5.1.3)
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# the toy judge: word edit distance to the golden answer
# ----------------------------------------------------------------------------------------------------
def test_word_edit_distance_small_cases():
    d = analysis.word_edit_distance
    assert d("1 2 3", "1 2 3") == 0
    assert d("1 2 3", "1  2\t3 ") == 0  # words, not characters: whitespace does not count
    assert d("1 2 3", "1 9 3") == 1  # one substitution
    assert d("1 2 3", "1 3") == 1  # one deletion
    assert d("1 3", "1 2 3") == 1  # one insertion
    assert d("", "") == 0
    assert d("", "a b c") == 3 and d("a b c", "") == 3
    assert d("a b c d", "b a d c") == 3  # no transpositions in plain Levenshtein: 2 swaps cost 3 here
    assert d("12 3", "1 23") == 2  # "12" is one word, not two


def test_toy_judge_orders_answers():
    j = analysis.toy_judge
    golden = "22 53 93"
    assert j("22 53 93", golden) == 0.0
    assert j(" 22 53  93 ", golden) == 0.0  # an exact match up to whitespace
    one_off = j("22 93 93", golden)
    two_off = j("93 22 53", golden)
    assert one_off == -1.0
    assert two_off < one_off < 0.0
    assert j("", golden) == -3.0
    assert isinstance(j("x", golden), float)


# ----------------------------------------------------------------------------------------------------
# Section 5.2 (2): ranking agreement of s_phi with a judge
# ----------------------------------------------------------------------------------------------------
def test_ranking_agreement_hand_made():
    #          pair:   0     1     2            3     4     5
    dist_a = [0.1, 0.9, 0.3, 0.4, 0.5, 0.8]
    dist_b = [0.5, 0.2, 0.3 + 1e-8, 0.7, 0.5, 0.6]
    judge_a = [0.0, -1.0, 0.0, -2.0, -1.0, -4.0]
    judge_b = [-2.0, -3.0, -1.0, -2.0, -1.0, -1.0]
    # 0: distance prefers a (smaller), judge prefers a (higher)          -> agree
    # 1: distance prefers b, judge prefers a                             -> disagree
    # 2: distances tie (|diff| <= 1e-6)                                  -> not decided
    # 3: judge ties                                                      -> not decided
    # 4: both tie                                                        -> not decided
    # 5: distance prefers b, judge prefers b                             -> agree
    r = analysis.ranking_agreement(dist_a, dist_b, judge_a, judge_b)
    assert r["n"] == 6
    assert r["n_decided"] == 3
    assert r["agree"] == 2
    assert r["agreement"] == pytest.approx(2 / 3)
    assert r["judge_ties"] == 2  # pairs 3, 4
    assert r["distance_ties"] == 2  # pairs 2, 4
    json.dumps(r)
    # torch / numpy inputs give the same answer
    r2 = analysis.ranking_agreement(torch.tensor(dist_a), np.array(dist_b), torch.tensor(judge_a), judge_b)
    assert r2 == r


def test_ranking_agreement_edges():
    # judge ties are exact: a tiny difference in judge scores is a preference
    r = analysis.ranking_agreement([0.1], [0.2], [-1.0], [-1.0 + 1e-12])
    assert r["judge_ties"] == 0 and r["n_decided"] == 1 and r["agree"] == 0
    # nothing decided -> agreement None (not a division by zero)
    r = analysis.ranking_agreement([0.1, 0.2], [0.1, 0.3], [0.0, -1.0], [-1.0, -1.0])
    assert r["n_decided"] == 0 and r["agreement"] is None
    r = analysis.ranking_agreement([], [], [], [])
    assert r["n"] == 0 and r["agreement"] is None
    with pytest.raises(ValueError):
        analysis.ranking_agreement([0.1, 0.2], [0.1], [0.0], [0.0])
    # identical samples are a tie for both, even if rounding gave them different scores; NaN is refused
    r = analysis.ranking_agreement([0.1, 0.1], [0.3, 0.1 + 1e-5], [0.0, 0.5], [-1.0, 0.5 + 1e-7], same=[False, True])
    assert r["n_decided"] == 1 and r["agree"] == 1 and r["judge_ties"] == 1 and r["distance_ties"] == 1
    with pytest.raises(ValueError, match="finite"):
        analysis.ranking_agreement([float("nan")], [0.1], [0.0], [1.0])


# ----------------------------------------------------------------------------------------------------
# Section 5.2 (1): the distribution of s_phi (histogram numbers and PNG)
# ----------------------------------------------------------------------------------------------------
def test_table1_avg_is_the_papers_mean_relative_improvement():
    """Table 1's AVG column, from the paper's own rows: SPIN 4.56%, LD-Align 2 6.00% over Zephyr-sft."""
    from tools import harness
    cols = [c for c, _, _, _ in harness.TABLE1]
    rows = {"SFT (theta_0)": [43.7, 82.1, 62.1, 55.7, 30.8, 44.4, 63.5],
            "spin 1": [48.7, 81.7, 65.1, 60.4, 33.6, 45.4, 61.2],
            "ldalign 3": [50.3, 82.5, 66.2, 60.7, 33.2, 45.9, 63.3]}
    md = harness.table({k: dict(zip(cols, [v / 100 for v in vs])) for k, vs in rows.items()}, cols)
    assert "| spin 1 | 48.7 | 81.7 | 65.1 | 60.4 | 33.6 | 45.4 | 61.2 | 4.56% |" in md
    assert md.splitlines()[-1].endswith("| 6.00% |")


# ----------------------------------------------------------------------------------------------------
# Table 1's settings (harness.py) and what a run read (--*_revision, config.json's provenance)
# ----------------------------------------------------------------------------------------------------
def test_harness_tasks_name_columns_of_table_1_or_spell_them_out():
    """--tasks: table1, a few of its columns by name (the small preset's eval), or COLUMN=TASK:FEWSHOT:KEY;..."""
    from tools import harness
    assert harness.parse_tasks("table1") == harness.TABLE1
    assert [c for c, _, _, _ in harness.parse_tasks("TruthfulQA,PIQA,ARC")] == ["TruthfulQA", "PIQA", "ARC"]
    assert harness.parse_tasks("ARC") == [r for r in harness.TABLE1 if r[0] == "ARC"]
    assert harness.parse_tasks("Sort=toy_sort:0:exact_match,none") == [("Sort", "toy_sort", 0, "exact_match,none")]
    for bad in ("TruthfulQA,MMLU", "Sort=toy_sort"):
        with pytest.raises(cli.UserError, match="--tasks"):
            harness.parse_tasks(bad)


def test_harness_records_lm_eval_version_settings_and_passes_template_and_revision(tmp_path, monkeypatch):
    """harness.main with lm-eval's model and simple_evaluate replaced by fakes: plain prompts by default,
    --chat_template true applies the template (few-shot as turns), theta_0 of a hub id is read at the run's
    --policy_revision; table1.md names lm-eval's version and each column's task, shots, metric and prompt, and
    table1.json keeps every metric."""
    pytest.importorskip("lm_eval")
    import lm_eval
    import lm_eval.models.huggingface as hf
    import lm_eval.tasks

    from tools import harness
    seen = []

    class FakeLM:
        def __init__(self, **kw):
            seen.append(("model", kw))

    def fake_evaluate(model, tasks, num_fewshot, **kw):
        seen.append((tasks[0], dict(kw, num_fewshot=num_fewshot)))
        return {"results": {tasks[0]: {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6, "r@1,none": 0.4,
                                       "exact_match,strict-match": 0.3}},
                "samples": {tasks[0]: [{"filtered_resps": [(-1.0, False)]}]}}
    monkeypatch.setattr(hf, "HFLM", FakeLM)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path: None)  # (indexes every task: slow)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    run = tmp_path / "run"
    run.mkdir()
    json.dump({"policy": "org/zephyr", "policy_revision": "v1.0"}, open(run / "config.json", "w"))
    harness.main([str(run)])
    model, *calls = seen
    assert model[1]["pretrained"] == "org/zephyr" and model[1]["revision"] == "v1.0"
    assert [c[0] for c in calls] == [t for _, t, _, _ in harness.TABLE1]
    assert all(not kw["apply_chat_template"] and not kw["fewshot_as_multiturn"] for _, kw in calls)
    assert [kw["num_fewshot"] for _, kw in calls] == [s for _, _, s, _ in harness.TABLE1]
    md = open(run / "table1.md").read()
    assert md.startswith(f"lm-evaluation-harness {lm_eval_version()}, no chat template")
    assert "| HellaSwag | hellaswag | 0 | acc,none | plain (no chat template) |" in md
    assert "| GSM8k | gsm8k_cot | 8 | exact_match,strict-match | plain (no chat template) |" in md
    out = json.load(open(run / "table1.json"))
    assert out["lm_eval"] == lm_eval_version() and out["chat_template"] is False
    assert out["metrics"]["SFT (theta_0)"]["ARC"] == {"acc,none": 0.5, "acc_norm,none": 0.6, "r@1,none": 0.4,
                                                      "exact_match,strict-match": 0.3}
    seen.clear()
    harness.main([str(run), "--chat_template", "true", "--tasks", "A=piqa:0:acc,none;G=gsm8k_cot:8:acc,none"])
    assert [(kw["apply_chat_template"], kw["fewshot_as_multiturn"]) for _, kw in seen[1:]] == [(True, False),
                                                                                             (True, True)]
    assert "| G | gsm8k_cot | 8 | acc,none | chat template, few-shot as turns |" in open(run / "table1.md").read()
    with pytest.raises(cli.UserError, match="--chat_template is true or false"):
        harness.main([str(run), "--chat_template", "yes"])


def lm_eval_version():
    from importlib import metadata
    return metadata.version("lm_eval")


def _fake_hub_cache(root, repo, commits):
    """A Hugging Face cache holding repo's config.json at each {revision: commit} (refs/<revision> -> commit)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    for rev, sha in commits.items():
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / rev).write_text(sha)
        (folder / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / sha / "config.json").write_text("{}")


def test_config_json_records_each_models_revision_and_the_versions(tmp_path, monkeypatch):
    """config.json's provenance: a hub id's commit as the local cache resolves its revision (a revision not in
    the cache offline: "unresolved", and --policy_revision reaches the check of the model source); a local folder's
    digest of config.json and weights (it changes with its config); "tiny"; torch, transformers, lm-eval versions."""
    import importlib.util
    from importlib import metadata

    import transformers
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "hub", "org/zephyr", {"main": "a" * 40, "v1": "b" * 40})
    assert rundir.model_revision("org/zephyr") == "a" * 40
    assert rundir.model_revision("org/zephyr", "v1") == "b" * 40
    assert rundir.model_revision("org/zephyr", "v2").startswith("unresolved (not in the local Hugging Face cache")
    dataset.check_model_source("policy", "org/zephyr", "v1")
    with pytest.raises(cli.UserError, match="--policy org/zephyr: .* at revision v2; HF_HUB_OFFLINE"):
        dataset.check_model_source("policy", "org/zephyr", "v2")
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text('{"a": 1}')
    (rm / "model.safetensors").write_bytes(b"0" * 10)
    first = rundir.model_revision(str(rm))
    assert first.startswith("folder sha256:") and rundir.model_revision(str(rm)) == first
    (rm / "config.json").write_text('{"a": 2}')
    assert rundir.model_revision(str(rm)) != first
    cfg = ldalign.parse_args(["--out", str(tmp_path / "run"), "--reward_model", str(rm)])
    rundir.RunDir(cfg, stages.METHODS)
    prov = json.load(open(tmp_path / "run" / "config.json"))["provenance"]
    assert prov["revisions"] == {"policy": "tiny", "guide": "tiny", "reward_model": rundir.model_revision(str(rm))}
    assert prov["versions"] == {"torch": metadata.version("torch"), "transformers": transformers.__version__,
                                "lm_eval": metadata.version("lm_eval") if importlib.util.find_spec("lm_eval")
                                else None}
    for bad in (["--policy_revision", "v1"], ["--reward_model", str(rm), "--reward_model_revision", "v1"]):
        with pytest.raises(SystemExit, match="_revision is for a hub id"):
            ldalign.parse_args(bad)


def test_revision_reaches_every_from_pretrained_of_its_model(monkeypatch):
    """--policy_revision, --guide_revision and --reward_model_revision are passed to the from_pretrained calls
    of the policy (tokenizer, weights; the config under torchrun), the guide and the reward model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2LMHeadModel

    class Seen(Exception):
        pass

    def fake(cls, name, *args, **kw):
        raise Seen(name, kw.get("revision"))
    for c in (AutoTokenizer, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2LMHeadModel):
        monkeypatch.setattr(c, "from_pretrained", classmethod(fake))
    cfg = dict(ldalign.DEFAULTS, policy="org/policy", policy_revision="p1", guide_revision="g1",
               reward_model_revision="r1", max_examples=4, data=os.path.join(HERE, "data", "sort_train.jsonl"),
               eval_data="")
    loads = [lambda: stages.load_policy("org/policy", cfg, torch.device("cpu")),
             lambda: guide_lib.build_guide("org/guide", 4, revision="g1"),
             lambda: analysis.load_reward_model("org/rm", device="cpu", revision="r1")]
    monkeypatch.setattr(dataset, "check_model_source", lambda *a: None)
    loads.append(lambda: dataset.load(cfg, SimpleNamespace(log=print)))
    got = []
    for load in loads:
        with pytest.raises(Seen) as e:
            load()
        got.append(e.value.args)
    assert got == [("org/policy", "p1"), ("org/guide", "g1"), ("org/rm", "r1"), ("org/policy", "p1")]


def test_seeds_report_means_intervals_and_paired_difference(tmp_path):
    """`bash train.sh seeds`' tables: mean over seeds with the 95% t-interval; each method's change from theta_0 and
    ldalign - spin, paired by seed."""
    em = {"ldalign": [0.60, 0.62, 0.58], "spin": [0.59, 0.60, 0.58]}
    for k in range(3):
        for m, v in em.items():
            os.makedirs(tmp_path / f"seed{k}" / m)
            rundir.write_jsonl(str(tmp_path / f"seed{k}" / m / "metrics.jsonl"),
                               [{"iter": 0, "exact_match": 0.5}, {"iter": 1, "exact_match": v[k]}])
    analysis.seeds_report(str(tmp_path))
    stats = json.load(open(tmp_path / "seeds.json"))["mean_and_halfwidth"]
    mean, half = stats["ldalign iter 1"]
    assert mean == pytest.approx(0.60) and half == pytest.approx(4.303 * 0.02 / math.sqrt(3))  # t(2 df) = 4.303
    assert stats["ldalign iter 0"] == [0.5, 0.0]
    diffs = json.load(open(tmp_path / "seeds.json"))["paired_mean_and_halfwidth"]
    d, dh = diffs["ldalign - spin iter 1"]  # differences 0.01, 0.02, 0.00
    assert d == pytest.approx(0.01) and dh == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    d, dh = diffs["spin - theta_0 iter 1"]  # differences 0.09, 0.10, 0.08 from theta_0's 0.5
    assert d == pytest.approx(0.09) and dh == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    md = open(tmp_path / "seeds.md").read()
    assert "| 1 | 0.600 +- 0.050 | 0.590 +- 0.025 |" in md  # the means, then the paired differences
    assert "| 1 | 0.100 +- 0.050 | 0.090 +- 0.025 | 0.010 +- 0.025 |" in md


@pytest.mark.slow
def test_train_sh_seeds_folder_first_seed_and_settings(tmp_path):
    """`OUT=... FIRST_SEED=3 SEEDS=2 bash train.sh seeds --key value`: seed 3's run goes to OUT/seed3 with the given
    settings; a user error there stops the study at once (no seed 4, no report), shown once as the last line."""
    out = tmp_path / "study"
    p = _train_sh(["seeds", "--beta", "2.0", "--data", "missing.jsonl"],
                  {"OUT": str(out), "FIRST_SEED": "3", "SEEDS": "2"})
    assert p.returncode == 2 and p.stderr.count("error: ") == 1, p.stderr[-3000:]
    assert "missing.jsonl" in p.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(out)) == ["seed3"]
    cfg = json.load(open(out / "seed3" / "config.json"))
    assert (cfg["seed"], cfg["beta"], cfg["method"]) == (3, 2.0, "ldalign,spin,dpo,sft")


def test_distance_histogram_shapes_and_json():
    s = torch.rand(137, generator=torch.Generator().manual_seed(0)) * 3.0
    h = analysis.distance_histogram(s, bins=10)
    assert len(h["edges"]) == 11 and len(h["counts"]) == 10
    assert sum(h["counts"]) == 137 and h["n"] == 137 and h["outside"] == 0
    assert h["mean"] == pytest.approx(float(s.double().mean()))
    assert h["std"] == pytest.approx(float(s.double().std(unbiased=False)))
    q = h["quantiles"]
    assert h["edges"][0] <= q["p10"] <= q["p50"] <= q["p90"] <= h["edges"][-1]
    assert all(type(c) is int for c in h["counts"]) and all(type(e) is float for e in h["edges"])
    assert json.loads(json.dumps(h)) == h  # plain JSON types all the way down
    # a fixed range (same bins for every iteration): values outside it are counted in "outside"
    h2 = analysis.distance_histogram([0.5, 1.5, 2.5, 9.0], bins=3, range_=(0.0, 3.0))
    assert h2["counts"] == [1, 1, 1] and h2["outside"] == 1 and h2["edges"] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        analysis.distance_histogram([])
    with pytest.raises(ValueError):
        analysis.distance_histogram([1.0, float("nan")])


def test_save_histogram_png_without_matplotlib(tmp_path, monkeypatch):
    # None in sys.modules makes `import matplotlib...` raise ImportError, as if it were not installed.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "sub" / "hist.png"
    assert analysis.save_histogram_png({"iter 1": [0.1, 0.2, 0.3]}, str(path)) is False
    assert not path.exists() and not (tmp_path / "sub").exists()


def test_save_histogram_png_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")  # optional dependency: runs only where it is installed
    path = tmp_path / "hist.png"
    ok = analysis.save_histogram_png({"iter 1": [0.5, 0.7, 0.9, 1.2], "iter 2": torch.tensor([0.2, 0.3, 0.4])},
                                     str(path))
    assert ok is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["hist.png"]  # the temp file was renamed, not left behind


# ----------------------------------------------------------------------------------------------------
# Watching a run: train_curves.png and TensorBoard (--tensorboard)
# ----------------------------------------------------------------------------------------------------
def test_save_curves_png_with_and_without_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    history = [{"step": k, "steps": 3, "loss": 0.7 - 0.1 * k, "lr": 1e-3, "grad_norm": 1.0 + k, "reward_chosen": 0.1,
                "reward_rejected": -0.1, "reward_acc": 0.5, "reward_margin": 0.2} for k in (1, 2, 3)]
    sft = [{k: h[k] for k in ("step", "steps", "loss", "lr", "grad_norm")} for h in history]  # no rewards: 3 panels
    for name, rows in (("dpo.png", history), ("sft.png", sft)):
        assert analysis.save_curves_png(rows, str(tmp_path / name), title="ldalign, iteration 1") is True
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["dpo.png", "sft.png"]  # no temp file left behind
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert analysis.save_curves_png(history, str(tmp_path / "none.png")) is False
    assert not (tmp_path / "none.png").exists()


def test_tensorboard_without_the_package_is_a_one_line_error_before_compute(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.report_errors(ldalign.main, ["--out", str(out), "--tensorboard", "true"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err == "error: --tensorboard true needs the tensorboard package: pip install tensorboard\n"
    assert not out.exists()  # before anything ran
    assert ldalign.parse_args(["--out", str(out)])["tensorboard"] is False  # the default needs no package


@pytest.mark.slow
def test_watching_a_run_tensorboard_scalars_and_train_curves(tmp_path):
    """--tensorboard true: out/tensorboard/ldalign/steps holds train/<key> for every optimizer step, numbered across
    iterations, as train_metrics.jsonl has it; out/tensorboard/ldalign/iterations holds iteration/<key> per
    iteration (theta_0 as 0), as metrics.jsonl has it; beside each train_metrics.jsonl a train_curves.png. A resumed
    run writes the killed iteration's steps and metrics.jsonl's rows again: TensorBoard shows each once."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, T = str(tmp_path / "run"), 2
    # 8 pairs in batches of 4: 2 optimizer steps per iteration
    args = ["--out", out, "--data", _minimal_data(tmp_path)] + MINIMAL_RUN + [
        "--max_examples", "8", "--batch_size", "4", "--micro_batch_size", "4", "--tensorboard", "true",
        "--log_every", "100"]
    # killed half-way through iteration 2's update (after its step 1, global step 3), then resumed
    p = _cli(args, env_extra={"LDALIGN_KILL_AT": "ldalign/iter2/train"})
    assert p.returncode == 137, p.stdout[-2000:] + p.stderr[-2000:]
    log = _run(args)
    assert "step 1/2 loss" in log and "step 2/2 loss" in log  # the log: the first step and the last, as before

    def scalars(run):
        board = EventAccumulator(os.path.join(out, "tensorboard", "ldalign", run))
        board.Reload()
        return {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}
    assert len(os.listdir(os.path.join(out, "tensorboard", "ldalign", "steps"))) == 2  # the killed run's, the resumed's
    steps = [r for t in range(1, T + 1) for r in _read_jsonl(os.path.join(out, f"ldalign/iter{t}/train_metrics.jsonl"))]
    assert len(steps) == 2 * T
    train = scalars("steps")
    keys = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_acc", "lr", "grad_norm")
    assert sorted(train) == sorted(f"train/{k}" for k in keys)
    for k in keys:
        assert train[f"train/{k}"] == [(n + 1, pytest.approx(r[k], rel=1e-6, abs=1e-7)) for n, r in enumerate(steps)], k
    rows = _read_jsonl(os.path.join(out, "ldalign", "metrics.jsonl"))
    it = scalars("iterations")
    assert sorted(it) == ["iteration/S", "iteration/exact_match", "iteration/loss"]  # no --reward_model: no reward
    assert it["iteration/exact_match"] == [(r["iter"], pytest.approx(r["exact_match"])) for r in rows]
    assert it["iteration/S"] == [(r["iter"], pytest.approx(r["S"], rel=1e-6)) for r in rows[1:]]  # none at 0
    assert it["iteration/loss"] == [(r["iter"], pytest.approx(r["loss"], rel=1e-6)) for r in rows[1:]]
    for t in range(1, T + 1):
        png = os.path.join(out, "ldalign", f"iter{t}", "train_curves.png")
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# Section 5.1.3: reward models
# ----------------------------------------------------------------------------------------------------
# Tiny checkpoints built offline from configs (never the hub), saved with save_pretrained, loaded back through
# load_reward_model exactly as a downloaded RM folder would be.
RM_PROMPTS = ["sort: 3 1 2", "hello", "sort: 9 8 7 6 5 4 3 2 1 0 sort sort", "how are you"]
RM_RESPONSES = ["1 2 3", "world how are you today", "0 1", "fine"]
RM_CORPUS = RM_PROMPTS + RM_RESPONSES + ["0 1 2 3 4 5 6 7 8 9 hello world"]


def _deberta_tokenizer():
    """A WordLevel tokenizer with DeBERTa's pair template: [CLS] x [SEP] y [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(RM_CORPUS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    # Without a post-processor a tokenizers-backed tokenizer just concatenates x and y: the template is what
    # makes tokenizer(x, y) a DeBERTa-style pair.
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tk.token_to_id("[CLS]")), ("[SEP]", tk.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def _gpt2_tokenizer(with_pad=True):
    """A byte-level BPE like GPT-2's: no template, so a pair is x and y concatenated."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|pad|>"] if with_pad else ["<|end|>"]
    tk.train_from_iterator(RM_CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kw = dict(pad_token="<|pad|>") if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", **kw)


def _tiny_deberta(tok):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    # Shaped like deberta-v3 (relative attention with p2c/c2p, no absolute positions in the input, no token
    # types), only tiny. initializer_range is large so different pairs get visibly different rewards.
    cfg = DebertaV2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, type_vocab_size=0,
                          relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
                          position_buckets=16, max_relative_positions=-1, norm_rel_ebd="layer_norm",
                          share_att_key=True, num_labels=1, pad_token_id=tok.pad_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    return DebertaV2ForSequenceClassification(cfg)


def _tiny_gpt2(tok, pad_token_id):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                     pad_token_id=pad_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(cfg)


def _by_hand(model, tok, x, y):
    """The model's own forward on one unpadded pair: the reference reward_scores must reproduce."""
    enc = tok(x, y, return_tensors="pt")
    with torch.no_grad():
        return float(model(**enc).logits[0, 0])


def _check_scores(model, tok):
    s = analysis.reward_scores(model, tok, RM_PROMPTS, RM_RESPONSES, batch_size=16, device="cpu")
    assert s.shape == (len(RM_PROMPTS),) and s.dtype == torch.float32
    assert torch.isfinite(s).all()
    assert float(s.max() - s.min()) > 1e-3  # different pairs, different rewards: the comparison below means something
    for i in (0, 2):
        assert float(s[i]) == pytest.approx(_by_hand(model, tok, RM_PROMPTS[i], RM_RESPONSES[i]), abs=1e-4)
    # Batched (padded, mixed lengths) vs one at a time (no padding): padding must not change a score.
    s1 = analysis.reward_scores(model, tok, RM_PROMPTS, RM_RESPONSES, batch_size=1, device="cpu")
    torch.testing.assert_close(s, s1, atol=1e-4, rtol=0)
    return s


@pytest.mark.parametrize("arch", ["deberta-v2", "gpt2"])
def test_reward_model_roundtrip(tmp_path, arch):
    if arch == "deberta-v2":
        tok = _deberta_tokenizer()
        model = _tiny_deberta(tok)
    else:
        tok = _gpt2_tokenizer(with_pad=True)
        model = _tiny_gpt2(tok, pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path))

    rm, rtok = analysis.load_reward_model(str(tmp_path), device="cpu")
    assert not rm.training  # eval mode: no dropout in the scores
    assert type(rm).__name__ == type(model).__name__
    s = _check_scores(rm, rtok)
    # the loaded checkpoint scores like the model that was saved
    s0 = analysis.reward_scores(model.eval(), tok, RM_PROMPTS, RM_RESPONSES, device="cpu")
    torch.testing.assert_close(s, s0, atol=1e-5, rtol=0)
    assert analysis.reward_scores(rm, rtok, [], [], device="cpu").shape == (0,)
    with pytest.raises(ValueError):
        analysis.reward_scores(rm, rtok, RM_PROMPTS, RM_RESPONSES[:2], device="cpu")


def test_reward_model_without_pad_token():
    # GPT-2's own tokenizer has no pad token and its config no pad id: reward_scores borrows eos for the
    # duration, and leaves both the tokenizer and the model's config as they were.
    tok = _gpt2_tokenizer(with_pad=False)
    assert tok.pad_token is None
    model = _tiny_gpt2(tok, pad_token_id=None).eval()
    _check_scores(model, tok)
    assert tok.pad_token is None and model.config.pad_token_id is None


def test_reward_scores_truncates_to_max_length():
    tok = _deberta_tokenizer()
    model = _tiny_deberta(tok).eval()
    long_x = " ".join(["sort"] * 200)  # longer than the model's 64 positions
    s = analysis.reward_scores(model, tok, [long_x, "hello"], ["1 2 3", "world"], max_length=32, device="cpu")
    assert s.shape == (2,) and torch.isfinite(s).all() and not math.isnan(float(s[0]))
