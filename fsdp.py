"""Distribution and model placement: the one file that knows about torch.distributed and FSDP2.

    rank, world, device = fsdp.init()        # `python` (one process) or `torchrun` (one process per GPU or CPU worker)
    model = fsdp.load_policy(path, ...)      # an HF checkpoint, fp32 master weights, sharded when world > 1
                                             # (read by rank 0 only; the others receive their shards)
    model, _ = fsdp.from_rank0(read, build, wrap, device)   # the same for any model: the guide, the RM
    with fsdp.gathered_weights(model): ...   # generation: every block's weights gathered once, not per token
    out = fsdp.shard_gather(items, fn)       # each rank runs fn on its share of items, every rank gets all, in order
    with fsdp.autocast(device, model): ...   # bf16 on one GPU (FSDP2 has its own mixed precision); fp32 on CPU
    fsdp.finish()                            # barrier, then leave the process group

Under `python` there is no process group: rank 0, world 1, and every helper here is a no-op or the plain path.
"""
import datetime
import math
import os

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------------
def init():
    """(rank, world, device). Under torchrun: one process per GPU (nccl) or per CPU worker (gloo)."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(local_rank)
        # 60 minutes, not NCCL's default 10, before a collective gives up: the other ranks wait in a barrier
        # while rank 0 alone writes a 7B checkpoint (29 GB of fp32), which a slow disk can stretch past 10.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60),
                                device_id=device if cuda else None)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if cuda else "cpu")


def finish():
    """Leave the process group. The barrier first: rank 0 may still be writing, and a rank that destroys the
    group while another is inside a collective aborts that rank's gloo threads."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's obj (anything picklable) on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(t, op="sum"):
    """In-place all-reduce of a small tensor ("sum" or "min"); a no-op in one process. (NCCL reduces GPU tensors
    only: a CPU tensor makes a round trip through the GPU.)"""
    if dist.is_initialized():
        op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op]
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            g = t.cuda()
            dist.all_reduce(g, op=op)
            return t.copy_(g.cpu())
        dist.all_reduce(t, op=op)
    return t


# ----------------------------------------------------------------------------------------------------
# Shard, compute, gather: the one way work is split over ranks outside the training loop
# ----------------------------------------------------------------------------------------------------
def shard_indices(n, rank, world):
    """This rank's indices rank, rank+world, ...; padded by repeating so every rank has the same count
    (equal numbers of forward calls on every rank, or FSDP collectives hang). Returns (padded, n_real)."""
    idx = list(range(rank, n, world))
    n_real = len(idx)
    while len(idx) < math.ceil(n / world):
        idx.append(idx[-1] if idx else 0)
    return idx, n_real


def shard_gather(items, fn):
    """fn(this rank's share of items) on every rank; returns the results of ALL items, in order, on every rank.

    fn returns one value per item it is given: a list, an (n,) tensor, or a tuple of those (e.g. the chosen and
    rejected reference log-probs). Tensors come back as (N,) CPU tensors, lists as lists.
    """
    idx, n_real = shard_indices(len(items), rank(), world())
    local = fn([items[i] for i in idx])
    single = not isinstance(local, tuple)
    parts = [local] if single else list(local)
    parts = [p[:n_real].cpu() if torch.is_tensor(p) else list(p[:n_real]) for p in parts]  # drop the padding
    shares = [(idx[:n_real], parts)]
    if dist.is_initialized():
        shares = [None] * world()
        dist.all_gather_object(shares, (idx[:n_real], parts))
    out = []
    for k, p in enumerate(parts):
        full = [None] * len(items)
        for ix, ps in shares:
            for i, v in zip(ix, ps[k]):
                full[i] = v
        out.append(torch.stack(full) if torch.is_tensor(p) and full else torch.zeros(0) if torch.is_tensor(p) else full)
    return out[0] if single else tuple(out)


