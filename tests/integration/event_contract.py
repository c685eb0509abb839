"""Messages seen on the wire, checked against docs/asyncapi.yaml.

A message is matched to its channel by exchange and routing key (each ``{parameter}`` of a
channel name matches its enum), then checked against that channel's operation and message:
the payload against its JSON schema, the routing key's parameters against the payload's fields
of the same name, the AMQP properties against the bindings (``messageType`` = ``type``,
``contentEncoding``, content type, ``deliveryMode``) and, for an event, ``message_id`` against
its ``event_id``. ``missing()`` lists what the document promises and nobody sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from aio_pika.abc import AbstractIncomingMessage

ASYNCAPI = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
DOC_PREFIX = "dispatcher"  # the prefix the document's exchange and queue names use


def load() -> dict[str, Any]:
    # JSON is YAML: the document is written in the JSON subset.
    doc: dict[str, Any] = json.loads(ASYNCAPI.read_text(encoding="utf-8"))
    return doc


@dataclass(frozen=True)
class Seen:
    """One AMQP message as a subscriber got it; ``source`` is the exchange or queue name
    without the deployment prefix (``events``, ``billing``, ``dead``)."""

    source: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    headers: dict[str, Any]

    @classmethod
    def of(cls, message: AbstractIncomingMessage, prefix: str, source: str | None = None) -> Seen:
        headers = {key: value.decode() if isinstance(value, bytes) else value
                   for key, value in (message.headers or {}).items()}
        properties = {"content_type": message.content_type,
                      "content_encoding": message.content_encoding,
                      "delivery_mode": int(message.delivery_mode or 0),
                      "message_id": message.message_id, "type": message.type}
        name = source if source is not None else (message.exchange or "")
        return cls(name.removeprefix(f"{prefix}."), message.routing_key or "", message.body,
                   properties, headers)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Channel:
    """A documented channel: where its messages travel and what they look like."""

    name: str
    pattern: re.Pattern[str]
    source: str  # exchange or queue name without the prefix
    operation: str  # publish (others send it to the dispatcher) or subscribe (it sends)
    op: dict[str, Any]
    message: dict[str, Any]
    parameters: dict[str, list[str]]

    @property
    def message_id(self) -> str:
        return str(self.message["messageId"])


def _channel(doc: dict[str, Any], name: str, item: dict[str, Any]) -> Channel:
    amqp = item["bindings"]["amqp"]
    where = amqp["exchange"]["name"] if amqp["is"] == "routingKey" else amqp["queue"]["name"]
    operation = "publish" if "publish" in item else "subscribe"
    op = item[operation]
    message = doc["components"]["messages"][op["message"]["$ref"].rsplit("/", 1)[1]]
    parameters = {key: list(p["schema"]["enum"])
                  for key, p in item.get("parameters", {}).items()}
    regex = ""
    for part in re.split(r"(\{[a-z_]+\})", name):
        if part.startswith("{"):
            key = part[1:-1]
            regex += f"(?P<{key}>{'|'.join(map(re.escape, parameters[key]))})"
        else:
            regex += re.escape(part)
    if amqp["is"] == "queue":
        regex = ".*"  # a queue channel: whatever routing key the message kept
    return Channel(name, re.compile(regex), where.removeprefix(f"{DOC_PREFIX}."), operation,
                   op, message, parameters)


@dataclass
class Contract:
    """The document's channels, and what was seen of each."""

    doc: dict[str, Any] = field(default_factory=load)
    seen: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def channels(self) -> list[Channel]:
        return [_channel(self.doc, name, item) for name, item in self.doc["channels"].items()]

    def check(self, seen: Seen) -> tuple[Channel | None, list[str]]:
        """Everything the document says of this message: its channel, and what does not hold
        (each problem worded without the message's own values, so a run's problems dedupe)."""
        found = [(c, m.groupdict()) for c in self.channels if c.source == seen.source
                 for m in [c.pattern.fullmatch(seen.routing_key)] if m]
        if len(found) != 1:
            return None, [f"{seen.source} {seen.routing_key!r}: {len(found)} documented "
                          "channels match"]
        channel, params = found[0]
        self.seen.setdefault(channel.name, []).append(params)
        if channel.source == "dead":
            return channel, self._errors(seen.headers, channel.message["headers"],
                                         f"{channel.name} headers")
        message, props = channel.message, seen.properties
        binding = message.get("bindings", {}).get("amqp", {})
        expected = {
            "content_type": message.get("contentType", self.doc["defaultContentType"]),
            "content_encoding": binding.get("contentEncoding"),
            "type": binding.get("messageType"),
            "delivery_mode": channel.op.get("bindings", {}).get("amqp", {}).get("deliveryMode"),
        }
        problems = [f"{channel.name}: AMQP {key} {props[key]!r}, documented {value!r}"
                    for key, value in expected.items() if props[key] != value]
        body = seen.json()
        problems += self._errors(body, message["payload"], channel.name)
        if isinstance(body, dict):
            if props["message_id"] != body.get("event_id"):
                problems.append(f"{channel.name}: message_id is not the event_id")
            problems += [f"{channel.name}: routing key says {key}={value!r}, the payload "
                         f"{body[key]!r}" for key, value in params.items()
                         if key in body and body[key] != value]
        return channel, problems

    def _errors(self, instance: Any, schema: Mapping[str, Any], where: str) -> list[str]:
        # The whole document as the root, so ``#/components/schemas/...`` resolves.
        root = {**self.doc, **schema}
        validator = jsonschema.Draft7Validator(
            root, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
        return [f"{where}: {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.validator} "
                f"{e.validator_value!r} not met" for e in validator.iter_errors(instance)]

    def missing(self, sources: set[str]) -> list[str]:
        """Channels on these exchanges or queues never seen, and parameter values never seen
        (a documented status no run emitted)."""
        gaps: list[str] = []
        for channel in self.channels:
            if channel.source not in sources:
                continue
            seen = self.seen.get(channel.name, [])
            if not seen:
                gaps.append(channel.name)
            for key, values in channel.parameters.items():
                gaps += [f"{channel.name}: {key}={value}" for value in values
                         if all(p.get(key) != value for p in seen)]
        return gaps


__all__ = ["ASYNCAPI", "Channel", "Contract", "Seen", "load"]
