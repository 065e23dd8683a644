"""Shepherd's local step (Zhang et al. 2023): supervised LoRA instruction tuning with TRL's ``SFTTrainer``.

One call is one client's round: the model arrives with the received global LoRA loaded, is
fine-tuned on the round's Alpaca (instruction, output) pairs with the loss on the output tokens
only (TRL's prompt/completion format), and leaves with the trained LoRA in place. TRL serves a
per-round federated client as it is:

* the model is the process's cached policy with PEFT's LoRA injected (no ``PeftModel`` wrapper);
  the trainer optimises exactly the parameters that require grad (the LoRA) with a fresh AdamW;
* it runs offline on the run's device (``use_cpu`` on a CPU), in bf16 where the run is bf16;
* ``output_dir`` is a temporary folder, removed afterwards (``save_strategy="no"``, no reports);
* the trainer seeds every RNG it uses from ``seed``, inside :func:`pwff_app.device.fork_rng`, so a
  round is deterministic and the worker's global RNG state is left as it was.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pwff_app.device import fork_rng
from pwff_app.instruct.prompts import format_prompt

#: Tokens of prompt + output a supervised example keeps (longer Alpaca outputs are cut at the end).
SFT_MAX_LENGTH = 256


def sft_examples(records: Sequence[Mapping[str, str]], tokenizer: Any) -> list[dict[str, str]]:
    """TRL prompt/completion rows: the policy's prompt (chat template) and the Alpaca output + EOS."""
    eos = tokenizer.eos_token or ""
    return [{"prompt": format_prompt(r["instruction"], r.get("input", ""), tokenizer),
             "completion": r["output"].strip() + eos} for r in records]


def supervised_round(lm: Any, tokenizer: Any, examples: Sequence[Mapping[str, str]], *, epochs: int,
                     batch_size: int, lr: float, seed: int, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Fine-tune ``lm``'s trainable parameters on ``examples`` in place (see the module docstring).

    Returns the mean token cross-entropy (nats per output token) of the first and the last
    optimiser step and over the round: ``loss_first``, ``loss_last``, ``loss_mean``.
    """
    from datasets import Dataset, disable_progress_bars, enable_progress_bars, is_progress_bar_enabled
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    bars = is_progress_bar_enabled()
    disable_progress_bars()  # one client round: no per-map progress bars in the run's log
    try:
        with tempfile.TemporaryDirectory(prefix="pwff-sft-") as out, fork_rng(device):
            args = SFTConfig(
                output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_length=SFT_MAX_LENGTH, completion_only_loss=True, seed=seed, data_seed=seed,
                save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
                use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, fp16=False, dataloader_num_workers=0,
                dataset_num_proc=None, log_level="error")
            trainer = SFTTrainer(model=lm, args=args, train_dataset=Dataset.from_list(list(examples)),
                                 processing_class=tokenizer)
            trainer.remove_callback(PrinterCallback)  # the loss goes into the reply, not stdout
            result = trainer.train()
            # the cached policy serves the next message: no mixed-precision forward wrapper stays on it
            trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
            losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    finally:
        if bars:
            enable_progress_bars()
        lm.eval()
    return {"loss_first": losses[0], "loss_last": losses[-1], "loss_mean": float(result.training_loss)}
