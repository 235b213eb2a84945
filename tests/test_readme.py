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


def _layout_blocks(readme: str) -> dict:
    """The README's Layout section as {folder: [entries]} for every ``tinyvit...`` folder."""
    section = readme.split("## Layout", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    blocks, current = {}, None
    for line in block.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            name = line.split()[0]
            current = name if name.startswith("tinyvit/") else None
            if current:
                blocks[current] = []
        elif current:
            blocks[current].append(line.split()[0])
    return blocks


def _tracked_listing(folder: Path) -> list:
    """``ls folder`` over the files git tracks (no __pycache__), folders with a trailing slash."""
    import subprocess
    try:
        files = subprocess.run(["git", "ls-files", str(folder.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    rel = folder.relative_to(ROOT).as_posix() + "/"
    entries = set()
    for f in files:
        rest = f[len(rel):]
        entries.add(rest.split("/")[0] + "/" if "/" in rest else rest)
    return sorted(entries)


def test_readme_layout_lists_the_package_line_for_line():
    """``ls tinyvit tinyvit/*/`` (the tracked files) is the README's Layout, entry for entry and in order."""
    blocks = _layout_blocks((ROOT / "README.md").read_text())
    package = ROOT / "tinyvit"
    folders = ["tinyvit/"] + [f"tinyvit/{e}" for e in _tracked_listing(package) if e.endswith("/")]
    assert sorted(blocks) == sorted(folders), f"Layout folders {sorted(blocks)} != package folders {sorted(folders)}"
    for folder in folders:
        listed, actual = blocks[folder], _tracked_listing(ROOT / folder)
        assert listed == actual, f"README Layout for {folder}: {listed}\n                  ls gives: {actual}"
