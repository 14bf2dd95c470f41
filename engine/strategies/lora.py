"""LoRA and DoRA: freeze the model and learn small low-rank updates of chosen weight matrices (peft).

LoRA (Hu et al. 2021) adds `B @ A` (rank `strategy.r`, scaled by `alpha / r`) next to each targeted linear
layer, by default the attention query/value projections; a few tenths of a percent of the parameters train
and the run saves only that adapter. Accuracy is usually close to full fine-tuning at a fraction of the
memory: the default pick for anything larger than a small encoder. DoRA (Liu et al. 2024) splits each
targeted weight into a magnitude vector and a direction that LoRA updates; it tends to beat LoRA at the same
rank, especially at low ranks, for somewhat slower steps. For classification the new head trains fully too
(peft `modules_to_save`), since it starts from random weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from peft import LoraConfig, TaskType, get_peft_model
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from engine.architecture import auto_target_modules, output_module_names
from engine.models import new_weights
from engine.strategies.base import Strategy, StrategyError

# Layer types peft's LoRA can wrap (bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear).
_ADAPTABLE_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)


class LoraStrategy(Strategy):
    kind: ClassVar[str] = "lora"
    is_peft: ClassVar[bool] = True
    use_dora: ClassVar[bool] = False

    def prepare(self, model: PreTrainedModel) -> nn.Module:
        return get_peft_model(model, self.lora_config(model))

    def name_base(self, saved: Path, base_id: str) -> None:
        # Written after saving: while saving, peft looks the base model up (on the hub, for a hub id).
        path = saved / ADAPTER_CONFIG
        adapter = json.loads(path.read_text(encoding="utf-8"))
        adapter["base_model_name_or_path"] = base_id
        path.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def lora_config(self, model: PreTrainedModel) -> LoraConfig:
        """The peft LoraConfig for this model, with `auto` targets resolved and list targets checked."""
        classification = self.task == "classification"
        return LoraConfig(
            task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM,
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=self.target_modules(model),
            use_dora=self.use_dora,
            modules_to_save=self.trained_heads(model) if classification else None,
        )

    def trained_heads(self, model: PreTrainedModel) -> list[str]:
        """The output layers that train fully beside the adapters: the task head, which starts from random
        weights, and a pooler only when the checkpoint had none (a pretrained pooler stays frozen, as in peft)."""
        new = new_weights(model)
        return [
            name
            for name in output_module_names(model, self.task)
            if not name.endswith(".pooler") or new is None or any(key.startswith(f"{name}.") for key in new)
        ]

    def target_modules(self, model: PreTrainedModel) -> str | list[str]:
        """`all-linear` as is (peft expands it, leaving out the output layer), `auto` resolved, lists checked."""
        targets = self.config.target_modules
        if targets == "all-linear":
            return targets
        if targets == "auto":
            try:
                return auto_target_modules(model)
            except ValueError as exc:
                raise StrategyError(str(exc)) from None
        adaptable = [name for name, module in model.named_modules() if isinstance(module, _ADAPTABLE_LAYERS)]
        unmatched = [
            target for target in targets if not any(name == target or name.endswith(f".{target}") for name in adaptable)
        ]
        if unmatched:
            examples = ", ".join(list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in adaptable))[:8])
            raise StrategyError(
                f"strategy.target_modules: {', '.join(unmatched)} matches no linear layer of the model; "
                f"it has e.g. {examples} (or use all-linear)"
            )
        return list(targets)


class DoraStrategy(LoraStrategy):
    kind: ClassVar[str] = "dora"
    use_dora: ClassVar[bool] = True