# ----------------------------------------------------------------------------------------------------
# Models: FSDP2 wrapping, compiled blocks, loading a policy, gathering weights for generation
# ----------------------------------------------------------------------------------------------------
def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def transformer_blocks(model):
    """The decoder blocks of an HF model (LlamaDecoderLayer, MistralDecoderLayer, GPT2Block, ...), found by
    HF's own `_no_split_modules`: the unit that parallelize shards and compile_blocks compiles."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def parallelize(model, device, bf16=None):
    """FSDP2: shard every transformer block, then the root (embeddings, final norm, head, extra layers).

    On GPU, bf16 compute with fp32 master weights and fp32 gradient reduction; the fp32 output cast goes on the
    root only (on a block it would feed fp32 into the next bf16 block's norm). bf16=True asks for the GPU's
    mixed precision on another device (plan.py: fake tensors on the CPU standing for a GPU's).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world(),))
    bf16 = device.type == "cuda" if bf16 is None else bf16
    if bf16:
        block_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        block_mp = MixedPrecisionPolicy()
    root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   output_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for m in transformer_blocks(model):
        fully_shard(m, mesh=mesh, mp_policy=block_mp)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    return model


def compile_blocks(model):
    """torch.compile every transformer block in place (`--compile true`), before parallelize (as torchtitan).

    Per block, not the whole model: the blocks are identical, so one compiled graph serves them all, and
    FSDP2's per-block hooks (all-gather before, reshard after) stay outside the graphs. Compiling fuses the
    elementwise work around the matmuls (RMSNorm, rotary, SwiGLU, residuals). In place (`module.compile()`),
    so parameter names and checkpoints are unchanged.
    """
    for m in transformer_blocks(model):
        m.compile()


def load_policy(path, device, *, exact_fp32, grad_ckpt=False, compile=False, trust_remote_code=False,
                revision=None, prepare=None, cast=None):
    """A policy checkpoint, ready to sample and train: fp32 master weights on `device` (FSDP2-sharded when
    world > 1, whose mixed precision then computes in bf16), activation checkpointing / compiled blocks.

    prepare(model): applied to the model as built, before FSDP2 shards it (rank 0's full copy and every rank's
    meta-device one alike), e.g. LoRA's adapters (run/lora.py add), which FSDP2 must then own. cast(model): the
    dtype change on the host before the model moves to `device` (default: every parameter in fp32), e.g.
    LoRA's frozen base in bf16 (one process only).

    exact_fp32=False (theta_0 from outside, --policy) loads in the dtype it is stored in ("auto": zephyr's bf16
    weights are 14 GB in CPU memory, not 28; the cast to fp32 below is exact). exact_fp32=True (the
    checkpoints the run writes) loads fp32 whatever config.json says (zephyr's says bfloat16): a bf16 round trip
    on resume would erase most of an iteration's update, since at lr 5e-7 a weight moves far less than bf16's
    spacing (2^-8 of its size).

    Under torchrun one host copy of the weights: only rank 0 reads the checkpoint; every rank builds the model
    on the meta device (no memory), shards it, and receives its shard from rank 0 (load_from_rank0). At 7B on
    8 GPUs that is 14 GB of host memory for theta_0 (29 GB for a run's own fp32 checkpoint), not 8 times that.
    revision: the hub revision of a hub id `path` (--policy_revision; None: the default branch).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = torch.float32 if exact_fp32 else "auto"
    prepare = prepare or (lambda m: m)

    def read():
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 revision=revision)
        # rank 0's full copy is prepared too: its state dict is that of the prepared model
        return prepare(m)

    def build():
        # the architecture alone: fp32 parameters (on the meta device: no memory behind them)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        return prepare(AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                        trust_remote_code=trust_remote_code))

    def wrap(m):
        if grad_ckpt:
            # Recompute each decoder block's activations in backward (HF's activation checkpointing,
            # per block; it keeps FSDP2's hooks outside the checkpoint). HF turns the cache off in
            # training only.
            m.activation_checkpointing_enable()
        if compile:
            compile_blocks(m)
        return parallelize(m, device) if world() > 1 else m
    m, full = from_rank0(read, build, wrap, device)
    if world() > 1:
        # What else from_pretrained sets, as rank 0 read it: config.dtype (under "auto" the stored dtype, not
        # the build's fp32) and generation_config.json
        m.config.dtype, m.generation_config = broadcast_object(
            (full.config.dtype, full.generation_config) if full is not None else None)
    if cast is not None:
        # cast on the host, then moved: the device never holds the model in another dtype
        return cast(m).to(device)
    return m.to(device=device, dtype=torch.float32)


def from_rank0(read, build, wrap, device):
    """One host copy of a model under torchrun. read(): the model from its checkpoint; build(): the same
    architecture, built here on the meta device (no memory, nothing read); wrap(model): what goes on
    before and with FSDP2 (parallelize). Rank 0 alone calls read(); every rank wraps build() and
    receives its shards from rank 0 (load_from_rank0). Returns (the model, rank 0's full copy; None
    on the other ranks). In one process: (wrap(read()), None), nothing on the meta device."""
    if world() == 1:
        return wrap(read()), None
    with torch.device("meta"):
        m = build()
    m = wrap(m)
    full = read() if rank() == 0 else None
    load_from_rank0(m, full, device)
    return m, full


def load_from_rank0(model, full, device):
    """Fill `model`, FSDP2-sharded on the meta device, with the weights and buffers of `full`, the same
    architecture loaded on rank 0 only (None on the other ranks).

    PyTorch's own broadcast of a full state dict (set_model_state_dict, broadcast_from_rank0): one tensor at a
    time, so another rank holds its shards plus one full tensor, never the model. A stored bf16 weight goes
    into its fp32 shard by an exact cast. Buffers are not sharded, and those left out of a state dict (rotary
    inv_freq: non-persistent) would keep to_empty's garbage, so every buffer is rank 0's, broadcast. Tied
    weights (lm_head = embeddings) stay one parameter: to_empty and the load fill it in place.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model.to_empty(device=device)
    state_dict = full.state_dict() if rank() == 0 else {}
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True,
                                                                     broadcast_from_rank0=True))
    own = dict(full.named_buffers()) if rank() == 0 else {}
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if rank() == 0:
                buf.copy_(own[name])
            dist.broadcast(buf, src=0)


