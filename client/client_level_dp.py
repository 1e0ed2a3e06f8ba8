"""``dp=client`` at a site: Flower's fixed clipping of the update before it leaves (the server
wrapper adds the noise and accounts epsilon)."""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedseg.common.records import CONFIG


def client_level_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``dp=client``: Flower's ``fixedclipping_mod`` on training rounds whose config carries the
    server wrapper's clipping norm; every other message passes through untouched."""
    config = msg.content.config_records.get(CONFIG)
    if msg.metadata.message_type == MessageType.TRAIN and config and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
