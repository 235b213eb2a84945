"""Issue 11, items 4-10 (and the temp files of 17): what a new user ran into, one test each.

Each test failed before its fix: CuPy-backend runs without a GPU failed instead of skipping;
``--epochs 1`` was refused; the tour rewrote tracked pictures; tracebacks instead of one-line
errors; a garbled divergence message; ``--resume`` ignoring flags and changed data; a second
``train`` overwriting a run; profiler noise, PNG bytes under ``.jpg``, 0600 files, flags without
help, a bare ``ModuleNotFoundError`` in the tour, no ``--version``; killed writes' temp files
piling up.
"""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyvit.training.checkpoint as ckpt_mod
import tinyvit.training.train as train_mod
from tinyvit.backend import cupy_available
from tinyvit.cli import build_parser, main
from tinyvit.training.checkpoint import load_checkpoint, save_arrays
from tinyvit.training.train import TrainConfig, TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--patch-size", "4", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32", "--batch-size", "128",
        "--mixup", "0", "--no-progress"]


def tiny(tmp_path, name="run", **kw):
    base = dict(patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32, batch_size=128, mixup=0.0, epochs=1)
    return TrainConfig(**{**base, "out": str(tmp_path / name), **kw})


# ---------------------------------------------------------------- 4: CuPy runs without a GPU skip
@pytest.mark.skipif(cupy_available()[0], reason="CuPy runs here: the suite really runs on it")
def test_cupy_backend_suite_without_a_gpu_skips_instead_of_failing():
    env = dict(os.environ, TINYVIT_BACKEND="cupy", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_inputs.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = proc.stdout[-2000:]
    assert proc.returncode == 0, tail
    assert "skipped" in tail and "failed" not in tail and "error" not in tail.lower().replace("errors", "")
    assert "CuPy backend unavailable here" in proc.stdout or "CuPy cannot run here" in proc.stdout


# ---------------------------------------------------------------- 5: short runs, all errors at once
def test_one_epoch_trains_with_a_shortened_warmup(tmp_path, capsys):
    assert TrainConfig(epochs=1).warmup() == 0.5 and TrainConfig(epochs=60).warmup() == 3.0
    assert TrainConfig(epochs=2, warmup_epochs=1.5).warmup() == 1.5
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "one"), *TINY]) == 0
    saved = load_checkpoint(tmp_path / "one" / "checkpoint.safetensors").meta["train_config"]
    assert saved["warmup_epochs"] == 0.5  # saved resolved: a resume keeps the schedule
    capsys.readouterr()


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(ValueError) as err:
        TrainConfig(epochs=1, warmup_epochs=4, lr=-1.0, label_smoothing=2.0).check()
    text = str(err.value)
    assert "3 settings" in text and "warmup_epochs" in text and "lr" in text and "label_smoothing" in text


# ---------------------------------------------------------------- 6: the tour leaves docs/images alone
def test_the_tour_writes_its_pictures_outside_the_tracked_folder():
    import importlib.util

    hook = sys.excepthook
    spec = importlib.util.spec_from_file_location("_tour", ROOT / "examples" / "_tour.py")
    tour = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(tour)
    finally:
        sys.excepthook = hook
    default = Path(tour.DEFAULT_OUT).resolve()
    assert default == ROOT / "runs" / "tour"
    assert "runs/" in (ROOT / ".gitignore").read_text().split()


def test_a_chapter_without_torch_says_what_to_install(tmp_path):
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.path.insert(0, 'examples'); "
            "sys.argv = ['examples/04_forward_backward.py', '--quick', '--out', sys.argv[1]]; "
            "runpy.run_path('examples/04_forward_backward.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line
    assert "needs 'torch'" in proc.stderr and "pip install -e '.[examples]'" in proc.stderr


# ---------------------------------------------------------------- 7: one-line errors
def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"tinyvit {command}: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--out", str(tmp_path / "afile"), "--epochs", "1", *TINY]) == 1
    assert "is a file, not a folder" in one_line_error(capsys, "train")


