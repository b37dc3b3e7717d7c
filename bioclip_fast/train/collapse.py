"""The collapse warning: a contrastive loss that sits at chance (ln of the batch size) after warmup."""
from __future__ import annotations

import math


class CollapseMonitor:
    """Warns once when the contrastive loss sits at chance: within `tol` (1%) of ln(batch) for `window` consecutive
    steps after warmup.

    ln(B) is the loss of a model whose logits carry no information (uniform softmax over the B in-batch candidates;
    with local loss each rank's rows still score the whole global batch). A run stuck there has collapsed
    (constant features, a logit scale driven to 0, a dead text tower, ...) and learns nothing, however long it runs.
    """

    def __init__(self, batch_size: int, *, window: int, after_step: int, tol: float = 0.01):
        self.chance = math.log(batch_size)
        self.window, self.after_step, self.tol = int(window), int(after_step), float(tol)
        self.run = 0
        self.warning: str | None = None

    def state_dict(self) -> dict:
        """The running count and any warning given, saved in checkpoints so a resumed run carries on counting."""
        return {"run": self.run, "warning": self.warning, "chance": self.chance}

    def load_state_dict(self, state: dict) -> None:
        if not math.isclose(float(state.get("chance", self.chance)), self.chance, rel_tol=1e-9):
            return  # another batch size: the count was against another chance level
        self.run = int(state["run"])
        self.warning = state.get("warning")

    def update(self, step: int, loss: float) -> str | None:
        """Feed the (biology) loss of optimizer step `step` (from 1); returns the warning the first time it fires."""
        if self.window <= 0 or self.warning is not None or step <= self.after_step:
            return None
        if math.isfinite(loss) and abs(loss - self.chance) <= self.tol * self.chance:
            self.run += 1
        else:
            self.run = 0
        if self.run >= self.window:
            self.warning = (
                f"the loss has stayed within {100 * self.tol:g}% of ln(batch) = {self.chance:.3f} (chance) for "
                f"{self.run} steps after warmup (steps {step - self.run + 1}-{step}): training has collapsed and is "
                f"not learning. Check the data (captions/labels), the logit scale and --lr"
            )
            return self.warning
        return None
