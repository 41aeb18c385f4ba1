"""Fixtures every test module may use, and the markers: tests/unit is `unit`; `mpi`, `slurm`
and `cluster` mark what starts ranks, a SLURM cluster or network namespaces. Where Horovod is not
installed (HVCODISTILL_HOROVOD=0), those skip, saying so, unless marked `torch_backend`."""

import os
import signal
import subprocess

import pytest

from hvcodistill.cluster import EmulatedCluster
from tests.helpers import (
    CLUSTER_UNAVAILABLE,
    HOROVOD_MISSING,
    ROOT,
    our_namespaces,
    run_ranks,
    unique_name,
)

# fixtures of their own modules: the session's SLURM cluster, the cache of trained runs
pytest_plugins = ["tests.slurm_cluster", "tests.runs"]

HEAVY = ("mpi", "slurm", "cluster")


# the session's cached runs (tests/runs.py): their readers share a worker, which trains them once
CACHED_RUNS = {"trained_run", "weights_run", "short_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        heavy = any(item.get_closest_marker(m) for m in HEAVY)
        if "unit" in item.path.parts and not heavy:
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("cluster") and CLUSTER_UNAVAILABLE:
            item.add_marker(pytest.mark.skip(reason=CLUSTER_UNAVAILABLE))
        elif heavy and HOROVOD_MISSING and not item.get_closest_marker("torch_backend"):
            item.add_marker(pytest.mark.skip(reason=HOROVOD_MISSING))


class _GroupsHonoured:
    """Under pytest-xdist's --dist loadgroup, each worker must have tagged every grouped test's id
    with its group ("id@group"), or the groups are ignored without a word and two SLURM clusters,
    or two sets of emulated nodes, run at once (pytest 9 broke that tag for pytest-xdist 3.8:
    pyproject.toml keeps pytest < 9). Stop at collection rather than fail later."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not getattr(config.option, "loadgroup", False):
            return
        lost = [
            i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid
        ]
        if lost:
            raise pytest.UsageError(
                f"pytest-xdist did not tag {len(lost)} grouped tests with their group (e.g. "
                f"{lost[0]}): with this pytest and pytest-xdist, --dist loadgroup would run the "
                "SLURM and emulated-cluster tests on several workers at once; run without -n, "
                "or with pytest < 9"
            )


def pytest_configure(config):
    if getattr(config.option, "dist", "no") == "loadgroup" and pytest.version_tuple[0] >= 9:
        # the known case, said on the controller (a worker's UsageError only ends the session)
        raise pytest.UsageError(
            f"pytest {pytest.__version__} breaks pytest-xdist's --dist loadgroup (the SLURM and "
            "emulated-cluster tests would run on several workers at once): install pytest < 9, "
            "as pyproject.toml asks, or run without -n"
        )
    config.pluginmanager.register(_GroupsHonoured(), "hvcodistill-groups-honoured")


def pytest_itemcollected(item):
    """The pytest-xdist group (make test JOBS=N: --dist loadgroup), marked as each test is
    collected: pytest-xdist reads the marks in its own pytest_collection_modifyitems, which may run
    before this file's."""
    group = xdist_group(item)
    if group:
        item.add_marker(pytest.mark.xdist_group(group))


def xdist_group(item) -> str | None:
    """Which tests one pytest-xdist worker runs together: every SLURM test and every test on
    emulated nodes (one SLURM cluster per session, and no two sets of namespaces, daemons and
    shapers at once), the readers of the cached runs, an integration module (its module fixtures
    are built once); a unit test goes wherever a worker is free (None)."""
    if item.get_closest_marker("slurm") or item.get_closest_marker("cluster"):
        return "slurm-and-nodes"
    if CACHED_RUNS & set(getattr(item, "fixturenames", ())):
        return "cached-runs"
    if "integration" in item.path.parts:
        return item.path.stem
    return None


def _repo_runs() -> set[str]:
    runs = ROOT / "runs"
    return {str(p.relative_to(runs)) for p in runs.rglob("*")} if runs.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def repository_runs_untouched():
    """Tests write under tmp_path only: the repository's runs/ (a user's results) is left as
    found."""
    before = _repo_runs()
    yield
    new = sorted(_repo_runs() - before)
    assert not new, f"tests wrote into the repository's runs/: {new[:5]}"


@pytest.fixture
def ranks():
    return run_ranks


@pytest.fixture
def make_cluster(tmp_path):
    """Build clusters with unique names in a private state dir; take every one down afterwards.
    For the tests of building one (`up`, `down`, their failures); the others take `cluster`."""
    made = []

    def make(nodes=2, **kw):
        c = EmulatedCluster(nodes, name=unique_name(), state_dir=tmp_path / "state", **kw)
        made.append(c)
        return c.up()

    yield make
    for c in made:
        c.down(quiet=True)
        assert our_namespaces(c.name) == [], f"namespaces of {c.name} left behind"


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory):
    """One emulated 2-node cluster for a whole test module (namespaces, veths, a bridge and tc on
    every link, built once); tests take it through `cluster`. Taken down at the module's end."""
    c = EmulatedCluster(2, name=unique_name(), state_dir=tmp_path_factory.mktemp("cluster"))
    c.up()
    yield c
    c.down(quiet=True)
    assert our_namespaces(c.name) == [], f"namespaces of {c.name} left behind"


@pytest.fixture
def cluster(module_cluster):
    """The module's 2-node cluster, to re-shape (`cluster.shape("100mbit")`) rather than rebuild.
    A test may break it: afterwards whatever still runs on its nodes is killed, every link is set
    up again and the links are left unshaped, so the next test finds it as built."""
    yield module_cluster
    restore(module_cluster)


def restore(c: EmulatedCluster) -> None:
    for host in c.hosts:
        pids = subprocess.run(
            ["ip", "netns", "pids", c.namespace(host)], capture_output=True, text=True, check=True
        ).stdout
        for pid in pids.split():  # only this cluster's: the processes a test started on it
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "-n", c.namespace(host), "link", "set", "eth0", "up"], check=True)
        subprocess.run(["ip", "-n", c.switch, "link", "set", c.port(host), "up"], check=True)
    c.shape(None)
