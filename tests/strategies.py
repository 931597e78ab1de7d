"""Hypothesis strategies with bounded, physiological IVIM parameters and b-value schemes.

Ranges (units of the public API): f in [0.02, 0.4]; D in [0.3e-3, 3e-3] mm²/s;
D_star in [max(5 D, 2e-3), 0.1] mm²/s, i.e. at least five times D and inside the default
D_star bounds [2e-3, 0.1]. S0 spans three decades so that no test depends on the signal unit.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from fastivim.simulate import DEFAULT_B_VALUES

F_RANGE = (0.02, 0.4)
D_RANGE = (0.3e-3, 3e-3)
DSTAR_MAX = 0.1
DSTAR_MIN = 2e-3
DSTAR_OVER_D = 5.0

#: The b-value schemes (s/mm²) the noise-free tests run on.
B_SCHEMES = {
    # the benchmarks' 10-b scheme
    "default10": np.asarray(DEFAULT_B_VALUES, dtype=np.float64),
    # OSIPI TF2.4 generic.json, 18 b-values
    "osipi18": np.array([0, 1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 350, 400, 550, 700, 850,
                         1000], dtype=np.float64),
    # a clinical protocol: b=0 and b=800 acquired several times (e.g. directions), shuffled order
    "clinical_shuffled": np.array([800, 0, 50, 800, 200, 0, 100, 400, 800, 20, 600, 0, 800, 150],
                                  dtype=np.float64),
    # no b = 0 at all (the signal at b = 0 is extrapolated)
    "no_b0": np.array([10, 20, 40, 70, 100, 150, 250, 400, 600, 800], dtype=np.float64),
}


#: Default strategy for S0 (signal units).
S0_STRATEGY = st.floats(1.0, 5000.0)


@st.composite
def ivim_params(draw, S0=S0_STRATEGY):
    """``dict(S0, f, D_star, D)`` with D_star >= 5 D, inside the default bounds."""
    f = draw(st.floats(*F_RANGE))
    D = draw(st.floats(*D_RANGE))
    D_star = draw(st.floats(max(DSTAR_OVER_D * D, DSTAR_MIN), DSTAR_MAX))
    return {"S0": draw(S0), "f": f, "D_star": D_star, "D": D}


def b_scheme_names():
    """Strategy over the keys of :data:`B_SCHEMES`."""
    return st.sampled_from(sorted(B_SCHEMES))


def params_tuple(p):
    """``(S0, f, D_star, D)`` of a parameter dict, in :data:`fastivim.PARAM_NAMES` order."""
    return (p["S0"], p["f"], p["D_star"], p["D"])
