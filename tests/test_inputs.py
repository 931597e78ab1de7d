"""Inputs that cannot fool the fit: b-values in the wrong unit, acquisitions that are not IVIM.

A b-value file in s/m² or ms/µm², or a DTI shell jittered around one b-value, used to run to
exit 0 with meaningless maps (f = 0.42 for a true 0.21). They are refused with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
from strategies import B_SCHEMES

import fastivim
from fastivim.fit import b_shells

B10 = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800], dtype=np.float64)


@pytest.mark.parametrize("b, words", [
    (B10 * 1e6, "s/m²: divide them by 1e6"),
    (B10 * 1e-3, "ms/µm².*multiply them by 1000"),
    (B10 * 1e-2, "too small"),
    (B10 * 20, "too large"),
    (np.array([0, 0, 995, 997, 1000, 1003, 1005, 998.0]), "not an IVIM acquisition.*below 200"),
    (np.array([0, 10, 20, 50, 100, 150, 190.0]), "not an IVIM acquisition.*at or above 200"),
    (np.array([0, 300, 500, 700, 1000.0]), "not an IVIM acquisition"),
])
def test_implausible_b_values_are_refused(b, words):
    with pytest.raises(ValueError, match=words):
        fastivim.validate_b_values(b)
    Y = np.full((3, b.size), 100.0)
    for method in ("segmented", "full"):
        with pytest.raises(ValueError, match=words):
            fastivim.fit_voxels(Y, b, method=method)


def test_jittered_dti_shell_is_one_shell():
    assert b_shells([0, 0, 995, 997, 1000, 1003, 1005, 998]).tolist() == [0.0, 995.0]
    # close low b-values of a real IVIM scheme stay apart
    assert b_shells([0, 10, 20, 30]).tolist() == [0.0, 10.0, 20.0, 30.0]


@pytest.mark.parametrize("name", sorted(B_SCHEMES))
def test_ivim_schemes_are_accepted(name):
    b = B_SCHEMES[name]
    np.testing.assert_array_equal(fastivim.validate_b_values(b), b)


def test_osipi_and_clinical_schemes_are_accepted():
    for b in ([0, 1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 350, 400, 550, 700, 850, 1000],
              [0, 5, 15, 25, 40, 60, 90, 120, 200, 400, 600, 800],
              [0, 50, 400, 800],
              [0, 0, 50, 50, 1000, 1000, 1000, 2000, 2000]):
        fastivim.validate_b_values(b)
