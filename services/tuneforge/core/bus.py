"""The NATS JetStream bus: streams, protobuf events with ``Nats-Msg-Id``, durable consumers.

Facts go to the events stream, which every service reads with its own durable consumer; training
work goes to a work-queue stream shared by all trainer workers. Every handler must be idempotent:
redelivery is normal.
"""

from __future__ import annotations

import asyncio
import dataclasses
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

from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.core import subjects, telemetry

log = logging.getLogger(__name__)

Handler = Callable[[str, Any, Msg], Awaitable[None]]


DeadLetterHook = Callable[[str, Any, str], Awaitable[None]]

DEAD_LETTER_STREAM = "TUNEFORGE_DEAD_LETTERS"
DEAD_LETTER_PREFIX = "tuneforge.deadletter"  # + ".<durable>"; never overlaps the event subjects


class PermanentError(Exception):
    """A message that can never be handled (bad payload): dead-lettered at once, not retried."""


@dataclasses.dataclass(frozen=True)
class RedeliveryPolicy:
    """The one bounded-redelivery rule of every event consumer: a failing handler is retried with
    exponential back-off (``nak(delay)``) and, when it fails on delivery ``max_deliver``, the event
    is dead-lettered (error log, the service's ``on_dead_letter`` hook, a record on the dead-letter
    stream) and terminated, never silently dropped."""

    max_deliver: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    ack_wait: float = 30.0  # an event held by a process that died is redelivered after this long

    def __post_init__(self) -> None:
        if self.max_deliver < 1:
            raise ValueError("max_deliver must be at least 1")
        if self.backoff_base < 0 or self.backoff_max < self.backoff_base:
            raise ValueError("need 0 <= backoff_base <= backoff_max")
        if self.ack_wait <= 0:
            raise ValueError("ack_wait must be positive")

    def delay(self, delivered: int) -> float:
        """Seconds before delivery ``delivered + 1``."""
        return min(self.backoff_max, self.backoff_base * 2 ** max(0, delivered - 1))

    @property
    def server_max_deliver(self) -> int:
        """JetStream's own bound, above ours: a dead-lettering that failed (NATS or the database
        away at that moment) is tried again rather than dropped by the server."""
        return self.max_deliver + 10

    @classmethod
    def from_settings(cls, settings: Any) -> "RedeliveryPolicy":
        return cls(
            max_deliver=settings.event_max_deliver,
            backoff_base=settings.event_retry_base_seconds,
            backoff_max=settings.event_retry_max_seconds,
            ack_wait=settings.event_ack_wait_seconds,
        )


async def _connection_error(exc: Exception) -> None:
    """One line per connection error (nats-py's default logs a traceback for every failed
    reconnect while the server is away)."""
    log.warning("NATS connection: %s: %s", type(exc).__name__, exc)


async def _disconnected() -> None:
    log.warning("disconnected from NATS; reconnecting")


async def _reconnected() -> None:
    log.warning("reconnected to NATS")


def new_event_id() -> str:
    return uuid.uuid4().hex


