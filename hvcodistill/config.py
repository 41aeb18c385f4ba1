"""One typed config: defaults -> YAML file -> `dotted.key=value` overrides; unknown keys are errors.

Every key lives here with its type, default and help (`_key`); docs/configuration.md is
rendered from them (hvcodistill/configref.py, `make docs`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hvcodistill.comm.dataplane import BACKENDS
from hvcodistill.comm.exchange import PAYLOAD_DTYPES
from hvcodistill.comm.modes import MODES, get_mode
from hvcodistill.data import DATA_NAMES
from hvcodistill.errors import ConfigError
from hvcodistill.files import write_atomic
from hvcodistill.losses import DISTANCES
from hvcodistill.models import MODEL_NAMES
from hvcodistill.optim import LR_SCHEDULES, OPTIMIZERS, UNITS
from hvcodistill.resources import config_path


def _key(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING):
    """A config key: its default (or a factory for a list) and its help, the one paragraph that
    the configuration reference (docs/configuration.md, written by hvcodistill/configref.py) shows.
    Markdown; `name` marks a value, a key or a repository path."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class CodistillConfig:
    """What the models exchange, how often, and how much it weighs in the loss."""

    n_models: int = _key(
        2,
        help="M, the models trained at once. The world's W ranks must be a multiple of M; each "
        "model is trained data-parallel by G = W / M contiguous ranks (model i on ranks "
        "[i G, (i+1) G)). 1: the plain all-reduce baseline, run by the same code.",
    )
    mode: str = _key(
        "predictions",
        help="What peers (the ranks with the same group rank, one per model) exchange; each mode "
        "is a registered class of `hvcodistill/comm/modes.py`. `predictions`: every k steps "
        "they allgather the logits of the batch they all hold, and distil on those steps "
        "(needs `data.order=shared`). `weights`: every k steps they allgather their parameters "
        "and buffers into M-1 local teacher copies, distilled from on every step.",
    )
    every: int = _key(1, help="k: an exchange (in `weights` mode, a refresh) every k steps; >= 1.")
    alpha: float = _key(
        1.0,
        help="Weight of the distillation term: loss = task loss + alpha x the mean distance to "
        "the teachers. 0 turns codistillation off: no exchange, M independent models.",
    )
    distance: str = _key(
        "kl",
        help="D(student, teacher) of `hvcodistill/losses.py`: `kl` (KL of the softened "
        "distributions, x T^2), `ce` (cross-entropy against the teacher's soft targets, x T^2) "
        "or `mse` (mean squared difference of the logits). Per token for a language model.",
    )
    temperature: float = _key(1.0, help="Softmax temperature T of `kl` and `ce`; > 0.")
    burn_in_steps: Optional[int] = _key(
        None,
        help="alpha is 0 before this step. null: 0 in `predictions` mode; k in `weights` mode, "
        "whose first refresh is then taken at step k, so the first teachers are the peers after "
        "one interval of training, never their random initial weights (weights mode distils "
        "from burn_in + refresh_delay on). The resolved value is what `run.dir/config.yaml` "
        "records.",
    )
    refresh_delay: Optional[int] = _key(
        None,
        help="`weights` mode: a refresh taken at step t is installed at step t + d, its transfer "
        "hidden behind the steps in between; 0 <= d < k, 0 blocks (installed in the step it is "
        "taken). null: min(10, k // 2).",
    )
    payload_dtype: str = _key(
        "fp32",
        help="`predictions` mode: the dtype the logits travel in. `fp32` is exact; `fp16` and "
        "`bf16` take half the bytes (the teacher logits are the peer's rounded to that dtype, "
        "widened back to fp32 for the loss).",
    )
    topk: int = _key(
        0,
        help="`predictions` mode: 0 sends every logit; k > 0 sends per row (a sample, or a token "
        "of a language model) only the k largest log-probabilities, in `payload_dtype`, and "
        "their int32 indices; the receiver spreads the remaining mass evenly over the other "
        "classes (`hvcodistill/comm/topk.py`). Must be below the data's number of classes.",
    )


