"""The files the package ships: experiment configs, study files and sbatch templates.

They are package data, so an installed package carries them:

    hvcodistill/configs/*.yaml     experiments      (--config NAME or --config PATH)
    hvcodistill/studies/*.yaml     study files      (beside the study modules)
    hvcodistill/slurm/*.sbatch     SLURM templates

The package folder is laid out like a checkout's root (a checkout links configs/, studies/ and
slurm/ at its root to these folders), so a path such as `configs/digits_codistill.yaml` means the
same file whether it is read from a checkout's root or looked up here.
"""

from __future__ import annotations

import functools
from pathlib import Path

from hvcodistill.errors import ConfigError

# The folder of this module: in a checkout (editable install) and in site-packages alike.
PACKAGE = Path(__file__).resolve().parent
SUFFIX = {"configs": ".yaml", "studies": ".yaml", "slurm": ".sbatch"}
WHAT = {"configs": "config file", "studies": "study file", "slurm": "sbatch template"}


def shipped(kind: str) -> Path:
    """The folder of one kind of shipped file: "configs", "studies" or "slurm". In a checkout it
    is named through the root's link, so the paths users read stay `<checkout>/configs/...`."""
    if kind not in SUFFIX:
        raise ValueError(f"unknown kind of shipped file {kind!r} (one of {', '.join(SUFFIX)})")
    return root() / kind


@functools.cache
def root() -> Path:
    """The folder that holds configs/, studies/ and slurm/ as users type them: a checkout's root
    when the package runs from one (its links point into the package), else the package folder.
    The sbatch templates take it as HVCODISTILL_ROOT."""
    parent = PACKAGE.parent
    if (parent / "pyproject.toml").is_file() and (parent / "slurm" / "codistill.sbatch").is_file():
        return parent
    return PACKAGE


def names(kind: str) -> list[str]:
    """The shipped files of one kind, by name (the file name without its suffix), sorted."""
    return sorted(p.stem for p in shipped(kind).glob("*" + SUFFIX[kind]) if p.is_file())


def _shipped_file(kind: str, name: str) -> Path | None:
    """A shipped file by name: `digits_codistill`, `digits_codistill.yaml` or, as typed in a
    checkout's root, `configs/digits_codistill.yaml`. Only files directly in the kind's folder
    count, so no name reaches a module or another kind's file."""
    folder, path = shipped(kind), Path(name)
    if path.is_absolute() or not name.strip():
        return None
    if len(path.parts) == 2 and path.parts[0] == kind:
        path = Path(path.parts[1])
    elif len(path.parts) != 1:
        return None
    for candidate in (folder / path.name, folder / (path.name + SUFFIX[kind])):
        if candidate.suffix == SUFFIX[kind] and candidate.is_file():
            return candidate
    return None


def find(kind: str, name_or_path: str) -> Path:
    """A file given by path (as given, when it exists), else a shipped file of that name.
    Raises ConfigError naming the argument, and, for a name, some shipped ones."""
    path = Path(name_or_path).expanduser()
    what = WHAT[kind]
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{what} {name_or_path} is a directory, not a file")
    found = _shipped_file(kind, str(name_or_path))
    if found is not None:
        return found
    message = f"{what} {name_or_path} not found"
    if not path.is_absolute():
        available = names(kind)
        listed = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        message += f" (nor shipped under that name; shipped: {listed or 'none'})"
    raise ConfigError(message)


def config_path(name_or_path: str) -> Path:
    """An experiment config: a path, or a shipped config's name (`digits_codistill`)."""
    return find("configs", name_or_path)


def study_path(name_or_path: str) -> Path:
    """A study file: a path, or a shipped study's name (`paper_miniature`)."""
    return find("studies", name_or_path)


def sbatch_path(name: str) -> Path:
    """A shipped sbatch template by name (`codistill`, `sweep.sbatch`); never a local file."""
    found = _shipped_file("slurm", name)
    if found is None:
        raise ConfigError(
            f"no shipped sbatch template {name} (shipped: {', '.join(names('slurm'))})"
        )
    return found
