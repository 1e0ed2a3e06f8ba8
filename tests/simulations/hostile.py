"""Broken or hostile sites for tests and benchmarks: fedseg's own ClientApp, whose training
replies are corrupted as they leave the node (outermost mod), by site name."""

from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp import ClientApp

from fedseg.client import app as site_app
from fedseg.client.site import site_of_message
from fedseg.common.records import packed_record, unpacked_record


def _weights(reply: Message, change) -> None:
    arrays = {k: v.numpy().copy() for k, v in unpacked_record(reply.content["arrays"]).items()}
    change(arrays)
    reply.content["arrays"] = packed_record(ArrayRecord({k: Array(v) for k, v in arrays.items()}))


def nan_tensor(reply: Message) -> None:
    def poison(arrays):
        arrays[next(iter(arrays))].flat[0] = float("nan")
    _weights(reply, poison)


def wrong_shape(reply: Message) -> None:
    def reshape(arrays):
        name = next(iter(arrays))
        arrays[name] = arrays[name].ravel()[:-1].copy()
    _weights(reply, reshape)


def billion_cases(reply: Message) -> None:
    reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), "num-examples": 10**9})


HOSTILE = {"site-c": nan_tensor, "site-d": wrong_shape, "site-e": billion_cases}


def _hostile_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost: what a site's replies become on a broken or hostile node, as they leave it."""
    reply = call_next(msg, context)
    site = site_of_message(dict(context.node_config), msg)
    if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error() and site.ref.name in HOSTILE:
        HOSTILE[site.ref.name](reply)
    return reply


hostile_app = ClientApp(mods=[_hostile_mod, *site_app.app._mods])
hostile_app.query()(site_app.query)
hostile_app.train()(site_app.train)
hostile_app.evaluate()(site_app.evaluate)
