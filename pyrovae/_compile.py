"""``torch.compile`` for pyrovae's direct (untraced) paths: the training loss and the importance
weights of a VAE running its own program.

Random draws fall back to eager torch (inductor's ``fallback_random``), so a compiled function
consumes the RNG exactly as the eager one does: the same draws for the same seed, exact resumes,
estimates equal to the eager ones to float rounding. A failure to compile (no C++ compiler on a
CPU, an unsupported operation) becomes one :class:`~pyrovae.errors.ConfigError` line at the first
call, saying how to go on without compiling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigError


def compile_direct(fn: Callable[..., Any], what: str, without: str) -> Callable[..., Any]:
    """``fn`` compiled by ``torch.compile`` with eager random draws; ``what`` names it and
    ``without`` says how to run without compiling, in the error raised if compiling fails."""
    compiled = torch.compile(fn, options={"fallback_random": True})

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"torch.compile could not compile {what} ({type(e).__name__}: {first}); {without}"
            ) from e

    return run
