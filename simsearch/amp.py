"""The original's AMP loss scaler, kept for code written against it (the package itself trains nothing);
``utils.NativeScalerV2`` hands it over without importing timm before it is asked for."""

from __future__ import annotations

from collections.abc import Iterable

import timm.utils
import torch


class NativeScalerV2(timm.utils.NativeScaler):
    """For callers of the original (the package trains nothing): timm's AMP loss scaler that also tells whether the
    last call really stepped the optimizer.

    ``GradScaler`` silently skips ``optimizer.step()`` when it finds inf/NaN gradients and lowers its scale. A
    learning-rate scheduler stepped after such a call triggers PyTorch's "scheduler before optimizer" warning and
    advances the schedule for an update that never happened; ``has_stepped()`` lets the training loop skip it.
    """

    def __init__(self, device: str | torch.device = "cuda") -> None:
        super().__init__(device=torch.device(device).type)
        self._stepped = False

    def __call__(
        self,
        *,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        clip_grad: float | None = None,
        clip_mode: str = "norm",
        parameters: Iterable[torch.nn.Parameter] | None = None,
        create_graph: bool = False,
        need_update: bool = True,
    ) -> None:
        scale = self.get_scale()
        super().__call__(
            loss,
            optimizer,
            clip_grad=clip_grad,
            clip_mode=clip_mode,
            parameters=parameters,
            create_graph=create_graph,
            need_update=need_update,
        )
        # The scaler lowers its scale exactly when it skipped the step because of inf/NaN gradients.
        self._stepped = need_update and self.get_scale() >= scale

    def has_stepped(self) -> bool:
        """Whether the last call ran ``optimizer.step()`` (False after gradient accumulation or an overflow)."""
        return self._stepped

    def get_scale(self) -> float:
        """The current loss scale (1.0 when the scaler is disabled, e.g. CUDA requested on a CPU-only machine)."""
        return float(self._scaler.get_scale())
