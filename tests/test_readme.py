"""The README is the user's manual: it must not drift from the code."""

from pathlib import Path

from service.core.config import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()
# The pages the README links for a topic of their own (docs/state.md: the state database).
DOCS = "\n".join(page.read_text() for page in sorted((Path(__file__).parent.parent / "docs").glob("*.md")))


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`ALEXNET_{name.upper()}`" in README + DOCS, name


def test_ci_runs_the_readme_commands() -> None:
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[export,test]"' in README
    assert 'pip install -q -c constraints.txt -e ".[export,test]"' in ci
    assert "\npytest\n" in README and "\npytest\n" in ci
