"""The Trainer: everything one rank holds for the run, as one typed value (training/setup.py
builds it complete), and the state a checkpoint keeps, handed over part by part."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hvcodistill.comm.dataplane import DataPlane
from hvcodistill.comm.exchange import Exchange
from hvcodistill.comm.topology import Comms
from hvcodistill.comm.traffic import Traffic
from hvcodistill.config import Config
from hvcodistill.data import BatchPlan, DataSpec
from hvcodistill.optim import LRSchedule, WDSchedule
from hvcodistill.training.finite import FiniteWatch
from hvcodistill.training.metrics import RunLogger
from hvcodistill.training.timing import Timer

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.amp


def autocast_for(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory: the forward pass under train.amp's dtype (none: nothing)."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Trainer:
    cfg: Config
    comms: Comms
    plane: DataPlane  # averages the group's gradients and buffers (comm/dataplane.py)
    data: DataSpec
    plan: BatchPlan
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    exchange: Exchange
    logger: RunLogger
    device: torch.device
    lr: LRSchedule
    wd: WDSchedule
    total_steps: int
    run_dir: Path
    traffic: Traffic  # this rank's bytes sent, by collective and link
    allreduce_sends: dict  # what one gradient all-reduce sends from this rank, by link
    finite: FiniteWatch  # the first non-finite step this rank saw
    timer: Timer
    autocast: Callable[[], contextlib.AbstractContextManager]
    resume_settings: dict  # what a checkpoint records, for a resume to compare against
    start_step: int = 0  # the checkpoint step this segment resumed from (0: a fresh start)

    # ---- what a checkpoint keeps: each part hands over its own state dict
    def rank_state_dict(self) -> dict:
        """What differs between the ranks of a group. Every rank calls it at the same step: in
        weights mode a refresh in flight completes here (its collectives)."""
        return {
            "exchange": self.exchange.state_dict(),
            "buffers": {n: b.detach().cpu().clone() for n, b in self.model.named_buffers()},
            "rng": rng_state(self.device),
            "timer": self.timer.state_dict(),
        }

    def group_state_dict(self) -> dict:
        """What every rank of the group holds alike (saved once, by group rank 0)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "exchange": self.exchange.group_state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly from a checkpoint's `state` (KeyError: a part is missing)."""
        mine = state["ranks"][self.comms.group_rank]
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(mine["buffers"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.exchange.load_group_state_dict(state["exchange"])
        self.exchange.load_state_dict(mine["exchange"])
        self.timer.load_state_dict(mine["timer"])
        self.traffic.load_state_dict(mine["traffic"])
        set_rng_state(mine["rng"], self.device)


def rng_state(device: torch.device) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":  # this rank's GPU only: others may be absent on resume
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
