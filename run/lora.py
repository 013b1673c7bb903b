"""LoRA (Hu et al. 2021) for the update of Algorithm 1, line 10: theta_t = theta_{t-1} + scaling * B @ A per
targeted projection, only A and B trained, theta_t saved merged.

    lora.add(model, targets, r)        # at load (stages.load_policy, before FSDP2): every targeted nn.Linear gets
                                       # an (inactive) adapter; every parameter of the model is frozen
    lora.begin(model, alpha, seed)     # the update starts (Stages.update): A seeded, B = 0, adapters on
    ... train ...                      # dpo's loop: the optimizer sees A and B only (requires_grad)
    config = lora.merge(model)         # theta_t is saved (RunDir.save_policy): W += scaling * B @ A, adapters off
    sd, tensors = lora.plain_state_dict(model, sd)     # a standard HF checkpoint's names; A and B in peft's
    lora.numel(model)                  # (adapter, other) parameter counts: trained vs frozen, for a memory plan
    lora.cast_base(model, torch.bfloat16)   # --lora_base_dtype bfloat16 (one process): the frozen base in bf16

Its own file, hand-written (no peft): ~40 lines of layer, no new dependency, and what this project needs
spelled out: adapters that exist before FSDP2 shards the model (FSDP2 must own A and B, or their
gradients would not be averaged over ranks) and are off outside the update (sampling and evaluation run the plain
linear), and a merge that keeps theta_t in fp32. The adapters of theta_t are saved beside it in peft's layout
(policy/adapter/: adapter_config.json, adapter_model.safetensors: peft's file names, tensor names and config
fields; not tried with peft itself, which this project does not install).

Why A is orthogonal (not peft's kaiming-uniform): at step 0, B = 0, so the gradient reaches B only, as
grad_B = scaling * G @ A^T (G = the full gradient of W), and one step moves the effective weight by
scaling * dB @ A, i.e. along -G @ A^T A. With orthonormal rows (r <= in) A^T A is (a multiple of) the projection
onto A's row space: the LoRA step is the full step restricted to a random r-dimensional subspace of the inputs;
at full rank (r >= in, orthonormal columns) A^T A is a multiple of the identity: the full fine-tuning step
(test_lora_at_full_rank_steps_along_full_fine_tuning). A random kaiming A gives G @ (a random positive matrix)
instead. The gain 1/sqrt(3) gives A's entries peft's size (kaiming-uniform: variance 1/(3 in)) when r <= in.
"""
import json
import math
import os

import torch
from torch import nn

# The projections of Llama / Mistral / Qwen2 decoder blocks: attention and MLP
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


