"""pytest-benchmark: the fusedres-bench `train` cases (settings: bench_common.py)."""
import pytest

from bench_common import params, run_case


@pytest.mark.parametrize("case,provider", params("train"))
def test_train(benchmark, case, provider):
    run_case(benchmark, case, provider)
