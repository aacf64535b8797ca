"""`sparsecc.tune`: per-layer sparsity levels searched to the lowest measured latency within a quality budget.

    budget.py   the metric on held-out data and its bound
    latency.py  each level's cost on the backend, measured once and cached
    plan_cache.py  each level's calibrated plans, kept for the next tune
    search.py   sensitivity seed, level-switch evolution, global shift (pure search over two functions)
    tuner.py    tune(): the capture, the levels' plans, the measurements, the result
    plot.py     the latency / quality picture
"""

from sparsecc.tune.budget import Budget
from sparsecc.tune.tuner import TuneResult, default_levels, tune

__all__ = ["Budget", "TuneResult", "default_levels", "tune"]
