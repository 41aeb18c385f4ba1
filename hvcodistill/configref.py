"""The configuration reference, rendered from the config's dataclasses (hvcodistill/config.py).

Every key's type, default and help come from its field, and a choice key's values from the
registry it names (config.CHOICES), so the page cannot say what the code does not. `make docs`
writes it to docs/configuration.md (scripts/config_reference.py); tests/unit/test_docs.py checks
that the page is current. A library module, not a command.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from hvcodistill.config import CHOICES, NULL_IS_ZERO, Config

PAGE = Path("docs") / "configuration.md"

HEADER = """\
# Configuration reference

<!-- Generated from hvcodistill/config.py by `make docs` (hvcodistill/configref.py): do not edit
by hand. tests/unit/test_docs.py checks that this page is current. -->

A run's settings are these defaults, then a YAML file (`--config FILE`, or a shipped config's
name such as `digits_codistill`), then any number of `dotted.key=value` overrides on the command
line, in that order:

```sh
python -m hvcodistill.launch -np 4 \\
    python -m hvcodistill.train --config configs/digits_codistill.yaml codistill.every=10
```

A file has one mapping per section, as in
[configs/digits_codistill.yaml](../hvcodistill/configs/digits_codistill.yaml). Every key follows
these rules:

- An unknown key, a key given twice in a file, a wrong type, a value that is not one of its
  choices, or a setting the others rule out stops every rank with one line naming the key, exit 2.
- Override values are parsed as YAML: `model.hidden=[64,32]`, `optim.lr=null`,
  `data.augment=true`. YAML reads an unquoted yes/no/on/off as true/false; quote such strings.
- No number may be NaN or infinite, in a list either.
- {null_is_zero} take null as 0 (unset).
- A choice key accepts the names its registry holds when the run starts: an exchange mode
  registered in `hvcodistill/comm/modes.py` is a valid `codistill.mode`.
- The resolved config, with every null that has a mode-dependent default filled in, is written
  to `run.dir/config.yaml`. Which keys must match a checkpoint to resume from it:
  [clusters.md](clusters.md#resume).
"""


def type_name(annotation: str | type) -> str:
    """A field's annotation as a reader writes it: `Optional[int]` -> `int or null`."""
    text = annotation if isinstance(annotation, str) else annotation.__name__
    if text.startswith("Optional[") and text.endswith("]"):
        return f"{type_name(text[len('Optional[') : -1])} or null"
    return text


def default_of(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def yaml_value(value) -> str:
    """A default as one would write it in a config file (YAML reads it back to the value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return repr(value)


def sections() -> list[tuple[str, type]]:
    """(section name, dataclass) of every section of Config, in file order."""
    return [(f.name, f.default_factory) for f in dataclasses.fields(Config)]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The whole page, as markdown."""
    nulls = " and ".join(f"`{k}`" for k in NULL_IS_ZERO)
    out = [HEADER.format(null_is_zero=nulls)]
    for name, cls in sections():
        out.append(f"\n## {name}\n")
        doc = typing.cast(str, cls.__doc__ or "")
        if doc and not doc.startswith(f"{cls.__name__}("):  # not the dataclass's own signature
            out.append(_cell(doc) + "\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            help_text = f.metadata.get("help")
            if not help_text:
                raise ValueError(f"config key {key} has no help text in hvcodistill/config.py")
            kind = type_name(f.type)
            if key in CHOICES:
                kind += ": " + ", ".join(f"`{c}`" for c in CHOICES[key])
            default = _cell(yaml_value(default_of(f)))
            out.append(f"| `{key}` | {_cell(kind)} | `{default}` | {_cell(help_text)} |")
    return "\n".join(out) + "\n"


def write(path: Path = PAGE) -> bool:
    """Write the page; True if it changed."""
    text = render()
    path = Path(path)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True
