"""The paper's Table 1 (Section 5.1.3) with lm-evaluation-harness, on every policy of a run folder.

    bash train.sh eval runs/paper          # = python harness.py runs/paper: theta_0 and every theta_t of every method
    python harness.py runs/paper --limit 100                  # the first 100 examples of each task (a quick look)
    python harness.py RUN --tasks "Sort=toy_sort:0:exact_match,none" --include_path DIR   # your own task YAMLs

Writes RUN/table1.md (the paper's layout: a row per model, a column per benchmark, AVG = the mean relative
improvement over the SFT model theta_0, as the paper's 4.56% for SPIN) and RUN/table1.json (every score, and
each model's answers of generation tasks). lm-eval is an optional extra: `pip install -r requirements-extra.txt`
(a clear error says so when it is missing); nothing else in the project needs it.

The models are scored as they were trained and sampled: through their tokenizer's chat template
(apply_chat_template, few-shot examples as earlier turns), in fp32 on the CPU or bf16 on a GPU, greedy.
Few-shot settings (the paper gives none): the Open LLM Leaderboard's (v1), which SPIN reported with, where it has
the task: ARC-Challenge 25-shot, HellaSwag 10-shot, TruthfulQA 0-shot (mc2); GSM8k as the paper's "CoT" task
gsm8k_cot, with its own 8 chain-of-thought exemplars; PIQA, OpenBookQA and MuTual, not on the leaderboard, 0-shot.
"""
import json
import os
import sys

from cli import UserError, report_errors
from rundir import METHODS, first_unsaved, policy_path, read_json, write_atomic

# (column, lm-eval task, few-shot examples, the result key of lm-eval reported as the column's score)
TABLE1 = [("TruthfulQA", "truthfulqa_mc2", 0, "acc,none"),
          ("PIQA", "piqa", 0, "acc_norm,none"),
          ("HellaSwag", "hellaswag", 10, "acc_norm,none"),
          ("ARC", "arc_challenge", 25, "acc_norm,none"),
          ("OpenbookQA", "openbookqa", 0, "acc_norm,none"),
          ("GSM8k", "gsm8k_cot", 8, "exact_match,strict-match"),
          ("MuTual", "mutual", 0, "r@1,none")]


def models_of(run):
    """(label, checkpoint folder) of theta_0 and of every saved theta_t of every method in the run folder."""
    cfg = read_json(os.path.join(run, "config.json"))
    return [("SFT (theta_0)", policy_path(run, cfg, "", 0))] + [
        (f"{m} {t}", policy_path(run, cfg, m, t)) for m in METHODS for t in range(1, first_unsaved(run, cfg, m))]


def score(path, tasks, include_path=None, limit=None, batch_size=16):
    """lm-eval on one checkpoint: {column: (score, answers or None)}. tasks: [(column, task, few-shot, key)]."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("the Table 1 evaluation needs lm-evaluation-harness: pip install -r requirements-extra.txt") \
            from None
    import torch
    cuda = torch.cuda.is_available()
    lm = HFLM(pretrained=path, dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu",
              batch_size=batch_size)  # loaded once, scored on every task
    manager = TaskManager(include_path=include_path)
    out = {}
    for column, task, shots, key in tasks:
        r = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, task_manager=manager, limit=limit,
                                    apply_chat_template=True, fewshot_as_multiturn=shots > 0, log_samples=True)
        if key not in r["results"][task]:
            raise UserError(f"task {task} reports {', '.join(k for k in r['results'][task] if ',' in k)}, not {key}")
        samples = r["samples"][task]
        answers = [s["filtered_resps"][0] for s in samples] if samples and isinstance(
            samples[0]["filtered_resps"][0], str) else None  # generation tasks: what the model answered
        out[column] = (float(r["results"][task][key]), answers)
    return out


def table(scores, columns):
    """Markdown in the paper's layout: scores in %, AVG = mean over columns of score / SFT's score - 1."""
    base = scores["SFT (theta_0)"]
    lines = ["| Model | " + " | ".join(columns) + " | AVG |", "|---|" + "---|" * (len(columns) + 1)]
    for label, row in scores.items():
        rel = [row[c] / base[c] - 1 for c in columns if base[c]]
        avg = "-" if label == "SFT (theta_0)" or not rel else f"{100 * sum(rel) / len(rel):.2f}%"
        lines.append(f"| {label} | " + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def parse_tasks(spec):
    """"table1", or "COLUMN=TASK:FEWSHOT:KEY;..." (KEY as lm-eval reports it, e.g. exact_match,none)."""
    if spec == "table1":
        return TABLE1
    out = []
    for item in spec.split(";"):
        try:
            column, rest = item.split("=", 1)
            task, shots, key = rest.split(":", 2)
            out.append((column, task, int(shots), key))
        except ValueError:
            raise UserError(f"--tasks {spec!r}: expected table1 or COLUMN=TASK:FEWSHOT:KEY;...") from None
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise UserError("usage: python harness.py RUN_FOLDER [--tasks table1] [--include_path DIR] [--limit N] "
                        "[--batch_size B]")
    run, opts = argv[0], dict(zip(argv[1::2], argv[2::2]))
    unknown = set(opts) - {"--tasks", "--include_path", "--limit", "--batch_size"}
    if unknown or len(argv) % 2 == 0:
        raise UserError(f"unknown or incomplete options {sorted(unknown) or argv[-1:]}: --tasks, --include_path, "
                        "--limit, --batch_size")
    if not os.path.isfile(os.path.join(run, "config.json")):
        raise UserError(f"{run}: not a run folder of ldalign.py (no config.json)")
    tasks = parse_tasks(opts.get("--tasks", "table1"))
    limit = int(opts["--limit"]) if "--limit" in opts else None
    scores, answers = {}, {}
    for label, path in models_of(run):
        print(f"[harness] {label}: {path}", flush=True)
        res = score(path, tasks, opts.get("--include_path"), limit, int(opts.get("--batch_size", 16)))
        scores[label] = {c: v for c, (v, _) in res.items()}
        answers[label] = {c: a for c, (_, a) in res.items() if a is not None}
    md = table(scores, [c for c, _, _, _ in tasks])
    settings = ", ".join(f"{c}: {t} {k} {s}-shot" for c, t, s, k in tasks)
    write_atomic(os.path.join(run, "table1.md"), f"lm-evaluation-harness, chat template, greedy ({settings}"
                 f"{f'; first {limit} examples' if limit else ''})\n\n{md}")
    write_atomic(os.path.join(run, "table1.json"), json.dumps(
        {"tasks": tasks, "limit": limit, "scores": scores, "answers": answers}, indent=1))
    print(md)


if __name__ == "__main__":
    report_errors(main)
