"""``python -m pyrovae``: the command line, also as ``torchrun ... -m pyrovae train ...``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