def test_a_second_ctrl_c_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "run_train", interrupted)
    parser = build_parser()
    args = parser.parse_args(["train"])
    args.func = interrupted
    monkeypatch.setattr("tinyvit.cli.build_parser", lambda: _Fixed(parser, args))
    assert main(["train"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


class _Fixed:
    def __init__(self, parser, args):
        self.parser, self.args = parser, args

    def parse_args(self, argv):
        return self.args

    def print_help(self):
        self.parser.print_help()


def test_disk_full_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", full)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "full"), *TINY]) == 1
    line = one_line_error(capsys, "train")
    assert "No space left on device" in line and "checkpoint.safetensors" in line
    assert [p.name for p in (tmp_path / "full").iterdir()] == []


def test_only_the_curves_failing_is_a_warning(tmp_path, monkeypatch, capsys):
    def broken(history, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_mod, "plot_curves", broken)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "c"), *TINY]) == 0
    captured = capsys.readouterr()
    assert "warning: could not write curves.png" in captured.err and "test accuracy" in captured.out
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["checkpoint.safetensors", "history.json"]


def test_a_train_config_that_is_a_list_is_one_line(tmp_path, capsys):
    train(tiny(tmp_path), progress=False)
    path = tmp_path / "run" / "checkpoint.safetensors"
    arrays, meta = ckpt_mod.load_arrays_and_metadata(path)
    save_arrays(path, arrays, dict(meta, train_config=json.dumps([1, 2])))
    assert main(["train", "--resume", str(path), "--no-progress"]) == 1
    assert "not the settings of a run" in one_line_error(capsys, "train")


def test_an_npz_member_that_is_not_npy_is_refused(tmp_path):
    import zipfile

    from tinyvit import load_pretrained
    from tinyvit.training.checkpoint import load_arrays

    with zipfile.ZipFile(tmp_path / "w.npz", "w") as z:
        z.writestr("cls_token.npy", b"not an array")
    with pytest.raises(ValueError, match="not an .npy array"):
        load_pretrained(tmp_path / "w.npz", heads=2)
    with pytest.raises(ValueError, match="not an .npy array"):
        load_arrays(tmp_path / "w.npz")  # NumPy's own load returns the raw bytes here


# ---------------------------------------------------------------- 8: divergence
def nan_loss_from(steps, monkeypatch):
    real = train_mod.softmax_cross_entropy

    def loss(logits, targets, smoothing=0.0):
        value, d = real(logits, targets, smoothing)
        if loss.calls in steps:
            value, d = value * np.nan, d * np.nan
        loss.calls += 1
        return value, d

    loss.calls = 0
    monkeypatch.setattr(train_mod, "softmax_cross_entropy", loss)


def test_divergence_before_any_checkpoint_reads_right(tmp_path, monkeypatch, recwarn):
    nan_loss_from(set(range(0, 100)), monkeypatch)
    with pytest.raises(TrainingDiverged) as err:
        train(tiny(tmp_path, max_bad_steps=2), progress=False)
    text = str(err.value)
    assert "no checkpoint had been written yet" in text and "none was written" not in text
    assert "steps 0-1" in text and "lower --lr" in text
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # no NumPy noise first


def test_nan_in_a_resumed_optimiser_state_is_named(tmp_path):
    train(tiny(tmp_path), progress=False)
    path = tmp_path / "run" / "checkpoint.safetensors"
    arrays, meta = ckpt_mod.load_arrays_and_metadata(path)
    key = next(k for k in arrays if k.startswith("optim.exp_avg_sq."))
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] = np.nan
    save_arrays(path, arrays, meta)
    with pytest.raises(ValueError, match=r"optimiser state holds NaN/Inf.*damaged"):
        train(tiny(tmp_path, epochs=2), resume=str(path), progress=False)


# ---------------------------------------------------------------- 9: runs, resume, data
def test_a_second_train_into_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", "--epochs", "1", "--out", out, *TINY]) == 0
    assert main(["train", "--epochs", "1", "--out", out, *TINY]) == 1
    assert "already holds a run" in one_line_error(capsys, "train")
    assert main(["train", "--epochs", "1", "--out", out, "--overwrite", *TINY]) == 0
    capsys.readouterr()


