#!/usr/bin/env bash
# LD-Align recipes (Algorithm 1 of arXiv 2404.06390), launched with torchrun.
#
#   bash train.sh                 # preset "tiny" (default): toy sorting task, CPU or GPU (README: its time)
#   bash train.sh paper           # the paper's setting on 8 GPUs (docs/reproduce.md, "The paper's setting")
#   bash train.sh paper-baselines # then Table 1's other rows on the same --out: SPIN, DPO, continual SFT as the
#                                 # paper ran them (docs/reproduce.md, "Table 1's rows")
#   bash train.sh small           # one 24 GB GPU: Qwen2.5-0.5B-Instruct, 2,000 UltraChat records
#                                 # (docs/reproduce.md, "One GPU")
#   NPROC=1 bash train.sh paper --lora_r 64 --lora_base_dtype bfloat16 --lr 5e-6 --micro_batch_size 16 \
#     --gen_batch_size 256 --save_steps 1 --out runs/paper_lora
#                                 # the paper's 7B with LoRA on one 80 GB GPU (docs/reproduce.md, "One GPU")
#   bash train.sh compare         # the toy task with ldalign, spin, dpo and sft at equal budget
#   bash train.sh eval runs/paper  # the paper's Table 1 (lm-evaluation-harness) for every policy of a run folder
#   bash train.sh seeds           # the compare run for SEEDS seeds (default 5): means with 95% intervals
#   NPROC=2 bash train.sh tiny    # the toy run on 2 processes (FSDP2 over gloo on CPU)
#   bash train.sh paper --T 2 --out runs/paper2    # extra --key value pairs are passed to ldalign.py
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash train.sh paper --out /shared/runs/paper
#                                 # on each of 2 nodes (NODE_RANK 1 on the other; docs/reproduce.md, "Several nodes")
#
# A rerun with the same --out resumes after the last finished stage. DRY_RUN=1 prints each torchrun command instead
# of running it.
set -euo pipefail
cd "$(dirname "$0")"
PRESET="${1:-tiny}"
shift || true

# How torchrun's processes find each other. One node: --standalone (a free port on this host). Several: the
# variables that are set among NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT, the same on every node but
# NODE_RANK (0 .. NNODES-1); or RDZV_ENDPOINT=host:port (torchrun's c10d rendezvous: no NODE_RANK, the nodes
# may start in any order; RDZV_ID names the job). Every node needs --out on a filesystem that all of them see.
RENDEZVOUS=(--standalone)
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  RENDEZVOUS=(--nnodes="${NNODES:-1}" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT"
              --rdzv_id="${RDZV_ID:-ldalign}")
elif [ -n "${NNODES:-}${NODE_RANK:-}${MASTER_ADDR:-}${MASTER_PORT:-}" ]; then
  if [ "${NNODES:-1}" != 1 ] && { [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; }; then
    echo "NNODES=$NNODES needs NODE_RANK (0 .. $((NNODES - 1)), one per node) and MASTER_ADDR (node 0's" \
         "address) on every node, or RDZV_ENDPOINT=host:port" >&2
    exit 2
  fi
  # each one that is set, as torchrun's option of the same name (NODE_RANK -> --node_rank)
  RENDEZVOUS=()
  for v in NNODES NODE_RANK MASTER_ADDR MASTER_PORT; do
    if [ -n "${!v:-}" ]; then
      RENDEZVOUS+=("--${v,,}=${!v}")
    fi
  done
fi

# torchrun ldalign.py "$@", NPROC processes per node, one per GPU (or per CPU worker); the script itself calls
# fully_shard when WORLD_SIZE > 1. The settings are checked first in one process (ldalign.parse_args, at the world
# size torchrun will give): a bad option is ldalign.py's one line "error: ...", exit status 2, and torchrun never
# starts. A mistake met once it runs (in the input, say), a NaN stop or a full disk (exit status 2) and ctrl-C
# (130) are one line too, printed last, after torchrun's own failure report, by the node of global rank 0.
launch() {
  local err status=0 world=1
  if [ -n "${DRY_RUN:-}" ]; then
    echo "torchrun ${RENDEZVOUS[*]} --nproc_per_node=$NPROC ldalign.py $(printf '%q ' "$@")"
    return 0
  fi
  # (NPROC gpu / auto, or NNODES MIN:MAX of an elastic rendezvous: a world size known only to torchrun, whose run
  # checks the batch sizes against it)
  case "$NPROC:${NNODES:-1}" in *[!0-9:]*|*::*|*:*:*) ;; *) world=$((NPROC * ${NNODES:-1})) ;; esac
  WORLD_SIZE="$world" python -c 'import sys, ldalign; from run import cli
