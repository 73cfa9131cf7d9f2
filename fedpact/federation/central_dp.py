"""Optional central (client-level) DP on the aggregate, with Flower's fixed-clipping wrappers.

Record-level DP-SGD on each partner (`JobConfig.dp`) is fedpact's guarantee; this adds, when
`JobConfig.central_dp_noise > 0`, Gaussian noise to the *aggregate* so that the model hides whether
one partner's update was in it (client-level DP, McMahan et al. 2018). With a handful of partner
silos that protects little and costs a lot of accuracy; see docs/secure-aggregation.md.

- Message-API path (`coordinator.run_job`): Flower's `DifferentialPrivacyServerSideFixedClipping`
  around `AuditedFedAvg`: the coordinator clips each partner's update to `central_dp_clip` (it sees
  them in the clear on this path anyway), averages, adds noise.
- SecAgg+ path (`secagg.py`): the coordinator cannot clip what it cannot see, so each partner clips
  its own update (Flower's `fixedclipping_mod`, applied only when the server asks for it) before
  masking, and Flower's legacy `DifferentialPrivacyClientSideFixedClipping` adds the noise to the
  unmasked sum.

Flower's wrappers add noise of std `noise * clip / partners`, calibrated for an *unweighted* mean.
fedpact averages by row count, so one partner moves the aggregate by up to `clip * w_max / W`; the
client-level ε reported here uses that sensitivity (`client_level_privacy`), not Flower's nominal
noise multiplier. Flower 1.42's own accountant for these wrappers refuses weighted or subclassed
FedAvg, so it is not used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedpact.privacy.accounting import epsilon_of

from .job import JobConfig
from .strategy import RoundFailed


class AuditedServerSideClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, except that a refusing partner fails the round.

    Flower's wrapper silently skips aggregation when a reply is an error; fedpact's rule is that
    a refusal (budget, layout) stops the job with the partner's reason, as without central DP.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if any(m.has_error() for m in replies):
            self.strategy.aggregate_train(server_round, replies)  # AuditedFedAvg raises RoundFailed
            raise RoundFailed(f"round {server_round} (train): a partner replied with an error")
        return super().aggregate_train(server_round, replies)


def with_central_dp(strategy: Strategy, job: JobConfig) -> Strategy:
    """`strategy` wrapped in server-side clipping + noise when the job asks for central DP."""
    if job.central_dp_noise <= 0:
        return strategy
    return AuditedServerSideClipping(strategy, job.central_dp_noise, job.central_dp_clip,
                                     job.num_partitions)


def with_central_dp_legacy(strategy, job: JobConfig):
    """The legacy (SecAgg+) strategy wrapped in Flower's client-side-clipping noise wrapper."""
    if job.central_dp_noise <= 0:
        return strategy
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping

    class _Wrapper(DifferentialPrivacyClientSideFixedClipping):
        def aggregate_fit(self, server_round, results, failures):
            if failures:  # Flower's wrapper would skip the round silently; fedpact fails it
                return self.strategy.aggregate_fit(server_round, results, failures)
            return super().aggregate_fit(server_round, results, failures)

    return _Wrapper(strategy, job.central_dp_noise, job.central_dp_clip, job.num_partitions)


def clip_if_asked(msg: Message, context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` for train messages whose config carries a clipping norm.

    Without central DP the server sends no `clipping_norm` and the message passes untouched
    (Flower's mod would raise); evaluate and SecAgg+ key-exchange messages are not train fits.
    """
    from flwr.app.message_type import MessageType
    from flwr.client.mod import fixedclipping_mod

    if (msg.metadata.message_type == MessageType.TRAIN and "fitins.config" in msg.content
            and KEY_CLIPPING_NORM in msg.content["fitins.config"]):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def client_level_privacy(job: JobConfig, rows: Mapping[str, int], *, secure_aggregation: bool
                         ) -> dict:
    """What the central noise buys: client-level (ε, δ) over all rounds, honestly for weighted FedAvg.

    Every partner takes part in every round (no sampling amplification). The noise std is
    `σ·C/n` (Flower's calibration); the aggregate weighs partner i by w_i/W, so the sensitivity is
    C·max(w)/W and the effective noise multiplier is σ·W/(n·max w). Adjacency: one partner's
    update added or removed with the weights held fixed (as in Flower's wrappers). ε from the RDP
    accountant at the job's δ.
    """
    if job.central_dp_noise <= 0:
        return {}
    weights = [max(int(r), 1) for r in rows.values()]
    n, total, heaviest = len(weights), sum(weights), max(weights)
    effective = job.central_dp_noise * total / (n * heaviest)
    return {
        "clipping": "client-side (fixedclipping_mod)" if secure_aggregation else "server-side",
        "noise_multiplier": job.central_dp_noise,
        "clip": job.central_dp_clip,
        "noise_std": job.central_dp_noise * job.central_dp_clip / n,
        "effective_noise_multiplier": effective,
        "rounds": job.rounds,
        "delta": job.target_delta,
        "client_level_epsilon": epsilon_of([(effective, 1.0, job.rounds)], job.target_delta, "rdp"),
    }
