"""What the tests' child processes (a node, a launch) share: output in files, never in a pipe
that could fill and block them; a status line with the output's tail for assertion messages;
waits that kill and fail instead of hanging; nothing outliving the test.
"""

from __future__ import annotations

import subprocess

__all__ = ['WAIT_S', 'ChildProcess']

WAIT_S = 60.0  # generous: the machine has 2 cores and may be busy with other work


class ChildProcess:
    """A subprocess (`proc`) whose output is read back by `output()`; subclasses say what it
    is (`kind`) and may stop more than the one process in `kill()`.

    Use as a context manager or call kill() in a finally.
    """

    kind = 'process'  # the first word of status lines
    output_name = 'output'
    tail_chars = 3000
    proc: subprocess.Popen

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """Exit status and the tail of the output, for assertion messages."""
        status = 'running' if self.alive else f'exited with {self.proc.returncode}'
        tail = self.output()[-self.tail_chars:]
        return f'{self.kind} {status}; {self.output_name} tail:\n{tail}'

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        """Exit status; kills it and fails if it does not end within `timeout`."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f'{self.kind} did not exit within {timeout} s: '
                                 f'{self.describe()}') from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover - a kernel problem
            pass
