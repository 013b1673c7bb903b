"""One GPU: Algorithm 1, line 10 with LoRA (run/lora.py, --lora_r), and the small preset (--preset small, a tiny Qwen2
with Qwen2.5-Instruct's template and tokenizer settings, built here: save_tiny_qwen).

    fast: test_lora_at_full_rank_steps_along_full_fine_tuning,
    test_lora_theta_t_is_saved_merged_and_reloads_to_the_same_logps,
    test_prompt_and_golden_tokens_follow_qwen_template,
    test_lora_targets_that_name_no_linear_layer_are_a_user_error_before_compute,
    test_a_mistyped_lora_target_lists_the_models_own_linear_layers,
    test_lora_on_a_bf16_base_saves_theta_t_in_fp32_and_holds_what_a_reload_gives, test_lora_settings_are_checked
    slow: test_lora_fsdp2_two_processes_equal_one_process, test_small_preset_with_lora_end_to_end_then_resume

The two-process test starts this file under torchrun (`tests/test_lora.py lora_worker THETA0 OUT`).
"""
import os
import sys

if __name__ == "__main__":  # the tests below start this file with python / torchrun (a worker's name as argument):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root's modules

import json
import math
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import dataset
import dpo
import fsdp
import ldalign
import stages
from run import cli, lora, rundir
from tests.builders import (
    HERE,
    QA,
    _corpus,
    _paper_run,
    _read_jsonl,
    _toy_tok,
    _trained_bpe,
    build_paper_inputs,
    tiny_llama,
)


# ====================================================================================================
# One GPU: Algorithm 1, line 10 with LoRA (lora.py, --lora_r), and the small preset (Qwen2.5-0.5B-Instruct)
# ====================================================================================================
def _pairs(n=6, vocab=64, seed=1):
    """n (x, y, y') id lists of a tiny vocabulary (1 = BOS, 2 = EOS)."""
    g = torch.Generator().manual_seed(seed)
    return [([1] + torch.randint(3, vocab, (3,), generator=g).tolist(),
             torch.randint(3, vocab, (4,), generator=g).tolist() + [2],
             torch.randint(3, vocab, (5,), generator=g).tolist() + [2]) for _ in range(n)]


def _eq4_loss(model, pairs, w, beta=0.5):
    """Eq. 4's mean loss at the reference (the model itself, detached): log 2, with Eq. 5's gradient."""
    pc, pr = dpo.pair_logps(model, pairs, torch.device("cpu"))
    losses, _, _ = dpo.ldalign_loss(pc, pr, pc.detach(), pr.detach(), w, beta)
    return losses.mean()


