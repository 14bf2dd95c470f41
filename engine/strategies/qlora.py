"""QLoRA (Dettmers et al. 2023): LoRA adapters trained on top of a base model frozen in 4-bit (bitsandbytes).

The base weights load as 4-bit NF4 (or FP4), optionally with double quantisation of the scaling constants,
and are dequantised block by block in the compute dtype for each matmul; only the LoRA adapters (and a
classification head, kept unquantised) train in full precision. Memory for the weights drops about 4x
against fp16, usually for a small accuracy cost against LoRA. Pick it when a model does not fit for LoRA;
on a CPU it saves memory but not time.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import torch
from peft import prepare_model_for_kbit_training
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.utils import is_bitsandbytes_available

from engine.strategies.base import StrategyError
from engine.strategies.lora import LoraStrategy

# Layers of classification models that must stay unquantised: they are new and train fully. Naming any
# module replaces transformers' own skip list, which keeps only the last weight (and lm_head) unquantised.
_UNQUANTISED_CLASSIFICATION_LAYERS = ["pooler.dense", "pre_classifier", "classifier", "score"]


def require_bitsandbytes(*, on_cuda: bool) -> None:
    """Raise StrategyError unless bitsandbytes imports and supports the device the model will train on."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise StrategyError("strategy.kind: qlora needs bitsandbytes (pip install bitsandbytes) or use lora")
    try:
        import bitsandbytes
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StrategyError(f"strategy.kind: qlora cannot use bitsandbytes ({reason}); use lora") from None
    if not is_bitsandbytes_available():
        raise StrategyError(
            f"strategy.kind: qlora needs a newer bitsandbytes than {bitsandbytes.__version__} "
            "(pip install -U bitsandbytes) or use lora"
        )
    device = "cuda" if on_cuda else "cpu"
    if device not in getattr(bitsandbytes, "supported_torch_devices", ()):
        raise StrategyError(f"strategy.kind: qlora: this bitsandbytes build does not support {device}; use lora")


class QloraStrategy(LoraStrategy):
    kind: ClassVar[str] = "qlora"

    def quantization_config(self, *, on_cuda: bool) -> Any | None:
        require_bitsandbytes(on_cuda=on_cuda)
        # bf16 compute only where the GPU has fast bf16; on a CPU bf16 matmuls are far slower than fp32.
        compute_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.config.quant_type,
            bnb_4bit_use_double_quant=self.config.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=_UNQUANTISED_CLASSIFICATION_LAYERS if self.task == "classification" else None,
        )

    def prepare_meta(self, model: PreTrainedModel) -> nn.Module:
        """Adapters on the unquantised meta model: peft counts a 4-bit base exactly as the unquantised one. The
        weights that stay unquantised are fp32, as `prepare_model_for_kbit_training` casts them."""
        return super().prepare(model.float())

    def prepare(self, model: PreTrainedModel) -> nn.Module:
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ValueError("qlora: load the model with this strategy's quantization_config() before prepare()")
        # Activation checkpointing is left to the Trainer (train.gradient_checkpointing), non-reentrant there.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().prepare(model)
