"""LD-Align's update in TRL (examples/trl_ldalign.py, docs/trl.md): the same ids, loss, gradient and step.

A tiny Llama and the toy's kind of tokenizer, built here (no downloads), saved as theta_{t-1}; four pairs of the
toy task with weights s_i / S written by dataset.trl_pairs, as ldalign.py writes <method>/iter{t}/pairs.trl.jsonl,
and read back with datasets.load_dataset("json"). On the CPU in fp32, fixed seeds: deterministic.
"""
import math
import os

import pytest
import torch

import dataset
import dpo
from run.rundir import write_jsonl

pytest.importorskip("trl", reason="trl is an optional extra (requirements-extra.txt): only examples/trl_ldalign.py "
                                  "and this test use it")
import transformers  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from examples.trl_ldalign import LDAlignDPOTrainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETA, LR = 0.1, 1e-3
CPU = torch.device("cpu")
S = [0.5, 1.0, 2.0, 1.5]  # the pairs' latent distances s_i: weights s_i / S = 0.4, 0.8, 1.6, 1.2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """theta_{t-1} (a tiny random Llama with attention dropout, and the toy's BPE with a system turn) in a folder,
    D's first four records (the first with a system message), their pairs (x, y, y') with y' the next record's
    answer (ending in EOS, as the tokenizer spells it), the weights, and pairs.trl.jsonl."""
    tmp = tmp_path_factory.mktemp("trl")
    records = dataset.load_sft_jsonl(os.path.join(ROOT, "data", "sort_train.jsonl"), 200)
    tok = dataset.train_toy_tokenizer([t for r in records for t in (r["x"], r["y"])] + ["You sort numbers."],
                                      system=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        attention_dropout=0.1))  # turned off by the update, here and in the example (TRL leaves it on)
    folder = str(tmp / "theta_prev")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    D = [dict(r, system="You sort numbers." if i == 0 else None) for i, r in enumerate(records[:4])]
    D = [dict(d, prompt_ids=dataset.prompt_ids(tok, d["x"], d["system"]),
              response_ids=dataset.response_ids(tok, d["x"], d["y"], d["system"])) for d in D]
    pairs = [(d["prompt_ids"], d["response_ids"],
              dataset.response_ids(tok, d["x"], D[(i + 1) % 4]["y"], d["system"])) for i, d in enumerate(D)]
    w = dpo.latent_weights(torch.tensor(S))
    path = str(tmp / "pairs.trl.jsonl")
    write_jsonl(path, dataset.trl_pairs(tok, D, pairs, w))
    ones = str(tmp / "ones.trl.jsonl")  # the same pairs with unit weights (spin)
    write_jsonl(ones, dataset.trl_pairs(tok, D, pairs, torch.ones(4)))
    cache = str(tmp / "cache")
    return dict(tmp=tmp, tok=tok, folder=folder, D=D, pairs=pairs, w=w,
                data=load_dataset("json", data_files=path, split="train", cache_dir=cache),
                ones=load_dataset("json", data_files=ones, split="train", cache_dir=cache))


def trainer(setup, cls=LDAlignDPOTrainer, data="data", **kw):
    """A DPOTrainer (cls) on `data`, starting from theta_{t-1}'s folder as examples/trl_ldalign.py does, with
    dpo.dpo_train's settings: 4 pairs a step in 2 micro-batches of 2, AdamW without weight decay, clipping at
    1, fp32 (DPOConfig's bf16 and gradient checkpointing default on), no truncation."""
    args = dict(output_dir=str(setup["tmp"] / "out"), learning_rate=LR, beta=BETA, num_train_epochs=1,
                per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="adamw_torch", weight_decay=0.0,
                max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=0.1, max_length=None, bf16=False,
                gradient_checkpointing=False, use_cpu=True, seed=0, report_to="none", save_strategy="no",
                disable_tqdm=True, logging_steps=1)
    tok = AutoTokenizer.from_pretrained(setup["folder"])
    return cls(model=setup["folder"], args=DPOConfig(**dict(args, **kw)),
               train_dataset=setup[data] if isinstance(data, str) else data, processing_class=tok)


def nudge(model):
    """Move a policy away from theta_{t-1} (z != 0 in Eq. 4), the same way for every copy of it."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def batch_of(tr):
    """The trainer's own batch of the four pairs, as its collator builds it."""
    return tr.data_collator([tr.train_dataset[i] for i in range(len(tr.train_dataset))])


def test_trl_reads_the_ids_trained_here(setup):
    """pairs.trl.jsonl gives TRL this project's token ids: its *_ids columns as they are (LDAlignDPOTrainer),
    and TRL's own tokenization of its text gives the same ids (y' ending in EOS as the tokenizer spells it);
    the collated batch is dpo.collate's (right padding, the prompt masked)."""
    tr = trainer(setup)
    text_only = setup["data"].remove_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    tokenized = DPOTrainer._prepare_dataset(tr, text_only, tr.processing_class, tr.args, "train")  # TRL's own
    for rows in (tr.train_dataset, tokenized):
        assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows] == setup["pairs"]
    assert tr.train_dataset["weight"] == pytest.approx(setup["w"].tolist(), abs=0)
    batch, pairs = batch_of(tr), setup["pairs"]
    ids, mask, labels = dpo.collate([p for p, _, _ in pairs] * 2, [c for _, c, _ in pairs] + [r for _, _, r in pairs],
                                    setup["tok"].pad_token_id)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert torch.equal(batch["input_ids"].masked_fill(batch["completion_mask"] == 0, dpo.IGNORE), labels)
    assert torch.equal(batch["weight"], setup["w"])


