"""What the emulated cluster needs of this machine (root, ip, tc, unshare, namespaces) and how it
runs the system commands that build it: a failure is one line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from hvcodistill.errors import ConfigError

TOOLS = {"ip": "iproute2", "tc": "iproute2", "unshare": "util-linux"}


class ClusterError(RuntimeError):
    """A system command failed while building or changing the cluster; message is one line."""


def cluster_unavailable() -> str | None:
    """None when this process can build a cluster (root, ip, tc, unshare, namespaces), else why."""
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces and tc)"
    missing = [f"{t} ({pkg})" for t, pkg in TOOLS.items() if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install iproute2 util-linux"
    probe = subprocess.run(
        [shutil.which("unshare"), "--net", "--uts", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {first_line(probe.stderr)}"
    return None


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[0] if lines else "(no message)"


def require_host() -> None:
    reason = cluster_unavailable()
    if reason:
        raise ConfigError(reason)


def run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{shlex.join(argv)}` failed: {first_line(proc.stderr)}")
    return proc


def check_netem() -> None:
    """Fail before touching anything when the kernel has no netem (CONFIG_NET_SCH_NETEM): probe it
    on `lo` of a throwaway network namespace, which vanishes with the probe."""
    probe = run(
        ["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1us"],
        check=False,
    )
    if probe.returncode != 0:
        raise ConfigError(
            f"a delay needs the netem qdisc, which this kernel lacks ({first_line(probe.stderr)}); "
            "shape with a rate only"
        )
