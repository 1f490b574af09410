"""welore.device: memory measurement."""

import multiprocessing

from welore.device import process_memory


def _report(queue) -> None:
    queue.put(process_memory()["peak_rss_gib"])


def test_a_spawned_process_reports_its_own_peak_not_its_parents():
    # getrusage's ru_maxrss survives exec: a run spawned by welore compare after compressing a model
    # reported the compression's peak as its own (3.51 GiB for every mode at stop 47)
    block = bytearray(1024 * 2**20)
    block[::4096] = b"\1" * len(block[::4096])  # touch every page: resident
    parent = process_memory()["peak_rss_gib"]
    del block
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_report, args=(queue,))
    child.start()
    peak = queue.get(timeout=120)
    child.join()
    assert parent > 1.0 and 0 < peak < parent - 0.5
