"""pytest-benchmark: the fusedres-bench `blocks` cases (see conftest.py for settings)."""
import pytest

from conftest import params, run_case


@pytest.mark.parametrize("case,provider", params("blocks"))
def test_blocks(benchmark, case, provider):
    run_case(benchmark, case, provider)
