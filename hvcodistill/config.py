"""One typed config: defaults -> YAML file -> `dotted.key=value` overrides; unknown keys are errors.

Every key of the public contract (DESIGN.md) lives here with its default and a one-line meaning.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hvcodistill.errors import ConfigError


@dataclass
class CodistillConfig:
    n_models: int = 2                  # M: models trained at once; 1 = plain all-reduce baseline
    mode: str = "predictions"          # predictions | weights (what peers exchange)
    every: int = 1                     # k: exchange every k steps
    alpha: float = 1.0                 # weight of the distillation term; 0 turns codistillation off
    distance: str = "kl"               # kl | ce | mse
    temperature: float = 1.0           # softmax temperature for kl / ce
    # alpha is 0 before this step. null: 0 in predictions mode; k in weights mode, whose first
    # refresh is then taken at step k, so the first teachers are the peers after one interval of
    # training, never their random initial weights (weights mode distils from burn_in + refresh_delay on)
    burn_in_steps: Optional[int] = None
    # weights mode: a refresh taken at step t is installed at step t + refresh_delay, its transfer
    # hidden behind the steps in between; 0 <= d < k, 0 blocks (installed in the step it is taken).
    # null: min(10, k // 2)
    refresh_delay: Optional[int] = None
    # predictions mode: the dtype logits travel in. fp32 exact; fp16 | bf16 half the bytes (the
    # received logits are the peer's rounded to that dtype, widened back to fp32 for the loss)
    payload_dtype: str = "fp32"
    # predictions mode: 0 sends every logit; k > 0 sends per row (sample, or token of a language
    # model) only the k largest log-probabilities (in payload_dtype) and their int32 indices; the
    # receiver spreads the rest of the mass evenly over the other classes (comm/topk.py)
    topk: int = 0


@dataclass
class DataConfig:
    name: str = "digits"               # digits | mnist1d | synthetic | npz | cifar10 | imagenet | text | tokens
    path: str = ""                     # .npz file, CIFAR-10 folder or ImageFolder root (mnist1d: cache folder)
    order: str = "shared"              # shared: peers see identical batches | disjoint: different ones
    augment: bool = False              # random crops/flips (cifar10, imagenet)
    workers: int = 0                   # DataLoader worker processes per rank
    synthetic_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    synthetic_classes: int = 10
    synthetic_train_size: int = 1024
    synthetic_val_size: int = 256


@dataclass
class ModelConfig:
    name: str = "mlp"                  # mlp | cnn | resnet18_cifar | resnet50 | resnext101_32x8d | transformer_lm
    hidden: list[int] = field(default_factory=lambda: [128])   # the MLP's hidden sizes
    init_seed: Optional[int] = None    # model i starts from (init_seed or train.seed) + i
    dropout: float = 0.0               # the MLP's dropout after each hidden layer, in [0, 1) (also transformer_lm)
    # transformer_lm: blocks, attention heads, width, context (tokens per window; the data's windows)
    layers: int = 2
    heads: int = 4
    width: int = 128
    context: int = 64


@dataclass
class OptimConfig:
    name: str = "sgd"                  # sgd | adamw
    lr: Optional[float] = None         # null: Goyal et al., 0.1 x per-model batch / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4         # initial weight decay
    unit: str = "epochs"               # unit of warmup and milestones: epochs | steps
    lr_schedule: str = "step"          # step | cosine | constant (after linear warm-up)
    warmup: float = 0.0                # linear warm-up length
    lr_milestones: list[float] = field(default_factory=list)   # step decay: lr *= lr_gamma at each
    lr_gamma: float = 0.1
    wd_milestones: list[float] = field(default_factory=list)   # weight decay becomes wd_values[i] at each
    wd_values: list[float] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 0                     # updates per model; 0: use epochs
    epochs: float = 0.0                # passes over the training set per model
    batch_size: int = 32               # per rank; a model's batch is group_size x this
    seed: int = 0
    amp: str = "none"                  # none | bf16 | fp16 (fp16 on GPU only)
    device: str = "auto"               # auto | cpu | cuda
    log_every: int = 10                # steps between metrics.jsonl / TensorBoard points
    eval_every: int = 0                # steps between validations; 0: only at the end
    progress: bool = True              # a progress bar on world rank 0


@dataclass
class RunConfig:
    dir: str = "runs/default"          # run directory (config.yaml, metrics.jsonl, tb/, checkpoints/, summary.json)
    checkpoint_every: int = 0          # steps between checkpoints; 0: only on preemption and at the end
    keep_checkpoints: int = 3          # retention per model
    resume: bool = True                # continue from the newest complete checkpoint in run.dir
    # steps between the ranks' agreements on a SIGUSR1/SIGTERM (a stop comes within two of them);
    # 0: about every 0.1 s of training, from the step time the ranks agree on
    preempt_check_every: int = 0
    # seconds without a heartbeat from every rank before the job is aborted (a rank or node lost,
    # a link cut: comm/watchdog.py); 0: never
    hang_timeout: float = 15.0


@dataclass
class Config:
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "codistill.mode": ("predictions", "weights"),
    "codistill.distance": ("kl", "ce", "mse"),
    "codistill.payload_dtype": ("fp32", "fp16", "bf16"),
    "data.name": ("digits", "mnist1d", "synthetic", "npz", "cifar10", "imagenet", "text", "tokens"),
    "data.order": ("shared", "disjoint"),
    "model.name": ("mlp", "cnn", "resnet18_cifar", "resnet50", "resnext101_32x8d", "transformer_lm"),
    "optim.name": ("sgd", "adamw"),
    "optim.unit": ("epochs", "steps"),
    "optim.lr_schedule": ("step", "cosine", "constant"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}
# DataLoader workers per rank. Each is a process holding its own copy of the dataset object; a
# node runs ranks x workers of them, so beyond a few dozen per rank a value is a typo, and
# 100000000 would spawn processes until the machine stalls (a hang, not an error).
MAX_WORKERS = 64
# torch.manual_seed takes [-2**63, 2**64 - 1]; model i starts from seed + i, so seeds stop at 2**63 - 1.
MAX_SEED = 2**63 - 1


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Cast a YAML/CLI value to the field's type, or fail naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:      # Optional[X]
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is list or typing.get_origin(annotation) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        item = (typing.get_args(annotation) or (None,))[0]
        if item is None:
            return list(value)
        # Each item by the same rules as a single value: [true] is no size, [1, a] no milestone,
        # [.nan] no number. A whole number stays an int in a list[float] (milestones in steps).
        return [v if item is float and type(v) is int else _coerce(key, v, item) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected true or false, got {value!r}")
    if annotation in (int, float) and isinstance(value, str):
        try:                       # YAML reads 1e-5 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    # One rule for every number, list items included: nan and inf are refused at load, as no key
    # has a use for them and they would train to a NaN loss (optim.wd_values=[.inf]).
    if annotation in (int, float) and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key}: expected a finite number, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key}: expected a number, got {value!r}")
        if abs(value) > 1e308:          # an int too large for a float: float() would overflow
            raise ConfigError(f"config key {key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key {key}: expected a string, got {value!r}")
        return str(value)
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    sub = getattr(cfg, section, None) if section in {f.name for f in dataclasses.fields(cfg)} else None
    fields = {f.name: f for f in dataclasses.fields(sub)} if sub is not None else {}
    if not name or name not in fields:
        raise ConfigError(f"unknown config key {key!r} (see hvcodistill/config.py for the keys)")
    hints = typing.get_type_hints(type(sub))
    setattr(sub, name, _coerce(key, value, hints[name]))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if not prefix and (isinstance(v, dict) or v is None):   # `run:` left empty is no error
            out.update(_flatten(v or {}, key + "."))
        else:
            out[key] = v
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Defaults, then the YAML file, then `dotted.key=value` overrides (values parsed as YAML)."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} " + ("is a directory, not a file" if p.is_dir() else "not found"))
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} "
                              f"at offset {e.start}") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        for key, value in _flatten(tree).items():
            _set(cfg, key, value)
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must be dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set(cfg, key.strip(), value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no topology; each failure names its key."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"config key {key}: {value!r} is not one of {', '.join(choices)}")
    c, t, o = cfg.codistill, cfg.train, cfg.optim
    resolve_codistill_defaults(c)
    positive = {"codistill.every": c.every, "train.batch_size": t.batch_size,
                "model.layers": cfg.model.layers, "model.heads": cfg.model.heads,
                "model.width": cfg.model.width, "model.context": cfg.model.context,
                "train.log_every": t.log_every, "run.keep_checkpoints": cfg.run.keep_checkpoints}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key {key} must be >= 1, got {value}")
    non_negative = {"codistill.alpha": c.alpha, "codistill.burn_in_steps": c.burn_in_steps,
                    "codistill.topk": c.topk,
                    "train.steps": t.steps, "train.epochs": t.epochs, "train.eval_every": t.eval_every,
                    "optim.warmup": o.warmup, "optim.weight_decay": o.weight_decay,
                    "data.workers": cfg.data.workers, "run.checkpoint_every": cfg.run.checkpoint_every,
                    "run.preempt_check_every": cfg.run.preempt_check_every, "run.hang_timeout": cfg.run.hang_timeout}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key {key} must be >= 0, got {value}")
    if cfg.data.workers > MAX_WORKERS:
        raise ConfigError(f"config key data.workers must be <= {MAX_WORKERS} (worker processes per rank, "
                          f"each with its own copy of the dataset), got {cfg.data.workers}")
    for key, seed in (("train.seed", t.seed), ("model.init_seed", cfg.model.init_seed)):
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"config key {key} must lie in [0, 2**63 - 1] (what torch.manual_seed takes, "
                              f"with room for + model id), got {seed}")
    if o.momentum < 0 or (o.nesterov and o.momentum == 0):
        raise ConfigError(f"config key optim.momentum must be >= 0 (> 0 with optim.nesterov), got {o.momentum}")
    if o.lr_gamma <= 0:
        raise ConfigError(f"config key optim.lr_gamma must be > 0, got {o.lr_gamma}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in o.wd_values):
        raise ConfigError(f"config key optim.wd_values must be non-negative numbers, got {o.wd_values}")
    if c.refresh_delay is not None and c.refresh_delay < 0:
        raise ConfigError(f"config key codistill.refresh_delay must be >= 0, got {c.refresh_delay}")
    if c.mode == "weights" and c.refresh_delay >= c.every:
        raise ConfigError(f"config key codistill.refresh_delay must be < codistill.every={c.every} (a refresh is "
                          f"installed before the next one is taken), got {c.refresh_delay}")
    if c.temperature <= 0:
        raise ConfigError(f"config key codistill.temperature must be > 0, got {c.temperature}")
    if o.lr is not None and o.lr <= 0:
        raise ConfigError(f"config key optim.lr must be > 0 (or null for 0.1 x batch / 256), got {o.lr}")
    if (t.steps > 0) == (t.epochs > 0):
        raise ConfigError("set exactly one of train.steps and train.epochs (the other 0)")
    if c.mode == "predictions" and cfg.data.order != "shared" and c.n_models > 1:
        raise ConfigError("codistill.mode=predictions needs data.order=shared: peers must hold the same batch")
    if len(o.wd_milestones) != len(o.wd_values):
        raise ConfigError("config keys optim.wd_milestones and optim.wd_values must have the same length")
    for key, ms in (("optim.lr_milestones", o.lr_milestones), ("optim.wd_milestones", o.wd_milestones)):
        if list(ms) != sorted(ms) or any(not isinstance(m, (int, float)) or m < 0 for m in ms):
            raise ConfigError(f"config key {key} must be an increasing list of non-negative numbers")
    if any(not isinstance(h, int) or h < 1 for h in cfg.model.hidden):
        raise ConfigError(f"config key model.hidden must be a list of positive integers, got {cfg.model.hidden}")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"config key model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if cfg.model.dropout and cfg.model.name not in ("mlp", "transformer_lm"):
        raise ConfigError(f"config key model.dropout applies to model.name=mlp or transformer_lm only, "
                          f"got {cfg.model.name}")
    if cfg.model.width % cfg.model.heads:
        raise ConfigError(f"config key model.width={cfg.model.width} must be a multiple of model.heads={cfg.model.heads}")
    language = cfg.data.name in ("text", "tokens")
    if language != (cfg.model.name == "transformer_lm"):
        raise ConfigError(f"config key model.name={cfg.model.name} does not fit data.name={cfg.data.name}: "
                          "token data (text, tokens) goes with transformer_lm, and only it")


def resolve_codistill_defaults(c: CodistillConfig) -> None:
    """Fill the keys whose default depends on the mode (null in the file): the resolved config
    written to the run directory says what the run used."""
    if c.burn_in_steps is None:
        c.burn_in_steps = c.every if c.mode == "weights" else 0
    if c.refresh_delay is None and c.mode == "weights":
        c.refresh_delay = min(10, c.every // 2)


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config, written by the one atomic-write rule (hvcodistill/files.py)."""
    from hvcodistill.files import write_atomic

    write_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