def test_resume_applies_more_epochs_and_a_new_lr_and_refuses_the_rest(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--epochs", "1", "--out", str(out), *TINY]) == 0
    path = str(out / "checkpoint.safetensors")
    capsys.readouterr()
    assert main(["train", "--resume", path, "--epochs", "80", "--lr", "0.01", "--dim", "32", "--pool", "cls",
                 "--no-progress"]) == 1
    line = one_line_error(capsys, "train")
    assert "--dim 32 (the checkpoint has 16)" in line and "--pool cls" in line and "--epochs" not in line.split(
        "cannot change")[1].split("; only")[0]
    assert main(["train", "--resume", path, "--epochs", "2", "--lr", "0.01", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "finished: 22/22 steps" in captured.out and "epochs=2" in captured.err and "lr=0.01" in captured.err
    saved = load_checkpoint(path).meta["train_config"]
    assert saved["epochs"] == 2 and saved["lr"] == 0.01 and saved["dim"] == 16


def test_resume_on_changed_data_is_refused_unless_asked(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 8, 8), dtype=np.uint8)
    labels = np.arange(300) % 3
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    out = tmp_path / "r"
    assert main(["train", "--data", str(tmp_path / "d.npz"), "--epochs", "1", "--out", str(out), *TINY[:-3],
                 "--batch-size", "32", "--no-progress"]) == 0
    images[5, 0, 0] ^= 1  # one pixel of one image
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    path = str(out / "checkpoint.safetensors")
    assert main(["train", "--resume", path, "--epochs", "2", "--no-progress"]) == 1
    assert "data split differs" in one_line_error(capsys, "train")
    assert main(["train", "--resume", path, "--epochs", "2", "--accept-changed-data", "--no-progress"]) == 0
    assert "warning: the data differs" in capsys.readouterr().err


# ---------------------------------------------------------------- 10: noise
def test_profiler_lines_are_filtered(capfd):
    from tinyvit.benchmark.timing import quiet_profiler_logs

    with quiet_profiler_logs():
        os.write(2, b"USDT:2026 x.cpp:52] profiler_start\nSTAGE:2026 warm up\na real problem\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "STAGE" not in err and "a real problem" in err


def test_attention_writes_the_format_its_name_says(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinyvit.training.checkpoint import atomic_save_figure

    fig = plt.figure()
    try:
        atomic_save_figure(fig, tmp_path / "a.jpg")
        with pytest.raises(ValueError, match="picture format"):
            atomic_save_figure(fig, tmp_path / "a.bmpx")
    finally:
        plt.close(fig)
    assert (tmp_path / "a.jpg").read_bytes()[:3] == b"\xff\xd8\xff"


def test_written_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt_mod.atomic_write(tmp_path / "f.bin", b"x")
        assert os.stat(tmp_path / "f.bin").st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "f.bin", 0o600)  # a replaced file keeps its own mode
        ckpt_mod.atomic_write(tmp_path / "f.bin", b"y")
        assert os.stat(tmp_path / "f.bin").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_every_train_flag_has_help_and_gelu_exact_is_a_name():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    bare = [a.option_strings for a in train_parser._actions if not a.help]
    assert not bare, f"flags without help: {bare}"
    args = parser.parse_args(["train", "--gelu", "exact"])
    assert train_mod._explicit(args)["gelu"] == "none"
    assert "exact" in next(a.help for a in train_parser._actions if "--gelu" in a.option_strings)


def test_version(capsys):
    from tinyvit import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tinyvit {__version__}"


# ---------------------------------------------------------------- 17: temp files of killed writes
def test_stale_temp_files_are_cleaned_on_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / f"checkpoint.safetensors.{dead}.ab12cd.tmp",
             tmp_path / f"checkpoint.safetensors.{os.getpid()}.zz99.tmp"]
    live = tmp_path / f"checkpoint.safetensors.{os.getppid()}.xy.tmp"  # a live process may still be writing
    other = tmp_path / "history.json.123.ab.tmp"  # another file's temp: not ours to judge
    for p in stale + [live, other]:
        p.write_bytes(b"half")
    ckpt_mod.atomic_write(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
