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

Nothing here trains anything: the distances come from guide.latent_distances, the samples from generate.py.
matplotlib is optional: without it save_histogram_png does nothing and says so (returns False).
"""
import contextlib
import os
import tempfile

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


# ==================================================================== Section 5.1.3: r = RM(x, y)
def load_reward_model(path, *, device, trust_remote_code=False, dtype=None):
    """Any HF sequence-classification checkpoint -> (model in eval mode on `device`, tokenizer).
    No code from the checkpoint is run unless trust_remote_code=True is asked for explicitly."""
    kw = dict(trust_remote_code=trust_remote_code)
    if os.path.isdir(path):  # a local folder: never fall back to the hub (this code must run offline)
        kw["local_files_only"] = True
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if dtype is not None:  # default: the checkpoint's own dtype (the OpenAssistant RM is fp32, ~435M params)
        kw["dtype"] = dtype
    model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
    return model.to(device).eval(), tok


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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Temp file in the same folder, then os.replace: a reader never sees a half-written PNG.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".hist-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True
