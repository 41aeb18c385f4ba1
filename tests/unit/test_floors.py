"""The floors pyproject.toml declares are the ones the code needs.

Older interpreters and torch releases cannot be installed here, so the floors are checked against
facts: each entry below is a feature with the first release that has it and a pattern that finds
its use. The declared floor must cover every feature the code uses, and equal the newest of them
(a floor raised without a reason here fails too: add the feature that needs it). And every module
must parse as the oldest Python declared.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    [*ROOT.glob("hvcodistill/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("scripts/**/*.py")]
)

# (dependency, first version with it, feature, pattern over the source text)
FACTS = [
    ("python", (3, 9), "str.removeprefix", r"\.removeprefix\("),
    (
        "python",
        (3, 9),
        "builtin generics in annotations read at run time (list[int])",
        r":\s*list\[\w+\]\s*=",
    ),
    ("python", (3, 10), "zip(strict=True)", r"\bzip\([^)]*strict="),
    ("python", (3, 10), "dataclass(slots=/kw_only=)", r"@dataclass\([^)]*(slots|kw_only)="),
    ("python", (3, 10), "match statement", r"^\s*match\s+[^=]+:\s*$"),
    ("python", (3, 11), "tomllib", r"^\s*(import|from)\s+tomllib\b"),
    ("python", (3, 11), "typing.Self", r"\bfrom typing import[^\n]*\bSelf\b|typing\.Self\b"),
    ("python", (3, 11), "except*", r"\bexcept\s*\*"),
    ("python", (3, 11), "enum.StrEnum", r"\bStrEnum\b"),
    ("python", (3, 11), "datetime.UTC", r"\bdatetime\.UTC\b"),
    ("python", (3, 12), "itertools.batched", r"\bbatched\("),
    ("torch", (1, 10), "torch.autocast(device_type=...)", r"torch\.autocast\("),
    ("torch", (1, 13), "torch.load(weights_only=...)", r"weights_only="),
    ("torch", (2, 0), "F.scaled_dot_product_attention", r"scaled_dot_product_attention\("),
    ("torch", (2, 3), "torch.amp.GradScaler(device)", r"torch\.amp\.GradScaler\("),
    ("torch", (2, 4), "torch.serialization.add_safe_globals", r"add_safe_globals\("),
    ("torch", (2, 6), "torch.accelerator", r"torch\.accelerator\b"),
    ("torch", (2, 6), "DataLoader(in_order=...)", r"\bin_order="),
    ("torchvision", (0, 13), "torchvision models built with weights=None", r"\(weights=None"),
    ("numpy", (1, 17), "np.random.SeedSequence / default_rng", r"SeedSequence|default_rng\("),
]
# Tight floors: declared == the newest feature used. Others: declared >= it.
TIGHT = ("python", "torch")


def declared() -> dict[str, tuple[int, ...]]:
    """{dependency: floor} from pyproject.toml (as text: tomllib is 3.11+, the floor 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    floors = {"python": re.search(r'^requires-python\s*=\s*">=\s*([\d.]+)"', text, re.M).group(1)}
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.M | re.S).group(1)
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([\d.]+)', deps):
        floors[name.lower()] = version
    return {k: tuple(int(p) for p in v.split(".")) for k, v in floors.items()}


def _runtime_pep604(tree: ast.AST, source: str) -> bool:
    """`X | None` that Python evaluates (an annotation, without
    `from __future__ import annotations`)."""
    future = any(
        isinstance(n, ast.ImportFrom)
        and n.module == "__future__"
        and any(a.name == "annotations" for a in n.names)
        for n in ast.walk(tree)
    )
    if future:
        return False
    annotations = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = n.args
            annotations += [
                x.annotation
                for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg)
                if x is not None and x.annotation is not None
            ]
            annotations += [n.returns] if n.returns else []
        elif isinstance(n, ast.AnnAssign):
            annotations.append(n.annotation)
    return any(
        isinstance(m, ast.BinOp) and isinstance(m.op, ast.BitOr)
        for a in annotations
        for m in ast.walk(a)
    )


def needed() -> dict[str, tuple[tuple[int, ...], list[str]]]:
    """{dependency: (newest version a used feature needs, [where each such feature is used])}."""
    out: dict[str, tuple[tuple[int, ...], list[str]]] = {}

    def use(dep, version, what):
        best, where = out.get(dep, ((0,), []))
        if version > best:
            out[dep] = (version, [what])
        elif version == best:
            where.append(what)

    for path in SOURCES:
        source = path.read_text()
        rel = path.relative_to(ROOT)
        for dep, version, feature, pattern in FACTS:
            if path.name != "test_floors.py" and re.search(pattern, source, re.M):
                use(dep, version, f"{feature} ({rel})")
        if _runtime_pep604(ast.parse(source), source):
            use("python", (3, 10), f"X | Y evaluated at run time ({rel})")
    return out


def test_facts_find_what_they_should():
    """The patterns are live: the code's own known uses are found."""
    found = needed()
    assert found["torch"][0] == (2, 3) and any("GradScaler" in w for w in found["torch"][1]), found[
        "torch"
    ]
    assert found["python"][0] == (3, 10) and any(
        "zip(strict=True)" in w for w in found["python"][1]
    )
    # the run-time `X | Y` check has no use in the code now (tests/helpers.py, where run_ranks
    # went from conftest.py, has `from __future__ import annotations`): shown on source text
    for source, evaluated in (
        ("def f(x: int | None = None): ...\n", True),
        ("x: int | None = None\n", True),
        ("from __future__ import annotations\ndef f(x: int | None = None): ...\n", False),
        ("y = 1 | 2\n", False),
    ):
        assert _runtime_pep604(ast.parse(source), source) is evaluated, source


@pytest.mark.parametrize("dep", ["python", "torch", "torchvision", "numpy"])
def test_declared_floor_covers_the_code(dep):
    floors, (version, where) = declared(), needed()[dep]
    assert dep in floors, (
        f"pyproject.toml declares no floor for {dep}; the code needs {version}: {where}"
    )
    assert floors[dep] >= version, (
        f"{dep} floor {floors[dep]} is below {version}, needed by {where}"
    )
    if dep in TIGHT:
        assert floors[dep] == version, (
            f"{dep} floor {floors[dep]} is above what the code needs ({version}, "
            f"{where}): add the feature that needs it to FACTS"
        )


def test_every_module_parses_as_the_oldest_python_declared():
    oldest = declared()["python"][:2]
    for path in SOURCES:
        ast.parse(path.read_text(), filename=str(path), feature_version=oldest)
