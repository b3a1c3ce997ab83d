"""The trainer's own small stateful parts: its step counters and this rank's random streams.

Each has ``state_dict``/``load_state_dict`` like the engine and the data loader, so the
checkpointer saves and restores all of them the same way.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class TrainState:
    """Where training stands: optimizer steps taken (skipped ones included: their data was read),
    tokens trained on (also per data source, with skipped shards' holes left out), bad shards
    skipped, the steps whose update was skipped (non-finite: guard.py; or their data skipped), the
    steps whose data rollbacks chose to skip, and how many rollbacks there were (rollback.py)."""

    step: int = 0
    tokens: int = 0
    tokens_by_source: dict[str, int] = field(default_factory=dict)
    bad_shards: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    skip_data: list[int] = field(default_factory=list)
    rollbacks: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        # checkpoints from before these counters were kept start them at zero
        self.tokens_by_source, self.bad_shards = dict(state.get("tokens_by_source", {})), state.get("bad_shards", 0)
        self.skipped_steps = list(state.get("skipped_steps", []))
        self.skip_data, self.rollbacks = list(state.get("skip_data", [])), state.get("rollbacks", 0)


class RNGState:
    """This process's random generators: Python's, NumPy's global one, torch's CPU and CUDA ones.

    Dropout and any sampling draw from them; restoring them makes a resumed run draw the same
    numbers as an uninterrupted one.
    """

    @staticmethod
    def seed(seed: int) -> None:
        """Seed all of them from the run's seed (model weights are seeded per layer, elsewhere)."""
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device

    def state_dict(self) -> dict:
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