def test_trl_text_path_differs_where_documented(setup):
    """docs/trl.md: TRL's tokenization of the text ends every completion with EOS (a y' cut at --max_new_tokens
    has none here) and re-spells a y' the policy sampled in other tokens than the tokenizer's (here "Ġ93" sampled
    as "Ġ9" "3"); LDAlignDPOTrainer keeps the file's ids."""
    tok, d, (px, py, yp) = setup["tok"], setup["D"][1], setup["pairs"][1]
    cut = yp[:-1]  # no EOS
    k = next(i for i, t in enumerate(yp) if len(tok.convert_ids_to_tokens(t)) > 1 and t != tok.eos_token_id)
    respelled = yp[:k] + tok.convert_tokens_to_ids(list(tok.convert_ids_to_tokens(yp[k]))) + yp[k + 1:]
    assert tok.decode(respelled) == tok.decode(yp)
    path = str(setup["tmp"] / "odd.trl.jsonl")
    write_jsonl(path, dataset.trl_pairs(tok, [d, d], [(px, py, cut), (px, py, respelled)], [1.0, 1.0]))
    odd = load_dataset("json", data_files=path, split="train", cache_dir=str(setup["tmp"] / "cache"))
    tr = trainer(setup)
    assert tr._prepare_dataset(odd, tok, tr.args, "odd")["rejected_ids"] == [cut, respelled]
    text_only = odd.remove_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    assert DPOTrainer._prepare_dataset(tr, text_only, tok, tr.args, "odd")["rejected_ids"] == [
        cut + [tok.eos_token_id], yp]


def test_trl_loss_and_gradient_are_eq4(setup):
    """The subclass's loss on a batch is dpo.ldalign_loss(...).mean() of the same pairs, policy log-probs by
    dpo.pair_logps and the reference's by dpo.reference_logps of theta_{t-1}, to 1e-5; so is every gradient."""
    tr = trainer(setup)
    policy = nudge(tr.model)
    loss = tr.compute_loss(policy, batch_of(tr))
    loss.backward()
    ours_policy = nudge(AutoModelForCausalLM.from_pretrained(setup["folder"], dtype=torch.float32))
    theta_prev = AutoModelForCausalLM.from_pretrained(setup["folder"], dtype=torch.float32)
    ref_c, ref_r = dpo.reference_logps(theta_prev, setup["pairs"], 4, CPU)
    pc, pr = dpo.pair_logps(ours_policy, setup["pairs"], CPU)
    ours = dpo.ldalign_loss(pc, pr, ref_c, ref_r, setup["w"], BETA)[0].mean()
    ours.backward()
    assert abs(ours.item() - sum(setup["w"].tolist()) / 4 * math.log(2)) > 1e-3  # z != 0: not the loss at step 0
    assert abs(loss.item() - ours.item()) < 1e-5, (loss.item(), ours.item())
    grads = dict(ours_policy.named_parameters())
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-7)
    print(f"\nloss: TRL {loss.item():.8f}, dpo.ldalign_loss {ours.item():.8f}, |difference| "
          f"{abs(loss.item() - ours.item()):.1e}; largest gradient difference "
          f"{max(float((p.grad - grads[n].grad).abs().max()) for n, p in policy.named_parameters()):.1e}")


