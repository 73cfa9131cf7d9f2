"""DP-SGD for one partner's local training, through Opacus (Poisson sampling, flat clipping)."""

from __future__ import annotations

import copy
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fedpact.errors import ConfigurationError

# Known, understood Opacus/torch notices that would otherwise flood every round's output:
# - secure_mode is off (see docs/privacy.md: torchcsprng has no build for this torch);
# - Opacus' per-sample hooks on a first layer whose input needs no gradient;
# - the RDP optimum at the largest order: the bound stays valid, only slightly conservative.
for _notice in ("Secure RNG turned off", "Full backward hook is firing",
                "Optimal order is the largest alpha"):
    warnings.filterwarnings("ignore", message=_notice, category=UserWarning)


GRAD_SAMPLE_MODES = ("ghost", "hooks", "ew", "functorch")


def private_generator(seed: int | None = None) -> torch.Generator:
    """A generator for randomness a DP guarantee rests on (which rows a batch holds, the noise).

    Seeded with 63 bits from the OS CSPRNG (`secrets`), fresh at every call, so nobody who knows
    the job's settings can rebuild it. `seed` (reproducible mode, a node's own explicit setting
    for tests) fixes it — and then the run is not private: callers must report it so.
    """
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))


@dataclass
class PrivateSetup:
    """What DP-SGD trains with: the wrapped model, optimizer, Poisson loader and loss function."""

    model: nn.Module
    optimizer: Optimizer
    loader: DataLoader
    loss_fn: Callable


class PrivateTraining:
    """Wraps a model/optimizer/loader for DP-SGD and accounts every step it takes.

    `history` carries the accountant's earlier steps in (from this dataset's `AccountantState`), so
    `epsilon()` reports the composition over all rounds, not this round alone. `grad_sample_mode`
    picks how per-example gradient norms are computed; all modes clip every example's gradient to
    `max_grad_norm` exactly, so the guarantee is the same ("ghost" — fast gradient clipping — was the
    quickest here: docs/benchmarks.md).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        accountant: str = "rdp",
        history: list[tuple[float, float, int]] | None = None,
        grad_sample_mode: str = "ghost",
    ):
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigurationError(
                f"grad_sample_mode {grad_sample_mode!r}: choose one of {', '.join(GRAD_SAMPLE_MODES)}")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.grad_sample_mode = grad_sample_mode
        self.engine = PrivacyEngine(accountant=accountant)
        self.engine.accountant.history = [tuple(h) for h in (history or [])]

    def wrap(self, model: nn.Module, optimizer: Optimizer, loader: DataLoader,
             criterion: nn.Module | None = None, *, sampling_seed: int | None = None,
             noise_seed: int | None = None) -> PrivateSetup:
        """Make training private; the loader samples batches by Poisson sampling.

        Whatever generator `loader` carries is ignored: Opacus draws the Poisson batches from the
        loader's generator, so the batches come from a fresh `private_generator` and the noise
        from a second one (`sampling_seed` / `noise_seed` only in reproducible mode).
        """
        model.train()
        criterion = criterion or nn.BCEWithLogitsLoss()
        # Opacus' DPDataLoader.from_data_loader samples from `loader.generator`: a shallow copy
        # of the loader (same length, so the same rate 1/len) carrying a fresh private generator.
        loader = copy.copy(loader)
        loader.generator = private_generator(sampling_seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                criterion=criterion,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=self.grad_sample_mode,
                noise_generator=private_generator(noise_seed),
            )
        if self.grad_sample_mode == "ghost":
            private_model, private_opt, loss_fn, private_loader = out
        else:
            (private_model, private_opt, private_loader), loss_fn = out, criterion
        return PrivateSetup(private_model, private_opt, private_loader, loss_fn)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self.engine.accountant.history]

    def epsilon(self, delta: float) -> float:
        if not self.engine.accountant.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(self.engine.accountant.get_epsilon(delta=delta))
