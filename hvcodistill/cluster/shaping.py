"""Link shaping of the emulated cluster as tc sees it: rates, delays and the qdiscs that apply them.

Pure functions: nothing here runs a command.
"""

from __future__ import annotations

import re

from hvcodistill.errors import ConfigError

TBF_LATENCY = "50ms"  # longest a packet may queue in tbf before it is dropped
_RATE_UNITS = {
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "tbit": 10**12,
}  # tc's decimal units


def parse_rate(text: str | None) -> int | None:
    """'100mbit' -> 100_000_000 bits/s; None, 'none', 'unshaped' -> None (no rate limit)."""
    if text is None or str(text).strip().lower() in ("none", "unshaped"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)", str(text).strip().lower())
    bits = round(float(m.group(1)) * _RATE_UNITS[m.group(2)]) if m else 0
    if bits <= 0:
        raise ConfigError(f"bad rate {text!r}: expected e.g. 100mbit, 1gbit, 10gbit or none")
    return bits


def parse_delay(text: str | None) -> str | None:
    """'100us', '1.5ms' -> the same text for tc; None, 'none', '0' -> None (no added delay)."""
    if text is None or str(text).strip().lower() in ("none", "0"):
        return None
    t = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s)", t)
    if not m or float(m.group(1)) == 0:
        raise ConfigError(f"bad delay {text!r}: expected e.g. 100us, 2ms or none")
    return t


def tbf_burst(rate_bits: int, mtu: int) -> int:
    """tbf bucket size in bytes: max(64 KiB, 10 ms of traffic at the rate, two full frames).

    The bucket must hold what the link sends between two wake-ups of the qdisc watchdog, or tbf
    cannot reach its rate: 64 KiB is plenty up to ~100 Mbit/s, 10 ms of bytes covers timer and
    scheduling jitter on a busy VM at 1-10 Gbit/s (12.5 MB at 10 Gbit/s). A frame larger than the
    bucket would never be sent, hence at least two MTU-sized frames (+ Ethernet header)."""
    return max(64 * 1024, rate_bits // 8 // 100, 2 * (mtu + 14))


def qdisc_commands(dev: str, rate_bits: int | None, delay: str | None, mtu: int) -> list[list[str]]:
    """tc argument lists that shape `dev` egress (after its root qdisc was deleted).

    Delay is netem at the root with the tbf rate limiter as its child, so packets are delayed and
    then paced; without a delay, tbf alone at the root; unshaped, nothing (the device default)."""
    cmds, parent, handle = [], ["root"], "1:"
    if delay:
        cmds.append(["qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", delay])
        parent, handle = ["parent", "1:"], "2:"
    if rate_bits:
        cmds.append(
            [
                "qdisc",
                "add",
                "dev",
                dev,
                *parent,
                "handle",
                handle,
                "tbf",
                "rate",
                f"{rate_bits}bit",
                "burst",
                str(tbf_burst(rate_bits, mtu)),
                "latency",
                TBF_LATENCY,
            ]
        )
    return cmds


def format_rate(rate_bits: int | None) -> str:
    if rate_bits is None:
        return "unshaped"
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        if rate_bits % _RATE_UNITS[unit] == 0:
            return f"{rate_bits // _RATE_UNITS[unit]}{unit}"
    return f"{rate_bits}bit"
