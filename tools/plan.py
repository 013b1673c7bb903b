"""The memory plan: each stage's peak memory per GPU, before any compute (`ldalign.py --plan`).

    python ldalign.py --preset paper --plan --plan_world 8 --plan_gpu_gb 80
    python ldalign.py --preset paper --plan --plan_world 4 --micro_batch_size 1   # any preset and overrides

Nothing is read but config.json and nothing is computed on numbers: no weights, no data, no GPU, no run folder.
The policy's and the guide's config.json (a local folder's; for the paper preset's hub ids, the public configs
shipped as data/zephyr-7b-sft-full.config.json and data/gpt2.config.json), the models built on the meta device,
sharded by fsdp.parallelize (FSDP2 per decoder block and root, bf16 compute, fp32 master weights and gradient
reduction) over a fake process group of --plan_world ranks, and each stage's own code (generate.generate,
dpo.policy_logps and dpo.ldalign_loss, the guide's forward and encode) run on fake tensors (FakeTensorMode:
shapes and dtypes, no memory) under PyTorch's FSDPMemTracker, as torchtitan's memory estimator does. The tracker
counts every tensor alive on rank 0 (the largest shards) by kind: sharded and gathered weights, gradients,
optimizer state, activations and temporaries, FSDP2's all-gather and reduce-scatter buffers.

    stage                     what is run under the tracker (per rank)
    sample y' (lines 2, 7)    fsdp.gathered_weights + generate.generate: the prefill of gen_batch_size prompts at
                              the sampler's width. The StaticCache is allocated at its full length at the
                              prefill, and a decode step feeds one token per row into it; a DynamicCache
                              (gen_static false) is stood for by a prefill of width + max_new_tokens - 1 tokens
                              (its final length; the longer prefill is an upper bound)
    guide training (line 4)   two steps of Eq. 2 at guide_batch_size / world rows of the guide's n_positions
    distances (line 8)        guide.encode of 2 x guide_batch_size rows, weights gathered (guide.distances)
    reference log-probs       dpo.policy_logps of 2 x micro_batch_size sequences of max_len, no grad
    update (line 10)          two optimizer steps: forward, Eq. 4, backward, clipping, step; the second over two
                              micro-batches when a step has several, each reduce-scattered as its backward
                              ends (FSDP2's default), or with --defer_grad_sync only the last (FSDP2 then
                              keeps every unsharded fp32 gradient until it), as dpo.train does; the other
                              mode is tracked too, for comparison
Every sequence is at its cap and every micro-batch's shortest prompt is 1 token (logits at every position).
Stages after line 4 hold the frozen guide's shard, and line 4 the policy's shard (stages.py holds one policy);
those resident bytes are added from the shards the tracker counted.

LoRA (--lora_r > 0): the policy is built as stages.load_policy builds it, lora.add with --lora_targets and --lora_r
before FSDP2 shards it, the frozen base in --lora_base_dtype (lora.cast_base). The update runs with the adapters on
(lora.begin): A and B alone are trained, in fp32 with their gradients and optimizer state (RMSprop 1x, AdamW 2x);
the base is counted as weights, with no gradient. The update is tracked first (FSDP2 fixes each unit's gradient
dtype at its first forward, from the parameters trainable then), then the adapters are merged and off
(lora.merge) for sampling and the reference log-probs, as in the run. Its step time counts 4 FLOPs per frozen
parameter and token (no weight gradients; 6 with activation checkpointing), the adapters' left out.
--lora_base_dtype bfloat16 is for one process: with --plan_world > 1 the plan refuses it, as parse_args does
under torchrun.

One GPU (--plan_world 1): the run has no FSDP2 (fsdp.autocast's bf16 autocast); the plan still shards over a fake
group of 1, so FSDP2's gathered bf16 copies stand for autocast's. With fp32 weights autocast caches a bf16 copy of
every trainable weight until the forward ends, where the plan holds one block's and the root's (so up to one bf16
copy of the blocks more at the end of a forward than counted: 0.7 GiB for a 0.49B model); an fp32 frozen base is
cast op by op, not cached, where the sampler's gathered copy is counted (an upper bound). A bf16 base is computed
on as it is: FSDP2's gathered copies of it are taken off (one_gpu_bf16_base), the adapters' bf16 copies (cached by
autocast in the update) kept.

What the tracker cannot see, and how it is added: the CUDA context, NCCL's and cuBLAS's buffers and the caching
allocator's fragmentation are a fixed reserve (RESERVE_GIB plus FRAGMENTATION of the GPU) taken off the GPU's
memory; the foreach kernels of a GPU's optimizer step (one fp32 copy of the trainable shards) are added to the
step's moment (with_foreach_step); torch.compile's CUDA-graph pool (--gen_compile) is not counted (it holds the
decode step's (B, V) logits); gradient clipping is tracked with per-tensor norms (clip); the baseline sft trains
on micro_batch_size sequences, not 2x, so its row is the update's with the activations halved (scaled, not
tracked). The largest micro-batch and sampling batch that fit are extrapolated from the tracked batch:
activations, KV cache and temporaries taken linear in the batch, the rest fixed. They can be optimistic (the
activations at the peak of an accumulating step are fewer than at a single micro-batch's own peak): rerun the
plan at the batch you choose.

The step checkpoint (--save_steps) is each rank's fp32 weight (LoRA: adapter) and optimizer-state shards; its save
time is the total over --plan_disk_gbps, the step time 6 x parameters x tokens per step (8 with activation
checkpointing) over world x --plan_tflops x --plan_mfu: every sequence at max_len, so an upper bound when real
pairs are shorter (then saving costs a larger share, printed for a step twice as fast too). The steps per
iteration count the pairs each method of --method trains on (spin with --spin_keep_previous: 2N from
iteration 2).
"""
import contextlib
import json
import math
import os

