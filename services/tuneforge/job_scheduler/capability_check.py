"""Does the job's data suit its base model? The job-scheduler asks the dataset-builder, which owns
the examples, with SummarizeExamples (synchronous gRPC, a short deadline, the caller's own API key)
and words the answer with ``core.capabilities``.

This check is the early one, for ValidateJob and CreateJob. The authoritative one runs when the
dataset-builder builds the job's dataset (the data may change in between); so when the
dataset-builder cannot be asked, the request goes on with a warning instead of failing.
"""

from __future__ import annotations

import dataclasses
import logging

import grpc

from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2_grpc as dsb_grpc
from tuneforge.core import capabilities
from tuneforge.core.client import channel
from tuneforge.core.settings import Settings
from tuneforge.training import BaseModelSpec

log = logging.getLogger(__name__)
DEADLINE_SECONDS = 5.0


@dataclasses.dataclass
class Findings:
    violation: str | None = None  # for spec.base_model: the job would train on data the model cannot take
    warnings: list[str] = dataclasses.field(default_factory=list)


class DatasetBuilderLine:
    """A channel to the dataset-builder at ``settings.host:settings.dataset_builder_port``, opened
    at the first call (in the serving event loop) and reused."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub: dsb_grpc.DatasetBuilderServiceStub | None = None

    def stub(self) -> dsb_grpc.DatasetBuilderServiceStub:
        if self._stub is None:
            target = f"{self.settings.host}:{self.settings.dataset_builder_port}"
            self._channel = channel(target, token=None, timeout=DEADLINE_SECONDS)
            self._stub = dsb_grpc.DatasetBuilderServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


def caller_authorization(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    """The caller's ``authorization`` metadata, to ask another service on the caller's behalf."""
    return [(k, v) for k, v in (context.invocation_metadata() or ()) if k == "authorization"]


async def check(line: DatasetBuilderLine, base: BaseModelSpec, topics: list[str], dataset_kind: str,
                catalog: dict[str, tuple[str, ...]], *, trains: bool,
                metadata: list[tuple[str, str]]) -> Findings:
    """What the job's examples (``topics``, ``dataset_kind``) need that ``base`` lacks. A job that
    trains gets a violation; a dataset-only job a warning (its dataset is built anyway)."""
    if set(capabilities.CHECKED) <= set(base.capabilities):
        return Findings()  # it takes any data: nothing to ask
    try:
        reply = await line.stub().SummarizeExamples(
            dsb.SummarizeExamplesRequest(topics=topics, dataset_kind=dataset_kind),
            metadata=metadata, timeout=DEADLINE_SECONDS)
    except grpc.aio.AioRpcError as exc:
        log.warning("SummarizeExamples failed (%s: %s); the capability check waits for the dataset build",
                    exc.code().name, exc.details())
        return Findings(warnings=[
            f"the dataset-builder could not be asked about the data ({exc.code().name}): whether {base.id} can "
            f"take it (tool calls need {capabilities.TOOL_CALLING}, reasoning traces need "
            f"{capabilities.REASONING}) is checked when the dataset is built"])
    data = capabilities.DataNeeds(reply.example_count, reply.tool_call_example_count, reply.reasoning_example_count)
    message = capabilities.refusal(base.id, base.capabilities, data, catalog)
    if message is None:
        return Findings()
    if trains:
        return Findings(violation=message)
    return Findings(warnings=[f"{message} This plan builds the dataset only, so the dataset is built anyway; "
                              f"fine-tuning {base.id} on it would be refused."])
