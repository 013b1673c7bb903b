"""Reward scoring (Section 5.1.3) and the latent-space analyses (Section 5.2) of LD-Align (arXiv 2404.06390).

Section 5.1.3  r = RM(x, y): a sequence-classification reward model scores a response y to an instruction x.
               The paper's RM is OpenAssistant/reward-model-deberta-v3-large-v2; any HF
               AutoModelForSequenceClassification checkpoint with one output works here (a local folder or hub id).
Section 5.2    Two checks that the guide's latent space means something:
  (1) the distribution of the latent distances s = ||phi(x, y) - phi(x, y')||_2 (per iteration: it should
      shrink as the policy's y' move towards the golden y);                    -> distance_histogram, save_histogram_png
  (2) for a prompt x sample y'_a, y'_b; the one farther from y in the latent space is ranked lower; a judge
      (GPT-4 in the paper) ranks them too; count how often the two rankings agree. -> ranking_agreement
      On the toy sorting task the judge is exact correctness / word edit distance to y.  -> toy_judge

And the pieces of what a run writes for a person to read (stages.py writes the files): evaluate (eval.json),
agreement (agreement.json), the tables of results.md and comparison.md, distances.png; train_curves.png and the
TensorBoard scalars (--tensorboard) for watching a run.

Nothing here trains anything: the distances come from guide.py, the samples from generate.py.
matplotlib is optional: without it save_histogram_png and save_curves_png do nothing and say so (return False);
tensorboard too (Board, only with --tensorboard).
"""
import contextlib
import json
import os

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import dataset
import fsdp
import generate
import guide as guide_lib
from run.rundir import atomic_path, read_jsonl, write_atomic


# ==================================================================== Section 5.1.3: r = RM(x, y)
def load_reward_model(path, *, device, trust_remote_code=False, dtype=None, revision=None):
    """Any HF sequence-classification checkpoint -> (model in eval mode on `device`, tokenizer), of a hub id
    at `revision` (--reward_model_revision; None: the default branch).
    Under torchrun it is read by rank 0 alone and sharded over the ranks with FSDP2 in fp32 (one host copy;
    fsdp.from_rank0), and every rank scores its share (score_rewards).
    No code from the checkpoint is run unless trust_remote_code is asked for explicitly."""
    from transformers import AutoConfig
    kw = dict(trust_remote_code=trust_remote_code, revision=revision)
    if os.path.isdir(path):  # a local folder: never fall back to the hub (this code must run offline)
        kw["local_files_only"] = True
    tok = AutoTokenizer.from_pretrained(path, **kw)

    def read():
        # default: the checkpoint's own dtype (the OpenAssistant RM is fp32, ~435M params)
        return AutoModelForSequenceClassification.from_pretrained(path, **kw, **({"dtype": dtype} if dtype else {}))

    def build():
        config = AutoConfig.from_pretrained(path, **kw)
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)

    def wrap(model):
        return fsdp.parallelize(model, torch.device(device), bf16=False) if fsdp.world() > 1 else model.to(device)
    model, _ = fsdp.from_rank0(read, build, wrap, torch.device(device))
    return model.eval(), tok


