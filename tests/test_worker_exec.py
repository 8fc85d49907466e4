"""End-to-end: a real worker process, driven by a fake scheduler over real sockets.

One worker (and its warm Python pool) serves every test in this module, which keeps
the suite fast; tests use distinct task ids and wait for their own results.
"""

from __future__ import annotations

import http.server
import json
import os
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from dtask import protocol as p
from dtask.worker.testing import FakeScheduler, WorkerProcess, task

pytestmark = pytest.mark.slow

CONCURRENCY = 3
PREFETCH = 2
MAX_LOG = 8192
KILL_GRACE = 0.5

TASKS_MODULE = textwrap.dedent('''
    import os, signal, sys, time
    from dtask.worker.registry import task

    @task(name="add")
    def add(a, b):
        return a + b

    @task
    def greet(name, punctuation="!"):
        print(f"greeting {name}")
        return {"greeting": f"hello {name}{punctuation}"}

    def add_path(a, b):
        return a + b

    def boom(message):
        raise ValueError(message)

    def big(n):
        return "x" * n

    def pid():
        return os.getpid()

    def scribble():  # writes garbage on the pool child's answer pipe
        os.write(int(sys.argv[2]), b"\\xc1")
        return 1

    def pid_then_sleep(seconds, ignore_term=False):
        if ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"pid={os.getpid()}", flush=True)
        time.sleep(seconds)
        return "slept"
''')

DOCKER_STANDIN = textwrap.dedent('''\
    #!/bin/sh
    # Stands in for the docker CLI: records its argv and one env value, then acts.
    {
      printf 'argv:'; for a in "$@"; do printf ' [%s]' "$a"; done; echo
      echo "GREETING=${GREETING-unset}"
    } >> "$DOCKER_STANDIN_LOG"
    if [ "$1" = rm ]; then exit 0; fi
    case "$*" in
      *hang*) trap '' TERM; echo "container hanging"; sleep 30 ;;
      *) echo "container says $GREETING"; exit 0 ;;
    esac
''')


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/ok":
            self._send(200, b"fine")
        elif self.path == "/big":
            self._send(200, b"y" * 100_000)
        else:
            self._send(404, b"no such thing")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._send(201, json.dumps({"got": json.loads(body),
                                    "ctype": self.headers["Content-Type"],
                                    "x": self.headers.get("X-Test")}).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("worker")
    (tmp / "dtask_test_tasks.py").write_text(TASKS_MODULE)
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "docker").write_text(DOCKER_STANDIN)
    (bindir / "docker").chmod(0o755)
    docker_log = tmp / "docker.log"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake = FakeScheduler().start()
    worker = WorkerProcess(
        [fake.endpoint], "--id", "w-exec", "--concurrency", str(CONCURRENCY),
        "--prefetch", str(PREFETCH),
        "--executor", "shell,python,http,docker", "--import", "dtask_test_tasks",
        "--label", "gpu", "--queue", "default,fast", "--heartbeat-interval", "0.1",
        "--kill-grace", str(KILL_GRACE), "--max-log-bytes", str(MAX_LOG),
        "--result-resend-interval", "0.3", "--log-level", "debug",
        env={"PATH": f"{bindir}:{os.environ['PATH']}", "DOCKER_STANDIN_LOG": str(docker_log),
             "PYTHONPATH": f"{tmp}:{os.environ.get('PYTHONPATH', '')}"})
    try:
        fake.wait_for(lambda: fake.messages(p.HEARTBEAT), 10, "the first heartbeat")
        yield {"fake": fake, "worker": worker, "tmp": tmp, "docker_log": docker_log,
               "http": f"http://127.0.0.1:{server.server_address[1]}"}
    finally:
        code = worker.stop()
        print(worker.output()[-20000:])
        worker.close()
        fake.close()
        server.shutdown()
        assert code == 0


def run(env: dict, task_id: str, kind: str, payload: object, wait: float = 10.0,
         **kw: object) -> dict:
    fake = env["fake"]
    fake.run(task(task_id, kind, payload, **kw))  # type: ignore[arg-type]
    return fake.wait_result(task_id, wait)


def unpack(result: bytes) -> object:
    return msgpack.unpackb(result, raw=False)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry))
    return found


def group_gone(pgid: int, wait: float = 2.0) -> bool:
    """Whether the group empties (SIGKILL delivery is asynchronous)."""
    deadline = time.monotonic() + wait
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- membership ---------------------------------------------------------------------

