"""The NATS JetStream bus: streams, protobuf events with ``Nats-Msg-Id``, durable consumers.

Facts go to the events stream, which every service reads with its own durable consumer; training
work goes to a work-queue stream shared by all trainer workers. Every handler must be idempotent:
redelivery is normal.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.msg import Msg
from nats.js import api
from opentelemetry import propagate

from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.core import subjects

log = logging.getLogger(__name__)

Handler = Callable[[str, Any, Msg], Awaitable[None]]


class PermanentError(Exception):
    """A message that can never be handled (bad payload): terminated, not retried."""


def new_event_id() -> str:
    return uuid.uuid4().hex


def decode(msg: Msg) -> Message:
    message_type = subjects.MESSAGE_TYPES.get(msg.subject)
    if message_type is None:
        raise PermanentError(f"no message type for subject {msg.subject}")
    try:
        return message_type.FromString(msg.data)
    except Exception as exc:  # protobuf DecodeError
        raise PermanentError(f"undecodable payload on {msg.subject}: {exc}") from exc


class Bus:
    """A service's connection to NATS with JetStream."""

    def __init__(self, nc: nats.NATS, producer: str):
        self.nc = nc
        self.js = nc.jetstream()
        self.producer = producer
        self._consumers: list[Consumer] = []

    @classmethod
    async def connect(cls, url: str, producer: str, *, connect_timeout: float = 5.0) -> "Bus":
        nc = await nats.connect(
            url,
            name=f"tuneforge-{producer}",
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        bus = cls(nc, producer)
        await bus.ensure_streams()
        return bus

    async def ensure_streams(self) -> None:
        await self._ensure_stream(
            api.StreamConfig(
                name=subjects.EVENTS_STREAM,
                subjects=list(subjects.EVENT_SUBJECTS),
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=90 * 24 * 3600,
                duplicate_window=300,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=subjects.WORK_STREAM,
                subjects=list(subjects.WORK_SUBJECTS),
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                duplicate_window=300,
            )
        )

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            info = await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
                return
            except nats.js.errors.BadRequestError:
                info = await self.js.stream_info(config.name)  # created by a concurrent service
        if sorted(info.config.subjects or []) != sorted(config.subjects or []):
            await self.js.update_stream(config)

    def meta(self, workspace_id: str, job_id: str = "") -> ev.EventMeta:
        now = Timestamp()
        now.GetCurrentTime()
        return ev.EventMeta(
            event_id=new_event_id(),
            workspace_id=workspace_id,
            job_id=job_id,
            occurred_at=now,
            producer=self.producer,
        )

    async def publish(self, subject: str, message: Message, *, timeout: float = 10.0) -> api.PubAck:
        expected = subjects.MESSAGE_TYPES[subject]
        if not isinstance(message, expected):
            raise TypeError(f"{subject} carries {expected.__name__}, not {type(message).__name__}")
        meta = message.meta  # type: ignore[attr-defined]
        if not meta.event_id:
            raise ValueError("event has no meta.event_id")
        headers: dict[str, str] = {"Nats-Msg-Id": meta.event_id}
        propagate.inject(headers)
        return await self.js.publish(subject, message.SerializeToString(), timeout=timeout, headers=headers)

    async def consume(
        self,
        durable: str,
        filter_subjects: Sequence[str],
        handler: Handler,
        *,
        stream: str = subjects.EVENTS_STREAM,
        max_deliver: int = 20,
        ack_wait: float = 30.0,
    ) -> "Consumer":
        """Start a durable pull consumer that calls ``handler(subject, message, msg)`` per event."""
        config = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subjects=list(filter_subjects),
            max_deliver=max_deliver,
            ack_wait=ack_wait,
        )
        await self.js.add_consumer(stream, config)
        psub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
        consumer = Consumer(durable, psub, handler)
        consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def close(self) -> None:
        for consumer in self._consumers:
            await consumer.stop()
        self._consumers.clear()
        if not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=5)
            except (asyncio.TimeoutError, nats.errors.Error):
                await self.nc.close()


class Consumer:
    """A running fetch → handle → ack loop over one durable consumer."""

    def __init__(self, durable: str, psub: Any, handler: Handler, batch: int = 16):
        self.durable = durable
        self.psub = psub
        self.handler = handler
        self.batch = batch
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._handling = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.durable}")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await self.psub.fetch(self.batch, timeout=1.0)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return
            except Exception:  # reconnecting, etc.
                log.exception("fetch failed on %s", self.durable)
                await asyncio.sleep(0.5)
                continue
            self._handling = True
            try:
                for msg in msgs:
                    await self._handle(msg)
            finally:
                self._handling = False

    async def _handle(self, msg: Msg) -> None:
        try:
            message = decode(msg)
            await self.handler(msg.subject, message, msg)
        except PermanentError:
            log.exception("terminating poison message on %s", msg.subject)
            await msg.term()
        except Exception:
            delivered = msg.metadata.num_delivered if msg.metadata else 1
            delay = min(30.0, 0.5 * 2 ** (delivered - 1))
            log.exception("handler failed on %s (delivery %s); retrying in %.1fs", msg.subject, delivered, delay)
            await msg.nak(delay=delay)
        else:
            await msg.ack()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task:
            if not self._handling:
                self._task.cancel()  # idle in fetch: nothing is lost
            try:
                await asyncio.wait_for(self._task, timeout=10)  # let a handler finish its message
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
        try:
            await self.psub.unsubscribe()
        except Exception:
            pass
