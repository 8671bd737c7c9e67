"""What can still be checked under secure aggregation: the sum, never an update.

Each of ``clients`` clipped its update to L2 norm ``bound`` (it is trusted to: nobody
can see its update), so an honest sum has norm at most ``clients * bound`` and is
finite. A sum past that shows that some client did not clip (or sent garbage); which
one cannot be known, so the prototype's round is discarded as a whole.
"""

from __future__ import annotations

import numpy as np


def sum_problem(total: np.ndarray, clients: int, bound: float, slack: float = 1e-6) -> str | None:
    """Why the decoded ``total`` of ``clients`` clipped updates cannot be honest, or None."""
    if clients < 1:
        return "no client contributed to the sum"
    x = np.asarray(total, dtype=np.float64)
    if not np.isfinite(x).all():
        return "the sum holds NaN or inf"
    norm = float(np.linalg.norm(x))
    limit = clients * bound * (1 + slack)
    if norm > limit:
        return f"the sum's norm {norm:.4g} exceeds {clients} x the clipping bound {bound:g}"
    return None
