"""The notifier's mailer: compose, send through a real SMTP server, or write to the outbox."""

from __future__ import annotations

import email
import email.policy
import email.utils
from pathlib import Path

import pytest

from tuneforge.core.nats_server import free_port
from tuneforge.notifier.mailer import InlineImage, MailDeliveryError, SmtpSettings, compose, deliver

SENDER = "Tuneforge <noreply@tuneforge.example>"
TO = "ada@example.com"


def _message(**overrides):
    fields = dict(sender=SENDER, to=TO, subject="Job ft-42 succeeded",
                  text="Your fine-tuning job ft-42 finished.\nModel: acme/llama-ft-42\n")
    fields.update(overrides)
    return compose(**fields)


def test_compose_sets_the_standard_headers() -> None:
    message = _message(headers={"X-Tuneforge-Job": "ft-42"})
    assert message["From"] == SENDER
    assert message["To"] == TO
    assert message["Subject"] == "Job ft-42 succeeded"
    assert message["X-Tuneforge-Job"] == "ft-42"
    assert email.utils.parsedate_to_datetime(message["Date"]).tzinfo is not None
    assert message["Message-ID"].startswith("<") and message["Message-ID"].endswith("@tuneforge.example>")
    assert message.get_content() == "Your fine-tuning job ft-42 finished.\nModel: acme/llama-ft-42\n"


def test_compose_keeps_a_given_message_id_and_refuses_header_injection() -> None:
    assert _message(message_id="<ft-42.succeeded@tuneforge>")["Message-ID"] == "<ft-42.succeeded@tuneforge>"
    assert _message(message_id="ft-42.succeeded@tuneforge")["Message-ID"] == "<ft-42.succeeded@tuneforge>"
    with pytest.raises(ValueError):
        _message(subject="hi\nBcc: victim@example.com")


def test_smtp_settings_validation() -> None:
    assert SmtpSettings("mail.example").url == "smtp://mail.example:25"
    assert "hunter2" not in repr(SmtpSettings("mail.example", username="u", password="hunter2"))
    with pytest.raises(ValueError):
        SmtpSettings("mail.example", starttls=True, use_tls=True)


@pytest.mark.integration
async def test_deliver_through_smtp(smtp_server, tmp_path: Path) -> None:
    message = _message(message_id="<ft-42.succeeded@tuneforge>")
    smtp = SmtpSettings(host=smtp_server.host, port=smtp_server.port, timeout=5)
    where = await deliver(message, smtp=smtp, outbox_dir=tmp_path / "outbox")
    assert where == f"smtp://{smtp_server.host}:{smtp_server.port}"
    assert not (tmp_path / "outbox").exists()  # SMTP mode writes nothing locally

    [received] = smtp_server.messages
    assert received["Subject"] == "Job ft-42 succeeded"
    assert received["To"] == TO
    assert received["Message-ID"] == "<ft-42.succeeded@tuneforge>"
    assert received.get_content().replace("\r\n", "\n") == message.get_content()
    [envelope] = smtp_server.envelopes
    assert envelope.mail_from == "noreply@tuneforge.example"
    assert envelope.rcpt_tos == [TO]


async def test_deliver_to_outbox_writes_a_parseable_eml(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    message = _message(message_id="<ft-42/succeeded$ok@tuneforge>")
    where = Path(await deliver(message, smtp=None, outbox_dir=outbox))
    assert where.parent == outbox and where.suffix == ".eml"
    assert where.name.endswith("-ft-42_succeeded_ok@tuneforge.eml")  # file-name safe
    assert [p.name for p in outbox.iterdir()] == [where.name]  # no temporary file left behind

    parsed = email.message_from_bytes(where.read_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Job ft-42 succeeded"
    assert parsed["To"] == TO
    assert parsed["Message-ID"] == "<ft-42/succeeded$ok@tuneforge>"
    assert parsed.get_content() == message.get_content()

    second = Path(await deliver(_message(), smtp=None, outbox_dir=outbox))
    assert second != where and sorted(p.name for p in outbox.iterdir()) == sorted([where.name, second.name])


async def test_smtp_failure_raises_mail_delivery_error(tmp_path: Path) -> None:
    smtp = SmtpSettings(host="127.0.0.1", port=free_port(), timeout=5)  # nothing listens there
    with pytest.raises(MailDeliveryError, match="smtp://127.0.0.1") as info:
        await deliver(_message(), smtp=smtp, outbox_dir=tmp_path)
    assert info.value.__cause__ is not None
    assert isinstance(info.value.__cause__, OSError)  # aiosmtplib's SMTPConnectError is a ConnectionError
    assert list(tmp_path.iterdir()) == []  # no silent fallback to the outbox


def test_compose_with_html_and_an_inline_image_is_multipart_alternative(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    image = InlineImage("loss.dlv_1@tuneforge", png, "png", "loss.png")
    message = _message(html='<p>Loss:</p><img src="cid:loss.dlv_1@tuneforge">', images=[image])
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert [p.get_content_type() for p in parsed.walk()] == [
        "multipart/alternative", "text/plain", "multipart/related", "text/html", "image/png"]
    # plain-text readers get the text part alone; HTML readers the page and its picture
    assert parsed.get_body(("plain",)).get_content() == "Your fine-tuning job ft-42 finished.\nModel: acme/llama-ft-42\n"
    assert parsed.get_body(("html",)).get_content().startswith("<p>Loss:</p>")
    picture = next(p for p in parsed.walk() if p.get_content_type() == "image/png")
    assert picture["Content-ID"] == "<loss.dlv_1@tuneforge>" and picture.get_content_disposition() == "inline"
    assert picture.get_content() == png

    with pytest.raises(ValueError, match="need an HTML part"):
        _message(images=[image])
    for bad in ("", "no-at-sign", "a b@c", "<x@y>"):
        with pytest.raises(ValueError, match="Content-ID"):
            InlineImage(bad, png)
