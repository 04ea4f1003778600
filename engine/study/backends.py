"""Where a sweep's tasks run: this machine (``local``: in-process or a process pool) or a Ray
cluster (``ray``, the optional extra ``plansim[ray]``).

:func:`run_tasks` takes a picklable top-level function and its argument tuples and yields
``(index, result)`` as each task finishes, in finishing order, so a caller can write every result
into its results file at once. Leaving the iteration early (Ctrl-C, an error) stops the rest:
the pool is terminated (its workers ignore SIGINT, so only the caller sees Ctrl-C), Ray tasks are
cancelled and a Ray instance this process started is shut down.

``ray`` with no address starts a Ray instance on this machine, bound to 127.0.0.1, with ``jobs``
CPUs; with ``--address`` (``HOST:PORT`` of a head node's GCS, ``ray://HOST:PORT`` for Ray Client,
or ``auto``) it joins that cluster. An address that does not answer is one
:class:`~engine.core.errors.InputError` within :data:`CONNECT_TIMEOUT_S` (a TCP connect first, so
Ray's own retries never start).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import socket
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from engine.core.errors import InputError

BACKENDS = ("local", "ray")
CONNECT_TIMEOUT_S = 10.0
DEFAULT_GCS_PORT = 6379


def _numbered(job: tuple[Callable[..., Any], int, tuple]) -> tuple[int, Any]:
    fn, k, args = job
    return k, fn(*args)


def run_local(fn: Callable[..., Any], args: Sequence[tuple], jobs: int) -> Iterator[tuple[int, Any]]:
    """``fn(*a)`` for each ``a`` of ``args``: in this process with ``jobs == 1``, else in a pool of
    ``jobs`` processes whose workers ignore Ctrl-C; terminated at once when the caller stops."""
    if jobs == 1 or len(args) <= 1:
        for k, a in enumerate(args):
            yield k, fn(*a)
        return
    pool = multiprocessing.get_context().Pool(min(jobs, len(args)), initializer=signal.signal,
                                              initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        yield from pool.imap_unordered(_numbered, [(fn, k, a) for k, a in enumerate(args)])
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _ray():
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise InputError(None, "--backend ray", "Ray is not installed; pip install 'plansim[ray]'") from None


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise InputError unless something accepts a TCP connection at ``address`` within ``timeout_s``."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep:
        host, port = hostport, str(DEFAULT_GCS_PORT)
    if not host or not port.isdigit():
        raise InputError(None, "--address", f"expected HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = "no answer" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise InputError(None, "--address", f"no Ray cluster answers at {address} ({reason})") from None


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Ray's C++ core logs every retry of a connection on fd 2; the caller reports the outcome in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run_ray(fn: Callable[..., Any], args: Sequence[tuple], jobs: int, address: str | None) -> Iterator[tuple[int, Any]]:
    """``fn(*a)`` for each ``a`` of ``args`` as Ray tasks (one CPU each), yielded as they finish."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        if address is not None:
            check_address(address)
            try:
                with _quiet_stderr():
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise InputError(None, "--address", f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        else:
            with _quiet_stderr():
                ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         _node_ip_address="127.0.0.1")
        started = True
    # Ctrl-C reaches the caller: ray.init installs its own SIGTERM handler, which is put back to a Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    remote = ray.remote(num_cpus=1, max_retries=0)(_numbered)
    pending = [remote.remote((fn, k, a)) for k, a in enumerate(args)]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def run_tasks(fn: Callable[..., Any], args: Sequence[tuple], *, backend: str = "local", jobs: int = 1,
              address: str | None = None) -> Iterator[tuple[int, Any]]:
    """Run ``fn(*a)`` for every ``a`` of ``args`` on ``backend``; yield ``(index, result)`` as each ends."""
    if backend not in BACKENDS:
        raise InputError(None, "--backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if address is not None and backend != "ray":
        raise InputError(None, "--address", "only with --backend ray")
    if backend == "ray":
        return run_ray(fn, args, jobs, address)
    return run_local(fn, args, jobs)
