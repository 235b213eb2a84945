"""Data-parallel training: K ranks compute what one process computes.

In-process (no MPI needed): per-sample random draws split over ranks equal one process's
draws bit for bit; a rank's augmented share equals its rows of the whole batch; the bucketed
all-reduce returns the mean and never leaves the device (strict arrays); NCCL's absence is a
clear error.

Under ``mpiexec -n 2`` (skipped, with the reason, where MPI cannot start): float64 training
with dropout, drop path, crop, flip, RandAugment, Mixup and CutMix on, 2 ranks against 1
process on the same global batches -> the weights agree to 1e-12 relative (max |a - b| over
max |a| per tensor: only the order of the sums differs) and the two ranks hold identical
weights; resuming a one-process checkpoint on 2 ranks lands on the same weights; a batch that
does not split, ranks with different configs and a rank that fails to start give one error,
from rank 0, and every rank exits.
A NaN gradient or loss on one rank only skips that step on every rank.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tinyvit.backend import Backend, get_backend
from tinyvit.distributed import DistributedError, GradientAllReduce, SingleProcess, check_start
from tinyvit.distributed.comm import nccl_module
from tinyvit.training import augment
from tinyvit.training.checkpoint import load_checkpoint
from tinyvit.training.randomness import SampleRandom
from tinyvit.training.train import TrainConfig, augment_batch, train
from tests.conftest import model_on
from tests.strict_array import StrictArray, strict_xp

REPO = Path(__file__).resolve().parents[1]
WEIGHT_RTOL = 1e-12


# ---------------------------------------------------------------- in process
def test_per_sample_draws_split_over_ranks_equal_one_process():
    np_backend = get_backend("numpy")
    whole = SampleRandom(np_backend, 7, 11, np.arange(8))
    halves = [SampleRandom(np_backend, 7, 11, np.arange(0, 3)), SampleRandom(np_backend, 7, 11, np.arange(3, 8))]
    for shape in [(8, 5, 6), (8, 2, 5, 5), (8, 1, 1)]:  # the dropout sites' shapes, in call order
        expect = whole.random(shape)
        got = np.concatenate([h.random((len(h._keys),) + shape[1:]) for h in halves])
        assert np.array_equal(got, expect)
    u = SampleRandom(np_backend, 0, 0, np.arange(64)).random((64, 4096))  # 262144 numbers
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002 and 0 <= u.min() and u.max() < 1
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.01  # neighbours independent
    assert abs(np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]) < 0.01  # samples independent
    other_step = SampleRandom(np_backend, 0, 1, np.arange(64)).random((64, 4096))
    assert abs(np.corrcoef(u.ravel(), other_step.ravel())[0, 1]) < 0.01
    with pytest.raises(ValueError, match="batch"):
        whole.random((7, 3))
    with pytest.raises(AttributeError, match="per sample"):
        whole.permutation(8)


def test_per_sample_draws_stay_on_the_device():
    strict = Backend("strict", strict_xp)
    got = SampleRandom(strict, 3, 5, np.arange(4)).random((4, 3, 2))
    assert isinstance(got, StrictArray)
    expect = SampleRandom(get_backend("numpy"), 3, 5, np.arange(4)).random((4, 3, 2))
    assert np.array_equal(strict_xp.to_host(got), expect)


def test_model_forward_with_per_sample_dropout_splits_exactly():
    """The model's dropout, attention dropout and drop path, drawn per sample: two halves = the whole."""
    from tinyvit import VisionTransformer
    m = VisionTransformer(image_size=8, patch_size=4, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=16,
                          dtype="float64", dropout=0.3, attn_dropout=0.3, emb_dropout=0.3, drop_path_rate=0.5)
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8))
    nb = m.backend
    whole = m.forward(x, train=True, rng=SampleRandom(nb, 1, 2, np.arange(6)))
    parts = [m.forward(x[lo:hi], train=True, rng=SampleRandom(nb, 1, 2, np.arange(lo, hi))) for lo, hi in [(0, 2), (2, 6)]]
    assert np.allclose(np.concatenate(parts), whole, rtol=1e-13, atol=1e-15)
    assert not np.allclose(whole, m.forward(x)), "dropout was on"


