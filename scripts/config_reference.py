"""Write docs/configuration.md from hvcodistill/config.py (`make docs`)."""

from __future__ import annotations

import sys
from pathlib import Path

from hvcodistill.configref import PAGE, write

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    changed = write(root / PAGE)
    print(f"{PAGE}: {'written' if changed else 'already current'}")
    sys.exit(0)