def test_trl_unit_weights_are_trl_dpo(setup):
    """With every weight 1 the subclass's loss is TRL's own DPO loss (loss_type sigmoid), bit for bit."""
    ours, plain = trainer(setup, data="ones"), trainer(setup, cls=DPOTrainer, data="ones")
    b_ours, b_plain = batch_of(ours), batch_of(plain)  # (TRL tokenized the text for the plain trainer)
    assert set(b_ours) == set(b_plain) | {"weight"} and torch.equal(b_ours["weight"], torch.ones(4))
    assert all(torch.equal(b_ours[k], b_plain[k]) for k in b_plain)
    with torch.no_grad():
        losses = [tr.compute_loss(nudge(tr.model), b) for tr, b in ((ours, b_ours), (plain, b_plain))]
    assert torch.equal(losses[0], losses[1]), losses


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_trl_step_is_dpo_train(setup, optimizer):
    """One optimizer step of trainer.train() (reference log-probs precomputed, as in the example; the config's
    attention dropout on, as training mode has it, but for the update) from theta_{t-1} is one step of
    dpo.dpo_train from it: same lr, beta, batch (2 micro-batches of 2), optimizer (AdamW, or RMSprop as in the
    paper preset), clipping.

    The weights agree to fp32 round-off (1e-8) wherever the optimizer is well conditioned. The first step is
    lr * g / (d + 1e-8) for each weight, d = |g| (AdamW) or 0.1 |g| (RMSprop): where d nears that eps, the
    round-off of g (the two compute log p differently: fused chunks, log_softmax) is magnified up to lr / 4e-8 and
    those weights differ more (AdamW: up to 4e-7 in a step of 1e-3; RMSprop: 9e-6 in 1e-2)."""
    tr = trainer(setup, precompute_ref_log_probs=True, optim={"adamw": "adamw_torch", "rmsprop": "rmsprop"}[optimizer])
    tr.train()
    assert tr.state.global_step == 1
    ours = AutoModelForCausalLM.from_pretrained(setup["folder"], dtype=torch.float32)
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    ref = dpo.reference_logps(ours, setup["pairs"], 4, CPU)
    assert torch.allclose(torch.tensor(tr.train_dataset["ref_chosen_logps"]), ref[0], atol=1e-5)
    # the gradient of Eq. 4 at theta_{t-1}, to tell the well-conditioned weights
    dpo.ldalign_loss(*dpo.pair_logps(ours, setup["pairs"], CPU), *ref, setup["w"], BETA)[0].mean().backward()
    grad = {k: p.grad.clone() for k, p in ours.named_parameters()}
    ours.zero_grad(set_to_none=True)
    dpo.dpo_train(ours, setup["pairs"], *ref, setup["w"], beta=BETA, lr=LR, epochs=1, batch_size=4,
                  micro_batch_size=2, device=CPU, optimizer=optimizer, warmup_ratio=0.1, max_grad_norm=1.0, seed=0)
    theirs = dict(tr.model.named_parameters())
    diff = {k: (theirs[k] - p).detach().abs() for k, p in ours.named_parameters()}
    moved = max(float((start[k] - p.detach()).abs().max()) for k, p in ours.named_parameters())
    assert moved > LR / 2  # the step did move the weights (the first step: about lr per weight, or 10 lr)
    # well conditioned: d over 1000 eps, where the step's derivative in g is under lr / 1e-5 (most weights)
    well_conditioned = {k: g.abs() * {"adamw": 1.0, "rmsprop": 0.1}[optimizer] > 1e-5 for k, g in grad.items()}
    assert sum(int(c.sum()) for c in well_conditioned.values()) > 0.5 * sum(c.numel() for c in grad.values())
    well = max(float(d[well_conditioned[k]].max()) for k, d in diff.items() if well_conditioned[k].any())
    worst = max(float(d.max()) for d in diff.values())
    assert well < 1e-8 and worst < 3e-3 * moved, (well, worst)
    print(f"\n{optimizer}, one step: weights moved up to {moved:.1e}; TRL vs dpo.dpo_train, largest difference "
          f"{well:.1e} where well conditioned, {worst:.1e} over all")