def test_registers_with_its_capabilities_and_heartbeats_credits(env: dict) -> None:
    fake = env["fake"]
    reg = fake.messages(p.REGISTER)[0]
    assert reg["worker_id"] == "w-exec" and reg["concurrency"] == CONCURRENCY
    assert reg["executors"] == ["shell", "python", "http", "docker"]
    assert reg["queues"] == ["default", "fast"] and reg["labels"] == ["gpu"]
    assert reg["pid"] == env["worker"].proc.pid and reg["running"] == []
    idle = fake.messages(p.HEARTBEAT)[-1]
    # no task measured yet: it asks for no prefetch (tasks beyond its slots) until it
    # knows its tasks are short
    assert idle["prefetch"] == 0 and idle["credits"] == CONCURRENCY and idle["running"] == []
    for i in range(5):
        run(env, f"hb-quick-{i}", "python", {"fn": "add", "args": [i, 1]})
    n = len(fake.messages(p.HEARTBEAT))
    fake.wait_for(lambda: len(fake.messages(p.HEARTBEAT)) > n, 5, "a heartbeat")
    quick = fake.messages(p.HEARTBEAT)[-1]
    assert quick["prefetch"] == PREFETCH and quick["credits"] == CONCURRENCY + PREFETCH
    fake.run(task("hb-1", "shell", {"cmd": "sleep 0.6"}))
    busy = fake.wait_for(lambda: [h for h in fake.messages(p.HEARTBEAT)
                                  if h["running"] == [["hb-1", 1]]], 5, "a busy heartbeat")
    # a task running for longer than 50 ms stops prefetch: only the free slots are left
    assert busy[-1]["prefetch"] == 0 and busy[-1]["credits"] == CONCURRENCY - 1
    fake.wait_result("hb-1")
    n = len(fake.messages(p.HEARTBEAT))
    fake.wait_for(lambda: len(fake.messages(p.HEARTBEAT)) >= n + 3, 5, "more heartbeats")
    # idle again: prefetch follows the median task, still a quick one
    last = fake.messages(p.HEARTBEAT)[-1]
    assert last["prefetch"] == PREFETCH and last["credits"] == CONCURRENCY + PREFETCH


def test_unknown_worker_makes_it_register_again(env: dict) -> None:
    fake = env["fake"]
    before = len(fake.messages(p.REGISTER))
    fake.unknown_worker = 1
    fake.wait_for(lambda: len(fake.messages(p.REGISTER)) > before, 5, "a new register")
    assert run(env, "uw-1", "shell", {"cmd": "true"})["outcome"] == p.SUCCEEDED


# -- shell ----------------------------------------------------------------------------

def test_shell_cmd_with_env_and_cwd_reports_exit_code_and_interleaved_output(env: dict) -> None:
    res = run(env, "sh-1", "shell", {"cmd": "echo out $FOO; echo err >&2; pwd; exit 4",
                                     "env": {"FOO": "bar"}, "cwd": str(env["tmp"])})
    assert res["outcome"] == p.ERRORED and res["exit_code"] == 4
    assert res["log"] == f"out bar\nerr\n{env['tmp']}\n".encode()
    assert res["error"] == "exited with code 4"
    assert 0 < res["started_us"] <= res["finished_us"]
    assert abs(res["finished_us"] / 1e6 - time.time()) < 60  # wall clock, microseconds


def test_shell_argv_succeeds_and_keeps_the_worker_env(env: dict) -> None:
    res = run(env, "sh-2", "shell", {"argv": ["sh", "-c", 'printf "%s|%s" "$1" "$DOCKER_'
                                              'STANDIN_LOG"', "x", "a b"]})
    assert res["outcome"] == p.SUCCEEDED and res["exit_code"] == 0
    assert res["log"] == f"a b|{env['docker_log']}".encode()


def test_shell_bad_payloads_fail_with_clear_errors(env: dict) -> None:
    res = run(env, "sh-3", "shell", {"command": "ls"})
    assert res["outcome"] == p.ERRORED and '"cmd"' in res["error"]
    res = run(env, "sh-4", "shell", b"ls", content_type=p.BINARY)
    assert res["outcome"] == p.ERRORED and "content type" in res["error"]
    res = run(env, "sh-5", "shell", {"argv": ["/no/such/program"]})
    assert res["outcome"] == p.ERRORED and "cannot start" in res["error"]
    res = run(env, "sh-6", "nosuch", {})
    assert res["outcome"] == p.REJECTED and "no 'nosuch' executor" in res["error"]


