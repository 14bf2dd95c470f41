"""An engine sink that hands events to the Textual app without flooding it.

The engine calls `emit` from the training thread. Events are queued, and at most one `EngineEvents` message
is in flight: the app drains everything queued so far when it handles it. A run logging every step therefore
costs the UI one message per frame it can actually handle, never a backlog (toolong's coalescing).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from textual.message import Message
from textual.message_pump import MessagePump

from engine.events import Event
from tui.messages import EngineEvents


class MessageSink:
    def __init__(
        self, target: MessagePump, run_id: int, message: Callable[[MessageSink], Message] = EngineEvents
    ) -> None:
        self.target = target
        self.run_id = run_id
        self.message = message
        """The message that tells `target` events are waiting (the live run's `EngineEvents`, or a screen's own)."""
        self._lock = threading.Lock()
        self._pending: list[Event] = []
        self._posted = False

    def emit(self, event: Event) -> None:
        with self._lock:
            self._pending.append(event)
            if self._posted:
                return
            self._posted = True
        self.target.post_message(self.message(self))

    def drain(self) -> list[Event]:
        with self._lock:
            events, self._pending = self._pending, []
            self._posted = False
        return events
