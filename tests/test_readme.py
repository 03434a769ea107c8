"""The README's code examples run as written."""
import logging
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


@pytest.mark.usefixtures("one_thread")
def test_readme_trl_example_runs(tmp_path, monkeypatch, caplog):
    """The TRL section's example as written: GRPO on a tiny local model through pydistill's drop-in."""
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)  # the example writes runs/trl-grpo
    namespace = {"__name__": "readme"}
    with caplog.at_level(logging.INFO, logger="pydistill"):
        for code in _section_code("## Use with TRL"):
            exec(compile(code, README, "exec"), namespace)
    trainer = namespace["trainer"]
    assert type(trainer).__module__ == "pydistill.integrations.trl.grpo"  # the drop-in, not TRL's class
    assert trainer.state.global_step == trainer.args.max_steps == len(namespace["logged"])
    assert any("GRPOTrainer runs the fused op" in r.getMessage() for r in caplog.records)
