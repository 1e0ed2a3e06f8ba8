"""Outbox audit: a Flower client mod that logs, at the site, everything a reply carries off-site."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedseg.client.site import site_of_message
from fedseg.common.atomic import private_dir
from fedseg.common.records import CONFIG, SITE_ERROR

OUTBOX_FILE = "outbox.jsonl"
log = logging.getLogger(__name__)


def outbox_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Append to ``state-dir/outbox.jsonl`` the inventory of the reply that is about to leave.

    One line per reply: message type, server round, for every record its kind and contents (array
    names, shapes, dtypes and bytes; metric and config names with their values), and the names of
    the arrays the message brought. Hospital IT can read exactly what crossed the wire; tests use
    it to prove the privacy boundary. A reply that cannot be logged (a full or read-only state
    dir) is withheld.
    """
    reply = call_next(msg, context)
    site = site_of_message(dict(context.node_config), msg)
    if site is None:  # no site identity: nothing of this site's was sent
        return reply
    state_dir = site.state_dir
    config = dict(msg.content[CONFIG]) if CONFIG in msg.content.config_records else {}
    entry: dict[str, Any] = {"type": msg.metadata.message_type,
                             "round": config.get("server-round"), "error": None, "records": {},
                             "received": {name: sorted(record.keys())
                                          for name, record in msg.content.array_records.items()}}
    if reply.has_error():
        entry["error"] = reply.error.reason
    else:
        for name, record in reply.content.array_records.items():
            entry["records"][name] = {"kind": "arrays", "items": {
                k: {"shape": list(a.shape), "dtype": a.dtype, "bytes": len(a.data)} for k, a in record.items()}}
        for name, record in reply.content.metric_records.items():
            entry["records"][name] = {"kind": "metrics", "items": dict(record)}
        for name, record in reply.content.config_records.items():
            entry["records"][name] = {"kind": "config", "items": dict(record)}
    try:
        private_dir(state_dir)
        with open(state_dir / OUTBOX_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:  # a reply that cannot be logged does not leave (an error reply carries nothing)
        log.error("outbox audit not written: %s", err)
        if reply.has_error():
            return reply
        return Message(Error(code=SITE_ERROR, reason=f"the site's outbox audit cannot be written ({err}); "
                             "the reply was withheld"), reply_to=msg)
    return reply
