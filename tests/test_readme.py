"""README.md stays true: its two opening commands are the install/run and the CI test command, and the Python
quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    install_run, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert README.index("```bash") < README.index("## ")  # before any section
    assert install_run.startswith("python3 -m venv .venv") and install_run.endswith("fragdefense-train")
    assert test_cmd.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), ".ci/run must run README's test command verbatim"


def test_python_quick_start_runs(capsys):
    code = re.findall(r"```python\n(.*?)\n```", _section("Python quick start"), flags=re.S)
    assert len(code) == 1
    exec(compile(code[0], "README.md (Python quick start)", "exec"), {"__name__": "readme_quick_start"})
    out = capsys.readouterr().out
    assert "topk_intersection" in out and "label_kept_rate" in out