# -- python ---------------------------------------------------------------------------

def test_python_fn_by_path_and_by_task_name(env: dict) -> None:
    res = run(env, "py-1", "python", {"fn": "dtask_test_tasks:add_path", "args": [2, 3]})
    assert res["outcome"] == p.SUCCEEDED and unpack(res["result"]) == 5
    res = run(env, "py-2", "python", {"fn": "add", "args": [20, 22]})
    assert unpack(res["result"]) == 42
    res = run(env, "py-3", "python", {"fn": "dtask_test_tasks.greet", "args": ["ada"],
                                      "kwargs": {"punctuation": "?"}})
    assert unpack(res["result"]) == {"greeting": "hello ada?"}
    assert res["log"] == b"greeting ada\n"


def test_python_exception_fails_with_type_message_and_traceback(env: dict) -> None:
    res = run(env, "py-4", "python", {"fn": "dtask_test_tasks:boom", "args": ["no luck"]})
    assert res["outcome"] == p.ERRORED and res["error"] == "ValueError: no luck"
    log = res["log"].decode()
    assert log.startswith("Traceback") and "in boom" in log
    assert log.rstrip().endswith("ValueError: no luck") and "pychild" not in log


def test_python_bad_references_and_oversized_results_fail_clearly(env: dict) -> None:
    res = run(env, "py-5", "python", {"fn": "not_registered"})
    assert res["outcome"] == p.ERRORED and "no task registered" in res["error"]
    res = run(env, "py-6", "python", {"fn": "dtask_test_tasks:big", "args": [100_000]})
    assert res["outcome"] == p.ERRORED and "limit is 65536" in res["error"]
    res = run(env, "py-7", "python", {"fn": "os:getcwd", "args": [], "kwargs": {}},
              content_type="text/plain")
    assert res["outcome"] == p.ERRORED and "content type" in res["error"]


def test_python_children_are_warm_and_reused(env: dict) -> None:
    pids = [unpack(run(env, f"py-pid-{i}", "python", {"fn": "dtask_test_tasks:pid"})["result"])
            for i in range(3)]
    assert len(set(pids)) == 1 and pids[0] != env["worker"].proc.pid


def test_a_python_child_that_dies_fails_its_task_and_is_replaced(env: dict) -> None:
    res = run(env, "py-die", "python", {"fn": "os:_exit", "args": [3]})
    assert res["outcome"] == p.ERRORED and res["exit_code"] == 3
    assert res["error"] == "the Python process died (exited with code 3)"
    assert unpack(run(env, "py-after-die", "python", {"fn": "add", "args": [2, 2]})["result"]) == 4


def test_a_task_that_garbles_the_answer_pipe_kills_only_its_child(env: dict) -> None:
    res = run(env, "py-garble", "python", {"fn": "dtask_test_tasks:scribble"})
    assert res["outcome"] == p.ERRORED and "killed by SIGKILL" in res["error"]
    assert unpack(run(env, "py-after-garble", "python", {"fn": "add", "args": [1, 2]})[
        "result"]) == 3


def test_python_request_larger_than_the_pipe_is_written_without_blocking(env: dict) -> None:
    res = run(env, "py-big-arg", "python", {"fn": "builtins:len", "args": ["z" * 1_500_000]})
    assert res["outcome"] == p.SUCCEEDED and unpack(res["result"]) == 1_500_000


# -- http -----------------------------------------------------------------------------

def test_http_status_and_body_are_the_result(env: dict) -> None:
    res = run(env, "http-1", "http", {"url": env["http"] + "/ok"})
    assert res["outcome"] == p.SUCCEEDED
    out = unpack(res["result"])
    assert out["status"] == 200 and out["body"] == b"fine" and not out["truncated"]
    assert b"GET " in res["log"] and b"-> 200" in res["log"]


def test_http_unexpected_status_fails_and_post_sends_json(env: dict) -> None:
    res = run(env, "http-2", "http", {"url": env["http"] + "/missing"})
    assert res["outcome"] == p.ERRORED and "unexpected HTTP status 404" in res["error"]
    assert unpack(res["result"])["body"] == b"no such thing"
    res = run(env, "http-3", "http", {"url": env["http"] + "/echo", "body": {"a": 1},
                                      "headers": {"X-Test": "yes"}, "expect": [201]})
    assert res["outcome"] == p.SUCCEEDED
    assert json.loads(unpack(res["result"])["body"]) == {
        "got": {"a": 1}, "ctype": "application/json", "x": "yes"}
    res = run(env, "http-4", "http", {"url": env["http"] + "/ok", "expect": [204]})
    assert res["outcome"] == p.ERRORED and "expected [204]" in res["error"]


