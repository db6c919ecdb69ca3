"""Client-side mods: Flower's adaptive-clipping mod, applied only when the server asks for it.

``flwr.clientapp.mod.adaptiveclipping_mod`` clips a site's update to the bound the server
sends and adds the ``norm_bit`` the server's adaptive-clipping wrapper needs. As a plain
mod it would turn every other message into an error (no bound in a fixed-clipping or
non-DP run; no arrays in a site's budget refusal), so this mod hands a message to it
only when the server's config carries the bound, and passes a refusal through as it is.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def central_dp_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    if msg.has_error() or not any(KEY_CLIPPING_NORM in c for c in msg.content.config_records.values()):
        return call_next(msg, ctxt)
    inner: list[Message] = []

    def run_app(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        inner.append(reply)
        return reply

    clipped = adaptiveclipping_mod(msg, ctxt, run_app)
    if inner and not inner[0].has_error() and not inner[0].content.array_records:
        return inner[0]  # a budget refusal: nothing was trained, nothing to clip
    return clipped