AUG = dict(crop_padding=1, flip=True, randaugment=1, mixup=0.4, cutmix=1.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_ranks_augmented_share_is_its_rows_of_the_whole_batch(seed):
    rng = np.random.default_rng(seed)
    images, labels = rng.random((20, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, 20)
    cfg = TrainConfig(seed=seed, **AUG)
    batch = rng.permutation(20)[:12]
    whole_x, whole_t = augment_batch(cfg, images, labels, batch, np.arange(12), 5, 4, 0.0)
    for k in (2, 3, 4):
        for r in range(k):
            pos = np.arange(r * 12 // k, (r + 1) * 12 // k)
            x, t = augment_batch(cfg, images, labels, batch, pos, 5, 4, 0.0)
            assert np.array_equal(x, whole_x[pos]) and np.array_equal(t, whole_t[pos]), (k, r)


def test_mix_batch_is_draw_then_apply():
    rng = np.random.default_rng(4)
    x, y = rng.random((6, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 6)
    for s in range(6):
        out, t = augment.mix_batch(x, y, 3, np.random.default_rng(s), mixup_alpha=0.8, cutmix_alpha=1.0)
        mix = augment.draw_mix(np.random.default_rng(s), 8, 8, 0.8, 1.0)
        out2, t2 = augment.apply_mix(x, x[::-1], y, y[::-1], 3, mix)
        assert np.array_equal(out, out2) and np.array_equal(t, t2)


class EchoComm(SingleProcess):
    """K ranks that all hold the same gradients: the sum is K times each (no MPI needed)."""

    name = "echo"

    def __init__(self, size):
        self.size, self.sent = size, []

    def allreduce_start(self, buf):
        self.sent.append(buf.size)
        buf *= float(self.size)
        return super().allreduce_start(buf)


@pytest.mark.parametrize("bucket_mb, expect_buckets", [(0.0, 4), (1e-9, 4), (100.0, 1)])
def test_buckets_follow_the_backward_and_return_the_mean(any_backend, bucket_mb, expect_buckets):
    """A 2-block model: hooks fire for head+norm, block 1, block 0, embeddings; bucket_mb 0 sends at
    each hook (4 buckets), a large bucket sends once at the end. The mean of K equal gradients is the
    gradient; on the strict backend nothing leaves the device."""
    m = model_on(any_backend, image_size=8, patch_size=4, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=16,
                 dtype="float64")
    x = any_backend.asarray(np.random.default_rng(0).standard_normal((4, 3, 8, 8)))
    m.forward(x)
    comm = EchoComm(3)
    reducer = GradientAllReduce(comm, bucket_mb)
    order = []
    m.backward(m.forward(x) * 0 + 1.0, grad_ready=lambda g: (order.append(list(g)), reducer.grads_ready(g)))
    got = reducer.finish(m.grads)
    assert [k for ks in order for k in ks][:2] == ["head.weight", "head.bias"]
    assert order[1][0].startswith("blocks.1.") and order[2][0].startswith("blocks.0.")
    assert sorted(k for ks in order for k in ks) == sorted(m.params)
    assert len(comm.sent) == expect_buckets and sum(comm.sent) == m.num_params()
    assert list(got) == list(m.params)
    for k in got:
        assert type(got[k]) is type(m.grads[k])
        assert np.allclose(any_backend.to_host(got[k]), any_backend.to_host(m.grads[k]), rtol=1e-15, atol=0)
    assert reducer.stats["steps"] == 1 and reducer.stats["buckets"] == expect_buckets


def test_without_the_hook_or_overlap_every_gradient_is_still_sent():
    m = model_on(get_backend("numpy"), image_size=8, patch_size=4, num_classes=3, dim=8, depth=2, heads=2,
                 mlp_dim=16, dtype="float64")
    x = np.ones((2, 3, 8, 8))
    m.backward(m.forward(x) * 0 + 1.0)
    for reducer in (GradientAllReduce(EchoComm(2), 0.0), GradientAllReduce(EchoComm(2), 0.0, overlap=False)):
        got = reducer.finish(m.grads)
        assert all(np.allclose(got[k], m.grads[k]) for k in m.grads)
        assert sum(reducer.comm.sent) == m.num_params()


def test_start_check_messages():
    from tinyvit.distributed import _compose
    cfg = {"seed": 0, "lr": 1.0}
    assert _compose([(cfg, None), (cfg, None)], 64, 2) is None
    msg = _compose([(cfg, None), ({"seed": 1, "lr": 1.0}, None)], 64, 2)
    assert "rank 1" in msg and "seed: 1 (rank 0: 0)" in msg and "lr" not in msg
    msg = _compose([(cfg, None), (cfg, None), (cfg, None)], 64, 3)
    assert "64 images does not split over 3 ranks" in msg and "multiple of 3 (e.g. 63)" in msg
    msg = _compose([(cfg, "FileNotFoundError: x"), (cfg, "FileNotFoundError: x")], 64, 2)
    assert msg == "FileNotFoundError: x (on every rank)"
    assert "(on rank 1)" in _compose([(cfg, None), (cfg, "ValueError: y")], 64, 2)
    check_start(SingleProcess(), cfg, 63)  # one process: nothing to check
    with pytest.raises(KeyError):
        check_start(SingleProcess(), cfg, 64, error=KeyError("raised as it is"))


def test_nccl_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(DistributedError, match="NCCL through cupy.cuda.nccl.*--backend numpy"):
        nccl_module()


def test_started_by_mpiexec_without_mpi4py_is_a_clear_error(monkeypatch):
    from tinyvit.distributed import world
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(DistributedError, match=r"2 processes, but mpi4py is not installed.*tinyvit\[mpi\]"):
        world("numpy")
    monkeypatch.setenv("PMI_SIZE", "1")
    assert isinstance(world("numpy"), SingleProcess)


def test_ranks_on_one_machine_share_its_cores(monkeypatch):
    from tinyvit.distributed.comm import share_cores
    monkeypatch.delenv("TINYVIT_THREADS", raising=False)
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert share_cores(EchoComm(2)) == 4 and os.environ["TINYVIT_THREADS"] == "4"
    assert share_cores(EchoComm(2)) == 0, "a TINYVIT_THREADS already set is left alone"
    monkeypatch.delenv("TINYVIT_THREADS")
    assert share_cores(SingleProcess()) == 0 and "TINYVIT_THREADS" not in os.environ


# ---------------------------------------------------------------- mpiexec -n 2
def _mpiexec():
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "mpiexec", Path(sys.executable).parent / "mpiexec"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("mpiexec")


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for name in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):  # not inside another launch
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def mpiexec():
    """The mpiexec of the mpich wheel (or the system's), checked by starting 2 ranks; else skip with why."""
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mpi4py is not installed ({exc}): pip install 'tinyvit[mpi]'")
    exe = _mpiexec()
    if exe is None:
        pytest.skip("no mpiexec on PATH: pip install mpich (or the system's MPI)")
    probe = [exe, "-n", "2", sys.executable, "-c",
             "from mpi4py import MPI; c = MPI.COMM_WORLD; assert c.allreduce(1) == 2 == c.Get_size()"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=_env())
    except subprocess.TimeoutExpired:
        pytest.skip(f"{exe} -n 2 did not finish a 2-rank all-reduce in 60 s")
    if done.returncode != 0:
        pytest.skip(f"{exe} -n 2 cannot start here: {(done.stderr or done.stdout).strip()[-400:]}")
    return exe


FLAGS = dict(patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32, batch_size=32, epochs=2, warmup_epochs=0.5,
             lr=3e-3, dtype="float64", test_fraction=0.85, eval_every=2, dropout=0.1, drop_path=0.2, pool="cls",
             seed=3, bucket_mb=0.0, **AUG)  # bucket 0: one Iallreduce per block, several in flight at once


def _cli(**kw):
    args = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else ([] if v is False else [flag, str(v)])
    return args + ["--no-progress"]


def _run(exe, ranks, args, timeout=120):
    cmd = [exe, "-n", str(ranks), sys.executable, "-m", "tinyvit", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)


def _assert_weights_close(a: dict, b: dict):
    worst = max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)
    assert worst <= WEIGHT_RTOL, f"max |a - b| / max |a| over the tensors: {worst:.2e}"
    return worst


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the whole run in this process (K = 1)."""
    one = train(TrainConfig(**FLAGS, out=str(tmp_path_factory.mktemp("one"))), progress=False)
    assert one["steps"] >= 16 and one["ranks"] == 1
    return one


def test_two_ranks_train_what_one_process_trains(mpiexec, one_process, tmp_path):
    one = one_process
    done = _run(mpiexec, 2, _cli(**FLAGS, out=tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("test accuracy") == 1, "rank 0 alone prints"
    assert "data parallel: 2 ranks" in done.stdout and "the weights are identical on every rank" in done.stdout
    assert "in 4.0 buckets" in done.stdout, "one bucket per hook: head + norm, block 1, block 0, embeddings"
    two = load_checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    assert two.meta["step"] == one["steps"]
    worst = _assert_weights_close(one["model"].state_dict(), two.params)
    print(f"2 ranks vs 1 process after {one['steps']} float64 steps: {worst:.2e} relative")
    assert sorted(os.listdir(tmp_path / "two")) == ["checkpoint.safetensors", "curves.png", "history.json"]


def test_resume_on_a_different_number_of_ranks(mpiexec, one_process, tmp_path):
    """3 steps in one process, checkpoint, the rest on 2 ranks == all of it in one process."""
    full = one_process
    train(TrainConfig(**FLAGS, out=str(tmp_path / "part")), progress=False, stop_after=3)
    done = _run(mpiexec, 2, ["--resume", str(tmp_path / "part" / "checkpoint.safetensors"), "--no-progress"])
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    assert resumed.meta["step"] == full["steps"]
    worst = _assert_weights_close(full["model"].state_dict(), resumed.params)
    print(f"resumed on 2 ranks after 3 steps in one process, {full['steps']} steps: {worst:.2e} relative")


def test_bad_starts_stop_every_rank_with_one_message(mpiexec, tmp_path):
    small = dict(FLAGS, epochs=1, warmup_epochs=0.5)
    done = _run(mpiexec, 2, _cli(**dict(small, batch_size=31), out=tmp_path / "odd"), timeout=60)
    assert done.returncode != 0
    assert done.stderr.count("does not split over 2 ranks") == 1, done.stderr[-2000:]
    assert not (tmp_path / "odd").exists(), "nothing written"

    exe, py = mpiexec, sys.executable
    a = ["-n", "1", py, "-m", "tinyvit", "train", *_cli(**small, out=tmp_path / "mpmd")]
    b = ["-n", "1", py, "-m", "tinyvit", "train", *_cli(**dict(small, lr=1e-3), out=tmp_path / "mpmd")]
    done = subprocess.run([exe, *a, ":", *b], capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO)
    assert done.returncode != 0
    assert done.stderr.count("different configuration") == 1 and "lr: 0.001 (rank 0: 0.003)" in done.stderr, \
        done.stderr[-2000:]

    c = ["-n", "1", py, "-m", "tinyvit", "train", *_cli(**small, data=tmp_path / "missing.npz", out=tmp_path / "x")]
    done = subprocess.run([exe, *a, ":", *c], capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO)
    assert done.returncode != 0
    assert done.stderr.count("missing.npz") == 1 and "(on rank 1)" in done.stderr, done.stderr[-2000:]


def test_nccl_communicator_calls_nccl_on_its_own_stream(monkeypatch):
    """No GPU here: a fake ``cupy`` and ``cupy.cuda.nccl`` record the calls. The all-reduce is queued
    on the communicator's stream after the compute stream's work (an event), in place, float32 as
    NCCL_FLOAT32, SUM; ``wait`` makes the compute stream wait on the communication's event; the buffer
    is kept alive by the handle."""
    pytest.importorskip("mpi4py")
    import types
    from tinyvit.distributed.comm import NcclCommunicator
    log = []

    class Event:
        done = True

    class Stream:
        def __init__(self, name="comm", non_blocking=False):
            self.name, self.ptr = name, 1234 if name == "comm" else 99

        def record(self):
            log.append(("record", self.name))
            return Event()

        def wait_event(self, event):
            log.append(("wait_event", self.name))

    compute = Stream("compute")
    cuda = types.SimpleNamespace(Stream=Stream, get_current_stream=lambda: compute)
    fake_cupy = types.SimpleNamespace(cuda=cuda)

    class Comm:
        def __init__(self, n, uid, rank):
            log.append(("init", n, uid, rank))

        def allReduce(self, send, recv, count, dtype, op, stream):
            log.append(("allReduce", send, recv, count, dtype, op, stream))

    nccl = types.SimpleNamespace(get_unique_id=lambda: (1, 2, 3), NcclCommunicator=Comm, NCCL_FLOAT32=7,
                                 NCCL_FLOAT64=8, NCCL_SUM=0)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    comm = NcclCommunicator(nccl=nccl)
    buf = types.SimpleNamespace(data=types.SimpleNamespace(ptr=555), size=10, dtype=np.dtype("float32"))
    handle = comm.allreduce_start(buf)
    assert log[0] == ("init", 1, (1, 2, 3), 0)
    assert log[1:] == [("record", "compute"), ("wait_event", "comm"), ("allReduce", 555, 555, 10, 7, 0, 1234),
                       ("record", "comm")]
    handle.wait()
    assert log[-1] == ("wait_event", "compute") and handle.buf is buf and handle.test()
    with pytest.raises(TypeError, match="float32/float64"):
        comm.allreduce_start(types.SimpleNamespace(data=None, size=1, dtype=np.dtype("int32")))


NONFINITE_RANK = """
import json, sys
import numpy as np
import tinyvit.training.train as T
from tinyvit.distributed import world

comm = world("numpy")
real, calls = T.softmax_cross_entropy, [0]


def poisoned(logits, t, smoothing):  # rank 1 only: a NaN gradient at its 3rd step, a NaN loss at its 5th
    loss, d = real(logits, t, smoothing)
    calls[0] += 1
    if comm.rank == 1 and calls[0] == 3:
        d = d * np.nan
    if comm.rank == 1 and calls[0] == 5:
        loss = loss * np.nan
    return loss, d


T.softmax_cross_entropy = poisoned
s = T.train(T.TrainConfig(**json.loads(sys.argv[1])), progress=False, comm=comm)
print(json.dumps({"rank": comm.rank, "skipped": s["skipped_steps"], "steps": s["steps"],
                  "agree": s["ranks_agree"]}))
"""


def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(mpiexec, tmp_path):
    """Rank 1 alone gets a NaN gradient (step 2) and a NaN loss (step 4): both ranks skip both steps
    and end with identical weights; rank 0 never saw a NaN of its own."""
    script = tmp_path / "nonfinite.py"
    script.write_text(NONFINITE_RANK)
    cfg = dict(FLAGS, epochs=1, warmup_epochs=0.5, out=str(tmp_path / "nan"))
    done = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), json.dumps(cfg)], capture_output=True,
                          text=True, timeout=120, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert r["skipped"] == [2, 4] and r["agree"], r
