"""The README is the user's manual: it must not drift from the code."""

from pathlib import Path

from service.core.config import Settings

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
# The settings of one part of the service may be documented on that part's own page instead.
MANUAL = README + "".join(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`ALEXNET_{name.upper()}`" in MANUAL, name


def test_ci_runs_the_readme_commands() -> None:
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[export,test]"' in README
    assert 'pip install -q -c constraints.txt -e ".[export,test]"' in ci
    assert "\npytest\n" in README and "\npytest\n" in ci