@dataclass
class DataConfig:
    """The data set, and how its batches are dealt to the ranks."""

    name: str = _key(
        "digits",
        help="`digits` (scikit-learn's bundled 8x8 digits, nothing downloaded), `mnist1d` "
        "(MNIST-1D: 4000/1000 signals of shape (1, 40), generated offline by the mnist1d "
        "package and cached), `synthetic` (random inputs, see `synthetic_*`), `npz` (a file "
        "holding x_train, y_train, x_val, y_val; any input shape), `cifar10` (a folder holding "
        "cifar-10-batches-py), `imagenet` (a folder with train/ and val/ ImageFolder trees), "
        "`text` (a UTF-8 file read as bytes, V = 256; no path: CPython's own help text) or "
        "`tokens` (a folder with nanoGPT-style train.bin, val.bin and meta.json). `text` and "
        "`tokens` go with `model.name=transformer_lm`, and only they.",
    )
    path: str = _key(
        "",
        help="Where the data is: the .npz file, the CIFAR-10 folder, the ImageFolder root, the "
        "text file or the tokens folder; for `mnist1d` the cache folder (empty: "
        "$HVCODISTILL_CACHE, else $XDG_CACHE_HOME/hvcodistill or ~/.cache/hvcodistill). May "
        "change on resume if the data stays the same.",
    )
    order: str = _key(
        "shared",
        help="`shared`: peers read identical batches (required by `predictions` mode); "
        "`disjoint`: at every step peers read disjoint samples, while each model still sees "
        "the whole set every epoch.",
    )
    augment: bool = _key(
        False,
        help="Random crops and flips (`cifar10`, `imagenet`; the other data sets are never "
        "augmented), drawn from seed, epoch and sample index, so peers see identical batches.",
    )
    workers: int = _key(
        0,
        help="DataLoader worker processes per rank, 0..64 (0: the training process loads the "
        "batches). On GPU, batches go through pinned memory.",
    )
    synthetic_shape: list[int] = _key(
        factory=lambda: [3, 32, 32], help="`synthetic`: the shape of one input."
    )
    synthetic_classes: int = _key(10, help="`synthetic`: the number of classes (>= 2).")
    synthetic_train_size: int = _key(1024, help="`synthetic`: training samples.")
    synthetic_val_size: int = _key(256, help="`synthetic`: validation samples.")


@dataclass
class ModelConfig:
    """The architecture, the same for every model of the run."""

    name: str = _key(
        "mlp",
        help="`mlp` (any input shape, flattened), `cnn` and `resnet18_cifar` (small (C, H, W) "
        "images), `resnet50` and `resnext101_32x8d` (torchvision's, untrained), or "
        "`transformer_lm` (a decoder-only Transformer: with `text` or `tokens` data only).",
    )
    hidden: list[int] = _key(factory=lambda: [128], help="`mlp`: the hidden layers' sizes.")
    init_seed: Optional[int] = _key(
        None,
        help="Model i starts from the weights that seed (init_seed, or `train.seed` when null) "
        "+ i draws; 0..2**63-1.",
    )
    dropout: float = _key(
        0.0, help="Dropout after each hidden layer of `mlp`, and in `transformer_lm`; in [0, 1)."
    )
    layers: int = _key(2, help="`transformer_lm`: Transformer blocks.")
    heads: int = _key(4, help="`transformer_lm`: attention heads; `width` must be a multiple.")
    width: int = _key(128, help="`transformer_lm`: the model width (embedding size).")
    context: int = _key(
        64, help="`transformer_lm`: tokens per window; `text` and `tokens` data are cut into it."
    )


