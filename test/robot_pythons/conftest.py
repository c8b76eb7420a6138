"""The robots' Pythons as venvs, built on first use (test/support/runtime_venvs.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from support.runtime_venvs import ROBOT_PYTHONS, VenvBuildError, VenvUnavailableError, ensure_venv


@pytest.fixture(scope='session')
def runtime_python(request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """`runtime_python('3.10')`: the python of that robot's venv, built on the first call.

    Skips with the reason where this machine cannot build it (no interpreter, no package index);
    fails where pip refuses the requirements. Either outcome is kept for the session, so a
    failed build is tried once.
    """
    plugins = request.config.pluginmanager
    capture, terminal = plugins.getplugin('capturemanager'), plugins.getplugin('terminalreporter')
    verbose = request.config.getoption('capture') == 'no'  # -s: pip's output too

    def echo(line: str) -> None:
        if terminal is None:  # an xdist worker: nowhere to show it
            return
        with capture.global_and_fixture_disabled():  # the build takes a while: say so now
            terminal.write_line(line)

    outcomes: dict[str, Path | VenvUnavailableError | VenvBuildError] = {}

    def python(version: str) -> Path:
        if version not in outcomes:
            try:
                outcomes[version] = ensure_venv(ROBOT_PYTHONS[version], echo=echo,
                                                verbose=verbose)
            except (VenvUnavailableError, VenvBuildError) as exc:
                outcomes[version] = exc
        outcome = outcomes[version]
        if isinstance(outcome, VenvUnavailableError):
            pytest.skip(str(outcome))
        if isinstance(outcome, VenvBuildError):
            pytest.fail(str(outcome), pytrace=False)
        return outcome

    return python
