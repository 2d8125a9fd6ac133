"""pytest-benchmark: the fusedres-bench `conv` cases (settings: bench_common.py)."""
import pytest

from bench_common import params, run_case


@pytest.mark.parametrize("case,provider", params("conv"))
def test_conv(benchmark, case, provider):
    run_case(benchmark, case, provider)
