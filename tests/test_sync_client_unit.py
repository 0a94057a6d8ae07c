"""The blocking client against a scripted channel (grpc_testing): retries, RetryInfo, the error
table and the watch cursor, deterministically. The client runs in a thread and the test plays
the server: it takes each RPC the client makes and answers it. The statuses with details are
made by the server's own status table (api/status.py), so these are the details it sends.
The same client against a real server: tests/test_sync_client.py."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
import grpc_testing
import pytest

from chatsession.v1 import session_pb2
from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import (
    AfterSeqAheadError,
    AfterSeqTrimmedError,
    AlreadyCompactedError,
    AlreadyExistsError,
    AtSeqBeyondLastError,
    AtSeqTrimmedError,
    CallCancelledError,
    ChatSessionError,
    ContextOverBudgetError,
    ContextTooLargeError,
    FailedPreconditionError,
    InvalidArgumentError,
    LabelsFullError,
    NotFoundError,
    PoppedMessageLostError,
    QuotaViolation,
    RemovedTooLargeError,
    RequestIdReusedError,
    ResourceExhaustedError,
    ResourceInfo,
    Retry,
    SeqMismatchError,
    SummaryClearedError,
    SyncSessionClient,
    UnavailableError,
    UpToSeqAheadError,
    UpToSeqInPromptError,
    assistant,
    user,
)
from chatsession_server import errors as domain
from chatsession_server.api.status import SESSION_RESOURCE, to_grpc_status

T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["SessionService"]
TIMEOUT = 10  # a guard against a hang, not a timing assertion


class FakeTime:
    """A monotonic clock that moves only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def client(channel: Any, fake_time: FakeTime) -> SyncSessionClient:
    return SyncSessionClient(
        channel=channel,
        token="0123456789abcdef",
        retry=Retry(initial_backoff=0.1, max_backoff=1.0, deadline=10),
        sleep=fake_time.sleep,
        clock=fake_time.clock,
    )


def run(work: Callable[[], T]) -> Future[T]:
    """`work` in a thread of its own. A daemon: a test that fails while the client waits for an
    answer must not hang the suite's exit."""
    result: Future[T] = Future()

    def target() -> None:
        try:
            result.set_result(work())
        except BaseException as exc:
            result.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return result


def fail(rpc: Any, error: domain.ChatSessionError) -> None:
    """End a unary RPC the way the server ends a call that raised `error`."""
    status = to_grpc_status(error)
    rpc.terminate(None, status.trailing_metadata, status.code, status.details)


def fail_stream(rpc: Any, error: domain.ChatSessionError) -> None:
    """End a streaming RPC the way the server ends a watch that raised `error`."""
    status = to_grpc_status(error)
    rpc.terminate(status.trailing_metadata, status.code, status.details)


def take(channel: Any, name: str) -> tuple[dict[str, str], Any, Any]:
    metadata, request, rpc = channel.take_unary_unary(SERVICE.methods_by_name[name])
    return dict(metadata), request, rpc


def test_a_retried_append_keeps_its_request_id(
    client: SyncSessionClient, channel: Any, fake_time: FakeTime
) -> None:
    answer = run(lambda: client.append("s1", [user("hi", tokens=2)]))
    metadata, first, rpc = take(channel, "AppendMessages")
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    _, second, rpc = take(channel, "AppendMessages")
    rpc.terminate(pb.AppendMessagesResponse(replayed=True), (), grpc.StatusCode.OK, "")
    assert answer.result(TIMEOUT).replayed
    assert first.request_id
    assert second == first  # the same request_id, the same messages
    assert metadata["authorization"] == "Bearer 0123456789abcdef"
    assert len(fake_time.sleeps) == 1
    assert 0 <= fake_time.sleeps[0] <= 0.1  # jitter within the first backoff


def test_a_retried_create_keeps_its_request_id(client: SyncSessionClient, channel: Any) -> None:
    answer = run(lambda: client.create_session("alice", title="t"))
    _, first, rpc = take(channel, "CreateSession")
    rpc.terminate(None, (), grpc.StatusCode.DEADLINE_EXCEEDED, "Valkey slow")
    _, second, rpc = take(channel, "CreateSession")
    created = session_pb2.Session(session_id="abc", user_id="alice")
    rpc.terminate(pb.CreateSessionResponse(session=created), (), grpc.StatusCode.OK, "")
    assert answer.result(TIMEOUT) == created
    assert first.request_id
    assert second.request_id == first.request_id


