"""TrainConfig: everything `lorafa train` needs, as validated dataclasses, loaded from YAML plus `key=value` overrides.

A config has top-level fields (model, task, method, optimisation, loop) and two sections: `adapter`
(`lorafa.LoRAFAConfig`, PEFT's names) and `data` (`lorafa.data.DataConfig`). Values are coerced to the field's
type (YAML reads `1e-4` as a string, the command line gives only strings), so `lr=1e-4`, `adapter.r=32`,
`data.eval_file=null` and `adapter.target_modules=[q_proj,v_proj]` all work. Unknown keys and invalid values raise
ValueError naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafa.config import LoRAFAConfig
from lorafa.data import TASKS, DataConfig
from lorafa.targets import module_spec

METHODS = ("full", "lora", "lora-fa")
SCHEDULES = ("linear", "cosine", "constant")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
TOKEN_TASKS = ("sft", "seq2seq", "clm")
"""Tasks whose loss is a mean over tokens (metrics: eval_loss, eval_perplexity)."""


@dataclass
class TrainConfig:
    """A training run. `validate()` (called on creation) raises ValueError naming the first invalid field."""

    model: str = ""
    """Hugging Face model id, local folder, or `asset:NAME` (see `lorafa.assets`)."""
    task: str = "classification"
    """classification | regression | sft | seq2seq | clm."""
    method: str = "lora-fa"
    """full (every weight trained) | lora (A and B trained) | lora-fa (A frozen, only B trained)."""
    output_dir: str = "runs/lorafa"
    """Where adapter/, metrics.json, train_log.jsonl, config.yaml, loss.png and checkpoints go."""
    seed: int = 0
    """Seed of torch/numpy/python RNGs, of the data order and of dropout."""
    adapter: LoRAFAConfig = field(default_factory=LoRAFAConfig)
    """Adapter settings (ignored by method full). `adapter.method` follows the top-level `method`."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data files, columns and tokenization."""

    # -- model loading
    model_dtype: str = "float32"
    """dtype the model is loaded in: float32 | bfloat16 | float16 (adapters stay float32)."""
    trust_remote_code: bool = False
    """Run the checkpoint's own modeling/tokenizer code (transformers' trust_remote_code), for models that
    transformers does not implement; only for code you have read."""

    # -- optimisation
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (not to biases and norms)."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps spent warming the learning rate up from 0 (use this or warmup_steps)."""
    warmup_steps: int = 0
    """Number of warm-up optimizer steps (use this or warmup_ratio)."""
    schedule: str = "linear"
    """Learning-rate decay after warm-up: linear (to 0) | cosine (to 0) | constant."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the data is repeated as needed); None trains for `epochs`."""
    batch_size: int = 8
    """Examples per device per forward pass (global batch = batch_size × grad_accum × processes)."""
    group_by_length: bool = False
    """Batch examples of similar length (sorted within windows of 50 global batches, batches shuffled, the
    longest first), so batches pad less: faster sft/seq2seq/classification on data of mixed lengths. The order
    is still seeded, so runs and resumes repeat; clm blocks all have one length (no effect)."""
    eval_batch_size: int | None = None
    """Examples per device per evaluation forward pass; None uses 2 × batch_size."""
    grad_accum: int = 1
    """Forward/backward passes accumulated per optimizer step."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None or 0 disables clipping."""
    mixed_precision: str = "no"
    """Autocast: no | bf16 | fp16 (fp16 also scales the loss)."""

    # -- memory
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward (non-reentrant checkpointing), for any method."""
    chunked_loss: bool | None = None
    """sft/clm: compute the LM head + cross-entropy in chunks (`lorafa.loss`); None: on for sft/clm when available."""
    cheap_recompute: bool = False
    """Recompute cheap element-wise activations in backward (`lorafa.recompute`), when available."""

    # -- evaluation, logging, checkpoints
    eval_before: bool = True
    """Evaluate once before training, so the final report can show before → after."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (and always at the end); 0: only at the end."""
    exact_match_samples: int = 32
    """seq2seq: generate for this many eval examples to report eval_exact_match; 0 disables."""
    logging_every: int = 10
    """Write a train_log.jsonl line (and TensorBoard scalars) every N optimizer steps."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N optimizer steps; 0: none."""
    keep_checkpoints: int = 2
    """Keep only the newest N checkpoints."""
    resume: str | None = None
    """Continue from a checkpoint folder, or from an output_dir (its newest checkpoint)."""
    tensorboard: bool = False
    """Also log scalars to output_dir/tensorboard (needs the `tensorboard` package)."""
    progress_bar: bool = True
    """Show a tqdm progress bar on the main process."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (dotted for the adapter and data sections)."""
        _check_choice("task", self.task, TASKS)
        _check_choice("method", self.method, METHODS)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a Hugging Face id, a local folder or asset:NAME; it is not set")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a folder path, got {self.output_dir!r}")
        _check_seed("seed", self.seed)
        if not isinstance(self.adapter, LoRAFAConfig):
            raise ValueError(f"adapter must be a LoRAFAConfig, got {type(self.adapter).__name__}")
        if self.method != "full" and self.adapter.method != self.method:
            # The top-level method is the one users set; keep the section in step with it.
            settings = {**self.adapter.to_dict(), "method": self.method}
            _section("adapter", lambda: setattr(self, "adapter", LoRAFAConfig(**settings)))
        _section("adapter", self.adapter.validate)
        if not isinstance(self.data, DataConfig):
            raise ValueError(f"data must be a DataConfig, got {type(self.data).__name__}")
        _section("data", self.data.validate)
        _check_seed("data.seed", self.data.seed)  # numpy and datasets take seeds in [0, 2**32)
        _check_choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        if self.method == "full" and self.model_dtype == "float16":
            raise ValueError(
                "model_dtype float16 with method full would train fp16 weights (AdamW underflows them, and fp16 "
                "loss scaling refuses fp16 gradients); use model_dtype bfloat16 or float32 with mixed_precision fp16"
            )
        _check_float("lr", self.lr, positive=True)
        _check_float("weight_decay", self.weight_decay)
        _check_float("warmup_ratio", self.warmup_ratio)
        if self.warmup_ratio >= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise ValueError("warmup_ratio and warmup_steps are both set; set only one of them")
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_int("epochs", self.epochs, minimum=1)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        if self.eval_batch_size is not None:
            _check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        _check_int("grad_accum", self.grad_accum, minimum=1)
        if self.max_grad_norm is not None:
            _check_float("max_grad_norm", self.max_grad_norm)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        for name in (
            "group_by_length",
            "gradient_checkpointing",
            "cheap_recompute",
            "eval_before",
            "tensorboard",
            "progress_bar",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.chunked_loss is not None and not isinstance(self.chunked_loss, bool):
            raise ValueError(f"chunked_loss must be true, false or null, got {self.chunked_loss!r}")
        if self.chunked_loss and self.task not in ("sft", "clm"):
            raise ValueError(f"chunked_loss applies to causal LM tasks (sft, clm), not task {self.task!r}")
        for name in ("eval_every", "exact_match_samples", "checkpoint_every"):
            _check_int(name, getattr(self, name), minimum=0)
        _check_int("logging_every", self.logging_every, minimum=1)
        _check_int("keep_checkpoints", self.keep_checkpoints, minimum=1)
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume):
            raise ValueError(f"resume must be a checkpoint or output folder, got {self.resume!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what config.yaml holds); `adapter.method` is left out, the top-level method rules."""
        d = dataclasses.asdict(self)
        d["adapter"].pop("method", None)
        return d

    def to_yaml(self) -> str:
        """The resolved config as YAML, loadable by `load_config`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose existing local paths (model, output_dir, resume, data files, cache_dir) are absolute, so
        that a run's config.yaml means the same from any working folder; Hub ids and asset:NAME stay as given."""
        d = self.to_dict()
        for key in ("model", "output_dir", "resume"):
            d[key] = _absolute(d[key])
        for key in ("train_file", "eval_file", "cache_dir"):
            d["data"][key] = _absolute(d["data"][key])
        return config_from_dict(d)


def _absolute(value: Any) -> Any:
    if isinstance(value, str) and value and not value.startswith("asset:"):
        path = Path(value).expanduser()
        if path.exists():
            return str(path.resolve())
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        need = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {need}, got {value!r}")


def _check_seed(name: str, value: Any) -> None:
    """A seed numpy (and datasets' shuffles) accept: an integer in [0, 2**32)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")


def _check_float(name: str, value: Any, positive: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise ValueError(f"{name} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")


def _section(name: str, validate: Any) -> None:
    """Run a section's validation, prefixing its field name with the section (`r must…` → `adapter.r must…`)."""
    try:
        validate()
    except ValueError as e:
        raise ValueError(f"{name}.{e}") from e


# ---------------------------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Build a TrainConfig from a YAML file and/or `key=value` overrides (later ones win).

    Args:
        path: A YAML file holding a mapping of config keys; None starts from `base` (or the defaults).
        overrides: Strings like `lr=1e-4`, `adapter.r=32`, `data.eval_file=null`.
        base: Starting values (nested dict) below the file, e.g. a run's saved config.

    Returns:
        The validated config.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: malformed YAML or override, unknown key, a value of the wrong type, an invalid value.
    """
    raw: dict[str, Any] = _deep_copy(base or {})
    if path is not None:
        raw = _merge(raw, read_yaml(path))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key=value (e.g. lr=1e-4 or adapter.r=32)")
        _set_dotted(raw, key.strip(), value)
    return config_from_dict(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; FileNotFoundError/ValueError naming the file otherwise."""
    p = Path(path)
    if p.is_dir():
        inside = p / "config.yaml"
        hint = f" (did you mean {inside}?)" if inside.is_file() else ""
        raise FileNotFoundError(f"config file {p} is a folder, not a YAML file{hint}")
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {p} is not valid YAML{where}: {problem}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans (only true/false, any case) and duplicate keys refused.

    PyYAML follows YAML 1.1, where yes/no/on/off are booleans too: `label_names: [no, yes]` would become
    [false, true] and `mixed_precision: no` false. Here they stay the words written; bool fields accept them as
    words (see `_coerce`). A key given twice in one mapping is an error (YAML would keep the last silently).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (set each key once)", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a nested dict; values are coerced to the fields' types."""
    return typing.cast(TrainConfig, _build(TrainConfig, raw, ""))


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: str) -> None:
    """raw[a][b] = value for key "a.b"; the value stays a string (`_coerce` parses it against the field type)."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {key}=…: {part!r} is not a section")
        node = child
    node[parts[-1]] = _CliValue(value)


class _CliValue(str):
    """A value typed on the command line: parsed against the field's type rather than as YAML."""


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values, got {raw!r}")
    fields = _fields(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = str(unknown[0])
        raise ValueError(
            f"unknown config key {prefix + key!r}{_suggest(key, prefix)}; valid keys here: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        hint = fields[name]
        if _is_null(value) and _null_is_default(cls, name):
            continue  # e.g. adapter.exclude_modules=null: the field's default (nothing excluded)
        if dataclasses.is_dataclass(hint):
            if isinstance(value, str):
                raise ValueError(f"{prefix}{name} is a section; set {prefix}{name}.FIELD=value instead")
            kwargs[name] = _build(typing.cast(type, hint), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    if cls is TrainConfig and "adapter" in kwargs:
        _check_adapter_method(raw, kwargs)
    try:
        obj = cls(**kwargs)
        if cls is DataConfig:
            obj.validate()  # DataConfig validates on demand only
    except ValueError as e:
        if prefix and not str(e).startswith(prefix):
            raise ValueError(f"{prefix}{e}") from e
        raise
    return obj


# Hugging Face TrainingArguments / PEFT / TRL names that users carry over, and what lorafa calls them.
_OTHER_NAMES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "save_steps": "checkpoint_every",
    "save_total_limit": "keep_checkpoints",
    "eval_steps": "eval_every",
    "logging_steps": "logging_every",
    "lr_scheduler_type": "schedule",
    "resume_from_checkpoint": "resume",
    "model_name_or_path": "model",
    "torch_dtype": "model_dtype",
    "dtype": "model_dtype",
    "fp16": "mixed_precision: fp16",
    "bf16": "mixed_precision: bf16",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "dataset_text_field": "data.text_column",
    "lora_r": "adapter.r",
    "rank": "adapter.r",
}


def _all_keys() -> dict[str, list[str]]:
    """Every field name → its dotted paths (`r` → [`adapter.r`], `seed` → [`seed`, `data.seed`])."""
    paths: dict[str, list[str]] = {}
    for name, hint in _fields(TrainConfig).items():
        if dataclasses.is_dataclass(hint):
            for sub in _fields(typing.cast(type, hint)):
                if sub != "method":  # adapter.method follows the top-level method
                    paths.setdefault(sub, []).append(f"{name}.{sub}")
        else:
            paths.setdefault(name, []).append(name)
    return paths


def _suggest(key: str, prefix: str) -> str:
    """A " (did you mean ...?)" hint for an unknown key, searched in every section, not only the one it is in."""
    paths = _all_keys()
    if "." in key:  # `data.max_length: 3` at the top of a YAML file: sections nest
        section, _, name = key.partition(".")
        if f"{section}.{name}" in paths.get(name, []):
            return f" (in a YAML file, nest it: `{section}:` then `  {name}: ...` on the next line)"
    if key in paths:
        return f" (did you mean {' or '.join(repr(p) for p in paths[key])}?)"
    if key in _OTHER_NAMES:
        return f" (lorafa calls it {_OTHER_NAMES[key]!r})"
    close = difflib.get_close_matches(key, list(paths), n=1)
    if not close:
        return ""
    here = [p for p in paths[close[0]] if p == prefix + close[0]]  # the same section first
    return f" (did you mean {(here or paths[close[0]])[0]!r}?)"


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, _CliValue) and value.strip().lower() in _NONE)