def test_http_body_is_bounded_and_connection_errors_fail(env: dict) -> None:
    res = run(env, "http-5", "http", {"url": env["http"] + "/big"})
    out = unpack(res["result"])
    assert res["outcome"] == p.SUCCEEDED and out["truncated"]
    assert len(res["result"]) <= p.MAX_RESULT and set(out["body"]) == {ord("y")}
    res = run(env, "http-6", "http", {"url": "http://127.0.0.1:1/"})
    assert res["outcome"] == p.ERRORED and "HTTP request failed" in res["error"]


# -- docker (a stand-in CLI: no Docker engine runs here) --------------------------------

def test_docker_runs_the_exact_command_line(env: dict) -> None:
    res = run(env, "dock-1", "docker", {"image": "alpine:3", "command": ["sh", "-c", "echo"],
                                        "env": {"GREETING": "hello"}})
    assert res["outcome"] == p.SUCCEEDED and res["log"] == b"container says hello\n"
    lines = env["docker_log"].read_text().splitlines()
    assert lines[-2] == ("argv: [run] [--rm] [--name] [dtask-dock-1-1] [-e] [GREETING] "
                         "[alpine:3] [sh] [-c] [echo]")
    assert lines[-1] == "GREETING=hello"


def test_docker_cancel_kills_the_cli_and_removes_the_container(env: dict) -> None:
    fake = env["fake"]
    fake.run(task("dock-2", "docker", {"image": "busybox", "command": "hang"}))
    fake.wait_for(lambda: fake.log_chunks("dock-2"), 5, "the container to start")
    fake.kill("dock-2")
    res = fake.wait_result("dock-2")
    assert res["outcome"] == p.KILLED and "killed by SIGKILL" in res["error"]
    fake.wait_for(lambda: "argv: [rm] [-f] [dtask-dock-2-1]" in env["docker_log"].read_text(),
                  5, "docker rm -f")


# -- timeouts, cancel -----------------------------------------------------------------

def test_timeout_kills_a_task_that_ignores_sigterm_and_its_children(env: dict) -> None:
    res = run(env, "to-1", "shell", {"cmd": "trap '' TERM; echo pgid=$$; sleep 60 & wait; "
                                            "echo never"}, timeout=0.3)
    assert res["outcome"] == p.TIMED_OUT
    assert res["error"] == "timed out after 0.3 s (killed by SIGKILL)"  # TERM was ignored
    pgid = int(res["log"].decode().split("pgid=")[1].split()[0])
    assert b"never" not in res["log"] and group_gone(pgid)


def test_timeout_of_a_python_task_replaces_its_child(env: dict) -> None:
    res = run(env, "to-2", "python", {"fn": "dtask_test_tasks:pid_then_sleep",
                                      "args": [30, True]}, timeout=0.3)
    assert res["outcome"] == p.TIMED_OUT and "killed by SIGKILL" in res["error"]
    pid = int(res["log"].decode().split("pid=")[1].split()[0])
    assert group_gone(pid)
    assert unpack(run(env, "to-3", "python", {"fn": "add", "args": [1, 1]})["result"]) == 2


def test_cancel_a_running_shell_task(env: dict) -> None:
    fake = env["fake"]
    fake.run(task("c-1", "shell", {"cmd": "echo pgid=$$; sleep 30"}))
    chunk = fake.wait_for(lambda: fake.log_chunks("c-1"), 5, "output of c-1")[0]
    fake.kill("c-1")
    res = fake.wait_result("c-1")
    assert res["outcome"] == p.KILLED and res["error"].startswith("cancelled on request")
    pgid = int(chunk["data"].decode().split("pgid=")[1].split()[0])
    assert group_gone(pgid)