@contextlib.contextmanager
def _pad_id_for(model, tokenizer):
    """Yield the pad id to use, with model.config.pad_token_id set to it for the duration (restored after).

    Why the config matters: GPT-2-style classifiers (GPT2ForSequenceClassification, Llama..., Mistral...) score
    the LAST real token, found as the rightmost token != config.pad_token_id; with no pad id they refuse
    batches > 1. Encoder RMs (DeBERTa, the paper's) pool position 0 ([CLS]) and only need the attention mask.
    A tokenizer without a pad token (GPT-2, Llama) borrows eos, else unk; the tokenizer itself is not touched."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.unk_token_id
    if pad_id is None:
        raise ValueError("the reward tokenizer has no pad, eos or unk token to pad with")
    old = getattr(model.config, "pad_token_id", None)
    model.config.pad_token_id = pad_id
    try:
        yield pad_id
    finally:
        model.config.pad_token_id = old  # leave the caller's model as it was


@torch.no_grad()
def reward_scores(model, tokenizer, prompts, responses, *, batch_size=16, device, max_length=512):
    """r_i = RM(x_i, y_i) for each pair -> (N,) float32 on the CPU.

    (x, y) is encoded as a text PAIR, tokenizer(x, y), the way the OpenAssistant DeBERTa RMs were trained and
    are used ([CLS] x [SEP] y [SEP]); the reward is logits[:, 0] (those RMs have num_labels = 1).
    Padding is done here, on the right, so a pair's score does not depend on its batch-mates (tested)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if len(prompts) == 0:
        return torch.zeros(0, dtype=torch.float32)
    # A learned-position model cannot see past its table (GPT-2: n_positions); DeBERTa-v3's is 512.
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", None) or max_length)
    # Tokenize all pairs unpadded. truncation=True is "longest_first": tokens come off the longer of x and y,
    # so a long prompt cannot push the whole response out (the special tokens are counted in max_length).
    enc = tokenizer(list(prompts), list(responses), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]  # what this tokenizer makes
    # Batch pairs of similar length together (sorted by length): less padding, same scores.
    order = sorted(range(len(prompts)), key=lambda i: len(enc["input_ids"][i]))
    out = torch.empty(len(prompts), dtype=torch.float32)
    with _pad_id_for(model, tokenizer) as pad_id:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            T = max(len(enc["input_ids"][i]) for i in idx)
            fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
            # Right padding: positions 0..len-1 are the real tokens, as in an unpadded forward.
            batch = {k: torch.tensor([enc[k][i] + [fill[k]] * (T - len(enc[k][i])) for i in idx],
                                     dtype=torch.long, device=device) for k in keys}  # each (B, T)
            logits = model(**batch).logits  # (B, num_labels)
            out[idx] = logits[:, 0].float().cpu()  # (B,) back to the callers' order
    return out


