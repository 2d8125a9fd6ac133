"""pytest-benchmark: the fusedres-bench `ops` cases (see conftest.py for settings)."""
import pytest

from conftest import params, run_case


@pytest.mark.parametrize("case,provider", params("ops"))
def test_ops(benchmark, case, provider):
    run_case(benchmark, case, provider)
