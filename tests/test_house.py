"""The package's imports point one way: the layers import only the backend and each other,
the model only the backend and the layers, and the jobs around them (training, pretrained,
benchmark, the command line) use the layers and the model, never the reverse."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinyvit"
JOBS = ("training", "pretrained", "benchmark", "cli", "gradcheck", "compress", "quantize", "distributed")


def _imports(path: Path, package: Path = PACKAGE) -> set:
    """Absolute tinyvit module names a file imports (relative imports resolved)."""
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    package = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("tinyvit"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tinyvit"))
    return found


def _offending(path: Path, forbidden: tuple, package: Path = PACKAGE) -> list:
    return sorted(m for m in _imports(path, package) if any(m == f"tinyvit.{f}" or m.startswith(f"tinyvit.{f}.")
                                                  for f in forbidden))


def test_layers_import_only_the_backend_and_each_other():
    bad = {}
    for path in sorted((PACKAGE / "layers").glob("*.py")):
        off = _offending(path, JOBS + ("model",))
        if off:
            bad[path.name] = off
    assert not bad, f"layers must not import the model or the jobs around it: {bad}"


def test_model_and_backend_import_no_job():
    for name in ("model.py", "backend.py"):
        off = _offending(PACKAGE / name, JOBS)
        assert not off, f"{name} imports {off}"
    assert not _offending(PACKAGE / "backend.py", ("layers", "model"))


def test_the_import_check_sees_a_planted_reverse_import(tmp_path):
    """The checker above can fail: a layer file that imports training is caught."""
    fake = PACKAGE / "layers" / "linear.py"
    text = fake.read_text() + "\nfrom ..training import optim\n"
    planted = tmp_path / "tinyvit" / "layers" / "linear.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(text)
    assert _offending(planted, JOBS, tmp_path / "tinyvit") == ["tinyvit.training", "tinyvit.training.optim"]
