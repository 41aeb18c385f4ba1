"""A study file and the runs it makes: variants x grid axes x seeds, one run directory each.

    name: paper_miniature                  # default study dir: runs/studies/<name>
    config: configs/mnist1d_codistill.yaml # base config; a variant may name its own
    ranks: 4                               # default ranks per run; a variant may say its own
    seeds: [0, 1, 2, 3, 4]                 # or n_seeds: 5 (seeds 0..4)
    baseline: allreduce                    # the report's paired differences are against it
    compare: [[predictions_every=1, alpha0]]   # more paired differences: [variant, reference]
    checkpoint_every: 1000                 # run.checkpoint_every of every run (resumes need it)
    overrides: [train.steps=2000]          # dotted.key=value for every run
    grid: {}                               # axes for every variant (expanded as a product)
    variants:
      allreduce: {overrides: [codistill.n_models=1, codistill.alpha=0]}
      predictions:
        grid: {codistill.every: [1, 10, 100]}     # -> predictions_every=1, _every=10, _every=100

A run is one (variant, seed): `<study dir>/<variant>/seed_<s>/`, trained with the overrides
[run.checkpoint_every] + study + variant + axis values + [train.seed, run.dir, run.resume=true],
later ones winning. Everything here is pure (files in, values out): no MPI, nothing launched.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hvcodistill.comm.topology import Topology
from hvcodistill.errors import ConfigError
from hvcodistill.resources import config_path, root, study_path

# A checkout's root, else the installed package's folder: both hold configs/ and slurm/.
REPO_ROOT = root()
STUDY_KEYS = (
    "name",
    "description",
    "config",
    "dir",
    "ranks",
    "seeds",
    "n_seeds",
    "baseline",
    "compare",
    "checkpoint_every",
    "overrides",
    "grid",
    "variants",
)
VARIANT_KEYS = ("config", "ranks", "overrides", "grid")
DEFAULT_CHECKPOINT_EVERY = 1000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


@dataclass(frozen=True)
class Variant:
    name: str  # e.g. predictions_every=10
    base: str  # the variant named in the file: predictions
    axes: dict  # {dotted key: value} of the grid point
    ranks: int
    config: str  # absolute path of the base config
    overrides: tuple  # variant + axis overrides (what distinguishes it)


@dataclass(frozen=True)
class Run:
    index: int  # 0-based position in the study
    variant: str
    seed: int
    ranks: int
    config: str
    overrides: tuple  # everything passed to hvcodistill.train after --config
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.variant}/seed_{self.seed}"

    def train_argv(self, python: str) -> list:
        return [python, "-m", "hvcodistill.train", "--config", self.config, *self.overrides]


@dataclass
class Study:
    name: str
    source: str  # the study file
    dir: Path
    seeds: list
    baseline: Optional[str]
    variants: list  # [Variant], in file order, grid points in product order
    compare: list  # [(variant, reference)]
    checkpoint_every: Optional[int]
    description: str = ""
    runs: list = field(default_factory=list)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def to_json(self) -> dict:
        """What the report needs without the study file: written to <study dir>/study.json."""
        return {
            "name": self.name,
            "source": self.source,
            "description": self.description,
            "seeds": self.seeds,
            "baseline": self.baseline,
            "compare": [list(c) for c in self.compare],
            "variants": [
                {
                    "name": v.name,
                    "base": v.base,
                    "axes": v.axes,
                    "ranks": v.ranks,
                    "config": v.config,
                    "overrides": list(v.overrides),
                }
                for v in self.variants
            ],
            "runs": [
                {
                    "index": r.index,
                    "variant": r.variant,
                    "seed": r.seed,
                    "ranks": r.ranks,
                    "dir": str(r.dir),
                    "config": r.config,
                    "overrides": list(r.overrides),
                }
                for r in self.runs
            ],
        }


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"study {source}: {message}")


def resolve_path(path: str, source: str) -> str:
    """A config path: absolute, else relative to the current directory, else to the repository,
    else a shipped config (`configs/mnist1d_codistill.yaml` or `mnist1d_codistill`, as from an
    installed package). Made absolute, not resolved: a checkout's configs/ is a link."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return os.path.abspath(candidate)
    try:
        return os.path.abspath(config_path(path))
    except ConfigError:
        raise _fail(
            source,
            f"config file {path} not found (looked in {Path.cwd()}, {REPO_ROOT} "
            "and the shipped configs)",
        ) from None