import torch
import torch.distributed as dist

import dataset
import dpo
import fsdp
import generate
import guide as guide_lib
from run import lora
from run.cli import UserError

# the repository root (this file is in tools/)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the public config.json of the paper and small presets' hub ids, shipped: the plan needs no download
HUB_CONFIGS = {"alignment-handbook/zephyr-7b-sft-full": "data/zephyr-7b-sft-full.config.json",
               "Qwen/Qwen2.5-0.5B-Instruct": "data/Qwen2.5-0.5B-Instruct.config.json",
               "gpt2": "data/gpt2.config.json"}
GiB = 2 ** 30
# off each GPU's memory: the CUDA context, NCCL and cuBLAS buffers (GiB), and the allocator's fragmentation
RESERVE_GIB, FRAGMENTATION = 2.0, 0.10
# the toy BPE's vocabulary (dataset.train_toy_tokenizer): the tiny preset's configs without its tokenizer
TOY_VOCAB = 300


# --------------------------------------------------------------------------------------------------
# The models, from config.json alone
# --------------------------------------------------------------------------------------------------
class _ToyTokenizer:
    """What dataset.tiny_policy_config / tiny_guide_config read of the toy tokenizer."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return TOY_VOCAB


def read_config(cfg, option):
    """--policy / --guide's config: a local folder's config.json, the shipped copy for a preset hub id, or the
    tiny preset's own configs (dataset.tiny_policy_config / tiny_guide_config). A config.json must give every size
    the plan builds from (SIZES): the plan does not take them from the architecture's defaults."""
    from transformers import AutoConfig
    name = cfg[option]
    if name == "tiny":
        tok = _ToyTokenizer()
        if option == "policy":
            return dataset.tiny_policy_config(tok, cfg["max_len"])
        return dataset.tiny_guide_config(tok, n_positions=2 * cfg["max_len"])
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
    elif name in HUB_CONFIGS:
        path = os.path.join(ROOT, HUB_CONFIGS[name])
    else:
        raise UserError(f"--{option} {name}: --plan reads a local folder's config.json (or, for "
                        f"{', '.join(HUB_CONFIGS)}, the copy in data/): give the folder")
    if not os.path.isfile(path):
        raise UserError(f"--{option} {name}: no config.json in the folder")
    try:
        with open(path) as f:
            d = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} (--{option}): not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("model_type"), str):
        raise UserError(f"{path} (--{option}): no \"model_type\" (the architecture, e.g. \"llama\", \"gpt2\"), which "
                        "every Hugging Face config.json has")
    try:
        config = AutoConfig.for_model(d.pop("model_type"), **d)
    except ValueError as e:
        raise UserError(f"{path} (--{option}): {str(e).split('. ')[0]}") from None
    missing = missing_sizes(config, d, option)
    if missing:
        raise UserError(f"{path} (--{option}): no {', '.join(missing)}; the plan needs every size of the model from "
                        f"the file, not {type(config).__name__}'s defaults")
    return config


# The sizes a config.json must give (a model's standard names; GPT-2 spells them n_embd, n_layer, n_head,
# n_positions: the config class's attribute_map): intermediate_size where the class has one; the guide's context
# (its rows' length) too.
SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def missing_sizes(config, given, option):
    """The sizes of SIZES (and the others the config needs) that the config.json's fields `given` leave to the
    defaults of the config's class, each under the file's own spelling."""
    need = SIZES + (("intermediate_size",) if hasattr(config, "intermediate_size") else ()) + \
        (("max_position_embeddings",) if option == "guide" else ())
    spelled = type(config).attribute_map
    return [spelled.get(k, k) for k in need if given.get(k) is None and given.get(spelled.get(k, k)) is None]


