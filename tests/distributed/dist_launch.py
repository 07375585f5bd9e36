"""Run a function in N local processes joined by a gloo process group, and hand back each rank's result.

Children are started with the "spawn" method and rendezvous over TCP on 127.0.0.1 (a free port picked per launch).
A child's exception fails the launch with that child's traceback; a child that dies or does not finish in time fails
it too, and every child still running is terminated first, so a test never hangs on a stuck collective.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable


class WorkerError(AssertionError):
    """A child process failed, died or timed out; the message carries its traceback or exit status."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> str | None:
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None


def _encode(value: Any) -> bytes:
    # torch.save bytes rather than pickled tensors: shared-memory handles would die with the child.
    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _decode(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _child(rank: int, world_size: int, port: int, timeout: float, fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on two cores: no oversubscription
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        value = fn(rank, world_size, *args)
        dist.barrier()  # no rank tears its connections down while a peer may still be talking to it
    except BaseException:
        # Reported before the group is torn down: the peers' "connection closed" errors then arrive after it.
        results.put((rank, False, traceback.format_exc()))
        return
    dist.destroy_process_group()
    results.put((rank, True, _encode(value)))


def _failures(rank: int, payload: str, world_size: int, results, grace: float = 1.0) -> str:
    """The first failure's traceback, then those of ranks failing within `grace` seconds (usually as a consequence)."""
    parts = [f"rank {rank} of {world_size} failed:\n{payload}"]
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            other, ok, text = results.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue_mod.Empty:
            break
        if not ok:
            parts.append(f"then rank {other} failed:\n{text}")
    return "\n".join(parts)


def run(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 60.0) -> list[Any]:
    """fn(rank, world_size, *args) in `world_size` processes; returns the values by rank.

    `fn` must be importable by the children (a module-level function); so must `args` be picklable.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env_before = {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME",)}
    lo = _loopback_interface()
    if lo is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = lo  # gloo's peer connections stay on loopback too
    try:
        procs = [
            ctx.Process(target=_child, args=(r, world_size, port, timeout, fn, args, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in values and p.exitcode is not None]
                # A child that exited without reporting (killed, segfault): give its queued message a moment.
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        raise WorkerError(
                            "rank(s) " + ", ".join(f"{r} (exit code {c})" for r, c in dead)
                            + " exited without reporting a result"
                        ) from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(values))
                    raise WorkerError(f"rank(s) {missing} did not finish within {timeout:.0f} s") from None
                continue
            if not ok:
                raise WorkerError(_failures(rank, payload, world_size, results))
            values[rank] = _decode(payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]
