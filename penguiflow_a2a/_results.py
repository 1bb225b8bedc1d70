"""From A2A 1.0 task objects and stream events to PenguiFlow results and stream events.

Private helper of :mod:`penguiflow_a2a.client`. Everything here works on 1.0
JSON (0.3 is converted at the wire). :class:`StreamTracker` follows one task
through a stream and its resubscriptions, so that no artifact part is delivered
twice: it counts the parts delivered per ``artifactId`` and, from a Task
snapshot, delivers only the parts beyond that count.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from penguiflow.remote import RemoteStreamEvent

from .errors import A2AProtocolError, A2ATaskError, A2ATaskFailed, A2ATaskInterrupted
from .protocol import (
    COMPLETED,
    FINAL_STATES,
    INTERRUPTED_STATES,
    parts_to_payload,
    state_from_wire,
    state_to_v03,
)

__all__ = ["StreamTracker", "message_text", "parts_value", "task_outcome", "task_state"]


def _parts(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [p for p in value if isinstance(p, Mapping)]


def parts_value(parts: list[Mapping[str, Any]]) -> Any:
    """A result from parts: all text -> concatenated (``""``: streamed fragments);
    one data part -> its data; otherwise the list of part values; no parts -> None."""
    if not parts:
        return None
    if all(isinstance(p.get("text"), str) for p in parts):
        return "".join(str(p["text"]) for p in parts)
    try:
        return parts_to_payload(list(parts))
    except ValueError:
        return [dict(p) for p in parts]


def parts_text(parts: list[Mapping[str, Any]]) -> str:
    """Text of one stream chunk: text parts as they are, other parts as JSON."""
    out: list[str] = []
    for part in parts:
        if isinstance(part.get("text"), str):
            out.append(str(part["text"]))
        elif "data" in part:
            out.append(json.dumps(part["data"], default=str))
        else:
            out.append(json.dumps(dict(part), default=str))
    return "".join(out)


def message_text(message: Any) -> str | None:
    """The text parts of a Message joined, or None (no message, no text)."""
    if not isinstance(message, Mapping):
        return None
    texts = [str(p["text"]) for p in _parts(message.get("parts"))
             if isinstance(p.get("text"), str)]
    return "".join(texts) if texts else None


def task_state(task: Mapping[str, Any]) -> str:
    """The 1.0 state name of a Task (UNSPECIFIED when missing)."""
    status = task.get("status")
    return state_from_wire(status.get("state") if isinstance(status, Mapping) else None)


def _status_message(task: Mapping[str, Any]) -> Any:
    status = task.get("status")
    return status.get("message") if isinstance(status, Mapping) else None


def final_value(artifacts: Mapping[str, list[Mapping[str, Any]]], status_message: Any) -> Any:
    """The last artifact's value (by first appearance), else the status message text."""
    if artifacts:
        return parts_value(list(artifacts.values())[-1])
    return message_text(status_message)


def task_error(state: str, *, task_id: str | None, context_id: str | None,
               status_message: Any, agent_url: str, method: str) -> A2ATaskError:
    """The exception for a task that stopped in ``state`` (not COMPLETED)."""
    text = message_text(status_message)
    spelled = state_to_v03(state)
    if state in INTERRUPTED_STATES:
        return A2ATaskInterrupted(
            f"A2A agent {agent_url} task {task_id} stopped in state {spelled} "
            f"({method}): the agent asks the caller for more, which a RemoteNode cannot "
            f"answer; continue task {task_id} yourself. Agent said: {text!r}",
            state=spelled, task_id=task_id, context_id=context_id, remote_message=text,
            agent_url=agent_url, method=method)
    return A2ATaskFailed(
        f"A2A agent {agent_url} task {task_id} ended {spelled} ({method}): {text!r}",
        state=spelled, task_id=task_id, context_id=context_id, remote_message=text,
        agent_url=agent_url, method=method)


