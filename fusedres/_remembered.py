"""Remembered refusals, shared by the conv paths that ask cuDNN per call signature
(``fusedres.cudnn_graph``: each graph's plan; ``fusedres.cudnn_eval``: ATen's fused eval
call): the answer -- ``""`` when it runs, else why not -- is asked once per signature and
remembered, a refusal or an exception becomes a reason (never the user's exception), and
``statuses()``/``explain`` list what was answered.

The tables are the calling module's plain dicts (tests replace them), read without the
lock (a dict lookup is atomic) and written under the module's lock.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch


def error_line(exc: BaseException, limit: Optional[int] = None) -> str:
    """The first line of an exception's message (its type's name when it has none),
    cut at ``limit`` characters: what a status table keeps of a failure."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if limit is None else line[:limit]


def remember(lock: threading.Lock, statuses: Dict[Hashable, str], key: Hashable, status: str,
             engines: Optional[Dict[Hashable, str]] = None,
             engine: Optional[str] = None) -> None:
    """``statuses[key] = status`` (and ``engines[key] = engine`` when one is named)."""
    with lock:
        statuses[key] = status
        if engines is not None and engine is not None:
            engines[key] = engine


def ask_once(lock: threading.Lock, statuses: Dict[Hashable, str], key: Hashable,
             ask: Callable[[], Tuple[str, Optional[str]]],
             engines: Optional[Dict[Hashable, str]] = None) -> str:
    """The remembered status of ``key``; the first time, ``ask()`` -> ``(status, engine or
    None)``, remembered."""
    status = statuses.get(key)
    if status is None:
        status, found = ask()
        remember(lock, statuses, key, status, engines, found)
    return status


def call(lock: threading.Lock, statuses: Dict[Hashable, str], key: Hashable,
         fn: Callable[..., Any], *args, prefix: str = "", limit: Optional[int] = None,
         raise_when_compiling: bool = False) -> Optional[Any]:
    """``fn(*args)``, remembering ``""`` for ``key`` the first time it returns; a
    ``RuntimeError`` is remembered as ``prefix`` + its first line (``error_line``; where
    the line states ``prefix`` itself, as the C++ ops' "fusedres <op>: execute failed:
    ..." do, that is dropped: the status says it once) and gives None: the caller falls
    back, the user never sees it. With
    ``raise_when_compiling``, under torch.compile tracing the error is raised instead (a
    trace must not bake a fallback in)."""
    try:
        out = fn(*args)
    except RuntimeError as exc:
        if raise_when_compiling and torch.compiler.is_compiling():
            raise
        remember(lock, statuses, key, prefix + _unstated(error_line(exc, limit), prefix))
        return None
    if key not in statuses:
        remember(lock, statuses, key, "")
    return out


def _unstated(line: str, step: str) -> str:
    """``line`` less ``step`` where it states it as its step: first, or right after its
    head (the C++ ops' "fusedres <op>: execute failed: ..."); elsewhere it is the
    message's own text, kept."""
    if step and line.startswith(step):
        return line[len(step):]
    head, sep, rest = line.partition(": ")
    return head + sep + rest[len(step):] if step and sep and rest.startswith(step) else line


def rows(lock: threading.Lock, statuses: Dict[Hashable, str],
         engines: Optional[Dict[Hashable, str]] = None,
         where: Optional[Callable[[Hashable], bool]] = None
         ) -> List[Tuple[Hashable, str, Optional[str]]]:
    """``[(key, status, engine)]`` of the answers so far (those whose key passes
    ``where``), a snapshot taken under the lock."""
    with lock:
        return [(k, v, None if engines is None else engines.get(k))
                for k, v in statuses.items() if where is None or where(k)]
