"""notifier: turns job.succeeded / failed / cancelled events into emails to the job's owner,
through SMTP when configured and otherwise as .eml files in an outbox directory.

A job's email has a text part (rendered and stored when the delivery is recorded) and an HTML part
with the run's loss plot inline, rendered when it is sent from the stored event: the plot is read
from the artifact store then (``report_path``), and one that cannot be read leaves the email
without a picture, never unsent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import uuid

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.notifier.v1 import notifier_service_pb2 as pb
from tuneforge.api.notifier.v1 import notifier_service_pb2_grpc as pb_grpc
from tuneforge.core import subjects
from tuneforge.core.db import utcnow
from tuneforge.core.grpc_server import current_workspace
from tuneforge.core.rpc import Page, timestamp
from tuneforge.core import validation as val
from tuneforge.core.service import BaseService
from tuneforge.core.storage import ArtifactStore
from tuneforge.notifier import mailer, messages
from tuneforge.notifier.models import DeliveryEventRow, DeliveryRow

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NotifierService"].full_name
MAX_ATTEMPTS = 8
SEND_LEASE_MARGIN_SECONDS = 30.0  # a claimed delivery is retried this long after the SMTP timeout
MAX_PLOT_BYTES = 5 * 1024 * 1024  # a loss.png larger than this is not inlined
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Notifier(BaseService):
    name = "notifier"

    def __init__(self, settings):
        super().__init__(settings)
        self.smtp = (
            mailer.SmtpSettings(
                host=settings.smtp_host, port=settings.smtp_port, username=settings.smtp_username,
                password=settings.smtp_password, starttls=settings.smtp_starttls, use_tls=settings.smtp_use_tls,
            )
            if settings.smtp_host
            else None
        )
        self.outbox_dir = settings.resolved_outbox_dir()
        self.store = ArtifactStore(settings.resolved_artifact_url())  # the runs' loss plots
        self._wake = asyncio.Event()

    def grpc_services(self):
        return [(pb_grpc.add_NotifierServiceServicer_to_server, NotifierServicer(self), SERVICE_NAME)]

    async def on_start(self) -> None:
        await self.bus.consume(
            "notifier", [subjects.JOB_SUCCEEDED, subjects.JOB_FAILED, subjects.JOB_CANCELLED], self.on_job_event
        )
        self.spawn(self._retry_loop(), "notifier-retries")

    async def on_job_event(self, subject: str, event, _msg) -> None:
        if subject == subjects.JOB_SUCCEEDED:
            title, body = messages.job_succeeded(event)
        elif subject == subjects.JOB_FAILED:
            title, body = messages.job_failed(event)
        else:
            title, body = messages.job_cancelled(event)
        row = await self.record(event.meta, event.owner_email, title, body,
                                delivery_id=job_delivery_id(event.meta.job_id, subject) if event.meta.job_id else "",
                                source=(subject, event))
        if row is not None:
            await self.attempt(row.id)

    async def record(self, meta: ev.EventMeta, recipient: str, subject: str, body: str,
                     *, delivery_id: str = "", source: tuple[str, object] | None = None) -> DeliveryRow | None:
        """Store the delivery once: per event (unique event id) and, for a job's terminal state,
        once per (job, state) — ``delivery_id`` derives from them, so a second event announcing
        the same state finds the row and sends nothing new. None when it was stored already.
        ``source``: ``(subject, event)`` of a job's event, kept for the HTML part."""
        delivery_id = delivery_id or "dlv_" + uuid.uuid4().hex[:20]
        row = DeliveryRow(
            id=delivery_id, event_id=meta.event_id, workspace_id=meta.workspace_id, job_id=meta.job_id,
            recipient=recipient, subject=subject, body=body,
            message_id=f"<{delivery_id}@tuneforge>", state=pb.DELIVERY_STATE_PENDING,
        )
        try:
            async with self.db.session() as session, session.begin():
                session.add(row)
                if source is not None:
                    session.add(DeliveryEventRow(delivery_id=delivery_id, subject=source[0],
                                                 event=source[1].SerializeToString()))
        except IntegrityError:
            return None
        return row

    async def _read_plot(self, report_path: str, delivery_id: str) -> bytes | None:
        """The run's ``loss.png``, or None (logged) when it cannot be read or is no PNG."""
        key = f"{report_path}/{messages.LOSS_PLOT_FILE}"
        try:
            data = await asyncio.to_thread(self.store.get_bytes, key)
        except Exception as exc:  # missing file, storage down, a bad key: the email goes without it
            log.warning("delivery %s: the loss plot %s cannot be read (%s: %s); sending without it",
                        delivery_id, key, type(exc).__name__, exc)
            return None
        if not data.startswith(PNG_SIGNATURE) or len(data) > MAX_PLOT_BYTES:
            log.warning("delivery %s: %s is not a PNG of at most %s bytes; sending without it",
                        delivery_id, key, MAX_PLOT_BYTES)
            return None
        return data

    async def _html_part(self, delivery_id: str) -> tuple[str | None, list[mailer.InlineImage]]:
        """The HTML part of a job's email and its inline plot; ``(None, [])`` for a message
        without one (a test notification) or when it cannot be rendered (logged: text only)."""
        async with self.db.session() as session:
            source = await session.get(DeliveryEventRow, delivery_id)
        if source is None:
            return None, []
        try:
            event = subjects.MESSAGE_TYPES[source.subject].FromString(source.event)
            report_path = messages.report_path(event)
            plot = await self._read_plot(report_path, delivery_id) if report_path else None
            cid = f"loss.{delivery_id}@tuneforge" if plot else None
            render = {subjects.JOB_SUCCEEDED: messages.job_succeeded_html, subjects.JOB_FAILED: messages.job_failed_html,
                      subjects.JOB_CANCELLED: messages.job_cancelled_html}[source.subject]
            images = [mailer.InlineImage(cid, plot, "png", messages.LOSS_PLOT_FILE)] if plot else []
            return render(event, cid), images
        except Exception:
            log.warning("delivery %s: the HTML part cannot be rendered; sending the text only", delivery_id,
                        exc_info=True)
            return None, []

    async def _claim(self, delivery_id: str) -> bool:
        """Take a pending, due delivery for one sending attempt: its next attempt moves a lease
        ahead, so the retry loop and the event handler never send the same message at once."""
        now = utcnow()
        lease = dt.timedelta(seconds=(self.smtp.timeout if self.smtp else 30.0) + SEND_LEASE_MARGIN_SECONDS)
        async with self.db.session() as session, session.begin():
            result = await session.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id == delivery_id, DeliveryRow.state == pb.DELIVERY_STATE_PENDING,
                       DeliveryRow.next_attempt_at <= now)
                .values(next_attempt_at=now + lease)
            )
        return result.rowcount == 1

    async def attempt(self, delivery_id: str) -> DeliveryRow:
        """One sending attempt. Delivery is at-least-once with a stable Message-ID: a process
        killed after the SMTP server took the message but before the result was stored sends
        it again once the claim's lease runs out, with the same ``Message-ID`` (derived from the
        job and its state), by which mail systems and readers recognise the repeat."""
        if not await self._claim(delivery_id):
            async with self.db.session() as session:
                return await session.get(DeliveryRow, delivery_id)
        async with self.db.session() as session:
            row = await session.get(DeliveryRow, delivery_id)
        html, images = await self._html_part(delivery_id)
        message = mailer.compose(
            sender=self.settings.mail_from, to=row.recipient, subject=row.subject, text=row.body,
            html=html, images=images, message_id=row.message_id,
            headers={"X-Tuneforge-Job": row.job_id} if row.job_id else None,
        )
        error = ""
        destination = ""
        try:
            destination = await mailer.deliver(message, smtp=self.smtp, outbox_dir=self.outbox_dir)
        except Exception as exc:  # MailDeliveryError, OSError writing the outbox
            error = f"{type(exc).__name__}: {exc.__cause__ or exc}"
            log.warning("delivery %s failed: %s", delivery_id, error)
        async with self.db.session() as session, session.begin():
            row = await session.get(DeliveryRow, delivery_id)
            row.attempts += 1
            if error:
                row.last_error = error
                if row.attempts >= MAX_ATTEMPTS:
                    row.state = pb.DELIVERY_STATE_FAILED
                else:
                    row.next_attempt_at = utcnow() + dt.timedelta(seconds=min(600, 5 * 2 ** row.attempts))
            else:
                row.state = pb.DELIVERY_STATE_SENT
                row.destination = destination
                row.sent_at = utcnow()
                row.last_error = ""
        return row

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                async with self.db.session() as session:
                    due = [r for (r,) in await session.execute(
                        select(DeliveryRow.id).where(
                            DeliveryRow.state == pb.DELIVERY_STATE_PENDING, DeliveryRow.next_attempt_at <= utcnow()
                        )
                    )]
                for delivery_id in due:
                    await self.attempt(delivery_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retry loop failed")


def job_delivery_id(job_id: str, subject: str) -> str:
    """The one delivery of a job's terminal state (``subject``): the same id on every event."""
    return "dlv_" + hashlib.sha256(f"{job_id}/{subject}".encode()).hexdigest()[:20]


def _to_proto(row: DeliveryRow) -> pb.Delivery:
    out = pb.Delivery(
        id=row.id, job_id=row.job_id, recipient=row.recipient, subject=row.subject, state=row.state,
        attempts=row.attempts, last_error=row.last_error, destination=row.destination, event_id=row.event_id,
        create_time=timestamp(row.created_at),
    )
    if row.sent_at:
        out.sent_time.CopyFrom(timestamp(row.sent_at))
    return out


class NotifierServicer(pb_grpc.NotifierServiceServicer):
    def __init__(self, app: Notifier):
        self.app = app

    async def ListDeliveries(self, request, context):
        ws = current_workspace()
        val.check("invalid request", lambda v: val.page(v, request),
                  lambda v: val.identifier(v, "job_id", request.job_id, required=False))
        page = Page.of(request, default=50, maximum=200)
        size, offset = page.size, page.offset
        query = select(DeliveryRow).where(DeliveryRow.workspace_id == ws.id)
        if request.job_id:
            query = query.where(DeliveryRow.job_id == request.job_id)
        async with self.app.db.session() as session:
            rows = (await session.execute(
                query.order_by(DeliveryRow.created_at.desc(), DeliveryRow.id).offset(offset).limit(size + 1)
            )).scalars().all()
        return pb.ListDeliveriesResponse(
            deliveries=[_to_proto(r) for r in rows[:size]],
            next_page_token=page.next_token(len(rows)),
        )

    async def SendTestNotification(self, request, context):
        ws = current_workspace()
        recipient = request.recipient or ws.owner_email
        val.check("invalid recipient", lambda v: val.email(v, "recipient", recipient))
        meta = self.app.bus.meta(ws.id)
        row = await self.app.record(
            meta, recipient, "tuneforge test notification",
            f"This is a test email for the workspace '{ws.name}'. Job notifications will arrive like this.\n",
        )
        row = await self.app.attempt(row.id)
        return pb.SendTestNotificationResponse(delivery=_to_proto(row))