def task_outcome(task: Mapping[str, Any], *, agent_url: str, method: str) -> Any:
    """The final result of a COMPLETED task.

    Raises:
        A2ATaskFailed: FAILED, REJECTED or CANCELED.
        A2ATaskInterrupted: INPUT_REQUIRED or AUTH_REQUIRED.
        A2AProtocolError: the task is not in a final state.
    """
    state = task_state(task)
    if state not in FINAL_STATES:
        raise A2AProtocolError(
            f"A2A agent {agent_url} answered {method} with task {task.get('id')} in "
            f"non-final state {state_to_v03(state)}", agent_url=agent_url, method=method)
    if state != COMPLETED:
        raise task_error(state, task_id=_str(task.get("id")),
                         context_id=_str(task.get("contextId")),
                         status_message=_status_message(task), agent_url=agent_url,
                         method=method)
    artifacts: dict[str, list[Mapping[str, Any]]] = {}
    raw = task.get("artifacts")
    for index, artifact in enumerate(raw if isinstance(raw, list) else []):
        if isinstance(artifact, Mapping):
            key = _str(artifact.get("artifactId")) or f"#{index}"
            artifacts.setdefault(key, []).extend(_parts(artifact.get("parts")))
    return final_value(artifacts, _status_message(task))


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class StreamTracker:
    """One task followed through a stream (and its resubscriptions).

    Feed each 1.0 StreamResponse to :meth:`apply`; it returns the events to
    deliver (never a ``done`` event). When :attr:`finished` is True, call
    :meth:`final_event` for the one ``done`` event (or the exception to raise).
    """

    def __init__(self, *, agent_url: str, method: str) -> None:
        self.agent_url = agent_url
        self.method = method
        self.task_id: str | None = None
        self.context_id: str | None = None
        self.state: str | None = None
        self.finished = False
        self.artifacts: dict[str, list[Mapping[str, Any]]] = {}
        self._status_message: Any = None
        self._message: Mapping[str, Any] | None = None
        self._reported_state: str | None = None

    def _event(self, text: str | None, meta: dict[str, Any], *, done: bool = False,
               result: Any = None) -> RemoteStreamEvent:
        meta["a2a_method"] = self.method
        return RemoteStreamEvent(text=text, done=done, meta=meta, context_id=self.context_id,
                                 task_id=self.task_id, agent_url=self.agent_url,
                                 result=result)

    def _ids(self, obj: Mapping[str, Any], id_key: str) -> None:
        self.task_id = _str(obj.get(id_key)) or self.task_id
        self.context_id = _str(obj.get("contextId")) or self.context_id

    def _set_state(self, status: Any, out: list[RemoteStreamEvent]) -> None:
        if not isinstance(status, Mapping):
            return
        state = state_from_wire(status.get("state"))
        self.state = state
        if status.get("message") is not None:
            self._status_message = status.get("message")
        if state in FINAL_STATES:
            self.finished = True
        elif state != self._reported_state:
            self._reported_state = state
            out.append(self._event(None, {"task_state": state_to_v03(state)}))

    def _chunk(self, artifact_id: str, parts: list[Mapping[str, Any]], *, append: bool,
               last_chunk: bool) -> RemoteStreamEvent:
        meta: dict[str, Any] = {"artifact_id": artifact_id, "append": append,
                                "last_chunk": last_chunk}
        if self.state is not None:
            meta["task_state"] = state_to_v03(self.state)
        return self._event(parts_text(parts), meta)

    def apply(self, response: Mapping[str, Any]) -> list[RemoteStreamEvent]:
        """Take one StreamResponse; return the events it adds (maybe none).

        Raises:
            A2AProtocolError: not one of ``task``/``message``/``statusUpdate``/
                ``artifactUpdate`` with an object inside.
        """
        out: list[RemoteStreamEvent] = []
        if self.finished:
            return out
        if isinstance(response.get("artifactUpdate"), Mapping):
            update = response["artifactUpdate"]
            self._ids(update, "taskId")
            artifact = update.get("artifact")
            if not isinstance(artifact, Mapping):
                raise A2AProtocolError(
                    f"A2A agent {self.agent_url} sent an artifactUpdate without an artifact",
                    agent_url=self.agent_url, method=self.method)
            key = _str(artifact.get("artifactId")) or "#0"
            parts = _parts(artifact.get("parts"))
            append = update.get("append") is True
            if append:
                self.artifacts.setdefault(key, []).extend(parts)
            else:
                self.artifacts[key] = list(parts)
            out.append(self._chunk(key, parts, append=append,
                                   last_chunk=update.get("lastChunk") is True))
        elif isinstance(response.get("statusUpdate"), Mapping):
            update = response["statusUpdate"]
            self._ids(update, "taskId")
            self._set_state(update.get("status"), out)
        elif isinstance(response.get("task"), Mapping):
            self._snapshot(response["task"], out)
        elif isinstance(response.get("message"), Mapping):
            message = response["message"]
            self._ids(message, "taskId")
            self._message = message
            self.finished = True
        else:
            raise A2AProtocolError(
                f"A2A agent {self.agent_url} sent a stream event that is none of task, "
                f"message, statusUpdate, artifactUpdate (keys: {sorted(response)[:8]})",
                agent_url=self.agent_url, method=self.method)
        return out

    def _snapshot(self, task: Mapping[str, Any], out: list[RemoteStreamEvent]) -> None:
        """A Task (first stream event, a resubscribe snapshot, a GetTask answer):
        deliver the artifact parts beyond those already delivered, then its state."""
        self._ids(task, "id")
        raw = task.get("artifacts")
        for index, artifact in enumerate(raw if isinstance(raw, list) else []):
            if not isinstance(artifact, Mapping):
                continue
            key = _str(artifact.get("artifactId")) or f"#{index}"
            parts = _parts(artifact.get("parts"))
            known = self.artifacts.setdefault(key, [])
            missing = parts[len(known):]
            if missing:
                known.extend(missing)
                out.append(self._chunk(key, missing, append=len(known) > len(missing),
                                       last_chunk=False))
        self._set_state(task.get("status"), out)

    def final_event(self) -> RemoteStreamEvent:
        """The one ``done`` event of a finished stream.

        Raises:
            A2ATaskFailed / A2ATaskInterrupted: the task did not complete.
        """
        if self._message is not None:
            value = parts_value(_parts(self._message.get("parts")))
            return self._event("", {}, done=True, result=value)
        state = self.state or COMPLETED
        if state != COMPLETED:
            raise task_error(state, task_id=self.task_id, context_id=self.context_id,
                             status_message=self._status_message, agent_url=self.agent_url,
                             method=self.method)
        value = final_value(self.artifacts, self._status_message)
        return self._event("", {"task_state": state_to_v03(COMPLETED)}, done=True,
                           result=value)

