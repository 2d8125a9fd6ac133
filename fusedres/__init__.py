"""fusedres: fused Conv-BN-ReLU and BN-Add-ReLU kernels for ResNet-style networks.

``fusedres.functional`` holds the fused functions, ``fusedres.available_backends()``
says which backends (reference, cpu, cuda, triton) can run in this process.
"""


def _map_source_kernels():
    """In a source checkout, the ``kernels/`` beside this ``fusedres/`` is
    ``fusedres.kernels`` (also when another checkout is installed in editable mode, which
    would otherwise map its own). An installed wheel has no such folder: nothing to do."""
    import importlib.util  # imported here: not part of the package's namespace
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(path, "__init__.py")
    if os.path.exists(init):
        spec = importlib.util.spec_from_file_location("fusedres.kernels", init,
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fusedres.kernels"] = module
        spec.loader.exec_module(module)


_map_source_kernels()

from ._backend import available_backends, cpu_isa, extension_error, resolve_backend  # noqa: E402
from . import conv, distributed, functional, nn, ops, reference  # noqa: E402
from .convert import convert, explain  # noqa: E402  (the functions shadow the submodule name)
from .tune import tune  # noqa: E402  (likewise)

__all__ = ["available_backends", "cpu_isa", "resolve_backend", "extension_error", "conv", "convert",
           "distributed", "explain", "functional", "nn", "ops", "reference", "tune"]
__version__ = "0.1.0"
