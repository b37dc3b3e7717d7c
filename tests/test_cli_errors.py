"""Unusual command lines found by an operator (issue 20, item 6): each is one line, `bioclip-fast CMD: error: …`, exit
2 (no traceback), decided before any work; and a Ctrl-C at any point of a command's start ends it with a non-zero
status (130), never 0."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bioclip_fast.cli import SigintGuard, main, run_subcommand
from bioclip_fast.errors import EXIT_INTERRUPTED

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")


def _one_error(capsys, cmd: str, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith(f"bioclip-fast {cmd}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def ckpt(tmp_path) -> Path:
    p = tmp_path / "model.pt"
    p.write_bytes(b"not looked at: the device is checked first")
    return p


@no_gpu
@pytest.mark.parametrize("cmd", ["eval", "analyze"])
def test_device_cuda_without_a_gpu_is_one_line_before_any_work(cmd, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([cmd, "--checkpoint", str(ckpt), "--device", "cuda", "--out", str(out)]) == 2
    _one_error(capsys, cmd, "--device cuda: no CUDA GPU is available here", "use --device cpu")
    assert not out.exists()  # nothing written


def test_a_device_that_is_no_device_is_one_line(ckpt, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "gpu", "--out", str(tmp_path / "o")]) == 2
    _one_error(capsys, "eval", "--device gpu: not a device", "cpu, cuda, cuda:N")
    assert main(["bench-loss", "--device", "gpu", "--out", str(tmp_path / "b")]) == 2
    _one_error(capsys, "bench-loss", "--device gpu: not a device")


def test_bench_loss_refuses_non_positive_sizes_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench-loss", "--device", "cpu", "--batch-sizes", "-5", "--out", str(out)]) == 2
    _one_error(capsys, "bench-loss", "--batch-sizes: -5 is not a positive size")
    assert main(["bench-loss", "--device", "cpu", "--batch-sizes", "64", "--dims", "0", "--out", str(out)]) == 2
    _one_error(capsys, "bench-loss", "--dims: 0 is not a positive size")
    assert not out.exists()


def test_predict_with_an_empty_cls_is_an_error_not_the_checkpoints_labels(tmp_path, capsys):
    img = tmp_path / "a.jpg"
    img.write_bytes(b"")
    assert main(["predict", str(img), "--cls", "", "--device", "cpu"]) == 2
    _one_error(capsys, "predict", "--cls '': no labels")
    assert main(["predict", str(img), "--cls", " , ,", "--device", "cpu"]) == 2
    _one_error(capsys, "predict", "no labels")


def test_random_bytes_as_weights_are_not_a_checkpoint_rather_than_unsafe_objects(tmp_path, capsys):
    import argparse as ap

    rand = tmp_path / "weights.bin"
    rand.write_bytes(os.urandom(4096))
    assert main(["eval", "--checkpoint", str(rand), "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    line = _one_error(capsys, "eval", f"{rand} is not a readable checkpoint or weights file", "4096 bytes")
    assert "Python objects" not in line
    assert main(["train", "--pretrained", str(rand), "--model", "bioclip-micro", "--max-steps", "1",
                 "--out", str(tmp_path / "run")]) == 2
    _one_error(capsys, "train", "is not a readable checkpoint or weights file")
    # a real pickle of objects other than tensors keeps its own message
    obj = tmp_path / "objects.pt"
    torch.save({"args": ap.Namespace(x=1)}, obj)
    assert main(["eval", "--checkpoint", str(obj), "--device", "cpu", "--out", str(tmp_path / "o2")]) == 2
    _one_error(capsys, "eval", "holds Python objects other than tensors", "argparse.Namespace")


def test_make_shards_never_suggests_a_flag_that_cannot_help(tmp_path, capsys):
    csv = tmp_path / "meta.csv"
    csv.write_text("image,label\na.jpg,cat\n")
    for extra in ([], ["--allow-missing-columns"]):
        assert main(["make-shards", "--csv", str(csv), "--out", str(tmp_path / "s"), "--no-progress", *extra]) == 2
        line = _one_error(capsys, "make-shards", "has none of the taxonomy columns", "scientific_name")
        assert "--allow-missing-columns" not in line
    # where the flag does help, it is suggested and then works past the column check
    csv.write_text("image,genus,species\na.jpg,Danaus,plexippus\n")
    assert main(["make-shards", "--csv", str(csv), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    _one_error(capsys, "make-shards", "--allow-missing-columns")
    rc = main(["make-shards", "--csv", str(csv), "--out", str(tmp_path / "s"), "--no-progress",
               "--allow-missing-columns"])
    err = capsys.readouterr().err
    assert "taxonomy column" not in err, err  # (it then stops on the missing image a.jpg, not on the columns)
    assert rc in (0, 2)


class _SwallowsInDel:
    """An object whose __del__ is running when the Ctrl-C lands: Python prints "Exception ignored" and goes on."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs here; its KeyboardInterrupt cannot leave a __del__


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the ignored interrupt, on purpose
def test_a_ctrl_c_swallowed_during_start_up_still_exits_130(capsys):
    def run(args):
        _SwallowsInDel()  # collected at once: the interrupt is raised inside __del__ and ignored by Python
        return 0

    with SigintGuard() as guard:
        rc = run_subcommand("bioclip-fast x", run, argparse.Namespace(debug=False), guard=guard)
    assert guard.received and rc == EXIT_INTERRUPTED
    assert "bioclip-fast x: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    # train's graceful-stop handler, installed after such a swallowed Ctrl-C, interrupts before the first step
    from bioclip_fast.train.signals import StopSignals

    with SigintGuard() as guard:
        guard.received = True
        with pytest.raises(KeyboardInterrupt):
            with StopSignals():
                pass
        assert signal.getsignal(signal.SIGINT) is guard  # its handlers were taken down again


def test_ctrl_c_at_any_moment_of_train_start_up_is_never_exit_0(tmp_path):
    """A real `bioclip-fast train` process interrupted at several moments of its start (imports, config, model and
    data build, first step): the exit status is 130 (interrupted), or 75 (a graceful stop after a step), never 0."""
    argv = [sys.executable, "-m", "bioclip_fast", "train", "--model", "bioclip-micro", "--batch-size", "16",
            "--max-steps", "2", "--num-workers", "0", "--threads", "1", "--no-eval-at-end", "--no-progress",
            "--save-every", "0"]
    for k, delay in enumerate((0.3, 1.5, 3.0)):
        proc = subprocess.Popen([*argv, "--out", str(tmp_path / f"run{k}")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode in (EXIT_INTERRUPTED, 75, -signal.SIGINT), (delay, proc.returncode, err[-2000:])
        if proc.returncode == EXIT_INTERRUPTED:
            assert "Traceback" not in err and err.strip().endswith("interrupted"), err[-2000:]
