"""The README's code examples run as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _section_code(heading):
    text = open(README, encoding="utf-8").read()
    if heading not in text:
        pytest.fail(f"README.md lacks the section {heading!r}")
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, f"no python example under {heading!r}"
    return blocks


@pytest.mark.parametrize("heading", ["## Ten lines", "## The core op", "## Use it from your own trainer"])
def test_readme_examples_run(heading, capsys):
    for code in _section_code(heading):
        exec(compile(code, README, "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()