def test_a_retry_waits_as_long_as_the_servers_retry_info_asks(
    client: SyncSessionClient, channel: Any, fake_time: FakeTime
) -> None:
    answer = run(lambda: client.get_session("s1"))
    _, _, rpc = take(channel, "GetSession")
    fail(rpc, domain.StoreUnavailable("Valkey is not answering"))  # RetryInfo: 200 ms
    _, _, rpc = take(channel, "GetSession")
    rpc.terminate(
        pb.GetSessionResponse(session=session_pb2.Session(session_id="s1")), (), grpc.StatusCode.OK, ""
    )
    assert answer.result(TIMEOUT).session_id == "s1"
    # The backoff (jitter up to 0.1 s) alone would wait less: the server's delay is the floor.
    assert fake_time.sleeps == [pytest.approx(0.2)]


def test_retries_stop_at_the_deadline_with_the_last_error(channel: Any, fake_time: FakeTime) -> None:
    client = SyncSessionClient(
        channel=channel,
        retry=Retry(initial_backoff=0.1, deadline=0.5),
        sleep=fake_time.sleep,
        clock=fake_time.clock,
    )
    answer = run(lambda: client.get_session("s1"))
    for _ in range(2):  # waits 0.2 s twice; a third wait would pass the 0.5 s deadline
        _, _, rpc = take(channel, "GetSession")
        fail(rpc, domain.StoreUnavailable("Valkey is not answering"))
    _, _, rpc = take(channel, "GetSession")
    fail(rpc, domain.StoreUnavailable("Valkey is still not answering"))
    error = answer.exception(TIMEOUT)
    assert isinstance(error, UnavailableError)
    assert error.message == "Valkey is still not answering"
    assert error.retry_delay == pytest.approx(0.2)
    assert fake_time.sleeps == [pytest.approx(0.2)] * 2


def test_a_delete_retried_after_a_lost_answer_allows_a_missing_session(
    client: SyncSessionClient, channel: Any
) -> None:
    done = run(lambda: client.delete_session("s1"))
    _, first, rpc = take(channel, "DeleteSession")
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    _, second, rpc = take(channel, "DeleteSession")
    rpc.terminate(pb.DeleteSessionResponse(), (), grpc.StatusCode.OK, "")
    done.result(TIMEOUT)
    assert not first.allow_missing
    assert second.allow_missing


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            domain.PreconditionFailed("LAST_SEQ_MISMATCH", "expected_last_seq", "last seq is 3"),
            SeqMismatchError,
        ),
        (
            domain.PreconditionFailed("REQUEST_ID_REUSED", "request_id", "used for others"),
            RequestIdReusedError,
        ),
        (
            domain.PreconditionFailed("AFTER_SEQ_AHEAD", "after_seq", "beyond the last seq"),
            AfterSeqAheadError,
        ),
        (
            domain.PreconditionFailed("SOMETHING_NEW", "x", "a kind this client predates"),
            FailedPreconditionError,
        ),
    ],
)
def test_precondition_failures_are_typed_by_their_violation(
    client: SyncSessionClient,
    channel: Any,
    fake_time: FakeTime,
    error: domain.PreconditionFailed,
    expected: type[FailedPreconditionError],
) -> None:
    answer = run(lambda: client.append("s1", [user("hi")], expected_last_seq=2))
    _, _, rpc = take(channel, "AppendMessages")
    fail(rpc, error)
    raised = answer.exception(TIMEOUT)
    assert type(raised) is expected
    assert isinstance(raised, FailedPreconditionError)
    assert [(v.type, v.subject, v.description) for v in raised.precondition_violations] == [
        (error.kind, error.subject, error.description)
    ]
    assert fake_time.sleeps == []  # not retried


def context_call(client: SyncSessionClient) -> object:
    return client.get_context("s1", max_tokens=5)


def compact_call(client: SyncSessionClient) -> object:
    return client.compact_messages("s1", 3, assistant("sum", tokens=1))


def fork_call(client: SyncSessionClient) -> object:
    return client.fork_session("s1", at_seq=3)


def truncate_call(client: SyncSessionClient) -> object:
    return client.truncate_messages("s1", 3, return_removed=True)


