"""What a run does about the cluster around it: one run per out_dir, ranks that die with their launcher, preemption.

- One run per out_dir: global rank 0 holds an exclusive POSIX lock (fcntl.lockf) on out_dir/.lock for the run's
  whole life. The kernel releases it when its holder dies, however it dies, so a crash leaves no stale lock; lockf
  locks work across hosts on network file systems that support POSIX locks (NFS). The file names its holder (host,
  pid, start time), so a second run fails at once with one line saying who has the directory.
- Ranks die with their launcher: torchrun starts every rank in a session of its own, so SIGKILL of the launcher
  leaves them training (and writing into out_dir beside whatever runs next). Each rank started by torchrun watches
  its parent process; when the parent is gone the rank exits at once, with os._exit, so nothing half-done (a
  checkpoint being written) is committed. Its DataLoader workers notice their parent's death by themselves.
- Teardown: `end_distributed` (see there).
- Preemption: the configured signal (SIGTERM, which Slurm sends before SIGKILL; or SIGUSR1 for `--signal=USR1@T`)
  only sets a flag. The trainer reduces the flag over all ranks at every step boundary, so every rank stops after
  the same step, writes a complete checkpoint and exits 0. More signals during that save change nothing: the save
  commits atomically, so the previous checkpoint stays intact until the new one is complete.
"""

import fcntl
import gc
import os
import signal
import socket
import sys
import threading
import time

import torch.distributed as dist


class RunInUse(RuntimeError):
    """out_dir is locked by a live run; the message names it."""


def lock_out_dir(out_dir):
    """Take out_dir's lock for this process's lifetime (keep the returned file open: closing it releases the lock).
    Raises RunInUse naming the holder if another live run has it."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not yet written its name"
        f.close()
        raise RunInUse(f"out_dir={out_dir!r} is in use by another run ({holder}); wait for it to finish, stop it, "
                       f"or choose another out_dir") from None
    f.truncate(0)
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def exit_with_launcher(interval=1.0):
    """Under torchrun, exit this rank at once when the launcher that started it is gone. Not for a plain
    `python train.py`: its parent is a shell, which may rightly go away (nohup) while the run goes on."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(interval)
        print(f"rank {os.environ.get('RANK')}: the launcher (pid {launcher}) is gone; exiting without saving",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


class Preemption:
    """Counts the preemption signals received; `requested` once there is one. Installed by the main thread."""

    def __init__(self, signal_name="SIGTERM"):
        self.signal_name, self.received = signal_name, 0
        signal.signal(getattr(signal, signal_name), self._handle)

    def _handle(self, signum, frame):
        self.received += 1

    @property
    def requested(self):
        return self.received > 0


def end_distributed():
    """The end of a run's process group: every rank past its last collective (barrier), the group destroyed, and
    whatever still refers to it (FSDP units, the device mesh: reference cycles) collected now, while the interpreter
    is whole. Left to interpreter shutdown, gloo's C++ threads can be destroyed still joinable: "terminate called
    without an active exception", SIGABRT, after a run that did everything right."""
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
