"""Every message one vpblu actor sends another: the only coupling between actors.

This module owns the shapes of messages. It never does I/O, never reads a
clock, and holds no state; nothing here knows how a message is handled.

The rules, for everyone adding a section:

- A message is a frozen, slotted attrs class (``@attrs.frozen``): immutable,
  hashable, cheap, and impossible to grow a stray attribute by a typo.
- Each actor's inbox has one union type, named ``<Actor>Inbox`` and declared
  right under that actor's messages, e.g.
  ``SessionInbox = SyncNow | ApplyDelta | CloseSession``. The actor's
  receive channel is typed with it (``trio.MemoryReceiveChannel[SessionInbox]``),
  so mypy refuses a message sent to the wrong actor.
- Dispatch with ``match``, one ``case`` per class in the union, and end with
  ``case _: typing.assert_never(message)`` so that a message added to the
  union but not handled is a type error, not a silent drop.
- Fields use the domain's own types from ``vpblu.model`` (``Peer``,
  ``NodeDesiredState``, ``generation``), never a dict, never ``Any``: raw API
  dicts stop at the watcher boundary. Collections are tuples or frozensets.
- Put a validator (``attrs.field(validator=...)``) on any field where a wrong
  value can be built: a negative generation, an empty node name. The error
  then points at the sender, not at the actor that tripped over it later.
- Request/reply: the request carries its way back, a one-shot
  ``trio.MemorySendChannel`` (or a ``trio.Event`` when the answer is only
  "done"), created and closed by the asker. Never a callback.
- No private key, in any form (bytes, base64, a file's contents), ever
  appears in a message: messages are logged, repr'd and put in exceptions.
  Messages carry public keys and paths; the KeyStore alone reads key files.

Sections are headed with a comment naming the actor(s) whose inbox they
serve, in the order the actors are described in DESIGN.md.
"""

from __future__ import annotations

# --- Supervisor (vpblu.supervisor) -------------------------------------------
# None: a supervisor is infrastructure, not an actor. The actor that owns a
# supervisor drives it by method calls (`start_child`, `terminate_child`,
# `statistics`), and child failures reach the supervisor as exceptions,
# never as messages.
