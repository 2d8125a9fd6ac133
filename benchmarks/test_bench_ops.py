"""pytest-benchmark: the fusedres-bench `ops` cases (settings: bench_common.py)."""
import pytest

from bench_common import params, run_case


@pytest.mark.parametrize("case,provider", params("ops"))
def test_ops(benchmark, case, provider):
    run_case(benchmark, case, provider)