cli.report_errors(ldalign.parse_args, sys.argv[1:])' "$@" || exit
  for a in "$@"; do
    if [ "$a" = -h ] || [ "$a" = --help ]; then exit 0; fi  # (printed by the check)
  done
  err="$(mktemp)"
  LDALIGN_ERROR_FILE="$err" torchrun "${RENDEZVOUS[@]}" --nproc_per_node="$NPROC" ldalign.py "$@" || status=$?
  if [ -s "$err" ]; then
    cat "$err" >&2
    case "$(cat "$err")" in interrupted*) status=130 ;; *) status=2 ;; esac
  fi
  rm -f "$err"
  return "$status"
}

case "$PRESET" in
  tiny)
    NPROC="${NPROC:-1}"
    ARGS=(--preset tiny --out "runs/tiny")
    ;;
  compare)
    # The paper's table rows on the toy task: one theta_0 and one guide, then each method for T iterations of
    # the same number of optimizer steps; writes runs/compare/comparison.md.
    NPROC="${NPROC:-1}"
    ARGS=(--preset tiny --out "runs/compare" --method "ldalign,spin,dpo,sft")
    ;;
  eval)
    # lm-evaluation-harness on theta_0 and every theta_t of the run folder: RUN/table1.md (tools/harness.py)
    exec python tools/harness.py "${1:-runs/paper}" "${@:2}"
    ;;
  seeds)
    # Seed s is a whole run of its own (theta_0, samples, guide, updates: every stage seeded by --seed s); then
    # analysis.py reports, per method and iteration, the mean held-out exact match with a 95% interval over seeds,
    # and the differences paired by seed: each method - theta_0, ldalign - spin (runs/seeds/seeds.md).
    # OUT=runs/other FIRST_SEED=1 bash train.sh seeds --key value ...: the same study at other settings, in its own
    # folder, over seeds FIRST_SEED .. FIRST_SEED + SEEDS - 1.
    NPROC="${NPROC:-1}"
    OUT="${OUT:-runs/seeds}"
    FIRST_SEED="${FIRST_SEED:-0}"
    for s in $(seq "$FIRST_SEED" $(( FIRST_SEED + ${SEEDS:-5} - 1 ))); do
      launch --preset tiny --out "$OUT/seed$s" --seed "$s" --method "ldalign,spin,dpo,sft" "$@"
    done
    exec python analysis.py seeds "$OUT"
    ;;
  paper|paper-baselines)
    # zephyr-7b-sft-full (Mistral-7B SFT on UltraChat 200k) is theta_0, gpt2 the guide's backbone, a 50k
    # subset of UltraChat 200k (first turns, JSONL with "messages") is D; three iterations; beta 0.1 and the
    # rest of the update as SPIN's recipe (README, "The paper's setting, and where each value comes from").
    # POLICY / GUIDE / REWARD_MODEL may be local HF checkpoint folders (no internet: download them beforehand).
    NPROC="${NPROC:-8}"
    ARGS=(--preset paper --out "runs/paper"
          --policy "${POLICY:-alignment-handbook/zephyr-7b-sft-full}"
          --guide "${GUIDE:-gpt2}"
          --data "${DATA:-data/ultrachat_50k.jsonl}"
          --reward_model "${REWARD_MODEL:-OpenAssistant/reward-model-deberta-v3-large-v2}")
    if [ "$PRESET" = paper-baselines ]; then
      # Section 5.1.4's competing methods, one call each on the run folder of `bash train.sh paper` (its theta_0,
      # samples of theta_0 and guide are reused; each method binds its own settings). Every other setting is the
      # preset's: RMSprop, warmup 0.1 then linear decay, 2 epochs, global batch 64, max length 1024 / prompt 512.
      #
      # SPIN as its repository (uclaml/SPIN) runs it; its iteration k is our t = k + 1.
      #   pairs: --spin_keep_previous (the preset's): iteration t trains on the pairs of t-1 and t, "50k at
      #     iteration 0 and 100k at iteration 1, 2 and 3" (SPIN's paper p. 9, quoted in uclaml/SPIN issue #11;
      #     configs/config_iter1.yaml:9-10, config_iter2.yaml:11-12, config_iter3.yaml:13-14; README.md:203),
      #     shuffled together (spin/alignment/data.py:132); the reference is the iteration's starting model
      #     (spin/run_spin.py:139-141), theta_{t-1}
      #   lr: 5e-7 (configs/config.yaml:23), 5e-7 (config_iter1.yaml:25), 1e-7 (scripts/finetune_iter2.sh:21),
      #     1e-7 (finetune_iter3.sh:21); beta: 0.1 (config.yaml:16, config_iter1.yaml:18, finetune_iter2.sh:21),
      #     then 5.0 (finetune_iter3.sh:21). Four values each: SPIN_T=4 runs SPIN's fourth iteration too.
      #   batch 8 per GPU x 8 processes x 1 accumulation = 64 (config.yaml:32, 20; finetune.sh:21); RMSprop,
      #     linear, warmup 0.1 (config.yaml:30, 26, 38); max_length 1024, max_prompt_length 512 (config.yaml:27-28)
      #   epochs: 2 per iteration (SPIN's paper p. 9, issue #11); the scripts pass --num_train_epochs=6 with a
      #     checkpoint per epoch (finetune*.sh:21, config.yaml:35) and do not say which checkpoint the paper used
      #   sampling: 256 new tokens, temperature 1.0, top_p 1.0 (spin/generate_vllm.py:46); spin/generate.py:95
      #     decodes with the checkpoint's own generation defaults, which the repository does not state
      #   SPIN generates from "### Instruction: x\n\n### Response: " (generate.py:80) and trains on the chat
      #     template (run_spin.py:47-51); here both use the chat template (dataset.prompt_ids)
      launch "${ARGS[@]}" --method spin --T "${SPIN_T:-3}" --lr_per_iter 5e-7,5e-7,1e-7,1e-7 \
        --beta_per_iter 0.1,0.1,0.1,5.0 "$@"
      # DPO (Section 5.1.4): UltraFeedback binarized, lr 2e-7, beta 0.1, 2 epochs, global batch 64. One training
      # of 2 epochs from theta_0: iteration 1 (T 1), whose reference is theta_0.
      launch "${ARGS[@]}" --method dpo --T 1 --lr 2e-7 --beta 0.1 \
        --pref_data "${PREF_DATA:-data/ultrafeedback_binarized.jsonl}" "$@"
      # Continual SFT (Section 5.1.4): all of UltraChat 200k (Section 5.1.1: the full set, not the 50k subset),
      # lr 1e-5, 2 epochs, global batch 64: iteration 1 (T 1). The preset's --sft_data "" is all of --data;
      # SFT_DATA names another file. The paper names no optimizer: the preset's RMSprop.
      SFT=()
      if [ -n "${SFT_DATA:-}" ]; then
        SFT=(--sft_data "$SFT_DATA")
      fi
      launch "${ARGS[@]}" --method sft --T 1 --lr 1e-5 "${SFT[@]}" "$@"
      exit
    fi
    ;;
  small)
    # One GPU: Qwen2.5-0.5B-Instruct is theta_0 (fully fine-tuned; --lora_r 16 for LoRA), gpt2 the guide's
    # backbone, the first 2,000 records of UltraChat 200k (train_sft) D. Then a few of Table 1's tasks:
    #   bash train.sh eval runs/small --tasks TruthfulQA,PIQA,ARC
    NPROC="${NPROC:-1}"
    ARGS=(--preset small --out "runs/small"
          --policy "${POLICY:-Qwen/Qwen2.5-0.5B-Instruct}"
          --guide "${GUIDE:-gpt2}"
          --data "${DATA:-data/ultrachat_50k.jsonl}"
          --reward_model "${REWARD_MODEL:-OpenAssistant/reward-model-deberta-v3-large-v2}")
    ;;
  *)
    echo "unknown preset '$PRESET': use tiny, compare, seeds, eval, paper, paper-baselines or small" >&2
    exit 2
    ;;
esac

launch "${ARGS[@]}" "$@"
