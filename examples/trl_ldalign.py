"""LD-Align's update (Algorithm 1, line 10; Eq. 4) in TRL: DPOTrainer, each pair's loss times s_i/S.

Lines 1-9 run in this project, which writes each iteration's pairs and weights in TRL's preference
format (<method>/iter{t}/pairs.trl.jsonl); line 10 runs here: theta_t trained from theta_{t-1},
which is also the frozen reference. Iteration 1 of the toy run (theta_0 is runs/tiny/sft):

    python ldalign.py --out runs/tiny
    python examples/trl_ldalign.py runs/tiny/ldalign/iter1/pairs.trl.jsonl runs/tiny/sft runs/trl1

Tested with TRL 1.16.0 (transformers 5.25, torch 2.14, datasets 5.2): tests/test_trl.py checks the
loss against dpo.ldalign_loss, an optimizer step against dpo.dpo_train, and unit weights against
TRL's own DPO loss. docs/trl.md says what differs from this project's update and why each setting
below is set. Self-contained: LDAlignDPOTrainer can be copied into any TRL pipeline.
"""
import argparse
import os

import torch
import torch.nn.functional as F
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer


class LDAlignDPOTrainer(DPOTrainer):
    """TRL's sigmoid DPO loss, each pair's term times its `weight` before the mean (Eq. 4):
        mean_i -w_i log sigma(beta ((log p(y) - log p_ref(y)) - (log p(y') - log p_ref(y'))))
    All weights 1: TRL's DPO loss (SPIN). ref_model=None: the reference is a frozen copy of the
    model the trainer starts from, theta_{t-1} (Algorithm 1, line 10)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        options = (self.loss_types, self.f_divergence_type, self.ld_alpha, self.use_weighting,
                   self.aux_loss_enabled)
        if options != (["sigmoid"], "reverse_kl", None, False, False):
            raise ValueError("Eq. 4 weighs TRL's sigmoid loss: keep DPOConfig's loss defaults")
        if self.args.disable_dropout:  # TRL zeroes nn.Dropout; Llama-style attention has a float
            for m in self.model.modules():
                if isinstance(getattr(m, "attention_dropout", None), float):
                    m.attention_dropout = 0.0
        # TRL's collator makes a batch of the token ids alone: each pair's weight joins it, (B,)
        collate = self.data_collator
        self.data_collator = lambda rows: {**collate(rows),
                                           "weight": torch.tensor([r["weight"] for r in rows])}

    def _set_signature_columns_if_needed(self):
        # The columns that remove_unused_columns keeps: TRL's ids and ref log-probs, and the weight
        super()._set_signature_columns_if_needed()
        if "weight" not in self._signature_columns:
            self._signature_columns.append("weight")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # pairs.trl.jsonl has the ids this project trained on, under TRL's column names
        # (prompt_ids, chosen_ids, rejected_ids): used as they are. Without them TRL tokenizes.
        if "rejected_ids" in (getattr(dataset, "column_names", None) or []):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        w = inputs.pop("weight")  # (B,) s_i / S: constants of the update (the guide is frozen)
        # log p_theta of the B chosen, then the B rejected sequences, summed over the completion
        # tokens (Eq. 1), through TRL's fused LM head as DPOTrainer does (no (2B, L, V) logits)
        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    use_cache=False, labels=labels, fused_lm_head=True)
        chosen, rejected = out.log_probs[:, -(mask.size(1) - 1):].sum(dim=1).chunk(2)  # (B,) each
        if self.precompute_ref_logps:  # precompute_ref_log_probs=True: scored before the update
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # on the fly, by the frozen theta_{t-1} (PEFT: the model without its new adapter)
            ref = self.ref_model if self.ref_model is not None else self.model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(ref, inputs)
        # (B,) TRL's sigmoid loss, its terms in TRL's order
        chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
        losses = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios))
        loss = (w * losses).mean()  # Eq. 4: each pair's term times s_i / S, then the batch mean
        # TRL's reward metrics (averaged over the steps of each log line), and the mean weight
        metrics = self._metrics["train" if self.model.training else "eval"]
        rc, rr = self.beta * chosen_logratios.detach(), self.beta * rejected_logratios.detach()
        for name, v in (("rewards/chosen", rc), ("rewards/rejected", rr), ("weight", w),
                        ("rewards/margins", rc - rr), ("rewards/accuracies", (rc > rr).float())):
            metrics[name].append(self.accelerator.gather(v).mean().item())
        return (loss, out) if return_outputs else loss

    def create_scheduler(self, num_training_steps, optimizer=None):
        # lr_scheduler_type "linear" as this project has it (dpo.lr_at): a warmup of
        # max(1, int(ratio * n)) steps whose first step has lr / warmup (HF's first has lr 0),
        # then linear decay to 0. warmup_steps < 1 is the ratio. Other types: TRL's own.
        if self.lr_scheduler is not None or self.args.lr_scheduler_type != "linear":
            return super().create_scheduler(num_training_steps, optimizer)
        n, r = num_training_steps, self.args.warmup_steps
        k = int(r) if r >= 1 else max(1, int(r * n))
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer or self.optimizer,
            lambda s: (s + 1) / k if s < k else max(0.0, (n - s) / max(1, n - k)))
        return self.lr_scheduler


def main():
    p = argparse.ArgumentParser(description="Algorithm 1, line 10 in TRL: theta_t from "
                                "theta_{t-1} on one iteration's pairs.trl.jsonl. The defaults are "
                                "ldalign.py's (the paper preset: --optimizer rmsprop --lr 5e-7 "
                                "--batch_size 64 --micro_batch_size 8 --grad_ckpt on 8 GPUs)")
    p.add_argument("pairs", help="an iteration's <method>/iter{t}/pairs.trl.jsonl")
    p.add_argument("theta_prev", help="theta_{t-1}'s folder: trained, and (frozen) the reference")
    p.add_argument("out", help="theta_t's folder")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--optimizer", choices=["adamw", "rmsprop"], default="adamw")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32, help="pairs per step, all processes")
    p.add_argument("--micro_batch_size", type=int, default=32, help="pairs per forward, each")
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes (torchrun, accelerate launch)
    config = DPOConfig(
        output_dir=a.out, learning_rate=a.lr, beta=a.beta, num_train_epochs=a.epochs,
        per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=max(1, a.batch_size // (a.micro_batch_size * world)),
        optim={"adamw": "adamw_torch", "rmsprop": "rmsprop"}[a.optimizer], weight_decay=0.0,
        max_grad_norm=a.max_grad_norm, lr_scheduler_type="linear", warmup_steps=a.warmup_ratio,
        max_length=None,  # no truncation: ldalign.py checked every length (--max_len)
        precompute_ref_log_probs=True,  # p_ref scored once before the update, as here
        bf16=torch.cuda.is_available(),  # as here: bf16 autocast on GPUs, fp32 on the CPU
        gradient_checkpointing=a.grad_ckpt, seed=a.seed, logging_steps=10, save_strategy="no",
        report_to="none")
    tokenizer = AutoTokenizer.from_pretrained(a.theta_prev)
    pairs = load_dataset("json", data_files=a.pairs, split="train")
    trainer = LDAlignDPOTrainer(model=a.theta_prev, args=config, train_dataset=pairs,
                                processing_class=tokenizer)
    trainer.train()
    trainer.save_model(a.out)  # theta_t (safetensors) and its tokenizer


if __name__ == "__main__":
    main()
