"""DTask's wire protocol: every message between clients, workers and schedulers.

This module is the one definition that the scheduler, the worker, the Python client
and the CLI all import; `docs/protocol.md` documents the same thing for other
languages. It is a public interface: change it only compatibly, or bump VERSION.

Sockets: each scheduler binds one ROUTER (its client endpoint). Clients and workers
connect a DEALER and send ONE frame per message (no empty delimiter frame). Each
frame is a msgpack map with string keys:

    {"v": 1, "t": <type>, "id": <request id>, ...fields}

`id` is chosen by the sender (an integer or string, echoed in the reply) because a
DEALER is asynchronous: many requests may be in flight and replies can come back in
any order. Messages the scheduler pushes to workers carry no `id`.

Encodings: strings are msgpack str (UTF-8), payloads and opaque bytes are msgpack
bin; timestamps are integer microseconds since the Unix epoch (UTC), fields named
`*_us`; durations are seconds as int or float. Errors are
`{"t": "error", "id", "code", "message"}` plus `"leader"` (an endpoint, or "") for
NOT_LEADER.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

VERSION = 1

# -- messages and their fields ------------------------------------------------------
# (every message also has v, t and, for requests and their replies, id)
#
# client -> scheduler                              reply
#   submit   tasks: [task spec]                    submitted  task_ids: [str], existing: [bool]
#   status   task_id, stale?: bool                 task       task: {task}
#   list     status?: [str], type?: str,           tasks      tasks: [{task} without payload],
#            since_us?: int, limit?: int (100),               next: str ("" at the end)
#            after?: str (a task id cursor)
#   cancel   task_id                               cancel_ok  task: {task}
#   wait     task_id, timeout: seconds             task       task: {task}, done: bool
#   logs     task_id, attempt?: int (0 = latest),  log_chunks attempt, data: bin, offset: int,
#            offset?: int                                     done: bool
#   cluster  -                                     cluster_info node: {...}, leader: endpoint,
#                                                             workers: [{...}] (leader only)
# task spec: type (required), payload: bin, content_type, name, priority: int (higher first),
#   delay: s | at_us, timeout: s (0 = none), retry: {max_retries, initial, multiplier,
#   max_delay, jitter}, queue, labels: [str], idempotency_key, task_id
#
# worker -> scheduler
#   register  worker_id, host, pid, concurrency, queues: [str], labels: [str],
#             executors: [str], running: [[task_id, attempt]], credits?: int
#             -> registered  heartbeat_interval: s, worker_timeout: s,
#                batch_results: bool (the leader takes `results`)
#   heartbeat worker_id, credits: int (free slots), running: [[task_id, attempt]]
#             -> heartbeat_ack; or error UNKNOWN_WORKER (register again) or NOT_LEADER
#   result    worker_id, task_id, attempt, outcome, exit_code: int|nil, error: str,
#             result: bin (msgpack of the return value), log: bin (bounded output),
#             started_us, finished_us, credits: int
#             -> result_ack  task_id, attempt, accepted: bool (false: stale, ignored)
#   results   worker_id, results: [{the fields of a result but worker_id and credits}],
#             credits: int   (only to a leader whose `registered` said batch_results)
#             -> results_ack  acks: [[task_id, attempt, accepted]]
#   log       worker_id, task_id, attempt, offset: int, data: bin   (no reply)
#   bye       worker_id   (no reply)
# scheduler -> worker (pushed; a worker must accept any number per frame)
#   run       tasks: [{task_id, attempt, type, payload, content_type, timeout, name}]
#   kill      task_id, attempt
#   drain     -   (the worker finishes its tasks, reports, sends bye and exits)
# client -> scheduler, for operators
#   drain_worker  worker_id                        drain_ok   worker_id
#   transfer_leader  to?: int (0: the most caught-up) transfer_ok to: int (leadership follows)
#   member_change  op: add_learner|promote|remove, node_id: int, raft?: endpoint (add),
#                  client?: endpoint (add)   member_ok  voters: [int], learners: [int]
#                  (an added scheduler starts as a learner; promote it once caught up)
# client -> scheduler, cron jobs (docs/cron.md)
#   cron_define   job: {name, expr, tz, task: {task spec without delay/at_us/task_id/
#                 idempotency_key}, misfire, overlap, grace_s, catchup_window_s,
#                 max_catchup, paused}, create_only?: bool (true: CONFLICT if it exists)
#                                                  cron_job   job: {job}, outcome: created|updated
#   cron_list     stale?: bool                     cron_jobs  jobs: [{job}]
#   cron_pause / cron_delete  name                 cron_job   job, outcome
#   cron_resume   name, catch_up?: bool            cron_job   job, outcome
#   cron_trigger  name                             cron_job   job, outcome, task_id

# -- message types --------------------------------------------------------------
# client -> scheduler, and the reply type for each
SUBMIT, SUBMITTED = "submit", "submitted"
STATUS, TASK = "status", "task"
LIST, TASKS = "list", "tasks"
CANCEL, CANCELLED_REPLY = "cancel", "cancel_ok"
WAIT = "wait"  # replied with TASK once the task is terminal or the wait times out
LOGS, LOG_CHUNKS = "logs", "log_chunks"
CLUSTER, CLUSTER_INFO = "cluster", "cluster_info"
DRAIN_WORKER, DRAIN_OK = "drain_worker", "drain_ok"
TRANSFER_LEADER, TRANSFER_OK = "transfer_leader", "transfer_ok"
CRON_DEFINE, CRON_LIST, CRON_PAUSE = "cron_define", "cron_list", "cron_pause"
CRON_RESUME, CRON_DELETE, CRON_TRIGGER = "cron_resume", "cron_delete", "cron_trigger"
CRON_JOB, CRON_JOBS = "cron_job", "cron_jobs"  # the replies
MEMBER_CHANGE, MEMBER_OK = "member_change", "member_ok"
MEMBER_OPS = ("add_learner", "promote", "remove")
# worker -> scheduler
REGISTER, REGISTERED = "register", "registered"
HEARTBEAT, HEARTBEAT_ACK = "heartbeat", "heartbeat_ack"
RESULT, RESULT_ACK = "result", "result_ack"
RESULTS, RESULTS_ACK = "results", "results_ack"  # several results in one message
LOG = "log"  # a chunk of a running attempt's output; no reply
BYE = "bye"  # deregistration; no reply
# scheduler -> worker (pushed, no id)
RUN = "run"  # one or more task attempts to run
KILL = "kill"  # cancel a running attempt
NOT_LEASED = "not_leased"  # kill reason: the attempt is not this worker's (it is not a cancel)
DRAIN = "drain"  # stop taking tasks, finish the running ones, deregister, exit
ERROR = "error"

CLIENT_TYPES = frozenset({SUBMIT, STATUS, LIST, CANCEL, WAIT, LOGS, CLUSTER, DRAIN_WORKER,
                          TRANSFER_LEADER, CRON_DEFINE, CRON_LIST, CRON_PAUSE, CRON_RESUME,
                          CRON_DELETE, CRON_TRIGGER, MEMBER_CHANGE})
WORKER_TYPES = frozenset({REGISTER, HEARTBEAT, RESULT, RESULTS, LOG, BYE})

# -- error codes ------------------------------------------------------------------
BAD_REQUEST = "BAD_REQUEST"  # malformed message or invalid field: fix the request
TOO_LARGE = "TOO_LARGE"  # a payload or message over the configured limit
NOT_FOUND = "NOT_FOUND"  # unknown task id
CONFLICT = "CONFLICT"  # e.g. cancelling a task that already finished
NOT_LEADER = "NOT_LEADER"  # retry at `leader` (or another endpoint when it is "")
UNAVAILABLE = "UNAVAILABLE"  # no quorum or shutting down: retry later, same idempotency key
UNKNOWN_WORKER = "UNKNOWN_WORKER"  # the scheduler lost the registration: register again
VERSION_MISMATCH = "VERSION_MISMATCH"
INTERNAL = "INTERNAL"

# -- task states and attempt outcomes ---------------------------------------------
PENDING, SCHEDULED, RUNNING, RETRYING = "PENDING", "SCHEDULED", "RUNNING", "RETRYING"
COMPLETED, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
STATES = (PENDING, SCHEDULED, RUNNING, RETRYING, COMPLETED, FAILED, CANCELLED)

SUCCEEDED, ERRORED, TIMED_OUT = "succeeded", "failed", "timed_out"
KILLED, LOST = "cancelled", "lost"  # cancelled on request; worker died or lease expired
REJECTED = "rejected"  # the worker did not start it (draining, no slot, no executor)
OUTCOMES = frozenset({SUCCEEDED, ERRORED, TIMED_OUT, KILLED, LOST, REJECTED})

JSON, BINARY = "application/json", "application/octet-stream"

# -- limits (defaults; the scheduler's configuration can lower or raise them) -------
MAX_PAYLOAD = 1 << 20
MAX_FRAME = 64 << 20
MAX_BATCH = 10_000  # tasks per submit
MAX_RESULT = 64 << 10  # bytes of a result value kept per attempt
MAX_LOG = 1 << 20  # bytes of output kept per attempt
MAX_RESULTS = 1000  # results per `results` message
MAX_NAME = 255
_IDENT = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,128}$")
# Ids the leader assigns: its term and node id and a counter (unique: one leader per term).
ASSIGNED_ID = re.compile(r"^[0-9a-f]+\.[0-9]+\.[0-9a-f]+$")


_ENDPOINT = re.compile(r"^tcp://[^:/\s]+:(\d{1,5})$")


def is_endpoint(value: object) -> bool:
    """A tcp://HOST:PORT address ZeroMQ can connect to (checked before it has to)."""
    m = _ENDPOINT.match(value) if isinstance(value, str) else None
    return m is not None and 0 < int(m.group(1)) < 65536


