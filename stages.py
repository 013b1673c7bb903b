"""The stages of Algorithm 1 that ldalign.main() calls, one per pseudocode line, and where each is stored.

    stages = Stages(run, data, cfg, device)
    stages.theta_0()                     Require: theta_0 (the toy: a tiny Llama SFT-ed on D, out/sft)
    y0 = stages.sample(0)                lines 1-3: y' ~ p_theta_0, iter0/samples.jsonl
    guide = stages.guide(y0)             line 4: T = (phi, psi), guide/
    t_first = stages.resume(method)      the first iteration whose theta_t is not saved yet
    y_prime = stages.sample(t - 1, M)    lines 6-7: y' ~ p_theta_{t-1}, M/iter{t}/samples.jsonl
    s = stages.distances(guide, ...)     line 8: s_i, M/iter{t}/distances.jsonl
    stages.update(M, t, y_prime, w)      line 10: theta_t, M/iter{t}/policy/ (UPDATES: one function per method)
    stages.evaluate(M, t)                theta_t on held-out prompts, M/iter{t}/eval.json, M/metrics.jsonl

Each stage owns its file name, how the file is written and read, and the inputs it is recorded as computed
from (rundir.RunDir.cached: a stored result is read back; one whose inputs changed is computed again).

The policy in memory. Stages hold one policy at a time: the theta_t the last stage worked on. A stage that needs
theta_t takes the held model when it is theta_t, else loads it from its checkpoint, dropping the held one first
(two 7B models need not fit). The update trains the held theta_{t-1} in place into theta_t. A stage whose
result is stored never loads a policy: a rerun of a finished run loads none.
"""
import os

import torch

import analysis
import checkpoint
import dataset
import dpo
import fsdp
import generate
import guide as guide_lib
import lora
from cli import UserError
from rundir import METHODS, UPDATE_KEYS, read_json, read_jsonl, save_hf, verify, write_atomic, write_json, write_jsonl

# theta_0's log-probs of the annotated pairs: the DPO baseline's reference in every iteration
DPO_REFERENCE = "dpo/ref_logps_theta0.json"
# The settings a stage's <name>.partial/ (rundir.RunDir.partial) is made with, besides its inputs' digests: a
# rerun with other values starts the stage over. Sampling: the prompts and each batch's tokens; the update: the
# pairs, the data order (--seed) and every step.
SAMPLING_KEYS = ("data", "max_examples", "overlength", "max_prompt_len", "seed", "temperature", "top_p", "top_k",
                 "max_new_tokens", "gen_batch_size", "gen_static")
UPDATE_STATE_KEYS = UPDATE_KEYS + ("data", "max_examples", "overlength", "max_len", "max_prompt_len", "seed",
                                   "pref_data", "spin_keep_previous", "sft_data", "lora_base_dtype")


