"""Load a Hugging Face model and tokenizer for a training task, and set it up for full, LoRA or LoRA-FA training.

The task picks the model class: a sequence-classification head for classification/regression (`num_labels` from
the data), a causal LM for sft/clm, an encoder–decoder LM for seq2seq. `model` may be a Hugging Face id, a local
folder or `asset:NAME` (`lorafa.assets`).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from torch import nn

from lorafa.assets import resolve
from lorafa.config import LoRAFAConfig
from lorafa.data_files import max_token, offline_hint, one_line, parse_hub_id, token_lengths
from lorafa.heads import NEW_KEYS_ATTR, classification_head_names, new_module_names
from lorafa.inject import add_lorafa

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

logger = logging.getLogger(__name__)


def model_path(model: str) -> str:
    """`model` as `from_pretrained` takes it: a local folder (an `asset:NAME` resolved) or a Hub model id.

    Raises:
        FileNotFoundError: no such local folder, and `model` is not shaped like a Hub id (`NAME` or `OWNER/NAME`;
            a path such as `./x`, `a/b/c`, or `runs/x` where `runs/` exists here is local), so a mistyped path
            never waits on the network.
    """
    path = resolve(model)
    local = Path(path).expanduser()
    if local.exists():
        return str(local)
    hub = parse_hub_id(path)
    if (
        hub is None
        or hub[1] is not None
        or hub[2] is not None
        or ("/" in path and Path(path.split("/")[0]).is_dir())
    ):
        raise FileNotFoundError(f"model: no such folder: {path}")
    return path


# Encoders whose position ids count from padding_idx + 1 (RoBERTa's scheme): two of their positions are unusable.
_PADDING_OFFSET_POSITIONS = (
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "roberta-prelayernorm",
    "camembert",
    "mpnet",
    "longformer",
    "data2vec-text",
)


def position_limit(config: Any) -> int | None:
    """The longest sequence the config's learned or fixed positions allow (None: no such limit, e.g. T5)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not limit:
        return None
    if config.model_type in _PADDING_OFFSET_POSITIONS:
        return int(limit) - 2  # RoBERTa's positions start after the padding index
    return int(limit)


_TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_remote_code", default=False)


@contextmanager
def remote_code(trusted: bool) -> Iterator[None]:
    """Inside, `from_pretrained` (tokenizer, config, model) runs a checkpoint's own modeling code when `trusted`
    (transformers' trust_remote_code: only for checkpoints whose code you have read)."""
    token = _TRUST_REMOTE_CODE.set(trusted)
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def remote_code_trusted() -> bool:
    """Whether the enclosing `remote_code` trusts checkpoints' own code."""
    return _TRUST_REMOTE_CODE.get()