class ProtocolError(Exception):
    """A request we refuse, with the error code to reply with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_packer = msgpack.Packer(use_bin_type=True)


def pack(msg: dict) -> bytes:
    return _packer.pack(msg)


def unpack(frame: bytes, max_frame: int = MAX_FRAME) -> dict:
    """Decode and check the envelope of one inbound frame."""
    if len(frame) > max_frame:
        raise ProtocolError(TOO_LARGE, f"message of {len(frame)} bytes exceeds {max_frame}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=max_frame,
                              max_str_len=max_frame, max_array_len=1_000_000,
                              max_map_len=100_000)
    except Exception as exc:
        raise ProtocolError(BAD_REQUEST,
                            f"not a msgpack message ({exc.__class__.__name__})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_REQUEST, "a message must be a msgpack map")
    if msg.get("v") != VERSION:
        raise ProtocolError(VERSION_MISMATCH, f"protocol version {msg.get('v')!r} is not "
                            f"supported; this server speaks {VERSION}")
    if not isinstance(msg.get("t"), str):
        raise ProtocolError(BAD_REQUEST, "field t (message type) must be a string")
    rid = msg.get("id")
    if rid is not None and not isinstance(rid, (int, str, bytes)):
        raise ProtocolError(BAD_REQUEST, "field id must be an integer or a string")
    return msg


def reply(msg_type: str, req_id: object, **fields: object) -> bytes:
    return pack({"v": VERSION, "t": msg_type, "id": req_id, **fields})


def error(req_id: object, code: str, message: str, leader: str | None = None) -> bytes:
    out = {"v": VERSION, "t": ERROR, "id": req_id, "code": code, "message": message}
    if leader is not None:
        out["leader"] = leader
    return pack(out)


# -- field checks -------------------------------------------------------------------

def get_str(msg: dict, key: str, default: str | None = None, *, max_len: int = MAX_NAME,
            pattern: re.Pattern | None = None) -> str:
    value = msg.get(key, default)
    if value is None:
        raise ProtocolError(BAD_REQUEST, f"field {key} is required")
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(BAD_REQUEST, f"field {key} must be a string of at most "
                            f"{max_len} characters")
    if pattern is not None and not pattern.match(value):
        raise ProtocolError(BAD_REQUEST, f"field {key} has invalid characters: {value!r}")
    return value


def get_int(msg: dict, key: str, default: int | None = None, *, lo: int = -(2**62),
            hi: int = 2**62) -> int:
    value = msg.get(key, default)
    if value is None:
        raise ProtocolError(BAD_REQUEST, f"field {key} is required")
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(BAD_REQUEST, f"field {key} must be an integer in [{lo}, {hi}]")
    return value


def get_num(msg: dict, key: str, default: float | None = None, *, lo: float = 0.0,
            hi: float = 10 * 365 * 86400.0) -> float:
    value = msg.get(key, default)
    if value is None:
        raise ProtocolError(BAD_REQUEST, f"field {key} is required")
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise ProtocolError(BAD_REQUEST, f"field {key} must be a number in [{lo}, {hi}]")
    return float(value)


def get_bool(msg: dict, key: str, default: bool = False) -> bool:
    value = msg.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(BAD_REQUEST, f"field {key} must be true or false")
    return value


def get_str_list(msg: dict, key: str, *, max_items: int = 64) -> tuple[str, ...]:
    value = msg.get(key, [])
    if not isinstance(value, list) or len(value) > max_items or not all(
            isinstance(v, str) and _IDENT.match(v) for v in value):
        raise ProtocolError(BAD_REQUEST, f"field {key} must be a list of at most {max_items} "
                            "names ([A-Za-z0-9_.:@/+-], 1-128 characters)")
    return tuple(value)


def task_id_of(msg: dict) -> str:
    return get_str(msg, "task_id", max_len=128, pattern=_IDENT)


# -- task submission ---------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class RetryPolicy:
    max_retries: int = 3
    initial: float = 1.0  # seconds before the first retry
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1  # +- this fraction of the delay, chosen by the leader

    def to_wire(self) -> list:
        return [self.max_retries, self.initial, self.multiplier, self.max_delay, self.jitter]

    @classmethod
    def from_wire(cls, raw: list) -> RetryPolicy:
        return cls(*raw)


@dataclass(slots=True)
class TaskSpec:
    """One task as a client submits it, validated."""

    type: str
    payload: bytes
    content_type: str = JSON
    name: str = ""
    priority: int = 0
    delay: float = 0.0
    at_us: int = 0
    timeout: float = 0.0  # 0: no timeout
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    queue: str = "default"
    labels: tuple[str, ...] = ()
    idempotency_key: str = ""
    task_id: str = ""


_DEFAULT_RETRY = RetryPolicy()


def _str_field(key: str, max_len: int, pattern: re.Pattern | None = None
               ) -> Callable[[dict], object]:
    def check(raw: dict) -> object:
        value = raw[key]
        if type(value) is str and len(value) <= max_len and (
                pattern is None or pattern.match(value)):
            return value
        return get_str(raw, key, max_len=max_len, pattern=pattern)  # raises the error
    return check


# Optional task spec fields and their checks. Only the fields a spec carries are
# checked (a client sends the few it sets), so a typical task costs a handful of
# checks rather than one per field: this runs for every task the leader receives.
_SPEC_FIELDS: dict[str, Callable[[dict], object]] = {
    "content_type": _str_field("content_type", 100),
    "name": _str_field("name", MAX_NAME),
    "priority": lambda raw: get_int(raw, "priority", lo=-1_000_000, hi=1_000_000),
    "delay": lambda raw: get_num(raw, "delay"),
    "at_us": lambda raw: get_int(raw, "at_us", lo=0),
    "timeout": lambda raw: get_num(raw, "timeout", hi=86400 * 7),
    "queue": _str_field("queue", 128, _IDENT),
    "labels": lambda raw: get_str_list(raw, "labels"),
    "idempotency_key": _str_field("idempotency_key", 255),
    "task_id": _str_field("task_id", 128),
}
_check_type = _str_field("type", 64, _IDENT)


def parse_task_spec(raw: object, max_payload: int = MAX_PAYLOAD) -> TaskSpec:
    if not isinstance(raw, dict):
        raise ProtocolError(BAD_REQUEST, "each task must be a map")
    payload = raw.get("payload", b"")
    if not isinstance(payload, bytes):
        raise ProtocolError(BAD_REQUEST, "field payload must be binary (msgpack bin); "
                            "JSON payloads are sent as their UTF-8 bytes")
    if len(payload) > max_payload:
        raise ProtocolError(TOO_LARGE, f"payload of {len(payload)} bytes exceeds the "
                            f"{max_payload}-byte limit")
    spec = TaskSpec(type=_check_type(raw) if "type" in raw else get_str(raw, "type"),
                    payload=payload,
                    retry=_parse_retry(raw["retry"]) if "retry" in raw else _DEFAULT_RETRY)
    for key in raw:
        check = _SPEC_FIELDS.get(key)  # unknown fields are ignored
        if check is not None:
            setattr(spec, key, check(raw))
    if spec.task_id and not _IDENT.match(spec.task_id):
        raise ProtocolError(BAD_REQUEST, f"field task_id has invalid characters: "
                            f"{spec.task_id!r}")
    if spec.task_id and ASSIGNED_ID.match(spec.task_id):
        raise ProtocolError(BAD_REQUEST, f"task_id {spec.task_id!r} has the shape of ids the "
                            "cluster assigns (TERM.NODE.SEQ in hex); choose another")
    if spec.delay and spec.at_us:
        raise ProtocolError(BAD_REQUEST, "give delay or at_us, not both")
    return spec


def _parse_retry(raw: object) -> RetryPolicy:
    if not isinstance(raw, dict):
        raise ProtocolError(BAD_REQUEST, "field retry must be a map")
    return RetryPolicy(
        get_int(raw, "max_retries", 3, lo=0, hi=1000),
        get_num(raw, "initial", 1.0, hi=86400 * 7),
        get_num(raw, "multiplier", 2.0, lo=1.0, hi=100.0),
        get_num(raw, "max_delay", 300.0, hi=86400 * 30),
        get_num(raw, "jitter", 0.1, hi=1.0),
    )


def parse_submit(msg: dict, max_payload: int = MAX_PAYLOAD,
                 max_batch: int = MAX_BATCH) -> list[TaskSpec]:
    tasks = msg.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ProtocolError(BAD_REQUEST, "field tasks must be a non-empty list")
    if len(tasks) > max_batch:
        raise ProtocolError(TOO_LARGE, f"{len(tasks)} tasks in one submit; the limit is "
                            f"{max_batch}")
    specs = []
    for i, raw in enumerate(tasks):
        try:
            specs.append(parse_task_spec(raw, max_payload))
        except ProtocolError as exc:
            raise ProtocolError(exc.code, f"task {i}: {exc.message}") from None
    return specs