class Stages:
    def __init__(self, run, data, cfg, device):
        self.run, self.data, self.cfg, self.device = run, data, cfg, device
        self.log = run.log
        # Loaded now, before any compute: a wrong --reward_model fails at once.
        self.reward_model = None
        if cfg["reward_model"]:
            self.reward_model = analysis.load_reward_model(cfg["reward_model"], device=torch.device("cpu"),
                                                           trust_remote_code=cfg["trust_remote_code"],
                                                           revision=cfg.get("reward_model_revision") or None)
        if cfg.get("lora_r"):
            # --lora_targets checked against theta_0's architecture now, not at the first update
            from transformers import AutoConfig
            config = dataset.tiny_policy_config(data.tok, cfg["max_len"]) if cfg["policy"] == "tiny" else \
                AutoConfig.from_pretrained(cfg["policy"], trust_remote_code=cfg["trust_remote_code"],
                                                  revision=cfg["policy_revision"] or None)
            lora.check(config, cfg["lora_targets"], cfg["trust_remote_code"])
        # The one policy in memory and the checkpoint folder it equals (None: none held).
        self.held, self.held_path = None, None
        # --tensorboard: the scalars of every step and iteration (rank 0), out/tensorboard/<method>/...
        self.board = analysis.Board(run.path("tensorboard")) if cfg["tensorboard"] and fsdp.rank() == 0 else None
        self.curves_hint = True  # the "pip install matplotlib" hint, logged once
        # The running update's M/iter{t}/policy.partial/ folder (update_state)
        self.partial = None

    # ----------------------------------------------------------------------------------------------
    # The policy in memory
    # ----------------------------------------------------------------------------------------------
    def policy(self, t, method=None):
        """theta_t of `method` (theta_0: method None, shared by every method), held or loaded."""
        path = self.run.policy_path(method or "", t)
        if self.held_path != path:
            # Free the held policy before loading the next one.
            self.held, self.held_path = None, None
            self.held, self.held_path = load_policy(path, self.cfg, self.device), path
        return self.held

    # ----------------------------------------------------------------------------------------------
    # Require: theta_0
    # ----------------------------------------------------------------------------------------------
    def theta_0(self):
        """The embedded default makes its theta_0: a tiny Llama SFT-ed on D, stored in out/sft. Otherwise
        theta_0 is the --policy checkpoint as given, read when a stage first needs it."""
        if self.cfg["policy"] == "tiny":
            # Stored as an HF checkpoint and read back from it (exact fp32) like any theta_t.
            self.run.cached("sft", lambda: toy_theta0(self.data, self.cfg, self.device, self.log),
                            save=lambda model, path: save_hf(model, self.data.tok, path), load=lambda path: None)

    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, lines 1-3 and 6-7: y'_i ~ p_theta_t(.|x_i) for every x_i of D
    # ----------------------------------------------------------------------------------------------
    def samples_name(self, t, method=None):
        """The file of theta_t's samples: iteration t + 1 trains on them. theta_0's are iter0/samples.jsonl, which
        iteration 1 of every method reuses unless --reuse_line2_samples false."""
        if t == 0 and (method is None or self.cfg["reuse_line2_samples"]):
            return "iter0/samples.jsonl"
        return f"{method}/iter{t + 1}/samples.jsonl"

    def sample(self, t, method=None):
        """Lines 1-3 (t = 0) and 6-7: y'_i ~ p_theta_t(.|x_i), as token ids, one list per x_i of D.
        Seeded by --seed + t + 1 (theta_0's shared samples: --seed)."""
        name, cfg = self.samples_name(t, method), self.cfg
        seed = cfg["seed"] if name == "iter0/samples.jsonl" else cfg["seed"] + t + 1
        prompts = [d["prompt_ids"] for d in self.data.D]
        inputs = [self.run.policy_path(method or "", t)]

        def compute():
            # each batch written as it finishes (<name>.partial/): a rerun samples only the others
            parts = self.run.partial(name, inputs, SAMPLING_KEYS)
            return generate.sample_dataset(self.policy(t, method), prompts, self.data.tok, cfg, seed, self.device,
                                           log=self.log, what=f"y' ~ p_theta_{t}", parts=parts,
                                           after_batch=lambda n: self.run.kill_point(f"{name}/batch{n}"))
        return self.run.cached(name, compute, save=self._write_samples, load=self._read_samples, inputs=inputs)

    def _write_samples(self, ids, path):
        """samples.jsonl: one row per pair, {where, x, y, y_prime (text), y_prime_ids}; rank 0 writes."""
        if fsdp.rank() == 0:
            tok = self.data.tok
            write_jsonl(path, [{"where": d["where"], "x": d["x"], "y": d["y"],
                                "y_prime": tok.decode(y, skip_special_tokens=True), "y_prime_ids": y}
                               for d, y in zip(self.data.D, ids)])

    def _read_samples(self, path):
        return read_samples(path, self.data.D, self.cfg["data"])

    def stored_samples(self, t, method):
        """theta_t's samples as an earlier iteration stored them (read, never sampled: no policy is loaded).
        They are an input of that iteration's theta, so a run that reached this iteration has them."""
        return self._read_samples(self.run.path(self.samples_name(t, method)))

    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, line 4: the guide T = (phi, psi), Eq. 2 over golden and generated responses
    # ----------------------------------------------------------------------------------------------
    def guide(self, y0):
        """Trained once on (x, y) and (x, y') of theta_0's samples y0, then frozen for all T iterations."""
        data, cfg, device = self.data, self.cfg, self.device

        def compute():
            return guide_lib.fit(data.guide_src, self.triples(y0), cfg, data.gtok.eos_token_id, device, self.log)

        def save(guide, path):
            guide_lib.save_gathered(guide, path, data.guide_src, cfg.get("guide_revision") or None)

        def load(path):
            return guide_lib.place(guide_lib.load_guide(path), device)
        guide = self.run.cached("guide", compute, save=save, load=load,
                                inputs=[self.run.path(self.samples_name(0))])
        guide_lib.freeze(guide)
        return guide

    def triples(self, y_prime):
        """(x_i, y_i, y'_i) in the guide's tokens."""
        data = self.data
        return dataset.guide_triples(data.D, data.tok, data.gtok, y_prime, self.cfg["guide_max_len"])

    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, line 8: s_i = ||phi(x_i, y_i) - phi(x_i, y'_i)||_2
    # ----------------------------------------------------------------------------------------------
    def distances(self, guide, y_prime, method, t):
        """s of iteration t, an (N,) tensor; stored as distances.jsonl, one row {where, s} per pair."""
        def compute():
            return guide_lib.distances(guide, self.triples(y_prime), self.cfg["guide_batch_size"],
                                       self.data.gtok.eos_token_id, self.device)

        def save(s, path):
            if fsdp.rank() == 0:
                write_jsonl(path, [{"where": d["where"], "s": float(v)} for d, v in zip(self.data.D, s)])
        samples = self.run.path(self.samples_name(t - 1, method))
        return self.run.cached(f"{method}/iter{t}/distances.jsonl", compute, save=save, load=read_distances,
                               inputs=[samples, self.run.path("guide")])

    def record_distances(self, method, t, s, w, y_prime):
        """distances.json: S (line 9), the weights' range, the distribution of s (Section 5.2 (1))."""
        S = float(s.mean())
        self.log(f"[lines 8-9] distances: S = mean s = {S:.4f}, min {float(s.min()):.4f}, "
                 f"max {float(s.max()):.4f}")
        if fsdp.rank() == 0:
            identical = sum(d["response_ids"] == yp for d, yp in zip(self.data.D, y_prime))
            write_json(self.run.path(method, f"iter{t}", "distances.json"), {
                "S": S, "n": len(s), "n_identical_to_golden": identical,
                "min": float(s.min()), "max": float(s.max()),
                "weights": {"mean": float(w.mean()), "min": float(w.min()), "max": float(w.max())},
                "histogram": analysis.distance_histogram(s.tolist())})

    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, line 10: theta_t from theta_{t-1}
    # ----------------------------------------------------------------------------------------------
    def update(self, method, t, y_prime, w):
        """theta_t = UPDATES[method](theta_{t-1}), trained in place, saved as an HF checkpoint with its step log."""
        policy = self.policy(t - 1, method)
        # From here on the held model is no longer theta_{t-1}.
        self.held_path = None
        self.partial = None  # (update_state)
        if self.cfg.get("lora_r"):
            # --lora_r: fresh adapters (B = 0: still theta_{t-1}), trained alone; merged when theta_t is saved
            lora.begin(policy, self.cfg["lora_alpha"] or self.cfg["lora_r"], seed=self.cfg["seed"] + 1000 * t)
        history = UPDATES[method](self, method, t, policy, y_prime, w)
        # the curves before theta_t: every saved theta_t has its train_curves.png (with matplotlib)
        curves = self.run.path(method, f"iter{t}", "train_curves.png")
        title = f"{method}, iteration {t}: theta_{t - 1} -> theta_{t}"
        if fsdp.rank() == 0 and not analysis.save_curves_png(history, curves, title=title) and self.curves_hint:
            self.log("(pip install matplotlib for train_curves.png; the numbers are in train_metrics.jsonl)")
            self.curves_hint = False
        self.run.save_policy(policy, self.data.tok, method, t, history, self.update_inputs(method, t))
        self.held_path = self.run.policy_path(method, t)

    def update_inputs(self, method, t):
        """What theta_t is trained from: theta_{t-1} and the files of its pairs (their own records name the
        guide, the samples' policy, ...). A theta_t whose inputs changed is trained again (resume)."""
        inputs = [self.run.policy_path(method, t - 1)]
        if keeps_previous(self.cfg, method, t):
            # iteration t-1's pairs too (weighted_dpo)
            inputs.append(self.run.path(self.samples_name(t - 2, method)))
        if method in ("ldalign", "spin"):
            inputs += [self.run.path(self.samples_name(t - 1, method)),
                       self.run.path(method, f"iter{t}", "distances.jsonl")]
        if method == "dpo":
            inputs.append(self.run.path(DPO_REFERENCE))
        return inputs

    def update_state(self, method, t):
        """M/iter{t}/policy.partial/, what a killed update goes on from: its reference log-probs and its latest
        step checkpoint (rundir.RunDir.partial). Made when first asked for, once every input of theta_t exists
        (the DPO baseline's reference is computed in its iteration 1)."""
        if self.partial is None:
            self.partial = self.run.partial(f"{method}/iter{t}/policy", self.update_inputs(method, t),
                                            UPDATE_STATE_KEYS)
        return self.partial

    def train_settings(self, method, t):
        """The keyword arguments of dpo.dpo_train / dpo.sft_train shared by every method."""
        cfg = self.cfg

        def log_step(r):
            # called after every step: TensorBoard gets each one, the log every --log_every-th and the last
            if self.board:
                keys = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_acc", "lr", "grad_norm")
                self.board.step(method, {k: r.get(k) for k in keys}, (t - 1) * r["steps"] + r["step"])
            if (r["step"] - 1) % cfg["log_every"] and r["step"] != r["steps"]:
                return
            extra = f"reward acc {r['reward_acc']:.2f} margin {r['reward_margin']:.3f} " if "reward_acc" in r else ""
            self.log(f"  step {r['step']}/{r['steps']} loss {r['loss']:.4f} {extra}lr {r['lr']:.2e} | "
                     f"{r['elapsed_s']:.0f}s, eta {r['eta_s']:.0f}s")

        def on_step(step, steps):
            # The tests' crash hooks: a kill half-way through the update, or after a given step.
            if step * 2 >= steps:
                self.run.kill_point(f"{method}/iter{t}/train")
            self.run.kill_point(f"{method}/iter{t}/step{step}")
        ckpt = checkpoint.StepCheckpoint(self.update_state(method, t), cfg["save_steps"], self.log,
                                         f"{method} iteration {t}")
        return dict(lr=setting_at(cfg, "lr", t), epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                    micro_batch_size=cfg["micro_batch_size"], device=self.device, optimizer=cfg["optimizer"],
                    warmup_ratio=cfg["warmup_ratio"], max_grad_norm=cfg["max_grad_norm"],
                    seed=cfg["seed"] + 1000 * t, log_every=1, log_fn=log_step, on_step=on_step,
                    checkpoint=ckpt)

    # ----------------------------------------------------------------------------------------------
    # Resume, evaluation and reports (Sections 5.1.3 and 5.2)
    # ----------------------------------------------------------------------------------------------
    def resume(self, method):
        """Where `method` goes on: the first t whose theta_t is not saved, or was trained from other inputs
        than those on disk now (then it and every later theta are trained again). A run killed between
        saving theta_{t-1} and evaluating it is evaluated now."""
        # row 0 of metrics.jsonl: theta_0
        self.evaluate(method, 0)
        T, t_first = self.cfg["T"], 1
        while t_first <= T and self.run.stored(f"{method}/iter{t_first}/policy", self.update_inputs(method, t_first)):
            t_first += 1
        if t_first > 1 and not self.recorded(method, t_first - 1):
            self.log(f"[resume] iteration {t_first - 1} of {method} saved its policy but not its evaluation: "
                     "evaluating it")
            self.evaluate(method, t_first - 1)
        if t_first <= T:
            self.log(f"##### method {method}: iterations {t_first}..{T}, "
                     f"from {self.run.policy_path(method, t_first - 1)}")
        return t_first

    def theta0_reports(self, guide):
        """theta_0's held-out evaluation (iter0/eval.json, row 0 of every method's table) and Section 5.2 (2)'s
        ranking agreement on theta_0's samples (guide/agreement.json)."""
        run, data, cfg, device, rm = self.run, self.data, self.cfg, self.device, self.reward_model
        theta_0 = [run.policy_path("", 0)]
        if data.held_out:
            ev = run.cached("iter0/eval.json", lambda: analysis.evaluate(self.policy(0), data, cfg, device, rm,
                                                                         self.log), inputs=theta_0)
            self.log(f"[iter 0] theta_0 held-out greedy exact match {ev['exact_match']} | "
                     f"mean reward {ev['reward']}")
        if cfg["agreement_n"] > 0:
            agr = run.cached("guide/agreement.json", lambda: analysis.agreement(self.policy(0), guide, data, cfg,
                                                                                device, rm, self.log),
                             inputs=theta_0)
            self.log(f"[Section 5.2] ranking agreement, latent distance vs {agr['judge']} judge: {agr['agree']}/"
                     f"{agr['n_decided']} = {agr['agreement']} (pairs where both rank strictly; "
                     "guide/agreement.json)")

    def evaluate(self, method, t):
        """theta_t's held-out evaluation (eval.json) and its row in <method>/metrics.jsonl: exact match, reward,
        S (from distances.json, when measured), loss (mean of the last quarter of train_metrics.jsonl), steps."""
        run, data = self.run, self.data
        # theta_0 is shared by every method
        it = os.path.join(method, f"iter{t}") if t else "iter0"
        ev = {"exact_match": None, "reward": None}
        if data.held_out:
            ev = run.cached(f"{it}/eval.json", lambda: analysis.evaluate(
                self.policy(t, method), data, self.cfg, self.device, self.reward_model, self.log),
                inputs=[run.policy_path(method, t)])
        dist = run.path(it, "distances.json")
        S = read_json(dist)["S"] if t and os.path.exists(dist) else None
        history = read_jsonl(run.path(it, "train_metrics.jsonl")) if t else []
        q = max(1, len(history) // 4)
        loss = sum(h["loss"] for h in history[-q:]) / q if history else None
        self.log(f"[{method} iter {t}] held-out greedy exact match {ev['exact_match']} | mean reward "
                 f"{ev['reward']} | S {analysis.cell(S, '.4f')} | loss (last quarter) {analysis.cell(loss, '.4f')}")
        path = run.path(method, "metrics.jsonl")
        if fsdp.rank() == 0:
            rows = [r for r in (read_jsonl(path) if os.path.exists(path) else []) if r["iter"] != t]
            row = {"iter": t, "S": S, "loss": loss, "steps": len(history), "exact_match": ev["exact_match"],
                   "reward": ev["reward"]}
            rows = sorted(rows + [row], key=lambda r: r["iter"])
            write_jsonl(path, rows)
            if self.board:  # (rank 0's only)
                self.board.iterations(method, rows)

    def recorded(self, method, t):
        """Has theta_t of `method` its row in metrics.jsonl? (A run killed after saving theta_t has not.)"""
        path = self.run.path(method, "metrics.jsonl")
        return os.path.exists(path) and any(r["iter"] == t for r in read_jsonl(path))

    def write_reports(self, methods):
        """results.md and distances.png per method; comparison.md over every method run in this folder so far
        (this call's or earlier calls', e.g. `--method dpo --lr 2e-7` alone). Rank 0 writes."""
        run, cfg = self.run, self.cfg
        if fsdp.rank() != 0:
            return
        for m in methods:
            table = analysis.format_table(read_jsonl(run.path(m, "metrics.jsonl")))
            write_atomic(run.path(m, "results.md"), table)
            self.log(f"{m}:\n{table}")
            by_iter = {f"iter {t}": [r["s"] for r in read_jsonl(p)] for t in range(1, cfg["T"] + 1)
                       if os.path.exists(p := run.path(m, f"iter{t}", "distances.jsonl"))}
            if by_iter and not analysis.save_histogram_png(by_iter, run.path(m, "distances.png")):
                self.log("(pip install matplotlib for distances.png; the numbers are in iter*/distances.json)")
        summaries = {m: read_jsonl(p) for m in METHODS if os.path.exists(p := run.path(m, "metrics.jsonl"))}
        if len(summaries) > 1:
            steps = ", ".join(f"{m} {rows[-1].get('steps', '?')}" for m, rows in summaries.items())
            head = (f"comparison ({cfg['T']} iterations x {cfg['epochs']} epochs, batch {cfg['batch_size']}; "
                    f"optimizer steps per iteration: {steps}; each method at the settings in settings.json)")
            table = analysis.format_comparison(summaries)
            write_atomic(run.path("comparison.md"), head + "\n\n" + table)
            self.log(f"{head}:\n{table}")


# --------------------------------------------------------------------------------------------------
# Algorithm 1, line 10, and the competitors of Section 5.1.4: method -> update of theta_{t-1} into theta_t.
# Each function trains `policy` (theta_{t-1}) in place and returns its step log. The reference
# log-probs are computed once, before the update (README errata 4).
# --------------------------------------------------------------------------------------------------
def weighted_dpo(stages, method, t, policy, y_prime, w):
    """ldalign (w = s/S) and spin (w = 1): Eq. 4 on (x, y, y'), reference theta_{t-1}.

    spin with --spin_keep_previous (SPIN's data recipe): from t = 2 on, iteration t-1's N pairs come first
    (y' of theta_{t-2}, as stored), then this iteration's N, all 2N of weight 1 and reference theta_{t-1}."""
    D = stages.data.D
    pairs = [(d["prompt_ids"], d["response_ids"], yp) for d, yp in zip(D, y_prime)]
    if keeps_previous(stages.cfg, method, t):
        previous = stages.stored_samples(t - 2, method)
        stages.log(f"[spin] SPIN's data recipe: the {len(previous)} pairs of iteration {t - 1}, then the "
                   f"{len(y_prime)} of iteration {t}")
        pairs = [(d["prompt_ids"], d["response_ids"], yp) for d, yp in zip(D, previous)] + pairs
        w = torch.cat([torch.ones(len(previous)), w])
    micro_batch_size = stages.cfg["micro_batch_size"]
    # The reference is theta_{t-1}, the policy right now: every pair is scored once, then the policy moves.
    # Kept beside the step checkpoints: a resumed update reads them back instead of scoring every pair again
    # (they must come from theta_{t-1}: the policy is theta_{t-1} until dpo's loop loads a step checkpoint).
    path = os.path.join(stages.update_state(method, t), "ref_logps.json")
    if os.path.exists(path):
        stages.log(f"[line 10] reference log-probs under theta_{{t-1}}: read back from {path}")
        ref = read_json(path)
    else:
        stages.log("[line 10] reference log-probs under theta_{t-1} (computed once, before the update)")
        chosen, rejected = dpo.reference_logps(policy, pairs, micro_batch_size, stages.device)
        ref = {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
        if fsdp.rank() == 0:
            write_json(path, ref)
        fsdp.barrier()
    ref_chosen, ref_rejected = torch.tensor(ref["chosen"]), torch.tensor(ref["rejected"])
    return _dpo(stages, method, t, policy, pairs, ref_chosen, ref_rejected, w)


def dpo_baseline(stages, method, t, policy, y_prime, w):
    """DPO on annotated pairs (--pref_data), weights 1, reference theta_0 fixed for every iteration.

    theta_0's log-probs are computed at t = 1, when the policy is theta_0, and stored
    (dpo/ref_logps_theta0.json): a later iteration's policy cannot stand in for it."""
    run, pairs, name = stages.run, stages.data.pref, DPO_REFERENCE
    if t > 1 and not os.path.exists(run.path(name)):
        raise UserError(f"{run.path(name)} is missing: DPO's reference is theta_0, and only iteration 1 can "
                        f"compute it; delete {run.path('dpo')} to rerun the DPO baseline from the start")

    def compute():
        chosen, rejected = dpo.reference_logps(policy, pairs, stages.cfg["micro_batch_size"], stages.device)
        return {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
    ref = run.cached(name, compute, inputs=[run.policy_path("", 0)])
    ref_chosen, ref_rejected = torch.tensor(ref["chosen"]), torch.tensor(ref["rejected"])
    return _dpo(stages, method, t, policy, pairs, ref_chosen, ref_rejected, torch.ones(len(pairs)))


def _dpo(stages, method, t, policy, pairs, ref_chosen, ref_rejected, w):
    cfg = stages.cfg
    stages.log(f"[line 10] {'weighted ' if method == 'ldalign' else ''}DPO ({method}): {cfg['epochs']} epoch(s) "
               f"over {len(pairs)} pairs")
    return dpo.dpo_train(policy, pairs, ref_chosen, ref_rejected, w, beta=setting_at(cfg, "beta", t),
                         **stages.train_settings(method, t))


def continual_sft(stages, method, t, policy, y_prime, w):
    """Continual SFT, log p(y|x): on the N pairs of D (--sft_data D: the same epochs and batch as the other
    methods), or on all the records of --sft_data (the paper: all of UltraChat 200k, Section 5.1.4)."""
    data, cfg = stages.data, stages.cfg
    if data.sft is None:
        pairs, what = [(d["prompt_ids"], d["response_ids"]) for d in data.D], "pairs of D"
    else:
        pairs, what = data.sft, f"records of {cfg['sft_data'] or cfg['data']}, all of them"
    stages.log(f"[sft] continual SFT: {cfg['epochs']} epoch(s) over the {len(pairs)} {what}")
    return dpo.sft_train(policy, pairs, **stages.train_settings(method, t))


UPDATES = {"ldalign": weighted_dpo, "spin": weighted_dpo, "dpo": dpo_baseline, "sft": continual_sft}


def keeps_previous(cfg, method, t):
    """Does iteration t of `method` also train on iteration t-1's pairs (spin, --spin_keep_previous)?"""
    return method == "spin" and cfg["spin_keep_previous"] and t > 1


# The per-iteration settings. SPIN's scripts set the lr and beta per iteration (train.sh paper-baselines cites
# them); a list per setting, rather than one option per method, because a method's settings are already its
# own: each call on a run folder runs its methods at its --lr, --beta (rundir.UPDATE_KEYS binds them per method).
def per_iteration(cfg, key):
    """The values of --{key}_per_iter for iterations 1, 2, ... ([] when not given); ValueError if one is not a
    number (parse_args checks them)."""
    text = cfg[f"{key}_per_iter"]
    return [float(v) for v in text.split(",")] if text else []


def setting_at(cfg, key, t):
    """--lr or --beta of iteration t: its --{key}_per_iter value when given, else the one value."""
    values = per_iteration(cfg, key)
    return values[t - 1] if values else cfg[key]


# --------------------------------------------------------------------------------------------------
# Policies and the per-pair files
# --------------------------------------------------------------------------------------------------
def load_policy(path, cfg, device):
    """theta_t from its checkpoint; the run's own checkpoints verified (manifest) and in exact fp32."""
    if path != cfg["policy"]:
        verify(path)
    return fsdp.load_policy(path, device, exact_fp32=path != cfg["policy"], grad_ckpt=cfg["grad_ckpt"],
                            compile=cfg["compile"], trust_remote_code=cfg["trust_remote_code"],
                            revision=cfg.get("policy_revision") or None if path == cfg["policy"] else None,
                            lora_r=cfg.get("lora_r", 0), lora_targets=cfg.get("lora_targets", ""),
                            lora_base_dtype=cfg.get("lora_base_dtype", "float32"))


def toy_theta0(data, cfg, device, log):
    """theta_0 of the embedded default: a tiny Llama (dataset.tiny_policy_config) SFT-ed on all the records of
    --data (the paper's theta_0, zephyr-7b-sft-full, is Mistral-7B SFT-ed on all of UltraChat 200k)."""
    from transformers import AutoModelForCausalLM
    log(f"[theta_0] SFT of a tiny Llama on all {len(data.sft_pairs)} records of {cfg['data']}: "
        f"{cfg['sft_steps']} steps")
    # Every rank builds the same initial weights (FSDP2 does not broadcast them).
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(dataset.tiny_policy_config(data.tok, cfg["max_len"])).to(device)
    if fsdp.world() > 1:
        model = fsdp.parallelize(model, device)
    epochs = -(-cfg["sft_steps"] * cfg["sft_batch_size"] // len(data.sft_pairs))
    dpo.sft_train(model, data.sft_pairs, lr=cfg["sft_lr"], epochs=epochs, batch_size=cfg["sft_batch_size"],
                  micro_batch_size=cfg["sft_batch_size"], device=device, optimizer="adamw", seed=cfg["seed"],
                  log_every=50, max_steps=cfg["sft_steps"],
                  log_fn=lambda r: log(f"  sft step {r['step']}/{r['steps']} nll/token {r['loss']:.3f}"))
    return model


def read_samples(path, D, data_name):
    """The y' ids of a samples.jsonl, after checking that its prompts are those of D."""
    rows = read_jsonl(path)
    if [r["x"] for r in rows] != [d["x"] for d in D]:
        raise SystemExit(f"{path} holds samples for other prompts than the {len(D)} of {data_name} (was the "
                         "file changed?); delete it, or use a new --out")
    return [r["y_prime_ids"] for r in rows]


def read_distances(path):
    """s of a distances.jsonl as an (N,) tensor."""
    return torch.tensor([r["s"] for r in read_jsonl(path)])
