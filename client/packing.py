"""Packed weights at a site: unpack the weights a message brings, pack the weights its reply
sends back the same way (the server packs every message; a site mirrors what it receives)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedseg.common.records import ARRAYS, is_packed, packed_record, unpacked_record


def weight_packing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: everything inside it (handlers, clipping, redaction, the outbox audit) sees
    one array per tensor; the wire sees one array per dtype when the server packed its message."""
    arrays = msg.content.array_records.get(ARRAYS)
    packed = arrays is not None and is_packed(arrays)
    if packed:
        msg.content[ARRAYS] = unpacked_record(arrays)
    reply = call_next(msg, context)
    if packed and not reply.has_error() and ARRAYS in reply.content.array_records:
        reply.content[ARRAYS] = packed_record(reply.content[ARRAYS])
    return reply