@contextlib.contextmanager
def fake_world(world):
    """A fake process group of `world` ranks (this process is rank 0): FSDP2 shards as over `world` GPUs, and
    its collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise UserError("--plan runs in one process: `python ldalign.py ... --plan`, not torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded(build, *, weight_dtype=torch.float32, trainable=None, grad_ckpt=False, bf16=True, lora_r=0,
            lora_targets="", base_dtype=torch.float32):
    """build() on the meta device, LoRA and activation checkpointing as fsdp.load_policy sets them, sharded by
    fsdp.parallelize; still on the meta device (to_empty under fake_tensors() gives it fake storage). The one
    place where what is trained is chosen: weight_dtype (the master weights) and trainable(name) -> bool (None:
    every parameter); lora_r > 0: rank-lora_r adapters on lora_targets (lora.add: every other weight frozen, the
    adapters too until lora.begin), the frozen base in base_dtype (lora.cast_base; A and B in fp32)."""
    with torch.device("meta"):
        model = build().to(weight_dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or trainable(name))
    if lora_r:
        lora.add(model, lora_targets, lora_r)
        if base_dtype != torch.float32:
            lora.cast_base(model, base_dtype)
    if grad_ckpt:
        model.activation_checkpointing_enable()
    return fsdp.parallelize(model, torch.device("cpu"), bf16=bf16)


def shard_bytes(model):
    """Bytes of this rank's parameter shards."""
    return sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else
               p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------------
# FSDPMemTracker's kinds of memory, in the table's columns
COLUMNS = {"weights": ("Sharded Param", "Unsharded Param", "Buffer", "All Gather"),
           "grads": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter"),
           "optimizer": ("OptState",),
           "activations": ("Activation", "Temp", "Inputs")}


def _by_column(snap):
    """A tracker snapshot ({kind: bytes}) -> {column: bytes, "peak": total}."""
    named = {str(getattr(k, "value", k)): v for k, v in snap.items()}
    out = {col: sum(named.get(k, 0) for k in kinds) for col, kinds in COLUMNS.items()}
    out["peak"] = named.get("Total", sum(out.values()))
    out["kinds"] = named
    return out


def track(model, steps, optimizer=None):
    """Run each of steps(mark) under FSDPMemTracker on `model` (at most one forward each); returns the peak's
    breakdown by column, with the snapshots taken by mark(name) inside a step ({name: by column}) under
    "marks"."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    tracker = FSDPMemTracker(mod=model, optm=optimizer)
    marks = {}

    def mark(name):
        snap = tracker.get_tracker_snapshot("current")
        marks[name] = _by_column(next(iter(snap.values()))) if snap else None

    with tracker:
        for step in steps:
            step(mark)
            tracker.reset_mod_stats()
    peak = _by_column(next(iter(tracker.get_tracker_snapshot("peak").values())))
    peak["marks"] = marks
    return peak


@contextlib.contextmanager
def fake_tensors():
    """FakeTensorMode, with transformers told it is being traced: its masks are then built as tensors
    (padding masks are, on a GPU) instead of asking a fake tensor for its values."""
    import transformers.masking_utils as masking
    from torch._subclasses.fake_tensor import FakeTensorMode
    saved = masking.is_torchdynamo_compiling if hasattr(masking, "is_torchdynamo_compiling") else None
    if saved is not None:
        masking.is_torchdynamo_compiling = lambda: True
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        if saved is not None:
            masking.is_torchdynamo_compiling = saved


def clip(params, max_norm):
    """Gradient clipping as the training loops do it, with per-tensor norms: the foreach norm on fake DTensors
    makes the tracker count an unsharded copy of every gradient (4.2 GiB on a 1.1B-parameter model), which
    DTensor's own rule for that op (partial norms of the shards) should not make on a GPU. Not yet confirmed
    on one."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)


def _ids(batch, length, vocab):
    # token ids avoid 0..2 (pad, bos, eos)
    return torch.randint(3, vocab, (batch, length))


