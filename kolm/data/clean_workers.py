"""The worker processes of `kolm clean`'s local runs: datatrove's executor forks them from a
forkserver, which imports the pipeline's modules once per command (not once per stage and worker)."""

from __future__ import annotations

PRELOAD = ["kolm.data.clean_exec", "kolm.data.clean_io", "kolm.data.clean_normalize", "kolm.data.clean_filters",
           "kolm.data.clean_pii", "kolm.data.clean_dedup"]


def start_forkserver() -> None:
    """Start the forkserver now: it imports the pipeline's modules (datatrove's, about a second)
    while the command imports them too, instead of after it, when the first stage starts."""
    import multiprocess
    from multiprocess import forkserver

    multiprocess.get_context("forkserver").set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
