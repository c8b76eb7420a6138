"""Child processes of the demo and the live evaluation: stopped the way the node expects."""

from __future__ import annotations

import signal
import subprocess

__all__ = ['stop_process']


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGINT (the node's and the replay's clean shutdown), then kill if it does not end;
    returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode
