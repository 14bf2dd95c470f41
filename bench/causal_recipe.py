"""The seed's causal recipe, written by hand with what is installed: what `bench/causal.py` measures finetui against.

nestor-sun/llm `demo/fine-tune.py` trains with TRL's `SFTTrainer` on a text field: `max_seq_length=512`, each batch
padded to its longest row, loss on every token, LoRA r=64 / alpha 16 / dropout 0.1 on peft's default targets
(q_proj, v_proj), batch 4 x gradient accumulation 4, lr 2e-4, and a 4-bit NF4 base (`BitsAndBytesConfig`, no
double quantisation) prepared with `prepare_model_for_kbit_training`. TRL is not installed here, so this is the
same thing on the plain HF Trainer: texts tokenised with the eos appended (as SFTTrainer does today) and cut at
512, `DataCollatorForLanguageModeling(mlm=False)` padding per batch, the Trainer's random order (no length
grouping), its default AdamW, linear schedule and gradient clipping. The pad token is the eos token (the recipe's
`tokenizer.pad_token = tokenizer.eos_token`), so labels come from the attention mask, not from the pad id, or the
appended eos would drop out of the loss.

On a CPU it trains in fp32 (4-bit compute dtype fp32: bf16 matmuls are ~300x slower here); on a GPU in bf16.
Validation: the same token ids and labels as finetui's `data.template = "none"` (text + eos, loss on every token),
evaluated by the Trainer with the same batch size, so that both sides report the same quantity.

`--group-by-length` swaps the random order for the Trainer's length-grouped one (finetui's order): a control that
tells what the order alone does to the validation loss of a short run.

Run by `bench/causal.py` (one JSON object on stdout); not a test and not part of the package.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

MAX_SEQ_LENGTH = 512
LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "bias": "none", "task_type": "CAUSAL_LM"}
BATCH, GRAD_ACCUM, LR = 4, 4, 2e-4


class Timeline(TrainerCallback):
    """Wall-clock time of the training start and of every optimizer step's end."""

    def __init__(self) -> None:
        self.train_begin = 0.0
        self.steps: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.train_begin = time.time()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.steps.append(time.time())


class LabelsFromMask(DataCollatorForLanguageModeling):
    """`DataCollatorForLanguageModeling` with the labels of every real token, eos included (pad is eos here).

    It also counts the real and the padded tokens of the batches it builds.
    """

    real_tokens = 0
    padded_tokens = 0

    def torch_call(self, examples: list[Any]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        self.real_tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["input_ids"].numel()
        return batch


def read_texts(path: str) -> list[str]:
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8").read().split("\n") if line.strip()]


def tokenise(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Dataset:
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return Dataset.from_dict({"input_ids": [[*row, tokenizer.eos_token_id][:MAX_SEQ_LENGTH] for row in ids]})


def load_model(model_dir: str, strategy: str, *, cuda: bool) -> nn.Module:
    """The recipe's model: LoRA on peft's default targets, on an fp32 (CPU) or bf16 (GPU) base or a 4-bit one."""
    compute = torch.bfloat16 if cuda else torch.float32
    if strategy == "qlora":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        device_map = {"": 0} if cuda else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=quantization, device_map=device_map, dtype=compute
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(**LORA))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--train", required=True, help="JSON lines with a text field")
    parser.add_argument("--validation", required=True)
    parser.add_argument("--strategy", required=True, choices=["lora", "qlora"])
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--group-by-length", action="store_true", help="the Trainer's length-grouped order (a control, not the recipe)"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.eos_token
    train = tokenise(tokenizer, read_texts(args.train))
    validation = tokenise(tokenizer, read_texts(args.validation))
    model = load_model(args.model, args.strategy, cuda=cuda)
    timeline = Timeline()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=GRAD_ACCUM,
        per_device_eval_batch_size=2 * BATCH,
        learning_rate=LR,
        max_steps=args.max_steps,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=cuda,
        use_cpu=not cuda,
        seed=args.seed,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
    )
    collator = LabelsFromMask(tokenizer, mlm=False)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, data_collator=collator, callbacks=[timeline]
    )
    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    output = trainer.train()
    real_tokens, padded_tokens = collator.real_tokens, collator.padded_tokens
    metrics = trainer.evaluate(validation)
    result = {
        "train_begin": timeline.train_begin,
        "train_s": timeline.steps[-1] - timeline.train_begin,
        "steps": len(timeline.steps),
        "examples": args.max_steps * BATCH * GRAD_ACCUM,
        "real_tokens": real_tokens,
        "padded_tokens": padded_tokens,
        "validation_loss": metrics["eval_loss"],
        "train_loss": output.metrics["train_loss"],
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
