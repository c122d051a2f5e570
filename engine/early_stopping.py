"""Stop training when a validation metric has stopped improving (patience on a plateau)."""

import math

MODES = ("min", "max")


class EarlyStopping:
    """Counts evaluations without a new best; `should_stop` once there are `patience` in a row.

    A new best must beat the previous one by more than `min_delta` (a change of exactly
    `min_delta` is not an improvement). NaN or infinite values never count as improving.
    """

    def __init__(self, mode: str = "min", patience: int = 3, min_delta: float = 0.0):
        if mode not in MODES:
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"EarlyStopping patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"EarlyStopping min_delta must be >= 0, got {min_delta}")
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.num_evals = 0

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, step: int | None = None) -> bool:
        """Record one evaluation (at `step`, default: its index); returns True if it is a new best."""
        value = float(value)
        step = self.num_evals if step is None else step
        self.num_evals += 1
        if self.is_improvement(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    def state_dict(self) -> dict:
        return {"mode": self.mode, "best": self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "num_evals": self.num_evals}

    def load_state_dict(self, state: dict) -> None:
        # patience and min_delta come from the constructor, so a resumed run may change them
        if state.get("mode") != self.mode:
            raise ValueError(f"EarlyStopping state was saved in mode {state.get('mode')!r}, this one is {self.mode!r}")
        self.best = state["best"]
        self.best_step = state["best_step"]
        self.bad_evals = state["bad_evals"]
        self.num_evals = state["num_evals"]
