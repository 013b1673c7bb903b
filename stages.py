"""The stages of Algorithm 1 that ldalign.main() calls, one per pseudocode line, and where each is stored.

    stages = Stages(run, data, cfg, device)
    stages.theta_0()                       Require: theta_0 (the toy: a tiny Llama SFT-ed on D, out/sft)
    y0 = stages.sample(None, 0)            lines 1-3: y' ~ p_theta_0, iter0/samples.jsonl
    guide = stages.guide(y0)               line 4: T = (phi, psi), guide/
    t_first = stages.resume(M)             the first iteration whose theta_t is not saved yet
    y_prime = stages.sample(M, t - 1)      lines 6-7: y' ~ p_theta_{t-1}, M/iter{t}/samples.jsonl
    s = stages.distances(M, t, guide, y_prime)   line 8: s_i, M/iter{t}/distances.jsonl
    w = stages.weights(M, t, s, y_prime)   line 9: s_i / S, M/iter{t}/distances.json
    stages.update(M, t, y_prime, w)        line 10: theta_t, M/iter{t}/policy/
                                           (ldalign, spin: its pairs for TRL, M/iter{t}/pairs.trl.jsonl)
    stages.evaluate(M, t)                  theta_t on held-out prompts, M/iter{t}/eval.json, M/metrics.jsonl

Every call takes the method M first, then the iteration t (for sampling: the index of the policy that samples),
then what earlier stages returned. What makes each method itself (Algorithm 1 and the competitors of Section
5.1.4: what it samples, how it weighs, what it trains on, its reference, the settings it binds) is its row of
METHODS below.

Each stage owns its file name, how the file is written and read, and the inputs it is recorded as computed
from (run/rundir.py's RunDir.cached: a stored result is read back; one whose inputs changed is computed again).
The long stages keep their finished pieces while they run (<name>.partial/), so that a killed or pre-empted run
goes on from there: sampling its finished batches, the update its reference log-probs and its step checkpoints
(run/checkpoint.py); SIGTERM stops either at its next batch or step, its work saved.

The policy in memory. Stages hold one policy at a time: the theta_t the last stage worked on. A stage that needs
theta_t takes the held model when it is theta_t, else loads it from its checkpoint, dropping the held one first
(two 7B models need not fit). The update trains the held theta_{t-1} in place into theta_t. A stage whose
result is stored never loads a policy: a rerun of a finished run loads none.
"""
import os
from dataclasses import dataclass

import torch

import analysis
import dataset
import dpo
import fsdp
import generate
import guide as guide_lib
from run import checkpoint, lora
from run.cli import UserError
from run.options import setting_at
from run.rundir import (
    UPDATE_KEYS,
    atomic_path,
    read_json,
    read_jsonl,
    save_hf,
    verify,
    write_atomic,
    write_json,
    write_jsonl,
)


# --------------------------------------------------------------------------------------------------
# The methods: Algorithm 1 and the competitors of Section 5.1.4, one row each
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    samples: bool      # lines 6-7 in every iteration: y' ~ p_theta_{t-1} (else only with --measure_S, for S)
    weights: str       # line 9: "s/S" (dpo.latent_weights) or "1"
    pairs: str         # line 10 trains on: "y > y'" (D's golden y wins over the sample y'), "pref" (the
    #                    annotated pairs of --pref_data) or "y" (continual SFT on D's y, or on --sft_data)
    reference: str     # line 10's p_ref: "theta_{t-1}" (scored once, before the update), "theta_0" (fixed
    #                    for every iteration, scored in iteration 1) or "" (SFT has none)
    binds: tuple = ()  # the settings this method alone reads (its own section of settings.json)


METHODS = {
    "ldalign": Method(samples=True, weights="s/S", pairs="y > y'", reference="theta_{t-1}"),
    # SPIN: the same loop with unit weights; --spin_keep_previous: from t = 2 on also iteration t-1's pairs
    "spin": Method(samples=True, weights="1", pairs="y > y'", reference="theta_{t-1}",
                   binds=("spin_keep_previous",)),
    "dpo": Method(samples=False, weights="1", pairs="pref", reference="theta_0"),
    "sft": Method(samples=False, weights="1", pairs="y", reference="", binds=("sft_data",)),
}


