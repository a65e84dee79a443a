"""The Train widget's curves: training loss per iteration and per epoch, validation mean Dice per epoch."""

from __future__ import annotations

import time

__all__ = ["TrainingPlot"]


class TrainingPlot:
    """Training loss per iteration and per epoch, validation mean Dice per epoch (x axis: epochs).

    A matplotlib canvas for a Qt layout; :meth:`update` redraws at most every ``interval`` seconds.
    """

    def __init__(self, interval: float = 0.4) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.interval, self._drawn = interval, 0.0
        self.figure = Figure(figsize=(4.0, 3.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.loss_ax, self.dice_ax = self.figure.subplots(2, 1, sharex=True)
        (self.iter_line,) = self.loss_ax.plot([], [], lw=0.8, alpha=0.6, label="iteration")
        (self.epoch_line,) = self.loss_ax.plot([], [], "o-", ms=3, label="epoch mean")
        (self.dice_line,) = self.dice_ax.plot([], [], "o-", ms=3, color="C2")
        self.loss_ax.set(ylabel="training loss")
        self.loss_ax.legend(loc="upper right", fontsize="small")
        self.dice_ax.set(ylabel="val. mean Dice", xlabel="epoch", ylim=(0, 1))
        self.clear()

    def clear(self) -> None:
        self.iter_x: list[float] = []
        self.iter_loss: list[float] = []
        self.epoch_x: list[float] = []
        self.epoch_loss: list[float] = []
        self.dice_x: list[float] = []
        self.dice: list[float] = []
        self.update(force=True)

    def add_iteration(self, x: float, loss: float) -> None:
        self.iter_x.append(x)
        self.iter_loss.append(loss)
        self.update()

    def add_epoch(self, epoch: int, loss: float, dice: float | None) -> None:
        self.epoch_x.append(epoch)
        self.epoch_loss.append(loss)
        if dice is not None:
            self.dice_x.append(epoch)
            self.dice.append(dice)
        self.update(force=True)

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < self.interval:
            return
        self._drawn = now
        self.iter_line.set_data(self.iter_x, self.iter_loss)
        self.epoch_line.set_data(self.epoch_x, self.epoch_loss)
        self.dice_line.set_data(self.dice_x, self.dice)
        self.loss_ax.relim()
        self.loss_ax.autoscale_view()
        self.dice_ax.set_xlim(0, 1.04 * max([1.0, *self.iter_x[-1:], *self.epoch_x[-1:]]))
        self.canvas.draw_idle()