@pytest.mark.parametrize(
    ("call", "rpc_name", "kind", "subject", "expected"),
    [
        (context_call, "GetContext", "CONTEXT_OVER_BUDGET", "max_tokens", ContextOverBudgetError),
        (context_call, "GetContext", "CONTEXT_TOO_LARGE", "session_id", ContextTooLargeError),
        (compact_call, "CompactMessages", "UP_TO_SEQ_AHEAD", "up_to_seq", UpToSeqAheadError),
        (compact_call, "CompactMessages", "UP_TO_SEQ_IN_PROMPT", "up_to_seq", UpToSeqInPromptError),
        (compact_call, "CompactMessages", "ALREADY_COMPACTED", "up_to_seq", AlreadyCompactedError),
        (compact_call, "CompactMessages", "SUMMARY_CLEARED", "request_id", SummaryClearedError),
        (fork_call, "ForkSession", "AT_SEQ_BEYOND_LAST", "at_seq", AtSeqBeyondLastError),
        (fork_call, "ForkSession", "AT_SEQ_TRIMMED", "at_seq", AtSeqTrimmedError),
        (fork_call, "ForkSession", "LABELS_FULL", "session_id", LabelsFullError),
        (truncate_call, "TruncateMessages", "AFTER_SEQ_AHEAD", "after_seq", AfterSeqAheadError),
        (truncate_call, "TruncateMessages", "AFTER_SEQ_TRIMMED", "after_seq", AfterSeqTrimmedError),
        (truncate_call, "TruncateMessages", "REMOVED_TOO_LARGE", "return_removed", RemovedTooLargeError),
        (truncate_call, "TruncateMessages", "LAST_SEQ_MISMATCH", "expected_last_seq", SeqMismatchError),
    ],
)
def test_the_context_compaction_and_fork_refusals_are_typed(
    client: SyncSessionClient,
    channel: Any,
    fake_time: FakeTime,
    call: Callable[[SyncSessionClient], object],
    rpc_name: str,
    kind: str,
    subject: str,
    expected: type[FailedPreconditionError],
) -> None:
    answer = run(lambda: call(client))
    _, _, rpc = take(channel, rpc_name)
    fail(rpc, domain.PreconditionFailed(kind, subject, f"refused: {kind}"))
    raised = answer.exception(TIMEOUT)
    assert type(raised) is expected
    assert expected.violation_type == kind
    assert [(v.type, v.subject) for v in raised.precondition_violations] == [(kind, subject)]
    assert fake_time.sleeps == []  # not retried


@pytest.mark.parametrize(
    ("call", "rpc_name", "response"),
    [
        (
            lambda c: c.fork_session("s1", at_seq=0, new_session_id="s2"),
            "ForkSession",
            pb.ForkSessionResponse(replayed=True),
        ),
        (
            lambda c: c.compact_messages("s1", 3, assistant("sum", tokens=1)),
            "CompactMessages",
            pb.CompactMessagesResponse(replayed=True),
        ),
    ],
    ids=["fork", "compact"],
)
def test_a_retried_fork_or_compaction_keeps_its_request_id(
    client: SyncSessionClient,
    channel: Any,
    call: Callable[[SyncSessionClient], Any],
    rpc_name: str,
    response: Any,
) -> None:
    answer = run(lambda: call(client))
    _, first, rpc = take(channel, rpc_name)
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    _, second, rpc = take(channel, rpc_name)
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    assert answer.result(TIMEOUT).replayed
    assert first.request_id
    assert second == first


def test_a_retried_clear_keeps_its_request_id(client: SyncSessionClient, channel: Any) -> None:
    """A clear whose answer was lost is retried with the same request_id: the server then empties
    nothing appended since."""
    answer = run(lambda: client.clear_messages("s1"))
    _, first, rpc = take(channel, "ClearMessages")
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    _, second, rpc = take(channel, "ClearMessages")
    rpc.terminate(
        pb.ClearMessagesResponse(session=session_pb2.Session(session_id="s1")), (), grpc.StatusCode.OK, ""
    )
    assert answer.result(TIMEOUT).session_id == "s1"
    assert first.request_id
    assert second == first


