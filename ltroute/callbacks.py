"""skorch callbacks shared by the estimators and the command line."""

from __future__ import annotations

from skorch.callbacks import Callback

__all__ = ["EpochProgressBar"]


class EpochProgressBar(Callback):
    """One tqdm progress bar over the epochs of a fit, showing the last training loss.

    skorch's own ``ProgressBar`` advances per batch and restarts every epoch; this one
    advances once per epoch, which reads better for the many short epochs of tabular
    long-tailed training.

    Parameters
    ----------
    desc : str or None, default=None
        Text before the bar; ``None`` uses the estimator's class name.
    leave : bool, default=True
        Keep the finished bar on screen.
    """

    def __init__(self, desc: str | None = None, leave: bool = True) -> None:
        self.desc = desc
        self.leave = leave

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        from tqdm.auto import tqdm

        self.bar_ = tqdm(total=net.max_epochs, desc=self.desc or type(net).__name__,
                         unit="epoch", leave=self.leave)

    def on_epoch_end(self, net, **kwargs):
        loss = net.history[-1].get("train_loss")
        if loss is not None:
            self.bar_.set_postfix(train_loss=f"{loss:.4f}", refresh=False)
        self.bar_.update(1)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        self.bar_.close()
