"""gRPC errors with rich details (google.rpc.BadRequest field violations)."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


MAX_MESSAGE = 2000  # characters of a status message
MAX_VIOLATIONS = 50  # field violations sent back
ERROR_DOMAIN = "tuneforge.dev"  # google.rpc.ErrorInfo domain of our reasons
PLAN_REQUIRED = "PLAN_REQUIRED"  # the workspace's plan does not include the feature (Enterprise)
MODEL_IN_USE = "MODEL_IN_USE"  # the model is assigned to an agent
AGENT_HAS_MODEL = "AGENT_HAS_MODEL"  # the agent already uses another model


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ServiceError(Exception):
    """Raised inside a servicer; the server turns it into a gRPC status with details."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: Iterable[tuple[str, str]] = (),
                 reason: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = list(violations)
        self.reason = reason  # google.rpc.ErrorInfo reason, e.g. "PLAN_REQUIRED": what a client branches on

    def to_status(self) -> grpc.Status:
        """The status, bounded: the message and details travel in HTTP/2 trailers, where a
        message quoting a multi-megabyte request field would break the call itself."""
        status = status_pb2.Status(code=self.code.value[0], message=_clip(self.message, MAX_MESSAGE))
        if self.violations:
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=_clip(f, 200), description=_clip(d, 500))
                        for f, d in self.violations[:MAX_VIOLATIONS]
                    ]
                )
            )
            status.details.append(detail)
        if self.reason:
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN))
            status.details.append(detail)
        return rpc_status.to_status(status)


def bad_request(message: str, violations: Iterable[tuple[str, str]]) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, violations)


def not_found(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"{what} not found")


def failed_precondition(message: str, reason: str = "") -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message, reason=reason)


def plan_required(message: str) -> ServiceError:
    """FAILED_PRECONDITION with ErrorInfo reason PLAN_REQUIRED (a client raises ``PlanRequired``)."""
    return failed_precondition(message, PLAN_REQUIRED)


def field_violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> list[tuple[str, str]]:
    """Client side: the BadRequest field violations of an error, if any."""
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    out: list[tuple[str, str]] = []
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            info = error_details_pb2.BadRequest()
            detail.Unpack(info)
            out.extend((v.field, v.description) for v in info.field_violations)
    return out


def error_reason(error: grpc.aio.AioRpcError | grpc.RpcError) -> str:
    """Client side: the google.rpc.ErrorInfo reason of an error ("" when none)."""
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""