def test_cancel_a_running_python_task(env: dict) -> None:
    fake = env["fake"]
    fake.run(task("c-2", "python", {"fn": "dtask_test_tasks:pid_then_sleep", "args": [30]}))
    chunk = fake.wait_for(lambda: fake.log_chunks("c-2"), 5, "output of c-2")[0]
    fake.kill("c-2")
    res = fake.wait_result("c-2")
    assert res["outcome"] == p.KILLED and "SIGTERM" in res["error"]
    pid = int(chunk["data"].decode().split("pid=")[1].split()[0])
    assert group_gone(pid)
    again = run(env, "c-3", "python", {"fn": "dtask_test_tasks:pid"})
    assert again["outcome"] == p.SUCCEEDED and unpack(again["result"]) != pid


def test_kill_of_an_unknown_or_finished_attempt_is_ignored(env: dict) -> None:
    fake = env["fake"]
    fake.kill("never-ran")
    fake.kill("sh-1", attempt=1)
    assert run(env, "k-1", "shell", {"cmd": "true"})["outcome"] == p.SUCCEEDED


# -- logs -----------------------------------------------------------------------------

def test_logs_stream_while_running_and_are_complete_afterwards(env: dict) -> None:
    fake = env["fake"]
    fake.run(task("log-1", "shell", {"cmd": "for i in 1 2 3 4 5; do echo line $i; sleep 0.15;"
                                            " done"}))
    fake.wait_for(lambda: fake.log_chunks("log-1"), 5, "a streamed chunk")
    assert fake.result("log-1") is None  # the chunk came while the task was running
    res = fake.wait_result("log-1")
    expected = b"".join(b"line %d\n" % i for i in range(1, 6))
    assert res["log"] == expected
    chunks = fake.log_chunks("log-1")
    offset = 0
    for chunk in chunks:
        assert chunk["offset"] == offset and chunk["worker_id"] == "w-exec"
        offset += len(chunk["data"])
    assert expected.startswith(b"".join(c["data"] for c in chunks))


def test_logs_are_truncated_with_a_marker(env: dict) -> None:
    res = run(env, "log-2", "shell", {"cmd": "head -c 20000 /dev/zero | tr '\\0' a; echo tail"})
    log = res["log"]
    assert res["outcome"] == p.SUCCEEDED and len(log) <= MAX_LOG
    assert log.endswith(b"\n[dtask: output truncated after 8128 bytes]\n")
    assert log.startswith(b"a" * 8128) and b"tail" not in log
    streamed = b"".join(c["data"] for c in env["fake"].log_chunks("log-2"))
    assert log.startswith(streamed)


# -- slots, duplicates, malformed input ----------------------------------------------

def test_slots_and_prefetch_limit_what_runs_and_waits_and_the_rest_is_rejected(
        env: dict) -> None:
    fake = env["fake"]
    held = CONCURRENCY + PREFETCH
    tasks = [task(f"cc-{i}", "shell", {"cmd": "sleep 0.2"}) for i in range(held + 1)]
    fake.run(*tasks)
    extra = fake.wait_result(f"cc-{held}")
    assert extra["outcome"] == p.REJECTED and "no free slot" in extra["error"]
    full = fake.wait_for(lambda: [h for h in fake.messages(p.HEARTBEAT)
                                  if len(h["running"]) == held], 5, "a full heartbeat")
    assert full[0]["credits"] == 0  # prefetched tasks are reported as held (its leases)
    results = [fake.wait_result(f"cc-{i}") for i in range(held)]
    assert all(r["outcome"] == p.SUCCEEDED for r in results)
    # never more than CONCURRENCY at once: the prefetched ones started as slots freed
    events = sorted([(r["started_us"], 1) for r in results]
                    + [(r["finished_us"], -1) for r in results])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == CONCURRENCY
    assert sorted(r["started_us"] for r in results)[CONCURRENCY] >= min(
        r["finished_us"] for r in results)


def test_a_prefetched_task_stuck_behind_long_ones_is_handed_back(env: dict) -> None:
    fake = env["fake"]
    fake.run(*[task(f"hb-long-{i}", "shell", {"cmd": "sleep 1.5"}) for i in range(CONCURRENCY)],
             task("hb-wait", "shell", {"cmd": "echo ran"}))
    sent = time.monotonic()
    res = fake.wait_result("hb-wait", 5)
    waited = time.monotonic() - sent
    # rejected (not run): the leader queues it again at once, without using a retry
    assert res["outcome"] == p.REJECTED and "handed back" in res["error"] and res["log"] == b""
    assert 0.45 <= waited < 1.4, waited  # after PREFETCH_HAND_BACK, before a slot freed
    for i in range(CONCURRENCY):
        assert fake.wait_result(f"hb-long-{i}", 5)["outcome"] == p.SUCCEEDED


