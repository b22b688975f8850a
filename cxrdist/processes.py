"""Ending a launch completely: a launcher and every process below it."""
from __future__ import annotations


def kill_tree(pid: int, wait_s: float = 30.0) -> None:
    """SIGKILL process `pid` and all its descendants, then wait up to `wait_s` for them to go.

    Killing a launcher (accelerate launch, torchrun) or its process group is not enough: torchrun starts each rank
    in a session of its own, so the ranks would live on (or stay stopped) as orphans, holding memory, ports and
    cores. The tree is read before anything is killed, so no rank is reparented out of reach first.
    """
    import psutil

    try:
        top = psutil.Process(pid)
        procs = top.children(recursive=True) + [top]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=wait_s)
