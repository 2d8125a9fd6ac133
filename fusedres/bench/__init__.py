"""fusedres-bench: fusedres vs eager PyTorch (cuDNN on GPU) vs torch.compile.

``fusedres-bench ops|conv|blocks|train|all`` (or ``python -m fusedres.bench``); see
``fusedres.bench.cli``. Modules: ``cases`` (what is timed), ``formulas`` (bytes moved and
FLOPs per case), ``timing`` (CUDA events / torch.utils.benchmark), ``report`` (outputs).
Nothing here touches the GPU at import time; optional packages (matplotlib, tqdm,
torchvision) are imported where used.
"""
from .cli import main

__all__ = ["main"]
