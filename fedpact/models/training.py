"""Plain training and scoring loops, shared by local baselines, DP-SGD and federated rounds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpact.models.networks import build_model


def make_loader(X: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """A DataLoader over float32 tensors; DP training replaces it with a Poisson-sampled one."""
    dataset = TensorDataset(torch.from_numpy(np.asarray(X, np.float32)),
                            torch.from_numpy(np.asarray(y, np.float32)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    *,
    loss_fn: Callable | None = None,
    on_step: Callable[[], None] | None = None,
) -> float:
    """Train for `epochs` passes over `loader`; return the mean loss of the last epoch.

    `loss_fn` defaults to binary cross-entropy on logits; DP-SGD with ghost clipping passes the
    wrapped criterion Opacus returns.
    """
    loss_fn = loss_fn or nn.BCEWithLogitsLoss()
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, batches = 0.0, 0
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb).squeeze(-1), yb)
            loss.backward()
            optimizer.step()
            total += float(loss.item())
            batches += 1
            if on_step:
                on_step()
        last = total / max(batches, 1)
    return last


@torch.no_grad()
def predict_proba(model: nn.Module, X: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Predicted probability of the positive class for each row of `X`."""
    model.eval()
    out = []
    tensor = torch.from_numpy(np.asarray(X, np.float32))
    for start in range(0, len(tensor), batch_size):
        out.append(torch.sigmoid(model(tensor[start:start + batch_size]).squeeze(-1)))
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def train_model(
    X: np.ndarray,
    y: np.ndarray,
    *,
    kind: str = "logreg",
    epochs: int = 8,
    batch_size: int = 256,
    lr: float = 0.05,
    seed: int = 0,
) -> nn.Module:
    """Train a non-private model from scratch (centralised and per-partner baselines)."""
    torch.manual_seed(seed)
    model = build_model(kind, X.shape[1], seed=seed)
    run_epochs(model, make_optimizer(model, lr), make_loader(X, y, batch_size, seed=seed), epochs)
    return model


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