def format_value(value: Any) -> str:
    """An axis value as it appears in a variant name: 1e-05, true, 128-64."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = "-".join(format_value(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def override_value(value: Any) -> str:
    """An axis value as the trainer's `key=value` reads it (YAML), with no spaces."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _short_names(keys: list) -> dict:
    """codistill.every -> every, unless two axes end in the same word (then the whole key)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _check_overrides(items: Any, where: str, source: str) -> tuple:
    if items is None:
        return ()
    if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
        raise _fail(
            source,
            f"{where}: overrides must be a list of 'dotted.key=value' strings, got {items!r}",
        )
    return tuple(i.strip() for i in items)


def _check_grid(grid: Any, where: str, source: str) -> dict:
    if grid is None:
        return {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise _fail(
            source, f"{where}: grid must map dotted.key to a non-empty list of values, got {grid!r}"
        )
    for key in grid:
        if not isinstance(key, str) or "." not in key:
            raise _fail(
                source,
                f"{where}: grid axis {key!r} must be a dotted config key like codistill.every",
            )
    return dict(grid)


def _positive_int(value: Any, where: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(source, f"{where} must be a positive integer, got {value!r}")
    return value


def load_study(
    path: str,
    *,
    study_dir: Optional[str] = None,
    extra_overrides: Optional[list] = None,
    check_configs: bool = True,
) -> Study:
    """Read and expand a study file; `study_dir` moves it, `extra_overrides` go after the study's
    on every run. With `check_configs` every run's config is loaded as the trainer will
    (defaults -> file -> overrides) and its layout checked against its ranks, so a bad study
    stops here with one line rather than after hours of runs."""
    source = str(path)
    p = study_path(str(path))  # a path, or a shipped study by name
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise _fail(source, f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise _fail(source, "must hold a mapping (name, config, variants, seeds, ...)")
    unknown = sorted(set(tree) - set(STUDY_KEYS))
    if unknown:
        raise _fail(source, f"unknown key(s) {unknown}; allowed: {', '.join(STUDY_KEYS)}")

    name = str(tree.get("name") or p.stem)
    if not NAME.match(name):
        raise _fail(source, f"name {name!r} may hold only letters, digits and . _ = + -")
    if "seeds" in tree and "n_seeds" in tree:
        raise _fail(source, "give seeds or n_seeds, not both")
    if "n_seeds" in tree:
        all_seeds = list(range(_positive_int(tree["n_seeds"], "n_seeds", source)))
    else:
        all_seeds = tree.get("seeds", [0])
        if (
            not isinstance(all_seeds, list)
            or not all_seeds
            or len(set(all_seeds)) != len(all_seeds)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in all_seeds)
        ):
            raise _fail(
                source, f"seeds must be a list of distinct non-negative integers, got {all_seeds!r}"
            )
    default_ranks = tree.get("ranks")
    default_config = tree.get("config")
    common = _check_overrides(tree.get("overrides"), "overrides", source) + tuple(
        extra_overrides or ()
    )
    common_grid = _check_grid(tree.get("grid"), "grid", source)
    checkpoint_every = tree.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 0
    ):
        raise _fail(
            source,
            "checkpoint_every must be an integer >= 0 (or null: the config's), "
            f"got {checkpoint_every!r}",
        )

    declared = tree.get("variants")
    if not isinstance(declared, dict) or not declared:
        raise _fail(source, "variants must map names to {overrides, ranks, config, grid}")
    variants: list = []
    for base, body in declared.items():
        body = body or {}
        where = f"variant {base}"
        if not isinstance(base, str) or not NAME.match(base):
            raise _fail(source, f"{where}: a name may hold only letters, digits and . _ = + -")
        if not isinstance(body, dict) or set(body) - set(VARIANT_KEYS):
            raise _fail(
                source, f"{where}: allowed keys are {', '.join(VARIANT_KEYS)}, got {body!r}"
            )
        ranks = body.get("ranks", default_ranks)
        if ranks is None:
            raise _fail(source, f"{where}: no ranks (set ranks for the study or the variant)")
        ranks = _positive_int(ranks, f"{where}: ranks", source)
        config = body.get("config", default_config)
        if not config:
            raise _fail(source, f"{where}: no config (set config for the study or the variant)")
        config = resolve_path(str(config), source) if check_configs else str(config)
        own = _check_overrides(body.get("overrides"), where, source)
        grid = {**common_grid, **_check_grid(body.get("grid"), where, source)}
        short = _short_names(list(grid))
        for point in itertools.product(*grid.values()) if grid else [()]:
            axes = dict(zip(grid, point))
            suffix = "_".join(f"{short[k]}={format_value(v)}" for k, v in axes.items())
            variant_name = f"{base}_{suffix}" if suffix else base
            axis_overrides = tuple(f"{k}={override_value(v)}" for k, v in axes.items())
            variants.append(Variant(variant_name, base, axes, ranks, config, own + axis_overrides))
    names = [v.name for v in variants]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _fail(
            source, f"variant name(s) {twice} occur more than once after expanding the grid"
        )

    def known(n: str, what: str) -> str:
        if n not in names:
            hint = [m for m in names if m.startswith(f"{n}_")]
            raise _fail(
                source,
                f"{what} {n!r} is not a variant"
                + (
                    f" (the grid made {', '.join(hint)})"
                    if hint
                    else f"; variants: {', '.join(names)}"
                ),
            )
        return n

    baseline = tree.get("baseline")
    if baseline is not None:
        baseline = known(str(baseline), "baseline")
    compare = []
    for pair in tree.get("compare") or []:
        if not isinstance(pair, list) or len(pair) != 2:
            raise _fail(source, f"compare entries must be [variant, reference] pairs, got {pair!r}")
        compare.append((known(str(pair[0]), "compare"), known(str(pair[1]), "compare")))

    directory = Path(study_dir or tree.get("dir") or f"runs/studies/{name}").resolve()
    study = Study(
        name=name,
        source=str(p.resolve()),
        dir=directory,
        seeds=all_seeds,
        baseline=baseline,
        variants=variants,
        compare=compare,
        checkpoint_every=checkpoint_every,
        description=str(tree.get("description") or ""),
    )
    study.runs = expand(study, common)
    if check_configs:
        for run in study.runs:
            check_run(run)
    return study


def select_runs(study: Study, *, only: Optional[list] = None, seeds: Optional[list] = None) -> list:
    """The study's runs of some variants (names, or the base names of grid points) and seeds."""
    names = [v.name for v in study.variants]
    missing = [o for o in only or [] if not any(o in (v.name, v.base) for v in study.variants)]
    if missing:
        raise ConfigError(
            f"--only: no variant {', '.join(missing)} in {study.source}; "
            f"variants: {', '.join(names)}"
        )
    unknown = [s for s in seeds or [] if s not in study.seeds]
    if unknown:
        raise ConfigError(f"--seeds: {unknown} are not seeds of {study.source} ({study.seeds})")
    chosen = {v.name for v in study.variants if not only or v.name in only or v.base in only}
    return [r for r in study.runs if r.variant in chosen and (not seeds or r.seed in seeds)]


