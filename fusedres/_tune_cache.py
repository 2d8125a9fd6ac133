"""The on-disk cache of ``fusedres.tune``'s decisions (and of the other timed choices:
``fusedres.conv.dbn_backward="auto"``'s, and the Triton conv autotuners' configs,
``fusedres.kernels.autotune``, in ``autotune-*.json``; each owner's warnings name it).

Where: ``$FUSEDRES_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedres``, else
``~/.cache/fusedres``; ``FUSEDRES_CACHE=0`` turns it off. One JSON file per
*environment* (everything that changes a timing but is not a property of one site:
device name and capability, torch / CUDA / triton / fusedres versions, a fingerprint of
the installed fusedres files, CPU threads and instruction set, the candidates that exist);
its name is a hash of that environment, which is also stored in the file and compared on
load. Inside, one entry per *site signature* (op, shapes, strides, dtypes, train/eval,
module options), keyed by its hash.

Never a wrong answer: a file that does not parse, has another format or another
environment, or an entry whose choice is not a candidate here, is ignored with a warning
(and replaced by the next write). Writes are atomic (a temporary file in the same
directory, then ``os.replace``) and serialised by an advisory lock (``fcntl.flock``) so
two processes tuning at once merge their entries instead of losing one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from typing import Optional

import torch

FORMAT = 1


def cache_dir(setting=True) -> Optional[str]:
    """The cache directory for ``tune(cache=setting)``: None when caching is off
    (``setting`` False, or ``FUSEDRES_CACHE=0`` with ``setting`` True)."""
    if setting is False or setting is None:
        return None
    if isinstance(setting, (str, os.PathLike)):
        return os.fspath(setting)
    if os.environ.get("FUSEDRES_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if os.environ.get("FUSEDRES_CACHE_DIR"):
        return os.environ["FUSEDRES_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusedres")


def _build_fingerprint() -> str:
    """Names, sizes and modification times of the installed fusedres files (Python
    sources, Triton kernels, the compiled extension): a rebuilt kernel is a new cache."""
    import fusedres

    roots = [os.path.dirname(os.path.abspath(fusedres.__file__))]
    kernels = __import__("sys").modules.get("fusedres.kernels")
    if kernels is not None and getattr(kernels, "__file__", None):
        roots.append(os.path.dirname(os.path.abspath(kernels.__file__)))
    h = hashlib.sha1()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith((".py", ".so", ".pyd", ".cpp", ".cu", ".h")):
                    st = os.stat(os.path.join(dirpath, name))
                    h.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}:"
                             f"{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def environment(device: torch.device, candidates) -> dict:
    """Everything outside a site that changes its answer."""
    import fusedres
    from ._backend import cpu_isa

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"format": FORMAT, "device_type": device.type, "torch": torch.__version__,
           "cuda": torch.version.cuda, "triton": triton_version,
           "fusedres": getattr(fusedres, "__version__", None), "build": _build_fingerprint(),
           "candidates": sorted(candidates)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        env["device"] = torch.cuda.get_device_name(index)
        env["capability"] = list(torch.cuda.get_device_capability(index))
    else:
        from ._timing import cpu_name  # the benchmark's machine description too

        env["device"] = cpu_name()
        env["threads"] = torch.get_num_threads()
        env["cpu_isa"] = cpu_isa()
    return env


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class DecisionCache:
    """``get(signature)`` / ``put(signature, entry)`` in memory, ``save()`` to disk.
    ``owner``: who decides (the switch a user would look up), the prefix of its warnings;
    ``prefix``: of the file's name."""

    def __init__(self, directory: Optional[str], env: dict, owner: str = "fusedres.tune",
                 prefix: str = "tune"):
        self.directory = directory
        self.env = env
        self.owner = owner
        self.path = (os.path.join(directory, f"{prefix}-{digest(env)[:20]}.json")
                     if directory else None)
        self.entries: dict = {}
        self.new: dict = {}
        if self.path:
            self.entries = self._read()

    def _read(self, warn=True) -> dict:
        """The entries on disk; {} (with a warning if ``warn``) where there are none."""
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if warn:
                warnings.warn(f"{self.owner}: cannot read the decision cache {self.path} ({exc}); "
                              "deciding without it", RuntimeWarning, stacklevel=3)
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else '?'}"
                                 f", expected {FORMAT}")
            if data.get("env") != self.env:
                raise ValueError("written for another device, library or build")
            entries = data["decisions"]
            if not isinstance(entries, dict):
                raise ValueError("no decisions table")
        except (ValueError, KeyError, TypeError) as exc:
            if warn:
                warnings.warn(f"{self.owner}: ignoring the decision cache {self.path}: "
                              f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
            return {}
        return entries

    def get(self, signature: dict) -> Optional[dict]:
        """The cached entry of a site, or None. An entry whose choice is not a candidate
        in this process is stale: ignored with a warning."""
        entry = self.entries.get(digest(signature))
        if entry is None:
            return None
        ok = (isinstance(entry, dict) and entry.get("signature") == signature
              and entry.get("choice") in self.env["candidates"])
        if not ok:
            warnings.warn(f"{self.owner}: ignoring a stale cache entry for "
                          f"{signature.get('op')} {signature.get('shapes')}",
                          RuntimeWarning, stacklevel=3)
            return None
        return entry

    def put(self, signature: dict, entry: dict) -> None:
        entry = dict(entry, signature=signature)
        key = digest(signature)
        self.entries[key] = entry
        self.new[key] = entry

    def save(self) -> None:
        """Merge the new entries into the file on disk, atomically."""
        if not self.path or not self.new:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            with _locked(self.path + ".lock"):
                merged = self._read(warn=False)  # a bad file was warned of on load: replaced
                merged.update(self.new)
                fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tune-", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"format": FORMAT, "env": self.env, "decisions": merged}, f,
                                  indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            self.entries, self.new = merged, {}
        except OSError as exc:
            warnings.warn(f"{self.owner}: could not write the decision cache {self.path} "
                          f"({exc})", RuntimeWarning, stacklevel=2)


@contextlib.contextmanager
def _locked(path: str):
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): os.replace alone keeps files whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
