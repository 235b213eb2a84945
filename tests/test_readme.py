"""The README's short example runs as written (the first ```python block), and the test
command it names is the one .ci/run runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md example", "exec"), namespace)
    assert namespace["logits"].shape == (8, 10)
    assert namespace["dx"].shape == (8, 3, 32, 32)
    assert "blocks.0.attn.qkv.weight" in namespace["sd"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python3 -m pytest -q"
    assert f"The test command is `{command}`" in readme
    assert any(line.strip() == command for line in ci.splitlines())
