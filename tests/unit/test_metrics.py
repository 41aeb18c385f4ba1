"""The run's outputs in-process: metrics.jsonl written in whole-line batches and trimmed on resume,
and the log window's means (training/metrics.py)."""

import json
from types import SimpleNamespace

import pytest
import torch
from mpi4py import MPI

from hvcodistill.comm.traffic import Traffic
from hvcodistill.training.metrics import LogWindow, RunLogger
from hvcodistill.training.timing import Timer

ONE_RANK = SimpleNamespace(group_rank=0, world_rank=0, model_id=0, peer=MPI.COMM_SELF)


def lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_first_line_at_once_then_batches_and_everything_at_flush(tmp_path):
    log = RunLogger(tmp_path, ONE_RANK)
    log.WRITE_EVERY = 3600.0  # no batch falls due in this test: only the first line and flush()
    log.log(10, "train", {"task_loss": 1.0})
    assert [r["step"] for r in lines(tmp_path)] == [10]  # a watcher sees the run has started
    log.log(20, "train", {"task_loss": 0.5})
    log.log(30, "train", {"task_loss": 0.25})
    assert [r["step"] for r in lines(tmp_path)] == [10]  # not a write per line
    log.flush()  # every checkpoint
    assert [r["step"] for r in lines(tmp_path)] == [10, 20, 30]
    log.log(40, "val", {"accuracy": 0.9})
    log.close()
    assert lines(tmp_path)[-1] == {"step": 40, "kind": "val", "model": 0, "accuracy": 0.9}


def test_batches_fall_due_after_write_every(tmp_path):
    log = RunLogger(tmp_path, ONE_RANK)
    log.WRITE_EVERY = 0.0
    for step in (10, 20, 30):
        log.log(step, "train", {"task_loss": 1.0})
        assert lines(tmp_path)[-1]["step"] == step
    log.close()


def test_resume_drops_steps_past_the_checkpoint_and_a_line_cut_short(tmp_path):
    rows = [{"step": s, "kind": "train", "model": 0, "task_loss": 1.0} for s in (10, 20, 30)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 40, "kind": "tr')  # a crash mid-write
    log = RunLogger(tmp_path, ONE_RANK)
    log.resume_at(20)
    log.log(30, "train", {"task_loss": 0.5})
    log.close()
    got = [(r["step"], r["task_loss"]) for r in lines(tmp_path)]
    assert got == [(10, 1.0), (20, 1.0), (30, 0.5)]


class FakeExchange:
    seconds = 0.0


def window(steps):
    """A log window over `steps` (parts, samples) pairs, on a timer that has started."""
    timer = Timer()
    timer.start(FakeExchange())
    w = LogWindow(0, timer, Traffic(), group_size=1)
    for parts, samples in steps:
        w.add(parts, samples)
    return w


def test_window_means_count_steps_without_distillation_as_zero():
    y = torch.tensor([0, 1])
    plain = {"task_loss": torch.tensor(2.0), "predicted": torch.tensor([0, 0]), "labels": y}
    distilled = dict(plain, distill_loss=torch.tensor(3.0), predicted=torch.tensor([0, 1]))
    s = window([(plain, 2), (distilled, 2), (plain, 2)]).scalars(3)
    assert s["task_loss"] == pytest.approx(2.0)
    assert s["distill_loss"] == pytest.approx(1.0)  # 3 over the window's 3 steps
    assert s["accuracy"] == pytest.approx(4 / 6)


def test_window_with_no_distillation_logs_zero():
    y = torch.tensor([1])
    s = window([({"task_loss": torch.tensor(1.0), "predicted": y, "labels": y}, 1)]).scalars(1)
    assert s["distill_loss"] == 0.0 and s["accuracy"] == 1.0


def test_the_event_checksum_in_c_is_tensorboards():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as pure

    from hvcodistill.training.metrics import masked_crc32c

    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 12, 1000, 4096):
        data = bytes(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).tolist())
        assert masked_crc32c(data) == pure(data), n


def test_event_files_written_with_it_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import record_writer

    log = RunLogger(tmp_path, ONE_RANK)
    assert record_writer.masked_crc32c.__module__ == "hvcodistill.training.metrics"
    for step in (10, 20):
        log.log(step, "train", {"task_loss": 1.0 / step, "accuracy": 0.5})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb" / "model_0"))
    acc.Reload()
    scalars = acc.Scalars("train/task_loss")
    assert [e.step for e in scalars] == [10, 20]
    assert [e.value for e in scalars] == pytest.approx([0.1, 0.05])
