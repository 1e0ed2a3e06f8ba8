"""Nothing identifying leaves a site: every reply's text (error reasons, metric names, config
values) is scrubbed of the site's paths and its cases' file names before it is sent, and a
fairness group whose name looks identifying is sent as an opaque id. Hospital file names often
hold patient names, record numbers or dates; a case is named by an opaque id (``case-7``)
instead. The site's own log keeps the detail."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedseg.client.site import SiteLocation, site_of_message
from fedseg.client.identifying_text import IDENTIFYING_NAME, case_files


class Redactor:
    """Replaces a site's paths and case file names in text.

    Args:
        site: the site (its data folder, state folder and cases).
    """

    def __init__(self, site: SiteLocation) -> None:
        self.replacements: list[tuple[str, str]] = []
        for path, tag in ((site.ref.site_dir, "<site-dir>"), (site.state_dir, "<state-dir>")):
            for form in {str(path), str(Path(path).resolve())}:
                self.replacements.append((form, tag))
        for index, name in enumerate(case_files(site.ref.site_dir)):
            for form in {name, name.split(".")[0]}:
                if len(form) >= 4:  # "1.png" -> "1" would mangle numbers everywhere
                    self.replacements.append((form, f"case-{index}"))
        self.replacements.sort(key=lambda pair: -len(pair[0]))  # longest first: paths, then names
        self._pattern = re.compile("|".join(re.escape(old) for old, _ in self.replacements)) \
            if self.replacements else None
        self._new = dict(self.replacements)

    def __call__(self, text: str) -> str:
        """``text`` with every path and case file name replaced."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: self._new[m.group(0)], text)


def redaction_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower client mod that scrubs the reply's text before it leaves (see ``Redactor``)."""
    reply = call_next(msg, context)
    site = site_of_message(dict(context.node_config), msg)
    if site is None:
        return reply
    redact = Redactor(site)
    if reply.has_error():
        reason = redact(reply.error.reason)
        if reason != reply.error.reason:
            reply = Message(Error(code=reply.error.code, reason=reason), reply_to=msg)
        return reply
    for name, record in list(reply.content.metric_records.items()):
        reply.content[name] = MetricRecord({_group_name(redact(k)): v for k, v in record.items()})
    for name, record in list(reply.content.config_records.items()):
        reply.content[name] = ConfigRecord({redact(k): _redact_value(redact, v) for k, v in record.items()})
    return reply


def _group_name(key: str) -> str:
    """A fairness group's name is free text from dataset.json: one that looks like it holds a
    date, a record number or a person's name is sent as an opaque ``group-<hash>`` instead."""
    metric, sep, group = key.partition(":")
    if not (sep and metric.startswith("group-") and IDENTIFYING_NAME.search(group)):
        return key
    return f"{metric}:group-{hashlib.sha256(group.encode()).hexdigest()[:8]}"


def _redact_value(redact: Redactor, value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact(v) if isinstance(v, str) else v for v in value]
    return value