class LoRALinear(nn.Module):
    """base(x) + scaling * x A^T B^T. base: the frozen nn.Linear (its weight and bias unchanged); A (r, in),
    B (out, r). Inactive (the plain linear, no extra matmul) until begin(), and again after merge()."""

    def __init__(self, base, r):
        super().__init__()
        self.base = base
        # frozen until begin(): outside the update nothing is trained
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, device=base.weight.device), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device), requires_grad=False)
        self.scaling, self.active = 1.0, False

    def forward(self, x):
        y = self.base(x)
        if not self.active:
            return y
        # (..., in) -> (..., r) -> (..., out), in the adapters' dtype (fp32 on CPU; bf16 under autocast / FSDP2)
        lora = nn.functional.linear(nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (self.scaling * lora).to(y.dtype)


def wrapped(model):
    """The LoRALinear modules of `model` by their module name (empty without LoRA)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add(model, targets, r):
    """Wrap every nn.Linear whose attribute name is in `targets` ("q_proj,v_proj,...") into a LoRALinear of rank r
    (A and B of their final shapes, zero; FSDP2 shards them as they are) and freeze every parameter of `model`:
    only A and B are ever trained. A target that names no nn.Linear of the model is a user error."""
    from run.cli import UserError
    names = [t.strip() for t in targets.split(",") if t.strip()]
    # the model's linear layers as they are before any is wrapped (for the error below)
    linears = sorted({n.split(".")[-1] for n, m in model.named_modules() if type(m) is nn.Linear})
    for p in model.parameters():
        p.requires_grad_(False)
    found = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in names and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, r))
                found.add(name)
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(f"--lora_targets {targets}: {', '.join(missing)} is no nn.Linear of "
                        f"{type(model).__name__} (its linear layers: {', '.join(linears)})")
    return model


def check(config, targets, trust_remote_code=False):
    """--lora_targets against theta_0's architecture (an HF config), before any compute: the model is built on the
    meta device (no memory, no weights read) and wrapped; a target that names no nn.Linear is a UserError."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        add(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code), targets, 1)


def cast_base(model, dtype):
    """--lora_base_dtype bfloat16 (one process): every parameter but A and B in `dtype` (the frozen base: half the
    memory), A and B in fp32. theta_{t-1} is then rounded to bf16, as for inference: at the start of every update,
    whether held or reloaded (merge keeps the two the same)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if n.endswith((".lora_A", ".lora_B")) else dtype)
    return model


def begin(model, alpha, seed):
    """Fresh adapters for one update: A orthogonal (seeded: the same on every rank and on a resume), B = 0, so that
    the model is still exactly theta_{t-1} (reference log-probs and step 0 unchanged); scaling = alpha / r."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in sorted(wrapped(model).items()):
            r, n_in = m.lora_A.shape
            A = torch.empty(r, n_in)
            nn.init.orthogonal_(A, gain=1 / math.sqrt(3), generator=g)
            _set(m.lora_A, A)
            _set(m.lora_B, torch.zeros(m.lora_B.shape))
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
            m.scaling, m.active = alpha / r, True


def _set(param, full):
    """param <- full (a full CPU tensor, the same on every rank); under FSDP2 each rank copies its shard."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        full = distribute_tensor(full.to(param.to_local().device), param.device_mesh, param.placements)
    param.copy_(full)


def merge(model):
    """theta_t = theta_{t-1} + scaling * B @ A, in place in every targeted weight (every rank: under FSDP2 each
    computes its rows of B @ A), then the adapters are off and frozen: the model in memory is theta_t, a plain
    model. Returns the adapter's config (None without LoRA). Merged in fp32: at DPO's learning rates much of an
    update is below bf16's spacing, and a bf16 merge would round it away."""
    mods = wrapped(model)
    if not any(m.active for m in mods.values()):
        return None
    with torch.no_grad():
        for m in mods.values():
            W = m.base.weight
            if W.dtype == torch.float32:
                W.add_(m.lora_B @ m.lora_A, alpha=m.scaling)
            else:
                # a bf16 base (--lora_base_dtype): theta_t's fp32 weight is kept for the checkpoint (host memory,
                # plain_state_dict); in memory its bf16 rounding, as a reload of that checkpoint gives
                merged = W.float().add_(m.lora_B @ m.lora_A, alpha=m.scaling)
                m.merged = merged.cpu()
                W.copy_(merged)
            m.active = False
            m.lora_A.requires_grad_(False)
            m.lora_B.requires_grad_(False)
    m = next(iter(mods.values()))
    r = m.lora_A.shape[0]
    return {"r": r, "lora_alpha": m.scaling * r, "target_modules": sorted({n.split(".")[-1] for n in mods})}


def plain_state_dict(model, state_dict):
    """(the state dict of a standard HF checkpoint, the adapters' tensors in peft's names) from the state dict
    of the wrapped `model`: "...q_proj.base.weight" -> "...q_proj.weight"; "...q_proj.lora_A" ->
    "base_model.model....q_proj.lora_A.weight". A model without LoRA: (state_dict, {})."""
    rename = {}
    for name in wrapped(model):
        rename.update({f"{name}.base.weight": f"{name}.weight", f"{name}.base.bias": f"{name}.bias",
                       f"{name}.lora_A": None, f"{name}.lora_B": None})
    plain, adapter = {}, {}
    for k, v in state_dict.items():
        if k in rename and rename[k] is None:
            adapter[f"base_model.model.{k}.weight"] = v
        else:
            plain[rename.get(k, k)] = v
    # a bf16 base: theta_t in fp32 as every checkpoint of the run (exact for the frozen weights), the merged
    # weights as merge() computed them
    for name, m in wrapped(model).items():
        if getattr(m, "merged", None) is not None:
            plain[f"{name}.weight"], m.merged = m.merged, None
    plain = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in plain.items()}
    return plain, adapter


def save_adapter(adapter, config, folder, base):
    """policy/adapter/ in peft's layout: adapter_model.safetensors (A, B in fp32) and adapter_config.json
    (base_model_name_or_path = theta_{t-1}, from which theta_t = base + scaling * B @ A)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(dict(config, peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base,
                       lora_dropout=0.0, bias="none"), f, indent=1)


def numel(model):
    """(adapter parameters, all other parameters) of a wrapped model, e.g. one built on the meta device from a
    config and lora.add-ed: what a memory plan counts as trained (fp32, with gradients and optimizer state) and
    as frozen (the base, in the dtype it is loaded in: fp32, see merge)."""
    adapter = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B")))
    return adapter, sum(p.numel() for p in model.parameters()) - adapter
