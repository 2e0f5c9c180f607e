"""saddlescape.datasets (IDX/MNIST reader, the bundled digits) and the beta-schedule experiment.

The IDX files are written here, by a writer independent of the reader (struct-packed header,
numpy big-endian data), and one file is spelled out byte by byte.
"""

from __future__ import annotations

import csv
import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from saddlescape import datasets

# type code -> big-endian dtype, written out here rather than taken from the module under test
CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_bytes(a: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}i", *a.shape)
    return header + np.asarray(a).astype(CODES[code]).tobytes()


def write(path: Path, payload: bytes) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def fake_mnist(folder: Path, n: int = 30, n_test: int = 12, gz: bool = False,
               seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny MNIST folder (28 x 28 unsigned-byte images, every digit among the labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, count in (("train", n), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        ext = ".gz" if gz else ""
        write(folder / f"{prefix}-images-idx3-ubyte{ext}", idx_bytes(images, 0x08))
        write(folder / f"{prefix}-labels-idx1-ubyte{ext}", idx_bytes(labels, 0x08))
        out[prefix] = (images, labels)
    return out


# ---------------------------------------------------------------------------------------------
# read_idx


def test_read_idx_spelled_out_bytes(tmp_path: Path) -> None:
    # int16, 1-D, 3 entries: 258, -2, 1 (big-endian)
    raw = b"\x00\x00\x0b\x01" + b"\x00\x00\x00\x03" + b"\x01\x02" + b"\xff\xfe" + b"\x00\x01"
    a = datasets.read_idx(write(tmp_path / "a.idx", raw))
    np.testing.assert_array_equal(a, np.array([258, -2, 1], dtype=np.int16), strict=True)
    assert a.dtype.isnative


def test_read_idx_ubyte_labels_and_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 256, size=257, dtype=np.uint8)
    images = rng.integers(0, 256, size=(5, 28, 27), dtype=np.uint8)  # rows != cols: order matters
    got_l = datasets.read_idx(write(tmp_path / "l-idx1-ubyte", idx_bytes(labels, 0x08)), ndim=1)
    got_i = datasets.read_idx(str(write(tmp_path / "i-idx3-ubyte", idx_bytes(images, 0x08))))
    np.testing.assert_array_equal(got_l, labels, strict=True)
    np.testing.assert_array_equal(got_i, images, strict=True)
    got_i[0, 0, 0] ^= 1  # a writeable copy, not a view of a bytes object


def test_read_idx_gzip(tmp_path: Path) -> None:
    images = np.random.default_rng(2).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    path = write(tmp_path / "x-idx3-ubyte.gz", idx_bytes(images, 0x08))
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # really compressed
    np.testing.assert_array_equal(datasets.read_idx(path, ndim=3), images, strict=True)


@pytest.mark.parametrize("code,values", [
    (0x09, np.array([[-128, -1, 0], [1, 64, 127]], dtype=np.int8)),
    (0x0B, np.array([-32768, -257, 255, 256, 32767], dtype=np.int16)),
    (0x0C, np.array([[-2**31, -65537], [65536, 2**31 - 1], [7, 0]], dtype=np.int32)),
    (0x0D, np.array([-1.5, 0.1, 3.0e38, -1e-40, np.inf], dtype=np.float32)),
    (0x0E, np.array([[[np.pi, -1e-310], [1e308, -0.0]]], dtype=np.float64)),
])
@pytest.mark.parametrize("ext", ["", ".gz"])
def test_read_idx_other_types(tmp_path: Path, code: int, values: np.ndarray, ext: str) -> None:
    got = datasets.read_idx(write(tmp_path / f"v.idx{ext}", idx_bytes(values, code)))
    np.testing.assert_array_equal(got, values, strict=True)
    assert got.dtype.isnative
    assert np.array_equal(np.signbit(got), np.signbit(values))  # -0.0 kept


def test_read_idx_empty_dimension(tmp_path: Path) -> None:
    got = datasets.read_idx(write(tmp_path / "e.idx", idx_bytes(np.zeros((0, 3), np.uint8), 0x08)))
    assert got.shape == (0, 3) and got.dtype == np.uint8


GOOD = idx_bytes(np.arange(12, dtype=np.int16).reshape(3, 4), 0x0B)


@pytest.mark.parametrize("name,payload,ndim,problem", [
    ("bad_magic", b"\x01" + GOOD[1:], None, r"bad magic number 0x01000b02"),
    ("bad_magic2", b"\x00\x08" + GOOD[2:], None, r"bad magic number"),
    ("bad_type", GOOD[:2] + b"\x0a" + GOOD[3:], None, r"unknown data type code 0x0A"),
    ("truncated", GOOD[:-1], None, r"truncated data: shape \(3, 4\) of int16 needs 24 bytes.* 23"),
    ("truncated_header", GOOD[:9], None, r"truncated header"),
    ("tiny", b"\x00\x00", None, r"too short"),
    ("empty", b"", None, r"too short"),
    ("trailing", GOOD + b"\x00", None, r"1 trailing bytes"),
    ("zero_dims", b"\x00\x00\x08\x00", None, r"0 dimensions"),
    ("negative_dim", b"\x00\x00\x08\x01\xff\xff\xff\xff", None, r"negative dimension"),
    ("ndim_mismatch", GOOD, 3, r"2 dimensions, expected 3"),
    ("ndim_mismatch_gz.gz", GOOD, 1, r"2 dimensions, expected 1"),
    ("trailing_gz.gz", GOOD + b"\x01\x02", None, r"2 trailing bytes"),
])
def test_read_idx_rejects_malformed(tmp_path: Path, name: str, payload: bytes, ndim: int | None,
                                    problem: str) -> None:
    path = write(tmp_path / name, payload)
    with pytest.raises(ValueError, match=problem) as info:
        datasets.read_idx(path, ndim=ndim)
    assert str(path) in str(info.value) and "not a valid IDX file" in str(info.value)


def test_read_idx_rejects_broken_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte.gz"
    write(path, idx_bytes(np.arange(100, dtype=np.uint8), 0x08))
    path.write_bytes(path.read_bytes()[:-12])  # cut off the end of the stream
    with pytest.raises(ValueError, match="not a valid gzip file") as info:
        datasets.read_idx(path)
    assert str(path) in str(info.value)
    plain = tmp_path / "plain.gz"  # named .gz but not compressed
    plain.write_bytes(GOOD)
    with pytest.raises(ValueError, match=r"plain\.gz: not a valid gzip file"):
        datasets.read_idx(plain)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        datasets.read_idx(tmp_path / "nope-idx1-ubyte")
    with pytest.raises(FileNotFoundError):
        datasets.read_idx(tmp_path / "nope-idx1-ubyte.gz")


# ---------------------------------------------------------------------------------------------
# mnist


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_fake_folder(tmp_path: Path, gz: bool) -> None:
    truth = fake_mnist(tmp_path / "mnist", gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        X, y = datasets.mnist(tmp_path / "mnist", split=split)
        images, labels = truth[prefix]
        assert X.shape == (images.shape[0], 784) and X.dtype == np.float64
        assert X.flags.c_contiguous
        np.testing.assert_array_equal(X, images.reshape(-1, 784) / 255.0, strict=True)
        np.testing.assert_array_equal(y, labels.astype(np.int64), strict=True)
        assert X.min() >= 0.0 and X.max() <= 1.0
    assert datasets.mnist(str(tmp_path / "mnist"))[0].shape == (30, 784)  # str path, default split


def test_mnist_prefers_plain_file_and_accepts_dot_spelling(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    truth = fake_mnist(folder)
    (folder / "train-images-idx3-ubyte").rename(folder / "train-images.idx3-ubyte")
    write(folder / "train-labels-idx1-ubyte.gz", b"garbage")  # the plain file wins
    X, y = datasets.mnist(folder)
    np.testing.assert_array_equal(X, truth["train"][0].reshape(-1, 784) / 255.0, strict=True)
    np.testing.assert_array_equal(y, truth["train"][1].astype(np.int64), strict=True)


def test_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"MNIST folder .*missing.* does not exist"):
        datasets.mnist(tmp_path / "missing")
    folder = tmp_path / "m"
    fake_mnist(folder)
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'validation'"):
        datasets.mnist(folder, split="validation")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"no MNIST labels file in .*t10k-labels-idx1-ubyte"):
        datasets.mnist(folder, split="test")
    # count mismatch
    write(folder / "train-labels-idx1-ubyte", idx_bytes(np.zeros(29, np.uint8), 0x08))
    with pytest.raises(ValueError, match="holds 30 images but train-labels-idx1-ubyte holds 29"):
        datasets.mnist(folder)
    # labels out of range
    write(folder / "train-labels-idx1-ubyte", idx_bytes(np.full(30, 10, np.uint8), 0x08))
    with pytest.raises(ValueError, match="labels must be in 0..9, got 10"):
        datasets.mnist(folder)
    # images of the wrong type, and labels with the wrong number of dimensions
    write(folder / "train-labels-idx1-ubyte", idx_bytes(np.zeros(30, np.uint8), 0x08))
    write(folder / "train-images-idx3-ubyte", idx_bytes(np.zeros((30, 28, 28), np.int16), 0x0B))
    with pytest.raises(ValueError, match="images must be unsigned bytes"):
        datasets.mnist(folder)
    write(folder / "train-images-idx3-ubyte", idx_bytes(np.zeros((30, 784), np.uint8), 0x08))
    with pytest.raises(ValueError, match="2 dimensions, expected 3"):
        datasets.mnist(folder)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.digits()
    assert X.shape == (1797, 64) and X.dtype == np.float64 and X.flags.c_contiguous
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_array_equal(X * 16, np.round(X * 16))  # the 0..16 intensities, scaled
    np.testing.assert_array_equal(np.unique(y), np.arange(10))
    ref_X, ref_y = sklearn_datasets.load_digits(return_X_y=True)
    np.testing.assert_array_equal(X, ref_X / 16.0)
    np.testing.assert_array_equal(y, ref_y)


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'saddlescape\[experiments\]'"):
        datasets.digits()


# ---------------------------------------------------------------------------------------------
# the beta-schedule experiment


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_summary(path: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in path.read_text().splitlines())


@pytest.fixture(scope="module")
def quick_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    from saddlescape.experiments import run

    out = tmp_path_factory.mktemp("out")
    return out / "beta-schedule", run("beta-schedule", out, quick=True, progress=False)


def test_beta_schedule_quick_files(quick_digits: tuple[Path, dict]) -> None:
    folder, summary = quick_digits
    png = folder / "beta-schedule.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    written = read_summary(folder / "summary.txt")
    assert list(written) == list(summary)
    assert written["best"] == str(summary["best"]) and written["data"] == "digits"
    assert summary["seeds"] == 1 and summary["epochs"] == 20 and summary["steps_per_epoch"] == 18
    assert summary["steps"] == 360 and summary["samples"] == 1797 and summary["lr0"] == 0.001

    rows = read_csv(folder / "beta-schedule.csv")
    assert list(rows[0]) == ["setting", "kind", "value", "estimate", "step", "epoch",
                             "loss_median", "loss_q10", "loss_q90"]
    settings = ["beta=0.7", "beta=0.9", "beta=0.97", "beta=0.99", "C=0.1", "C=0.3", "C=1"]
    assert len(rows) == 2 * len(settings) * 21
    for estimate in ("ema", "debiased"):
        for setting in settings:
            curve = [r for r in rows if r["setting"] == setting and r["estimate"] == estimate]
            steps = [int(r["step"]) for r in curve]
            assert steps == list(range(0, 361, 18))
            assert [float(r["epoch"]) for r in curve] == list(range(21))
            loss = np.array([float(r["loss_median"]) for r in curve])
            assert loss[0] == pytest.approx(math.log(10), abs=1e-5)
            assert np.all(loss[1:] < math.log(10)) and np.all(loss > 0)
            assert loss[-1] < loss[len(loss) // 2] < loss[1]  # still going down
            key = "final_loss_" + setting.replace("=", "_")
            prefix = "debiased_" if estimate == "debiased" else ""
            assert summary[prefix + key] == pytest.approx(loss[-1], rel=1e-5)  # CSV: 6 digits


def test_beta_schedule_quick_numbers(quick_digits: tuple[Path, dict]) -> None:
    _, s = quick_digits
    assert s["initial_loss"] == pytest.approx(math.log(10), rel=1e-14)
    # What the paper's Fig. 2 shows: the schedules beat every constant beta, C = 0.1 most ...
    assert s["best"] == "C=0.1" and s["best_constant"] == "beta=0.99"
    assert s["best_schedule_minus_best_constant"] < -0.5
    assert s["final_loss_C_0.1"] < s["final_loss_C_0.3"] < s["final_loss_C_1"]
    assert s["final_loss_C_1"] < s["final_loss_beta_0.99"] < s["final_loss_beta_0.7"] < 2.2
    # ... because G_0 = 0 is still warming up (total EMA weight well below 1): larger steps.
    assert s["ema_mass_C_0.1"] < s["ema_mass_C_0.3"] < s["ema_mass_C_1"] < 0.6
    assert s["ema_mass_C_0.1"] == pytest.approx(
        1 - np.prod(1 - 0.1 * (0.001 / np.sqrt(np.arange(360) + 1)) ** (2 / 3)), rel=1e-12)
    # With the bias-corrected estimate the seven settings end within 0.01 of each other.
    debiased = [v for k, v in s.items() if k.startswith("debiased_final_loss_")]
    assert len(debiased) == 7 and max(debiased) - min(debiased) < 0.01
    assert min(debiased) > s["final_loss_beta_0.99"]


def test_beta_schedule_betas_match_native_schedule() -> None:
    from saddlescape.experiments.beta_schedule import SETTINGS

    for s in SETTINGS:
        beta = s.beta()
        native = np.array([beta if isinstance(beta, float) else beta(t) for t in range(2000)])
        np.testing.assert_allclose(s.betas(2000), native, rtol=0, atol=2e-16)


def test_beta_schedule_on_fake_mnist(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from saddlescape.experiments import run

    fake_mnist(tmp_path / "mnist", n=150, gz=True)
    s = run("beta-schedule", tmp_path / "out", quick=True, data=str(tmp_path / "mnist"),
            progress=False)
    folder = tmp_path / "out" / "beta-schedule"
    assert (folder / "beta-schedule.png").stat().st_size > 10_000
    assert s["data"] == f"mnist ({tmp_path / 'mnist'})"
    assert s["samples"] == 150 and s["features"] == 784
    assert s["epochs"] == 1 and s["steps_per_epoch"] == 2 and s["steps"] == 2
    assert s["initial_loss"] == pytest.approx(math.log(10), rel=1e-14)
    # pixels of pure noise: no claim on the losses beyond finite (the warming-up schedules take
    # large first steps and may overshoot), but the constant betas' small steps do reduce them
    finals = [v for k, v in s.items() if "final_loss_" in k]
    assert len(finals) == 14 and all(np.isfinite(v) and v > 0 for v in finals)
    assert s["final_loss_beta_0.7"] < math.log(10)
    assert len(read_csv(folder / "beta-schedule.csv")) == 14 * 2


def test_beta_schedule_bad_data_and_arguments(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from saddlescape.experiments import __main__ as cli
    from saddlescape.experiments import beta_schedule

    missing = tmp_path / "no-such-folder"
    with pytest.raises(ValueError, match=r"--data .*no-such-folder.* does not exist"):
        beta_schedule.run(tmp_path / "out", quick=True, data=str(missing), progress=False)
    assert not (tmp_path / "out").exists()  # failed before writing anything
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no MNIST images file in .*empty"):
        beta_schedule.run(tmp_path / "out", quick=True, data=str(empty), progress=False)
    # the command line reports it as an error message, not a traceback
    assert cli.main(["beta-schedule", "--out", str(tmp_path / "out"), "--quick",
                     "--data", str(missing), "--no-progress"]) == 2
    assert "error in beta-schedule: --data" in capsys.readouterr().err
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
            beta_schedule.run(tmp_path / "out", epochs=bad,  # type: ignore[arg-type]
                              progress=False)
        with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
            beta_schedule.run(tmp_path / "out", seeds=bad, progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("index", [0, 3, 4, 6])  # beta = 0.7, 0.99; C = 0.1, 1
@pytest.mark.parametrize("debiased", [False, True])
def test_beta_schedule_optimizers_match_numpy(index: int, debiased: bool) -> None:
    """The paper's RMSProp and the debiased control, against a numpy transcription."""
    from saddlescape.experiments.beta_schedule import SETTINGS

    s = SETTINGS[index]
    rng = np.random.default_rng(index)
    d, steps = 5, 40
    grads = rng.standard_normal((steps, d)) * np.array([1e-3, 0.1, 1.0, 10.0, 0.0])
    opt = s.optimizer(d, debiased)()
    x = np.zeros(d)
    ref, G, mass_left = np.zeros(d), np.zeros(d), 1.0
    for t in range(steps):
        lr = 0.001 / np.sqrt(t + 1)
        beta = s.value if s.kind == "constant" else 1 - s.value * lr ** (2 / 3)
        G = beta * G + (1 - beta) * grads[t] ** 2
        mass_left *= beta
        ref = ref - lr * grads[t] / np.sqrt((G / (1 - mass_left) if debiased else G) + 1e-8)
        opt.step(x, grads[t].copy())
        np.testing.assert_allclose(x, ref, rtol=1e-12, atol=1e-18)