@dataclass
class OptimConfig:
    """The optimizer, and its learning-rate and weight-decay schedules: pure functions of the
    step (`hvcodistill/optim.py`), so a resumed run recomputes them."""

    name: str = _key("sgd", help="`sgd` (with `momentum`, `nesterov`) or `adamw`.")
    lr: Optional[float] = _key(
        None,
        help="The base learning rate, > 0. null: Goyal et al.'s linear scaling, 0.1 x a model's "
        "batch / 256 (a model's batch is G x `train.batch_size`).",
    )
    momentum: float = _key(0.9, help="`sgd`: momentum, >= 0 (> 0 with `nesterov`).")
    nesterov: bool = _key(False, help="`sgd`: Nesterov momentum.")
    weight_decay: float = _key(1e-4, help="The initial weight decay, >= 0.")
    unit: str = _key(
        "epochs",
        help="The unit of `warmup`, `lr_milestones` and `wd_milestones`: `epochs` (per model) "
        "or `steps`.",
    )
    lr_schedule: str = _key(
        "step",
        help="After the linear warm-up: `step` (lr x `lr_gamma` at each of `lr_milestones`), "
        "`cosine` (down to 0 at the last step) or `constant`.",
    )
    warmup: float = _key(0.0, help="Length of the linear warm-up from about 0 to lr, in `unit`.")
    lr_milestones: list[float] = _key(
        factory=list,
        help="`step` schedule: where lr is multiplied by `lr_gamma`, in `unit`; increasing.",
    )
    lr_gamma: float = _key(0.1, help="`step` schedule: the factor at each milestone; > 0.")
    wd_milestones: list[float] = _key(
        factory=list,
        help="Where weight decay becomes the matching entry of `wd_values`, in `unit`; "
        "increasing (the paper's recipe: 1e-4, then 1e-5, then 0).",
    )
    wd_values: list[float] = _key(
        factory=list,
        help="The weight decay from each of `wd_milestones` on: one value per milestone, >= 0.",
    )


@dataclass
class TrainConfig:
    """How long, on what device, and how often to report."""

    steps: int = _key(
        0, help="Updates per model; 0 (or null): use `epochs`. Set exactly one of the two."
    )
    epochs: float = _key(
        0.0, help="Passes over the training set per model; 0 (or null): use `steps`."
    )
    batch_size: int = _key(32, help="Samples per rank per step; a model's batch is G x this.")
    seed: int = _key(
        0,
        help="The data order, augmentation and initial weights are functions of it (model i "
        "starts from seed + i unless `model.init_seed` is set); each rank's stochastic layers "
        "draw from a stream of their own. 0..2**63-1.",
    )
    amp: str = _key(
        "none",
        help="Autocast: `none`, `bf16`, or `fp16` (on GPU only, with a gradient scaler).",
    )
    backend: str = _key(
        "horovod",
        help="The data plane that averages each model's gradients over its group and carries the "
        "exchanges between models: `horovod` (Horovod on the group's MPI communicator; exchanges "
        "over mpi4py, through host memory) or `torch` (torch.distributed process groups: gloo on "
        "CPU, NCCL on GPU with exchanges in device memory; no Horovod needed). See "
        "`hvcodistill/comm/dataplane.py` and docs/running.md.",
    )
    device: str = _key(
        "auto",
        help="`auto` (CUDA when torch sees a GPU, else CPU; an error, exit 2, when the job "
        "requested GPUs and torch sees none), `cpu` or `cuda`. Each rank takes the GPU of its "
        "node-local rank.",
    )
    log_every: int = _key(10, help="Steps between `metrics.jsonl` and TensorBoard points.")
    eval_every: int = _key(0, help="Steps between validations; 0: only at the end.")
    progress: bool = _key(True, help="A progress line on world rank 0.")


