"""Self-check for exercises, in the spirit of nn-zero-to-hero's ``cmp``: tells the learner at once."""

from __future__ import annotations

import math
from typing import Any


def check(name: str, answer: Any, expected: Any, *, tol: float = 0.0, hint: str = "") -> None:
    """Compare ``answer`` with ``expected``; print the verdict once, raise AssertionError when wrong.

    Numbers match within ``tol`` (relative); anything else must be equal. ``None`` means "not done yet".
    Nothing is returned: a returned string would be shown a second time as the cell's value.
    """
    if answer is None:
        raise AssertionError(f"{name}: not answered yet - replace the None with your answer. {hint}".strip())
    if isinstance(expected, int | float) and isinstance(answer, int | float) and not isinstance(answer, bool):
        if answer == expected:
            verdict = f"{name}: exact ✓"
        elif math.isclose(answer, expected, rel_tol=tol, abs_tol=tol):
            verdict = f"{name}: approximately right ✓ (off by {abs(answer - expected):.2g})"
        else:
            raise AssertionError(f"{name}: {answer!r} is not right. {hint}".strip())
    elif answer == expected:
        verdict = f"{name}: exact ✓"
    else:
        raise AssertionError(f"{name}: {answer!r} is not right. {hint}".strip())
    print(verdict)
