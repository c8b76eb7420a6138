"""Run an installed launch file as `ros2 launch` would (run_launch.py) and stop it as a
terminal's ctrl-c does: SIGINT to its whole process group.

The launch process is started in a session of its own, so its process group holds launch and
every node it starts; the test signals that group and checks that all of it ends. Output (the
launch's and the nodes', `output='screen'`) goes to one log file, shown in failure messages.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from malmm_ros.ros.node_harness import local_ros_environment
from support.child_process import WAIT_S, ChildProcess
from support.domains import ASSIGNED

__all__ = ['ESCALATION', 'LaunchProcess', 'group_members', 'launch_env', 'publish_until']

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = 'malmm_ros'
SCRIPT = Path(__file__).with_name('run_launch.py')
# launch's lines when a process ignored SIGINT and it had to be terminated or killed.
ESCALATION = re.compile(r"sending signal 'SIG(TERM|KILL)'|escalating to 'SIG|failed to terminate")
STARTED = re.compile(r'\[INFO\] \[([\w.-]+)\]: process started with pid \[(\d+)\]')
CLEAN = re.compile(r'\[INFO\] \[([\w.-]+)\]: process has finished cleanly \[pid (\d+)\]')
DIED = re.compile(r'\[([\w.-]+)\]: process has died \[pid (\d+), exit code (-?\d+)')


def launch_env(base: Mapping[str, str], domain_id: int, log_dir: Path) -> dict[str, str]:
    """`base` (setup files sourced) on `domain_id`, discovery on this machine, as the tests'
    other processes. The installed `anticipate` runs the first python3 on PATH: this venv's."""
    assert domain_id in ASSIGNED, f'domain {domain_id} is not in test/support/domains.py'
    env = dict(base)
    for key, value in local_ros_environment(domain_id).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    venv_bin = str(Path(sys.executable).parent)
    env['PATH'] = os.pathsep.join([venv_bin, env.get('PATH', '')])
    env['PYTHONUNBUFFERED'] = '1'
    env['ROS_LOG_DIR'] = str(log_dir / 'ros_log')  # not ~/.ros/log
    # The installed package has no engines/ folder of its own: reuse the checkout's exported
    # encoder instead of exporting one into ~/.cache (a minute of CPU on first use).
    engines = ROOT / 'engines'
    if 'MALMM_ENGINE_DIR' not in env and engines.is_dir():
        env['MALMM_ENGINE_DIR'] = str(engines)
    return env


def group_members(pgid: int) -> list[str]:
    """'pid state command' of the live (not zombie) processes in process group `pgid`."""
    found = []
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / 'stat').read_text()
            cmdline = (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode(
                errors='replace').strip()
        except OSError:  # it ended meanwhile
            continue
        state, _ppid, group = stat.rsplit(')', 1)[1].split()[:3]
        if int(group) == pgid and state != 'Z':
            found.append(f'{entry.name} {state} {cmdline[:200]}')
    return found


class LaunchProcess(ChildProcess):
    """`ros2 launch malmm_ros FILE name:=value ...` as a subprocess in its own session.

    Use as a context manager (or call kill() in a finally): nothing it started outlives the test.
    """

    kind = 'launch'
    tail_chars = 4000

    def __init__(self, launch_file: str, arguments: Mapping[str, str], *,
                 env: Mapping[str, str], log_path: Path) -> None:
        self.cmd = [sys.executable, str(SCRIPT), PACKAGE, launch_file,
                    *(f'{name}:={value}' for name, value in arguments.items())]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with open(log_path, 'wb') as log:
            self.proc = subprocess.Popen(self.cmd, cwd=log_path.parent, env=dict(env),
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid = self.proc.pid  # a session leader leads its process group
        self.output_name = f'log ({log_path})'

    def log(self) -> str:
        return self.log_path.read_text(errors='replace')

    output = log

    def check_alive(self) -> None:
        """Fails when launch ended or any process it started died (it keeps running then)."""
        if not self.alive:
            raise AssertionError(f'the launch ended: {self.describe()}')
        log = self.log()
        died = DIED.findall(log) + CLEAN.findall(log)
        if died:
            raise AssertionError(f'a launched process ended: {died}\n{self.describe()}')

    def interrupt(self, timeout: float = WAIT_S) -> int:
        """Ctrl-c in the terminal: SIGINT to the group; returns launch's exit status once it
        and every process of its group ended (kills them and fails if they do not)."""
        try:
            os.killpg(self.pgid, signal.SIGINT)
        except ProcessLookupError:
            pass
        code = self.wait_exit(timeout)
        deadline = time.monotonic() + timeout
        while members := group_members(self.pgid):
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f'left running after launch exited: {members}\n'
                                     f'{self.describe()}')
            time.sleep(0.1)
        return code

    def stop_cleanly(self, processes: int, timeout: float = WAIT_S) -> dict[str, int | None]:
        """interrupt(), then check what ctrl-c must give: launch and each of the `processes`
        it started exit 0, launch never had to escalate to SIGTERM or SIGKILL."""
        code = self.interrupt(timeout)
        exits = self.process_exits()
        assert code == 0, f'launch exited with {code}\n{self.describe()}'
        assert len(exits) == processes and all(c == 0 for c in exits.values()), \
            f'exit codes {exits}, expected {processes} processes ending with 0\n{self.describe()}'
        escalated = [line for line in self.log().splitlines() if ESCALATION.search(line)]
        assert not escalated, f'launch escalated: {escalated}\n{self.describe()}'
        return exits

    def started(self) -> dict[str, int]:
        """{launch's name of each process it started: its pid}."""
        return {name: int(pid) for name, pid in STARTED.findall(self.log())}

    def process_exits(self) -> dict[str, int | None]:
        """{launch's name of each process it started: its exit code, None while running}."""
        log = self.log()
        exits: dict[str, int | None] = {name: None for name, _ in STARTED.findall(log)}
        exits.update({name: 0 for name, _ in CLEAN.findall(log)})
        exits.update({name: int(code) for name, _, code in DIED.findall(log)})
        return exits

    def kill(self) -> None:
        """SIGKILL whatever is left of the group, then reap launch."""
        if group_members(self.pgid):
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        super().kill()


def publish_until(publish: Callable[[int], None], done: Callable[[], Any], what: str, *,
                  launch: LaunchProcess, rate: float = 10.0, timeout: float = WAIT_S) -> Any:
    """publish(0), publish(1), ... at about `rate` Hz, as a camera does, until done() returns
    something truthy (returned); fails at `timeout` or as soon as the launch or a node ends."""
    deadline = time.monotonic() + timeout
    count = 0
    while True:
        publish(count)
        count += 1
        next_send = time.monotonic() + 1.0 / rate
        while time.monotonic() < next_send:
            result = done()
            if result:
                return result
            launch.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f'timed out after {timeout} s waiting for {what} '
                                     f'({count} frames sent)\n{launch.describe()}')
            time.sleep(0.01)