def _null_is_default(cls: type, name: str) -> bool:
    """A field whose default is an empty list (exclude_modules): null means that default."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).default_factory is list


def _check_adapter_method(raw: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """`adapter.method` may repeat the top-level method (config.yaml of older runs) but never contradict it."""
    given = raw["adapter"].get("method") if isinstance(raw["adapter"], dict) else None
    method = kwargs.get("method", TrainConfig.method)
    if given is not None and method != "full" and given != method:
        raise ValueError(
            f"adapter.method={given!r} contradicts method={method!r}; set only the top-level `method`"
        )


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}
_NO_RESUME = ("false", "no", "off")  # resume: false (not a folder named "false")
_MODULE_FIELDS = ("target_modules", "exclude_modules")  # one plain name: a one-name list (targets.module_spec)
_NAME = re.compile(r"[\w.\-/ ]+")
"""A column or module name; a comma-separated run of them on the command line is a list."""


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to type `hint`, or ValueError naming `key`."""
    cli = isinstance(value, _CliValue)
    origin = typing.get_origin(hint)
    if hint is Any:
        return str(value) if cli else value
    if key == "resume" and (value is False or (isinstance(value, str) and value.strip().lower() in _NO_RESUME)):
        return None  # `resume: false`: start afresh (not a folder named "false")
    if key == "resume" and (value is True or (cli and value.strip().lower() == "true")):
        raise ValueError("resume must be a checkpoint or output folder (or false/null), got true")
    if key.endswith(_MODULE_FIELDS) and isinstance(value, str) and not (cli and value.strip().lower() in _NONE):
        spec = module_spec(value)  # "all-linear", or a plain name as a one-name list; else read below
        if spec is not None:
            return spec
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and (value is None or (cli and value.strip().lower() in _NONE)):
            return None
        if cli and str in args and not value.strip().startswith("["):
            parts = [part.strip() for part in value.split(",")]
            if list[str] in args and len(parts) > 1 and all(_NAME.fullmatch(part) for part in parts):
                return parts  # data.prompt_column=instruction,input: two names (a regex would hold no comma)
            return str(value)  # e.g. target_modules=all-linear stays a string, [q,v] becomes a list
        if cli:  # "[q,v]": a list type first (a str alternative would take the brackets literally)
            args = tuple(sorted(args, key=lambda a: typing.get_origin(a) is not list))
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise ValueError(f"{key} must be {_describe(hint)}, got {str(value) if cli else value!r}")
    bad = ValueError(f"{key} must be {_describe(hint)}, got {str(value) if cli else value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)  # YAML's 1 as the command line's "1"
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise bad
    if hint is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, int | float):
            return float(value)
        raise bad
    if hint is str:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare `no`/`off` as false: `mixed_precision: no` means "no"; elsewhere (a label
            # written true/false) the word the data files hold.
            if key == "mixed_precision":
                return "yes" if value else "no"
            return "true" if value else "false"
        if cli and value.strip().lower() in _NONE:
            raise ValueError(f"{key} must be {_describe(hint)}; it cannot be null")
        if key == "mixed_precision" and isinstance(value, str) and value.strip().lower() in ("off", "false"):
            return "no"  # as in YAML files and Accelerate's own flag
        if isinstance(value, str):
            return str(value)
        if isinstance(value, int | float):
            return str(value)
        raise bad
    if origin is list:
        if cli:
            text = value.strip()
            try:
                value = (
                    yaml.load(text, Loader=YamlLoader)
                    if text.startswith("[")
                    else [s.strip() for s in text.split(",")]
                )
            except yaml.YAMLError:
                raise bad from None
        if not isinstance(value, list | tuple):
            raise bad
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{key}: unsupported field type {hint!r}")


# ---------------------------------------------------------------------------------------- offline default

DEFAULT_RUN: dict[str, Any] = {
    "model": "asset:all-minilm-l6-v2",
    "task": "classification",
    "method": "lora-fa",
    "output_dir": "runs/minilm-rotten-tomatoes",
    "seed": 0,
    # all-MiniLM-L6-v2 was trained with mean pooling, so BERT's [CLS] pooler is retrained along with the head.
    "adapter": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "modules_to_save": ["classifier", "pooler"]},
    "data": {
        "train_file": "asset:rotten-tomatoes",
        "text_column": "text",
        "label_column": "category",
        "label_names": ["rotten", "fresh"],
        "eval_split": 0.1,
        "max_length": 64,
        "max_train_samples": 2000,
        "max_eval_samples": 500,
    },
    "lr": 3e-3,
    "warmup_ratio": 0.06,
    "schedule": "linear",
    "epochs": 1,
    "batch_size": 16,
    "eval_every": 50,
    "logging_every": 10,
}
"""`lorafa train` with no config file: all-MiniLM-L6-v2 + LoRA-FA on Rotten Tomatoes, a few minutes on 2 CPU cores
(examples/minilm_rotten_tomatoes.yaml holds the same)."""


def default_config(overrides: list[str] | None = None) -> TrainConfig:
    """The offline default run (`DEFAULT_RUN`), with optional `key=value` overrides."""
    return load_config(None, overrides, base=DEFAULT_RUN)