@dataclass
class RunConfig:
    """Where the run writes, and how it survives a stop."""

    dir: str = _key(
        "runs/default",
        help="The run directory: `config.yaml`, `metrics.jsonl`, `tb/`, `checkpoints/`, "
        "`model_<i>.pt`, `summary.json`. One directory shared by every node.",
    )
    checkpoint_every: int = _key(
        0, help="Steps between checkpoints; 0: only on preemption and at the end."
    )
    keep_checkpoints: int = _key(3, help="Checkpoints kept per model, the newest; >= 1.")
    resume: bool = _key(
        True,
        help="Continue from the newest complete checkpoint in `run.dir`; false refuses a "
        "`run.dir` that holds checkpoints.",
    )
    preempt_check_every: int = _key(
        0,
        help="Steps between the ranks' agreements on a SIGUSR1/SIGTERM (a stop comes within two "
        "of them); 0: about every 0.1 s of training, from the step time the ranks agree on.",
    )
    hang_timeout: float = _key(
        15.0,
        help="Seconds without a heartbeat from every rank before the job is aborted (a rank or "
        "node lost, a link cut: `hvcodistill/comm/watchdog.py`); 0: never.",
    )


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


# Choices with no registry of their own yet: the data-plane module will own train.amp and
# train.device, and data.order is what data/sharding.BatchPlan takes.
AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DATA_ORDERS = ("shared", "disjoint")

# A choice key's valid values are the names its registry holds (read live: a mode registered
# later is a valid name too).
CHOICES = {
    "codistill.mode": MODES,
    "codistill.distance": DISTANCES,
    "codistill.payload_dtype": PAYLOAD_DTYPES,
    "data.name": DATA_NAMES,
    "data.order": DATA_ORDERS,
    "model.name": MODEL_NAMES,
    "optim.name": OPTIMIZERS,
    "optim.unit": UNITS,
    "optim.lr_schedule": LR_SCHEDULES,
    "train.amp": AMP_MODES,
    "train.backend": BACKENDS,
    "train.device": DEVICES,
}
# Keys whose null means 0 (unset): train.epochs=null with train.steps=N says "use steps".
NULL_IS_ZERO = ("train.steps", "train.epochs")

# DataLoader workers per rank. Each is a process holding its own copy of the dataset object; a
# node runs ranks x workers of them, so beyond a few dozen per rank a value is a typo, and
# 100000000 would spawn processes until the machine stalls (a hang, not an error).
MAX_WORKERS = 64
# torch.manual_seed takes [-2**63, 2**64 - 1]; model i starts from seed + i, so seeds stop at
# 2**63 - 1.
MAX_SEED = 2**63 - 1


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Cast a YAML/CLI value to the field's type, or fail naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:  # Optional[X]
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
        try:  # YAML reads 1e-5 (no dot) as a string
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
        if abs(value) > 1e308:  # an int too large for a float: float() would overflow
            raise ConfigError(f"config key {key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key {key}: expected a string, got {value!r}")
        return str(value)
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    sub = getattr(cfg, section, None) if section in sections else None
    fields = {f.name: f for f in dataclasses.fields(sub)} if sub is not None else {}
    if not name or name not in fields:
        raise ConfigError(f"unknown config key {key!r} (see hvcodistill/config.py for the keys)")
    if value is None and key in NULL_IS_ZERO:
        value = 0
    if key in CHOICES and not isinstance(value, str):
        raise _not_a_choice(key, value)
    hints = typing.get_type_hints(type(sub))
    setattr(sub, name, _coerce(key, value, hints[name]))


def _not_a_choice(key: str, value: Any) -> ConfigError:
    # train.amp=no reaches us as False: say what YAML made of it, and list the valid values
    hint = (
        " (YAML reads an unquoted yes/no/on/off as true/false)" if isinstance(value, bool) else ""
    )
    return ConfigError(f"config key {key}: {value!r} is not one of {', '.join(CHOICES[key])}{hint}")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if not prefix and (isinstance(v, dict) or v is None):  # `run:` left empty is no error
            out.update(_flatten(v or {}, key + "."))
        else:
            out[key] = v
    return out


