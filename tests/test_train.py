"""The training loop, short runs only (the full default run is measured in the README, not
here): outputs, exact resume in float64, Ctrl-C, NaN/Inf handling, the command line,
and DeiT distillation from a trained teacher."""
import json
import os
import signal

import numpy as np
import pytest

import tinyvit.training.train as train_mod
from tinyvit.training.checkpoint import load_checkpoint
from tinyvit.cli import main
from tinyvit.training.train import TrainConfig, TrainingDiverged, train

TINY = dict(patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32, batch_size=128, warmup_epochs=1, lr=1e-2, mixup=0.0,
            cutmix=0.0, pool="cls")


def config(tmp_path, name="run", **kw):
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **kw})


def test_short_run_writes_everything_and_learns(tmp_path):
    s = train(config(tmp_path, epochs=3), progress=False)
    assert s["finished"] and s["steps"] == 3 * (1438 // 128) and s["skipped_steps"] == []
    assert s["test_acc"] > 0.2, "33 steps of a tiny ViT must beat chance (0.1) clearly"
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "curves.png", "history.json"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["history"]["step_loss"]) == s["steps"] and len(hist["history"]["test_acc"]) == 3
    ck = load_checkpoint(out / "checkpoint.safetensors")
    assert ck.meta["step"] == s["steps"] and ck.meta["train_config"]["dim"] == 16


def final_weights(path):
    return load_checkpoint(path).params


RESUME = dict(dtype="float64", epochs=3, drop_path=0.2, dropout=0.1, crop_padding=1, mixup=0.4, cutmix=1.0,
              randaugment=1)


def test_resume_is_exact_in_float64(tmp_path):
    """Interrupted at step 13 (mid-epoch) and resumed == uninterrupted, bit for bit."""
    full = train(config(tmp_path, "full", **RESUME), progress=False)
    part = train(config(tmp_path, "part", **RESUME), progress=False, stop_after=13)
    assert part["steps"] == 13 and not part["finished"]
    done = train(config(tmp_path, "part", **RESUME), progress=False,
                 resume=tmp_path / "part" / "checkpoint.safetensors")
    assert done["finished"] and done["steps"] == full["steps"]
    a, b = final_weights(tmp_path / "full" / "checkpoint.safetensors"), final_weights(
        tmp_path / "part" / "checkpoint.safetensors")
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert done["test_acc"] == full["test_acc"]


def test_ctrl_c_saves_and_resumes(tmp_path):
    def interrupt(step, model):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = dict(dtype="float64", epochs=1, drop_path=0.1)
    s = train(config(tmp_path, "cc", **cfg), progress=False, on_step=interrupt)
    assert s["interrupted"] and s["steps"] == 5
    assert load_checkpoint(tmp_path / "cc" / "checkpoint.safetensors").meta["step"] == 5
    train(config(tmp_path, "cc", **cfg), progress=False, resume=tmp_path / "cc" / "checkpoint.safetensors")
    train(config(tmp_path, "ref", **cfg), progress=False)
    a, b = final_weights(tmp_path / "cc" / "checkpoint.safetensors"), final_weights(
        tmp_path / "ref" / "checkpoint.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def nan_loss_from(bad_steps, monkeypatch):
    """Make the loss NaN at the given 0-based steps (counted by calls to the loss)."""
    real = train_mod.softmax_cross_entropy
    calls = {"n": 0}

    def loss(logits, targets, smoothing):
        value, d = real(logits, targets, smoothing)
        step, calls["n"] = calls["n"], calls["n"] + 1
        if step in bad_steps:
            return value * np.nan, d * np.nan
        return value, d

    monkeypatch.setattr(train_mod, "softmax_cross_entropy", loss)


def test_a_nan_step_is_skipped_and_changes_nothing(tmp_path, monkeypatch):
    nan_loss_from({4}, monkeypatch)
    seen = {}

    def record(step, model):
        seen[step] = {k: v.copy() for k, v in model.params.items()}

    s = train(config(tmp_path, epochs=1), progress=False, on_step=record)
    assert s["finished"] and s["skipped_steps"] == [4]
    assert all(np.array_equal(seen[4][k], seen[5][k]) for k in seen[4]), "the skipped step must not move weights"
    assert not all(np.array_equal(seen[5][k], seen[6][k]) for k in seen[5])


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    nan_loss_from(set(range(13, 100)), monkeypatch)
    with pytest.raises(TrainingDiverged, match=r"last at step 15.*step 11\)"):
        train(config(tmp_path, epochs=3, max_bad_steps=3), progress=False)
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert ck.meta["step"] == 11 and all(np.isfinite(v).all() for v in ck.params.values())


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--epochs", "1", "--patch-size", "4", "--dim", "16", "--depth", "1", "--heads", "2",
               "--mlp-dim", "32", "--batch-size", "128", "--warmup-epochs", "0.5", "--out", str(out), "--no-progress",
               "--optimizer", "nesterov", "--lr", "0.05"])
    text = capsys.readouterr().out
    assert rc == 0 and "test accuracy:" in text and "checkpoint:" in text and (out / "curves.png").exists()
    rc = main(["train", "--resume", str(out / "checkpoint.safetensors"), "--no-progress"])  # already at its end
    assert rc == 0 and "finished: 11/11 steps" in capsys.readouterr().out
    rc = main(["train", "--epochs", "1", "--lr", "-1", "--out", str(tmp_path / "bad"), "--no-progress"])
    assert rc == 1 and "lr" in capsys.readouterr().err
    rc = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad"), "--no-progress"])
    assert rc == 1 and "nowhere" in capsys.readouterr().err