def test_trl_averages_micro_batches_not_pairs(setup):
    """docs/trl.md: in a step of unequal micro-batches (an epoch's last when N is not a multiple of the batch) TRL
    averages each micro-batch, then the micro-batches (Trainer.training_step divides by their number);
    dpo.train averages the step's pairs. Three pairs, micro-batches of 2 and 1, plain SGD: TRL's step is
    -lr (g(first two) + g(third)) / 2, not -lr g(all three), each g the gradient of the Eq. 4 mean over those pairs."""
    tr = trainer(setup, data=setup["data"].select(range(3)), optim="sgd", max_grad_norm=1e9)
    seen, compute = [], tr.compute_loss
    tr.compute_loss = lambda model, inputs, **kw: seen.append(inputs["weight"].tolist()) or compute(model, inputs, **kw)
    tr.train()
    w = setup["w"].tolist()
    micro = [[next(i for i in range(3) if w[i] == pytest.approx(v, rel=1e-6)) for v in b] for b in seen]
    assert sorted(map(len, micro)) == [1, 2] and sorted(sum(micro, [])) == [0, 1, 2]

    def grad(idx):
        """The gradient at theta_{t-1} of the mean of Eq. 4's terms of the pairs idx (this project's functions)."""
        model = AutoModelForCausalLM.from_pretrained(setup["folder"], dtype=torch.float32)
        pairs = [setup["pairs"][i] for i in idx]
        ref = dpo.reference_logps(model, pairs, 4, CPU)
        dpo.ldalign_loss(*dpo.pair_logps(model, pairs, CPU), *ref, setup["w"][idx], BETA)[0].mean().backward()
        return {k: p.grad for k, p in model.named_parameters()}, dict(model.named_parameters())
    (g0, start), (g1, _), (g_all, _) = grad(micro[0]), grad(micro[1]), grad([0, 1, 2])
    step = {k: (p - start[k]).detach() for k, p in tr.model.named_parameters()}
    trl_rule = max(float((step[k] + LR * (g0[k] + g1[k]) / 2).abs().max()) for k in step)
    pair_mean = max(float((step[k] + LR * g_all[k]).abs().max()) for k in step)
    # (fp32 weights near 1, the norms', step with a round-off of 6e-8)
    assert trl_rule < 2e-7 < 1e-5 < pair_mean, (trl_rule, pair_mean)
    print(f"\nthree pairs in micro-batches of 2 and 1: TRL's step is the mean of the micro-batch means (off by "
          f"{trl_rule:.1e}), not the pairs' mean (off by {pair_mean:.1e})")


def test_trl_lr_schedule_is_dpo_lr_at(setup):
    """The subclass's "linear" schedule is dpo.lr_at's (warmup whose first step has lr / warmup, then linear decay);
    HF's own "linear" starts its warmup at lr 0 (docs/trl.md)."""
    tr = trainer(setup)
    n = 25
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = tr.create_scheduler(n, opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warmup = max(1, int(0.1 * n))
    assert lrs == pytest.approx([dpo.lr_at(s, n, warmup, LR) for s in range(n)], rel=1e-12)
    hf = transformers.get_scheduler("linear", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR),
                                    num_warmup_steps=tr.args.get_warmup_steps(n), num_training_steps=n)
    assert hf.get_last_lr()[0] == 0.0 and lrs[0] == LR / warmup
