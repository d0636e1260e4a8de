"""Composing and delivering the notifier's email.

`compose` makes a plain-text message, or, given HTML, a `multipart/alternative` one (the text part
first, for plain-text readers) whose HTML part is `multipart/related` with its inline images, each
referenced from the HTML as `<img src="cid:...">`.

`deliver` sends through SMTP when settings are given, and otherwise drops an `.eml` file into an
outbox directory (development, tests, air-gapped installs): same message, no mail server needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.policy
import email.utils
import os
import re
import tempfile
from datetime import datetime, timezone
from email.message import EmailMessage
from collections.abc import Sequence
from pathlib import Path

import aiosmtplib

_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9._@+-]+")
_MAX_ID_IN_FILENAME = 120


class MailDeliveryError(Exception):
    """The message could not be handed to the SMTP server (the original error is `__cause__`)."""


@dataclasses.dataclass(frozen=True)
class InlineImage:
    """An image shown inside the HTML part: ``<img src="cid:{cid}">``."""

    cid: str  # Content-ID without the angle brackets, unique in the message (e.g. "loss.<id>@tuneforge")
    data: bytes
    subtype: str = "png"  # image/<subtype>
    filename: str = ""

    def __post_init__(self) -> None:
        if not self.cid or any(c in self.cid for c in "<>\r\n \t\"") or "@" not in self.cid:
            raise ValueError(f"Content-ID {self.cid!r}: expected left@right without spaces or brackets")


@dataclasses.dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int = 25
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    starttls: bool = False
    use_tls: bool = False
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.starttls and self.use_tls:
            raise ValueError("starttls and use_tls are exclusive: STARTTLS upgrades a plain connection")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"


def compose(
    *,
    sender: str,
    to: str,
    subject: str,
    text: str,
    html: str | None = None,
    images: Sequence[InlineImage] = (),
    message_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    """A message with From, To, Subject, Date and Message-ID set: plain text, or with `html` the
    text and the HTML as alternatives, `images` inline in the HTML (`multipart/related`).

    `headers` adds or replaces headers (e.g. `{"X-Tuneforge-Job": job_id}`). Header values with line
    breaks are refused by the email package, so user text cannot inject headers.
    """
    if images and html is None:
        raise ValueError("inline images need an HTML part to show them")
    message = EmailMessage(policy=email.policy.default)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = email.utils.format_datetime(datetime.now(timezone.utc))
    message["Message-ID"] = _normalise_message_id(message_id) if message_id else _new_message_id(sender)
    for name, value in (headers or {}).items():
        del message[name]
        message[name] = value
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
        html_part = message.get_payload()[-1]
        for image in images:
            html_part.add_related(image.data, maintype="image", subtype=image.subtype, cid=f"<{image.cid}>",
                                  disposition="inline", filename=image.filename or None)
    return message


async def deliver(message: EmailMessage, *, smtp: SmtpSettings | None, outbox_dir: Path) -> str:
    """Send `message`; returns where it went: `smtp://host:port` or the path of the `.eml` written."""
    if smtp is None:
        return str(await asyncio.to_thread(_write_outbox, message, Path(outbox_dir)))
    try:
        refused, _ = await aiosmtplib.send(
            message,
            hostname=smtp.host,
            port=smtp.port,
            username=smtp.username,
            password=smtp.password,
            start_tls=smtp.starttls,
            use_tls=smtp.use_tls,
            timeout=smtp.timeout,
        )
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise MailDeliveryError(f"sending {message['Message-ID']} via {smtp.url} failed: {exc}") from exc
    if refused:
        details = ", ".join(f"{rcpt}: {resp.code} {resp.message}" for rcpt, resp in refused.items())
        raise MailDeliveryError(f"{smtp.url} refused recipients of {message['Message-ID']}: {details}")
    return smtp.url


def outbox_filename(message: EmailMessage, now: datetime | None = None) -> str:
    """`<UTC timestamp>-<message id, file-name safe>.eml`; sorts by time of delivery."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S%fZ")
    raw_id = str(message.get("Message-ID", "")).strip().strip("<>")
    safe_id = _UNSAFE_FILENAME_CHARS.sub("_", raw_id).strip("._")[:_MAX_ID_IN_FILENAME] or "message"
    return f"{stamp}-{safe_id}.eml"


def _write_outbox(message: EmailMessage, outbox_dir: Path) -> Path:
    outbox_dir.mkdir(parents=True, exist_ok=True)
    target = outbox_dir / outbox_filename(message)
    # Write next to the target, then rename: a reader of the outbox never sees half a message.
    fd, tmp_name = tempfile.mkstemp(dir=outbox_dir, prefix=".", suffix=".eml.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(message.as_bytes(policy=email.policy.default))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return target


def _new_message_id(sender: str) -> str:
    # An explicit domain: make_msgid() without one calls socket.getfqdn(), which can block on DNS.
    _, address = email.utils.parseaddr(sender)
    domain = address.rpartition("@")[2] or "tuneforge.local"
    return email.utils.make_msgid(domain=domain)


def _normalise_message_id(message_id: str) -> str:
    message_id = message_id.strip()
    return message_id if message_id.startswith("<") else f"<{message_id}>"