def _refuse_duplicate_keys(node: yaml.Node, file: Path, prefix: str = "") -> None:
    """YAML keeps the last of two equal keys without a word; a config names each key once."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, file, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}" if isinstance(key_node, yaml.ScalarNode) else None
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise ConfigError(
                f"config file {file} line {line}: key {key} is given twice "
                f"(first on line {first_line[key]}); keep one"
            )
        if key is not None:
            first_line[key] = line
            _refuse_duplicate_keys(value_node, file, key + ".")


def _read_config_file(path: str) -> dict:
    """The file's keys, dotted; each problem is one line naming the file (and line)."""
    p = config_path(path)  # a path, or else the name of a shipped config
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {p} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}"
        ) from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicate_keys(node, p)
        tree = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or str(e).splitlines()[0]
        if "'\\t'" in problem:
            problem += " (YAML indents with spaces, never tabs)"
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    finally:
        loader.dispose()
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    keys = _flatten(tree or {})
    if not keys:  # the built-in defaults would train without a word
        raise ConfigError(f"config file {p} is empty: it sets no key")
    return keys


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Defaults, then the YAML file (a path or a shipped config's name), then `dotted.key=value`
    overrides (values parsed as YAML). No path: the defaults and the overrides (library use; the
    train command itself asks for --config)."""
    cfg = Config()
    if path:
        for key, value in _read_config_file(path).items():
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
    mode = get_mode(c.mode)
    mode.resolve(c)
    positive = {
        "codistill.every": c.every,
        "train.batch_size": t.batch_size,
        "model.layers": cfg.model.layers,
        "model.heads": cfg.model.heads,
        "model.width": cfg.model.width,
        "model.context": cfg.model.context,
        "train.log_every": t.log_every,
        "run.keep_checkpoints": cfg.run.keep_checkpoints,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key {key} must be >= 1, got {value}")
    non_negative = {
        "codistill.alpha": c.alpha,
        "codistill.burn_in_steps": c.burn_in_steps,
        "codistill.topk": c.topk,
        "train.steps": t.steps,
        "train.epochs": t.epochs,
        "train.eval_every": t.eval_every,
        "optim.warmup": o.warmup,
        "optim.weight_decay": o.weight_decay,
        "data.workers": cfg.data.workers,
        "run.checkpoint_every": cfg.run.checkpoint_every,
        "run.preempt_check_every": cfg.run.preempt_check_every,
        "run.hang_timeout": cfg.run.hang_timeout,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key {key} must be >= 0, got {value}")
    if cfg.data.workers > MAX_WORKERS:
        raise ConfigError(
            f"config key data.workers must be <= {MAX_WORKERS} (worker processes per rank, "
            f"each with its own copy of the dataset), got {cfg.data.workers}"
        )
    for key, seed in (("train.seed", t.seed), ("model.init_seed", cfg.model.init_seed)):
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ConfigError(
                f"config key {key} must lie in [0, 2**63 - 1] (what torch.manual_seed takes, "
                f"with room for + model id), got {seed}"
            )
    if o.momentum < 0 or (o.nesterov and o.momentum == 0):
        raise ConfigError(
            f"config key optim.momentum must be >= 0 (> 0 with optim.nesterov), got {o.momentum}"
        )
    if o.lr_gamma <= 0:
        raise ConfigError(f"config key optim.lr_gamma must be > 0, got {o.lr_gamma}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in o.wd_values):
        raise ConfigError(
            f"config key optim.wd_values must be non-negative numbers, got {o.wd_values}"
        )
    if c.refresh_delay is not None and c.refresh_delay < 0:
        raise ConfigError(f"config key codistill.refresh_delay must be >= 0, got {c.refresh_delay}")
    if c.temperature <= 0:
        raise ConfigError(f"config key codistill.temperature must be > 0, got {c.temperature}")
    if o.lr is not None and o.lr <= 0:
        raise ConfigError(
            f"config key optim.lr must be > 0 (or null for 0.1 x batch / 256), got {o.lr}"
        )
    if (t.steps > 0) == (t.epochs > 0):
        raise ConfigError("set exactly one of train.steps and train.epochs (the other 0)")
    mode.check(c, data_order=cfg.data.order)
    if len(o.wd_milestones) != len(o.wd_values):
        raise ConfigError(
            "config keys optim.wd_milestones and optim.wd_values must have the same length"
        )
    for key, ms in (
        ("optim.lr_milestones", o.lr_milestones),
        ("optim.wd_milestones", o.wd_milestones),
    ):
        if list(ms) != sorted(ms) or any(not isinstance(m, (int, float)) or m < 0 for m in ms):
            raise ConfigError(
                f"config key {key} must be an increasing list of non-negative numbers"
            )
    if any(not isinstance(h, int) or h < 1 for h in cfg.model.hidden):
        raise ConfigError(
            f"config key model.hidden must be a list of positive integers, got {cfg.model.hidden}"
        )
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"config key model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if cfg.model.dropout and cfg.model.name not in ("mlp", "transformer_lm"):
        raise ConfigError(
            f"config key model.dropout applies to model.name=mlp or transformer_lm only, "
            f"got {cfg.model.name}"
        )
    if cfg.model.width % cfg.model.heads:
        raise ConfigError(
            f"config key model.width={cfg.model.width} must be a multiple of "
            f"model.heads={cfg.model.heads}"
        )
    language = cfg.data.name in ("text", "tokens")
    if language != (cfg.model.name == "transformer_lm"):
        raise ConfigError(
            f"config key model.name={cfg.model.name} does not fit data.name={cfg.data.name}: "
            "token data (text, tokens) goes with transformer_lm, and only it"
        )
    _check_run_dir(cfg.run.dir)


def _check_run_dir(run_dir: str) -> None:
    if not run_dir.strip():
        raise ConfigError(
            "config key run.dir must not be empty (the run would write its files into "
            "the current directory): name a directory"
        )
    limit = _name_max(Path(run_dir))
    for part in Path(run_dir).parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise ConfigError(
                f"config key run.dir: its part {part[:24]}... is {size} bytes long, over "
                f"the {limit} bytes a file name may have here"
            )


def _name_max(path: Path) -> int:
    """The longest file name, in bytes, of the file system that would hold `path`."""
    probe = path.absolute()
    while not os.path.exists(probe) and probe != probe.parent:  # False, not OSError, on any name
        probe = probe.parent
    try:
        limit = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not POSIX, or the file system will not say
        return 255
    return limit if limit > 0 else 255  # -1: no fixed limit


def check_against_data(cfg: Config, num_classes: int) -> None:
    """Checks that need the built data: the number of classes (a language model's vocabulary)."""
    topk = cfg.codistill.topk
    if topk >= num_classes:
        raise ConfigError(
            f"config key codistill.topk must be < the data's {num_classes} classes (or 0 "
            f"to send every logit), got {topk}"
        )


def start_warnings(cfg: Config, total_steps: int) -> list[str]:
    """One line each for settings that are valid but defeat the run's purpose, to say at start."""
    c = cfg.codistill
    if c.n_models < 2 or c.alpha == 0:
        return []
    mode = get_mode(c.mode)
    burn_in = mode.default_burn_in(c.every) if c.burn_in_steps is None else c.burn_in_steps
    delay = mode.default_refresh_delay(c.every) if c.refresh_delay is None else c.refresh_delay
    first = mode.distills_from(burn_in=burn_in, refresh_delay=delay)
    if first < total_steps:
        return []
    setting = f"codistill.burn_in_steps={burn_in}"
    if first != burn_in:
        setting += f" + codistill.refresh_delay={delay}"
    return [
        f"{setting} >= the run's {total_steps} steps: the models never distil "
        "(alpha is 0 throughout)"
    ]


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config, written by the one atomic-write rule (hvcodistill/files.py)."""
    write_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
