"""The server's exponential moving average of the global model: what sites evaluate and what
the run saves when ``dp-ema`` is on (post-processing of the aggregates: it costs no privacy)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord


class ModelAverage:
    """``average = decay * average + (1 - decay) * aggregate`` after every round.

    Args:
        decay: in [0, 1); 0 keeps no average (the aggregate itself is the model).
        start: the average a resumed run had reached (None: starts at the first aggregate).
    """

    def __init__(self, decay: float, start: dict[str, torch.Tensor] | None = None) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.average = start

    def update(self, aggregate: ArrayRecord) -> None:
        """Fold a round's aggregate into the average."""
        if not self.decay:
            return
        new = aggregate.to_torch_state_dict()
        if self.average is None:
            self.average = new
            return
        self.average = {k: self.decay * self.average[k] + (1 - self.decay) * v if v.is_floating_point() else v
                        for k, v in new.items()}

    def model(self, aggregate: ArrayRecord) -> ArrayRecord:
        """The model to evaluate and save: the average if there is one, else the aggregate."""
        return ArrayRecord(self.average) if self.decay and self.average is not None else aggregate
