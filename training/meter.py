"""Wall-clock timing of the training loop: seconds per step and the share spent waiting for data.

One step is timed from the moment the loop asks the loader for its batch to the moment the loss is
read back (`loss.item()` waits for the device, so the time is honest on a GPU too); logging,
validation and checkpoint writes between steps are not counted. The data wait is the time inside
the loader's next(): the device idles meanwhile, so above ~10% on a GPU the loader starves it
(raise num_workers). The first step includes warm-up and is left out of the run's averages.
"""
from __future__ import annotations

import time
from typing import Callable


class StepMeter:
    """Per-step wall times and data waits, a running window for the periodic log line, and totals.

        meter = StepMeter()            # the clock starts
        for batch in loader:
            meter.batch_arrived()
            ...                        # forward, backward, optimiser step, loss.item()
            meter.step_finished(loss)
            ...                        # logging, validation, checkpoints (not timed)
            meter.restart()
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.step_seconds: list[float] = []    # one entry per step
        self.wait_seconds: list[float] = []    # time in the loader's next(), per step
        self._window_loss, self._window_steps = 0.0, 0
        self._tic = self._clock()

    def restart(self) -> None:
        """The next step starts now (call after the untimed work that follows a step)."""
        self._tic = self._clock()

    def batch_arrived(self) -> None:
        self.wait_seconds.append(self._clock() - self._tic)

    def step_finished(self, loss: float) -> None:
        self.step_seconds.append(self._clock() - self._tic)
        self._window_loss += loss
        self._window_steps += 1

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    def window(self) -> tuple[float, float, float]:
        """(mean loss, seconds per step, data-wait fraction) of the steps since the last call."""
        n = self._window_steps
        recent = self.step_seconds[-n:]
        waited = sum(self.wait_seconds[-n:]) / max(sum(recent), 1e-12)
        mean_loss, sec_per_step = self._window_loss / n, sum(recent) / len(recent)
        self._window_loss, self._window_steps = 0.0, 0
        return mean_loss, sec_per_step, waited

    def summary(self, batch_size: int) -> dict:
        """sec_per_step, episodes_per_s and data_wait_fraction over steps 2..n (all steps when only one;
        None when no step ran)."""
        timed = self.step_seconds[1:] or self.step_seconds
        waits = self.wait_seconds[1:] if len(self.step_seconds) > 1 else self.wait_seconds
        sec_per_step = sum(timed) / len(timed) if timed else None
        return {"sec_per_step": sec_per_step,
                "episodes_per_s": batch_size / sec_per_step if sec_per_step else None,
                "data_wait_fraction": min(1.0, sum(waits) / sum(timed)) if timed and sum(timed) > 0 else None}