# --------------------------------------------------------------------------------------------------
# The stages, each one function of (model, settings) run under the tracker
# --------------------------------------------------------------------------------------------------
def policy_train(model, *, batch, length, vocab, optimizer, beta=0.1, micro_batches=2, max_grad_norm=1.0,
                 defer_grad_sync=False):
    """Algorithm 1, line 10 on `model`: two optimizer steps of Eq. 4 on micro-batches of `batch` pairs (2 x batch
    sequences of `length`), the second over two micro-batches when a step has several, as dpo.train_step runs
    them: each micro-batch's gradients reduce-scattered as its backward ends (FSDP2's default), or with
    defer_grad_sync only the last one's (the first then leaves FSDP2's unsharded fp32 gradients). Returns
    track()'s record; its marks: after_forward (the activations kept for backward), after_backward, after_step."""
    opt = dpo.make_optimizer(model, optimizer, 1e-6)
    model.train()

    def micro(sync, last):
        # one micro-batch; the step after the last (the tracker takes one forward per call)
        def run(mark):
            # before a step's last micro-batch: what the earlier ones left (FSDP2's unsharded gradients)
            mark("before_last_micro" if last else "before_micro")
            model.set_requires_gradient_sync(sync)
            ids = _ids(2 * batch, length, vocab)
            logps = dpo.policy_logps(model, ids, torch.ones_like(ids), ids, start=1)  # (2B,)
            mark("after_forward")
            ref, w = torch.zeros(batch), torch.ones(batch)
            losses, _, _ = dpo.ldalign_loss(logps[:batch], logps[batch:], ref, ref, w, beta)
            losses.sum().backward()
            if last:
                mark("after_backward")
                clip(model.parameters(), max_grad_norm)
                opt.step()
                mark("after_step")
                opt.zero_grad(set_to_none=True)
        return run

    # the first step makes the optimizer state; the second accumulates over two micro-batches
    second = [micro(True, True)] if micro_batches == 1 else [micro(not defer_grad_sync, False), micro(True, True)]
    record = track(model, [micro(True, True)] + second, opt)
    # FSDP2's fp32 gradients kept unsharded between micro-batches are filed by the tracker as temporaries:
    # the plan counts them as gradients (they do not grow with the micro-batch)
    between = record["marks"].get("before_last_micro")
    acc = min(between["kinds"].get("Temp", 0), record["kinds"].get("Temp", 0)) if between else 0
    # (at most every trainable parameter's unsharded fp32 gradient: with LoRA, the adapters')
    acc = min(acc, sum(p.numel() * 4 for p in model.parameters() if p.requires_grad))
    record.update(grads=record["grads"] + acc, activations=record["activations"] - acc, accumulated=acc)
    return with_foreach_step(record, model)


def with_foreach_step(record, model):
    """On a GPU the optimizer steps with PyTorch's foreach kernels, which make one temporary per state shard at
    once (RMSprop's and AdamW's square roots): one fp32 copy of the trainable shards, which the tracker does not
    see (on the CPU the step goes one tensor at a time; forcing foreach on fake DTensors makes the tracker count
    far more than a GPU holds). The step's peak is the memory after backward plus that copy."""
    copy = sum(p.to_local().numel() * 4 for p in model.parameters() if p.requires_grad)
    step_peak = record["marks"]["after_backward"]["peak"] + copy
    if step_peak > record["peak"]:
        record.update(peak=step_peak, optimizer=record["marks"]["after_backward"]["optimizer"] + copy)
    return record


def policy_reference(model, *, batch, length, vocab):
    """dpo.reference_logps' forward: 2 x batch sequences of `length`, no grad."""
    model.eval()

    def run(mark):
        with torch.no_grad():
            ids = _ids(2 * batch, length, vocab)
            dpo.policy_logps(model, ids, torch.ones_like(ids), ids, start=1)
        fsdp.reshard_all(model)
    return track(model, [run])


def policy_sample(model, *, batch, width, new_tokens, static):
    """Sampling (generate.sample_dataset): weights gathered once, the prefill (one new token; the tracker takes
    one forward per call). The decode steps after it feed one token per row into the cache already allocated."""
    model.eval()
    vocab = model.config.vocab_size
    if not static:
        # a DynamicCache at its final length: a prefill that long, then one step
        width, new_tokens = width + new_tokens - 1, 1

    def run(mark):
        ids = _ids(batch, width, vocab)
        cache = generate.new_static_cache(model, width + new_tokens) if static else None
        with torch.no_grad(), fsdp.gathered_weights(model):
            generate.generate(model, ids, torch.ones_like(ids), 1, None, 0, temperature=1.0, static=static,
                              cache=cache)
    return track(model, [run])


def guide_train(guide, *, batch, length):
    """Algorithm 1, line 4 (guide.train_guide): two AdamW steps of Eq. 2 on `batch` rows of `length`."""
    opt = torch.optim.AdamW([p for p in guide.parameters() if p.requires_grad], lr=1e-4)
    dpo.disable_dropout(guide)
    guide.train()
    vocab = guide.decoder.config.vocab_size

    def run(mark):
        ids = _ids(batch, length, vocab)
        ones = torch.ones_like(ids)
        nll, n_tok = guide(input_ids=ids, attention_mask=ones, response_mask=ones)
        (nll.sum() / n_tok.sum()).backward()
        mark("after_backward")
        clip(guide.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return with_foreach_step(track(guide, [run, run], opt), guide)


def guide_distances(guide, *, batch, length):
    """Algorithm 1, line 8 (guide.distances): phi of 2 x batch rows, weights gathered, no grad."""
    guide.eval()
    vocab = guide.encoder.config.vocab_size

    def run(mark):
        ids = _ids(2 * batch, length, vocab)
        ones = torch.ones_like(ids)
        with torch.no_grad(), fsdp.gathered_weights(guide):
            guide.encode(ids, ones, ones)
    return track(guide, [run])


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
def measure(cfg, world):
    """Every stage's tracked peak on rank 0 of `world` ranks (a dict of track() records), and the facts the
    table needs."""
    from transformers import AutoModelForCausalLM
    pconf, gconf = read_config(cfg, "policy"), read_config(cfg, "guide")
    local = cfg["batch_size"] // world
    mb = min(cfg["micro_batch_size"], local)
    n_micro = math.ceil(local / mb)
    width = generate.static_width(cfg["max_prompt_len"]) if cfg["gen_static"] else cfg["max_prompt_len"]
    glen = gconf.n_positions
    # LoRA (--lora_r): the adapters of stages.load_policy, on in the update only (lora.begin)
    r = cfg["lora_r"]
    base_dtype = getattr(torch, cfg["lora_base_dtype"]) if r else torch.float32
    # one process with a bf16 base: no FSDP2, hence none of its gathered bf16 copies (one_gpu_bf16_base)
    bf16_base = world == 1 and base_dtype == torch.bfloat16

    def policy_model(grad_ckpt):
        return sharded(lambda: AutoModelForCausalLM.from_config(pconf), grad_ckpt=grad_ckpt, lora_r=r,
                       lora_targets=cfg["lora_targets"], base_dtype=base_dtype)

    # one process has no FSDP2: its gradients accumulate whole over a step's micro-batches, as FSDP2's deferred
    # sync keeps them (--defer_grad_sync is for several processes)
    defer_grad_sync = cfg["defer_grad_sync"] or world == 1

    def update(model, defer=defer_grad_sync):
        if r:
            lora.begin(model, cfg["lora_alpha"] or r, cfg["seed"])
        record = policy_train(model, batch=mb, length=cfg["max_len"], vocab=pconf.vocab_size,
                              optimizer=cfg["optimizer"], beta=cfg["beta"], micro_batches=n_micro,
                              defer_grad_sync=defer)
        return one_gpu_bf16_base(record, model, train=True) if bf16_base else record

    def updates(model):
        # the settings' update; with several micro-batches per step under FSDP2 the other gradient-sync mode too
        # (one process has no FSDP2: its gradients are whole either way)
        rows["update"] = update(model)
        if n_micro > 1 and world > 1:
            rows["update_sync_other"] = update(model, not defer_grad_sync)
    rows = {}
    with fake_world(world):
        policy = policy_model(cfg["grad_ckpt"])
        n_params = sum(p.numel() for p in policy.parameters())
        adapters, base = lora.numel(policy)
        trainable = adapters if r else n_params
        with fake_tensors():
            policy.to_empty(device="cpu")
            if r:
                # with LoRA the update goes first: FSDP2 fixes each unit's gradient dtype at its first forward
                # from the parameters trainable then (fp32 adapters; a bf16 base alone would give bf16
                # gradients); then merged and off for sampling and the reference log-probs, as in the run
                updates(policy)
                lora.merge(policy)
            rows["sample"] = policy_sample(policy, batch=cfg["gen_batch_size"], width=width,
                                           new_tokens=cfg["max_new_tokens"], static=cfg["gen_static"])
            rows["reference"] = policy_reference(policy, batch=mb, length=cfg["max_len"], vocab=pconf.vocab_size)
            if not r:
                updates(policy)
            if bf16_base:
                for k in ("sample", "reference"):
                    rows[k] = one_gpu_bf16_base(rows[k], policy, train=False)
        policy_shard = shard_bytes(policy)
        # the other setting of activation checkpointing
        del policy
        other = policy_model(not cfg["grad_ckpt"])
        with fake_tensors():
            other.to_empty(device="cpu")
            rows["update_other"] = update(other)
        del other
        guide = sharded(lambda: guide_lib.build_guide(gconf, cfg["latent_dim"]))
        with fake_tensors():
            guide.to_empty(device="cpu")
            rows["guide"] = guide_train(guide, batch=math.ceil(cfg["guide_batch_size"] / world), length=glen)
            rows["distances"] = guide_distances(guide, batch=cfg["guide_batch_size"], length=glen)
        guide_shard = shard_bytes(guide)
    return dict(rows=rows, policy_shard=policy_shard, guide_shard=guide_shard, n_params=n_params,
                trainable=trainable, base_params=base, micro=mb, n_micro=n_micro, local=local, width=width,
                guide_len=glen, pconf=pconf, defer_grad_sync=defer_grad_sync)


def one_gpu_bf16_base(record, model, train):
    """--lora_base_dtype bfloat16 on one GPU: one process has no FSDP2 and computes on the bf16 base as it is,
    where FSDP2 over the fake group of 1 gathers a bf16 copy of it (Unsharded Param): those copies are taken off
    the weights and the peak. In the update autocast keeps a bf16 copy of the fp32 adapters (trainable leaves)
    from forward to backward: kept."""
    keep = 2 * sum(p.numel() for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))) \
        if train else 0
    gathered = max(record["kinds"].get("Unsharded Param", 0) - keep, 0)
    record.update(weights=record["weights"] - gathered, peak=record["peak"] - gathered, one_gpu_off=gathered)
    return record