def test_cancel_of_a_prefetched_task_reports_it_killed_without_running_it(env: dict) -> None:
    fake = env["fake"]
    fake.run(*[task(f"ck-long-{i}", "shell", {"cmd": "sleep 0.4"}) for i in range(CONCURRENCY)],
             task("ck-wait", "shell", {"cmd": "echo ran"}))
    fake.wait_for(lambda: [h for h in fake.messages(p.HEARTBEAT)
                           if ["ck-wait", 1] in h["running"]], 5, "the prefetched task held")
    fake.kill("ck-wait")
    res = fake.wait_result("ck-wait", 5)
    assert res["outcome"] == p.KILLED and "before it started" in res["error"]
    assert res["log"] == b""
    for i in range(CONCURRENCY):
        assert fake.wait_result(f"ck-long-{i}", 5)["outcome"] == p.SUCCEEDED
    assert len(fake.results("ck-wait")) == 1


def test_a_kill_for_an_attempt_not_leased_here_ends_it_lost_or_rejected_not_cancelled(
        env: dict) -> None:
    """A new leader kills attempts its state does not give this worker; it may push the
    same attempt number again, so their end must not read as a cancel."""
    fake = env["fake"]
    fake.run(*[task(f"nl-run-{i}", "shell", {"cmd": "echo started; sleep 30"})
               for i in range(CONCURRENCY)], task("nl-wait", "shell", {"cmd": "echo ran"}))
    fake.wait_for(lambda: all(fake.log_chunks(f"nl-run-{i}") for i in range(CONCURRENCY)),
                  5, "the running ones to start")
    fake.kill("nl-wait", reason=p.NOT_LEASED)
    held = fake.wait_result("nl-wait", 5)
    assert held["outcome"] == p.REJECTED and held["log"] == b""  # queued again, no retry used
    fake.kill("nl-run-0", reason=p.NOT_LEASED)
    fake.kill("nl-run-1", reason="cancel")
    lost, cancelled = fake.wait_result("nl-run-0", 5), fake.wait_result("nl-run-1", 5)
    assert lost["outcome"] == p.LOST and "does not lease" in lost["error"]
    assert lost["log"] == b"started\n"
    assert cancelled["outcome"] == p.KILLED
    for i in range(2, CONCURRENCY):
        fake.kill(f"nl-run-{i}")  # no reason: a cancel, as from an older scheduler
        assert fake.wait_result(f"nl-run-{i}", 5)["outcome"] == p.KILLED


def test_a_duplicate_run_of_a_running_attempt_is_ignored(env: dict) -> None:
    fake = env["fake"]
    t = task("dup-1", "shell", {"cmd": "sleep 0.3; echo once"})
    fake.run(t)
    fake.run(t)
    res = fake.wait_result("dup-1")
    fake.run(t)  # finished and acknowledged: a repeated run must not run it again
    time.sleep(0.5)  # longer than the task takes
    assert run(env, "dup-2", "shell", {"cmd": "true"})["outcome"] == p.SUCCEEDED
    assert res["log"] == b"once\n" and len(fake.results("dup-1")) == 1


def test_a_re_push_after_a_refused_result_runs_again(env: dict) -> None:
    """A new leader that refused a result (its lease was not applied yet) and leases
    the same attempt again must get a run and a result, not silence."""
    fake = env["fake"]
    t = task("again-1", "shell", {"cmd": "echo ran"})
    fake.refuse_results = 1
    fake.run(t)
    fake.wait_result("again-1")
    fake.wait_for(lambda: fake.refuse_results <= 0 or None, 5, "the refusing ack")
    time.sleep(0.2)  # let the worker process the refusal
    fake.run(t)
    fake.wait_for(lambda: len(fake.results("again-1")) >= 2 or None, 10, "a second result")
    assert [r["log"] for r in fake.results("again-1")] == [b"ran\n", b"ran\n"]