def test_the_new_calls_send_their_arguments(client: SyncSessionClient, channel: Any) -> None:
    def calls() -> list[object]:
        return [
            client.get_session("s1", read_mask=["token_count", "title"]),
            client.get_context("s1", max_tokens=100, max_messages=4),
            client.fork_session("s1"),
            client.clear_messages("s1", keep_system_prompt=True),
            client.get_user_usage("alice"),
        ]

    answer = run(calls)
    requests = {}
    for name, response in [
        ("GetSession", pb.GetSessionResponse()),
        ("GetContext", pb.GetContextResponse(tokens=7)),
        ("ForkSession", pb.ForkSessionResponse()),
        ("ClearMessages", pb.ClearMessagesResponse(session=session_pb2.Session(session_id="s1"))),
        ("GetUserUsage", pb.GetUserUsageResponse(total=pb.UsageCounts(messages=3))),
    ]:
        _, requests[name], rpc = take(channel, name)
        rpc.terminate(response, (), grpc.StatusCode.OK, "")
    _, context, _, cleared, usage = answer.result(TIMEOUT)
    assert list(requests["GetSession"].read_mask.paths) == ["token_count", "title"]
    assert (requests["GetContext"].max_tokens, requests["GetContext"].max_messages) == (100, 4)
    assert not requests["ForkSession"].HasField("at_seq")  # everything, not a fork at seq 0
    assert requests["ForkSession"].request_id
    assert requests["ClearMessages"].keep_system_prompt
    assert requests["GetUserUsage"].user_id == "alice"
    assert isinstance(context, pb.GetContextResponse)
    assert context.tokens == 7
    assert cleared == session_pb2.Session(session_id="s1")  # the session, unwrapped
    assert isinstance(usage, pb.GetUserUsageResponse)
    assert usage.total.messages == 3


def test_bad_request_details_name_the_fields(client: SyncSessionClient, channel: Any) -> None:
    answer = run(lambda: client.append("s1", [user("")]))
    _, _, rpc = take(channel, "AppendMessages")
    fail(
        rpc,
        domain.InvalidArgument(
            [
                domain.FieldViolation("messages[0].content", "must not be empty"),
                domain.FieldViolation("session_id", "too long"),
            ]
        ),
    )
    raised = answer.exception(TIMEOUT)
    assert isinstance(raised, InvalidArgumentError)
    assert [(v.field, v.description) for v in raised.field_violations] == [
        ("messages[0].content", "must not be empty"),
        ("session_id", "too long"),
    ]
    assert "messages[0].content: must not be empty" in str(raised)


def test_quota_failure_is_unpacked(client: SyncSessionClient, channel: Any) -> None:
    answer = run(lambda: client.create_session("alice"))
    _, _, rpc = take(channel, "CreateSession")
    fail(rpc, domain.QuotaExceeded("max_sessions_per_user", 3, "user alice", "alice has 3 live sessions"))
    raised = answer.exception(TIMEOUT)
    assert isinstance(raised, ResourceExhaustedError)
    assert raised.quota_violations == (
        QuotaViolation("user alice", "alice has 3 live sessions", "max_sessions_per_user", 3),
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [(domain.SessionNotFound("s1"), NotFoundError), (domain.SessionAlreadyExists("s1"), AlreadyExistsError)],
)
def test_resource_info_is_kept(
    client: SyncSessionClient,
    channel: Any,
    error: domain.ChatSessionError,
    expected: type[ChatSessionError],
) -> None:
    answer = run(lambda: client.get_session("s1"))
    _, _, rpc = take(channel, "GetSession")
    fail(rpc, error)
    raised = answer.exception(TIMEOUT)
    assert type(raised) is expected
    assert raised.resource == ResourceInfo(SESSION_RESOURCE, "s1", "", "")


def test_a_cancelled_call_is_not_asyncio_cancellation(client: SyncSessionClient, channel: Any) -> None:
    answer = run(lambda: client.get_session("s1"))
    _, _, rpc = take(channel, "GetSession")
    rpc.terminate(None, (), grpc.StatusCode.CANCELLED, "cancelled by the server")
    raised = answer.exception(TIMEOUT)
    assert isinstance(raised, CallCancelledError)
    assert isinstance(raised, ChatSessionError)


def message_event(seq: int) -> pb.WatchMessagesResponse:
    return pb.WatchMessagesResponse(message=session_pb2.Message(seq=seq, content=f"m{seq}"))


def heartbeat(last_seq: int) -> pb.WatchMessagesResponse:
    return pb.WatchMessagesResponse(heartbeat=pb.Heartbeat(last_seq=last_seq))


class Watching:
    """A watch iterated in a thread, handing each event it yields to the test."""

    def __init__(self, events: Iterator[pb.WatchMessagesResponse]) -> None:
        self.events = events
        self.delivered: queue.Queue[pb.WatchMessagesResponse] = queue.Queue()
        self.done: Future[None] = run(self._pump)

    def _pump(self) -> None:
        for event in self.events:
            self.delivered.put(event)

    def next(self) -> pb.WatchMessagesResponse:
        return self.delivered.get(timeout=TIMEOUT)