# the table's unit: GiB, or MiB for a model whose every stage is under 1 GiB (the tiny preset)
UNIT = {"GiB": GiB, "MiB": 2 ** 20}


def _in(b, unit):
    return f"{b / UNIT[unit]:.2f}"


def _count(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def report(cfg, m, world, gpu_gb):
    """The table, the verdict, the largest batches that fit and the step checkpoint, as lines of text."""
    rows, usable = m["rows"], gpu_gb * (1 - FRAGMENTATION) - RESERVE_GIB
    ckpt = "on" if cfg["grad_ckpt"] else "off"
    resident_guide, resident_policy = m["guide_shard"], m["policy_shard"]
    # with several micro-batches per step: the settings' gradient-sync mode, in the update's name
    sync = {False: "per-micro sync", True: "deferred sync"}
    mode = f", {sync[m['defer_grad_sync']]}" if "update_sync_other" in rows else ""
    # (stage, tracked record, the other model's shard held meanwhile, a stage of these settings (False: shown
    # for comparison: the other activation-checkpointing setting, the other gradient-sync mode))
    table = [
        (f"sample y' (lines 2, 7), batch {cfg['gen_batch_size']}", rows["sample"], resident_guide, True),
        (f"guide training (line 4), {cfg['guide_batch_size'] // world} rows", rows["guide"], resident_policy, True),
        (f"distances (line 8), {2 * cfg['guide_batch_size']} rows", rows["distances"], resident_policy, True),
        (f"reference log-probs, {2 * m['micro']} seqs", rows["reference"], resident_guide, True),
        (f"update (line 10), AC {ckpt}{mode}", rows["update"], resident_guide, True),
        (f"update (line 10), AC {'off' if cfg['grad_ckpt'] else 'on'}{mode}", rows["update_other"], resident_guide,
         False),
    ]
    if "update_sync_other" in rows:
        table.append((f"update (line 10), AC {ckpt}, {sync[not m['defer_grad_sync']]}", rows["update_sync_other"],
                      resident_guide, False))
    # sft: micro_batch_size sequences where the update has 2 x micro_batch_size
    half = rows["update"]["activations"] / 2
    table.append((f"sft baseline, AC {ckpt} (scaled)",
                  dict(rows["update"], activations=half, peak=rows["update"]["peak"] - half), resident_guide, True))
    peaks = {name: r["peak"] + resident for name, r, resident, _ in table}
    unit = "GiB" if max(peaks.values()) >= GiB else "MiB"
    lines = [f"Memory plan: preset {cfg['preset']}, policy {cfg['policy']} ({_count(m['n_params'])} parameters), "
             f"guide {cfg['guide']}; {world} GPUs x {gpu_gb:g} GiB, usable {usable:.1f} GiB "
             f"({RESERVE_GIB:g} GiB CUDA/NCCL reserve, {FRAGMENTATION:.0%} fragmentation)"]
    if cfg["lora_r"]:
        lines.append(f"  LoRA rank {cfg['lora_r']} on {cfg['lora_targets']}: {_count(m['trainable'])} adapter "
                     f"parameters trained (fp32, with their gradients and {cfg['optimizer']} state), "
                     f"{_count(m['base_params'])} frozen in {cfg['lora_base_dtype']}")
    lines += [f"  per rank: update micro-batch {m['micro']} pairs x {m['n_micro']} per step (batch "
              f"{cfg['batch_size']} / {world}), max_len {cfg['max_len']}, {cfg['optimizer']}; sampling "
              f"{cfg['gen_batch_size']} prompts x ({m['width']} + {cfg['max_new_tokens']}) tokens; guide rows of "
              f"{m['guide_len']} tokens",
              "",
              f"| {'stage':42s} | weights | grads | optimizer | act./KV | resident | peak/GPU {unit} | fits? |",
              f"|{'-' * 44}|---------|-------|-----------|---------|----------|--------------|-------|"]
    fits = {}
    for name, r, resident, _ in table:
        fits[name] = peaks[name] / GiB <= usable
        lines.append(f"| {name:42s} | {_in(r['weights'], unit):>7s} | {_in(r['grads'], unit):>5s} | "
                     f"{_in(r['optimizer'], unit):>9s} | {_in(r['activations'], unit):>7s} | "
                     f"{_in(resident, unit):>8s} | {_in(peaks[name], unit):>12s} | "
                     f"{'yes' if fits[name] else 'NO':5s} |")
    weights = "fp32 shards + gathered bf16"
    if cfg["lora_r"]:
        weights = (f"the base's {cfg['lora_base_dtype']} and the adapters' fp32 shards + gathered bf16"
                   + (" (one GPU with a bf16 base: none gathered)" if world == 1 and
                      cfg["lora_base_dtype"] == "bfloat16" else ""))
    lines.append(f"({unit} per GPU, rank 0. weights: {weights}; grads: shards + the fp32 "
                 "gradients kept unsharded between micro-batches (deferred sync); act./KV: activations, "
                 "temporaries, KV cache; resident: the guide's shard after line 4, the policy's during line 4; "
                 "the other AC setting and sync mode for comparison)")
    # the settings' stages (the rows for comparison left out)
    used = [name for name, _, _, ours in table if ours]
    ok = all(fits[name] for name in used)
    worst = max(used, key=peaks.get)
    lines += ["", f"Verdict: {'FITS' if ok else 'DOES NOT FIT'} on {world} x {gpu_gb:g} GiB "
                  f"(largest stage: {worst.rsplit(',', 1)[0]}, {peaks[worst] / UNIT[unit]:.1f} {unit})"]
    lines += largest_batches(cfg, m, usable)
    lines += checkpoint_lines(cfg, m, world)
    return lines, ok


def _largest(record, batch, resident, usable, cap, accumulated=None):
    """The largest batch <= cap whose peak fits, from record (tracked at `batch`): activations grow linearly
    with the batch. accumulated(b): the unsharded gradients a micro-batch of b adds (update only)."""
    per_item = record["activations"] / batch
    fixed = record["peak"] - record["activations"] - record.get("accumulated", 0) + resident
    fit = [b for b in range(1, cap + 1)
           if fixed + b * per_item + (accumulated(b) if accumulated else 0) <= usable * GiB]
    return max(fit, default=0)


def largest_batches(cfg, m, usable):
    """--micro_batch_size (update and reference log-probs, both checkpointing settings) and --gen_batch_size."""
    rows, local, guide, defer = m["rows"], m["local"], m["guide_shard"], m["defer_grad_sync"]
    # a step of several micro-batches with deferred sync keeps every trainable parameter's fp32 gradient unsharded
    full_grads = max(rows["update"].get("accumulated", 0), rows["update_other"].get("accumulated", 0)) or \
        m["trainable"] * 4

    def accumulated(b):
        return full_grads if defer and math.ceil(local / b) > 1 else 0
    on, off = (rows["update"], rows["update_other"]) if cfg["grad_ckpt"] else (rows["update_other"], rows["update"])
    ref = _largest(rows["reference"], m["micro"], guide, usable, local)
    mb_on = min(_largest(on, m["micro"], guide, usable, local, accumulated), ref)
    mb_off = min(_largest(off, m["micro"], guide, usable, local, accumulated), ref)
    gen = _largest(rows["sample"], cfg["gen_batch_size"], guide, usable, 4096)
    grads = ("each micro-batch's gradients reduce-scattered as it ends" if not defer else
             "one process: the fp32 gradients whole" if cfg["plan_world"] == 1 else
             "several micro-batches per step keep every fp32 gradient unsharded (--defer_grad_sync true)")
    return [f"Largest that fit (activations and KV linear in the batch; up to batch_size / world = {local} "
            f"pairs per rank, {grads}): "
            f"--micro_batch_size {mb_on} with --grad_ckpt true, {mb_off} with --grad_ckpt false; "
            f"--gen_batch_size {gen} (0: none fits; now --micro_batch_size {cfg['micro_batch_size']}, "
            f"--grad_ckpt {str(cfg['grad_ckpt']).lower()}, --gen_batch_size {cfg['gen_batch_size']})"]


def steps_per_iteration(cfg):
    """{method: (optimizer steps of iteration 1, of the iterations after it)} as each method of --method trains:
    N pairs (--max_examples; dpo: as many of --pref_data), spin with --spin_keep_previous 2N from iteration 2 on
    (the previous iteration's pairs too). None where the plan cannot know it without the data: --max_examples 0
    (all of --data), or sft on every record of a file (--sft_data other than D)."""
    n, batch, epochs = cfg["max_examples"], cfg["batch_size"], cfg["epochs"]

    def steps(pairs):
        return math.ceil(pairs / batch) * epochs if pairs else None
    out = {}
    for method in cfg["method"].split(","):
        if method == "sft" and cfg["sft_data"] != "D":
            out[method] = (None, None)
        elif method == "spin" and cfg["spin_keep_previous"]:
            out[method] = (steps(n), steps(2 * n))
        else:
            out[method] = (steps(n), steps(n))
    return out


def checkpoint_lines(cfg, m, world):
    """The step checkpoint (--save_steps): its size and save time; the update's step time and steps per
    iteration (each method's pairs: steps_per_iteration); and the smallest --save_steps that keeps saving under 5%
    of the update's time, with what saving costs at that step time and at a step twice as fast."""
    # under LoRA the adapters alone (fp32): the frozen base is theta_{t-1}'s (checkpoint.trained_weights)
    held = m["trainable"] * 4 / world if cfg["lora_r"] else m["policy_shard"]
    per_rank = held + m["rows"]["update"]["marks"]["after_step"]["optimizer"]
    weights = "fp32 adapter" if cfg["lora_r"] else "fp32"
    total = per_rank * world
    save_s = total / (cfg["plan_disk_gbps"] * 1e9)
    # pairs of 2 sequences at max_len; a checkpointed block's forward runs twice
    tokens = cfg["batch_size"] * 2 * cfg["max_len"]
    # forward 2, backward 4 FLOPs per parameter and token; with LoRA the frozen base's backward has no weight
    # gradients (2; the adapters' FLOPs are left out)
    per_token = (4 if cfg["lora_r"] else 6) + (2 if cfg["grad_ckpt"] else 0)
    n_params = m["base_params"] if cfg["lora_r"] else m["n_params"]
    step_s = per_token * n_params * tokens / (world * cfg["plan_tflops"] * 1e12 * cfg["plan_mfu"])
    save_steps = math.ceil(save_s / (0.05 * step_s))
    known = [k for first, later in steps_per_iteration(cfg).values() for k in (first, later) if k]
    if known:
        save_steps = min(save_steps, max(known))  # (at most one save per iteration)

    def per_step(step):  # the share of the update's time that saving every save_steps steps takes
        return save_s / (save_steps * step + save_s)

    def hours(k):
        return f"{k} steps (~{k * step_s / 3600:.2g} h)" if k else "all of the data's pairs (unknown to the plan)"
    lines = ["",
             f"Step checkpoint ({weights} weight + {cfg['optimizer']} state shards): {per_rank / GiB:.2f} GiB per "
             f"rank, {total / GiB:.2f} GiB in all; saved in ~{save_s:.0f} s at {cfg['plan_disk_gbps']:g} GB/s",
             f"Update step ~{step_s:.2g} s ({per_token} x {_count(n_params)} parameters x {tokens} tokens at "
             f"{cfg['plan_mfu']:.0%} of {cfg['plan_tflops']:g} TFLOP/s per GPU)"]
    for method, (first, later) in steps_per_iteration(cfg).items():
        each = f"{hours(first)} per iteration" if first == later else \
            f"{hours(first)} in iteration 1, {hours(later)} in each later iteration"
        lines.append(f"  {method}: {each}")
    lines.append(f"Suggested --save_steps {save_steps}: saving takes {per_step(step_s):.1%} of the update at "
                 f"~{step_s:.2g} s per step, {per_step(step_s / 2):.1%} at a step twice as fast "
                 f"(~{step_s / 2:.2g} s); a pre-emption loses at most {save_steps} step{'s' if save_steps > 1 else ''} "
                 f"(~{save_steps * step_s / 60:.0f} min)")
    return lines


def main(cfg):
    """--plan: measure, print, exit 0. Writes nothing, reads no data, takes no run folder."""
    world, gpu_gb = cfg["plan_world"], cfg["plan_gpu_gb"]
    if cfg["batch_size"] % world or cfg["guide_batch_size"] % world:
        raise UserError(f"--batch_size {cfg['batch_size']} and --guide_batch_size {cfg['guide_batch_size']} must "
                        f"be multiples of --plan_world {world}")
    if cfg["lora_r"] and cfg["lora_base_dtype"] == "bfloat16" and world > 1:
        # as parse_args refuses it under torchrun
        raise UserError(f"--lora_base_dtype bfloat16 is for one process: --plan_world 1, not {world} (under "
                        "torchrun the base is sharded in fp32)")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    m = measure(cfg, world)
    lines, _ = report(cfg, m, world, gpu_gb)
    print("\n".join(lines), flush=True)
    return m