def test_malformed_messages_do_not_crash_the_worker(env: dict) -> None:
    fake = env["fake"]
    for frame in (b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"v": 99, "t": "run"}),
                  p.pack({"v": 1, "t": 5}), p.pack({"v": 1, "t": "run", "tasks": "x"}),
                  p.pack({"v": 1, "t": "run", "tasks": [None, {"task_id": "a b"}]}),
                  p.pack({"v": 1, "t": "run", "tasks": [{"task_id": "m-0", "attempt": "1"}]}),
                  p.pack({"v": 1, "t": "kill"}), p.pack({"v": 1, "t": "result_ack"}),
                  p.pack({"v": 1, "t": "bogus"}), p.pack({"v": 1, "t": "registered"}),
                  p.pack({"v": 1, "t": "error", "code": "WHAT"})):
        fake.send(frame)
    fake.run({"task_id": "m-1", "attempt": 1, "type": "shell", "payload": "not bytes"})
    res = fake.wait_result("m-1")
    assert res["outcome"] == p.ERRORED and "bad run message" in res["error"]
    fake.run({"attempt": 1}, task("m-3", "shell", {"cmd": "true"}))  # the bad one is skipped
    assert fake.wait_result("m-3")["outcome"] == p.SUCCEEDED
    assert run(env, "m-2", "shell", {"cmd": "echo still here"})["log"] == b"still here\n"
    assert env["worker"].proc.poll() is None
    assert "event=bad_message" in env["worker"].output()


def test_a_result_is_resent_until_acknowledged(env: dict) -> None:
    fake = env["fake"]
    fake.drop_results = 2
    fake.run(task("ack-1", "shell", {"cmd": "echo x"}))
    fake.wait_for(lambda: len(fake.results("ack-1")) >= 3, 5, "two resends")
    time.sleep(1.0)  # > 3 resend intervals: an acknowledged result is not sent again
    copies = fake.results("ack-1")
    assert len(copies) == 3
    assert all(c["outcome"] == p.SUCCEEDED and c["log"] == b"x\n" for c in copies)
    assert len({c["id"] for c in copies}) == 3


def test_results_finishing_while_a_batch_is_unacked_travel_together(env: dict) -> None:
    """One `results` batch in flight at a time: what finishes before its ack goes in the
    next one, so a busy worker sends one message per leader round trip, not per task."""
    fake = env["fake"]
    fake.hold_acks = True
    ids = [f"tog-{i}" for i in range(CONCURRENCY + PREFETCH)]
    fake.run(*[task(i, "python", {"fn": "builtins:int"}) for i in ids])
    fake.wait_for(lambda: all(fake.results(i) for i in ids), 5, "every result")
    fake.release_acks()
    firsts = [fake.results(i)[0] for i in ids]
    assert all(c["batch"] and c["outcome"] == p.SUCCEEDED for c in firsts)
    sizes = [len(b) for b in fake.batches if b[0] in ids]
    assert sum(sizes) >= len(ids) and max(sizes) > 1, sizes  # some travelled together
    time.sleep(1.0)  # > 3 resend intervals: acknowledged in batches, never sent again
    counts = {i: len(fake.results(i)) for i in ids}
    time.sleep(1.0)
    assert {i: len(fake.results(i)) for i in ids} == counts


def test_a_refused_batch_is_resent_result_by_result(env: dict) -> None:
    fake = env["fake"]
    fake.refuse_batches = 1
    fake.run(task("rb-1", "shell", {"cmd": "echo y"}))
    copies = fake.wait_for(lambda: (c := fake.results("rb-1")) and len(c) >= 2 and c, 5,
                           "the result again, on its own")
    assert copies[0]["batch"] and not copies[1].get("batch")
    assert copies[1]["outcome"] == p.SUCCEEDED and copies[1]["log"] == b"y\n"


def test_a_leader_that_takes_no_batches_gets_one_result_per_message(env: dict) -> None:
    """A leader whose `registered` does not say batch_results (an older version) is sent
    plain `result` messages."""
    fake = env["fake"]
    before = len(fake.messages(p.REGISTER))
    fake.batch_results = False
    try:
        fake.unknown_worker = 1
        fake.wait_for(lambda: len(fake.messages(p.REGISTER)) > before, 5, "a new register")
        ids = [f"nb-{i}" for i in range(CONCURRENCY)]
        fake.run(*[task(i, "python", {"fn": "builtins:int"}) for i in ids])
        fake.wait_for(lambda: all(fake.results(i) for i in ids), 5, "every result")
        assert not any(fake.results(i)[0].get("batch") for i in ids)
    finally:
        fake.batch_results = True
        before = len(fake.messages(p.REGISTER))
        fake.unknown_worker = 1
        fake.wait_for(lambda: len(fake.messages(p.REGISTER)) > before, 5, "a new register")
