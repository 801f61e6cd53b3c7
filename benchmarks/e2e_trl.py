"""The TRL side of ``benchmarks/e2e.py``: one SFT job with TRL's ``SFTTrainer`` + PEFT LoRA, timed.

    /work/venv-trl/bin/python benchmarks/e2e_trl.py --model M --data train.jsonl --output DIR \\
        --steps 10 --batch-size 4 --max-length 256 --precision fp32 --timings OUT.json [--packing]

Runs in its own virtual environment (TRL pulls transformers 5): it imports nothing from this
project, and torch/TRL/PEFT only after the arguments are parsed (so ``--help`` works anywhere).
``e2e.py`` starts it as a subprocess with the same job as ``lora train``: the prompt/completion
data with the loss on the completion tokens only, LoRA r/alpha on the same modules with dropout 0,
constant learning rate without warmup, AdamW, the same steps, batch, max length and precision.
TRL's own defaults that differ from that job are set explicitly: gradient checkpointing off (TRL
turns it on), bf16 only when asked (TRL turns it on), no evaluation, no checkpoints; the adapter
is saved at the end, as ``lora train`` saves its own.

``--timings`` gets one row per optimizer step: seconds from the process start (``E2E_SPAWN_TIME``,
the launcher's ``time.time()`` when it started this process) to the end of the step, the step's
non-padding tokens, its padded tokens, its target tokens (labels after the shift that are not
-100: what the loss averages over) and its loss, counted from the batch the step trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SPAWN = float(os.environ.get("E2E_SPAWN_TIME", time.time()))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (weights + tokenizer)")
    p.add_argument("--data", required=True, help="prompt/completion JSONL")
    p.add_argument("--output", required=True, help="folder for the adapter")
    p.add_argument("--timings", required=True, help="JSON file for the per-step timings")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sft_config(args):
    """The SFTConfig of the job (every TRL default that would change the job set explicitly)."""
    import torch
    from trl import SFTConfig

    bf16 = args.precision == "bf16"
    return SFTConfig(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
        bf16=bf16, fp16=False, use_cpu=True, gradient_checkpointing=False, max_length=args.max_length,
        packing=args.packing, completion_only_loss=True, logging_steps=args.log_every, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
    )


def counting_trainer(base):
    """``base`` (SFTTrainer) that records each step's tokens and loss from the batch it trains on."""
    import torch

    class Counting(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.step_rows: list[dict] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids, labels = inputs["input_ids"], inputs["labels"]
            mask = inputs.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int(ids.numel())  # padding-free: no padding at all
            targets = int((labels[..., 1:] != -100).sum())
            loss = super().training_step(model, inputs, num_items_in_batch)
            with torch.no_grad():
                value = float(loss.float().item())
            self.step_rows.append({"tokens": real, "padded_tokens": int(ids.numel()), "targets": targets,
                                   "loss": value, "shape": list(ids.shape)})
            return loss

    return Counting


def step_clock():
    """A TrainerCallback writing the end time of every optimizer step (seconds since the spawn)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.time() - SPAWN)

    return Clock()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate")}


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    data = load_dataset("json", data_files=args.data, split="train")
    peft = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=args.targets.split(","),
                      bias="none", task_type="CAUSAL_LM")
    clock = step_clock()
    trainer = counting_trainer(SFTTrainer)(model=args.model, args=sft_config(args), train_dataset=data,
                                           peft_config=peft, callbacks=[clock])
    out = trainer.train()
    trainer.save_model(args.output)
    rows = [dict(r, step=i + 1, t=t) for i, (r, t) in enumerate(zip(trainer.step_rows, clock.ends))]
    result = {"steps": rows, "versions": versions(), "torch_threads": torch.get_num_threads(),
              "train_runtime_s": out.metrics.get("train_runtime"), "train_loss_trl": out.metrics.get("train_loss"),
              "num_tokens_trl": trainer._total_train_tokens, "train_rows": len(trainer.train_dataset),
              "padding_free": bool(trainer.padding_free), "optim": str(trainer.args.optim),
              "activation_checkpointing": bool(getattr(trainer.args, "activation_checkpointing",
                                                       trainer.args.gradient_checkpointing)),
              "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
              "model_dtype": str(next(trainer.model.parameters()).dtype), "exit_s": time.time() - SPAWN}
    with open(args.timings, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
