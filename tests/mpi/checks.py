"""The check cases under real ranks, every case of a world size in one job:

    mpirun -np W python tests/mpi/checks.py CASE [CASE ...]

A case is NAME or NAME:ARG (CASES below: `exchange:weights`, `payload:fp16`, `refresh`, ...),
run with M = W / 2 models, on the default data plane; NAME:ARG/BACKEND runs it with
train.backend=BACKEND (`invariants:weights/torch`). The cases run in turn in the same ranks: each
builds its own trainer (its own config, communicators and data plane on its own group), and before
the next case starts a weights refresh still in flight is finished, the logs are closed and the
data plane is shut down (common.close_case; the driver fails a case that leaves Horovod running).
Rank 0 prints one line per case, `CASE <case>: <result>`. A case that fails prints
`rank R: FAIL: <case>: <why>` and ends the job (MPI Abort): the cases after it print nothing.

The tests' side is result() below: the session's selected tests name their case in a `check`
parameter, (W, case); the first test of a world size starts the one job of every case of that
size, and each test asserts on its own case's line.
"""

from __future__ import annotations

import sys

# case name -> the module (here in tests/mpi) whose run(arg, overrides) returns its result line
CASES = {
    "topology": "check_topology",
    "invariants": "check_group_invariants",
    "exchange": "check_exchange",
    "payload": "check_payload",
    "refresh": "check_refresh",
    "dropout": "check_dropout",
}


def main(cases: list[str]) -> None:
    import importlib
    import traceback

    import common
    from mpi4py import MPI

    try:  # a torch-only install (HVCODISTILL_HOROVOD=0 set-up) runs the /torch cases
        import horovod.torch as hvd
    except ImportError:
        hvd = None

    world = MPI.COMM_WORLD
    for case in cases:
        spec, _, backend = case.partition("/")
        name, _, arg = spec.partition(":")
        common.CASE = case
        if name not in CASES:
            common.fail(f"no such case (cases: {', '.join(CASES)})")
        overrides = [f"codistill.n_models={world.Get_size() // 2}"]
        if backend:
            overrides.append(f"train.backend={backend}")
        try:
            line = importlib.import_module(CASES[name]).run(arg, overrides)
            common.close_case()
        except BaseException as e:  # one line naming the case, then the traceback
            common.fail(f"{e!r}\n{traceback.format_exc()}")
        if hvd is not None and hvd.is_initialized():
            common.fail("Horovod is still running after the case")
        world.Barrier()
        if world.Get_rank() == 0:
            print(f"CASE {case}: {line}", flush=True)
    common.CASE = None


# ------------------------------------------------------------------------- the tests' side
_jobs: dict[int, tuple] = {}  # W -> (cases, exit code, stdout, stderr), once per session


def ident(check: tuple[int, str]) -> str:
    """A test id for a `check` parameter (W, case)."""
    return f"{check[1]}-np{check[0]}"


def _selected(session, np: int) -> list[str]:
    """The cases of W = np that the session's selected tests name, in their order."""
    cases = []
    for item in session.items:
        if item.get_closest_marker("skip"):  # e.g. a Horovod case where Horovod is missing
            continue
        check = getattr(item, "callspec", None) and item.callspec.params.get("check")
        if isinstance(check, tuple) and check[0] == np and check[1] not in cases:
            cases.append(check[1])
    return cases


def _launch(np: int, cases: list[str]) -> tuple:
    import subprocess

    from tests.helpers import MPI_DIR, run_ranks

    # a guard against a hang only: a case takes seconds to a minute on a loaded 2-core machine
    timeout = 300 + 180 * len(cases)
    try:
        proc = run_ranks(np, [str(MPI_DIR / "checks.py"), *cases], timeout=timeout, check=False)
        return cases, proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:

        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else b or ""

        return cases, f"killed after {timeout} s", text(e.stdout), text(e.stderr)


def result(request, check: tuple[int, str]) -> str:
    """The result line of case check[1] from the session's one job of check[0] ranks (started
    by the first test that asks); fails naming the case when that case printed no line, or when
    the job failed after printing every case's line."""
    import pytest

    np, case = check
    if np not in _jobs:
        cases = _selected(request.session, np)
        _jobs[np] = _launch(np, cases if case in cases else [*cases, case])
    cases, code, out, err = _jobs[np]
    if case not in cases:  # not selected when the job started (e.g. asked for twice)
        cases, code, out, err = _launch(np, [case])
    lines = {
        c: line
        for c, _, line in (ln[5:].partition(": ") for ln in out.splitlines() if ln[:5] == "CASE ")
    }
    why = None
    missing = [c for c in cases if c not in lines]
    if case not in lines:
        why = f"case {case} on {np} ranks failed"
        if missing[0] != case:
            why = f"case {case} on {np} ranks did not run: case {missing[0]} failed before it"
    elif code != 0 and all(c in lines for c in cases):
        why = f"the job of {np} ranks failed after case {case} printed its result"
    if why:
        fails = [ln for ln in err.splitlines() if "FAIL:" in ln]
        pytest.fail(
            f"{why}; the job ({' '.join(cases)}) exited {code}\n"
            + "\n".join(fails[:10])
            + f"\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-6000:]}"
        )
    return lines[case]


if __name__ == "__main__":
    main(sys.argv[1:])
