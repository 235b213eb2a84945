"""One workflow on the digits: train -> predict -> attention -> eval -> export -> reload.

A training checkpoint and an export carry their whole architecture, class names and
preprocessing in the safetensors metadata, so every command reads them with no other
argument and sees the image the way the model was trained (1 grey channel, 8x8, the
training set's mean/std). Before this, ``predict`` on a checkpoint failed ("cannot tell the
layout"), an export lost heads/eps/GELU/norm placement, and images came in with 3 channels.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from tinyvit import export_pretrained, load_pretrained
from tinyvit.cli import main
from tinyvit.training.checkpoint import load_arrays_and_metadata
from tinyvit.training.data import load_digits, split
from tinyvit.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "data" / "digits"
SEVEN = DIGITS / "7" / "0017.png"
# small, fast, and every architecture field away from its default: tanh GELU, mean pooling, eps 1e-5
TINY = dict(patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32, batch_size=128, warmup_epochs=1, lr=1e-2,
            mixup=0.0, epochs=4, gelu="tanh", pool="mean")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("workflow")
    summary = train(TrainConfig(**TINY, out=str(out / "run")), progress=False)
    return out, summary, out / "run" / "checkpoint.safetensors"


def test_checkpoint_carries_its_architecture_labels_and_preprocessing(run):
    _, summary, ckpt = run
    _, meta = load_arrays_and_metadata(ckpt)
    assert json.loads(meta["model_config"]) == summary["model"].config.to_dict()
    assert json.loads(meta["labels"]) == [str(d) for d in range(10)]
    pre = json.loads(meta["preprocessing"])
    train_set, _ = split(load_digits(), 0.2, 0)
    assert pre["image_size"] == [8, 8] and pre["channels"] == 1 and pre["resize"] == "stretch"
    np.testing.assert_allclose(pre["mean"], [train_set.images.mean()], rtol=1e-6)
    np.testing.assert_allclose(pre["std"], [train_set.images.std()], rtol=1e-6)


def test_load_pretrained_restores_a_checkpoint_exactly_with_no_arguments(run):
    _, summary, ckpt = run
    trained = summary["model"]
    m = load_pretrained(ckpt)
    assert m.config == trained.config and m.dtype == trained.dtype
    assert m.config.gelu == "tanh" and m.config.pool == "mean" and m.config.channels == 1
    for k, v in trained.state_dict().items():
        np.testing.assert_array_equal(m.state_dict()[k], v, err_msg=k)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(m.forward(x), trained.forward(x))
    assert m.labels == [str(d) for d in range(10)] and m.preprocessing.channels == 1


def test_an_argument_that_disagrees_with_the_file_is_an_error(run):
    _, _, ckpt = run
    with pytest.raises(ValueError, match="heads=2 but 4 was passed"):
        load_pretrained(ckpt, heads=4)
    with pytest.raises(ValueError, match="gelu='tanh' but 'none' was passed"):
        load_pretrained(ckpt, gelu="none")
    with pytest.raises(ValueError, match="layer_norm_eps"):
        load_pretrained(ckpt, layer_norm_eps=1e-5)
    assert load_pretrained(ckpt, heads=2, gelu="tanh").config.heads == 2  # agreeing is fine


def test_predict_takes_the_checkpoint_and_preprocesses_as_trained(run, capsys):
    _, summary, ckpt = run
    assert main(["predict", str(SEVEN), "--weights", str(ckpt), "--json", "--top", "3"]) == 0
    captured = capsys.readouterr()
    top = json.loads(captured.out)
    assert [sorted(t) for t in top] == [["index", "label", "probability"]] * 3
    assert "grey" in captured.err and "trained" in captured.err
    # the same numbers as the model on the same pixels, normalised with the training statistics
    from PIL import Image

    with Image.open(SEVEN) as im:
        pixels = np.asarray(im, dtype=np.float32)[None, None] / np.float32(255)  # (1, 1, 8, 8)
    m = summary["model"]
    pre = m.preprocessing
    x = ((pixels - np.float32(pre.mean[0])) / np.float32(pre.std[0])).astype(np.float32)
    logits = m.forward(x)[0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert top[0]["index"] == int(np.argmax(p)) and top[0]["label"] == str(int(np.argmax(p)))
    assert abs(top[0]["probability"] - p.max()) < 1e-6
    for recipe in ("tutorial", "hf"):  # named recipes also read the image as the model's one channel
        assert main(["predict", str(SEVEN), "--weights", str(ckpt), "--recipe", recipe]) == 0
    capsys.readouterr()


def test_attention_takes_the_checkpoint(run, capsys, tmp_path):
    _, _, ckpt = run
    assert main(["attention", str(SEVEN), "--weights", str(ckpt), "-o", str(tmp_path / "att.png")]) == 0
    assert (tmp_path / "att.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()


def test_eval_recomputes_the_training_test_accuracy(run, capsys):
    _, summary, ckpt = run
    assert main(["eval", "--weights", str(ckpt), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == summary["test_images"] == 359
    assert result["accuracy"] == summary["test_acc"]  # the same images, normalisation and model: exactly


def test_eval_on_an_image_folder_equals_predict_image_by_image(run, capsys):
    _, _, ckpt = run
    assert main(["eval", "--weights", str(ckpt), "--data", str(DIGITS), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    files = sorted(DIGITS.glob("*/*.png"))
    assert result["images"] == len(files) == 20
    correct = 0
    for f in files:
        assert main(["predict", str(f), "--weights", str(ckpt), "--json", "--top", "1"]) == 0
        correct += json.loads(capsys.readouterr().out)[0]["label"] == f.parent.name
    assert result["correct"] == correct and result["accuracy"] == correct / len(files)


def test_eval_on_an_npz_and_its_errors(run, capsys, tmp_path):
    _, summary, ckpt = run
    _, test = split(load_digits(), 0.2, 0)
    np.savez(tmp_path / "test.npz", images=test.images[:, 0], labels=test.labels, classes=np.array(test.classes))
    assert main(["eval", "--weights", str(ckpt), "--data", str(tmp_path / "test.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == summary["test_acc"]
    np.savez(tmp_path / "big.npz", images=np.zeros((3, 16, 16), np.float32), labels=np.arange(3))
    assert main(["eval", "--weights", str(ckpt), "--data", str(tmp_path / "big.npz")]) == 1
    assert "images are 1x16x16 (CxHxW) but the model expects 1x8x8" in capsys.readouterr().err
    (tmp_path / "cats" / "tabby").mkdir(parents=True)
    (tmp_path / "cats" / "tabby" / "a.png").write_bytes(SEVEN.read_bytes())
    assert main(["eval", "--weights", str(ckpt), "--data", str(tmp_path / "cats")]) == 1
    assert "classes ['tabby'] are not among the model's labels" in capsys.readouterr().err


def test_export_and_reload_exactly(run, capsys, tmp_path):
    out, summary, ckpt = run
    m = summary["model"]
    export_pretrained(m, tmp_path / "digits.safetensors")  # the default layout: tinyvit
    back = load_pretrained(tmp_path / "digits.safetensors")
    assert back.config == m.config and back.labels == m.labels and back.preprocessing == m.preprocessing
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(back.forward(x), m.forward(x))  # tanh GELU, eps, pool: nothing lost
    # the command: checkpoint -> export -> eval (the export remembers its test split) and predict
    assert main(["export", "--weights", str(ckpt), "-o", str(tmp_path / "cli.safetensors")]) == 0
    assert main(["eval", "--weights", str(tmp_path / "cli.safetensors"), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["accuracy"] == summary["test_acc"]
    assert main(["predict", str(SEVEN), "--weights", str(tmp_path / "cli.safetensors")]) == 0
    capsys.readouterr()


def test_shipped_digit_images_are_test_split_digits():
    """examples/data/digits/<label>/<index>.png: row <index> of the bundled digits, from its test split."""
    from PIL import Image

    ds = load_digits()
    _, test = split(ds, 0.2, 0)
    files = sorted(DIGITS.glob("*/*.png"))
    assert len(files) == 20 and {f.parent.name for f in files} == {str(d) for d in range(10)}
    for f in files:
        i = int(f.stem)
        assert ds.labels[i] == int(f.parent.name)
        with Image.open(f) as im:
            assert im.mode == "L" and im.size == (8, 8)
            np.testing.assert_array_equal(np.asarray(im), np.round(ds.images[i, 0] * 255).astype(np.uint8))
        assert any(np.array_equal(ds.images[i], t) for t in test.images)


def test_the_readme_workflow_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every line of the README's workflow block, run from a copy of the repository root; only the
    training run is shortened (two epochs of a small model) to keep the test fast."""
    import re
    import shlex
    import shutil

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Workflow.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands[0] == "tinyvit train" and len(commands) >= 7
    shutil.copytree(DIGITS, tmp_path / "examples" / "data" / "digits")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "tinyvit"
        if argv[1] == "train":
            argv += ["--epochs", "2", "--warmup-epochs", "1", "--dim", "16", "--mlp-dim", "32", "--depth", "1",
                     "--heads", "2", "--no-progress"]
        assert main(argv[1:]) == 0, command
    out = capsys.readouterr().out
    assert "accuracy:" in out and (tmp_path / "att.png").exists() and (tmp_path / "digits.safetensors").exists()


def test_eval_matches_classes_through_a_labels_file(run, capsys, tmp_path):
    _, _, ckpt = run
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "data" / "seven").mkdir(parents=True)
    (tmp_path / "data" / "seven" / "a.png").write_bytes(SEVEN.read_bytes())
    assert main(["eval", "--weights", str(ckpt), "--data", str(tmp_path / "data"), "--labels",
                 str(tmp_path / "names.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
