"""pytest-benchmark: the fusedres-bench `blocks` cases (settings: bench_common.py)."""
import pytest

from bench_common import params, run_case


@pytest.mark.parametrize("case,provider", params("blocks"))
def test_blocks(benchmark, case, provider):
    run_case(benchmark, case, provider)