def from_pretrained(loader: Any, model: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(model_path(model), **kwargs)`, with a Hub failure as one line naming the model;
    `trust_remote_code` as `remote_code` sets it."""
    path = model_path(model)
    # Always explicit: without it transformers asks on the terminal (and waits) before running a checkpoint's code.
    kwargs.setdefault("trust_remote_code", _TRUST_REMOTE_CODE.get())
    try:
        return loader.from_pretrained(path, **kwargs)
    # transformers' "not a local folder and not on the Hub", offline and "no weights" errors are OSErrors
    except OSError as e:
        offline = "" if Path(path).expanduser().exists() else offline_hint()
        raise FileNotFoundError(f"model {model!r}: {one_line(e)}{offline}") from e
    except ValueError as e:
        if "trust_remote_code" not in str(e) or kwargs["trust_remote_code"]:
            raise
        raise ValueError(
            f"model {model!r} comes with its own code (auto_map in its config); set trust_remote_code: true "
            "(lorafa eval/merge/generate: --trust-remote-code) after reading that code"
        ) from None
    except SafetensorError as e:  # a truncated or corrupt weights file
        raise ValueError(f"model {model!r}: its weights file cannot be read ({one_line(e)})") from e


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Inside, transformers logs errors only: e.g. its report of a head the checkpoint lacks, when an adapter about
    to be loaded provides it."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# Files a tokenizer is loaded from (fast, sentencepiece, WordPiece, BPE); a folder with none of them has none.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "*.model", "vocab.txt", "vocab.json", "merges.txt")


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer; a pad token is borrowed from EOS (LLaMA, GPT-2), else from UNK, when it has none
    (padding is masked: its id only has to exist)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = from_pretrained(AutoTokenizer, model)
    except ValueError as e:  # transformers' "Couldn't instantiate the backend tokenizer", custom code, ...
        folder = Path(model_path(model)).expanduser()
        if not folder.is_dir():
            raise
        if any(next(folder.glob(pattern), None) is not None for pattern in _TOKENIZER_FILES):
            raise ValueError(f"model {model!r}: its tokenizer cannot be loaded: {one_line(e)}") from e
        raise ValueError(f"model {model!r}: {folder} holds no tokenizer{_not_a_base_model(folder)}") from e
    if tokenizer.pad_token is None:
        borrowed = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if borrowed is not None:
            tokenizer.pad_token = borrowed
    return tokenizer


def _not_a_base_model(folder: Path) -> str:
    """Why a folder given as `model` is not a model: a lorafa run or adapter folder (what to do instead), or empty."""
    if (folder / "config.yaml").is_file() and (folder / "adapter").is_dir():
        what = "a lorafa run folder"
    elif (folder / "adapter_config.json").is_file():
        what = "an adapter folder"
    elif not any(folder.iterdir()):
        return " (the folder is empty)"
    else:
        return ""
    return (
        f": it is {what}; use it with `lorafa eval/merge/generate {folder}`, or set model= to the base model it was "
        "trained on"
    )


def load_model(
    model: str,
    task: str,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    dtype: str = "float32",
    pad_token_id: int | None = None,
) -> nn.Module:
    """A pretrained model with the head `task` needs.

    The names of the parameters the checkpoint did not provide (a new task head) are kept in
    `model.lorafa_new_keys`, so that `prepare_model` trains and saves them (`lorafa.heads`).

    Args:
        model: Hugging Face id, local folder or `asset:NAME`.
        task: classification | regression | sft | clm | seq2seq.
        num_labels: Classes for classification (1 is used for regression).
        id2label: Class names by id, stored in the model config.
        dtype: float32 | bfloat16 | float16.
        pad_token_id: Set on the config when it has none (sequence classification with decoder models needs it
            to find each sequence's last token).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "output_loading_info": True}
    if task in ("classification", "regression"):
        kwargs["num_labels"] = 1 if task == "regression" else num_labels
        if task == "regression":
            kwargs["problem_type"] = "regression"
        elif id2label is not None:
            kwargs["id2label"] = {int(i): str(n) for i, n in id2label.items()}
            kwargs["label2id"] = {str(n): int(i) for i, n in id2label.items()}
        # A checkpoint that already has a head for another label set gets a fresh head of the right size.
        kwargs["ignore_mismatched_sizes"] = True
        auto: Any = AutoModelForSequenceClassification
    elif task in ("sft", "clm"):
        auto = AutoModelForCausalLM
    elif task == "seq2seq":
        auto = AutoModelForSeq2SeqLM
    else:
        raise ValueError(f"task must be classification, regression, sft, clm or seq2seq, got {task!r}")
    try:
        loaded, info = from_pretrained(auto, model, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        # transformers lists ~40 model classes; say which task fits this model instead.
        raise ValueError(
            f"task {task}: transformers cannot load {model!r} as {auto.__name__} "
            f"({one_line(e, 100, with_type=False)}); decoder-only models take task sft or clm, encoder-decoder "
            "models seq2seq, encoders classification or regression"
        ) from None
    # transformers reports mismatched keys as (name, checkpoint shape, model shape).
    new = set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]}
    setattr(loaded, NEW_KEYS_ATTR, sorted(new))
    own = getattr(loaded.config, "pad_token_id", None)
    # A decoder classifier pools the last token that is not config.pad_token_id: it must be the id the batches
    # are padded with, or it pools padding (huggyllama/open_llama configs say 0, their tokenizers have no pad).
    pools = task in ("classification", "regression")
    if pad_token_id is not None and own != pad_token_id and (own is None or pools):
        if own is not None:
            logger.warning("%s: config.pad_token_id %s is not the tokenizer's pad id %s, which pads the batches; "
                           "using %s", model, own, pad_token_id, pad_token_id)  # fmt: skip
        loaded.config.pad_token_id = pad_token_id
    return loaded


_HALF = (torch.float16, torch.bfloat16)


def _train_in_fp32(module: nn.Module) -> None:
    """Keep a fully trained module of a half-precision model (a task head) in fp32, as the adapters are.

    AdamW on fp16 weights underflows (its eps and small second moments round to 0, so the head turns NaN within a
    step or two) and bf16 rounds small updates away. The module computes in fp32 on its inputs upcast, and hands
    its output back in the model's dtype, so the layers around it see what they saw before.
    """
    dtypes = {p.dtype for p in module.parameters()}
    if not dtypes or not dtypes <= set(_HALF):
        return
    (dtype,) = dtypes if len(dtypes) == 1 else (torch.bfloat16,)
    module.float()

    def upcast(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        def f(x: Any) -> Any:
            return x.float() if isinstance(x, torch.Tensor) and x.dtype in _HALF else x

        return tuple(f(a) for a in args), {k: f(v) for k, v in kwargs.items()}

    def downcast(_: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            return out.to(dtype)
        return out

    module.register_forward_pre_hook(upcast, with_kwargs=True)
    module.register_forward_hook(downcast)


def prepare_model(
    model: nn.Module,
    method: str,
    task: str,
    adapter: LoRAFAConfig,
    gradient_checkpointing: bool = False,
    cheap_recompute: bool = False,
) -> nn.Module:
    """Make `model` trainable by `method`, in place.

    full: every parameter trains. lora / lora-fa: `add_lorafa` with `adapter` (method taken from `method`). Unless
    `adapter` names modules_to_save itself, the task head is trained and saved too: for classification/regression
    `classification_head_names`, for the other tasks any module the checkpoint did not provide (an untied
    `lm_head` missing from a base-model checkpoint). Modules named by the user must cover those new modules.

    Args:
        model: A model from `load_model`.
        method: full | lora | lora-fa.
        task: The training task (decides the default modules_to_save).
        adapter: Adapter settings.
        gradient_checkpointing: Recompute every block's activations in backward (non-reentrant).
        cheap_recompute: Recompute cheap element-wise ops in backward (`lorafa.recompute`).

    Raises:
        ValueError: invalid adapter settings for this model, or cheap_recompute without `lorafa.recompute`.
    """
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        settings = {**adapter.to_dict(), "method": method}
        if settings["modules_to_save"] is None:
            classify = task in ("classification", "regression")
            heads = classification_head_names(model) if classify else new_module_names(model)
            settings["modules_to_save"] = heads or None
        add_lorafa(model, LoRAFAConfig(**settings))
        for name in getattr(model, "lorafa_modules_to_save", []):
            _train_in_fp32(model.get_submodule(name))
    if cheap_recompute:
        try:
            from lorafa.recompute import enable_cheap_recompute
        except ImportError as e:
            raise ValueError("cheap_recompute: lorafa.recompute is not available in this installation") from e
        enable_cheap_recompute(model)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine, and it
        # replays the CPU RNG state, so LoRA-FA's regenerated dropout masks match (lorafa.autograd).
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on transformers' per-layer activation checkpointing, under either of its names.

    transformers >= 5.18 calls it `activation_checkpointing_enable` (the old `gradient_checkpointing_enable`
    warns); earlier releases have only the old name.
    """
    hf = cast(Any, model)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class LossModel(nn.Module):
    """Wraps a model so that forward(batch) returns the training loss.

    Distributed data parallel must see the whole computation, including a chunked LM loss that bypasses the
    model's own head, as one forward call of the module it wraps; this is that module.
    """

    def __init__(self, model: nn.Module, task: str, chunked_loss: bool = False) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.chunked_loss = chunked_loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.chunked_loss:
            from lorafa.loss import chunked_causal_lm_loss

            return chunked_causal_lm_loss(self.model, batch)
        extra = {"use_cache": False} if self.task in ("sft", "clm", "seq2seq") else {}
        return self.model(**batch, **extra).loss


def is_rotary(config: Any) -> bool:
    """Whether a transformers config uses rotary positions, which run past max_position_embeddings (unlike learned
    or fixed position tables)."""
    return any(getattr(config, key, None) is not None for key in ("rope_theta", "rope_scaling", "rope_parameters"))


def check_positions(model: nn.Module, datasets: list[Any], task: str) -> None:
    """Raise ValueError if the longest tokenized input (or seq2seq target) exceeds the positions the model has
    (BERT's, GPT-2's and BART's learned position tables; LED's encoder and decoder each their own); warn when it
    exceeds a rotary model's max_position_embeddings (it runs, past the length it was trained on). The field to
    lower is named: data.block_size for clm, data.max_target_length for targets, else data.max_length."""
    config = getattr(model, "config", None)
    if config is None:
        return
    limit = position_limit(config)
    if task == "seq2seq":  # encoder inputs and decoder targets, each against its own table
        checks = [
            ("input_ids", getattr(config, "max_encoder_position_embeddings", None) or limit, "data.max_length"),
            ("labels", getattr(config, "max_decoder_position_embeddings", None) or limit, "data.max_target_length"),
        ]
    else:
        checks = [("input_ids", limit, "data.block_size" if task == "clm" else "data.max_length")]
    rotary = is_rotary(config)
    for column, positions, field in checks:
        longest = max(
            (max(token_lengths(ds, column), default=0) for ds in datasets if ds is not None), default=0
        )
        if positions is None or longest <= positions:
            continue
        message = f"the data has {column} of {longest} tokens, but {config.model_type} has {positions} positions"
        if not rotary:
            raise ValueError(f"{message}; set {field} <= {positions}")
        logger.warning("%s (rotary: it runs, past the length it was trained on); consider %s <= %d", message,
                       field, positions)  # fmt: skip


def check_token_ids(model: nn.Module, datasets: list[Any], tokenizer: Any) -> None:
    """Raise ValueError if the tokenized data holds ids outside the model's embedding table.

    A tokenizer that does not match the model (or that added tokens, e.g. an EOS, the model has no rows for) would
    otherwise fail deep inside the embedding lookup with a bare IndexError.
    """
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    rows = getattr(table, "num_embeddings", None)
    if rows is None:
        return
    for ds in datasets:
        if ds is None or "input_ids" not in ds.column_names:
            continue
        top = max_token(ds, "input_ids")
        if top >= rows:
            raise ValueError(
                f"the data holds token id {top}, but the model's input embedding table has {rows} rows: the tokenizer "
                f"({len(tokenizer)} tokens) does not match the model; use the model's own tokenizer"
            )
