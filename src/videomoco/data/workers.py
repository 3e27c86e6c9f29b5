"""Process pools whose workers die with their parent, and whether a process is alive.

A `ProcessPoolExecutor` worker blocks on its task queue forever once the parent is gone
(`kill -9`, OOM killer), holding memory and open files. `process_pool` gives each worker an
initializer that asks Linux to SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG) and
exits at once if the parent died before that; elsewhere it does nothing.
"""

import ctypes
import ctypes.util
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid):
    """Pool initializer: SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody will send the signal
        os._exit(1)


def pid_alive(pid):
    """Whether process `pid` exists (on this host): a temp file named after a dead pid is stale."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_pool(workers):
    """A `ProcessPoolExecutor` of `workers` processes that do not outlive this one."""
    return ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),))