class gathered_weights:
    """Keep FSDP2 weights unsharded for a run of forward calls (generation, scoring), then reshard.

    Without it FSDP2 all-gathers every block's weights at every decode step. unshard/reshard are not
    recursive, so every FSDP module is switched. A no-op for an unsharded model.
    The root (embeddings, final norm, head) stays at FSDP2's own setting: it never reshards after forward
    (its weights are needed again at once in backward); switching it back to True on exit, as for the blocks,
    would make every later training micro-batch all-gather the root a second time in backward.
    """

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule
        self.mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.blocks = [m for m in self.mods if m is not model]  # set_reshard_after_forward: blocks only

    def __enter__(self):
        for m in self.blocks:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self.mods:
            m.unshard()

    def __exit__(self, *exc):
        for m in self.mods:
            m.reshard()
        for m in self.blocks:
            m.set_reshard_after_forward(True, recurse=False)  # parallelize's setting for the blocks


def reshard_all(model):
    """Free the gathered FSDP2 weights after no-grad forwards.

    FSDP2 keeps the ROOT module's weights unsharded after a forward (they are usually needed again by the
    backward). After a forward under no_grad nothing reshards them, and the next training step would run with
    weights outside FSDP's autograd hooks: their gradients would not be reduced across ranks (the 1-vs-2-process
    test catches it). Resharding every FSDP module restores the normal state.
    """
    if is_fsdp(model):
        from torch.distributed.fsdp import FSDPModule
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def full_state_dict(model):
    """The full (unsharded) state dict on rank 0's CPU: every rank must call it under FSDP2. None otherwise."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def autocast(device, model=None):
    """bf16 autocast on a GPU, unless FSDP2's mixed precision already computes in bf16; fp32 on CPU.

    Wrap forwards only, never an optimizer step (PyTorch's AMP recipe): inside one `with torch.autocast` block
    the bf16 copy of each fp32 weight is made once and CACHED until the block exits, so a block around several
    optimizer steps would run every forward on the weights of before the first step
    (test_bf16_autocast_training_sees_updated_weights). dpo's training loop wraps each micro-batch's forward.
    """
    device = torch.device(device)
    if device.type == "cuda" and not (model is not None and is_fsdp(model)):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