def derived_event_id(cause_event_id: str, subject: str) -> str:
    """The id of the one event ``subject`` that handling ``cause_event_id`` produces: handling a
    redelivered event again yields the same ``Nats-Msg-Id``, which JetStream deduplicates."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"tuneforge:{cause_event_id}:{subject}").hex


def decode(msg: Msg) -> Message:
    message_type = subjects.message_type(msg.subject)  # a pool's work subject included
    if message_type is None:
        raise PermanentError(f"no message type for subject {msg.subject}")
    try:
        return message_type.FromString(msg.data)
    except Exception as exc:  # protobuf DecodeError
        raise PermanentError(f"undecodable payload on {msg.subject}: {exc}") from exc


class Bus:
    """A service's connection to NATS with JetStream."""

    def __init__(self, nc: nats.NATS, producer: str, redelivery: RedeliveryPolicy | None = None,
                 stream_replicas: int = 1):
        self.nc = nc
        self.stream_replicas = stream_replicas
        self.js = nc.jetstream()
        self.producer = producer
        self.redelivery = redelivery or RedeliveryPolicy()
        self._consumers: list[Consumer] = []

    @classmethod
    async def connect(
        cls, url: str, producer: str, *, connect_timeout: float = 5.0, redelivery: RedeliveryPolicy | None = None,
        stream_replicas: int = 1,
    ) -> "Bus":
        """Connect and make sure tuneforge's streams exist with ``stream_replicas`` replicas
        (``TUNEFORGE_NATS_STREAM_REPLICAS``: 3 on a 3-node cluster)."""
        nc = await nats.connect(
            # A NATS cluster: TUNEFORGE_NATS_URL may list its nodes, comma-separated (nats-py takes
            # a list; one string would seed one node only).
            servers=[u.strip() for u in url.split(",") if u.strip()],
            name=f"tuneforge-{producer}",
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=_connection_error,
            disconnected_cb=_disconnected,
            reconnected_cb=_reconnected,
        )
        bus = cls(nc, producer, redelivery, stream_replicas)
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
                num_replicas=self.stream_replicas,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=subjects.WORK_STREAM,
                subjects=list(subjects.WORK_SUBJECTS),
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                duplicate_window=300,
                num_replicas=self.stream_replicas,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=DEAD_LETTER_STREAM,
                subjects=[f"{DEAD_LETTER_PREFIX}.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=30 * 24 * 3600,
                duplicate_window=300,
                num_replicas=self.stream_replicas,
            )
        )

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            info = await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
                return
            except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as exc:
                try:
                    info = await self.js.stream_info(config.name)  # created by a concurrent service
                except nats.js.errors.NotFoundError:
                    raise RuntimeError(
                        f"JetStream stream {config.name} cannot be created with {config.num_replicas} replica(s): "
                        f"{exc} (TUNEFORGE_NATS_STREAM_REPLICAS must not exceed the NATS cluster's nodes)") from exc
        if (sorted(info.config.subjects or []) != sorted(config.subjects or [])
                or (info.config.num_replicas or 1) != (config.num_replicas or 1)):
            try:
                await self.js.update_stream(config)
            except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as exc:  # e.g. 3 replicas asked of a single server
                raise RuntimeError(
                    f"JetStream stream {config.name} cannot be given {config.num_replicas} replica(s) / subjects "
                    f"{config.subjects}: {exc} (TUNEFORGE_NATS_STREAM_REPLICAS must not exceed the NATS cluster's "
                    "nodes)") from exc

    def meta(self, workspace_id: str, job_id: str = "", *, event_id: str = "") -> ev.EventMeta:
        """A new event's envelope; ``event_id`` (see ``derived_event_id``) for an event that must
        be published at most once per cause."""
        now = Timestamp()
        now.GetCurrentTime()
        return ev.EventMeta(
            event_id=event_id or new_event_id(),
            workspace_id=workspace_id,
            job_id=job_id,
            occurred_at=now,
            producer=self.producer,
        )

    async def publish(self, subject: str, message: Message, *, timeout: float = 10.0) -> api.PubAck:
        expected = subjects.message_type(subject)
        if expected is None:
            raise KeyError(f"no message type for subject {subject}")
        if not isinstance(message, expected):
            raise TypeError(f"{subject} carries {expected.__name__}, not {type(message).__name__}")
        meta = message.meta  # type: ignore[attr-defined]
        if not meta.event_id:
            raise ValueError("event has no meta.event_id")
        headers: dict[str, str] = {"Nats-Msg-Id": meta.event_id}
        with telemetry.producer_span(subject, meta, headers):  # the trace context goes in the headers
            return await self.js.publish(subject, message.SerializeToString(), timeout=timeout, headers=headers)

    async def consume(
        self,
        durable: str,
        filter_subjects: Sequence[str],
        handler: Handler,
        *,
        stream: str = subjects.EVENTS_STREAM,
        on_dead_letter: DeadLetterHook | None = None,
        deliver_policy: api.DeliverPolicy = api.DeliverPolicy.ALL,
    ) -> "Consumer":
        """Start a durable pull consumer that calls ``handler(subject, message, msg)`` per event,
        under the bus's ``RedeliveryPolicy``. ``on_dead_letter(subject, message, error)`` runs when
        an event is given up (e.g. to fail its job); ``message`` is None when it was undecodable."""
        config = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=deliver_policy,
            filter_subjects=list(filter_subjects),
            max_deliver=self.redelivery.server_max_deliver,
            ack_wait=self.redelivery.ack_wait,
        )
        await self.js.add_consumer(stream, config)  # creates, or updates an existing durable's bound
        psub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
        consumer = Consumer(durable, psub, handler, bus=self, policy=self.redelivery, on_dead_letter=on_dead_letter)
        consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def dead_letter(self, durable: str, msg: Msg, event_id: str, error: str) -> None:
        """Keep a given-up message on the dead-letter stream: the original payload, and headers
        saying where it came from and why it was given up."""
        seq = msg.metadata.sequence.stream if msg.metadata else 0
        delivered = msg.metadata.num_delivered if msg.metadata else 0
        headers = {
            "Nats-Msg-Id": f"{durable}:{seq}:{event_id}",
            "Tuneforge-Subject": msg.subject,
            "Tuneforge-Consumer": durable,
            "Tuneforge-Event-Id": event_id,
            "Tuneforge-Stream-Sequence": str(seq),
            "Tuneforge-Deliveries": str(delivered),
            "Tuneforge-Error": " ".join(error.split())[:1000],
        }
        await self.js.publish(f"{DEAD_LETTER_PREFIX}.{durable}", msg.data, timeout=10.0, headers=headers)

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
    """A running fetch → handle → ack loop over one durable consumer, with the bounded-redelivery
    guard: a failing handler is nak'ed with back-off; on delivery ``policy.max_deliver`` (or at
    once for a ``PermanentError``) the message is dead-lettered and terminated. While a batch is
    being handled its messages are kept in progress, so slow work is not redelivered meanwhile."""

    def __init__(
        self,
        durable: str,
        psub: Any,
        handler: Handler,
        batch: int = 16,
        *,
        bus: Bus | None = None,
        policy: RedeliveryPolicy | None = None,
        on_dead_letter: DeadLetterHook | None = None,
    ):
        self.durable = durable
        self.psub = psub
        self.handler = handler
        self.batch = batch
        self.bus = bus
        self.policy = policy or RedeliveryPolicy()
        self.on_dead_letter = on_dead_letter
        self.dead_lettered = 0
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._handling = False
        self._pending: list[Msg] = []

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
            except Exception as exc:  # reconnecting, etc.
                log.warning("fetch failed on %s: %s: %s", self.durable, type(exc).__name__, exc)
                await asyncio.sleep(0.5)
                continue
            self._handling = True
            self._pending = list(msgs)
            heartbeat = asyncio.create_task(self._keep_in_progress())
            try:
                while self._pending:
                    with telemetry.consumer_span(self._pending[0]):  # trace from the headers; log context
                        await self._handle(self._pending[0])
                    self._pending.pop(0)
            finally:
                heartbeat.cancel()
                self._pending = []
                self._handling = False

    async def _keep_in_progress(self) -> None:
        interval = max(0.2, self.policy.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            for msg in list(self._pending):
                try:
                    await msg.in_progress()
                except Exception:  # disconnected: the server redelivers later, handlers are idempotent
                    pass

    async def _handle(self, msg: Msg) -> None:
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        message = None
        try:
            message = decode(msg)
            await self.handler(msg.subject, message, msg)
        except PermanentError as exc:
            await self._give_up(msg, message, f"{type(exc).__name__}: {exc}", permanent=True)
        except Exception as exc:
            if delivered >= self.policy.max_deliver:
                await self._give_up(msg, message, f"{type(exc).__name__}: {exc}")
                return
            delay = self.policy.delay(delivered)
            log.warning(
                "handler %s failed on %s (event %s, delivery %d of %d); retrying in %.1fs",
                self.durable, msg.subject, _event_id(message), delivered, self.policy.max_deliver, delay,
                exc_info=True,
            )
            await self._settle(msg.nak(delay=delay))
        else:
            await self._settle(msg.ack())

    async def _give_up(self, msg: Msg, message: Any, error: str, *, permanent: bool = False) -> None:
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        event_id = _event_id(message)
        log.error(
            "dead letter: %s gives up %s event %s after %d deliveries%s: %s",
            self.durable, msg.subject, event_id, delivered, " (permanent error)" if permanent else "", error,
        )
        try:
            if self.on_dead_letter is not None:
                await self.on_dead_letter(msg.subject, message, error)
            if self.bus is not None:
                await self.bus.dead_letter(self.durable, msg, event_id, error)
        except Exception:
            # Not recorded: keep the message (JetStream's bound is above ours) and try again later.
            log.exception("dead-lettering %s event %s failed; retrying", msg.subject, event_id)
            await self._settle(msg.nak(delay=self.policy.backoff_max))
            return
        self.dead_lettered += 1
        await self._settle(msg.term())

    async def _settle(self, reply: Awaitable[None]) -> None:
        """ack/nak/term: when the connection is away the reply is lost and the server redelivers
        after ``ack_wait``, which idempotent handlers absorb."""
        try:
            await reply
        except Exception as exc:
            log.warning("%s could not acknowledge a message: %s", self.durable, exc)

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


def _event_id(message: Any) -> str:
    meta = getattr(message, "meta", None)
    return getattr(meta, "event_id", "") or "?"
