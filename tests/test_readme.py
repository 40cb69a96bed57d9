"""README.md promises: its Quickstart commands are the ones CI runs, its example runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    quickstart = README.split("## Quickstart", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", quickstart, flags=re.S).group(1).splitlines()
    assert len(commands) == 2
    install_and_run, install_and_test = commands
    assert "python -m ltroute" in install_and_run
    assert "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert install_and_test in ci
    torch_pin = ci.index("pip install torch==2.13.0")
    assert torch_pin < ci.index(install_and_test)


@pytest.mark.slow
def test_usage_example_runs(capsys):
    """The first Python block of the README, as pasted (30 epochs on letter-LT)."""
    example = _code_blocks("python")[0]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    report = capsys.readouterr().out
    assert "few" in report and "overall" in report
    assert namespace["clf"].score(namespace["data"].X_test, namespace["data"].y_test) > 0.7