@pytest.mark.parametrize("full_rank", [True, False], ids=["r=in", "r<in"])
def test_lora_at_full_rank_steps_along_full_fine_tuning(full_rank):
    """What LoRA's first step does to the effective weight W + scaling * B @ A of every targeted projection.

    At step 0 B = 0: the model is theta_{t-1} exactly (the same loss), grad_A = scaling * B^T G = 0, and
    grad_B = scaling * G A^T, with G = dL/dW the gradient full fine-tuning takes. A step dB = -lr grad_B moves the
    effective weight by scaling * dB @ A = -lr scaling^2 G (A^T A). lora.begin draws A with orthonormal columns
    scaled by g = 1/sqrt(3) when r >= in (full rank): A^T A = g^2 I, so the LoRA step is full fine-tuning's step,
    times scaling^2 g^2: the same direction (cosine 1), checked here entry by entry. Below full rank (orthonormal
    rows) A^T A = g^2 P, the projection onto A's row space: G restricted to an r-dimensional subspace, still a
    descent direction (<G, G P> = |G P|^2 > 0) but not G's (the check is not vacuous)."""
    import copy
    full = tiny_llama(seed=0).train()
    model = copy.deepcopy(full)
    r = max(m.in_features for n, m in full.named_modules() if n.endswith("proj")) if full_rank else 4
    lora.add(model, lora.DEFAULT_TARGETS, r)
    lora.begin(model, alpha=2.0 * r, seed=7)  # scaling 2
    pairs, w = _pairs(), dpo.latent_weights(torch.rand(6, generator=torch.Generator().manual_seed(2)) + 0.5)
    loss_full, loss_lora = _eq4_loss(full, pairs, w), _eq4_loss(model, pairs, w)
    assert loss_lora.item() == pytest.approx(loss_full.item(), abs=1e-7) == pytest.approx(math.log(2), abs=1e-6)
    loss_full.backward()
    loss_lora.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)  # everything else frozen
    fulls = dict(full.named_modules())
    for name, m in lora.wrapped(model).items():
        G = fulls[name].weight.grad  # (out, in): full fine-tuning's gradient
        assert torch.count_nonzero(m.lora_A.grad) == 0  # B = 0 at step 0
        step = m.scaling * m.lora_B.grad @ m.lora_A  # (out, in): the effective weight's move per unit of -lr
        cos = F.cosine_similarity(step.flatten(), G.flatten(), dim=0).item()
        if full_rank:
            want = m.scaling ** 2 / 3 * G
            torch.testing.assert_close(step, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
            assert cos > 1 - 1e-5, (name, cos)
        else:
            assert 0 < cos < 0.99, (name, cos)


def test_lora_theta_t_is_saved_merged_and_reloads_to_the_same_logps(tmp_path):
    """theta_t = theta_{t-1} + scaling * B @ A, saved as a standard HF checkpoint (the plain model's names, fp32)
    with the adapters beside (policy/adapter/, peft's layout, in the manifest): reloaded (stages.load_policy, the
    run's own checkpoints: exact fp32, and wrapped again with inactive adapters) it gives the log-probs of the
    trained model, and base + scaling * B @ A from the adapter's files is the merged weight. Only the targeted
    weights moved."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    cpu = torch.device("cpu")
    theta0 = str(tmp_path / "theta0")
    with rundir.atomic_path(theta0) as tmp:
        tiny_llama(seed=0).save_pretrained(tmp)
        _toy_tok().save_pretrained(tmp)
    cfg = dict(policy="elsewhere", grad_ckpt=True, compile=False, trust_remote_code=False, lora_r=4,
               lora_targets="q_proj,v_proj,down_proj")
    model = stages.load_policy(theta0, cfg, cpu)
    assert len(lora.wrapped(model)) == 2 * 3 and not any(p.requires_grad for p in model.parameters())
    # per block: q_proj and v_proj (32 -> 32, 32 -> 16: GQA), down_proj (64 -> 32), 4 (in + out) each
    n_base = sum(p.numel() for p in tiny_llama().parameters())
    assert lora.numel(model) == (2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32)), n_base)
    lora.begin(model, alpha=8.0, seed=1)
    pairs = _pairs(8)
    rc, rr = dpo.reference_logps(model, pairs, 4, cpu)
    ref = AutoModelForCausalLM.from_pretrained(theta0, dtype=torch.float32)
    assert torch.equal(torch.cat([rc, rr]), torch.cat(dpo.reference_logps(ref, pairs, 4, cpu)))  # B = 0
    dpo.dpo_train(model, pairs, rc, rr, torch.ones(8), beta=0.5, lr=1e-2, epochs=2, batch_size=4,
                  micro_batch_size=2, device=cpu, optimizer="adamw")
    trained = torch.cat(dpo.reference_logps(model, pairs, 4, cpu))  # adapters on
    config = lora.merge(model)
    assert config == {"r": 4, "lora_alpha": 8.0, "target_modules": ["down_proj", "q_proj", "v_proj"]}
    merged = torch.cat(dpo.reference_logps(model, pairs, 4, cpu))  # adapters off, merged weights
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=0)
    out = str(tmp_path / "theta1")
    rundir.save_hf(model, _toy_tok(), out, adapter=(config, theta0))
    rundir.verify(out)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "model.safetensors"} <= set(manifest)
    saved = load_file(os.path.join(out, "model.safetensors"))
    before = load_file(os.path.join(theta0, "model.safetensors"))
    assert saved.keys() == before.keys() and {v.dtype for v in saved.values()} == {torch.float32}
    moved = {k for k in saved if not torch.equal(saved[k], before[k])}
    assert moved == {k for k in saved if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))}
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    acfg = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert acfg["peft_type"] == "LORA" and acfg["base_model_name_or_path"] == theta0 and acfg["r"] == 4
    for k in moved:
        a = adapter[f"base_model.model.{k[:-len('.weight')]}.lora_A.weight"]
        b = adapter[f"base_model.model.{k[:-len('.weight')]}.lora_B.weight"]
        torch.testing.assert_close(saved[k], before[k] + acfg["lora_alpha"] / acfg["r"] * b @ a, atol=1e-6, rtol=0)
    reloaded = stages.load_policy(out, cfg, cpu)
    assert torch.equal(torch.cat(dpo.reference_logps(reloaded, pairs, 4, cpu)), merged)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # what sampling, evaluation, lm-eval read
    torch.testing.assert_close(torch.cat(dpo.reference_logps(plain, pairs, 4, cpu)), merged, atol=1e-5, rtol=0)


def test_lora_targets_that_name_no_linear_layer_are_a_user_error_before_compute(tmp_path, capsys):
    """--lora_targets c_attn (GPT-2's name) on a Llama: one line naming the option and the model's linear layers,
    exit status 2, before theta_0 (the toy's SFT) is trained."""
    out = str(tmp_path / "run")
    with open(os.path.join(HERE, "data", "sort_train.jsonl")) as f:
        (tmp_path / "train.jsonl").write_text("".join(f.readlines()[:16]))
    with pytest.raises(SystemExit) as e:
        cli.report_errors(ldalign.main, ["--out", out, "--data", str(tmp_path / "train.jsonl"), "--max_examples", "8",
                                         "--lora_r", "2", "--lora_targets", "q_proj,c_attn"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--lora_targets q_proj,c_attn: c_attn is no nn.Linear of LlamaForCausalLM" in err and "down_proj" in err
    assert not os.path.exists(os.path.join(out, "sft"))


def test_a_mistyped_lora_target_lists_the_models_own_linear_layers():
    """--lora_targets q_proj,v_prj: the error names v_prj and lists the model's linear layers as the model has
    them (q_proj, v_proj, ...), not as they are once q_proj is wrapped (its linear then called `base`)."""
    with pytest.raises(cli.UserError) as e:
        lora.add(tiny_llama(), "q_proj,v_prj", 2)
    assert str(e.value) == ("--lora_targets q_proj,v_prj: v_prj is no nn.Linear of LlamaForCausalLM (its linear "
                            "layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)")


def test_lora_settings_are_checked(monkeypatch):
    """parse_args: --lora_alpha >= 0, targets given, a bf16 base only with LoRA and in one process."""
    for argv, msg in [(["--lora_alpha", "-1"], "--lora_alpha must be a finite number >= 0"),
                      (["--lora_r", "2", "--lora_targets", ","], "--lora_targets names no module"),
                      (["--lora_base_dtype", "bfloat16"], "needs --lora_r > 0 and one process"),
                      (["--lora_r", "2", "--lora_base_dtype", "float16"], "is 'float32' or 'bfloat16'")]:
        with pytest.raises(SystemExit, match=msg):
            ldalign.parse_args(argv)
    assert ldalign.parse_args(["--lora_r", "2", "--lora_base_dtype", "bfloat16"])["lora_base_dtype"] == "bfloat16"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="one process"):
        ldalign.parse_args(["--lora_r", "2", "--lora_base_dtype", "bfloat16"])


def test_lora_on_a_bf16_base_saves_theta_t_in_fp32_and_holds_what_a_reload_gives(tmp_path):
    """--lora_base_dtype bfloat16 (the 7B on one GPU): the frozen weights in bf16, A and B in fp32. theta_t is
    saved in fp32: bf16(theta_{t-1}) + scaling * B @ A, computed in fp32 (the update is not rounded away), the
    frozen weights exact; the model held in memory after the merge is bit for bit what reloading theta_t gives
    (its bf16 rounding), so a resumed run computes with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file
    cpu = torch.device("cpu")
    theta0 = str(tmp_path / "theta0")
    with rundir.atomic_path(theta0) as tmp:
        tiny_llama(seed=0).save_pretrained(tmp)
    cfg = dict(policy="elsewhere", grad_ckpt=False, compile=False, trust_remote_code=False, lora_r=4,
               lora_targets="q_proj,v_proj", lora_base_dtype="bfloat16")
    model = stages.load_policy(theta0, cfg, cpu)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    lora.begin(model, alpha=4.0, seed=1)
    pairs = _pairs(8)
    rc, rr = dpo.reference_logps(model, pairs, 4, cpu)
    dpo.dpo_train(model, pairs, rc, rr, torch.ones(8), beta=0.5, lr=1e-3, epochs=1, batch_size=4,
                  micro_batch_size=4, device=cpu, optimizer="adamw")
    out = str(tmp_path / "theta1")
    rundir.save_hf(model, _toy_tok(), out, adapter=(lora.merge(model), theta0))
    saved = load_file(os.path.join(out, "model.safetensors"))
    before = load_file(os.path.join(theta0, "model.safetensors"))
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    for k, v in saved.items():
        base = before[k].to(torch.bfloat16).float()  # theta_{t-1} as the update saw it
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            a, b = (adapter[f"base_model.model.{k[:-len('.weight')]}.lora_{x}.weight"] for x in "AB")
            torch.testing.assert_close(v, base + b @ a, atol=1e-7, rtol=0)
            assert not torch.equal(v.to(torch.bfloat16).float(), base)  # the update survives the next rounding
        else:
            assert torch.equal(v, base), k
    reloaded = stages.load_policy(out, cfg, cpu)
    held = model.state_dict()
    for k, v in reloaded.state_dict().items():
        if "lora_" not in k:  # the (inactive) adapters: lora.begin draws them again
            assert v.dtype == held[k].dtype and torch.equal(v, held[k]), k


def _lora_worker(folder, out):
    """Run under `python` or `torchrun`: one LoRA update of the policy in `folder` (stages.load_policy: FSDP2 when
    world > 1), theta_t saved merged into `out` with its adapters (rundir.save_hf)."""
    torch.set_num_threads(1)
    rank, world, device = fsdp.init()
    cfg = dict(policy="elsewhere", grad_ckpt=True, compile=False, trust_remote_code=False, lora_r=4,
               lora_targets=lora.DEFAULT_TARGETS)
    model = stages.load_policy(folder, cfg, device)
    lora.begin(model, alpha=8.0, seed=3)
    pairs = _pairs(13)  # 13 pairs: the last batch is filled up
    ref_c, ref_r = dpo.reference_logps(model, pairs, 2, device)
    w = dpo.latent_weights(torch.rand(len(pairs), generator=torch.Generator().manual_seed(1)) + 0.1)
    dpo.dpo_train(model, pairs, ref_c, ref_r, w, beta=0.5, lr=1e-2, epochs=1, batch_size=4, micro_batch_size=1,
                  device=device, optimizer="rmsprop", seed=3)
    rundir.save_hf(model, _toy_tok(), out, adapter=(lora.merge(model), folder))
    fsdp.finish()


@pytest.mark.slow
def test_lora_fsdp2_two_processes_equal_one_process(tmp_path):
    """--lora_r under torchrun, 2 CPU processes: the adapters are added before FSDP2 shards the model (frozen and
    trainable parameters in one unit; rank 0 reads the checkpoint), the update averages their gradients over
    ranks, the merge computes each rank's rows. theta_t and its adapters are those of one process."""
    from safetensors.torch import load_file
    env = dict(os.environ, OMP_NUM_THREADS="1")
    theta0 = str(tmp_path / "theta0")
    with rundir.atomic_path(theta0) as tmp:
        tiny_llama(seed=0).save_pretrained(tmp)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _lora_worker(theta0, one)  # one process: here
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                    "lora_worker", theta0, two], check=True, cwd=HERE, env=env, timeout=300)
    before = load_file(os.path.join(theta0, "model.safetensors"))
    a, b = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    assert a.keys() == b.keys() == before.keys()  # a plain checkpoint
    diff = math.sqrt(sum(((a[k] - b[k]) ** 2).sum().item() for k in a))
    step = math.sqrt(sum(((a[k] - before[k]) ** 2).sum().item() for k in a))
    print(f"[LoRA, 1 vs 2 processes] theta_1: {diff / step:.2g} of the step", flush=True)
    assert step > 0 and diff < 1e-3 * step
    a, b = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-3 * a[k].abs().max().item(), rtol=0)


# ----------------------------------------------------------------------------------------------------
# The small preset (--preset small): a tiny Qwen2.5-0.5B-Instruct, its real chat template and tokenizer settings
# ----------------------------------------------------------------------------------------------------
# Qwen2.5-0.5B-Instruct's tokenizer_config.json "chat_template", verbatim (tool calls included; a conversation
# without a system message gets Qwen's default system turn).
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")


def save_qwen_tokenizer(path):
    """A Qwen2.5-Instruct-like tokenizer into `path`: byte-level BPE (trained on the corpus here) with Qwen's special
    tokens <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos), no BOS, and the real chat template above."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, merges = _trained_bpe(_corpus(), 600, pre_tokenizers.ByteLevel(add_prefix_space=False),
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.save_pretrained(path)
    # as on the hub: Qwen2Tokenizer, bos null, the template inside tokenizer_config.json
    tc_path = os.path.join(path, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
              model_max_length=131072, split_special_tokens=False, errors="replace",
              clean_up_tokenization_spaces=False, chat_template=QWEN_TEMPLATE)
    json.dump(tc, open(tc_path, "w"), indent=2)
    if os.path.exists(os.path.join(path, "chat_template.jinja")):
        os.remove(os.path.join(path, "chat_template.jinja"))


def save_tiny_qwen(path):
    """A tiny Qwen2.5-0.5B-Instruct: Qwen2ForCausalLM (q/k/v biases, GQA, tied embeddings), stored in bf16 as on
    the hub, with its tokenizer (save_qwen_tokenizer) and generation config (eos <|im_end|> and <|endoftext|>)."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    save_qwen_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                      tie_word_embeddings=True, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tok.pad_token_id,
                                               eos_token_id=[tok.eos_token_id, tok.pad_token_id],
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_prompt_and_golden_tokens_follow_qwen_template(tmp_path, system):
    """The small preset's policy format: Qwen2.5-Instruct's template puts its default system turn before x when
    the record has none, and the record's own system message otherwise; no BOS; the golden response is what the
    template puts after the prompt, ending with <|im_end|> (Qwen's eos)."""
    from transformers import AutoTokenizer
    save_qwen_tokenizer(str(tmp_path))
    json.dump({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
              open(tmp_path / "config.json", "w"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_template == QWEN_TEMPLATE and tok.bos_token is None and tok.eos_token == "<|im_end|>"
    x, y = QA[0]
    px, py = dataset.prompt_ids(tok, x, system), dataset.response_ids(tok, x, y, system)
    assert tok.decode(px) == (f"<|im_start|>system\n{system or QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{x}"
                              "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(py) == y + "<|im_end|>" and py[-1] == tok.eos_token_id
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": x}, {"role": "assistant", "content": y}]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert full[:len(px) + len(py)] == px + py  # the conversation's own tokens


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    """The paper path's tiny inputs (GPT-2 guide, DeBERTa RM, UltraChat-like records), with a tiny
    Qwen2.5-0.5B-Instruct as the policy."""
    inputs = build_paper_inputs(str(tmp_path_factory.mktemp("small_inputs")))
    inputs["policy"] = os.path.join(os.path.dirname(inputs["policy"]), "qwen")
    save_tiny_qwen(inputs["policy"])
    return inputs


# The small preset, shrunk to seconds: 8 pairs, T = 2, 1 optimizer step per iteration, no held-out evaluation
# (the paper path's tests score one); the prompts hold Qwen's long default system turn (in this tiny vocabulary
# ~60 tokens).
SMALL_RUN = ["--max_examples", "8", "--max_len", "160", "--max_prompt_len", "128", "--max_new_tokens", "16",
             "--T", "2", "--epochs", "1", "--batch_size", "8", "--micro_batch_size", "4", "--gen_batch_size", "8",
             "--agreement_n", "0", "--eval_data", "", "--lr", "1e-3", "--guide_epochs", "1",
             "--guide_batch_size", "16", "--gen_compile", "false"]


def _small_args(inputs, out, *extra):
    return ["--preset", "small", "--out", out, "--policy", inputs["policy"], "--guide", inputs["guide"],
            "--data", inputs["data"], "--reward_model", inputs["rm"], *SMALL_RUN, *extra]


@pytest.mark.slow
def test_small_preset_with_lora_end_to_end_then_resume(small_inputs, tmp_path):
    """`--preset small --lora_r 4` on a tiny Qwen2 with Qwen2.5-Instruct's tokenizer and template, 1 process:
    every theta_t is a plain Qwen2 checkpoint (fp32, tied embeddings, the same tokenizer and template) with its
    adapters beside, and only the targeted projections moved; the samples' prompts carry Qwen's system turn. A run
    that lost theta_2 resumes from theta_1 (reloaded, adapters drawn again from their seed) to the same bytes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = str(tmp_path / "run")
    log = _paper_run(_small_args(small_inputs, out, "--lora_r", "4"), name="small preset, LoRA r 4")
    assert "preset=small" in log and "[ldalign iter 2]" in log
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["optimizer"] == "rmsprop" and cfg["beta"] == 0.1 and cfg["judge"] == "reward" and cfg["lora_r"] == 4
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["ldalign"]["lora_r"] == 4  # theta_t binds its LoRA settings
    tok = AutoTokenizer.from_pretrained(small_inputs["policy"])
    sample = _read_jsonl(os.path.join(out, "iter0", "samples.jsonl"))[0]
    assert dataset.prompt_text(tok, sample["x"]).startswith("<|im_start|>system\nYou are Qwen")
    prev = load_file(os.path.join(small_inputs["policy"], "model.safetensors"))
    for t in (1, 2):
        pol = os.path.join(out, "ldalign", f"iter{t}", "policy")
        rundir.verify(pol)
        theta = load_file(os.path.join(pol, "model.safetensors"))
        assert theta.keys() == prev.keys() and {v.dtype for v in theta.values()} == {torch.float32}
        moved = {k for k in theta if not torch.equal(theta[k], prev[k].float())}
        assert moved and all(k.split(".")[-2].endswith("_proj") and k.endswith("weight") for k in moved), moved
        acfg = json.load(open(os.path.join(pol, "adapter", "adapter_config.json")))
        assert acfg["r"] == 4 and acfg["base_model_name_or_path"].endswith("policy" if t > 1 else "qwen")
        assert AutoTokenizer.from_pretrained(pol).chat_template == tok.chat_template
        prev = theta
    model = AutoModelForCausalLM.from_pretrained(pol)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    before = open(os.path.join(pol, "model.safetensors"), "rb").read()
    shutil.rmtree(os.path.join(out, "ldalign", "iter2"))
    log = _paper_run(_small_args(small_inputs, out, "--lora_r", "4"), name="small preset, LoRA, resume at 2")
    assert "ldalign iteration 2/2" in log and "ldalign iteration 1/" not in log
    assert open(os.path.join(pol, "model.safetensors"), "rb").read() == before


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "lora_worker":
    _lora_worker(sys.argv[2], sys.argv[3])
