"""Per-session state of the app: the bounded cache of quantized copies (``QuantCache``), the cancel tokens that let
Cancel stop a job at its next layer (``Jobs``) and the small records a session keeps between requests
(``SessionNotes``). Thread-safe; nothing here imports gradio."""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager

from .config import Recipe
from .errors import DitlabError
from .models import Pipeline

class QuantCache:
    """Quantized copies keyed by (session, model source, recipe JSON): an LRU of ``max_entries`` in total (bounded
    memory), never in session state. Concurrent requests for the same key quantize once."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict = {}

    @staticmethod
    def key(session: str | None, pipe: Pipeline, recipe: Recipe) -> tuple:
        return (session or "local", pipe.source, recipe.to_json(indent=None))

    def get(self, session: str | None, pipe: Pipeline, recipe: Recipe, quantize) -> object:
        """The cached quantized copy, or ``quantize(pipe, recipe)`` stored under the key."""
        key = self.key(session, pipe, recipe)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = quantize(pipe, recipe)
            self.put(session, pipe, recipe, value)
        with self._lock:
            self._key_locks.pop(key, None)
        return value

    def put(self, session: str | None, pipe: Pipeline, recipe: Recipe, value) -> None:
        """Stores a quantized copy (e.g. one loaded from an exported folder), evicting the least recently used."""
        with self._lock:
            self._items[self.key(session, pipe, recipe)] = value
            self._items.move_to_end(self.key(session, pipe, recipe))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def drop_session(self, session: str | None) -> None:
        """Forgets every entry of one session (call when it ends)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == (session or "local")]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class SessionNotes:
    """What each session remembers between requests, by kind: e.g. "sensitivity" (its last result, which the metric
    picker re-draws), "export" (the export it loaded last), "table" (its last table check). One lock for all;
    ``forget`` drops everything of a session when it ends."""

    def __init__(self):
        self._notes: dict[str, dict[str, object]] = {}
        self._lock = threading.Lock()

    def get(self, session: str | None, kind: str, default=None):
        with self._lock:
            return self._notes.get(session or "local", {}).get(kind, default)

    def put(self, session: str | None, kind: str, value) -> None:
        with self._lock:
            self._notes.setdefault(session or "local", {})[kind] = value

    def swap(self, session: str | None, kind: str, value, default=None):
        """Stores ``value`` and returns what was there before (``default`` if nothing), in one step."""
        with self._lock:
            notes = self._notes.setdefault(session or "local", {})
            old = notes.get(kind, default)
            notes[kind] = value
            return old

    def forget(self, session: str | None) -> None:
        with self._lock:
            self._notes.pop(session or "local", None)

    def sessions(self) -> set[str]:
        """The sessions with at least one note."""
        with self._lock:
            return set(self._notes)


class Cancelled(DitlabError):
    """A job stopped because its user pressed Cancel (raised at the job's next module forward)."""


_job = threading.local()


def _stop_if_cancelled(module, args) -> None:
    event = getattr(_job, "cancel", None)
    if event is not None and event.is_set():
        raise Cancelled("cancelled: the job stopped at your request")


class Jobs:
    """Cancel tokens of the running jobs of each session. A job runs inside ``run(session)``; ``cancel(session)`` makes
    it raise ``Cancelled`` at its next ``nn.Module`` forward (a global forward pre-hook checks a thread-local token),
    so the worker thread is free again within one layer's time instead of finishing the job."""

    def __init__(self):
        self._events: dict[str, set] = {}
        self._changed = threading.Condition()  # guards _events; notified whenever a job ends
        self._hook = None

    @contextmanager
    def run(self, session: str | None, name: str = "job"):
        import torch

        with self._changed:
            if self._hook is None:
                self._hook = torch.nn.modules.module.register_module_forward_pre_hook(_stop_if_cancelled)
            event = threading.Event()
            event.job_name = name
            self._events.setdefault(session or "local", set()).add(event)
        _job.cancel = event
        try:
            yield event
        finally:
            _job.cancel = None
            with self._changed:
                self._events.get(session or "local", set()).discard(event)
                self._changed.notify_all()

    def names(self, session: str | None) -> list[str]:
        """The names of ``session``'s running jobs (sorted)."""
        with self._changed:
            return sorted(getattr(e, "job_name", "job") for e in self._events.get(session or "local", ()))

    def sessions_running(self) -> set[str]:
        """The sessions with at least one running job."""
        with self._changed:
            return {session for session, events in self._events.items() if events}

    def cancel(self, session: str | None, wait: float = 0.0) -> tuple[int, int]:
        """Signals every running job of ``session`` and waits up to ``wait`` seconds for them to end.
        Returns (jobs signalled, jobs of those still running): (1, 0) = one job stopped, the worker is free."""
        with self._changed:
            events = set(self._events.get(session or "local", ()))
            for event in events:
                event.set()
            self._changed.wait_for(lambda: not events & self._events.get(session or "local", set()), timeout=wait)
            return len(events), len(events & self._events.get(session or "local", set()))
