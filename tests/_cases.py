"""(device, backend) pairs the module and conversion tests run on: every backend that
can run on a device present here, plus the plumbing backend ``reference_primitives``."""
import torch

import fusedres
from fusedres._backend import PLUMBING_BACKEND, backend_supports


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_backends(include_reference=True):
    out = []
    for dev in devices():
        names = [PLUMBING_BACKEND] + [b for b in fusedres.available_backends()
                                      if include_reference or b != "reference"]
        for b in names:
            if backend_supports(b, torch.device(dev)):
                out.append((dev, b))
    return out


def ids(pairs):
    return [f"{d}-{b}" for d, b in pairs]
