"""User-facing errors: one exception type the CLI prints as one line, and "did you mean" help."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KvdiagError(ValueError):
    """A bad input or an unavailable resource, explained in one line for the user."""


def unknown_name_error(kind: str, name: str, known: Iterable[str]) -> KvdiagError:
    """Build the error for an unknown registry name, with close matches and the full list.

    >>> str(unknown_name_error("model", "smollm", ["smollm2-135m", "tiny-llama"]))
    "unknown model 'smollm'; did you mean 'smollm2-135m'? Known: smollm2-135m, tiny-llama."
    >>> str(unknown_name_error("model", "bert", ["smollm2-135m", "tiny-llama"]))
    "unknown model 'bert'. Known: smollm2-135m, tiny-llama."
    """
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return KvdiagError(f"unknown {kind} {name!r}{hint} Known: {', '.join(known)}.")
