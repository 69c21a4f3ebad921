"""The README is where a new user starts: short, its commands the ones CI runs, its links alive.
(Every setting is documented by the configuration page, generated from the code:
tests/test_docs_site.py.)"""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
MAX_LINES = 250


def test_readme_stays_short() -> None:
    assert len(README.splitlines()) <= MAX_LINES


def test_ci_runs_the_readme_commands() -> None:
    setup = 'pip install -c constraints.txt -e ".[export,test]"'
    assert f"python3 -m venv .venv && . .venv/bin/activate && {setup}" in README
    assert "python3 -m venv .venv\n. .venv/bin/activate\n" in CI
    assert setup.replace("install ", "install -q ") in CI
    # The test command: `pytest` alone on its line, in the README's block and in CI.
    assert "```bash\npytest\n```" in README
    assert "\npytest\n" in CI


def test_ci_builds_the_docs_site_strictly() -> None:
    assert re.search(r"^[A-Z0-9_=]* *(timeout \d+ )?mkdocs build --strict\b", CI, re.MULTILINE)


def test_readme_links_lead_somewhere() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if target.startswith("http"):
            continue
        assert (ROOT / target).is_file(), target