def test_distillation_from_a_trained_teacher(tmp_path):
    """A student with a distillation token and head learns from a teacher checkpoint: its
    distillation head follows the teacher's decisions far above chance."""
    from tinyvit.training.data import Normalizer, load_digits, split

    teacher = train(config(tmp_path, "teacher", epochs=4, dim=32, mlp_dim=64), progress=False)
    student = train(config(tmp_path, "student", epochs=3, pool="cls",
                           teacher=str(tmp_path / "teacher" / "checkpoint.safetensors")), progress=False)
    ck = load_checkpoint(tmp_path / "student" / "checkpoint.safetensors")
    assert "dist_token" in ck.params and "head_dist.weight" in ck.params
    assert teacher["test_acc"] > 0.3 and student["test_acc"] > 0.2, (teacher["test_acc"], student["test_acc"])

    train_set, test_set = split(load_digits(), 0.2, 0)
    x = Normalizer.fit(train_set.images)(test_set.images)
    teacher_pred = teacher["model"].forward(x).argmax(1)
    _, dist_logits = student["model"].forward_distill(x, train=False)
    agree = float((dist_logits.argmax(1) == teacher_pred).mean())
    assert agree > 0.3, f"the distillation head agrees with the teacher on {agree:.2f} of the test images"


def test_bad_configs(tmp_path):
    for kw, match in ((dict(epochs=0), "epochs"), (dict(warmup_epochs=9, epochs=2), "warmup_epochs"),
                      (dict(clip_grad=float("nan")), "clip_grad"), (dict(label_smoothing=1.0), "label_smoothing"),
                      (dict(batch_size=5000), "larger than the training set"),
                      (dict(teacher="t.safetensors", pool="mean"), "pool='cls'"),
                      (dict(distill_alpha=1.5), "distill_alpha")):
        with pytest.raises(ValueError, match=match):
            train(config(tmp_path, **kw), progress=False)


def test_teacher_must_fit_the_data(tmp_path):
    from tinyvit import VisionTransformer
    from tinyvit.training.checkpoint import save_checkpoint
    from tinyvit.training.optim import AdamW

    wrong = VisionTransformer(image_size=8, patch_size=4, num_classes=5, dim=8, depth=1, heads=2, mlp_dim=8,
                              channels=1)
    save_checkpoint(tmp_path / "t.safetensors", wrong, AdamW(), 0)
    with pytest.raises(ValueError, match="5 classes"):
        train(config(tmp_path, teacher=str(tmp_path / "t.safetensors")), progress=False)
    wrong = VisionTransformer(image_size=16, patch_size=4, num_classes=10, dim=8, depth=1, heads=2, mlp_dim=8,
                              channels=1)
    save_checkpoint(tmp_path / "t.safetensors", wrong, AdamW(), 0)
    with pytest.raises(ValueError, match="16x16"):
        train(config(tmp_path, teacher=str(tmp_path / "t.safetensors")), progress=False)
