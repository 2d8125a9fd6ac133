"""pytest-benchmark: the fusedres-bench `conv` cases (see conftest.py for settings)."""
import pytest

from conftest import params, run_case


@pytest.mark.parametrize("case,provider", params("conv"))
def test_conv(benchmark, case, provider):
    run_case(benchmark, case, provider)
