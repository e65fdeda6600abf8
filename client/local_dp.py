"""Local differential privacy on the client: Flower's ``LocalDpMod``, switched on by the run config.

A ClientApp's mods are fixed when the app is built, while ``dp`` is chosen per
run; this mod reads the run config and, for ``dp = "local"`` train messages,
hands the message to ``flwr.clientapp.mod.LocalDpMod``: the update (trained
model − received model) is clipped to L2 norm C = ``dp-clipping-norm`` and every
weight gets Gaussian noise of std 2C·sqrt(2 ln(1.25/δ))/ε (sensitivity 2C: two
clipped updates differ by at most 2C; ε = ``dp-local-epsilon``; δ as the server
sends it in the train config, ``dp-delta``), before the reply leaves the node.
See ``server/privacy.py``.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import LocalDpMod

from common.config import RunConfig


def local_dp(msg: Message, context: Context, call_next) -> Message:
    """Clip and noise this node's train reply when the run has ``dp = "local"``; pass through otherwise."""
    config = RunConfig.from_mapping(context.run_config)
    if config.dp != "local" or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    delta = float(msg.content["config"]["dp-delta"])
    mod = LocalDpMod(clipping_norm=config.dp_clipping_norm, sensitivity=2 * config.dp_clipping_norm,
                     epsilon=config.dp_local_epsilon, delta=delta)
    return mod(msg, context, call_next)