def expand(study: Study, common: tuple = ()) -> list:
    """One run per (variant, seed), variants in file order, seeds inner."""
    runs = []
    for variant in study.variants:
        for seed in study.seeds:
            run_dir = study.dir / variant.name / f"seed_{seed}"
            first = (
                (f"run.checkpoint_every={study.checkpoint_every}",)
                if study.checkpoint_every is not None
                else ()
            )
            last = (f"train.seed={seed}", f"run.dir={run_dir}", "run.resume=true")
            runs.append(
                Run(
                    index=len(runs),
                    variant=variant.name,
                    seed=seed,
                    ranks=variant.ranks,
                    config=variant.config,
                    overrides=first + tuple(common) + variant.overrides + last,
                    dir=run_dir,
                )
            )
    return runs


def check_run(run: Run) -> None:
    """The run's config as the trainer will read it, and its layout on its ranks."""
    # config validation reads the registries, which import torch: the report reads this module
    # without them
    from hvcodistill.config import load_config

    try:
        cfg = load_config(run.config, list(run.overrides))
        Topology(run.ranks, cfg.codistill.n_models)
    except ConfigError as e:
        raise ConfigError(f"run {run.name}: {e}") from None


# ----------------------------------------------------------------------------- run state on disk
LOG_NAME = "run.log"  # a run's output, beside it
RESULT_NAME = "sweep_run.json"  # what the last local attempt of a run ended with


def checkpoint_step(run_dir: Path) -> int:
    """The newest step every model has a checkpoint sidecar for (0: none); what a resume starts
    from."""
    per_model = []
    for model in sorted((run_dir / "checkpoints").glob("model_*")):
        steps = [
            int(p.stem.split("_")[1])
            for p in model.glob("step_*.json")
            if p.stem.split("_")[1].isdigit()
        ]
        per_model.append(max(steps, default=0))
    return min(per_model, default=0)


def run_state(run: Run) -> str:
    """done (summary.json), interrupted (a checkpoint to resume from), started (a log, no
    checkpoint) or new."""
    if (run.dir / "summary.json").is_file():
        return "done"
    if checkpoint_step(run.dir):
        return "interrupted"
    if run.dir.exists() and any(run.dir.iterdir()):
        return "started"
    return "new"
