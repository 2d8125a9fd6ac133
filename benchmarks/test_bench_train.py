"""pytest-benchmark: the fusedres-bench `train` cases (see conftest.py for settings)."""
import pytest

from conftest import params, run_case


@pytest.mark.parametrize("case,provider", params("train"))
def test_train(benchmark, case, provider):
    run_case(benchmark, case, provider)
