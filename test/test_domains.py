"""The ROS domain table of the tests (test/support/domains.py) and its use.

Ids must be in range, unused by other runs on the machine, unique across modules, and the only
ids a test source holds: a literal id written into a test would escape the table's checks.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from support.domains import DOMAINS, HIGHEST, LOWEST, RESERVED, TEST_DIR

REPO = TEST_DIR.parent
TABLE = TEST_DIR / 'support' / 'domains.py'
# Where runs outside the tests choose a domain (RESERVED must hold each id they name).
OTHER_RUNS = (REPO / 'Makefile', REPO / '.ci' / 'run', REPO / 'README.md',
              *sorted((REPO / 'bench').glob('*.py')))
SET_DOMAIN = re.compile(r'DOMAIN_ID\W{1,6}(\d+)|--domain-id[ =](\d+)')
NEAR = 5  # tokens after a domain's name that its id may sit in: `X = {'key': 229`


def test_ids_are_in_range_unreserved_and_unique() -> None:
    owner: dict[int, str] = {}
    for module, ids in DOMAINS.items():
        for domain in ids:
            assert LOWEST <= domain <= HIGHEST, f'{module}: {domain} not in {LOWEST}..{HIGHEST}'
            assert domain not in RESERVED, f'{module}: {domain} is {RESERVED[domain]}'
            assert domain not in owner, f'{module} and {owner[domain]} share domain {domain}'
            owner[domain] = module


def test_fast_dds_ports_stay_below_the_ephemeral_range() -> None:
    # RTPS port mapping: PB 7400, DG 250, PG 2, largest offset d3 11; room for 20 participants.
    assert 7400 + 250 * HIGHEST + 11 + 2 * 20 < 32768


def test_other_runs_on_this_machine_are_reserved() -> None:
    named = {int(a or b) for path in OTHER_RUNS if path.exists()
             for a, b in SET_DOMAIN.findall(path.read_text())}
    assert named, 'no domain found in the Makefile, CI script, README or benches'
    assert named <= set(RESERVED), sorted(named - set(RESERVED))


@pytest.mark.parametrize('module', sorted(DOMAINS))
def test_listed_module_takes_its_ids_from_the_table(module: str) -> None:
    source = (TEST_DIR / module).read_text()
    assert re.search(r'\bdomain_ids?\(__file__\)', source), f'{module} never reads the table'


@pytest.mark.slow  # collects every listed module in a fresh pytest
def test_make_test_fast_leaves_out_every_listed_module() -> None:
    """test/conftest.py marks their tests dds; the Makefile's selection must drop them all."""
    makefile = (REPO / 'Makefile').read_text()
    selection = re.search(r"^test-fast:.*\n\t.* -m '([^']+)'", makefile, re.MULTILINE)
    assert selection, 'no -m selection in the test-fast target'
    result = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-m',
                             selection[1], *(str(TEST_DIR / module) for module in DOMAINS)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 5, result.stdout[-3000:] + result.stderr[-3000:]  # none left


def literal_ids(source: str) -> list[int]:
    """Line numbers where an integer literal follows a name or string that mentions a domain,
    NEAR tokens at most and only operators and strings between (comments do not count)."""
    significant = (tokenize.NAME, tokenize.NUMBER, tokenize.STRING, tokenize.OP)
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type in significant or t.type == tokenize.NEWLINE]
    lines = []
    for i, token in enumerate(tokens):
        names_a_domain = token.type in (tokenize.NAME, tokenize.STRING)
        if not names_a_domain or 'domain' not in token.string.lower():
            continue
        for after in tokens[i + 1:i + 1 + NEAR]:
            if after.type in (tokenize.NEWLINE, tokenize.NAME):
                break
            if re.fullmatch(r'\d+|[\'"]\d+[\'"]', after.string):
                lines.append(after.start[0])
                break
    return lines


def test_no_test_source_writes_a_domain_id_of_its_own() -> None:
    sources = {path: path.read_text() for path in sorted(TEST_DIR.rglob('*.py'))
               if path not in (TABLE, Path(__file__))}
    found = [f'{path.relative_to(TEST_DIR)}:{line}' for path, source in sources.items()
             if 'domain' in source.lower() for line in literal_ids(source)]
    assert found == [], f'domain ids outside test/support/domains.py: {found}'


@pytest.mark.parametrize('line', [
    'DOMAIN_ID = 216', "ENV = {'ROS_DOMAIN_ID': '231'}", "env['ROS_DOMAIN_ID'] = '5'",
    "record_live(bag, domain_id=7)", "cmd = ['--domain-id', '9']",
    "DOMAIN_IDS = {'onnxruntime': 229, 'torch': 230}"])
def test_literal_ids_are_found(line: str) -> None:
    assert literal_ids(line + '\n') == [1]


@pytest.mark.parametrize('line', [
    'DOMAIN_ID = domain_id(__file__)  # was 216', 'Driver(DOMAIN_ID, rate=30)',
    "NodeProcess(DOMAIN_ID, ['publish_every_n:=3'])", 'WAIT_S = 60.0'])
def test_ids_from_the_table_are_not_flagged(line: str) -> None:
    assert literal_ids(line + '\n') == []