# ==================================================================== Section 5.2 (2): the toy judge
def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance over whitespace-separated words (substitution, insertion, deletion cost 1)."""
    x, y = a.split(), b.split()
    prev = list(range(len(y) + 1))  # row i-1 of the DP table: distance from x[:i-1] to y[:j]
    for i in range(1, len(x) + 1):
        cur = [i] + [0] * len(y)  # x[:i] -> empty: i deletions
        for j in range(1, len(y) + 1):
            cur[j] = min(prev[j] + 1,  # delete x[i-1]
                         cur[j - 1] + 1,  # insert y[j-1]
                         prev[j - 1] + (x[i - 1] != y[j - 1]))  # substitute (free if equal)
        prev = cur
    return prev[-1]


def toy_judge(answer: str, golden: str) -> float:
    """Stands in for the paper's GPT-4 judge on the sorting toy, where the golden answer is checkable.
    Higher is better: 0.0 for an exact match (up to whitespace), else -(word edit distance to the golden y)."""
    return -float(word_edit_distance(answer, golden))  # the distance is 0 exactly when the word lists match


def _flat(v):
    """A list / numpy array / (any-device) tensor -> 1-D float64 numpy array."""
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu().numpy()
    return np.asarray(v, dtype=np.float64).reshape(-1)


def ranking_agreement(dist_a, dist_b, judge_a, judge_b, *, same=None, atol=1e-6) -> dict:
    """Section 5.2 (2): how often the latent-distance ranking and the judge's ranking of (y'_a, y'_b) agree.

    dist_*  (N,) latent distances s(x, y, y'_*) to the golden y: SMALLER = better (closer to y).
    judge_* (N,) judge scores: HIGHER = better.
    A pair is "decided" when both express a strict preference: |dist_a - dist_b| > atol and judge_a != judge_b
    same    (N,) bool, optional: the two samples are identical (same token ids), a tie for both whatever the
            scores say (scored in different batches, or under bf16, identical texts can differ in the last bits).
    Agreement = agree / decided; chance is 0.5."""
    da, db, ja, jb = (_flat(v) for v in (dist_a, dist_b, judge_a, judge_b))
    n = len(da)
    if not (len(db) == len(ja) == len(jb) == n):
        raise ValueError(f"lengths differ: {len(da)}, {len(db)}, {len(ja)}, {len(jb)}")
    if not all(np.all(np.isfinite(v)) for v in (da, db, ja, jb)):  # a NaN compares unequal: it would be "decided"
        raise ValueError("ranking_agreement needs finite distances and judge scores")
    same = np.zeros(n, dtype=bool) if same is None else np.asarray(same, dtype=bool)
    dist_tie = (np.abs(da - db) <= atol) | same  # (N,)
    judge_tie = (ja == jb) | same  # (N,)
    decided = ~dist_tie & ~judge_tie  # (N,)
    agree = decided & ((da < db) == (ja > jb))  # both prefer a, or both prefer b
    n_dec, n_agree = int(decided.sum()), int(agree.sum())
    return {"n": n, "n_decided": n_dec, "agree": n_agree, "disagree": n_dec - n_agree,
            "agreement": n_agree / n_dec if n_dec else None,
            "judge_ties": int(judge_tie.sum()), "distance_ties": int(dist_tie.sum())}


# ==================================================================== Section 5.2 (1): the distance distribution
def distance_histogram(s, bins=20, range_=None) -> dict:
    """Summary of the latent distances s_i of one iteration, as plain JSON-able numbers.
    With range_ given, values outside it are not in any bin (np.histogram drops them): see "outside"."""
    x = _flat(s)  # (N,)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("distance_histogram needs a non-empty set of finite distances")
    counts, edges = np.histogram(x, bins=bins, range=range_)  # (bins,), (bins + 1,)
    p10, p50, p90 = np.quantile(x, [0.1, 0.5, 0.9])
    return {"n": int(x.size), "edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "outside": int(x.size - counts.sum()),
            "mean": float(x.mean()), "std": float(x.std()),  # population std (ddof=0)
            "quantiles": {"p10": float(p10), "p50": float(p50), "p90": float(p90)}}


def save_histogram_png(hists, path, *, bins=30, title="latent distances s = ||phi(x,y) - phi(x,y')||") -> bool:
    """Overlaid histograms, one per label (e.g. "iter 1" -> its s values), written atomically to `path`.
    Returns False, and writes nothing, when matplotlib is not installed (it is optional)."""
    try:  # the object-oriented API with the Agg canvas: no pyplot, no GUI, no global backend switch
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    series = {label: _flat(v) for label, v in hists.items() if len(v)}
    if not series:
        raise ValueError("no distances to plot")
    # One set of bin edges for all labels, so the bars of different iterations line up and compare.
    edges = np.histogram_bin_edges(np.concatenate(list(series.values())), bins=bins)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    ax = fig.add_subplot(1, 1, 1)
    for label, v in series.items():
        ax.hist(v, bins=edges, alpha=0.45, histtype="stepfilled", label=f"{label} (mean {v.mean():.3f}, n={v.size})")
    ax.set_xlabel("s")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:  # a reader never sees a half-written PNG
        fig.savefig(tmp, format="png", dpi=120)
    return True


# ==================================================================== watching a run: curves and TensorBoard
CURVES = (("loss", ("loss",)), ("implicit rewards", ("reward_chosen", "reward_rejected", "reward_margin")),
          ("reward accuracy", ("reward_acc",)), ("learning rate", ("lr",)), ("gradient norm", ("grad_norm",)))


def save_curves_png(history, path, *, title="") -> bool:
    """One iteration's training curves, one panel per row of CURVES (the keys a step record has: sft's have no
    rewards), against the optimizer step, written atomically to `path` (train_curves.png beside
    train_metrics.jsonl). Returns False, and writes nothing, when matplotlib is not installed (it is optional)."""
    try:  # as save_histogram_png: the Agg canvas, no pyplot
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    panels = [(name, [k for k in keys if history and k in history[0]]) for name, keys in CURVES]
    panels = [(name, keys) for name, keys in panels if keys]
    steps = [h["step"] for h in history]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3 * rows))
    FigureCanvasAgg(fig)
    for i, (name, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for k in keys:
            ax.plot(steps, [h[k] for h in history], marker="." if len(steps) < 30 else None, label=k)
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        if len(keys) > 1:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    # fixed margins (inches / figure height): tight_layout would measure every label, a third of the drawing time
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.5 / (3 * rows), top=1 - 0.65 / (3 * rows), wspace=0.3,
                        hspace=0.6)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return True


class Board:
    """--tensorboard: a run's scalars, per method two TensorBoard runs, so that the methods overlay on one chart
    per tag: out/tensorboard/<method>/steps, train/<key> per optimizer step, counted across iterations (iteration
    t's step k is (t - 1) * steps + k), and out/tensorboard/<method>/iterations, iteration/<key> per iteration t
    (0 = theta_0), the rows of metrics.jsonl. Each writer starts with TensorBoard's purge mark: points that an
    earlier process wrote at or after its first step are dropped (a resumed iteration's steps, a rerun's rows), so
    the charts show each step once. Rank 0 writes (Stages makes it)."""

    def __init__(self, folder):
        from torch.utils.tensorboard import SummaryWriter
        self.folder, self.steps, self.SummaryWriter = folder, {}, SummaryWriter

    def step(self, method, values, step):
        """One optimizer step's values {key: number or None} (None: not measured, left out)."""
        if method not in self.steps:
            self.steps[method] = self.SummaryWriter(os.path.join(self.folder, method, "steps"), purge_step=step)
        for k, v in values.items():
            if v is not None:
                self.steps[method].add_scalar(f"train/{k}", v, step)
        # on disk now: a step of a 7B run takes seconds, and a run killed the next moment keeps it
        self.steps[method].flush()

    def iterations(self, method, rows):
        """Every row of <method>/metrics.jsonl, in a new file that drops what earlier ones wrote."""
        with self.SummaryWriter(os.path.join(self.folder, method, "iterations"), purge_step=0) as w:
            for r in rows:
                for k in ("S", "exact_match", "reward", "loss"):
                    if r[k] is not None:
                        w.add_scalar(f"iteration/{k}", r[k], r["iter"])


# ==================================================================== what a run records (Section 5.1.3, 5.2)
def score_rewards(reward_model, prompts, responses, device):
    """r = RM(x, y) with reward_model = (model, tokenizer). In one process the model is kept on the CPU between
    uses, so it takes no GPU memory during training, and scores everything. Under torchrun it is sharded over
    the ranks (load_reward_model): every rank scores its share, its weights gathered once for all of it."""
    model, rtok = reward_model
    if fsdp.is_fsdp(model):
        def share_scores(pairs):
            return reward_scores(model, rtok, [x for x, _ in pairs], [y for _, y in pairs], device=device)
        with fsdp.gathered_weights(model):
            return fsdp.shard_gather(list(zip(prompts, responses)), share_scores)
    model.to(device)
    r = reward_scores(model, rtok, prompts, responses, device=device)
    model.to("cpu")
    return r


def evaluate(model, data, cfg, device, reward_model, log):
    """Greedy answers on the held-out prompts: exact match (meaningful on checkable tasks such as the toy) and,
    with --reward_model, the mean reward r = RM(x, y) of Section 5.1.3. The dict written as eval.json."""
    held_out, tok = data.held_out, data.tok
    ids = generate.sample_dataset(model, [d["prompt_ids"] for d in held_out], tok, cfg, 0, device, greedy=True, log=log,
                                  what="greedy eval answers")
    answers = [tok.decode(y, skip_special_tokens=True).strip() for y in ids]
    hits = [a == d["y"].strip() for a, d in zip(answers, held_out)]
    rewards = None
    if reward_model:
        rewards = score_rewards(reward_model, [d["x"] for d in held_out], answers, device).tolist()
    return {"exact_match": sum(hits) / len(hits), "reward": None if rewards is None else sum(rewards) / len(rewards),
            "n": len(hits), "examples": [
                {"x": d["x"], "golden": d["y"], "answer": a, "correct": h,
                 "reward": None if rewards is None else rewards[i]}
                for i, (d, a, h) in enumerate(list(zip(held_out, answers, hits))[:20])]}


def agreement(policy, guide, data, cfg, device, reward_model, log):
    """Section 5.2 (2): for each prompt sample two responses y'_a, y'_b; the one farther from y in the latent
    space is ranked lower; a judge ranks them too; how often do the two rankings agree? The paper's judge is
    GPT-4; here "toy" = closeness to the golden answer (toy_judge), or "reward" = the reward model."""
    sub, tok = data.D[:cfg["agreement_n"]], data.tok
    ya, yb = (generate.sample_dataset(policy, [d["prompt_ids"] for d in sub], tok, cfg, cfg["seed"] + k, device,
                                      log=log, what=f"y'_{ab}") for k, ab in ((7, "a"), (8, "b")))
    sa, sb = (guide_lib.distances(guide, dataset.guide_triples(sub, tok, data.gtok, y, cfg["guide_max_len"]),
                                  cfg["guide_batch_size"], data.gtok.eos_token_id, device) for y in (ya, yb))
    ta = [tok.decode(y, skip_special_tokens=True).strip() for y in ya]
    tb = [tok.decode(y, skip_special_tokens=True).strip() for y in yb]
    if cfg["judge"] == "toy":
        ja, jb = [toy_judge(a, d["y"]) for a, d in zip(ta, sub)], [toy_judge(b, d["y"]) for b, d in zip(tb, sub)]
    else:
        ja, jb = (score_rewards(reward_model, [d["x"] for d in sub], t, device).tolist() for t in (ta, tb))
    same = [a == b for a, b in zip(ya, yb)]  # identical samples: a tie, whatever rounding does to their scores
    res = dict(ranking_agreement(sa.tolist(), sb.tolist(), ja, jb, same=same), judge=cfg["judge"])
    return dict(res, examples=[{"x": d["x"], "y": d["y"], "a": a, "b": b, "s_a": float(x), "s_b": float(y),
                                "judge_a": p, "judge_b": q}
                               for d, a, b, x, y, p, q in list(zip(sub, ta, tb, sa, sb, ja, jb))[:20]])


def cell(v, f):
    """A number in format f, or "-" for a value not measured."""
    return "-" if v is None else format(v, f)


def format_table(rows):
    lines = ["| iteration | held-out exact match | mean reward | S (mean distance) | loss |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['iter']} | {cell(r['exact_match'], '.3f')} | {cell(r.get('reward'), '.3f')} | "
                     f"{cell(r['S'], '.4f')} | {cell(r['loss'], '.4f')} |")
    return "\n".join(lines) + "\n"


def format_comparison(summaries):
    """One row per iteration, per method: held-out exact match, mean reward, and S (mean latent distance)."""
    methods = list(summaries)
    lines = ["| iteration | " + " | ".join(f"{m}: exact match / reward / S" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for t in sorted({r["iter"] for rows in summaries.values() for r in rows}):
        cells = []
        for m in methods:
            r = next((r for r in summaries[m] if r["iter"] == t), None)
            cells.append("-" if r is None else f"{cell(r['exact_match'], '.3f')} / {cell(r.get('reward'), '.3f')} / "
                                               f"{cell(r['S'], '.4f')}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ==================================================================== several seeds: means with 95% intervals
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086]  # Student's t, 97.5% quantile, 1..20 degrees of freedom (then ~1.96)


def mean_interval(xs):
    """(mean, half-width of the 95% interval of the mean) over seeds: Student's t with n - 1 degrees of freedom."""
    x = np.asarray(xs, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()), None
    t = T_975[x.size - 2] if x.size - 2 < len(T_975) else 1.96
    return float(x.mean()), float(t * x.std(ddof=1) / np.sqrt(x.size))


def seeds_report(folder):
    """`bash train.sh seeds`: folder/seed*/<method>/metrics.jsonl -> folder/seeds.md and seeds.json: per method and
    iteration the mean held-out exact match over seeds with its 95% interval; then the differences paired by seed
    (same theta_0, samples and guide within a seed, so the pairing removes their share of the noise): each method's
    change from theta_0, and ldalign - spin."""
    from stages import METHODS  # (stages imports this file)
    runs = sorted(d for d in os.listdir(folder) if d.startswith("seed") and os.path.isdir(os.path.join(folder, d)))
    em = {}  # (method, iteration) -> {seed folder: exact match}
    for r in runs:
        for m in METHODS:
            path = os.path.join(folder, r, m, "metrics.jsonl")
            for row in read_jsonl(path) if os.path.exists(path) else []:
                em.setdefault((m, row["iter"]), {})[r] = row["exact_match"]
    methods = [m for m in METHODS if any(k[0] == m for k in em)]
    iters = sorted({t for _, t in em})

    def paired(a, b):  # the seed-by-seed differences a - b, over the seeds that have both
        return [a[r] - b[r] for r in runs if r in a and r in b]
    stats, diffs = {}, {}  # "ldalign iter 2" -> (mean, half-width); "ldalign - theta_0 iter 2" -> the same
    for t in iters:
        for m in methods:
            if (m, t) in em:
                stats[f"{m} iter {t}"] = mean_interval(list(em[m, t].values()))
                d = paired(em[m, t], em.get((m, 0), {}))
                diffs[f"{m} - theta_0 iter {t}"] = mean_interval(d) if d else None
        d = paired(em.get(("ldalign", t), {}), em.get(("spin", t), {}))
        diffs[f"ldalign - spin iter {t}"] = mean_interval(d) if d else None

    def ci_cell(v):
        return "-" if v is None else f"{v[0]:.3f} +- {v[1]:.3f}" if v[1] is not None else f"{v[0]:.3f}"

    lines = [f"Held-out greedy exact match over {len(runs)} seeds: mean +- half-width of the 95% interval.", "",
             "| iteration | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    lines += [f"| {t} | " + " | ".join(ci_cell(stats.get(f"{m} iter {t}")) for m in methods) + " |" for t in iters]
    lines += ["", "The same, as differences paired by seed (each seed's own theta_0, samples and guide):", "",
              "| iteration | " + " | ".join(f"{m} - theta_0" for m in methods) + " | ldalign - spin |",
              "|---|" + "---|" * (len(methods) + 1)]
    lines += [f"| {t} | " + " | ".join(ci_cell(diffs.get(f"{m} - theta_0 iter {t}")) for m in methods) +
              f" | {ci_cell(diffs[f'ldalign - spin iter {t}'])} |" for t in iters if t > 0]
    write_atomic(os.path.join(folder, "seeds.md"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(folder, "seeds.json"), json.dumps(
        {"seeds": runs, "mean_and_halfwidth": stats, "paired_mean_and_halfwidth": diffs}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] != ["seeds"] or len(sys.argv) != 3:
        raise SystemExit("usage: python analysis.py seeds RUN_FOLDER   (the folder of `bash train.sh seeds`)")
    seeds_report(sys.argv[2])