def take_watch(channel: Any) -> tuple[pb.WatchMessagesRequest, Any]:
    _, request, rpc = channel.take_unary_stream(SERVICE.methods_by_name["WatchMessages"])
    return request, rpc


def test_a_watch_resumes_after_the_last_seq_it_delivered(
    client: SyncSessionClient, channel: Any, fake_time: FakeTime
) -> None:
    watching = Watching(client.watch("s1", after_seq=0))
    request, stream = take_watch(channel)
    assert request.HasField("after_seq")
    assert request.after_seq == 0
    stream.send_response(heartbeat(0))
    stream.send_response(
        pb.WatchMessagesResponse(history_trimmed=pb.HistoryTrimmed(first_missing_seq=1, last_missing_seq=3))
    )
    stream.send_response(message_event(4))
    stream.send_response(message_event(5))
    assert watching.next().WhichOneof("event") == "history_trimmed"
    assert [watching.next().message.seq for _ in range(2)] == [4, 5]
    fail_stream(stream, domain.ShuttingDown("server stopping"))

    request, stream = take_watch(channel)
    assert request.after_seq == 5
    assert fake_time.sleeps == [pytest.approx(0.2)]  # the RetryInfo of a server shutting down
    stream.send_response(heartbeat(5))
    stream.send_response(message_event(6))
    assert watching.next().message.seq == 6
    fail_stream(stream, domain.SessionNotFound("s1"))
    error = watching.done.exception(TIMEOUT)
    assert isinstance(error, NotFoundError)


def test_a_watch_of_new_messages_resumes_from_its_first_heartbeat(
    client: SyncSessionClient, channel: Any
) -> None:
    watching = Watching(client.watch("s1", include_heartbeats=True))
    request, stream = take_watch(channel)
    assert not request.HasField("after_seq")  # new messages only
    stream.send_response(heartbeat(7))  # the seq the watch starts after
    assert watching.next().heartbeat.last_seq == 7
    stream.terminate((), grpc.StatusCode.UNAVAILABLE, "connection reset")
    request, stream = take_watch(channel)
    # Reconnecting without after_seq would skip what was appended while disconnected.
    assert request.HasField("after_seq")
    assert request.after_seq == 7
    stream.send_response(message_event(8))
    assert watching.next().message.seq == 8
    stream.terminate((), grpc.StatusCode.OK, "")
    assert watching.done.result(TIMEOUT) is None


def test_a_retried_pop_keeps_its_request_id_and_says_when_its_message_is_lost(
    client: SyncSessionClient, channel: Any
) -> None:
    """A pop whose answer was lost is retried with the same request_id: the server pops nothing
    more, and can only say that the first attempt removed one (whose message is gone)."""
    answer = run(lambda: client.pop_message("s1"))
    _, first, rpc = take(channel, "TruncateMessages")
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    _, second, rpc = take(channel, "TruncateMessages")
    rpc.terminate(pb.TruncateMessagesResponse(removed_count=1, replayed=True), (), grpc.StatusCode.OK, "")
    with pytest.raises(PoppedMessageLostError):
        answer.result(TIMEOUT)
    assert (first.pop_count, first.return_removed, first.HasField("after_seq")) == (1, True, False)
    assert first.request_id
    assert second == first

    answer = run(lambda: client.pop_message("s1"))
    _, _, rpc = take(channel, "TruncateMessages")
    rpc.terminate(pb.TruncateMessagesResponse(removed_count=0), (), grpc.StatusCode.OK, "")
    assert answer.result(TIMEOUT) is None  # an empty session


def test_truncate_sends_after_seq_zero_and_its_guard(client: SyncSessionClient, channel: Any) -> None:
    answer = run(lambda: client.truncate_messages("s1", 0, expected_last_seq=0, return_removed=True))
    _, request, rpc = take(channel, "TruncateMessages")
    rpc.terminate(pb.TruncateMessagesResponse(removed_count=2), (), grpc.StatusCode.OK, "")
    assert answer.result(TIMEOUT).removed_count == 2
    # Zeros that mean something are sent as set: remove everything, only at seq 0.
    assert (request.HasField("after_seq"), request.after_seq) == (True, 0)
    assert (request.HasField("expected_last_seq"), request.expected_last_seq) == (True, 0)
    assert (request.pop_count, request.return_removed) == (0, True)