def keeps_previous(cfg, method, t):
    """Does iteration t of `method` also train on iteration t-1's pairs (spin, --spin_keep_previous)?"""
    return "spin_keep_previous" in METHODS[method].binds and cfg["spin_keep_previous"] and t > 1


# theta_0's log-probs of the annotated pairs: the DPO baseline's reference in every iteration
DPO_REFERENCE = "dpo/ref_logps_theta0.json"
# Line 10's pairs of ldalign and spin with their weights, as TRL's DPOTrainer reads them (dataset.trl_pairs):
# <method>/iter{t}/pairs.trl.jsonl
TRL_PAIRS = "pairs.trl.jsonl"
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
        # Loaded now, before any compute: a wrong --reward_model fails at once. In one process kept on the CPU
        # between uses; under torchrun read by rank 0 alone and sharded over the ranks' devices.
        self.reward_model = None
        if cfg["reward_model"]:
            home = device if fsdp.world() > 1 else torch.device("cpu")
            self.reward_model = analysis.load_reward_model(cfg["reward_model"], device=home,
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
    def policy(self, method, t):
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
    def samples_name(self, method, t):
        """The file of theta_t's samples: iteration t + 1 trains on them. theta_0's are iter0/samples.jsonl, which
        iteration 1 of every method reuses unless --reuse_line2_samples false."""
        if t == 0 and (method is None or self.cfg["reuse_line2_samples"]):
            return "iter0/samples.jsonl"
        return f"{method}/iter{t + 1}/samples.jsonl"

    def samples_each_iteration(self, method):
        """Does `method` sample y' in every iteration (lines 6-7)? ldalign and spin train on them; dpo and sft only
        measure S on them (--measure_S)."""
        return METHODS[method].samples or self.cfg["measure_S"]

    def sample(self, method, t):
        """Lines 1-3 (method None, t = 0) and 6-7: y'_i ~ p_theta_t(.|x_i), as token ids, one list per x_i of D.
        Seeded by --seed + t + 1 (theta_0's shared samples: --seed)."""
        name, cfg = self.samples_name(method, t), self.cfg
        seed = cfg["seed"] if name == "iter0/samples.jsonl" else cfg["seed"] + t + 1
        prompts = [d["prompt_ids"] for d in self.data.D]
        inputs = [self.run.policy_path(method or "", t)]

        def compute():
            # each batch written as it finishes (<name>.partial/): a rerun samples only the others
            parts = self.run.partial(name, inputs, SAMPLING_KEYS)
            return self.sample_in_batches(self.policy(method, t), prompts, seed, parts, name, f"y' ~ p_theta_{t}")
        return self.run.cached(name, compute, save=self._write_samples, load=self._read_samples, inputs=inputs)

    def sample_in_batches(self, policy, prompts, seed, parts, name, what):
        """generate.sample_dataset, each finished batch kept in the folder `parts` (batch<first prompt>.json,
        written by the rank that sampled it) and read back by a rerun, which samples only the others (with the
        same tokens: each batch has its own generator). SIGTERM stops at the next batch, every rank at the same
        one, the finished batches written: exit status checkpoint.STOPPED."""
        batches = generate.sampling_batches(len(prompts), self.cfg["gen_batch_size"])
        done = {}
        for k, n in batches:
            path = os.path.join(parts, f"batch{k}.json")
            if os.path.exists(path):
                done[k] = read_json(path)
                if len(done[k]) != n:
                    raise UserError(f"{path} holds {len(done[k])} responses, not the batch's {n}; delete "
                                    "it to sample the batch again")
        if done:
            self.log(f"  [resume] sampling {what}: {len(done)} of {len(batches)} batches read back from {parts}")
        count = [0]  # this rank's batches so far (the tests' kill hook)

        def on_batch(k, rows):
            if rows is not None:
                write_json(os.path.join(parts, f"batch{k}.json"), rows)
            count[0] += 1
            self.run.kill_point(f"{name}/batch{count[0]}")
            if checkpoint.stop_requested():
                fsdp.barrier()  # every rank's batches are written
                checkpoint.stop(self.log, f"while sampling {what}; its finished batches are in {parts}")
        with checkpoint.stop_at_boundaries():
            return generate.sample_dataset(policy, prompts, self.data.tok, self.cfg, seed, self.device,
                                           log=self.log, what=what, done=done, on_batch=on_batch)

    def _write_samples(self, ids, path):
        """samples.jsonl: one row per pair, {where, x, y, y_prime (text), y_prime_ids}; rank 0 writes."""
        if fsdp.rank() == 0:
            tok = self.data.tok
            write_jsonl(path, [{"where": d["where"], "x": d["x"], "y": d["y"],
                                "y_prime": tok.decode(y, skip_special_tokens=True), "y_prime_ids": y}
                               for d, y in zip(self.data.D, ids)])

    def _read_samples(self, path):
        return read_samples(path, self.data.D, self.cfg["data"])

    def stored_samples(self, method, t):
        """theta_t's samples as an earlier iteration stored them (read, never sampled: no policy is loaded).
        They are an input of that iteration's theta, so a run that reached this iteration has them."""
        return self._read_samples(self.run.path(self.samples_name(method, t)))

    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, line 4: the guide T = (phi, psi), Eq. 2 over golden and generated responses
    # ----------------------------------------------------------------------------------------------
    def guide(self, y0):
        """Trained once on (x, y) and (x, y') of theta_0's samples y0, then frozen for all T iterations."""
        data, cfg, device = self.data, self.cfg, self.device

        def compute():
            return guide_lib.fit(data.guide_src, self.triples(y0), cfg, data.gtok.eos_token_id, device, self.log)

        def save(guide, path):
            plain = guide_lib.gathered(guide, data.guide_src, cfg.get("guide_revision") or None)
            if plain is not None:  # rank 0
                with atomic_path(path) as tmp:
                    guide_lib.save_guide(plain, tmp)

        def load(path):
            # (under torchrun read by rank 0 alone)
            return guide_lib.place(lambda: guide_lib.load_guide(path), lambda: guide_lib.saved_architecture(path),
                                   device)
        guide = self.run.cached("guide", compute, save=save, load=load,
                                inputs=[self.run.path(self.samples_name(None, 0))])
        guide_lib.freeze(guide)
        return guide

    def triples(self, y_prime):
        """(x_i, y_i, y'_i) in the guide's tokens."""
        data = self.data
        return dataset.guide_triples(data.D, data.tok, data.gtok, y_prime, self.cfg["guide_max_len"])

    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, line 8: s_i = ||phi(x_i, y_i) - phi(x_i, y'_i)||_2
    # ----------------------------------------------------------------------------------------------
    def distances(self, method, t, guide, y_prime):
        """s of iteration t, an (N,) tensor; stored as distances.jsonl, one row {where, s} per pair."""
        def compute():
            return guide_lib.distances(guide, self.triples(y_prime), self.cfg["guide_batch_size"],
                                       self.data.gtok.eos_token_id, self.device)

        def save(s, path):
            if fsdp.rank() == 0:
                write_jsonl(path, [{"where": d["where"], "s": float(v)} for d, v in zip(self.data.D, s)])
        samples = self.run.path(self.samples_name(method, t - 1))
        return self.run.cached(f"{method}/iter{t}/distances.jsonl", compute, save=save, load=read_distances,
                               inputs=[samples, self.run.path("guide")])

    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, line 9: S = mean_i s_i, the weights s_i / S
    # ----------------------------------------------------------------------------------------------
    def weights(self, method, t, s, y_prime):
        """The weights of iteration t: dpo.latent_weights(s) = s_i / S (ldalign), or 1 (the others, whose S is
        measured all the same). distances.json records S, the weights' range and the distribution of s
        (Section 5.2 (1))."""
        w = dpo.latent_weights(s) if METHODS[method].weights == "s/S" else torch.ones(len(s))
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
        return w

    # ----------------------------------------------------------------------------------------------
    # Algorithm 1, line 10: theta_t from theta_{t-1}
    # ----------------------------------------------------------------------------------------------
    def update(self, method, t, y_prime, w):
        """theta_t: theta_{t-1} trained in place on the method's pairs against its reference (METHODS), by
        dpo.dpo_train (Eq. 4) or, for continual SFT, dpo.sft_train; saved as an HF checkpoint with its step
        log. The reference log-probs are computed once, before the update (README, errata). ldalign and spin
        first write the pairs and weights they train on for TRL (TRL_PAIRS, docs/trl.md)."""
        cfg = self.cfg
        policy = self.policy(method, t - 1)
        # From here on the held model is no longer theta_{t-1}.
        self.held_path = None
        self.partial = None  # (update_state)
        if cfg.get("lora_r"):
            # --lora_r: fresh adapters (B = 0: still theta_{t-1}), trained alone; merged when theta_t is saved
            lora.begin(policy, cfg["lora_alpha"] or cfg["lora_r"], seed=cfg["seed"] + 1000 * t)
        pairs, w = self.pairs(method, t, y_prime, w)
        if METHODS[method].pairs == "y > y'" and fsdp.rank() == 0:
            # The same pairs and weights in TRL's preference format, for examples/trl_ldalign.py (docs/trl.md):
            # spin's --spin_keep_previous pairs come from D twice (iteration t-1's N, then this iteration's).
            D = self.data.D
            write_jsonl(self.run.path(method, f"iter{t}", TRL_PAIRS), dataset.trl_pairs(
                self.data.tok, [D[i % len(D)] for i in range(len(pairs))], pairs, w))
        ref = self.reference(method, t, policy, pairs) if METHODS[method].reference else None
        settings = self.train_settings(method, t)  # (the step checkpoints: every input of theta_t exists now)
        # SIGTERM: a step checkpoint at the next step, then exit (checkpoint.STOPPED)
        with checkpoint.stop_at_boundaries():
            if ref is None:
                self.log(f"[sft] continual SFT: {cfg['epochs']} epoch(s) over the {len(pairs)} {self.sft_what()}")
                history = dpo.sft_train(policy, pairs, **settings)
            else:
                self.log(f"[line 10] {'weighted ' if method == 'ldalign' else ''}DPO ({method}): "
                         f"{cfg['epochs']} epoch(s) over {len(pairs)} pairs")
                history = dpo.dpo_train(policy, pairs, *ref, w, beta=setting_at(cfg, "beta", t), **settings)
        # the curves before theta_t: every saved theta_t has its train_curves.png (with matplotlib)
        curves = self.run.path(method, f"iter{t}", "train_curves.png")
        title = f"{method}, iteration {t}: theta_{t - 1} -> theta_{t}"
        if fsdp.rank() == 0 and not analysis.save_curves_png(history, curves, title=title) and self.curves_hint:
            self.log("(pip install matplotlib for train_curves.png; the numbers are in train_metrics.jsonl)")
            self.curves_hint = False
        self.run.save_policy(policy, self.data.tok, method, t, history, self.update_inputs(method, t))
        self.held_path = self.run.policy_path(method, t)

    def pairs(self, method, t, y_prime, w):
        """What line 10 trains on (METHODS[method].pairs), with each pair's weight:
          "y > y'"  (x_i, y_i, y'_i) of D: the golden y wins over the sample y' (ldalign: w = s/S; spin: 1).
                    spin with --spin_keep_previous (SPIN's data recipe): from t = 2 on, iteration t-1's N pairs
                    come first (y' of theta_{t-2}, as stored), then this iteration's N, all 2N of weight 1.
          "pref"    the annotated (x, chosen, rejected) of --pref_data, weight 1 (dpo).
          "y"       (x, y): D's pairs (--sft_data D), or all the records of --sft_data (sft); no weights."""
        rule, D = METHODS[method].pairs, self.data.D
        if rule == "pref":
            return self.data.pref, torch.ones(len(self.data.pref))
        if rule == "y":
            if self.data.sft is not None:
                return self.data.sft, None
            return [(d["prompt_ids"], d["response_ids"]) for d in D], None
        pairs = [(d["prompt_ids"], d["response_ids"], yp) for d, yp in zip(D, y_prime)]
        if keeps_previous(self.cfg, method, t):
            previous = self.stored_samples(method, t - 2)
            self.log(f"[spin] SPIN's data recipe: the {len(previous)} pairs of iteration {t - 1}, then the "
                     f"{len(y_prime)} of iteration {t}")
            pairs = [(d["prompt_ids"], d["response_ids"], yp) for d, yp in zip(D, previous)] + pairs
            w = torch.cat([torch.ones(len(previous)), w])
        return pairs, w

    def sft_what(self):
        """What continual SFT trains on, for the log."""
        cfg = self.cfg
        return "pairs of D" if self.data.sft is None else f"records of {cfg['sft_data'] or cfg['data']}, all of them"

    def reference(self, method, t, policy, pairs):
        """log p_ref(y|x) and log p_ref(y'|x) of every pair, (N,) each, by METHODS[method].reference:
          "theta_{t-1}"  the policy right now: every pair is scored once, then the policy moves. Kept beside the
                         step checkpoints: a resumed update reads them back instead of scoring every pair again
                         (they must come from theta_{t-1}: the policy is theta_{t-1} until dpo's loop loads a
                         step checkpoint).
          "theta_0"      (dpo) fixed for every iteration: computed at t = 1, when the policy is theta_0, and
                         stored (dpo/ref_logps_theta0.json): a later iteration's policy cannot stand in for it."""
        run, micro_batch_size, device = self.run, self.cfg["micro_batch_size"], self.device
        if METHODS[method].reference == "theta_0":
            if t > 1 and not os.path.exists(run.path(DPO_REFERENCE)):
                raise UserError(f"{run.path(DPO_REFERENCE)} is missing: DPO's reference is theta_0, and only "
                                f"iteration 1 can compute it; delete {run.path('dpo')} to rerun the DPO baseline "
                                "from the start")

            def compute():
                chosen, rejected = dpo.reference_logps(policy, pairs, micro_batch_size, device)
                return {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
            ref = run.cached(DPO_REFERENCE, compute, inputs=[run.policy_path("", 0)])
        else:
            path = os.path.join(self.update_state(method, t), "ref_logps.json")
            if os.path.exists(path):
                self.log(f"[line 10] reference log-probs under theta_{{t-1}}: read back from {path}")
                ref = read_json(path)
            else:
                self.log("[line 10] reference log-probs under theta_{t-1} (computed once, before the update)")
                chosen, rejected = dpo.reference_logps(policy, pairs, micro_batch_size, device)
                ref = {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
                if fsdp.rank() == 0:
                    write_json(path, ref)
                fsdp.barrier()
        return torch.tensor(ref["chosen"]), torch.tensor(ref["rejected"])

    def update_inputs(self, method, t):
        """What theta_t is trained from: theta_{t-1} and the files of its pairs (their own records name the
        guide, the samples' policy, ...). A theta_t whose inputs changed is trained again (resume)."""
        row = METHODS[method]
        inputs = [self.run.policy_path(method, t - 1)]
        if keeps_previous(self.cfg, method, t):
            # iteration t-1's pairs too (pairs)
            inputs.append(self.run.path(self.samples_name(method, t - 2)))
        if row.pairs == "y > y'":
            inputs += [self.run.path(self.samples_name(method, t - 1)),
                       self.run.path(method, f"iter{t}", "distances.jsonl")]
        if row.reference == "theta_0":
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
        """The keyword arguments of dpo.dpo_train / dpo.sft_train shared by every method, the step checkpoints
        (checkpointer) among them."""
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
                    checkpointer=ckpt, defer_grad_sync=cfg["defer_grad_sync"])

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
            ev = run.cached("iter0/eval.json", lambda: analysis.evaluate(self.policy(None, 0), data, cfg, device, rm,
                                                                         self.log), inputs=theta_0)
            self.log(f"[iter 0] theta_0 held-out greedy exact match {ev['exact_match']} | "
                     f"mean reward {ev['reward']}")
        if cfg["agreement_n"] > 0:
            agr = run.cached("guide/agreement.json", lambda: analysis.agreement(self.policy(None, 0), guide, data, cfg,
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
                self.policy(method, t), data, self.cfg, self.device, self.reward_model, self.log),
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
# Policies and the per-pair files
# --------------------------------------------------------------------------------------------------
def load_policy(path, cfg, device):
    """theta_t from its checkpoint; the run's own checkpoints verified (manifest) and in exact fp32. --lora_r:
    the adapters added before FSDP2 shards the model (lora.add), the frozen base in --lora_base_dtype."""
    if path != cfg["policy"]:
        verify(path)
    r = cfg.get("lora_r", 0)
    prepare = (lambda m: lora.add(m, cfg.get("lora_targets", ""), r)) if r else None
    bf16_base = r and cfg.get("lora_base_dtype", "float32") == "bfloat16"
    cast = (lambda m: lora.cast_base(m, torch.bfloat16)) if bf16_base else None
    return fsdp.load_policy(path, device, exact_fp32=path != cfg["policy"], grad_ckpt=cfg["grad_ckpt"],
                            compile=cfg["compile"], trust_remote_code=cfg["trust_remote_code"],
                            revision=cfg.get("policy_revision") or None if path == cfg["policy"] else None,
                            prepare=prepare, cast=cast)


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
