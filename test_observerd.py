"""Tests for observerd: the store as a library, and the daemon through real HTTP.

In-process servers run on an ephemeral loopback port; crash, restart, signal and disk-full
behaviour runs the daemon as a real subprocess. Waits poll with a deadline, never sleep blindly.

The sections follow observerd.py's, in its order and under its names (``grep -nF '# [SECTION]'``
lists both), after one Helpers section holding every fixture and helper; the scenarios no one
section owns (crashes under load, fuzzing) come last, then the tests of the deploy files.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import gzip
import http.client
import io
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import stat
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import tracemalloc
import urllib.parse
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest

import observerd as od

HERE = Path(__file__).resolve().parent
DAEMON = HERE / "observerd.py"


# -----------------------------------------------------------------------------
# [SECTION] Helpers
# -----------------------------------------------------------------------------

def wait_for(predicate, timeout=30.0, interval=0.01, what="condition"):
    """Poll predicate until it returns truthy; fail the test after timeout seconds.

    The deadline only bounds how long a broken build hangs: it is never what a test measures,
    so it is generous for a slow disk and a busy CPU.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def dev_full(folder: Path) -> Path:
    """A node of /dev/full (every write fails with ENOSPC) in folder, so that the journal's lock
    file goes beside it there, not into /dev."""
    node = folder / "full"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.stat("/dev/full").st_rdev)
    except PermissionError:
        pytest.skip("needs root, to make a node of /dev/full")
    return node


def write_config(folder: Path, observerd: dict | None = None, auth: dict | None = None,
                 extra: str = "") -> Path:
    """A lakehouse.toml with the given [observerd] and [auth] tables; bind, unless given, on a free
    port, as check tries it and the default one may be taken on this machine."""
    observerd = {"bind": "127.0.0.1:0", **(observerd or {})}

    def table(name, values):
        lines = [f"[{name}]"]
        for key, value in (values or {}).items():
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"
    path = folder / "lakehouse.toml"
    path.write_text(extra + table("observerd", observerd) + table("auth", auth))
    return path


def write_settings(folder: Path, settings: dict) -> Path:
    """A lakehouse.toml holding settings; `token` goes to the [auth] table."""
    settings = dict(settings)
    auth = {"token": settings.pop("token")} if "token" in settings else None
    return write_config(folder, settings, auth)


def make_config(tmp_path: Path, **settings) -> od.Config:
    """Load a Config the way the daemon does, from a file holding settings."""
    settings.setdefault("bind", "127.0.0.1:0")
    settings.setdefault("persist_path", str(tmp_path / "ops.jsonl"))
    settings.setdefault("runtime_dir", str(tmp_path / "run"))  # never the host's /dev/shm
    return od.load_config(str(write_settings(tmp_path, settings)), environ={})


class Client:
    """A keep-alive JSON client for one server."""

    def __init__(self, port: int, token: str | None = None, timeout: float = 30):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.token = token

    def request(self, method: str, path: str, body=None, headers=None):
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None), resp

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def close(self):
        self.conn.close()


class InProcessServer:
    """observerd's daemon, built as serve builds it, running on threads of the test process."""

    def __init__(self, config: od.Config):
        self.config = config
        self.daemon = od.RunningDaemon(config, reap_every_s=0.05, accept_poll_s=0.05)
        self.store, self.server, self.port = self.daemon.store, self.daemon.server, self.daemon.port
        self.daemon.restore()

    def client(self, **kw) -> Client:
        return Client(self.port, **kw)

    def close(self):
        self.daemon.stop(grace_s=1.0)


def started_by_test(make, stop):
    """A fixture's body: yields make(...) to the test, and stops all it made at teardown."""
    started = []

    def start(*args, **kw):
        thing = make(*args, **kw)
        started.append(thing)
        return thing

    yield start
    for thing in started:
        stop(thing)


@pytest.fixture
def serve(tmp_path):
    """Start an in-process server with the given settings; all are stopped at teardown."""
    numbers = itertools.count()

    def make(**settings) -> InProcessServer:
        folder = tmp_path / f"server{next(numbers)}"
        folder.mkdir()
        settings.setdefault("persist_path", str(folder / "ops.jsonl"))
        return InProcessServer(make_config(folder, **settings))

    yield from started_by_test(make, InProcessServer.close)


def default_sigint(then=None):
    """A preexec_fn: SIGINT back to its default in the child, then `then`. A suite started as a
    background job (nohup, `make test &`, some CI runners) has SIGINT ignored, and every child
    inherits that: one the test stops with SIGINT would never stop."""
    def preexec():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if then is not None:
            then()
    return preexec


class Daemon:
    """observerd.py as a real subprocess; its stderr is collected by a reader thread."""

    def __init__(self, folder: Path, args=(), config: Path | None = None, env=None,
                 preexec_fn=None, cwd=None, script: Path = DAEMON):
        argv = [sys.executable, str(script)]
        if config is not None:
            argv += ["--config", str(config)]
        argv += list(args)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd or folder,
            env={**os.environ, **(env or {})}, preexec_fn=default_sigint(preexec_fn),
        )
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        self.port = None

    def _collect(self):
        for line in self.proc.stderr:
            self._lines.append(line.decode(errors="replace"))

    @property
    def log(self) -> str:
        return "".join(self._lines)

    def wait_listening(self, timeout=60.0, restored=True) -> "Daemon":
        """Until it listens and (restored) has restored its ring: it answers before that, but
        serves and stores no ops."""
        def listening():
            log = self.log
            done = not restored or 'msg="restored ops"' in log or "persist_path=(ephemeral)" in log
            for line in list(self._lines):
                if "msg=listening" in line and done:
                    return line.split("addr=")[1].split()[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log}")
            return None
        addr = wait_for(listening, timeout, what="daemon to listen")
        self.port = int(addr.rsplit(":", 1)[1])
        return self

    def client(self, **kw) -> Client:
        return Client(self.port, **kw)

    def exit_status(self, timeout=60.0) -> int:
        status = self.proc.wait(timeout)
        self._reader.join(timeout)
        return status

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.exit_status()


@pytest.fixture
def daemons():
    """Start subprocess daemons; any still running at teardown are killed."""
    yield from started_by_test(Daemon, Daemon.stop)


def start_durable_daemon(daemons, folder: Path, **settings) -> Daemon:
    settings.setdefault("bind", "127.0.0.1:0")
    settings.setdefault("persist_path", "ops.jsonl")
    settings.setdefault("runtime_dir", "run")  # never the host's /dev/shm
    return daemons(folder, config=write_settings(folder, settings)).wait_listening()


def raw_exchange(port: int, data: bytes, timeout=30.0) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it (nothing if it
    holds the connection open past timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            return read_until_closed(sock)
        except socket.timeout:
            return b""


def read_until_closed(sock) -> bytes:
    """Everything the server sends on sock until it closes the connection."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def read_head(stream) -> tuple[int, dict[str, str]]:
    """Status and headers (names in lower case) of the next response on a binary stream."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def parse_response(raw: bytes) -> tuple[int, dict | None]:
    """Status and JSON body of the first HTTP response in raw bytes."""
    stream = io.BytesIO(raw)
    status, headers = read_head(stream)
    body = stream.read(int(headers.get("content-length", 0)))
    return status, (json.loads(body) if body else None)


def in_threads(target, count: int, timeout=60.0) -> None:
    """Run target(0) ... target(count - 1) on threads at once and wait for them all."""
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


class Writers:
    """`count` threads, each posting its own numbered ops on its own connection until stop();
    `acked` holds the endpoints answered 200. A writer whose connection fails stops."""

    def __init__(self, port: int, count: int, event=lambda n, i: {"endpoint": f"/w{n}/{i}"}):
        self.acked: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(port, n, event)) for n in range(count)]
        for t in self._threads:
            t.start()

    def _write(self, port, n, event):
        client = Client(port)
        i = 0
        while not self._stop.is_set():
            body = event(n, i)
            try:
                status, _, _ = client.post("/observer/event", body)
            except (OSError, http.client.HTTPException):
                return
            if status == 200:
                self.acked.append(body["endpoint"])
            i += 1

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(10)


def replay_forward(path: Path) -> list[dict]:
    """Every valid op of a JSONL file, read front to back: the reference for restore_journal."""
    ops = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            ops.append(od.validate_op(od.parse_json_strict(line)))
        except od.InvalidOp:
            pass
    return ops


def op(endpoint="/e", **fields) -> dict:
    return od.validate_op({"endpoint": endpoint, **fields})


def plain(value):
    """A value holding RingOps as the JSON a client receives: the ops decoded."""
    return json.loads(od.encode_json(value))


def stats_of(ops, ring_size=2000, recent=10) -> dict:
    ring = od.Ring(ring_size, recent)
    for o in ops:
        ring.apply(od.RingOp(o))
    return plain(ring.stats())


class FsyncSpy:
    """Wraps os.fsync for the journal: counts calls, can slow them, fail chosen ones, or (held)
    hold every one until release(), so that commits stay in flight as long as a test needs;
    `entered` is set once a call has begun."""

    def __init__(self, monkeypatch, log_name="ops.jsonl", delay=0.0, fail_calls=(), held=False):
        self.calls = 0
        self.entered = threading.Event()
        self._released = threading.Event()
        if not held:
            self._released.set()
        self.delay = delay
        self.fail_calls = set(fail_calls)
        self.log_name = log_name
        self.lock = threading.Lock()
        real = os.fsync

        def fsync(fd):
            if not os.readlink(f"/proc/self/fd/{fd}").endswith(log_name):
                return real(fd)
            with self.lock:
                self.calls += 1
                call = self.calls
            self.entered.set()
            self._released.wait(60)
            time.sleep(self.delay)
            if call in self.fail_calls:
                raise OSError(5, "Input/output error")
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def release(self):
        self._released.set()


class FakeService:
    """A loopback HTTP service recording each POST in `requests` as (path, headers with
    lower-cased names, JSON body, body bytes). It answers `reply` with `status` and `reason`,
    on `path` only when given (404 elsewhere); with `hold`, every request waits until the
    event is set, as close() does."""

    def __init__(self, status=200, reply=None, hold: threading.Event | None = None,
                 path: str | None = None, reason: str | None = None):
        self.requests: list[tuple[str, dict, object, int]] = []
        self.hold = hold
        fake = self

        class Handler(od.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {name.lower(): value for name, value in self.headers.items()}
                fake.requests.append((self.path, headers, json.loads(raw), len(raw)))
                if hold is not None:
                    hold.wait(120)
                code, payload = status, json.dumps(reply if reply is not None else {"ok": True}).encode()
                if path is not None and self.path != path:
                    code, payload = 404, b"{}"
                try:
                    self.send_response(code, reason)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # observerd gave up on it

            def log_message(self, *args):
                pass

        self.server = od.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def received(self) -> list[tuple[str, object]]:
        """(path, JSON body) of each POST."""
        return [(path, body) for path, _, body, _ in self.requests]

    def close(self):
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_service():
    yield from started_by_test(FakeService, FakeService.close)


def correction(n) -> bytes:
    return json.dumps({"endpoint": f"/fix/{n}", "success": True, "input_summary": f"set retries={n}"}).encode() + b"\n"


def append_to(path: Path, data: bytes) -> None:
    """Append as the overseer does: another process adding lines to the corrections file."""
    with open(path, "ab") as f:
        f.write(data)


def endpoints(store) -> list[str]:
    return [o["endpoint"] for o in store.snapshot()]


def failures(endpoint, n, error="upstream 502 for job {i}"):
    return [{"endpoint": endpoint, "error": error.format(i=i)} for i in range(n)]


def review(server, **query):
    status, body, _ = server.client().post("/observer/review", query)
    assert status == 200, body
    return body


METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'


SAMPLE = re.compile(rf"({METRIC_NAME})(\{{(?:{LABEL})(?:,{LABEL})*\}})? (\S+)")


HELP = re.compile(rf"# HELP ({METRIC_NAME}) (.*)")


TYPE = re.compile(rf"# TYPE ({METRIC_NAME}) (counter|gauge|histogram|summary|untyped)")


def parse_exposition(text: str) -> dict[str, dict]:
    """Check Prometheus text format 0.0.4 line by line; returns {family: {type, samples}}."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    for line in text.splitlines():
        if match := HELP.fullmatch(line):
            families.setdefault(match[1], {"type": None, "samples": []})
        elif match := TYPE.fullmatch(line):
            family = families.setdefault(match[1], {"type": None, "samples": []})
            assert family["type"] is None and not family["samples"], f"TYPE after samples: {line}"
            family["type"] = match[2]
        else:
            match = SAMPLE.fullmatch(line)
            assert match, f"not a valid sample line: {line!r}"
            name, labels, value = match[1], match[2] or "", match[3]
            float(value.replace("+Inf", "inf"))
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            family = families.get(name) or families.get(base)
            assert family and family["type"], f"sample before its TYPE: {line}"
            if family["type"] != "histogram":
                assert name in families
            family["samples"].append((name, dict(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', labels)),
                                      float(value.replace("+Inf", "inf"))))
    return families


def sample(families, family, name=None, **labels) -> float:
    for sample_name, sample_labels, value in families[family]["samples"]:
        if sample_name == (name or family) and sample_labels == {k: str(v) for k, v in labels.items()}:
            return value
    raise AssertionError(f"no sample {name or family} {labels}")


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, str(DAEMON), *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd, env={**os.environ, **(env or {})})


def read_responses(sock, count: int) -> list[tuple[int, dict]]:
    """Read `count` HTTP responses off one connection."""
    stream = sock.makefile("rb")
    answers = []
    for _ in range(count):
        status, headers = read_head(stream)
        answers.append((status, json.loads(stream.read(int(headers.get("content-length", 0))))))
    return answers


MIB = 1024 * 1024


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def logged_problems(log_text: str) -> list[str]:
    """The problems of the daemon's one `invalid config` line, as check prints them."""
    line = next(ln for ln in log_text.splitlines() if 'msg="invalid config"' in ln)
    return json.loads(line.split(" problem=", 1)[1]).split("; ")


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


KNOWN_REJECTION_REASONS = ("invalid", "unauthorized", "length_required", "too_large", "unsupported_encoding",
                           "persist_failed", "too_many_connections")


def endpoint_series(families) -> dict[tuple[str, str], float]:
    return {(labels["endpoint"], labels["success"]): value
            for _, labels, value in families["observerd_endpoint_events_total"]["samples"]}


def readme_settings_table() -> list[tuple[str, object, object, object]]:
    """(key, default, minimum, maximum) for each key of README.md's Configuration table, as TOML values."""
    text = (HERE / "README.md").read_text()
    section = text[text.index("## Configuration"):]
    section = section[:section.index("\n## ", 1)]

    def toml_value(cell):
        literal = cell.strip().strip("`")
        return tomllib.loads(f"v = {literal}")["v"] if literal else None

    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            keys, default, minimum, maximum = line.split(" | ")[:4]
            for key in re.findall(r"`([^`]+)`", keys):
                rows.append((key, toml_value(default), toml_value(minimum), toml_value(maximum)))
    return rows


def check_and_serve_refuse(folder: Path, settings: dict, daemons) -> list[str]:
    """The problems check prints for these settings; serve must refuse with the same ones."""
    config = write_config(folder, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl", **settings})
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    printed = [line.split(": ", 1)[1] for line in result.stderr.splitlines()[:-1]]
    daemon = daemons(folder, config=config)
    assert daemon.exit_status() == 2
    assert logged_problems(daemon.log) == printed
    assert "msg=listening" not in daemon.log and "Traceback" not in daemon.log
    return printed


def link_to_journal(kind: str):
    def make(folder: Path) -> None:
        (folder / "ops.jsonl").write_bytes(od.encode_line(op("/acked")))
        (os.symlink if kind == "symlink" else os.link)(folder / "ops.jsonl", folder / "other.jsonl")
    return make


def make_fifo(name):
    return lambda folder: os.mkfifo(folder / name)


def make_folder(name, mode=None, owner=None):
    def make(folder: Path) -> None:
        (folder / name).mkdir()
        if mode is not None:
            os.chmod(folder / name, mode)
        if owner is not None:
            os.chown(folder / name, owner, -1)
    return make


def make_symlink_loop(name):
    def make(folder: Path) -> None:
        os.symlink(f"{name}.again", folder / name)
        os.symlink(name, folder / f"{name}.again")
    return make


LONE_SURROGATE_OPS = [
    ('{"endpoint": "/e\\ud800"}', "endpoint"),
    ('{"endpoint": "/e", "error": "bad \\udfff"}', "error"),
    ('{"endpoint": "/e", "extra": {"spans": [1, "\\ud83d"]}}', "extra.spans[1]"),
    ('{"endpoint": "/e", "extra": {"\\ud800": 1}}', "extra"),
    ('{"endpoint": "/e", "\\udc00": 1}', "body"),
]


def dicts(ring_ops) -> list[dict]:
    return [o.to_dict() for o in ring_ops]


def limit_file_size(max_bytes):
    """preexec_fn: writes past max_bytes fail with EFBIG instead of killing the process."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # Only the soft limit: the test raises it again later to play a disk that recovers.
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))
    return apply


def messy_log(rng: random.Random, n: int) -> bytes:
    """JSONL with corrupt lines, invalid ops, blank lines, unicode, and maybe a torn tail."""
    out = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.1:
            out.append(b'{"endpoint": "/corrupt", ' + b"x" * rng.randint(0, 300) + b"\n")
        elif roll < 0.15:
            out.append(b'{"source": "mcp"}\n')
        elif roll < 0.2:
            out.append(b"\n" * rng.randint(1, 3) + b"   \n")
        else:
            o = op(f"/op{i}", source=rng.choice(od.SOURCES), success=rng.random() < 0.5,
                   note="é" * rng.randint(0, 200))
            out.append(od.encode_line(o))
    data = b"".join(out)
    if rng.random() < 0.5:
        data += b'{"endpoint": "/torn", "sou'
    return data


def count_reads(monkeypatch) -> list[int]:
    """The sizes of every read observerd makes from files it opens from now on."""
    reads = []
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_pread = os.pread

    def counting_pread(fd, n, offset):
        data = real_pread(fd, n, offset)
        reads.append(len(data))
        return data

    monkeypatch.setattr(od, "open", lambda *a, **k: CountingFile(real_open(*a, **k)), raising=False)
    monkeypatch.setattr(os, "pread", counting_pread)
    return reads


def endpoints_in(path: Path) -> list[str]:
    """The endpoints of a JSONL file, every line of which must be a whole, valid op."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path.name} ends in a partial line"
    return [od.validate_op(od.parse_json_strict(line))["endpoint"] for line in data.splitlines()]


def open_fds(pid: int) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}


def limit_cpu_seconds(seconds):
    """preexec_fn: the process is killed after using this much CPU time, however busy the machine."""
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
    return apply


def start_journaling_in_a_folder(daemons, tmp_path: Path):
    """A daemon whose journal is data/ops.jsonl, that path, and post(endpoint) -> status."""
    daemon = start_durable_daemon(daemons, tmp_path, persist_path="data/ops.jsonl")
    client = daemon.client()

    def post(endpoint):
        return client.post("/observer/event", {"endpoint": endpoint})[0]

    return daemon, tmp_path / "data" / "ops.jsonl", post


# observerd's main with faults in the journal's system calls, as a control file names them
# (fsync, ftruncate, record, close): EIO, as a failing disk gives. The product has no hook.
FAULTY_OBSERVERD = """
import errno, os, sys
sys.path.insert(0, sys.argv.pop(1))
control = sys.argv.pop(1)
import observerd

def faults():
    try:
        with open(control) as f:
            return f.read().split()
    except FileNotFoundError:
        return []

def journal(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith("/ops.jsonl")
    except OSError:
        return False

def failing(name, real, applies):
    def call(*args):
        if applies(*args) and name in faults():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(*args)
    return call

os.fsync = failing("fsync", os.fsync, journal)
os.ftruncate = failing("ftruncate", os.ftruncate, lambda fd, length: journal(fd))
os.replace = failing("record", os.replace, lambda source, target: str(target).endswith(".unsynced"))
os.replace = failing("forensics", os.replace, lambda source, target: ".unsynced-" in str(target))
os.close = failing("close", os.close, journal)
sys.argv[0] = observerd.__file__
sys.exit(observerd.main())
"""


class FaultyDaemon:
    """A daemon whose journal's system calls fail while its control file names them."""

    def __init__(self, daemons, folder: Path):
        self.daemons, self.folder = daemons, folder
        self.script = folder / "faulty_observerd.py"
        self.script.write_text(FAULTY_OBSERVERD)
        self.control = folder / "faults"
        self.config = write_settings(folder, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl",
                                              "runtime_dir": "run"})
        self.journal = folder / "ops.jsonl"

    def inject(self, *faults: str) -> None:
        self.control.write_text(" ".join(faults))

    def start(self, wait=True) -> Daemon:
        daemon = self.daemons(self.folder, args=[str(HERE), str(self.control), "--config", str(self.config)],
                              script=self.script)
        return daemon.wait_listening() if wait else daemon

    def records(self) -> list[list]:
        return [entry for record in (self.folder / "run").glob("*.unsynced")
                for entry in json.loads(record.read_text())["ranges"]]


def post_op(client, op_id: str, endpoint: str = "/e"):
    return client.post("/observer/event", {"endpoint": endpoint, "op_id": op_id,
                                           "timestamp": "2026-12-06T04:00:00Z"})


# Ops of about n encoded bytes whose decoded form costs far more (or far less) than n.
HOSTILE_SHAPES = {
    "empty objects": lambda n: op("/h", x=[{}] * (n // 3)),
    "empty arrays": lambda n: op("/h", x=[[]] * (n // 3)),
    "one-char strings": lambda n: op("/h", x=["a"] * (n // 4)),
    "small numbers": lambda n: op("/h", x=[1.5] * (n // 4)),
    "nested": lambda n: op("/h", x=[[[[{"a": [1]}]]]] * (n // 20)),
    "huge error": lambda n: op("/h", error="boom " * (n // 5)),
    "huge endpoint": lambda n: op("/h" * (n // 2)),
    "astral error": lambda n: op("/h", error="\U0001F525" + "e" * n),
}


def fisher_by_enumeration(a, b, c, d) -> float:
    """Two-sided Fisher p by exact rational arithmetic over every table with the margins."""
    from fractions import Fraction
    row, other, column = a + b, c + d, a + c
    tables = {x: Fraction(math.comb(row, x) * math.comb(other, column - x), math.comb(row + other, column))
              for x in range(max(0, column - other), min(column, row) + 1)}
    return float(sum(p for p in tables.values() if p <= tables[a]))


def u_by_enumeration(baseline, candidate) -> tuple[float, float]:
    """The candidate's U by counting pairs, and the exact two-sided p by trying every way of
    splitting the pooled values into two groups of those sizes (values distinct)."""
    def u_of(old, new):
        return sum((n > o) + 0.5 * (n == o) for n in new for o in old)
    pooled = baseline + candidate
    u = u_of(baseline, candidate)
    extreme = max(u, len(baseline) * len(candidate) - u)
    splits = list(itertools.combinations(range(len(pooled)), len(candidate)))
    at_least = sum(u_of([pooled[i] for i in range(len(pooled)) if i not in chosen], [pooled[i] for i in chosen])
                   >= extreme for chosen in splits)
    return u, min(1.0, 2 * at_least / len(splits))


class RawService:
    """A loopback HTTP service that answers every request with `response`, raw: the first
    `at_once` bytes at once, then one byte every `byte_interval_s`, then it closes."""

    def __init__(self, response: bytes, at_once: int | None = None, byte_interval_s: float = 0.0):
        self.response, self.byte_interval_s = response, byte_interval_s
        self.at_once = len(response) if at_once is None else at_once
        self.requests = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(sock,), daemon=True).start()

    def _answer(self, sock):
        with sock:
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536) or b"\r\n\r\n"
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < length:
                body += sock.recv(65536) or b" " * length
            self.requests += 1
            try:
                sock.sendall(self.response[:self.at_once])
                for i in range(self.at_once, len(self.response)):
                    if self._stop.wait(self.byte_interval_s):
                        return
                    sock.sendall(self.response[i:i + 1])
            except OSError:
                pass

    def close(self):
        self._stop.set()
        self._listener.close()


@pytest.fixture
def raw_service():
    yield from started_by_test(RawService, RawService.close)


def http_answer(body: bytes, content_length: int | None = None) -> bytes:
    length = len(body) if content_length is None else content_length
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length) + body


SLOW_ANSWER = http_answer(json.dumps({"response": "x" * 60, "done": True}).encode())


def raw_post(path: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (path, len(body), headers, body)


def assert_healthy(port) -> None:
    status, _ = parse_response(raw_exchange(port, b"GET /observer/health HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 200


def open_slow_requests(port: int, count: int) -> list[socket.socket]:
    """Connections that each send the start of a request and then stall."""
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    for sock in slow:
        sock.sendall(b"GET /observer/health HTTP/1.1\r\nX-Slow: ")
    return slow


HUGE_DIGITS = b'{"endpoint": "/e", "n": ' + b"9" * 10000 + b"}"


MALFORMED = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "request line with too many words": b"GET / HTTP/1.1 extra\r\n\r\n",
    "huge request line": b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    "huge header": b"GET /observer/health HTTP/1.1\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n",
    "too many headers": b"GET /observer/health HTTP/1.1\r\n" + b"X-H: 1\r\n" * 200 + b"\r\n",
    "non-numeric length": b"POST /observer/event HTTP/1.1\r\nContent-Length: ten\r\n\r\n{}",
    "negative length": b"POST /observer/event HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}",
    "conflicting lengths": b"POST /observer/event HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "absurd length": b"POST /observer/event HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "truncated body": b"POST /observer/event HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"endpoint\":",
    "invalid UTF-8": b"POST /observer/event HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"endpoint\": \"\xff\xfe\"}  ",
    "deep nesting": b"POST /observer/event HTTP/1.1\r\nContent-Length: 200000\r\n\r\n" + b"[" * 200000,
    "NaN": b"POST /observer/event HTTP/1.1\r\nContent-Length: 36\r\n\r\n{\"endpoint\": \"/e\", \"duration_ms\": NaN}",
    "Infinity": b"POST /observer/event HTTP/1.1\r\nContent-Length: 27\r\n\r\n{\"endpoint\": \"/e\", \"x\": -Infinity}",
    "duplicate keys": b"POST /observer/event HTTP/1.1\r\nContent-Length: 34\r\n\r\n{\"endpoint\": \"/a\", \"endpoint\": \"/b\"}",
    "10,000-digit number": b"POST /observer/event HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(HUGE_DIGITS) + HUGE_DIGITS,
    "body is a string": b"POST /observer/event HTTP/1.1\r\nContent-Length: 5\r\n\r\n\"abc\"",
    "body is an array": b"POST /observer/event HTTP/1.1\r\nContent-Length: 18\r\n\r\n[{\"endpoint\":\"/e\"}]",
    "body is null": b"POST /observer/event HTTP/1.1\r\nContent-Length: 4\r\n\r\nnull",
    "empty body": b"POST /observer/event HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
}


def send_until_refused(sock: socket.socket, data: bytes) -> None:
    """sendall that stops quietly when the peer closes or resets the connection."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def served_keep_alive(server: InProcessServer) -> socket.socket:
    """A connection that has had one request answered and whose handler waits for the next."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /observer/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_responses(sock, 1)[0][0] == 200
    client_end = sock.getsockname()

    def waiting_for_next_request():
        for server_end, (phase, _) in list(server.server.connections._open.items()):
            try:
                if server_end.getpeername() == client_end:
                    return phase == od.ConnectionTracker.IDLE
            except OSError:
                pass
        return False

    wait_for(waiting_for_next_request, what="the handler to wait for the next request")
    return sock


GET_ROUTES = ["/observer/health", "/observer/stats", "/observer/errors", "/observer/playbooks",
              "/observer/escalations", "/observer/ops", "/metrics"]


def op_of_size(size: int) -> bytes:
    """A valid op encoded in exactly size bytes."""
    head = b'{"endpoint": "/sized", "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def rejections(server: InProcessServer, token: str | None = None) -> dict[str, float]:
    """observerd_rejected_total by reason, as GET /metrics exports it."""
    client = server.client(token=token)
    try:
        client.conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
        families = parse_exposition(client.conn.getresponse().read().decode())
    finally:
        client.close()
    return {labels["reason"]: value for _, labels, value in families["observerd_rejected_total"]["samples"]}


def fail_reviews(monkeypatch):
    def review_ops(ops):
        raise RuntimeError("a bug in a handler")
    monkeypatch.setattr(od, "review_ops", review_ops)


# (settings, request, status, reason it is counted under or None, fault to inject)
ERROR_ANSWERS = {
    "invalid op": ({}, raw_post(b"/observer/event", b'{"endpoint": ""}'), 400, "invalid", None),
    "invalid query": ({}, b"GET /observer/ops?limit=0 HTTP/1.1\r\n\r\n", 400, "invalid", None),
    "malformed request line": ({}, b"GET /observer/health\r\n\r\n", 400, "invalid", None),
    "request line ended early": ({}, b"GET /observer/hea", 400, "invalid", None),
    "conflicting lengths": ({}, b"POST /observer/event HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
                            400, "invalid", None),
    "bad gzip": ({}, raw_post(b"/observer/event", b"\x1f\x8bnot gzip", b"Content-Encoding: gzip\r\n"),
                 400, "invalid", None),
    "no token": ({"token": "t0ken"}, b"GET /observer/stats HTTP/1.1\r\n\r\n", 401, "unauthorized", None),
    "no route": ({}, b"GET /nowhere HTTP/1.1\r\n\r\n", 404, None, None),
    "wrong method": ({}, b"DELETE /observer/event HTTP/1.1\r\n\r\n", 405, None, None),
    "no length": ({}, b"POST /observer/review HTTP/1.1\r\nHost: x\r\n\r\n", 411, "length_required", None),
    "body over the cap": ({"max_body_bytes": 100}, raw_post(b"/observer/event", b"{}" * 60), 413, "too_large", None),
    "batch over the cap": ({"max_batch": 1}, raw_post(b"/observer/events", b'[{"endpoint": "/a"}, {"endpoint": "/b"}]'),
                           413, "too_large", None),
    "unknown encoding": ({}, raw_post(b"/observer/event", b"{}", b"Content-Encoding: br\r\n"),
                         415, "unsupported_encoding", None),
    "too many headers": ({}, b"GET /observer/health HTTP/1.1\r\n" + b"X-H: 1\r\n" * 101 + b"\r\n", 431, "invalid", None),
    "handler bug": ({}, raw_post(b"/observer/review", b"{}"), 500, None, fail_reviews),
    "unknown method": ({}, b"BREW /observer/health HTTP/1.1\r\n\r\n", 501, None, None),
    "disk full": ({"persist_path": dev_full}, raw_post(b"/observer/event", b'{"endpoint": "/e"}'),
                  503, "persist_failed", None),
    "HTTP/2": ({}, b"GET /observer/health HTTP/2.0\r\n\r\n", 505, None, None),
    "request line too long": ({}, b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n", 414, None, None),
}


def chunked(body: bytes, sizes=(7,), extension=b"", trailers=b"") -> bytes:
    """body in chunks of the given sizes (the last repeated), then the last chunk and trailers."""
    out, at, sizes = [], 0, list(sizes)
    while at < len(body):
        size = sizes.pop(0) if len(sizes) > 1 else sizes[0]
        piece = body[at:at + size]
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece))
        at += size
    return b"".join(out) + b"0\r\n" + trailers + b"\r\n"


def post_chunked(port: int, path: bytes, framed: bytes, headers: bytes = b"") -> tuple[int, dict | None]:
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n%s\r\n" % (path, headers)
    return parse_response(raw_exchange(port, head + framed))


GUARDED_ROUTES = [
    ("GET", "/observer/stats", None), ("POST", "/observer/event", {"endpoint": "/e"}),
    ("POST", "/observer/events", [{"endpoint": "/e"}]), ("GET", "/observer/errors", None),
    ("GET", "/observer/playbooks", None), ("GET", "/observer/escalations", None),
    ("POST", "/observer/review", {}), ("GET", "/observer/ops", None), ("GET", "/metrics", None),
    ("GET", "/observer/timeline", None),
    ("HEAD", "/observer/stats", None), ("HEAD", "/observer/ops", None), ("HEAD", "/metrics", None),
    ("GET", "/observer/ready", None), ("HEAD", "/observer/ready", None),
    ("GET", "/observer/history", None),
]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/api/run"


def make_tailer(tmp_path, corrections: Path):
    config = make_config(tmp_path)
    store = od.open_store(config)
    store.restore()
    sidecar = tmp_path / "ops.jsonl.corrections-position"
    return od.CorrectionsTailer(corrections, store, sidecar, config.max_batch, config.max_body_bytes), store


def wait_for_analyses(client, count=3):
    """Block until the error analysis has run `count` more times."""
    seen = set()

    def analyses_seen():
        seen.add(client.get("/observer/errors")[1]["analyzed_at"])
        return len(seen) > count

    wait_for(analyses_seen, what=f"{count} analyses")


def journal_corrections(folder: Path) -> list[str]:
    return [o["endpoint"] for o in replay_forward(folder / "ops.jsonl") if o["endpoint"].startswith("/fix/")]


def padded_correction(n: int, pad: int) -> bytes:
    return json.dumps({"endpoint": f"/fix/{n}", "note": "n" * pad}).encode() + b"\n"


def position_line(sidecar: Path) -> int | None:
    """The line number the corrections tailer saved, None before it saved one."""
    return json.loads(sidecar.read_bytes())["line"] if sidecar.exists() else None


def record_commits(server: InProcessServer) -> list[int]:
    """How many lines each durable append of the server's journal holds, from now on."""
    commits = []
    journal = server.store.journal
    append = journal.append_durably

    def recording(data):
        commits.append(data.count(b"\n"))
        append(data)

    journal.append_durably = recording
    return commits


def make_self_signed_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    if shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        return cert, key
    test_dir = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "test"
    bundled = next((p for p in (test_dir / "keycert.pem", test_dir / "certdata" / "keycert.pem") if p.exists()), None)
    if bundled is None:
        pytest.skip("no openssl and no CPython test certificate to make a TLS cert from")
    shutil.copy(bundled, cert)
    shutil.copy(bundled, key)
    return cert, key


def older_pythons() -> list[str]:
    """Interpreters older than 3.11 on PATH that really run (a pyenv shim may not)."""
    found = []
    for minor in (8, 9, 10):
        path = shutil.which(f"python3.{minor}")
        if path is None:
            continue
        probe = subprocess.run([path, "-c", "import sys; print(sys.version_info < (3, 11))"],
                               capture_output=True, text=True, timeout=60)
        if probe.stdout.strip() == "True":
            found.append(path)
    return found


SUBCOMMANDS = [[], ["serve"], ["check"], ["stats", "ops.jsonl"], ["--version"], ["--help"]]


WRITE_SYSCALL = {"x86_64": "1", "aarch64": "64"}


class StartupHeldDaemon(Daemon):
    """observerd whose stderr pipe is full before it starts, so it blocks in its first log
    write until release(): a signal sent meanwhile arrives during startup, on any machine."""

    def __init__(self, folder: Path, config: Path):
        if platform.machine() not in WRITE_SYSCALL:
            pytest.skip(f"no write syscall number known for {platform.machine()}")
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
        self._filler = b"#" * fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        os.write(write_end, self._filler)
        self.proc = subprocess.Popen([sys.executable, str(DAEMON), "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=write_end, cwd=folder,
                                     preexec_fn=default_sigint())
        os.close(write_end)
        self._stderr = os.fdopen(read_end, "rb")
        self._lines: list[str] = []
        self._released = threading.Event()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        self.port = None
        wait_for(self._blocked_writing_stderr, what="the daemon to block in its first log line")

    def _blocked_writing_stderr(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode} before its first log line")
        fields = Path(f"/proc/{self.proc.pid}/syscall").read_text().split()
        return fields[:2] == [WRITE_SYSCALL[platform.machine()], "0x2"]

    def _collect(self):
        self._released.wait()
        assert self._stderr.read(len(self._filler)) == self._filler
        for line in self._stderr:
            self._lines.append(line.decode(errors="replace"))

    def release(self) -> None:
        self._released.set()

    def stop(self):
        self.release()
        super().stop()


@pytest.fixture
def held_daemon(tmp_path):
    started = []

    def start(**settings) -> StartupHeldDaemon:
        settings.setdefault("bind", "127.0.0.1:0")
        settings.setdefault("persist_path", "ops.jsonl")
        daemon = StartupHeldDaemon(tmp_path, write_config(tmp_path, settings))
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def write_rotated_journal(path: Path, counts: list[int]) -> None:
    """The live file and its rotated segments, newest first, holding counts[i] ops each."""
    for n, (segment, count) in enumerate(zip(od.segment_paths(path, len(counts) - 1), counts)):
        segment.write_bytes(b"".join(od.encode_line(op(f"/segment{n}/{i}")) + b"\n" for i in range(count)))


LISTENABLE = '[observerd]\nbind = "127.0.0.1:0"\npersist_path = ""\n'


# Each config serve must refuse: check must refuse it too, naming the same problem in the same words.
REFUSED_CONFIGS = {
    "a scheme": ('[observerd]\nbind = "http://127.0.0.1:3374"\n', "without http://"),
    "a space": ('[observerd]\nbind = "127.0.0.1 :3373"\n', "without spaces"),
    "a port out of range": ('[observerd]\nbind = "127.0.0.1:65536"\n', "port must be 0-65535"),
    "a host that does not resolve": ('[observerd]\nbind = "locahost.invalid:3376"\n'
                                     "allow_unauthenticated = true\n", "'locahost.invalid' does not resolve"),
    "a port in use": ('[observerd]\nbind = "127.0.0.1:{port}"\n', "port {port} is in use by pid {pid} ("),
    "a privileged port": ('[observerd]\nbind = "127.0.0.1:80"\n', "port 80 is privileged (below"),
    "an address of another host": ('[observerd]\nbind = "192.0.2.1:3219"\nallow_unauthenticated = true\n',
                                   "192.0.2.1 is not an address of this host"),
    "a misspelled table": ('[observed]\nbind = "127.0.0.1:0"\n', "table [observed] is not read: "
                           "did you mean [observerd]?"),
    "a setting above any table": ('bind = "127.0.0.1:0"\n[observerd]\n',
                                  "bind is above any table, where it is not read: it belongs in [observerd]"),
    "no [observerd] table": ('[auth]\ntoken = "s3cret"\n', "no [observerd] table"),
    "a misspelled key": (LISTENABLE + "rign_size = 5\n", "unknown key 'rign_size' in [observerd] ("
                         "did you mean 'ring_size'?)"),
    "a key in the wrong table": (LISTENABLE + 'token = "s3cret"\n', "token in [observerd] is not read there: "
                                 "it belongs in [auth]"),
}


LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: a child imports nothing


PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE = 24, 10


def without_privileged_ports():
    """preexec_fn: the child may not listen below the privileged port limit, even as root."""
    if os.geteuid() == 0 and LIBC.prctl(PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE, 0, 0, 0) != 0:
        os._exit(99)


def can_listen_on_port_80_without_privilege() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.socket().bind(('127.0.0.1', 80))"],
                           capture_output=True, text=True, timeout=60, preexec_fn=without_privileged_ports)
    return "Permission denied" not in probe.stderr


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        pos = rng.randrange(len(data) + 1)
        if kind < 0.3 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif kind < 0.55:
            data[pos:pos] = rng.choice([b"\x00", b"\r\n", b'"', b"{", b"9" * rng.randint(1, 50), b"\xc3", b" "])
        elif kind < 0.8:
            del data[pos:pos + rng.randint(1, 8)]
        else:
            data = data[:pos]
    return bytes(data)


def fuzz_request(rng: random.Random, i: int) -> bytes:
    body = {"endpoint": f"/fuzz/{i}", "source": rng.choice(od.SOURCES + ("", "bad")),
            "success": rng.choice([True, False, 1, None]), "duration_ms": rng.choice([0, 1.5, -1, "x"])}
    if rng.random() < 0.3:
        body["extra"] = {"nested": [rng.random(), None, "é"]}
    payload = json.dumps(body).encode()
    valid = b"POST /observer/event HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    roll = rng.random()
    if roll < 0.35:
        return valid
    if roll < 0.9:
        return mutate(rng, valid)
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))


def openai_reply(text: str) -> dict:
    return {"id": "c1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


LLM_PATHS = {"ollama": "/api/generate", "openai": "/v1/chat/completions"}


def llm_reply(api: str, text: str) -> dict:
    return {"model": "m", "response": text, "done": True} if api == "ollama" else openai_reply(text)


@pytest.fixture
def backend():
    """backend(api, text=…, status=…, reason=…, held=…): a fake LLM speaking api, or with
    api=None the LLM team's /api/run."""
    def make(api: str | None, text: str = "an answer", status: int = 200, reason: str | None = None,
             held: bool = False) -> FakeService:
        path, reply = ("/api/run", {"ok": True}) if api is None else (LLM_PATHS[api], llm_reply(api, text))
        return FakeService(status, reply, threading.Event() if held else None, path, reason)
    yield from started_by_test(make, FakeService.close)


def chain(primary, fallback, primary_api="ollama", fallback_api="openai", **settings) -> dict:
    """The settings of a review chain over these backends (each a FakeService, a RawService or a URL)."""
    primary_url, fallback_url = (b if isinstance(b, str) else b.url for b in (primary, fallback))
    return {"review_llm_url": primary_url, "review_llm_model": "local-test", "review_llm_api": primary_api,
            "review_fallback_url": fallback_url, "review_fallback_model": "hosted-test",
            "review_fallback_api": fallback_api, **settings}


def llm_counts(port: int) -> dict[tuple[str, str], float]:
    client = Client(port)
    client.conn.request("GET", "/metrics")
    families = parse_exposition(client.conn.getresponse().read().decode())
    client.close()
    return {(labels["backend"], labels["outcome"]): value
            for _, labels, value in families["observerd_llm_requests_total"]["samples"]}


def no_port_url() -> str:
    return closed_port_url().removesuffix("/api/run")


def chunked_answer(body: bytes) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                      for i in range(0, len(body), 65536))
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


HUGE_ANSWER = b'{"response": "' + b"x" * od.OUTBOUND_MAX_ANSWER_BYTES + b'"}'


KEY_VARS = {"primary": "OBSERVERD_TEST_PRIMARY_KEY", "fallback": "OBSERVERD_TEST_FALLBACK_KEY",
            "escalation": "OBSERVERD_TEST_ESCALATE_TOKEN"}


import pty  # noqa: E402  (stdlib; only this block drives a terminal)


import struct  # noqa: E402


import termios  # noqa: E402


TIMELINE_KEYS = {"service", "version", "uptime_s", "ready", "reason", "now", "seconds", "sources", "totals", "ring",
                 "journal", "fsync_p99_ms", "endpoints_window", "endpoints_since", "endpoints", "clusters_analyzed_at",
                 "clusters", "escalations", "corrections", "verdict_window_s"}


KNOWN_TRAFFIC = (  # (source, endpoint, success, duration_ms, how many)
    [("mcp", "/mcp/search", True, 10, 3), ("mcp", "/mcp/search", False, 30, 2),
     ("scenario", "/scenario/checkout", True, 100, 4), ("langfuse", "/langfuse/trace", False, 5, 1)])


def known_traffic() -> list[dict]:
    return [{"endpoint": endpoint, "source": source, "success": success, "duration_ms": duration,
             **({} if success else {"error": f"upstream 502 for job {i}"})}
            for source, endpoint, success, duration, count in KNOWN_TRAFFIC for i in range(count)]


def timeline_once_whole(client, count: int, query: str = "") -> dict:
    """GET /observer/timeline once the second the last of count ops arrived in is whole."""
    def answered():
        status, body, _ = client.get(f"/observer/timeline{query}")
        assert status == 200, body
        return body if sum(body["totals"]["ok"]) + sum(body["totals"]["failed"]) == count else None
    return wait_for(answered, what="the ops' second to be whole")


def top_snapshot_rows(text: str) -> dict[str, list[int]]:
    """The source rows of a top snapshot: name -> [events/s, ok, failed]."""
    rows = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 5 and words[-1 if len(words) == 5 else 4].endswith(("%", "-")) and \
                all(w.replace(",", "").isdigit() for w in words[1:4]):
            rows[words[0]] = [int(w.replace(",", "")) for w in words[1:4]]
    return rows


class Screen:
    """A program on a pseudo-terminal of its own: the bytes it draws, collected by a thread;
    keys and resizes sent to it as a terminal would."""

    def __init__(self, argv, rows=40, cols=100, env=None):
        master, terminal = pty.openpty()
        self.master = master
        self.resize(rows, cols, signal_it=False)
        # LINES and COLUMNS would override the terminal's size in curses.
        environ = {k: v for k, v in os.environ.items() if k not in ("LINES", "COLUMNS")}
        self.proc = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal,
                                     env={**environ, "TERM": "xterm", **(env or {})}, start_new_session=True,
                                     preexec_fn=default_sigint())
        os.close(terminal)
        self.output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the program closed the terminal's last descriptor
                return
            if not data:
                return
            self.output += data

    def mark(self) -> int:
        return len(self.output)

    def shows(self, needle: str, since: int = 0, what: str | None = None) -> None:
        """Wait until needle is drawn after the mark since; the program must stay alive."""
        def drawn():
            if len(self.output) > since and needle.encode() in self.output[since:]:
                return True
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()}"
            return False
        wait_for(drawn, timeout=60, what=what or f"{needle!r} on the screen")

    def text(self) -> str:
        return bytes(self.output).decode("utf-8", "replace")

    def resize(self, rows: int, cols: int, signal_it: bool = True) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        if signal_it:  # the kernel signals only a terminal's own session; this is not its one
            self.proc.send_signal(signal.SIGWINCH)

    def press(self, key: bytes) -> None:
        os.write(self.master, key)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        self._reader.join(10)
        os.close(self.master)


@pytest.fixture
def screens():
    yield from started_by_test(Screen, Screen.stop)


class TmuxScreen:
    """A program in a window of a tmux server of its own: capture-pane gives the screen a person
    would see, whatever bytes drew it."""

    def __init__(self, folder: Path, argv, rows=40, cols=100, env=None):
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed, so no screen of top is looked at")
        self.tmux = ["tmux", "-S", str(folder / "tmux.sock"), "-f", "/dev/null"]
        subprocess.run([*self.tmux, "new-session", "-d", "-x", str(cols), "-y", str(rows), shlex.join(argv)],
                       check=True, timeout=60, env={**os.environ, **(env or {})})

    def text(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p"], capture_output=True, text=True,
                              timeout=60).stdout

    def shows(self, needle: str) -> str:
        """The screen once it shows needle."""
        return wait_for(lambda: (lambda text: needle in text and text)(self.text()), timeout=60,
                        what=f"{needle!r} on the screen")

    def stop(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, timeout=60)


@pytest.fixture
def tmux_screens(tmp_path):
    yield from started_by_test(lambda argv, **kw: TmuxScreen(tmp_path, argv, **kw), TmuxScreen.stop)


def run_into_a_closed_pipe(*args) -> subprocess.CompletedProcess:
    """The CLI with a stdout nobody reads any more, as after `| head -1` has its line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, str(DAEMON), *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write_end)


HOOKED_DAEMON = """\
import sys
sys.path.insert(0, {here!r})
import observerd
{hook}
sys.exit(observerd.main(sys.argv[1:]))
"""


def hooked_daemon_script(folder: Path, hook: str) -> Path:
    """observerd.py's main run after hook, Python that patches the observerd module: a way to
    hold the real daemon at a chosen point for as long as a test needs."""
    script = folder / "hooked_observerd.py"
    script.write_text(HOOKED_DAEMON.format(here=str(HERE), hook=hook))
    return script


def get_fresh(port: int, path: str, method: str = "GET", body=None) -> tuple[int, dict | None, object]:
    """One request on a connection of its own, closed after the answer."""
    client = Client(port)
    try:
        return client.request(method, path, body)
    finally:
        client.close()


def daemon_holding_its_restore(daemons, folder: Path, **kw) -> tuple[Daemon, Path]:
    """A daemon whose restore waits until the test opens the FIFO returned, as a slow disk
    would; kw: as daemons takes them."""
    gate = folder / "restore-gate"
    os.mkfifo(gate)
    script = hooked_daemon_script(folder, f"""
restore_journal = observerd.restore_journal
def held_restore_journal(*args, **kwargs):
    with open({str(gate)!r}, "rb") as fifo:
        fifo.read()
    return restore_journal(*args, **kwargs)
observerd.restore_journal = held_restore_journal
""")
    config = write_settings(folder, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl"})
    return daemons(folder, config=config, script=script, **kw).wait_listening(restored=False), gate


def scrape(client: Client) -> dict[str, dict]:
    client.conn.request("GET", "/metrics")
    return parse_exposition(client.conn.getresponse().read().decode())


def journal_op_ids(path: Path, keep_files: int = 0) -> list[str | None]:
    """The op_id of every line of a journal and its segments, oldest first."""
    segments = reversed([p for p in od.segment_paths(path, keep_files) if p.exists()])
    return [json.loads(line).get("op_id") for p in segments for line in p.read_bytes().splitlines()]


def answer_body(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[2]


ODD_OP_IDS = ['q"uo\\te', "é" * 128, "😀" * 128, " spaced ", "x" * 128, "{\"op_id\":\"nested\"}"]


def history_op(i: int, seconds_ago: float, now: float | None = None, **fields) -> dict:
    """A valid op numbered i, stamped seconds_ago before now."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((now or time.time()) - seconds_ago))
    return op(fields.pop("endpoint", f"/h/{i}"), timestamp=f"{stamp}.{i % 1000000:06d}Z", seq=i, **fields)


def seqs(ops) -> list[int]:
    return [o["seq"] for o in ops]


def run_ops(*args, cwd=None, env=None):
    return run_cli("ops", *args, cwd=cwd, env=env)


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def spelled(o: dict, how: int) -> bytes:
    """One op as one line, in one of the spellings another writer might use."""
    if how == 1:  # spaces, and every non-ASCII character escaped
        return json.dumps(o).encode() + b"\n"
    if how == 2:  # escaped slashes, as PHP writes them
        return json.dumps(o, ensure_ascii=False).replace("/", "\\/").encode() + b"\n"
    if how == 3:  # another key order, with decoys of the filtered fields nested inside
        decoy = {"endpoint": "/decoy", "success": not o["success"], "source": "langfuse",
                 "timestamp": "2000-01-01T00:00:00Z", "error": "timeout decoy"}
        return json.dumps({"nested": decoy, **dict(reversed(list(o.items())))},
                          separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if how == 5:  # defaults spelled as "" or null, in observerd's own key order and spacing
        return od.encode_line({**o, "source": "" if o["source"] == "mcp" else o["source"],
                               "success": None if o == od.validate_op({**o, "success": None}) else o["success"]})
    if how == 4:  # defaults left out: source mcp, success false, duration 0
        return json.dumps({k: v for k, v in o.items() if not (k in ("source", "success", "duration_ms")
                           and v == od.validate_op({"endpoint": "/", "timestamp": o["timestamp"]})[k])},
                          ensure_ascii=False).encode() + b"\n"
    return od.encode_line(o)


HISTORY_ENDPOINTS = ["/mcp/search", "/mcp/é", '/mcp/a"b', "/scenario/x/y", "/mcp/[x]"]


def random_history_op(rng, i: int, now: float) -> dict:
    fields = {"endpoint": rng.choice(HISTORY_ENDPOINTS), "source": rng.choice(od.SOURCES),
              "success": rng.random() < 0.6, "duration_ms": rng.choice([0, 1.5, 12, 300])}
    if rng.random() < 0.5:
        fields["error"] = rng.choice(["Timeout after 30s", "a\"b failed", "é broke", "refused\nretry"])
    if rng.random() < 0.5:
        fields["input_summary"] = rng.choice(["q=timeout", "plain"])
    fields.update(rng.choice([{}, {"trace": f"t{i % 5}"}, {"n": i % 4}, {"flag": i % 2 == 0},
                              {"obj": {"a": i % 2}}, {"n": "3"}]))
    if rng.random() < 0.3:  # written first, before the fields a canonical head holds
        fields["op_id"] = rng.choice([f"id-{i}", f'id "{i}"'])
    # Out of order: each op up to a minute either side of its place.
    o = history_op(i, 3600 - i + rng.uniform(-60, 60), now, **fields)
    if rng.random() < 0.2:  # the same instant an hour east, or spelled partly in lower case
        at = od.parse_rfc3339(o["timestamp"]).astimezone(od.timezone(od.timedelta(hours=1)))
        o["timestamp"] = rng.choice([at.isoformat(), o["timestamp"].lower(),
                                     o["timestamp"][:10] + "t" + o["timestamp"][11:]])
    return o


def brute_force_keeps(o: dict, given: dict) -> bool:
    """The filters as the README states them, written out plainly: the reference."""
    endpoints = given.get("endpoint")
    if endpoints is not None and not any(fnmatch.fnmatchcase(o["endpoint"], e) if any(c in e for c in "*?[")
                                         else o["endpoint"] == e for e in endpoints):
        return False
    if "source" in given and o["source"] not in given["source"]:
        return False
    wanted = {"failed": False, "ok": True}
    for name in ("failed", "ok", "success"):
        if name in given and o["success"] != wanted.get(name, given[name] == "true"):
            return False
    if "until" in given and od.parse_rfc3339(o["timestamp"]) > od.parse_rfc3339(given["until"]):
        return False
    if "since" in given and od.parse_rfc3339(o["timestamp"]) < od.parse_rfc3339(given["since"]):
        return False
    texts = [o[k] for k in ("error", "input_summary", "output_summary") if isinstance(o.get(k), str)]
    if "grep" in given and not any(given["grep"] in text for text in texts):
        return False
    if "regex" in given and not any(re.search(given["regex"], text) for text in texts):
        return False
    if "field" in given:
        key, value = given["field"].split("=", 1)
        if key not in o:
            return False
        text = o[key] if isinstance(o[key], str) else json.dumps(o[key], separators=(",", ":"), ensure_ascii=False)
        return text == value
    return True


HISTORY_FILTER_CHOICES = {
    "endpoint": HISTORY_ENDPOINTS + ["/mcp/*", "*é", "/scenario/?/*", "/mcp/[[]x]", "/nothing"],
    "source": list(od.SOURCES),
    "grep": ["timeout", "Timeout after 30s", "é", 'a"b', "q=", "\nretry", "broke", ""],
    "regex": ["timeout", "Timeout after \\d+s", "é", 'a"b', "^q=", "retry$", "(?i)TIMEOUT", "f.i", "\\bbroke",
              "(?s)plain.*q=timeout|q=timeout"],  # runs from line to line over a whole chunk
    "field": ["trace=t3", "n=3", "flag=true", 'obj={"a":1}', "n=", "seq=7"],
}


OUTCOME_CHOICES = [{"success": "true"}, {"success": "false"}, {"failed": "true"}, {"ok": ""},
                   {"failed": "", "success": "false"}]


def random_filters(rng) -> dict:
    """Filters as OpFilter takes them: each maybe, repeatable ones once or twice."""
    given = {}
    for name, values in HISTORY_FILTER_CHOICES.items():
        if rng.random() < 0.4:
            given[name] = rng.sample(values, rng.choice([1, 1, 2])) if od.FILTER[name].repeatable else rng.choice(values)
    if rng.random() < 0.4:
        given.update(rng.choice(OUTCOME_CHOICES))
    return given


def write_history_segments(folder: Path, now: float) -> list[dict]:
    """ops.jsonl.2, .1 and the live file, with corrupt lines and out-of-order timestamps;
    returns the valid ops, oldest first in file order."""
    ops, n = [], 0
    for name in ("ops.jsonl.2", "ops.jsonl.1", "ops.jsonl"):
        lines = []
        for _ in range(30):
            # Every fifth op is stamped ten minutes early (a late batch): out of order.
            o = history_op(n, 3 * 3600 - n * 300 + (600 if n % 5 == 0 else 0), now,
                           source="scenario" if n % 3 == 0 else "mcp", success=n % 4 != 0,
                           error=None if n % 4 else f"upstream 502 for job {n}", trace=f"t{n % 7}")
            o = {k: v for k, v in o.items() if v is not None}
            ops.append(o)
            lines.append(od.encode_line(o))
            n += 1
        lines.insert(10, b'{"endpoint":"/torn","source":"mcp","timest\n')
        lines.insert(20, b"garbage\n")
        (folder / name).write_bytes(b"".join(lines))
    return ops


class OpsFollower:
    """`ops -f` as a real subprocess; the lines it prints are collected by a reader thread."""

    def __init__(self, *args, stdout=subprocess.PIPE):
        self.proc = subprocess.Popen([sys.executable, str(DAEMON), "ops", "-o", "ndjson", "-f", *args],
                                     stdout=stdout, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=default_sigint())
        self.lines: list[str] = []
        if stdout is subprocess.PIPE:
            threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def ops(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines)]

    def wait_seqs(self, expected: list[int], what: str) -> None:
        wait_for(lambda: len(self.lines) >= len(expected) or self.proc.poll() is not None,
                 timeout=60, interval=0.05, what=what)
        wait_for(lambda: len(self.lines) >= len(expected), timeout=5, what=what)
        assert seqs(self.ops()) == expected, what

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        status = self.proc.wait(60)
        return status, self.proc.stderr.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)


@pytest.fixture
def followers():
    yield from started_by_test(OpsFollower, OpsFollower.stop)


def post_seqs(client, numbers, **fields) -> None:
    for i in numbers:
        status, body, _ = client.post("/observer/event", {"endpoint": f"/h/{i}", "seq": i, **fields})
        assert status == 200, body


def history_page(client, query: str = "", expect: int = 200):
    status, body, _ = client.get(f"/observer/history{'?' if query else ''}{query}")
    assert status == expect, body
    return body


def hold_history_reads(monkeypatch, on_read) -> threading.Event:
    """Hold every read of the journal's blocks but the committer's (its one-byte reads pass)
    until the event returned is set; on_read() is called as each one begins."""
    release = threading.Event()
    real_pread = os.pread

    def held_pread(fd, size, offset):
        if threading.current_thread().name != "committer" and size > 1:
            on_read()
            release.wait(60)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", held_pread)
    return release


NOW_FOR_TIMES = od.parse_rfc3339("2026-12-06T05:30:00Z").timestamp()  # a Sunday


def filter_cli_args(given: dict) -> list[str]:
    """A filter dict (name: text, or texts when repeated; a switch: "") as ops' flags."""
    args = []
    for name, value in given.items():
        spec = od.FILTER[name]
        for text in value if isinstance(value, list) else [value]:
            args += [f"--{name}"] if spec.metavar is None else [f"--{name}", text]
    return args


FILTERS_SPOKEN_ALIKE = [
    {"endpoint": ["/mcp/a,b", "/scenario/*"]},  # free text: never split on commas
    {"source": ["scenario", "langfuse"], "failed": ""},
    {"ok": "", "endpoint": ["/mcp/*"]},
    {"grep": "(a+)+b"},  # plain text in both
    {"grep": "502", "field": "trace=t1"},
    {"since": "2h", "until": "30m", "failed": ""},
    {"endpoint": ["/nothing"]},
]


def count_rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


from html.parser import HTMLParser  # noqa: E402  (this block's own import, for merges)


class PageParts(HTMLParser):
    """What a page holds: element ids, attributes, and the text of its script and style."""

    def __init__(self, html: str):
        super().__init__()
        self.ids: list[str] = []
        self.attributes: list[tuple[str, str, str]] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self._inside = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            self.attributes.append((tag, name, value or ""))
            if name == "id":
                self.ids.append(value)
        if tag in ("script", "style"):
            self._inside = self.scripts if tag == "script" else self.styles
            self._inside.append("")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._inside = None

    def handle_data(self, data):
        if self._inside is not None:
            self._inside[-1] += data


def get_page(port: int, headers: dict | None = None, method: str = "GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, "/observer/ui", headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def csp_directives(header: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (part.split() for part in header.split(";"))}


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe: it reads commands on its
    fd 3 and writes answers and events on its fd 4, each a JSON text ended by a NUL byte."""

    def __init__(self, folder: Path):
        commands_read, self._commands = os.pipe()
        self._answers_fd, answers_write = os.pipe()
        chromium = shutil.which("chromium")
        assert chromium, "no chromium: make test-browser installs Debian's"
        # bash (dash takes single-digit fds only) moves the pipe ends to fds 3 and 4, then
        # becomes chromium.
        argv = ["bash", "-c", f'exec "$@" 3<&{commands_read} 4>&{answers_write}', "sh", chromium,
                "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", f"--user-data-dir={folder / 'chromium-profile'}", "about:blank"]
        self.log_path = folder / "chromium.log"
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(argv, pass_fds=(commands_read, answers_write),
                                         stdout=log_file, stderr=log_file)
        os.close(commands_read)
        os.close(answers_write)
        self._ids = itertools.count(1)
        self._answers: dict[int, dict] = {}
        self.events: list[dict] = []
        self._closed = False
        self._arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        pending = b""
        while chunk := os.read(self._answers_fd, 1 << 16):
            *messages, pending = (pending + chunk).split(b"\0")
            with self._arrived:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.append(message)
                self._arrived.notify_all()
        with self._arrived:
            self._closed = True
            self._arrived.notify_all()

    def send(self, method: str, session: str | None = None, **params):
        number = next(self._ids)
        message = {"id": number, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        try:
            os.write(self._commands, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise AssertionError(f"chromium exited: {self.log_path.read_text()[-2000:]}") from None
        with self._arrived:
            if not self._arrived.wait_for(lambda: number in self._answers or self._closed, 60):
                raise AssertionError(f"chromium did not answer {method}")
            if self._closed and number not in self._answers:
                raise AssertionError(f"chromium exited: {self.log_path.read_text()[-2000:]}")
            answer = self._answers.pop(number)
        assert "error" not in answer, (method, answer["error"])
        return answer["result"]

    def tab(self, width: int, height: int, dark: bool = False) -> "Tab":
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        tab = Tab(self, self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"])
        for domain in ("Page", "Runtime", "Log"):
            tab.call(f"{domain}.enable")
        tab.view(width, height, dark)
        return tab

    def close(self):
        try:
            self.send("Browser.close")
        except AssertionError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._commands)


class Tab:
    """One page of a Browser, attached as a flat session."""

    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def call(self, method: str, **params):
        return self.browser.send(method, self.session, **params)

    def view(self, width: int, height: int, dark: bool = False):
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)
        self.call("Emulation.setEmulatedMedia",
                  features=[{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}])

    def go(self, url: str):
        self.call("Page.navigate", url=url)
        self.wait(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", f"{url} to load")

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, (expression, result["exceptionDetails"])
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 60):
        return wait_for(lambda: self.js(expression), timeout, interval=0.1, what=what)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(od.base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def events(self, *methods: str) -> list[dict]:
        return [e for e in self.browser.events if e.get("sessionId") == self.session and e["method"] in methods]

    def problems(self) -> list[dict]:
        """Script errors, CSP violations and dialogs: a page that works has none."""
        logged = [e for e in self.events("Log.entryAdded")
                  if e["params"]["entry"]["source"] in ("security", "javascript")
                  or "Content Security Policy" in e["params"]["entry"]["text"]]
        return logged + self.events("Runtime.exceptionThrown", "Page.javascriptDialogOpening")


# A real browser is slow to install and start, and needs Debian's chromium: `make test-browser`.
in_chromium = pytest.mark.skipif(os.environ.get("OBSERVERD_BROWSER") != "1",
                                 reason="drives a real browser: run make test-browser")


def screenshot_folder(tmp_path: Path) -> Path:
    """Where make test-browser keeps the README's screenshots (bench/), else tmp_path."""
    return Path(os.environ.get("OBSERVERD_SCREENSHOTS") or tmp_path)


HOSTILE = "<img src=x onerror=alert(1)>"


LONG_ERROR = ("connection reset by peer while reading the answer of https://search.internal.example/api/v2/"
              "query/expanded-with-synonyms-and-typo-tolerance after the upstream closed its keep-alive socket")


# What a person at that width could not read: a table scrolling sideways (its headers out of
# sight), a header cut, a failure cluster's signature cut.
PAGE_LAYOUT = """(() => {
  const shown = (e) => e.offsetParent !== null;
  return {sideways: [...document.querySelectorAll(".scroll")].filter((d) => shown(d) && d.scrollWidth > d.clientWidth)
      .map((d) => d.parentElement.querySelector("h2").textContent),
    cutHeaders: [...document.querySelectorAll("th")].filter((th) => shown(th) &&
      (th.scrollWidth > th.clientWidth || th.getBoundingClientRect().right > window.innerWidth)).map((th) => th.textContent),
    cutSignatures: [...document.querySelectorAll("#clusters-body td")].filter((td) => td.scrollWidth > td.clientWidth)
      .map((td) => td.textContent),
    pageSideways: document.documentElement.scrollWidth > window.innerWidth};
})()"""


def page_traffic() -> list[dict]:
    """Ops with a cluster of failures, playbooks, a hostile endpoint and one glob-like endpoint,
    in a fixed shuffled order."""
    ops = [{"endpoint": "/mcp/search", "duration_ms": 10 + i, "success": True} for i in range(40)]
    ops += [{"endpoint": "/mcp/fail", "duration_ms": 200 + i, "error": f"upstream 502 for job {i}"}
            for i in range(60)]
    ops += [{"endpoint": "/scenario/checkout", "source": "scenario", "duration_ms": 900 + i,
             "success": i % 5 != 0, "error": None if i % 5 else f"timeout after {i} s"} for i in range(12)]
    ops += [{"endpoint": "/langfuse/trace", "source": "langfuse", "success": True, "duration_ms": 3}] * 5
    ops += [{"endpoint": HOSTILE, "error": "<script>alert(2)</script>", "input_summary": "<b onclick=alert(3)>"},
            {"endpoint": "/q[1]", "error": "glob-like endpoint"}, {"endpoint": "/mcp/fetch", "error": LONG_ERROR}]
    ops += [{"endpoint": "/q1", "success": True}] * 3
    ops = [{key: value for key, value in o.items() if value is not None} for o in ops]
    random.Random(14).shuffle(ops)
    return ops


def post_over_time(client: Client, ops: list[dict], seconds: int):
    """Post ops in one batch a second, so the chart has a shape to draw."""
    size = -(-len(ops) // seconds)
    for start in range(0, len(ops), size):
        assert client.post("/observer/events", ops[start:start + size])[0] == 200
        time.sleep(1)


PAGE_STATE = """(() => {
  const text = (id) => document.getElementById(id).textContent;
  const rows = (id) => [...document.getElementById(id).rows].map((r) => [...r.cells].map((c) => c.textContent));
  return {conn: text("conn"), connClass: document.getElementById("conn").className,
    total: text("stat-total"), ok: text("stat-ok"), failed: text("stat-failed"),
    bySource: Object.fromEntries([...document.querySelectorAll("#by-source li")].map((li) => [li.dataset.source, +li.dataset.count])),
    endpoints: rows("endpoints-body"), clusters: rows("clusters-body"), escalations: rows("escalations-body"),
    playbooks: rows("playbooks-body"), ops: rows("ops-body"), history: rows("history-body"),
    historyHidden: document.getElementById("history").hidden, historyNote: text("history-note"),
    olderHidden: document.getElementById("history-older").hidden,
    polylines: [...document.querySelectorAll("#chart polyline")].map((p) => p.getAttribute("points").split(" ").length),
    legend: text("legend"), ready: text("ready"), images: document.images.length,
    authHidden: document.getElementById("auth").hidden, authMessage: text("auth-msg"),
    endpointsOver: text("endpoints-over"), clustersNote: text("clusters-note")};
})()"""


def number_in(text: str) -> int:
    return int(re.sub(r"[^0-9]", "", text))


def click(tab: Tab, body_id: str, text: str):
    """Click the button in tbody body_id whose text is exactly text (as a keyboard user would)."""
    assert tab.js(f"""(() => {{
      const b = [...document.querySelectorAll("#{body_id} button")].find((b) => b.textContent === {json.dumps(text)});
      if (b) {{ b.focus(); b.click(); }}
      return !!b; }})()"""), (body_id, text)


def type_into(tab: Tab, element_id: str, text: str):
    tab.js(f"""(() => {{ const f = document.getElementById("{element_id}"); f.focus(); f.value = {json.dumps(text)};
      f.dispatchEvent(new Event("input", {{bubbles: true}})); }})()""")


def start_observed_daemon(daemons, folder: Path, **settings) -> Daemon:
    return start_durable_daemon(daemons, folder, analyze_interval_s=0.2, consolidate_interval_s=0.2, **settings)


def ago(seconds: float, now: float | None = None) -> str:
    return od.rfc3339_of((time.time() if now is None else now) - seconds)


def two_hours_of_ops(now: float) -> list[dict]:
    """An hour (2h..1h ago, run r1) and the next (1h..now, run r2) of four endpoints: /triples'
    failure rate triples, /doubles' durations double, /steady stays as it was, /rare has 3 ops a
    side. Candidate failures of /triples bring a new error; one of /steady's goes away."""
    rng = random.Random(21)
    ops = []
    for side, (start, end) in enumerate(((7000, 3700), (3500, 100))):
        run = f"r{side + 1}"
        for i in range(100):
            at = ago(start - (start - end) * i / 100, now)
            fails = i % 10 < (1, 3)[side]
            ops.append(op("/triples", timestamp=at, run_id=run, success=not fails, duration_ms=rng.uniform(10, 20),
                          error=("connection reset by peer" if side and i % 2 else "upstream 502 for job 9")))
            ops.append(op("/doubles", timestamp=at, run_id=run, success=True,
                          duration_ms=rng.uniform(10, 20) * (1, 2)[side], model=f"m{i % 2}"))
            ops.append(op("/steady", timestamp=at, run_id=run, success=i % 10 != 0, duration_ms=rng.uniform(10, 20),
                          error="disk full" if (side, i) == (0, 0) else "boom"))
        ops += [op("/rare", timestamp=ago(start - i, now), run_id=run, success=True, duration_ms=5.0) for i in range(3)]
    ops.append(op("/triples", timestamp=ago(200, now), source="overseer_correction", run_id="r2"))
    return ops


def post_ops(client, ops) -> None:
    for start in range(0, len(ops), 500):
        status, body, _ = client.post("/observer/events", ops[start:start + 500])
        assert status == 200, body


def verdicts_of(answer) -> dict[str, tuple[str, str, str]]:
    return {row["endpoint"]: (row["verdict"], row["failure_rate"]["verdict"], row["duration"]["verdict"])
            for row in answer["rows"]}


EXPECTED_VERDICTS = {"/triples": ("worse", "worse", "~"), "/doubles": ("worse", "~", "worse"),
                     "/steady": ("~", "~", "~"), "/rare": ("too few", "too few", "too few")}


def corrected_endpoints(now: float) -> list[dict]:
    """Three endpoints each corrected 125 s ago (verdict_window_s 120: its after-window closed 5 s
    ago, and it stays among the corrections an analysis judges for another 115 s), 30 ops in the
    30 s before and 30 in the 30 s after: /fixed goes from 50% failures to none, /idle stays at
    50%, /broke goes from none to 60%. A fourth correction, 10 s ago, still waits."""
    ops = []
    for endpoint, (before, after) in {"/fixed": (5, 0), "/idle": (5, 5), "/broke": (0, 6)}.items():
        for i in range(30):
            ops.append(op(endpoint, timestamp=ago(155 - i, now), success=i % 10 >= before, duration_ms=10.0 + i,
                          error=f"upstream 502 for job {i}"))
            ops.append(op(endpoint, timestamp=ago(120 - i, now), success=i % 10 >= after, duration_ms=10.5 + i,
                          error=f"upstream 502 for job {i}"))
        ops.append(op(endpoint, source="overseer_correction", timestamp=ago(125, now), input_summary="retries=5"))
    ops.append(op("/later", source="overseer_correction", timestamp=ago(10, now)))
    return ops


CORRECTION_SETTINGS = dict(verdict_window_s=120, analyze_interval_s=0.05, escalate_threshold=1_000_000,
                           escalate_window_s=3600)


def correction_verdicts(client) -> dict[str, tuple[str, bool]]:
    status, answer, _ = client.get("/observer/corrections")
    assert status == 200, answer
    return {entry["correction"]["endpoint"]: (entry["verdict"], entry["escalated"]) for entry in answer["corrections"]}


DEPLOY = HERE / "deploy"


RULES = DEPLOY / "observerd.rules.yml"


PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")


needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus)")


def alerts_and_runbooks() -> dict[str, str]:
    """Each alert of the shipped rules, with its runbook annotation (read without a YAML parser:
    the file keeps one key a line)."""
    found, alert = {}, None
    for line in RULES.read_text().splitlines():
        if match := re.fullmatch(r"\s*- alert: (\w+)", line):
            alert = match[1]
            found[alert] = None
        elif match := re.fullmatch(r"\s*runbook: (\S+)", line):
            found[alert] = match[1]
    return found


class FakeSystemd:
    """A datagram socket standing in for systemd's notify socket: collects each message sent to
    it (a path, or with abstract=True an @name in the abstract namespace)."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._folder = None
        if abstract:
            name = f"observerd-test-{os.getpid()}-{random.randrange(1 << 30)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:  # a short folder of its own: a socket path holds at most 107 bytes
            self._folder = tempfile.TemporaryDirectory(prefix="sd-")
            self.address = os.path.join(self._folder.name, "notify")
            self.sock.bind(self.address)
        self.messages: list[str] = []
        self._arrived = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self._arrived:
                self.messages.append(data.decode())
                self._arrived.notify_all()

    def wait(self, predicate, what: str, after: int = 0, timeout: float = 60) -> int:
        """The index of the first message from `after` on that predicate accepts."""
        def found():
            return next((i for i in range(after, len(self.messages)) if predicate(self.messages[i])), None)
        with self._arrived:
            if not self._arrived.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no notify message {what}; got {self.messages[after:]}")
            return found()

    def statuses(self, start: int = 0) -> list[str]:
        return [line[len("STATUS="):] for message in self.messages[start:]
                for line in message.split("\n") if line.startswith("STATUS=")]

    def close(self):
        self.sock.close()
        if self._folder is not None:
            self._folder.cleanup()


@pytest.fixture
def fake_systemd():
    yield from started_by_test(FakeSystemd, FakeSystemd.close)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping targets as job "observerd" with the shipped
    rules, scrape and evaluation every half second; its data in folder."""

    def __init__(self, folder: Path, targets: list[str]):
        folder.mkdir()
        config = folder / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms", "scrape_timeout": "400ms"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "observerd", "static_configs": [{"targets": targets}]}],
        }))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = folder / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address={self.url[len('http://'):]}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=folder)
        wait_for(self._ready, timeout=120, what="prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return self.get("/-/ready", raw=True) == 200
        except OSError:
            return False

    def get(self, path: str, raw: bool = False, **query):
        with urlopen(f"{self.url}{path}" + (f"?{urlencode(query)}" if query else ""), timeout=30) as answer:
            if raw:
                return answer.status
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str, **at) -> dict[tuple, float]:
        """{labels as sorted (name, value) pairs: value} of an instant vector."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1])
                for r in self.get("/api/v1/query", query=promql, **at)["result"]}

    def by_instance(self, promql: str) -> dict[str, float]:
        """{instance: value} of an instant vector with one series per instance."""
        return {dict(labels)["instance"]: value for labels, value in self.query(promql).items()}

    def firing(self, alertname: str) -> set[str]:
        """The instances alertname fires for now."""
        return {a["labels"].get("instance") for a in self.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == alertname and a["state"] == "firing"}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def prometheus():
    yield from started_by_test(Prometheus, Prometheus.stop)


def shown_deploy_files() -> dict[str, str]:
    """The deploy/ files docs/scaling-out.md shows, each as the block after its name."""
    page = (HERE / "docs" / "scaling-out.md").read_text()
    return dict(re.findall(r"^`deploy/([\w.-]+)`:\n\n```\w*\n(.*?)```$", page, re.M | re.S))


# -----------------------------------------------------------------------------
# [SECTION] Logging
# -----------------------------------------------------------------------------

def test_log_lines_are_key_value_with_level_and_msg(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path)
    for line in daemon.log.splitlines():
        assert line.startswith("time=") and " level=" in line and " msg=" in line, line
    assert f"addr=127.0.0.1:{daemon.port}" in daemon.log
    assert "msg=\"restored ops\" count=0" in daemon.log


def test_log_values_show_controls_and_bidi_marks_escaped_never_raw(capsys):
    # A client's path or endpoint reaches the log: a terminal reading it (journalctl, tail)
    # must show a CSI or a right-to-left override, not obey it.
    od.log("INFO", "x", path="/x\x9b31m\u202eabc", plain="/ok/é", quoted="a b\x1b[2J")
    line = capsys.readouterr().err
    assert ' path="/x\\u009b31m\\u202eabc"' in line and " plain=/ok/é" in line
    assert ' quoted="a b\\u001b[2J"' in line


# -----------------------------------------------------------------------------
# [SECTION] Metrics
# -----------------------------------------------------------------------------

def test_metrics_follow_the_exposition_format_and_count_what_happened(serve):
    server = serve(token="tok")
    client = server.client(token="tok")
    assert server.client().get("/metrics")[0] == 401
    client.post("/observer/events", [{"endpoint": "/a", "success": True}] * 2 + [{"endpoint": "/b", "source": "scenario"}])
    client.post("/observer/event", {"endpoint": ""})
    client.get("/observer/nope")
    client.conn.request("GET", "/metrics", headers={"Authorization": "Bearer tok"})
    resp = client.conn.getresponse()
    text = resp.read().decode()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    families = parse_exposition(text)
    for name, kind in [("observerd_events_total", "counter"), ("observerd_ring_ops", "gauge"),
                       ("observerd_rejected_total", "counter"), ("observerd_persist_errors_total", "counter"),
                       ("observerd_fsync_seconds", "histogram"), ("observerd_http_requests_total", "counter"),
                       ("observerd_http_request_seconds", "histogram"), ("observerd_start_time_seconds", "gauge"),
                       ("observerd_build_info", "gauge")]:
        assert families[name]["type"] == kind, name
    assert sample(families, "observerd_events_total", source="mcp", success="true") == 2
    assert sample(families, "observerd_events_total", source="scenario", success="false") == 1
    assert sample(families, "observerd_ring_ops") == 3
    assert sample(families, "observerd_rejected_total", reason="invalid") == 1
    assert sample(families, "observerd_rejected_total", reason="unauthorized") == 1
    assert sample(families, "observerd_http_requests_total", route="/observer/events", code="200") == 1
    assert sample(families, "observerd_http_requests_total", route="unmatched", code="404") == 1
    assert sample(families, "observerd_fsync_seconds", "observerd_fsync_seconds_count") == 1
    buckets = [v for n, labels, v in families["observerd_fsync_seconds"]["samples"] if n.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 1
    assert 0 < time.time() - sample(families, "observerd_start_time_seconds") < 60
    assert sample(families, "observerd_build_info", version=od.VERSION,
                  python=".".join(map(str, sys.version_info[:3]))) == 1


def test_metric_label_values_are_escaped():
    metrics = od.Metrics()
    metrics.rejected.inc('a "quoted" \\ back\nslash')
    families = parse_exposition(metrics.render())
    assert families["observerd_rejected_total"]["samples"][0][1] == {"reason": 'a \\"quoted\\" \\\\ back\\nslash'}


def test_every_counter_is_exported_from_0_at_startup(serve):
    client = serve().client()
    client.conn.request("GET", "/metrics")
    families = parse_exposition(client.conn.getresponse().read().decode())
    assert sample(families, "observerd_persist_errors_total") == 0
    assert sample(families, "observerd_fsync_seconds", "observerd_fsync_seconds_count") == 0
    for reason in KNOWN_REJECTION_REASONS:
        assert sample(families, "observerd_rejected_total", reason=reason) == 0, reason
    for source in ("mcp", "scenario", "langfuse", "overseer_correction"):
        for success in ("true", "false"):
            assert sample(families, "observerd_events_total", source=source, success=success) == 0
    for success in ("true", "false"):
        assert sample(families, "observerd_endpoint_events_total", endpoint=od.OTHER_LABEL, success=success) == 0
    for outcome in ("sent", "failed"):
        assert sample(families, "observerd_escalations_total", outcome=outcome) == 0


def test_endpoint_series_name_the_busiest_endpoints_and_count_the_rest_as_other(serve, tmp_path):
    journal = tmp_path / "busy.jsonl"
    # 40 endpoints in the journal, /busy/i stored i + 1 times: the 32 busiest are /busy/8 … /busy/39.
    journal.write_bytes(b"".join(od.encode_line(od.validate_op(op(f"/busy/{i}", success=True)))
                                 for i in range(40) for _ in range(i + 1)))
    server = serve(persist_path=str(journal), ring_size=2000)
    client = server.client()
    families = scrape(client)
    busiest = {f"/busy/{i}" for i in range(8, 40)}
    assert {endpoint for endpoint, _ in endpoint_series(families)} == busiest | {od.OTHER_LABEL}
    assert set(endpoint_series(families).values()) == {0}, "restored ops are not counted again"

    client.post("/observer/events", [op("/busy/0"), op("/busy/39", success=True), op("/busy/39"),
                                     op("/brand-new"), op("/brand-new", success=True)])
    series = endpoint_series(scrape(client))
    assert series[("/busy/39", "true")] == 1 and series[("/busy/39", "false")] == 1
    # The cap is full: an endpoint outside the restored busiest, old or new, is (other).
    assert series[(od.OTHER_LABEL, "false")] == 2 and series[(od.OTHER_LABEL, "true")] == 1
    assert ("/brand-new", "false") not in series and ("/busy/0", "false") not in series
    assert len(series) == 2 * (od.ENDPOINT_LABELS + 1)
    # By source and by endpoint, the same ops are counted.
    by_source = sum(value for _, _, value in scrape(client)["observerd_events_total"]["samples"])
    assert by_source == sum(series.values()) == 5


def test_new_endpoints_are_named_until_the_cap_and_each_from_0_for_both_outcomes(serve):
    client = serve(persist_path="").client()
    client.post("/observer/events", [op(f"/e/{i}", success=True) for i in range(od.ENDPOINT_LABELS + 5)])
    series = endpoint_series(scrape(client))
    named = {endpoint for endpoint, _ in series} - {od.OTHER_LABEL}
    assert len(named) == od.ENDPOINT_LABELS
    assert series[(od.OTHER_LABEL, "true")] == 5
    assert all(series[(endpoint, "false")] == 0 and series[(endpoint, "true")] == 1 for endpoint in named)


def test_ready_and_journal_gauges_follow_a_real_fault_and_its_end(tmp_path, daemons):
    config = write_settings(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl"})
    daemon = daemons(tmp_path, config=config, preexec_fn=limit_file_size(1 << 40)).wait_listening()
    client = daemon.client()

    def gauges():
        families = scrape(client)
        return {name: sample(families, name) for name in ("observerd_ready", "observerd_journal_writable")}

    assert gauges() == {"observerd_ready": 1, "observerd_journal_writable": 1}
    families = scrape(client)
    free, size = (sample(families, f"observerd_journal_disk_{kind}_bytes") for kind in ("free", "size"))
    disk = os.statvfs(tmp_path)
    assert size == disk.f_blocks * disk.f_frsize and 0 < free <= size

    assert client.post("/observer/event", op("/a"))[0] == 200
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, ((tmp_path / "ops.jsonl").stat().st_size,
                                                              resource.RLIM_INFINITY))
    assert client.post("/observer/event", op("/b"))[0] == 503
    assert gauges() == {"observerd_ready": 0, "observerd_journal_writable": 0}
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    wait_for(lambda: gauges() == {"observerd_ready": 1, "observerd_journal_writable": 1},
             what="the probe to find the journal writable")


def test_an_ephemeral_daemon_exports_no_journal_gauges(serve):
    families = scrape(serve(persist_path="").client())
    assert sample(families, "observerd_ready") == 1
    for name in ("observerd_journal_writable", "observerd_journal_disk_free_bytes",
                 "observerd_journal_disk_size_bytes"):
        assert families[name]["samples"] == [], name


def test_escalations_are_counted_by_outcome_from_0(tmp_path, fake_service):
    metrics = od.Metrics()
    assert sample(parse_exposition(metrics.render()), "observerd_escalations_total", outcome="failed") == 0
    groups = od.group_failures([od.RingOp(op("/x", error="boom"))])
    for service, outcome in ((fake_service(status=503), "failed"), (fake_service(), "sent")):
        config = make_config(tmp_path, escalate_url=service.url, escalate_threshold=1)
        od.Escalator(config, od.Insights(), metrics).check(groups)
        assert sample(parse_exposition(metrics.render()), "observerd_escalations_total", outcome=outcome) == 1


def test_fsync_p99_is_estimated_from_the_histogram_buckets():
    histogram = od.Histogram("x_seconds", "x")
    assert histogram.quantile(0.99) is None
    for _ in range(98):
        histogram.observe(0.0003)  # (0.00025, 0.0005]
    histogram.observe(0.002)  # (0.001, 0.0025]
    histogram.observe(0.002)
    # Rank 99 falls in (0.001, 0.0025], holding ranks 99-100: half-way through it.
    assert histogram.quantile(0.99) == pytest.approx(0.00175)
    assert histogram.quantile(0.5) == pytest.approx(0.00025 + 0.00025 * 50 / 98)
    histogram.observe(60)  # past the last bound: reported as that bound
    assert histogram.quantile(1.0) == 5


# -----------------------------------------------------------------------------
# [SECTION] Config
# -----------------------------------------------------------------------------

def test_config_defaults_are_exactly_the_documented_ones(tmp_path):
    path = tmp_path / "lakehouse.toml"
    path.write_text("[other_daemon]\nanything = 1\n[observerd]\n")
    config = od.load_config(str(path), environ={})
    assert (config.host, config.port) == ("127.0.0.1", 3219)
    assert config.persist_path == tmp_path / "data/observer/ops.jsonl"
    assert (config.ring_size, config.recent_scenarios, config.max_body_bytes) == (2000, 10, 4194304)
    assert config.token == ""


def test_shipped_lakehouse_toml_loads_with_the_defaults():
    config = od.load_config(str(HERE / "lakehouse.toml"), environ={})
    assert config.bind == "127.0.0.1:3219"
    assert config.persist_path == HERE / "data/observer/ops.jsonl"


def test_shipped_lakehouse_toml_sets_what_a_host_must_and_shows_every_other_setting_at_its_default():
    # Uncommented, every "# key = value" line is the setting at its default: a default changed
    # in code can never be pinned at its old value by the shipped file.
    text = (HERE / "lakehouse.toml").read_text()
    document = tomllib.loads(text)
    assert document == {"observerd": {"bind": "127.0.0.1:3219", "persist_path": "data/observer/ops.jsonl"},
                        "auth": {}}
    shown = tomllib.loads(re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M))
    for setting in od.SETTINGS:
        value = shown[setting.table][setting.name]
        if setting.name not in document[setting.table]:
            assert value == ("" if setting.default is None else setting.default), setting.name
    assert sum(len(table) for table in shown.values()) == len(od.SETTINGS)


def test_cli_flags_and_env_override_the_file(tmp_path):
    path = write_config(tmp_path, {"bind": "127.0.0.1:1000", "persist_path": "x.jsonl"}, {"token": "file"})
    config = od.load_config(str(path), bind="127.0.0.1:0", persist_path="",
                            environ={"OBSERVERD_TOKEN": "env"})
    assert (config.port, config.persist_path, config.token) == (0, None, "env")


@pytest.mark.parametrize("value, problem", [("nan", "must be a finite number, got nan"),
                                            ("inf", "must be a finite number, got inf"),
                                            ("1e20", "must be <= 31536000, got 1e+20")])
def test_a_duration_that_no_timer_takes_is_a_config_problem(tmp_path, value, problem):
    durations = [s.name for s in od.SETTINGS if s.kind is float]
    path = tmp_path / "lakehouse.toml"
    path.write_text("[observerd]\n" + "".join(f"{key} = {value}\n" for key in durations))
    with pytest.raises(od.ConfigError) as exc:
        od.load_config(str(path), environ={})
    assert exc.value.problems == [f"[observerd] {key} {problem}" for key in durations]


@pytest.mark.parametrize("table, needle", [
    ({"ring_sise": 5}, "unknown key 'ring_sise'"),
    ({"ring_size": "big"}, "ring_size must be int"),
    ({"ring_size": 0}, "ring_size must be >= 1"),
    ({"max_body_bytes": True}, "max_body_bytes must be int"),
    ({"bind": "nohostport"}, "host:port"),
    ({"run_field": ""}, "run_field must name a field, without ="),
    ({"run_field": "run=id"}, "run_field must name a field, without ="),
])
def test_config_problems_are_named(tmp_path, table, needle):
    with pytest.raises(od.ConfigError) as info:
        od.load_config(str(write_config(tmp_path, table)), environ={})
    assert needle in str(info.value)


def test_env_token_overrides_the_file_in_the_daemon(tmp_path, daemons):
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": ""}, {"token": "from-file"})
    daemon = daemons(tmp_path, config=config, env={"OBSERVERD_TOKEN": "from-env"}).wait_listening()
    assert daemon.client(token="from-file").get("/observer/stats")[0] == 401
    assert daemon.client(token="from-env").get("/observer/stats")[0] == 200


@pytest.mark.parametrize("settings, starts", [
    ({"bind": "0.0.0.0:0"}, False),
    ({"bind": "0.0.0.0:0", "allow_unauthenticated": True}, True),
    ({"bind": "0.0.0.0:0", "token": "t0ken"}, True),
    ({"bind": "127.0.0.1:0"}, True),
])
def test_non_loopback_bind_needs_a_token_or_explicit_opt_out(tmp_path, daemons, settings, starts):
    config = write_settings(tmp_path, {"persist_path": "", **settings})
    daemon = daemons(tmp_path, config=config)
    if starts:
        daemon.wait_listening()
    else:
        assert daemon.exit_status() == 2
        assert "not loopback" in daemon.log and len(daemon.log.strip().splitlines()) == 1


def test_an_unknown_auth_key_is_a_warning_naming_it_not_a_refusal(tmp_path, daemons):
    # Another lakehouse daemon's setting, in the [auth] table they share.
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl"},
                          {"token": "t0ken", "issuer": "lakehouse"})
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "warning: unknown key 'issuer' in [auth]" in result.stderr and "ok" in result.stdout
    daemon = daemons(tmp_path, config=config).wait_listening()
    warning = [line for line in daemon.log.splitlines() if "level=WARN" in line]
    assert len(warning) == 1 and "unknown key 'issuer' in [auth]" in warning[0]
    assert daemon.client(token="t0ken").get("/observer/stats")[0] == 200
    # [observerd] is observerd's own: a typo there still stops it.
    config = write_config(tmp_path, {"persist_path": "ops.jsonl", "ring_sise": 5}, {"issuer": "lakehouse"})
    assert run_cli("check", "--config", str(config)).returncode == 2


@pytest.mark.parametrize("file_token, env_token, where", [
    ("s3crét", None, "[auth] token"),
    ("fine", "tok\u00e9n", "OBSERVERD_TOKEN"),
    (" padded ", None, "[auth] token"),
    ("tab\there", None, "[auth] token"),
])
def test_a_token_that_could_never_match_is_a_config_problem(tmp_path, daemons, file_token, env_token, where):
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": ""}, {"token": file_token})
    env = {"OBSERVERD_TOKEN": env_token} if env_token else {}
    rule = f"{where} must be printable ASCII without leading or trailing spaces"
    result = run_cli("check", "--config", str(config), env=env)
    assert result.returncode == 2 and rule in result.stderr
    daemon = daemons(tmp_path, config=config, env=env)
    assert daemon.exit_status() == 2 and rule in daemon.log
    for secret in filter(None, (file_token.strip(), env_token)):
        assert secret not in result.stderr + daemon.log


def test_the_readme_settings_table_is_the_declaration():
    def typed(value, kind):
        return float(value) if kind is float and type(value) is int else value

    declared = [(s.label, type(s.default), s.default, s.minimum, s.maximum) for s in od.SETTINGS]
    documented = [(key, type(typed(default, od.SETTING[key.split()[-1]].kind)), default, minimum, maximum)
                  for key, default, minimum, maximum in readme_settings_table()]
    assert documented == declared


def test_a_relative_path_is_relative_to_the_folder_it_was_given_in(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "cwd").mkdir()
    config = write_config(tmp_path / "conf", {"playbooks_path": "pb.json", "corrections_path": "c.jsonl"})
    result = run_cli("check", "--config", str(config), "--persist-path", "flag/ops.jsonl",
                     cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    assert f'persist_path = "{tmp_path / "cwd/flag/ops.jsonl"}"' in result.stdout
    assert f'playbooks_path = "{tmp_path / "conf/pb.json"}"' in result.stdout
    assert f'corrections_path = "{tmp_path / "conf/c.jsonl"}"' in result.stdout


@pytest.mark.parametrize("settings, prepare, problem", [
    ({"playbooks_path": "ops.jsonl"}, None,
     "playbooks_path {d}/ops.jsonl is the same file as persist_path {d}/ops.jsonl"),
    ({"corrections_path": "ops.jsonl"}, None,
     "corrections_path {d}/ops.jsonl is the same file as persist_path {d}/ops.jsonl"),
    ({"corrections_path": "ops.jsonl.3"}, None,
     "corrections_path {d}/ops.jsonl.3 is the same file as persist_path's rotated segment {d}/ops.jsonl.3"),
    ({"playbooks_path": "ops.jsonl.corrections-position"}, None,
     "playbooks_path {d}/ops.jsonl.corrections-position is the same file as persist_path's corrections "
     "position {d}/ops.jsonl.corrections-position"),
    ({"playbooks_path": ".ops.jsonl.next"}, None,
     "playbooks_path {d}/.ops.jsonl.next is the same file as persist_path's rotation scratch file "
     "{d}/.ops.jsonl.next"),
    ({"playbooks_path": ".ops.jsonl.lock"}, None,
     "playbooks_path {d}/.ops.jsonl.lock is the same file as persist_path's lock file {d}/.ops.jsonl.lock"),
    ({"corrections_path": "other.jsonl"}, link_to_journal("symlink"),
     "corrections_path {d}/other.jsonl is the same file as persist_path {d}/ops.jsonl"),
    ({"playbooks_path": "other.jsonl"}, link_to_journal("hardlink"),
     "playbooks_path {d}/other.jsonl is the same file as persist_path {d}/ops.jsonl"),
])
def test_two_settings_naming_one_file_are_refused_by_check_and_serve(tmp_path, daemons, settings,
                                                                      prepare, problem):
    if prepare is not None:
        prepare(tmp_path)
    before = folder_contents(tmp_path)
    assert check_and_serve_refuse(tmp_path, settings, daemons) == [problem.format(d=tmp_path)]
    after = folder_contents(tmp_path)
    del after["lakehouse.toml"]
    assert after == before  # nothing was written over the journal


@pytest.mark.parametrize("settings, prepare, problem", [
    ({"persist_path": "ops.fifo"}, make_fifo("ops.fifo"), "persist_path {d}/ops.fifo: is not a regular file"),
    ({"persist_path": "/dev/null"}, None, "persist_path /dev/null: is not a regular file"),
    ({"corrections_path": "overseer"}, make_folder("overseer"), "corrections_path {d}/overseer: is a folder"),
    ({"playbooks_path": "pb.fifo"}, make_fifo("pb.fifo"), "playbooks_path {d}/pb.fifo: is not a regular file"),
    ({"playbooks_path": "/dev/null"}, None, "playbooks_path /dev/null: is not a regular file"),
    ({}, make_folder("ops.jsonl.2"), "persist_path's rotated segment {d}/ops.jsonl.2: is a folder"),
    ({"persist_path": "loop"}, make_symlink_loop("loop"), "persist_path {d}/loop: Too many levels of symbolic links"),
    ({"runtime_dir": "run"}, make_folder("run", 0o777), "runtime_dir {d}/run: is writable by others (mode 777): "
                                                         "chmod go-w it"),
    ({"runtime_dir": "run"}, make_folder("run", owner=65534),
     f"runtime_dir {{d}}/run: is owned by uid 65534, not by uid {os.geteuid()} that observerd runs as"),
])
def test_paths_that_are_not_regular_files_are_refused_by_check_and_serve(tmp_path, daemons, settings,
                                                                         prepare, problem):
    if prepare is not None:
        prepare(tmp_path)
    assert check_and_serve_refuse(tmp_path, settings, daemons) == [problem.format(d=tmp_path)]
    assert Path("/dev/null").is_char_device()


def test_keep_files_is_bounded_by_check_and_serve(tmp_path, daemons):
    assert check_and_serve_refuse(tmp_path, {"keep_files": 100_000_000}, daemons) == [
        "[observerd] keep_files must be <= 1000, got 100000000"]
    daemon = start_durable_daemon(daemons, tmp_path, keep_files=1000, max_file_bytes=300)
    client = daemon.client()
    for i in range(6):
        assert client.post("/observer/event", {"endpoint": f"/kept/{i}"})[0] == 200
    assert (tmp_path / "ops.jsonl.2").exists()
    daemon.stop()
    daemon = start_durable_daemon(daemons, tmp_path, keep_files=1000, max_file_bytes=300)
    assert [o["endpoint"] for o in daemon.client().get("/observer/ops")[1]["ops"]] == [
        f"/kept/{i}" for i in reversed(range(6))]


# -----------------------------------------------------------------------------
# [SECTION] Model
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("raw, field", [
    ({}, "endpoint"),
    ({"endpoint": ""}, "endpoint"),
    ({"endpoint": "  \t"}, "endpoint"),
    ({"endpoint": 5}, "endpoint"),
    ({"endpoint": "/e", "source": "cron"}, "source"),
    ({"endpoint": "/e", "source": 1}, "source"),
    ({"endpoint": "/e", "timestamp": "yesterday"}, "timestamp"),
    ({"endpoint": "/e", "timestamp": "2026-13-01T00:00:00Z"}, "timestamp"),
    ({"endpoint": "/e", "timestamp": "2026-11-24T10:00:00"}, "timestamp"),
    ({"endpoint": "/e", "timestamp": 1732440000}, "timestamp"),
    ({"endpoint": "/e", "success": "true"}, "success"),
    ({"endpoint": "/e", "success": 1}, "success"),
    ({"endpoint": "/e", "duration_ms": True}, "duration_ms"),
    ({"endpoint": "/e", "duration_ms": "12"}, "duration_ms"),
    ({"endpoint": "/e", "duration_ms": -1}, "duration_ms"),
    ({"endpoint": "/e", "error": 500}, "error"),
    ({"endpoint": "/e", "input_summary": ["a"]}, "input_summary"),
    ({"endpoint": "/e", "output_summary": {}}, "output_summary"),
    ([{"endpoint": "/e"}], "body"),
    ("text", "body"),
    (None, "body"),
])
def test_validation_names_the_field(raw, field):
    with pytest.raises(od.InvalidOp) as info:
        od.validate_op(raw)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_default_fields_are_filled_and_given_values_kept():
    filled = od.validate_op({"endpoint": "/e"})
    assert filled["source"] == "mcp"
    assert filled["success"] is False
    assert filled["duration_ms"] == 0
    assert od.parse_rfc3339(filled["timestamp"]).tzinfo is not None
    assert filled["timestamp"].endswith("Z")
    assert od.validate_op({"endpoint": "/e", "source": ""})["source"] == "mcp"
    given = {"endpoint": "/e", "source": "langfuse", "timestamp": "2026-11-24T19:56:56.5+02:00",
             "success": True, "duration_ms": 1.5, "error": "", "trace_id": "abc", "tags": [1, {"x": None}]}
    assert od.validate_op(given) == given


def test_strict_json_refuses_what_json_allows_loosely():
    for text, needle in [("NaN", "NaN"), ('{"a": Infinity}', "Infinity"), ('{"a":1,"a":2}', "duplicate"),
                         ("1" * 5000, "digits"), ("[" * 100000, "deep"), ("1e999", "range"),
                         (b"\xff\xfe", "UTF-8"), ("{", "JSON")]:
        with pytest.raises(od.InvalidOp) as info:
            od.parse_json_strict(text)
        assert needle in str(info.value), text[:20]


def test_batch_ingest_as_json_array_and_ndjson(serve, monkeypatch):
    server = serve()
    spy = FsyncSpy(monkeypatch)
    client = server.client()
    batch = [{"endpoint": f"/b{i}", "success": i % 2 == 0} for i in range(100)]
    assert client.post("/observer/events", batch)[:2] == (200, {"accepted": 100, "ring_size": 100})
    assert spy.calls == 1, "a batch is one write and one fsync"
    ndjson = "\n".join(json.dumps({"endpoint": f"/n{i}", "source": "scenario"}) for i in range(5)) + "\n\n"
    status, body, _ = client.post("/observer/events", ndjson, headers={"Content-Type": "application/x-ndjson"})
    assert (status, body) == (200, {"accepted": 5, "ring_size": 105})
    assert client.post("/observer/events", [])[:2] == (200, {"accepted": 0, "ring_size": 105})
    stats = client.get("/observer/stats")[1]
    assert (stats["total"], stats["successes"], stats["by_source"]) == (105, 50, {"mcp": 100, "scenario": 5})
    assert [o["endpoint"] for o in replay_forward(server.config.persist_path)][-1] == "/n4"


@pytest.mark.parametrize("body, content_type, status, needle", [
    ([{"endpoint": "/ok"}, {"endpoint": "/ok"}, {"source": "mcp"}], None, 400, "op 2 is invalid: endpoint is required"),
    ([{"endpoint": "/ok"}, "text"], None, 400, "op 1 is invalid: body must be a JSON object"),
    ({"endpoint": "/not-a-list"}, None, 400, "JSON array"),
    ('{"endpoint": "/a"}\n{"endpoint": \n', "application/x-ndjson", 400, "op 1 is not valid JSON"),
    ([{"endpoint": f"/{i}"} for i in range(11)], None, 413, "max_batch=10"),
    ("\n".join(['{"endpoint": "/x"}'] * 11), "application/x-ndjson", 413, "max_batch=10"),
])
def test_bad_batches_store_nothing(serve, body, content_type, status, needle):
    server = serve(max_batch=10)
    headers = {"Content-Type": content_type} if content_type else {}
    got, error, _ = server.client().post("/observer/events", body, headers=headers)
    assert (got, needle in error["error"]) == (status, True), error
    assert server.store.stats()["total"] == 0
    assert server.config.persist_path.read_bytes() == b""


def test_gzip_bodies_on_both_post_routes(serve):
    server = serve()
    client = server.client()
    one = gzip.compress(json.dumps({"endpoint": "/gz"}).encode())
    assert client.post("/observer/event", one, headers={"Content-Encoding": "gzip"})[0] == 200
    many = gzip.compress("\n".join(json.dumps({"endpoint": f"/gz{i}"}) for i in range(50)).encode())
    status, body, _ = client.post("/observer/events", many, headers={"Content-Encoding": "gzip",
                                                                    "Content-Type": "application/x-ndjson"})
    assert (status, body["accepted"]) == (200, 50)
    assert client.post("/observer/event", b"\x1f\x8b garbage", headers={"Content-Encoding": "gzip"})[0] == 400
    assert client.post("/observer/event", one[:-8], headers={"Content-Encoding": "gzip"})[0] == 400
    assert client.post("/observer/event", b"{}", headers={"Content-Encoding": "br"})[0] == 415
    assert server.store.stats()["total"] == 51


def test_a_gzip_bomb_is_413_without_inflating_it(serve, monkeypatch):
    server = serve()
    bomb = gzip.compress(b"0" * 10_000_000)
    assert len(bomb) < 100_000
    produced = []
    real = od.zlib.decompressobj

    def counting_decompressobj(*a, **k):
        inner = real(*a, **k)

        class Counting:
            def decompress(self, data, max_length=0):
                out = inner.decompress(data, max_length)
                produced.append(len(out))
                return out

            def __getattr__(self, name):
                return getattr(inner, name)
        return Counting()

    monkeypatch.setattr(od.zlib, "decompressobj", counting_decompressobj)
    status, body, _ = server.client().post("/observer/event", bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and "max_body_bytes" in body["error"]
    assert sum(produced) <= server.config.max_body_bytes + 1


def test_every_gzip_member_is_read_and_trailing_garbage_is_400(serve):
    server = serve(max_body_bytes=400)
    client = server.client()
    ndjson = {"Content-Encoding": "gzip", "Content-Type": "application/x-ndjson"}
    first = gzip.compress(b'{"endpoint": "/m1"}\n{"endpoint": "/m2"}\n')
    second = gzip.compress(b'{"endpoint": "/m3"}\n')
    status, body, _ = client.post("/observer/events", first + second, headers=ndjson)  # = gzip -c a b
    assert (status, body["accepted"]) == (200, 3)
    # One op split across two members is still one op.
    split = gzip.compress(b'{"endpoint": ') + gzip.compress(b'"/split"}')
    assert client.post("/observer/event", split, headers={"Content-Encoding": "gzip"})[0] == 200
    assert endpoints(server.store) == ["/m1", "/m2", "/m3", "/split"]
    for garbage in (b"\x00\x00", b"trailing", first[:10]):
        status, error, _ = client.post("/observer/events", first + garbage, headers=ndjson)
        assert status == 400 and "gzip" in error["error"], garbage
    # The cap is on the total: two members of 300 bytes each inflate to 600 > 400.
    member = gzip.compress(b'{"endpoint": "/big", "pad": "' + b"x" * 270 + b'"}\n')
    status, error, _ = client.post("/observer/events", member + member, headers=ndjson)
    assert status == 413 and "max_body_bytes=400" in error["error"]
    assert server.store.stats()["total"] == 4


def test_a_body_of_many_gzip_members_costs_work_linear_in_its_size(serve):
    server = serve()
    # 200,000 empty members after one op: 4 MB. Copying the rest of the body at the end of
    # each member would be 400 GB of copying; the answer must come well within a minute.
    body = gzip.compress(b'{"endpoint": "/first"}\n') + gzip.compress(b"") * 200_000
    client = server.client(timeout=60)
    status, answer, _ = client.post("/observer/events", body, headers={
        "Content-Encoding": "gzip", "Content-Type": "application/x-ndjson"})
    assert (status, answer["accepted"]) == (200, 1)


@pytest.mark.parametrize("persist", ["durable", "ephemeral"])
def test_lone_surrogates_are_400_naming_the_field_and_every_read_still_works(serve, persist):
    server = serve(**({"persist_path": ""} if persist == "ephemeral" else {}))
    client = server.client()
    assert client.post("/observer/event", '{"endpoint": "/pair \\ud83d\\ude00"}')[0] == 200  # a real pair is fine
    for text, field in LONE_SURROGATE_OPS:
        status, error, _ = client.post("/observer/event", text)
        assert status == 400 and f"{field} " in error["error"] and "surrogate" in error["error"], (text, error)
        batch = f'[{{"endpoint": "/ok"}}, {text}]'
        status, error, _ = client.post("/observer/events", batch)
        assert status == 400 and f"op 1 is invalid: {field} " in error["error"], (text, error)
        ndjson = '{"endpoint": "/ok"}\n' + text + "\n"
        status, error, _ = client.post("/observer/events", ndjson, headers={"Content-Type": "application/x-ndjson"})
        assert status == 400 and f"op 1 is invalid: {field} " in error["error"], (text, error)
    assert client.get("/observer/ops")[1]["count"] == 1
    assert client.get("/observer/stats")[1]["total"] == 1
    if persist == "durable":
        assert [o["endpoint"] for o in replay_forward(server.config.persist_path)] == ["/pair \U0001F600"]


def test_nesting_past_max_json_depth_is_400_naming_the_limit(serve):
    server = serve()
    client = server.client()
    assert od.MAX_JSON_DEPTH == 64
    deepest = f'{{"endpoint": "/ok", "extra": {nested(od.MAX_JSON_DEPTH - 1)}}}'  # the op is level 1
    assert client.post("/observer/event", deepest)[0] == 200
    for levels in (od.MAX_JSON_DEPTH, 200, 980):
        text = f'{{"endpoint": "/deep", "extra": {nested(levels)}}}'
        status, error, _ = client.post("/observer/event", text)
        assert status == 400 and "MAX_JSON_DEPTH=64" in error["error"], (levels, error)
        status, error, _ = client.post("/observer/events", f'[{{"endpoint": "/ok"}}, {text}]')
        assert status == 400 and "MAX_JSON_DEPTH=64" in error["error"]
        # The op's index, unless the array is too deep for the parser itself to follow.
        assert levels > 900 or "op 1 is invalid: extra" in error["error"], error
    assert client.get("/observer/ops")[1]["count"] == 1
    assert [o["endpoint"] for o in replay_forward(server.config.persist_path)] == ["/ok"]


def test_numbers_out_of_range_are_400_at_the_edge(serve):
    server = serve(ring_size=50)
    client = server.client()
    huge = '{"endpoint": "/slow", "duration_ms": 1' + "0" * 400 + "}"
    status, error, _ = client.post("/observer/event", huge)
    assert status == 400 and "duration_ms" in error["error"]
    status, error, _ = client.post("/observer/events", f'[{{"endpoint": "/ok"}}, {huge}]')
    assert status == 400 and "op 1 is invalid: duration_ms" in error["error"]
    largest = '{"endpoint": "/slow", "duration_ms": 1' + "0" * 307 + "}"  # 1e307 still fits a float
    assert client.post("/observer/event", largest)[0] == 200
    status, result, _ = client.post("/observer/review", {})
    assert status == 200 and result["reviews"][0]["p95_duration_ms"] == 10 ** 307
    for limit in ("1" + "0" * 4300, "9" * 5000, "0" * 30 + "51"):
        status, error, _ = client.get(f"/observer/ops?limit={limit}")
        assert status == 400 and "limit" in error["error"]
    assert client.get("/observer/ops?limit=" + "0" * 30 + "50")[1]["count"] == 1
    request = b"POST /observer/event HTTP/1.1\r\nContent-Length: " + b"9" * 4301 + b"\r\n\r\n{}"
    status, error = parse_response(raw_exchange(server.port, request))
    assert status == 413 and "max_body_bytes" in error["error"]
    assert server.store.stats()["total"] == 1


def test_a_batch_of_exactly_max_batch_ops_is_accepted(serve):
    server = serve(max_batch=10)
    client = server.client()
    assert client.post("/observer/events", [{"endpoint": f"/{i}"} for i in range(10)])[1]["accepted"] == 10
    ndjson = "\n".join(json.dumps({"endpoint": f"/{i}"}) for i in range(10))
    status, body, _ = client.post("/observer/events", ndjson, headers={"Content-Type": "application/x-ndjson"})
    assert (status, body["accepted"]) == (200, 10)


# -----------------------------------------------------------------------------
# [SECTION] Files
# -----------------------------------------------------------------------------

def test_backward_reads_take_each_byte_once_and_hold_a_long_line_at_most_twice(tmp_path, monkeypatch):
    run = 8 * 1024 * 1024  # a run without a newline: NULs left by a crash, or a hostile line
    reads = count_reads(monkeypatch)
    restored = tmp_path / "ops.jsonl"
    restored.write_bytes(od.encode_line(op("/first")) + b"\0" * run + b"\n" + od.encode_line(op("/last")))
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(od.encode_line(op("/whole")) + b"\0" * run)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        assert [o["endpoint"] for o in od.restore_journal(restored, 10).ops] == ["/first", "/last"]
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert sum(reads) == restored.stat().st_size
    # The run is joined once from its blocks, then decoded once for the parser: never a third copy.
    assert peak < 2.5 * run
    reads.clear()
    assert od.repair_torn_tail(torn) == run
    assert sum(reads) <= run + od.BLOCK_BYTES
    assert endpoints_in(torn) == ["/whole"]


def test_restoring_a_long_run_without_newlines_is_linear_work(tmp_path):
    # A scale model: with 64-byte blocks, 16 MiB is as many blocks as 16 GiB at the real block
    # size. Linear, that is about a second of CPU; re-copying what was read, hours.
    path = tmp_path / "ops.jsonl"
    path.write_bytes(od.encode_line(op("/first")) + b"\0" * (16 << 20) + b"\n" + od.encode_line(op("/last")))
    code = "import sys, observerd; observerd.BLOCK_BYTES = 64; sys.exit(observerd.main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "stats", str(path)], cwd=HERE, capture_output=True,
                            text=True, timeout=300, preexec_fn=limit_cpu_seconds(30))
    assert result.returncode == 0, result.stderr[-500:]
    assert json.loads(result.stdout)["total"] == 2


# -----------------------------------------------------------------------------
# [SECTION] Journal
# -----------------------------------------------------------------------------

def test_jsonl_round_trip_restores_the_same_stats(tmp_path):
    config = make_config(tmp_path)
    store = od.open_store(config)
    ops = [op(f"/{i}", source=od.SOURCES[i % 4], success=i % 2 == 0, extra={"i": i}) for i in range(25)]
    for o in ops:
        store.submit_and_wait([o])
    before = plain(store.stats())
    store.close()
    lines = config.persist_path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == ops
    restored = od.open_store(config)
    restored.restore()
    assert plain(restored.stats()) == before
    assert dicts(restored.ring.ops) == ops
    restored.close()


def test_replay_skips_a_corrupt_line_and_keeps_the_rest(tmp_path, capsys):
    path = tmp_path / "ops.jsonl"
    good = [op("/a"), op("/b")]
    path.write_bytes(od.encode_line(good[0]) + b'{"endpoint": "/broken", \n' + od.encode_line(good[1]))
    assert dicts(od.restore_journal(path, 2000).ops) == good
    assert "skipped invalid journal line" in capsys.readouterr().err


def test_torn_tail_is_cut_back_before_the_first_append(tmp_path, capsys):
    path = tmp_path / "ops.jsonl"
    whole = od.encode_line(op("/whole"))
    path.write_bytes(whole + b'{"endpoint":"/torn","sour')
    journal = od.Journal(path)
    journal.open()
    assert path.read_bytes() == whole
    assert "dropped_bytes=25" in capsys.readouterr().err
    journal.append_durably(od.encode_line(op("/next")))
    journal.close()
    assert [o["endpoint"] for o in replay_forward(path)] == ["/whole", "/next"]


def test_a_clean_file_is_not_touched_at_open(tmp_path, capsys):
    path = tmp_path / "ops.jsonl"
    path.write_bytes(od.encode_line(op("/a")) + od.encode_line(op("/b")))
    os.utime(path, ns=(1, 1))
    journal = od.Journal(path)
    journal.open()
    journal.close()
    assert path.stat().st_mtime_ns == 1
    assert "torn" not in capsys.readouterr().err


def test_creating_the_log_fsyncs_every_folder_that_gained_an_entry(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    journal = od.Journal(tmp_path / "a" / "b" / "ops.jsonl")
    journal.open()
    journal.close()
    assert synced == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]


def test_full_disk_is_503_with_ring_and_file_clean_then_recovers(tmp_path, daemons):
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl"})
    daemon = daemons(tmp_path, config=config, preexec_fn=limit_file_size(1000)).wait_listening()
    client = daemon.client()
    accepted, status = 0, 200
    while status == 200:
        status, body, _ = client.post("/observer/event", {"endpoint": f"/fill/{accepted}", "pad": "x" * 40})
        accepted += status == 200
    assert status == 503 and "not persisted" in body["error"], body
    assert accepted >= 5
    path = tmp_path / "ops.jsonl"
    assert len(replay_forward(path)) == accepted
    assert path.read_bytes().endswith(b"\n"), "a failed write must leave no partial line"
    assert client.post("/observer/event", {"endpoint": "/still-full"})[0] == 503
    assert client.get("/observer/stats")[1]["total"] == accepted
    assert client.get("/observer/health")[0] == 200
    assert "op not persisted" in daemon.log

    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    assert client.post("/observer/event", {"endpoint": "/after-recovery"})[0] == 200
    assert [o["endpoint"] for o in replay_forward(path)][-1] == "/after-recovery"
    assert client.get("/observer/stats")[1]["total"] == accepted + 1


@pytest.mark.parametrize("seed", range(8))
def test_tail_restore_equals_a_full_forward_replay(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(od, "BLOCK_BYTES", 97)  # many block boundaries, mid-line and mid-char
    rng = random.Random(seed)
    path = tmp_path / "ops.jsonl"
    path.write_bytes(messy_log(rng, rng.choice([0, 3, 40, 400])))
    forward = replay_forward(path)
    for ring_size in (1, 7, 50, 2000):
        assert dicts(od.restore_journal(path, ring_size).ops) == forward[-ring_size:]


def test_tail_restore_reads_across_segments_oldest_last(tmp_path):
    rng = random.Random(3)
    path = tmp_path / "ops.jsonl"
    segments = list(od.segment_paths(path, 3))
    for segment in reversed(segments):  # oldest first, as rotation would have written them
        segment.write_bytes(messy_log(rng, 30).rsplit(b"\n", 1)[0] + b"\n")
    forward = [o for segment in reversed(segments) for o in replay_forward(segment)]
    for ring_size in (5, 30, 60, 1000):
        assert dicts(od.restore_journal(path, ring_size, keep_files=3).ops) == forward[-ring_size:]
    assert dicts(od.restore_journal(path, 1000, keep_files=1).ops) == forward[-len(replay_forward(segments[0])) - len(replay_forward(segments[1])):]


def test_restore_reads_only_the_tail_of_a_big_file(tmp_path, monkeypatch):
    path = tmp_path / "ops.jsonl"
    line = od.encode_line(op("/big"))
    path.write_bytes(line * 50000)
    reads = count_reads(monkeypatch)
    assert len(od.restore_journal(path, 100).ops) == 100
    assert sum(reads) < 2 * od.BLOCK_BYTES < path.stat().st_size / 10


def test_rotation_under_concurrent_load_loses_nothing_and_splits_no_line(serve):
    server = serve(max_file_bytes=4000, keep_files=1000, ring_size=100000)
    acked = []

    def post_many(n):
        client = server.client()
        for i in range(40):
            if i % 10 == 0:
                batch = [{"endpoint": f"/r{n}/{i}/{j}"} for j in range(5)]
                if client.post("/observer/events", batch)[0] == 200:
                    acked.extend(b["endpoint"] for b in batch)
            elif client.post("/observer/event", {"endpoint": f"/r{n}/{i}"})[0] == 200:
                acked.append(f"/r{n}/{i}")

    in_threads(post_many, 8)
    path = server.config.persist_path
    segments = [p for p in od.segment_paths(path, 1000) if p.exists()]
    assert len(segments) > 5
    stored = []
    for segment in reversed(segments):
        data = segment.read_bytes()
        assert data.endswith(b"\n") and len(data) <= 4000
        stored.extend(od.validate_op(od.parse_json_strict(line)) for line in data.splitlines())
    assert sorted(o["endpoint"] for o in stored) == sorted(acked)
    assert [o["endpoint"] for o in stored] == [o["endpoint"] for o in server.store.ring.ops]
    assert dicts(od.restore_journal(path, 100000, 1000).ops) == stored


def test_rotation_keeps_only_keep_files_segments_and_restart_restores_the_tail(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path, max_file_bytes=1000, keep_files=2, ring_size=12)
    client = daemon.client()
    for i in range(100):
        assert client.post("/observer/event", {"endpoint": f"/k{i}"})[0] == 200
    before = client.get("/observer/stats")[1]
    names = sorted(p.name for p in tmp_path.glob("ops.jsonl*"))
    assert names == ["ops.jsonl", "ops.jsonl.1", "ops.jsonl.2"]
    assert "msg=\"rotated journal\"" in daemon.log
    daemon.stop()
    daemon = start_durable_daemon(daemons, tmp_path, max_file_bytes=1000, keep_files=2, ring_size=12)
    assert daemon.client().get("/observer/stats")[1] == before


def test_restore_honours_the_ring_byte_bound_and_reads_only_what_it_keeps(tmp_path, monkeypatch):
    path = tmp_path / "ops.jsonl"
    lines = [od.encode_line(op(f"/{i}", extra="x" * 100_000)) for i in range(40)]
    path.write_bytes(b"".join(lines))
    reads = count_reads(monkeypatch)
    restored = od.restore_journal(path, 2000, max_bytes=500_000).ops
    assert [o.endpoint for o in restored] == ["/36", "/37", "/38", "/39"]
    assert sum(o.size for o in restored) <= 500_000
    assert sum(reads) < 6 * len(lines[0]) + 2 * od.BLOCK_BYTES


def test_a_failed_append_rolls_back_only_its_own_bytes_after_another_writer_appended(tmp_path, daemons):
    limit = 2000
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl"})
    daemon = daemons(tmp_path, config=config, preexec_fn=limit_file_size(limit)).wait_listening()
    client = daemon.client()
    path = tmp_path / "ops.jsonl"

    def post(endpoint, **fields):
        return client.post("/observer/event", {"endpoint": endpoint, **fields})[0]

    for i in range(3):
        assert post(f"/before/{i}") == 200
    append_to(path, od.encode_line(op("/foreign/1", source="langfuse")))  # another writer
    assert post("/after-foreign") == 200
    assert post("/too-big", pad="x" * limit) == 503  # a short write up to the limit, then EFBIG
    append_to(path, od.encode_line(op("/foreign/2", pad="y" * limit)))  # now past the limit
    assert post("/past-the-limit") == 503  # fails before writing a byte
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    assert post("/after-recovery") == 200
    assert endpoints_in(path) == ["/before/0", "/before/1", "/before/2", "/foreign/1", "/after-foreign",
                                  "/foreign/2", "/after-recovery"]


def test_an_op_after_another_writers_unfinished_line_starts_its_own_line(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path)
    client = daemon.client()
    path = tmp_path / "ops.jsonl"
    assert client.post("/observer/event", {"endpoint": "/first"})[0] == 200
    append_to(path, b'{"endpoint":"/foreign","sour')  # another writer stopped mid-line
    assert client.post("/observer/event", {"endpoint": "/second"})[0] == 200
    assert [o["endpoint"] for o in replay_forward(path)] == ["/first", "/second"]
    daemon.stop()
    daemon = start_durable_daemon(daemons, tmp_path)
    assert daemon.client().get("/observer/stats")[1]["total"] == 2
    assert "skipped invalid journal line" in daemon.log  # the fragment, on a line of its own


@pytest.mark.parametrize("spare_fds", [0, 1])  # 0: the new file cannot be created; 1: the folder cannot be opened
def test_a_rotation_that_fails_for_want_of_fds_changes_nothing_then_proceeds(tmp_path, daemons, spare_fds):
    daemon = start_durable_daemon(daemons, tmp_path, max_file_bytes=1000, keep_files=3, request_timeout_s=600.0)
    client = daemon.client()
    path, first_segment = tmp_path / "ops.jsonl", tmp_path / "ops.jsonl.1"
    stamp = "2026-11-24T19:56:56Z"
    line_bytes = len(od.encode_line(op("/r/000", timestamp=stamp)))
    acked = []

    def post(i):
        status = client.post("/observer/event", {"endpoint": f"/r/{i:03d}", "timestamp": stamp})[0]
        if status == 200:
            acked.append(f"/r/{i:03d}")
        return status

    i = 0
    while not first_segment.exists() or path.stat().st_size + line_bytes <= 1000:
        assert post(i) == 200
        i += 1
    # The next op needs a rotation. Fill the daemon's fd table, but for spare_fds, with idle
    # connections, as a crowd of clients would under a low RLIMIT_NOFILE.
    pid = daemon.proc.pid
    in_use = open_fds(pid)
    limit = max(in_use) + 5
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    idle = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(limit - len(in_use) - spare_fds)]
    wait_for(lambda: len(open_fds(pid)) == limit - spare_fds, timeout=30,
             what="the daemon to accept the idle connections")
    before = folder_contents(tmp_path)
    for _ in range(5):  # more failed attempts than keep_files
        assert post(i) == 503
        assert folder_contents(tmp_path) == before, "a failed rotation changed the folder"
    assert "cannot rotate journal" in daemon.log
    assert len(open_fds(pid)) == limit - spare_fds, "a failed rotation leaked a file descriptor"
    for sock in idle:
        sock.close()
    wait_for(lambda: len(open_fds(pid)) == len(in_use), timeout=30, what="the idle connections to close")
    assert post(i) == 200
    segments = list(od.segment_paths(path, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ops.jsonl.lock", "lakehouse.toml", "ops.jsonl",
                                                          "ops.jsonl.1", "ops.jsonl.2"]
    assert [e for segment in reversed(segments) if segment.exists() for e in endpoints_in(segment)] == acked
    assert endpoints_in(path) == [acked[-1]]


# One writer per journal ------------------------------------------------------


def test_a_second_daemon_on_the_same_journal_exits_2_naming_the_holder_and_readers_go_on(tmp_path, daemons):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to("data")
    first = start_durable_daemon(daemons, tmp_path, persist_path="data/ops.jsonl")
    assert first.client().post("/observer/event", {"endpoint": "/before"})[0] == 200
    # The same journal through another spelling of its path: a symlinked folder, .. and ./
    other = tmp_path / "other"
    other.mkdir()
    config = write_settings(other, {"bind": "127.0.0.1:0", "persist_path": "../link/../link/./ops.jsonl",
                                    "runtime_dir": "run"})
    second = daemons(other, config=config)
    assert second.exit_status() == 2
    errors = [line for line in second.log.splitlines() if "level=" in line and "level=INFO" not in line]
    assert len(errors) == 1, second.log
    assert 'msg="journal in use by another observerd; not starting"' in errors[0]
    assert f"pid={first.proc.pid}" in errors[0] and "ops.jsonl" in errors[0]
    assert "msg=listening" not in second.log
    # Readers never take the lock, and check says who holds the journal without failing.
    ops = run_cli("ops", "--config", str(config), "-o", "ndjson")
    assert ops.returncode == 0 and json.loads(ops.stdout)["endpoint"] == "/before", ops.stderr
    stats = run_cli("stats", "--config", str(config), str(tmp_path / "data" / "ops.jsonl"))
    assert stats.returncode == 0 and json.loads(stats.stdout)["total"] == 1, stats.stderr
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert f"in use by a running observerd (pid {first.proc.pid})" in checked.stderr
    # The same config as the running daemon's, its port included: check notes the live daemon a
    # restart replaces instead of failing on its port; serve stops at the lock, naming it.
    same = write_settings(tmp_path / "data", {"bind": f"127.0.0.1:{first.port}", "persist_path": "ops.jsonl",
                                              "runtime_dir": "run"})
    checked = run_cli("check", "--config", str(same))
    assert checked.returncode == 0, checked.stderr
    assert f"journal {tmp_path / 'data' / 'ops.jsonl'} and its port in use by a running observerd " \
           f"(pid {first.proc.pid}): a restart frees them" in checked.stderr
    twin = daemons(tmp_path / "data", config=same)
    assert twin.exit_status() == 2 and f"pid={first.proc.pid}" in twin.log and "journal in use" in twin.log
    assert first.client().post("/observer/event", {"endpoint": "/after"})[0] == 200
    # SIGKILL: the kernel lets go of the lock; the next daemon starts at once, no pid file to delete.
    first.proc.kill()
    first.exit_status()
    assert "in use" not in run_cli("check", "--config", str(config)).stderr
    third = daemons(other, config=config).wait_listening()
    assert [o["endpoint"] for o in third.client().get("/observer/ops")[1]["ops"]] == ["/after", "/before"]
    assert (tmp_path / "data" / ".ops.jsonl.lock").read_text().splitlines()[0] == str(third.proc.pid)


def test_an_ephemeral_daemon_takes_no_lock(tmp_path, daemons):
    for _ in range(2):
        start_durable_daemon(daemons, tmp_path, persist_path="")
    assert not list(tmp_path.glob(".*.lock"))


def test_an_op_whose_fsync_failed_is_stored_anew_after_a_restart_never_acked_as_a_duplicate(tmp_path, daemons):
    faulty = FaultyDaemon(daemons, tmp_path)
    daemon = faulty.start()
    client = daemon.client()
    assert post_op(client, "op-1")[0] == 200
    # The write lands, its fsync fails, and so does the cut that would take it back out.
    faulty.inject("fsync", "ftruncate")
    assert post_op(client, "op-3")[0] == 503
    assert endpoints_in(faulty.journal).count("/e") == 2, "the failed op's line stays in the file"
    [(dev, ino, start, end, crc, name, at_startup)] = faulty.records()
    assert (ino, name) == (faulty.journal.stat().st_ino, "ops.jsonl")
    assert faulty.journal.read_bytes()[start:end].count(b'"op-3"') == 1 and end == faulty.journal.stat().st_size
    wait_for(lambda: 'msg="journal bytes whose fsync failed could not be cut; recorded' in daemon.log,
             what="the WARN line (written before the 503, read by another thread)")
    # No reader trusts it meanwhile, in this process or another.
    assert [o["op_id"] for o in client.get("/observer/history")[1]["ops"]] == ["op-1"]
    assert [json.loads(line)["op_id"] for line in
            run_cli("ops", "--config", str(faulty.config)).stdout.splitlines()] == ["op-1"]
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.exit_status()
    faulty.inject()
    daemon = faulty.start()
    assert 'msg="cut bytes whose fsync failed from the journal"' in daemon.log
    [kept] = tmp_path.glob(".ops.jsonl.unsynced-*")
    assert b'"op-3"' in kept.read_bytes() and faulty.records() == []
    client = daemon.client()
    status, body, _ = post_op(client, "op-3")
    assert status == 200 and body["duplicate"] is False
    assert [json.loads(line)["op_id"] for line in faulty.journal.read_text().splitlines()] == ["op-1", "op-3"]


def test_a_recorded_range_with_ops_after_it_is_skipped_by_restore_and_every_reader(tmp_path, daemons):
    faulty = FaultyDaemon(daemons, tmp_path)
    daemon = faulty.start()
    client = daemon.client()
    faulty.inject("fsync", "ftruncate")
    assert post_op(client, "op-3", "/failed")[0] == 503
    faulty.inject()
    assert post_op(client, "op-4", "/after")[0] == 200  # appended after the recorded bytes
    daemon.proc.kill()
    daemon.exit_status()
    daemon = faulty.start()
    assert 'msg="journal holds bytes whose fsync failed; every reader skips them"' in daemon.log
    client = daemon.client()
    assert [o["endpoint"] for o in client.get("/observer/ops")[1]["ops"]] == ["/after"]
    assert [o["endpoint"] for o in client.get("/observer/history")[1]["ops"]] == ["/after"]
    listed = run_cli("ops", "--config", str(faulty.config), "-o", "ndjson")
    assert [json.loads(line)["endpoint"] for line in listed.stdout.splitlines()] == ["/after"]
    status, body, _ = post_op(client, "op-3", "/failed")
    assert status == 200 and body["duplicate"] is False
    assert [o["endpoint"] for o in client.get("/observer/history")[1]["ops"]] == ["/failed", "/after"]


def test_a_recorded_range_the_file_no_longer_holds_hides_no_later_op(tmp_path, daemons):
    faulty = FaultyDaemon(daemons, tmp_path)
    daemon = faulty.start()
    client = daemon.client()
    faulty.inject("fsync", "ftruncate")
    assert post_op(client, "op-x", "/failed")[0] == 503
    faulty.inject()
    os.truncate(faulty.journal, 0)  # logrotate's copytruncate: the same inode, emptied in place
    assert post_op(client, "op-y", "/stored")[0] == 200  # at the offsets the record names
    assert faulty.records(), "the record outlives the bytes it names"
    assert [o["endpoint"] for o in client.get("/observer/history")[1]["ops"]] == ["/stored"]
    daemon.proc.kill()
    daemon.exit_status()
    daemon = faulty.start()
    assert [o["endpoint"] for o in daemon.client().get("/observer/ops")[1]["ops"]] == ["/stored"]
    assert endpoints_in(faulty.journal) == ["/stored"] and faulty.records() == []


def test_a_cut_whose_fsync_failed_is_retried_never_recorded_over_the_next_append(tmp_path, daemons):
    faulty = FaultyDaemon(daemons, tmp_path)
    daemon = faulty.start()
    client = daemon.client()
    assert post_op(client, "op-1")[0] == 200
    # The truncate of the cut works (it is the cache's), its fsync fails, like the append's.
    faulty.inject("fsync")
    assert post_op(client, "op-2")[0] == 503
    assert post_op(client, "op-2")[0] == 503  # nothing is taken while the cut is not durable
    assert faulty.records() == [], "a range past the end of the file would cover the next append"
    faulty.inject()
    wait_for(lambda: client.get("/observer/ready")[0] == 200, what="the probe to finish the cut")
    # The client's retry lands where the failed bytes were, byte for byte the same.
    status, body, _ = post_op(client, "op-2")
    assert status == 200 and body["duplicate"] is False
    assert [o["op_id"] for o in client.get("/observer/history")[1]["ops"]] == ["op-2", "op-1"]
    daemon.proc.kill()
    daemon.exit_status()
    daemon = faulty.start()
    assert [o["op_id"] for o in daemon.client().get("/observer/history")[1]["ops"]] == ["op-2", "op-1"]


def test_bytes_that_cannot_be_kept_aside_stay_recorded_and_the_daemon_starts(tmp_path, daemons):
    faulty = FaultyDaemon(daemons, tmp_path)
    daemon = faulty.start()
    client = daemon.client()
    assert post_op(client, "op-1", "/stored")[0] == 200
    faulty.inject("fsync", "ftruncate")
    assert post_op(client, "op-2", "/failed")[0] == 503
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.exit_status()
    faulty.inject("forensics")  # the disk is full: the copy of the bytes to cut fails
    daemon = faulty.start()
    assert 'msg="cannot keep the bytes whose fsync failed aside' in daemon.log
    assert [o["endpoint"] for o in daemon.client().get("/observer/history")[1]["ops"]] == ["/stored"]
    assert len(faulty.records()) == 1 and not list(tmp_path.glob(".ops.jsonl.unsynced-*"))


def test_bytes_neither_cut_nor_recorded_at_shutdown_are_an_error_and_a_failed_exit(tmp_path, daemons):
    faulty = FaultyDaemon(daemons, tmp_path)
    daemon = faulty.start()
    faulty.inject("fsync", "ftruncate", "record")
    assert post_op(daemon.client(), "op-1")[0] == 503
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 1
    [line] = [line for line in daemon.log.splitlines() if 'msg="cannot close journal"' in line]
    assert "neither cut nor recorded; the next start trusts them" in line and "bytes 0-" in line
    assert "msg=stopped" in daemon.log and "Traceback" not in daemon.log


def test_a_symlink_to_the_journal_stays_one_through_rotation_and_one_lock_covers_both(tmp_path, daemons):
    (tmp_path / "real").mkdir()
    (tmp_path / "link.jsonl").symlink_to("real/ops.jsonl")
    daemon = start_durable_daemon(daemons, tmp_path, persist_path="link.jsonl", max_file_bytes=300)
    client = daemon.client()
    for i in range(8):
        assert client.post("/observer/event", {"endpoint": f"/r/{i}"})[0] == 200
    assert (tmp_path / "real" / "ops.jsonl.1").exists() and (tmp_path / "link.jsonl").is_symlink()
    other = tmp_path / "other"
    other.mkdir()
    second = daemons(other, config=write_settings(other, {"bind": "127.0.0.1:0", "runtime_dir": "run",
                                                          "persist_path": str(tmp_path / "real" / "ops.jsonl")}))
    assert second.exit_status() == 2 and f"pid={daemon.proc.pid}" in second.log


def test_neither_cut_nor_recorded_stops_every_acknowledgement_until_one_can_be_done(tmp_path, daemons):
    faulty = FaultyDaemon(daemons, tmp_path)
    daemon = faulty.start()
    client = daemon.client()
    faulty.inject("fsync", "ftruncate", "record")
    assert post_op(client, "op-1")[0] == 503
    faulty.inject("ftruncate", "record")  # fsync works again: the bytes are still neither
    assert post_op(client, "op-2")[0] == 503
    def failing_probes():
        samples = scrape(client)["observerd_journal_probes_total"]["samples"]
        return next((value for _, labels, value in samples if labels == {"found": "failing"}), 0)

    seen = failing_probes()
    wait_for(lambda: failing_probes() >= seen + 2, what="two probes to run")
    assert client.get("/observer/ready")[0] == 503, "the probe cleared a failure whose bytes are unsettled"
    errors = [line for line in daemon.log.splitlines() if "neither cut nor recorded" in line]
    assert len(errors) == 1 and "level=ERROR" in errors[0] and "start=0 end=" in errors[0], daemon.log
    faulty.inject()
    wait_for(lambda: client.get("/observer/ready")[0] == 200, what="the probe to cut the bytes")
    assert faulty.journal.read_bytes() == b"" and faulty.records() == []
    assert post_op(client, "op-1")[1]["duplicate"] is False


def test_a_failed_fsync_at_startup_refuses_this_start_and_every_one_until_the_record_goes(tmp_path, daemons):
    faulty = FaultyDaemon(daemons, tmp_path)
    daemon = faulty.start()
    assert post_op(daemon.client(), "op-1")[0] == 200
    daemon.proc.kill()
    daemon.exit_status()
    faulty.inject("fsync")
    daemon = faulty.start(wait=False)
    assert daemon.exit_status() == 2
    assert f'msg="cannot restore from journal" path={faulty.journal}' in daemon.log
    assert "fsync of a journal file failed at startup" in daemon.log and "Traceback" not in daemon.log
    [entry] = faulty.records()
    assert entry[2:4] == [0, faulty.journal.stat().st_size] and entry[6] is True
    # Its fsync would return 0 now without making anything durable: no start trusts it, until
    # the host reboots (tmpfs) or an operator removes the record. Readers still show its ops.
    faulty.inject()
    daemon = faulty.start(wait=False)
    assert daemon.exit_status() == 2
    [refusal] = [line for line in daemon.log.splitlines() if "level=ERROR" in line]
    assert 'msg="journal not trusted; not starting"' in refusal and "until the host reboots" in refusal
    [record] = (tmp_path / "run").glob("*.unsynced")
    assert f"remove {record}" in refusal
    listed = run_cli("ops", "--config", str(faulty.config), "-o", "ndjson")
    assert [json.loads(line)["op_id"] for line in listed.stdout.splitlines()] == ["op-1"]
    record.unlink()
    daemon = faulty.start()
    assert post_op(daemon.client(), "op-1")[1]["duplicate"] is True  # nothing was lost
    assert endpoints_in(faulty.journal) == ["/e"]


def test_restore_fsyncs_each_file_it_trusts_before_reading_it(tmp_path, monkeypatch):
    config = make_config(tmp_path, keep_files=2)
    for name in ("ops.jsonl.1", "ops.jsonl"):
        (tmp_path / name).write_bytes(od.encode_line(op(f"/{name}")))
    store = od.open_store(config)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    try:
        store.restore()
    finally:
        store.close()
    assert synced == [str(tmp_path / "ops.jsonl"), str(tmp_path / "ops.jsonl.1")]


def test_an_eio_closing_the_journal_at_shutdown_is_one_error_line_and_a_failed_exit(tmp_path, daemons):
    faulty = FaultyDaemon(daemons, tmp_path)
    daemon = faulty.start()
    assert post_op(daemon.client(), "op-1")[0] == 200
    faulty.inject("close")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 1
    assert f'msg="cannot close journal" path={faulty.journal}' in daemon.log
    assert "msg=stopped" in daemon.log and "Traceback" not in daemon.log


def test_a_rotation_whose_undo_fails_says_the_folder_is_left_shifted_and_how_to_recover(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ops.jsonl"
    journal = od.Journal(path, max_file_bytes=100, keep_files=2)
    journal.open()
    journal.append_durably(b"x" * 90 + b"\n")
    real_rename = os.rename
    renames = []

    def rename(source, target):
        renames.append((source, target))
        if len(renames) > 1:  # the undo of the first step fails
            raise OSError(errno.EIO, "Input/output error")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(od.PersistError):
        journal.append_durably(b"y" * 20 + b"\n")
    journal.close()
    err = capsys.readouterr().err
    assert 'msg="cannot rotate journal; its folder is left shifted"' in err
    assert f"to_recover=\"mv {tmp_path / 'ops.jsonl.1'} {path}\"" in err
    assert "left as it was" not in err


def test_deleting_the_live_file_reopens_its_path_and_loses_no_later_op(tmp_path, daemons):
    daemon, path, post = start_journaling_in_a_folder(daemons, tmp_path)
    folder = path.parent
    assert post("/before-rm") == 200
    path.unlink()  # an operator's rm
    assert post("/after-rm") == 200
    assert "journal file is gone from its path" in daemon.log
    assert endpoints_in(path) == ["/after-rm"]
    # Another file renamed over the path (a restore from backup): appends follow the path.
    replacement = folder / "from-backup.jsonl"
    replacement.write_bytes(od.encode_line(op("/from-backup")))
    os.replace(replacement, path)
    assert post("/after-replace") == 200
    assert endpoints_in(path) == ["/from-backup", "/after-replace"]
    shutil.rmtree(folder)  # the folder too: made again, as at startup
    assert post("/after-rmtree") == 200
    assert endpoints_in(path) == ["/after-rmtree"]
    daemon.stop()  # SIGKILL: only what reached the file counts
    daemon = start_durable_daemon(daemons, tmp_path, persist_path="data/ops.jsonl")
    assert [o["endpoint"] for o in daemon.client().get("/observer/ops")[1]["ops"]] == ["/after-rmtree"]


def test_rotation_and_a_reopened_path_fsync_the_folder_before_the_next_op(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def renaming(real):
        def rename(source, target, **kw):
            events.append(("rename", str(target)))
            real(source, target, **kw)
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", renaming(real_rename))
    monkeypatch.setattr(os, "replace", renaming(real_replace))
    path = tmp_path / "ops.jsonl"
    line = od.encode_line(op("/f"))
    journal = od.Journal(path, max_file_bytes=2 * len(line), keep_files=2)
    journal.open()
    for _ in range(7):  # three rotations
        journal.append_durably(line)
    assert (tmp_path / "ops.jsonl.2").exists()
    path.unlink()
    journal.append_durably(line)  # reopens the deleted path
    journal.close()
    # Every new directory entry (rename, create) is made durable before an op goes into it.
    folder, unsynced = str(tmp_path), True  # open() created the file
    for kind, target in events:
        if kind == "rename":
            unsynced = True
        elif target == folder:
            unsynced = False
        else:
            assert not unsynced, f"an op was fsynced into {target} before its folder: {events}"
    assert [e for e in events if e[0] == "rename"] and events[-2:] == [("fsync", folder), ("fsync", str(path))]


def test_a_restart_skips_stored_lines_that_would_break_a_read(tmp_path, daemons):
    path = tmp_path / "ops.jsonl"
    bad = [
        b'{"endpoint":"/lone-surrogate","note":"\\ud800"}',  # valid JSON that UTF-8 cannot carry
        b'{"endpoint":"\\udfff"}',
        b'{"endpoint":"/deep","x":' + b"[" * 100000 + b"]" * 100000 + b"}",
        b"\0" * 100000,
        b'{"endpoint":"/bad-utf8","note":"\xff"}',
        b'{"endpoint":"/huge","duration_ms":' + b"9" * 5000 + b"}",
        b'[{"endpoint":"/in-an-array"}]',
    ]
    good = [od.encode_line(op(f"/good/{i}", source="scenario")) for i in range(2)]
    path.write_bytes(good[0] + b"\n".join(bad) + b"\n" + good[1])
    daemon = start_durable_daemon(daemons, tmp_path)
    client = daemon.client()
    assert client.get("/observer/stats")[1]["total"] == 2
    assert [o["endpoint"] for o in client.get("/observer/ops")[1]["ops"]] == ["/good/1", "/good/0"]
    assert daemon.log.count("skipped invalid journal line") == len(bad)
    cli = run_cli("stats", str(path))
    assert cli.returncode == 0 and json.loads(cli.stdout)["total"] == 2


def test_restore_skips_log_lines_no_read_could_serve(tmp_path, capsys):
    log_path = tmp_path / "ops.jsonl"
    log_path.write_bytes(
        b'{"endpoint": "/before"}\n'
        + f'{{"endpoint": "/deep", "extra": {nested(200)}}}\n'.encode()
        + b'{"endpoint": "/lone", "x": "\\ud800"}\n'
        + b'{"endpoint": "/after"}\n')
    server = InProcessServer(make_config(tmp_path, persist_path=str(log_path)))
    try:
        status, body, _ = server.client().get("/observer/ops")
        assert status == 200 and [o["endpoint"] for o in body["ops"]] == ["/after", "/before"]
        assert server.client().get("/observer/stats")[1]["total"] == 2
    finally:
        server.close()
    err = capsys.readouterr().err
    assert err.count("skipped invalid journal line") == 2 and "MAX_JSON_DEPTH=64" in err and "surrogate" in err


def test_an_acked_op_is_always_in_the_file_persist_path_names(tmp_path, daemons):
    daemon, path, post = start_journaling_in_a_folder(daemons, tmp_path)
    folder = path.parent
    assert post("/a") == 200
    os.link(path, tmp_path / "backup.jsonl")  # a hard link keeps the file alive after the rm
    path.unlink()
    assert post("/b") == 200
    assert endpoints_in(path) == ["/b"]
    assert endpoints_in(tmp_path / "backup.jsonl") == ["/a"]
    assert "journal file is gone from its path" in daemon.log
    folder.rename(tmp_path / "data.old")  # the folder moved away, file and all
    assert post("/c") == 200
    assert endpoints_in(path) == ["/c"]
    assert endpoints_in(tmp_path / "data.old" / "ops.jsonl") == ["/b"]
    # logrotate with create: rename, a new file at the path, then (later) SIGHUP.
    path.rename(folder / "ops.jsonl.1")
    path.touch()
    assert post("/d") == 200
    assert endpoints_in(path) == ["/d"]
    assert "journal path names another file" in daemon.log
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reopened journal" in daemon.log, what="the SIGHUP reopen")
    assert post("/e") == 200
    assert endpoints_in(path) == ["/d", "/e"]
    assert endpoints_in(folder / "ops.jsonl.1") == ["/c"]
    daemon.stop()  # SIGKILL: a restart serves what persist_path and its segments hold
    daemon = start_durable_daemon(daemons, tmp_path, persist_path="data/ops.jsonl")
    assert [o["endpoint"] for o in daemon.client().get("/observer/ops")[1]["ops"]] == ["/e", "/d", "/c"]


def test_the_probe_never_follows_what_is_planted_at_its_scratch_name(serve, monkeypatch, tmp_path):
    server = serve()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    scratch = od.probe_scratch_path(server.store.journal.path)
    scratch.symlink_to(victim)
    FsyncSpy(monkeypatch, fail_calls={1})
    client = server.client()
    assert client.post("/observer/event", {"endpoint": "/lost"})[0] == 503
    # The disk works again: the daemon's own probe finds it, through its own new file.
    wait_for(lambda: client.get("/observer/ready")[0] == 200, what="the probe to find the journal writable")
    assert victim.read_bytes() == b"precious\n"
    assert not scratch.exists() and not scratch.is_symlink()


def test_a_probe_file_left_by_a_crash_mid_probe_is_removed_at_start(tmp_path):
    path = tmp_path / "ops.jsonl"
    od.probe_scratch_path(path).write_bytes(b"\n")
    journal = od.Journal(path)
    journal.open()
    journal.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ops.jsonl"]


# -----------------------------------------------------------------------------
# [SECTION] Store
# -----------------------------------------------------------------------------

def test_stats_aggregate_over_the_ring():
    stats = stats_of([op(success=True), op(success=False), op(source="scenario", success=True),
                      op(source="langfuse")])
    assert stats["total"] == 4
    assert stats["successes"] == 2
    assert stats["failures"] == 2
    assert stats["by_source"] == {"mcp": 2, "scenario": 1, "langfuse": 1}


def test_recent_scenarios_are_capped_and_oldest_first():
    ops = [op(f"/s{i}", source="scenario") if i % 2 else op(f"/m{i}") for i in range(30)]
    recent = stats_of(ops, recent=4)["recent_scenario_ops"]
    assert [o["endpoint"] for o in recent] == ["/s23", "/s25", "/s27", "/s29"]
    assert stats_of(ops, recent=0)["recent_scenario_ops"] == []


def test_ring_rolls_over_at_its_cap_and_counters_follow():
    ops = [op(f"/{i}", source="scenario" if i < 3 else "mcp", success=i % 3 == 0) for i in range(10)]
    stats = stats_of(ops, ring_size=4)
    kept = ops[-4:]
    assert stats["total"] == 4
    assert stats["successes"] == sum(o["success"] for o in kept)
    assert stats["by_source"] == {"mcp": 4}
    assert stats["recent_scenario_ops"] == []


def test_counters_match_a_full_recount_under_random_traffic():
    rng = random.Random(7)
    ring = od.Ring(50, 5)
    applied = []
    for i in range(2000):
        o = op(f"/{i}", source=rng.choice(od.SOURCES), success=rng.random() < 0.5)
        ring.apply(od.RingOp(o))
        applied.append(o)
        if i % 97 == 0:
            window = applied[-50:]
            expected = {
                "total": len(window),
                "successes": sum(o["success"] for o in window),
                "failures": sum(not o["success"] for o in window),
                "by_source": dict(Counter(o["source"] for o in window)),
                "recent_scenario_ops": [o for o in window if o["source"] == "scenario"][-5:],
            }
            assert plain(ring.stats()) == expected


def test_persist_failure_is_503_with_retry_after_and_memory_untouched(tmp_path):
    # /dev/full fails every write with ENOSPC: a real fault, no mock.
    config = make_config(tmp_path, persist_path=str(dev_full(tmp_path)))
    server = InProcessServer(config)
    try:
        client = server.client()
        status, body, response = client.post("/observer/event", {"endpoint": "/e"})
        assert status == 503 and "not persisted" in body["error"]
        assert response.getheader("Retry-After") == "1"
        assert client.get("/observer/stats")[1]["total"] == 0
        assert client.get("/observer/health")[0] == 200
    finally:
        server.close()


def test_concurrent_posts_share_fsyncs_and_keep_file_order(serve, monkeypatch):
    server = serve()
    # A slow disk: while one batch is fsynced, the other writers' next ops queue behind it.
    spy = FsyncSpy(monkeypatch, delay=0.02)
    statuses = []

    def post_many(n):
        client = server.client()
        for i in range(10):
            statuses.append(client.post("/observer/event", {"endpoint": f"/t{n}/{i}"})[0])

    in_threads(post_many, 16)
    assert statuses == [200] * 160
    assert spy.calls < 160 / 2, f"{spy.calls} fsyncs for 160 ops: no group commit"
    in_file = [o["endpoint"] for o in replay_forward(server.config.persist_path)]
    assert in_file == [o["endpoint"] for o in server.store.ring.ops]
    assert len(set(in_file)) == 160


def test_a_lone_post_is_one_write_and_one_fsync(serve, monkeypatch):
    server = serve()
    spy = FsyncSpy(monkeypatch)
    assert server.client().post("/observer/event", {"endpoint": "/alone"})[0] == 200
    assert spy.calls == 1


def test_a_failed_group_commit_fails_exactly_its_batch(serve, monkeypatch):
    server = serve()
    # Call 1 (the first writer) is held until B, C and D queue behind it; call 2, their
    # shared batch, fails; call 3 (E) succeeds.
    spy = FsyncSpy(monkeypatch, fail_calls={2}, held=True)
    results = {}

    def post(name):
        results[name] = server.client().post("/observer/event", {"endpoint": f"/{name}"})[0]

    first = threading.Thread(target=post, args=("A",))
    first.start()
    wait_for(lambda: spy.calls == 1, what="A's fsync to start")
    queued = [threading.Thread(target=post, args=(name,)) for name in "BCD"]
    for t in queued:
        t.start()
    wait_for(lambda: len(server.store._queue) == 3, timeout=60, what="B, C and D to queue")
    spy.release()
    for t in [first, *queued]:
        t.join(60)
    post("E")
    assert results == {"A": 200, "B": 503, "C": 503, "D": 503, "E": 200}
    assert spy.calls == 4  # A, the failed batch, the fsync of its rollback, E
    assert [o["endpoint"] for o in server.store.ring.ops] == ["/A", "/E"]
    assert [o["endpoint"] for o in replay_forward(server.config.persist_path)] == ["/A", "/E"]


@pytest.mark.parametrize("shape", list(HOSTILE_SHAPES))
def test_ring_memory_is_proportional_to_encoded_size_for_any_shape(shape):
    import tracemalloc
    hostile = HOSTILE_SHAPES[shape](64 * 1024)
    ring = od.Ring(2000, 10, max_bytes=MIB // 2)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(24):
            ring.apply(od.RingOp(hostile))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The oldest left early: the bound is bytes, not count, and the ring is as full as it can be.
    assert MIB // 2 - ring.ops[0].size < ring.bytes <= MIB // 2 and len(ring.ops) < 24
    # What the ring counts is what it holds, within a few percent.
    assert held <= ring.bytes * 1.05 + 16 * 1024, (held, ring.bytes)
    assert ring.bytes == sum(o.size for o in ring.ops)


def test_the_newest_op_stays_in_the_ring_however_large():
    ring = od.Ring(2000, 10, max_bytes=1000)
    for i in range(3):
        ring.apply(od.RingOp(op(f"/{i}", source="scenario", extra="x" * 5000)))
    assert [o.endpoint for o in ring.ops] == ["/2"]
    assert plain(ring.stats())["total"] == 1
    assert [o["endpoint"] for o in plain(ring.stats())["recent_scenario_ops"]] == ["/2"]


def test_an_op_is_answered_only_after_its_fsync_returns(serve, monkeypatch):
    server = serve()
    held = FsyncSpy(monkeypatch, held=True)
    body = json.dumps({"endpoint": "/durable"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(b"POST /observer/event HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            wait_for(held.entered.is_set, what="the commit to reach fsync")
            # An answer sent before the fsync would already be here; nothing may arrive while it runs.
            assert select.select([sock], [], [], 0.5)[0] == []
        finally:
            held.release()
        assert read_responses(sock, 1)[0] == (200, {"accepted": True, "ring_size": 1})


def test_arrival_counts_keep_32_sources_a_second_and_forget_seconds_past_the_window(monkeypatch):
    clock = [1_000_000.5]
    monkeypatch.setattr(od.time, "time", lambda: clock[0])
    counts = od.ArrivalCounts()
    counts.add({(f"s{n:02d}", True): 1 for n in range(40)})
    counts.add({("s00", False): 2, ("s39", False): 5})
    sources, totals = counts.series(1, 1_000_000)
    assert len(sources) == 33 and sources["s00"] == {"ok": [1], "failed": [2]}
    assert sources["(other)"] == {"ok": [8], "failed": [5]}
    assert totals == {"ok": [40], "failed": [7]}
    clock[0] += 300  # counting the second 300 later leaves a whole 300-second window before it
    counts.add({("mcp", True): 1})
    sources, totals = counts.series(300, 1_000_299)
    assert totals["ok"][0] == 40 and set(sources) > {"s00", "(other)"}
    clock[0] += 1  # one more, and the first second's slot counts the new one
    counts.add({("mcp", True): 1})
    sources, totals = counts.series(300, 1_000_300)
    assert set(sources) == {"mcp"} and sum(totals["ok"]) == 1 and totals["ok"][-1] == 1
    assert set(counts.series(300, 1_000_301)[0]) == {"mcp"}


def test_answers_say_whether_an_op_was_a_duplicate_and_stay_byte_identical_without_op_id(serve):
    server = serve()
    port = server.port
    # Without an op_id, the original answers, byte for byte.
    assert answer_body(raw_exchange(port, raw_post(b"/observer/event", b'{"endpoint":"/plain"}'))) == \
        b'{"accepted": true, "ring_size": 1}'
    assert answer_body(raw_exchange(port, raw_post(b"/observer/events", b'[{"endpoint":"/a"},{"endpoint":"/b"}]'))) == \
        b'{"accepted": 2, "ring_size": 3}'
    client = server.client()
    assert client.post("/observer/event", {"endpoint": "/x", "op_id": "x"})[:2] == \
        (200, {"accepted": True, "duplicate": False, "ring_size": 4})
    assert client.post("/observer/event", {"endpoint": "/x", "op_id": "x"})[:2] == \
        (200, {"accepted": True, "duplicate": True, "ring_size": 4})
    # Two of one op_id in a batch: the second is the duplicate; ops without one are stored.
    status, body, _ = client.post("/observer/events", [
        {"endpoint": "/x", "op_id": "x"}, {"endpoint": "/y", "op_id": "y"}, {"endpoint": "/y", "op_id": "y"},
        {"endpoint": "/no-id"}])
    assert (status, list(body.items())) == (200, [("accepted", 2), ("duplicates", 2), ("ring_size", 6)])
    assert journal_op_ids(server.config.persist_path) == [None, None, None, "x", "y", None]
    assert [o.endpoint for o in server.store.ring.ops][-3:] == ["/x", "/y", "/no-id"]


@pytest.mark.parametrize("client_gives_up", ["after the fsync", "before the fsync"])
def test_a_retry_after_a_dropped_answer_is_stored_once(serve, monkeypatch, client_gives_up):
    server = serve()
    spy = FsyncSpy(monkeypatch, held=client_gives_up == "before the fsync")
    body = json.dumps({"endpoint": "/pay", "op_id": "pay-1", "duration_ms": 7}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw_post(b"/observer/event", body))
        if client_gives_up == "after the fsync":
            wait_for(lambda: b"pay-1" in server.config.persist_path.read_bytes(), what="the op to be durable")
        else:
            wait_for(spy.entered.is_set, what="the commit to reach fsync")
    # The connection is closed without its answer having been read; the commit goes on.
    spy.release()
    client = server.client()
    assert client.post("/observer/event", body)[:2] == (200, {"accepted": True, "duplicate": True, "ring_size": 1})
    assert journal_op_ids(server.config.persist_path) == ["pay-1"]
    assert [o.endpoint for o in server.store.ring.ops] == ["/pay"]


@pytest.mark.parametrize("persist", ["durable", "ephemeral"])
def test_eight_threads_posting_the_same_500_op_ids_store_each_once(serve, persist):
    server = serve(**({"persist_path": ""} if persist == "ephemeral" else {}))
    answers: list[tuple[int, str, object]] = []

    def post_all(n):
        client = server.client()
        for op_id in (f"op-{i}" for i in range(500)):  # in step: every id is contended
            status, body, _ = client.post("/observer/event", {"endpoint": f"/e/{op_id}", "op_id": op_id})
            answers.append((status, op_id, body and body.get("duplicate")))

    in_threads(post_all, 8, timeout=600)
    assert len(answers) == 8 * 500 and all(status == 200 for status, _, _ in answers)
    stored = Counter(op_id for _, op_id, duplicate in answers if duplicate is False)
    assert stored == Counter({f"op-{i}": 1 for i in range(500)})
    assert sorted(o.endpoint for o in server.store.ring.ops) == sorted(f"/e/op-{i}" for i in range(500))
    if persist == "durable":
        assert sorted(journal_op_ids(server.config.persist_path)) == sorted(f"op-{i}" for i in range(500))
    families = scrape(server.client())
    assert sample(families, "observerd_duplicates_total") == 7 * 500
    assert sample(families, "observerd_events_total", source="mcp", success="false") == 500


def test_overlapping_batches_count_exactly(serve):
    server = serve()
    client = server.client()
    batch = lambda ids: [{"endpoint": f"/b/{i}", "op_id": f"b-{i}"} for i in ids]
    assert client.post("/observer/events", batch(range(0, 100)))[1] == {"accepted": 100, "duplicates": 0, "ring_size": 100}
    assert client.post("/observer/events", batch(range(50, 150)))[1] == {"accepted": 50, "duplicates": 50, "ring_size": 150}
    ndjson = b"".join(json.dumps(o).encode() + b"\n" for o in batch([149, 150, 150]))
    status, body, _ = client.post("/observer/events", ndjson, headers={"Content-Type": "application/x-ndjson"})
    assert body == {"accepted": 1, "duplicates": 2, "ring_size": 151}
    # Concurrent shippers re-sending overlapping windows of the same stream.
    totals = []

    def ship(n):
        own = server.client()
        for k in range(5):
            start = 151 + (n * 5 + k) * 20
            status, body, _ = own.post("/observer/events", batch(range(start, start + 60)))
            assert status == 200
            totals.append((body["accepted"], body["duplicates"]))

    in_threads(ship, 6, timeout=300)
    distinct = set(range(151, 151 + (5 * 5 + 4) * 20 + 60))
    assert sum(accepted for accepted, _ in totals) == len(distinct)
    assert sum(duplicates for _, duplicates in totals) == 30 * 60 - len(distinct)
    in_file = journal_op_ids(server.config.persist_path)
    assert len(in_file) == len(set(in_file)) == 151 + len(distinct)
    assert len(server.store.ring.ops) == len(in_file)


@pytest.mark.parametrize("outcome", ["stored", "failed"])
def test_a_duplicate_of_an_op_in_flight_waits_for_its_commit_and_is_never_lost(serve, monkeypatch, outcome):
    server = serve()
    # The first commit is held in its fsync, which then succeeds or fails.
    spy = FsyncSpy(monkeypatch, held=True, fail_calls={1} if outcome == "failed" else ())
    body = {"endpoint": "/charge", "op_id": "charge-7"}
    first = {}
    thread = threading.Thread(target=lambda: first.update(answer=server.client().post("/observer/event", body)[:2]))
    thread.start()
    wait_for(spy.entered.is_set, what="the first commit to reach fsync")
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(raw_post(b"/observer/event", json.dumps(body).encode()))
        wait_for(lambda: len(server.store._queue) == 1, what="the duplicate to queue")
        # Not answered while the op it duplicates is not yet durable.
        assert select.select([sock], [], [], 0.3)[0] == []
        spy.release()
        thread.join(60)
        second = read_responses(sock, 1)[0]
    if outcome == "stored":
        assert first["answer"] == (200, {"accepted": True, "duplicate": False, "ring_size": 1})
        assert second == (200, {"accepted": True, "duplicate": True, "ring_size": 1})
    else:
        assert first["answer"][0] == 503
        assert second == (200, {"accepted": True, "duplicate": False, "ring_size": 1})
    assert journal_op_ids(server.config.persist_path) == ["charge-7"]
    assert [o.endpoint for o in server.store.ring.ops] == ["/charge"]
    # And the first client's retry, whatever it was told, is now a duplicate.
    assert server.client().post("/observer/event", body)[1]["duplicate"] is True


def test_a_failed_commit_forgets_its_op_ids_so_the_retry_stores_them_once(tmp_path, daemons):
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl"})
    daemon = daemons(tmp_path, config=config, preexec_fn=limit_file_size(1000)).wait_listening()
    client = daemon.client()
    n, status = 0, 200
    while status == 200:
        n += 1
        status, body, _ = client.post("/observer/event", {"endpoint": "/fill", "op_id": f"fill-{n}", "pad": "x" * 40})
    assert status == 503, body
    batch = [{"endpoint": "/fill", "op_id": f"fill-{n}", "pad": "x" * 40}, {"endpoint": "/g", "op_id": "g"},
             {"endpoint": "/g", "op_id": "g"}]
    assert client.post("/observer/events", batch)[0] == 503
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    assert client.post("/observer/events", batch)[1] == {"accepted": 2, "duplicates": 1, "ring_size": n + 1}
    assert client.post("/observer/event", batch[0])[1] == {"accepted": True, "duplicate": True, "ring_size": n + 1}
    assert journal_op_ids(tmp_path / "ops.jsonl") == [f"fill-{i}" for i in range(1, n + 1)] + ["g"]
    assert client.get("/observer/stats")[1]["total"] == n + 1


def test_after_sigkill_and_restart_a_retry_is_a_duplicate(tmp_path, daemons):
    # Small files: the ids are spread over the live file and rotated segments.
    settings = {"max_file_bytes": 700, "keep_files": 50}
    daemon = start_durable_daemon(daemons, tmp_path, **settings)
    client = daemon.client()
    ops = [{"endpoint": f"/k/{i}", "op_id": op_id, "timestamp": "2026-11-24T19:56:56Z"}
           for i, op_id in enumerate([*ODD_OP_IDS, *(f"k-{i}" for i in range(20))])]
    # A nested "op_id" is not the op's: this op has none, and must be stored every time.
    ops.append({"endpoint": "/nested", "extra": {"op_id": "k-1"}})
    for i, o in enumerate(ops[:-1]):
        assert client.post("/observer/event", o)[1] == {"accepted": True, "duplicate": False, "ring_size": i + 1}
    assert client.post("/observer/event", ops[-1])[0] == 200
    stats = client.get("/observer/stats")[1]
    daemon.proc.kill()
    daemon.exit_status()
    assert (tmp_path / "ops.jsonl.2").exists()

    daemon = start_durable_daemon(daemons, tmp_path, **settings)
    client = daemon.client()
    assert f"op_ids={len(ops) - 1} " in daemon.log
    assert client.get("/observer/stats")[1] == stats
    for o in ops[:-1]:
        assert client.post("/observer/event", o)[1]["duplicate"] is True, o["op_id"]
    assert client.post("/observer/event", ops[-1])[1] == {"accepted": True, "ring_size": len(ops) + 1}
    # Content is compared as the journal held it: restamped is the same op, changed is not.
    assert client.post("/observer/event", {**ops[2], "timestamp": "2027-01-01T00:00:00Z"})[1]["duplicate"] is True
    assert client.post("/observer/event", {**ops[2], "success": True})[1]["duplicate"] is True
    # Logged before the answer is sent; read from the daemon's stderr by another thread.
    warned = lambda: [line for line in daemon.log.splitlines() if "level=WARN" in line and "op_id" in line]
    warnings = wait_for(warned, what="the WARN")
    assert len(warnings) == 1 and warnings[0].endswith(f"op_id={od._logfmt_value(ops[2]['op_id'])}"), daemon.log
    assert journal_op_ids(tmp_path / "ops.jsonl", 50) == [o.get("op_id") for o in ops] + [None]


def test_an_op_id_older_than_the_window_is_stored_again_also_after_a_restart(serve, tmp_path):
    path = tmp_path / "window.jsonl"
    server = serve(persist_path=str(path), dedupe_window=3)
    client = server.client()
    post = lambda op_id, endpoint="/w": client.post("/observer/event", {"endpoint": endpoint, "op_id": op_id})[1]["duplicate"]
    assert [post("X"), post("a"), post("b"), post("X")] == [False, False, False, True]
    assert client.post("/observer/event", {"endpoint": "/no-id"})[0] == 200  # takes a slot too
    assert post("X") is False  # the last three stored: a, b, /no-id
    assert journal_op_ids(path) == ["X", "a", "b", None, "X"]
    server.close()
    restarted = serve(persist_path=str(path), dedupe_window=3)
    client = restarted.client()
    # The window rebuilt from the journal: b, /no-id, X.
    assert [post("X"), post("b"), post("a")] == [True, True, False]
    assert journal_op_ids(path) == ["X", "a", "b", None, "X", "a"]


def test_a_restart_remembers_no_op_id_of_a_line_that_is_not_one_observerd_wrote(serve, tmp_path):
    path = tmp_path / "foreign.jsonl"
    path.write_bytes(od.encode_line(od.validate_op({"op_id": "kept", "endpoint": "/k"}))
                     + b'{"op_id":"broken","endpoint":\n'  # torn or foreign: no op in it
                     + b'{"op_id":"no-endpoint"}\n'
                     + b'{"op_id":"twice","op_id":"twice-2","endpoint":"/t"}\n'
                     + b'{"op_id":"F-\xff\xfe","endpoint":"/f"}\n')
    client = serve(persist_path=str(path)).client()
    post = lambda op_id: client.post("/observer/event", {"endpoint": "/w", "op_id": op_id})[1]["duplicate"]
    assert post("kept") is True
    # U+FFFD is what a lenient decoder makes of the invalid bytes; a client may send it.
    assert [post(op_id) for op_id in ("broken", "no-endpoint", "twice", "twice-2", "F-\ufffd\ufffd")] \
        == [False] * 5


@pytest.mark.parametrize("op_id", ["", "x" * 129, "😀" * 129, 5, None, True, ["a"], {"a": 1}, "line\nbreak",
                                   "tab\there", "\u2028", "\x7f", "\ud800"])
def test_an_op_id_that_is_not_1_to_128_printable_characters_is_400_naming_it(serve, op_id):
    server = serve()
    client = server.client()
    status, body, _ = client.post("/observer/event", {"endpoint": "/e", "op_id": op_id})
    assert status == 400 and body["error"].startswith("invalid op: op_id must be"), body
    status, body, _ = client.post("/observer/events", [{"endpoint": "/e", "op_id": "ok"}, {"endpoint": "/e", "op_id": op_id}])
    assert status == 400 and body["error"].startswith("invalid batch: op 1 is invalid: op_id must be"), body
    assert server.config.persist_path.read_bytes() == b""
    assert client.post("/observer/event", {"endpoint": "/e", "op_id": "ok"})[1]["duplicate"] is False


def test_a_duplicate_with_different_content_logs_one_warn_and_the_first_version_wins(serve, capsys):
    server = serve()
    client = server.client()
    first = {"endpoint": "/refund", "op_id": "r-1", "duration_ms": 5, "trace": {"id": "t"}}
    client.post("/observer/event", first)  # the server stamps it
    capsys.readouterr()
    # The same op again, unstamped or restamped by the client: the same content.
    assert client.post("/observer/event", first)[1]["duplicate"] is True
    assert client.post("/observer/event", {**first, "timestamp": "2026-01-01T00:00:00Z"})[1]["duplicate"] is True
    assert client.post("/observer/event", {**first, "source": "mcp", "success": False})[1]["duplicate"] is True
    assert "level=WARN" not in capsys.readouterr().err
    assert client.post("/observer/event", {**first, "duration_ms": 6})[1]["duplicate"] is True
    # A batch of differing duplicates: one line for their op_id, however many they are.
    batch = [{**first, "op_id": "r-2"}, *({**first, "op_id": "r-2", "error": f"e{i}"} for i in range(500))]
    assert client.post("/observer/events", batch)[1] == {"accepted": 1, "duplicates": 500, "ring_size": 2}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "level=WARN" in line]
    assert len(warnings) == 2, warnings
    assert warnings[0].endswith("duplicates=1 op_id=r-1") and warnings[1].endswith("duplicates=500 op_id=r-2")
    ops = client.get("/observer/ops")[1]["ops"]
    assert [(o["op_id"], o["duration_ms"], "error" in o) for o in ops] == [("r-2", 5, False), ("r-1", 5, False)]


def test_duplicates_are_counted_apart_from_events_from_0(serve):
    server = serve()
    client = server.client()
    assert sample(scrape(client), "observerd_duplicates_total") == 0
    client.post("/observer/event", {"endpoint": "/m", "op_id": "m", "success": True})
    client.post("/observer/event", {"endpoint": "/m", "op_id": "m", "success": True})
    client.post("/observer/events", [{"endpoint": "/m", "op_id": "m", "success": True}] * 3)
    families = scrape(client)
    assert sample(families, "observerd_duplicates_total") == 4
    assert sample(families, "observerd_events_total", source="mcp", success="true") == 1
    assert client.get("/observer/stats")[1]["total"] == 1


def test_a_dedupe_window_of_0_stores_every_op(serve):
    server = serve(dedupe_window=0)
    client = server.client()
    for ring_size in (1, 2):
        assert client.post("/observer/event", {"endpoint": "/e", "op_id": "same"})[1] == \
            {"accepted": True, "duplicate": False, "ring_size": ring_size}
    assert journal_op_ids(server.config.persist_path) == ["same", "same"]


def test_the_op_id_window_holds_its_size_in_memory_whatever_the_ids():
    window = od.OpIdWindow(10_000)
    tracemalloc.start()
    try:
        for turn in range(3):  # filled, then turned over twice, 100 ops a commit
            for start in range(0, 10_000, 100):
                window.remember([(f"{turn}-{i}-" + "😀" * 120, hash((turn, i))) for i in range(start, start + 100)])
            window.remember([None] * 5_000)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(window) == 5_000 and window.digest(f"2-{9_999}-" + "😀" * 120) is not None
    assert window.digest(f"2-{4_999}-" + "😀" * 120) is None
    # The README's bound for the longest ids: ~710 bytes each, 8 a slot.
    assert held < 5_000 * 720 + 10_000 * 8 + 64 * 1024, held


# -----------------------------------------------------------------------------
# [SECTION] History
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_history_keeps_exactly_what_a_plain_filter_over_a_forward_replay_keeps(tmp_path, monkeypatch, seed):
    """Every spelling another writer may use, escapes, decoys, corrupt lines, three segments,
    blocks smaller than a line: the byte needles and raw checks never drop an op the filters
    keep, nor keep another."""
    monkeypatch.setattr(od, "BLOCK_BYTES", [64 * 1024, 700, 97][seed % 3])
    rng = random.Random(seed)
    now = time.time()
    path = tmp_path / "ops.jsonl"
    expected_order = []
    for segment in (path.with_name("ops.jsonl.2"), path.with_name("ops.jsonl.1"), path):
        lines = []
        for _ in range(150):
            o = random_history_op(rng, len(expected_order), now)
            if seed % 2:  # all ASCII, as most journals are: greps then run over whole chunks
                o = od.validate_op(json.loads(json.dumps(o, ensure_ascii=False).replace("é", "e")))
            expected_order.append(o)
            lines.append(spelled(o, rng.randrange(6)))
            if rng.random() < 0.05:
                lines.append(rng.choice([b"not json\n", b'{"endpoint":"/mcp/search","source":"mcp",\n',
                                         b"\n", b'{"endpoint":""}\n']))
        segment.write_bytes(b"".join(lines))
    assert sum(replay_forward(p) != [] for p in tmp_path.iterdir()) == 3
    stored = replay_forward(path.with_name("ops.jsonl.2")) + replay_forward(path.with_name("ops.jsonl.1")) \
        + replay_forward(path)
    assert seqs(stored) == seqs(expected_order)
    for _ in range(40):
        given = random_filters(rng)
        for bound in ("since", "until"):  # an op's own stamp, or a second next to one
            if rng.random() < 0.3:
                stamp = rng.choice(stored)["timestamp"]
                given[bound] = stamp if rng.random() < 0.5 else od.parse_rfc3339(stamp).astimezone(od.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S') + rng.choice(["Z", ".999999Z"])
        with od.JournalFiles(path, 2) as files:
            page = od.read_history(files, od.OpFilter(given, now), 10 ** 9)
        assert [plain(o) for o in page.ops] == [o for o in reversed(stored) if brute_force_keeps(o, given)], given
        assert page.cursor is None and not page.truncated


def test_history_raw_checks_never_hide_what_decoding_would_find(tmp_path):
    path = tmp_path / "ops.jsonl"
    lines = [od.encode_line(op("/a", input_summary="plain", seq=1)),
             od.encode_line(op("/b", input_summary="q=timeout", seq=2)),
             od.encode_line(op("/c", input_summary="q=timeout", seq=3)),
             # Left to its default, the timestamp is the reading's "now": within any since.
             b'{"endpoint":"/d","source":"mcp","timestamp":"","success":true,"seq":4}\n']
    path.write_bytes(b"".join(lines))
    now = time.time()

    def kept(given):
        with od.JournalFiles(path, 0) as files:
            return seqs(plain(od.read_history(files, od.OpFilter(given, now), 100).ops))

    # Searched over the whole chunk, this pattern's first match runs from /a's line into /c's.
    assert kept({"regex": "(?s)plain.*q=timeout|q=timeout"}) == [3, 2]
    assert kept({"since": "1m", "success": "true"}) == [4]


def test_history_with_since_reads_on_past_out_of_order_ops_and_stops_after_a_run_of_older_ones(
        tmp_path, monkeypatch):
    monkeypatch.setattr(od, "BLOCK_BYTES", 512)
    monkeypatch.setattr(od, "SINCE_RUN_BYTES", 8 * 1024)
    now = time.time()
    path = tmp_path / "ops.jsonl"
    old = [history_op(i, 7200) for i in range(400)]  # about 60 KiB from two hours ago
    backfill = [history_op(1000 + i, 5400) for i in range(20)]  # late, from 90 minutes ago
    recent = [history_op(2000, 60), history_op(2001, 1800, flag="late but recent")]
    lines = old + recent[:1] + backfill + recent[1:]
    path.write_bytes(b"".join(map(od.encode_line, lines)))
    with od.JournalFiles(path, 0) as files:
        page = od.read_history(files, od.OpFilter({"since": "1h"}, now), 10 ** 9)
    # The recent op behind the backfill is found; the old ones are read only a run's worth.
    assert seqs(plain(page.ops)) == [2001, 2000]
    assert page.cursor is None
    assert page.scanned_bytes < len(od.encode_line(old[0])) * 100
    # A backfill longer than the run hides what is behind it: the documented price.
    path.write_bytes(b"".join(map(od.encode_line, old + recent[:1] + old + recent[1:])))
    with od.JournalFiles(path, 0) as files:
        assert seqs(plain(od.read_history(files, od.OpFilter({"since": "1h"}, now), 10 ** 9).ops)) == [2001]
    # A filter few recent ops pass still reads the whole window: it knows where it is in time
    # from a line of each block, not only from the ops it keeps.
    rare = history_op(3000, 3000, endpoint="/rare")
    busy = [history_op(4000 + i, 2000 - i) for i in range(200)]  # about 30 KiB after it
    path.write_bytes(b"".join(map(od.encode_line, old + [rare] + busy)))
    with od.JournalFiles(path, 0) as files:
        page = od.read_history(files, od.OpFilter({"since": "1h", "endpoint": "/rare"}, now), 10 ** 9)
    assert seqs(plain(page.ops)) == [3000]


def test_history_pages_through_a_journal_appended_to_and_rotated_meanwhile(serve):
    server = serve(max_file_bytes=3000, keep_files=1000)
    client = server.client()
    post_seqs(client, range(200))
    seen, cursor, pages, appended = [], None, 0, 200
    segments_before = len(list(server.config.persist_path.parent.glob("ops.jsonl.*")))
    while True:
        body = history_page(client, "limit=7" + (f"&cursor={cursor}" if cursor else ""))
        assert body["count"] == len(body["ops"]) and not body["truncated"]
        seen.extend(seqs(body["ops"]))
        cursor, pages = body["cursor"], pages + 1
        if cursor is None:
            break
        post_seqs(client, range(appended, appended + 5))  # with rotations now and then
        appended += 5
    assert seen == list(range(199, -1, -1)), "every op exactly once, newest first"
    assert pages == 29
    assert len(list(server.config.persist_path.parent.glob("ops.jsonl.*"))) > segments_before + 3
    assert seqs(history_page(client, "limit=5")["ops"]) == list(range(appended - 1, appended - 6, -1))


def test_grep_over_http_is_plain_text_so_no_pattern_can_stall_the_daemon(serve):
    client = serve().client()
    # As a regex, (a+)+b backtracks 2^n times over n a's, holding the GIL: at 40 ingest and
    # every other request would wait for hours. As text, it finds only itself.
    client.post("/observer/events", [{"endpoint": "/r", "error": "a" * 20}, {"endpoint": "/t", "error": "x (a+)+b y"}])
    for route in ("/observer/history", "/observer/ops"):
        found = client.get(f"{route}?grep=(a%2B)%2Bb")[1]["ops"]
        assert [o["endpoint"] for o in found] == ["/t"], route


def test_history_filters_and_reports_its_work(serve):
    server = serve()
    client = server.client()
    post_seqs(client, range(10))
    post_seqs(client, range(10, 15), success=False, error="upstream 502", trace="t-1")
    body = history_page(client, "success=false&grep=m%2050&field=trace=t-1&since=1h&endpoint=/h/*&limit=3")
    assert seqs(body["ops"]) == [14, 13, 12] and body["count"] == 3
    assert body["scanned_bytes"] == server.config.persist_path.stat().st_size
    assert body["cursor"] is not None and body["truncated"] is False
    rest = history_page(client, f"success=false&grep=m%2050&field=trace=t-1&since=1h&endpoint=/h/*&limit=3"
                                f"&cursor={body['cursor']}")
    assert seqs(rest["ops"]) == [11, 10] and rest["cursor"] is None
    full = history_page(client)
    assert seqs(full["ops"]) == list(range(14, -1, -1)) and full["cursor"] is None
    assert full["ops"] == plain(server.client().get("/observer/ops")[1]["ops"])
    assert full["skipped_lines"] == 0
    with open(server.config.persist_path, "ab") as journal:  # another writer's broken line
        journal.write(b'{"endpoint": "/torn", \n')
    assert history_page(client)["skipped_lines"] == 1


def test_history_is_bounded_by_max_scan_bytes_and_goes_on_where_it_stopped(serve):
    server = serve(max_scan_bytes=1000, max_file_bytes=5000, keep_files=100)
    client = server.client()
    post_seqs(client, range(300), success=True)
    post_seqs(client, [300], success=False)
    body = history_page(client, "success=false")
    assert seqs(body["ops"]) == [300]
    seen, truncated = [], 0
    body = history_page(client, "success=true&limit=1000")
    while True:
        assert body["scanned_bytes"] < 1000 + 2 * od.BLOCK_BYTES
        seen.extend(seqs(body["ops"]))
        truncated += body["truncated"]
        if body["cursor"] is None:
            assert not body["truncated"]
            break
        body = history_page(client, f"success=true&limit=1000&cursor={body['cursor']}")
    segments = len(list(server.config.persist_path.parent.glob("ops.jsonl*")))
    assert seen == list(range(299, -1, -1)) and truncated == segments - 1 > 4


def test_a_cursor_into_a_rotated_away_segment_is_410(serve):
    server = serve(max_file_bytes=600, keep_files=1)
    client = server.client()
    post_seqs(client, range(6))
    cursor = history_page(client, "limit=1")["cursor"]
    assert history_page(client, f"cursor={cursor}")["ops"]  # still there
    post_seqs(client, range(6, 30))  # the file the cursor names is deleted beyond keep_files
    body = history_page(client, f"cursor={cursor}", expect=410)
    assert "rotated away" in body["error"]
    # A cursor whose file now holds other bytes (its inode reused) is as gone.
    current = history_page(client, "limit=1")["cursor"]
    ino, offset, crc = current.split(".")
    assert history_page(client, f"cursor={ino}.{offset}.{int(crc, 16) ^ 1:08x}", expect=410)
    assert history_page(client, f"cursor={ino}.{10 ** 15}.{crc}", expect=410)


@pytest.mark.parametrize("query, param", [
    ("nope=1", "nope"), ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=x", "limit"),
    ("since=the%20day%20after", "since"), ("until=1y", "until"), ("source=x", "source"), ("success=yes", "success"),
    ("field=x", "field"), ("cursor=abc", "cursor"), ("cursor=1.0.00000000", "cursor"),
    ("cursor=1.2.3", "cursor"), ("since=1h&since=2h", "since"), ("grep=a&grep=b", "grep"),
    ("failed=1", "failed"), ("success=true&failed", "success"), ("regex=a", "regex"),
])
def test_bad_history_params_are_400_naming_the_param(serve, query, param):
    body = history_page(serve().client(), query, expect=400)
    assert body["error"].startswith(f"invalid query: {param} "), body


def test_history_without_a_journal_is_409(serve):
    body = history_page(serve(persist_path="").client(), expect=409)
    assert body == {"error": "no journal: observerd runs ephemeral"}


def test_history_never_holds_up_ingest_while_it_reads(serve, monkeypatch):
    server = serve()
    client = server.client()
    post_seqs(client, range(5))
    reading = threading.Event()
    release = hold_history_reads(monkeypatch, reading.set)
    answers = []
    reader = threading.Thread(target=lambda: answers.append(history_page(server.client())))
    reader.start()
    assert reading.wait(30)
    post_seqs(client, range(5, 8))  # answered while the history read is held mid-file
    assert server.store.stats()["total"] == 8
    release.set()
    reader.join(60)
    assert seqs(answers[0]["ops"]) == [4, 3, 2, 1, 0]


def test_history_holds_a_file_or_two_open_however_many_segments(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path, max_file_bytes=300, keep_files=1000)
    client = daemon.client()
    post_seqs(client, range(150))
    assert len(list(tmp_path.glob("ops.jsonl.*"))) > 50
    pid = daemon.proc.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (max(open_fds(pid)) + 6, hard))
    seen, cursor = [], None
    while True:
        body = history_page(client, "limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        seen.extend(seqs(body["ops"]))
        if (cursor := body["cursor"]) is None:
            break
    assert seen == list(range(149, -1, -1))
    post_seqs(client, range(150, 160))  # rotations still find the descriptors they need
    # The command line reads them all under a low limit too.
    result = subprocess.run([sys.executable, str(DAEMON), "ops", str(tmp_path / "ops.jsonl"), "-n", "1000"],
                            capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (16, hard)))
    assert result.returncode == 0, result.stderr
    assert seqs(ndjson(result.stdout)) == list(range(160))


def test_at_most_two_history_reads_run_at_once(serve, monkeypatch):
    server = serve()
    post_seqs(server.client(), range(5))
    reading = threading.Semaphore(0)
    release = hold_history_reads(monkeypatch, reading.release)
    answers = []
    readers = [threading.Thread(target=lambda: answers.append(history_page(server.client()))) for _ in range(2)]
    for reader in readers:
        reader.start()
    for _ in readers:
        assert reading.acquire(timeout=30)
    # Both turns are taken: a third call would wait for one (each holds up to max_scan_bytes).
    assert not server.server.history_reads.acquire(blocking=False)
    release.set()
    for reader in readers:
        reader.join(60)
    assert [seqs(answer["ops"]) for answer in answers] == [[4, 3, 2, 1, 0]] * 2
    assert server.server.history_reads.acquire(blocking=False)
    server.server.history_reads.release()


@pytest.mark.parametrize("text, zone, expected", [
    ("2026-12-06T04:00:00Z", None, "2026-12-06T04:00:00Z"),
    ("2026-12-06t04:00:00.5+01:00", None, "2026-12-06T03:00:00.5Z"),
    ("2026-12-06 04:00", od.timezone.utc, "2026-12-06T04:00:00Z"),
    ("2026-12-06 04:00", od.timezone(od.timedelta(hours=3)), "2026-12-06T01:00:00Z"),
    ("2026-12-06 04:00:30 UTC", od.timezone(od.timedelta(hours=3)), "2026-12-06T04:00:30Z"),
    ("2026-12-06", od.timezone.utc, "2026-12-06T00:00:00Z"),
    ("04:00", od.timezone.utc, "2026-12-06T04:00:00Z"),
    ("now", None, "2026-12-06T05:30:00Z"),
    ("today", od.timezone.utc, "2026-12-06T00:00:00Z"),
    ("today", od.timezone(od.timedelta(hours=-8)), "2026-12-05T08:00:00Z"),  # still the 5th there
    ("yesterday", od.timezone.utc, "2026-12-05T00:00:00Z"),
    ("tomorrow", od.timezone.utc, "2026-12-07T00:00:00Z"),
    ("90s", None, "2026-12-06T05:28:30Z"),
    ("15m", None, "2026-12-06T05:15:00Z"),
    ("10 min ago", None, "2026-12-06T05:20:00Z"),
    ("1h 30min ago", None, "2026-12-06T04:00:00Z"),
    ("2 hours ago", None, "2026-12-06T03:30:00Z"),
    ("-7d", None, "2026-11-29T05:30:00Z"),
    ("+1h", None, "2026-12-06T06:30:00Z"),
])
def test_times_read_as_journalctl_reads_them(text, zone, expected):
    seconds = od.parse_time_bound(text, "since", NOW_FOR_TIMES, zone=zone)
    assert seconds == od.parse_rfc3339(expected).timestamp()


@pytest.mark.parametrize("text", ["last week", "1y", "٣m", "2026-13-01", "2026-12-06 25:00", "10 lightyears", "ago",
                                  "2026-12-06 04:00 PST", "", "-2026-12-06", "2026-12-06 ago", "+1h ago"])
def test_a_time_journalctl_would_not_take_names_the_bound(text):
    with pytest.raises(od.InvalidOp) as raised:
        od.parse_time_bound(text, "until", NOW_FOR_TIMES)
    assert raised.value.field == "until" and "must be a time like" in raised.value.reason


def test_calendar_times_are_local_on_the_command_line_and_utc_over_http(serve, tmp_path):
    server = serve()
    client = server.client()
    # Hourly ops on 2026-12-06, 00:00Z to 07:00Z.
    client.post("/observer/events", [{"endpoint": f"/h/{h}", "seq": h, "timestamp": f"2026-12-06T0{h}:00:00Z"}
                                     for h in range(8)])
    journal = str(server.config.persist_path)
    three_east = {"TZ": "XXX-3"}  # POSIX: three hours east of UTC, needing no tz database
    window = ["--since", "2026-12-06 04:00", "--until", "2026-12-06 05:00", "-o", "ndjson"]
    local = run_ops(journal, *window, env=three_east)
    assert local.returncode == 0, local.stderr
    assert seqs(ndjson(local.stdout)) == [1, 2]  # 04:00 to 05:00 at UTC+3
    # The command line sends the daemon absolute times, read as it reads them.
    remote = run_ops("--url", f"http://127.0.0.1:{server.port}", *window, env=three_east)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
    # The daemon reads the words it is sent in UTC.
    over_http = history_page(client, "since=2026-12-06%2004:00&until=2026-12-06%2005:00")
    assert seqs(over_http["ops"]) == [5, 4]
    assert seqs(history_page(client, "since=2026-12-06&until=2026-12-06T02:00:00%2B01:00")["ops"]) == [1, 0]


def test_relative_times_and_day_words_on_the_command_line(tmp_path):
    now = time.time()
    path = tmp_path / "ops.jsonl"
    ages = {0: 3 * 86400, 1: 26 * 3600, 2: 3600, 3: 300, 4: 30, 5: -3600}  # seq: seconds before now
    path.write_bytes(b"".join(od.encode_line(history_op(i, age, now)) for i, age in ages.items()))

    def kept(*args, env=None):
        result = run_ops(str(path), "-o", "ndjson", *args, env=env)
        assert result.returncode == 0, result.stderr
        return seqs(ndjson(result.stdout))

    assert kept("--since", "10 min ago") == [3, 4, 5]
    assert kept("--since", "2 hours ago", "--until", "now") == [2, 3, 4]
    assert kept("--since", "1h 1min") == [2, 3, 4, 5]
    assert kept("--until=-2d") == [0]
    midnight = datetime.fromtimestamp(now, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    utc = {"TZ": "UTC"}
    assert kept("--since", "today", env=utc) == [i for i, age in ages.items() if now - age >= midnight.timestamp()]
    assert kept("--since", "yesterday", "--until", "today", env=utc) == [
        i for i, age in ages.items() if midnight.timestamp() - 86400 <= now - age <= midnight.timestamp()]


@pytest.mark.parametrize("given", FILTERS_SPOKEN_ALIKE)
def test_a_filter_means_the_same_as_a_flag_as_a_query_parameter_and_through_url(serve, given):
    server = serve()
    client = server.client()
    now = time.time()
    ops = [history_op(i, 4 * 3600 - i * 300, now, endpoint=["/mcp/a,b", "/mcp/a", "/scenario/x"][i % 3],
                      source=od.SOURCES[i % 4], success=i % 3 != 1, trace=f"t{i % 2}",
                      error=["x (a+)+b y", "aab", "HTTP 502"][i % 3]) for i in range(40)]
    assert client.post("/observer/events", ops)[0] == 200
    query = urlencode([(name, text) for name, value in given.items()
                       for text in (value if isinstance(value, list) else [value])] + [("limit", "1000")])
    over_http = history_page(client, query)["ops"]
    assert bool(over_http) == (given != {"endpoint": ["/nothing"]})  # each keeps some, but the last
    from_files = run_ops(str(server.config.persist_path), *filter_cli_args(given), "-n", "all", "-r", "-o", "ndjson")
    through_url = run_ops("--url", f"http://127.0.0.1:{server.port}", *filter_cli_args(given), "-n", "all", "-r",
                          "-o", "ndjson")
    assert from_files.returncode == through_url.returncode == 0, from_files.stderr + through_url.stderr
    assert ndjson(from_files.stdout) == ndjson(through_url.stdout) == over_http
    ring = client.get(f"/observer/ops?{query.replace('limit=1000', 'limit=100')}")[1]["ops"]
    assert ring == over_http


def test_success_false_stays_an_alias_of_failed_over_http(serve):
    client = serve().client()
    post_seqs(client, range(4), success=True)
    post_seqs(client, range(4, 6), success=False)
    for route in ("/observer/history", "/observer/ops"):
        assert [seqs(client.get(f"{route}?{q}")[1]["ops"]) for q in ("success=false", "failed=true", "failed")] \
            == [[5, 4]] * 3, route
        assert seqs(client.get(f"{route}?success=true&ok")[1]["ops"]) == [3, 2, 1, 0]


def test_count_by_answers_what_failed_lately_and_where(serve):
    server = serve()
    client = server.client()
    now = time.time()
    old = [history_op(i, 3600, now, endpoint="/old", success=False, error="gone") for i in range(3)]
    recent = ([history_op(10 + i, 60 + i, now, endpoint="/mcp/search", success=i >= 3, duration_ms=10 * (i + 1),
                          error=None if i >= 3 else f"timeout after {i}s") for i in range(5)]
              + [history_op(20 + i, 30, now, endpoint="/scenario/checkout", success=i == 0,
                            error=None if i == 0 else "HTTP 502") for i in range(2)]
              + [history_op(30, 20, now, endpoint="/fine", success=True)])
    assert client.post("/observer/events", old + recent)[0] == 200
    journal = str(server.config.persist_path)
    result = run_ops(journal, "--since", "10m", "--failed", "--count-by", "endpoint", "-o", "ndjson")
    assert result.returncode == 0, result.stderr
    search_stamp = max(recent[:5], key=od.op_time)["timestamp"]
    assert count_rows(result.stdout) == [
        # Sorted by failures; each rate over all the group's ops in the window, not only its failures.
        {"value": "/mcp/search", "ops": 5, "failures": 3, "failure_rate": 0.6, "p50_ms": 30, "p95_ms": 50,
         "newest": search_stamp},
        {"value": "/scenario/checkout", "ops": 2, "failures": 1, "failure_rate": 0.5, "p50_ms": 0, "p95_ms": 0,
         "newest": recent[6]["timestamp"]},
    ]
    # The same grouping over HTTP: one bounded scan, no cursor.
    body = history_page(client, "since=10m&failed&count_by=endpoint")
    assert body["groups"] == count_rows(result.stdout) and body["count"] == 2
    assert body["truncated"] is False and "cursor" not in body
    through_url = run_ops("--url", f"http://127.0.0.1:{server.port}", "--since", "10m", "--failed",
                          "--count-by", "endpoint", "-o", "json")
    assert json.loads(through_url.stdout)["groups"] == body["groups"]
    # Without --failed every group shows; by signature, successes count under none.
    everything = count_rows(run_ops(journal, "--since", "10m", "--count-by", "endpoint", "-o", "ndjson").stdout)
    assert [row["value"] for row in everything] == ["/mcp/search", "/scenario/checkout", "/fine"]
    signatures = count_rows(run_ops(journal, "--count-by", "signature", "-o", "ndjson").stdout)
    assert [(row["value"], row["ops"]) for row in signatures] == [
        ("gone", 3), ("timeout after <n>s", 3), ("http <n>", 1), (None, 4)]
    fields = count_rows(run_ops(journal, "--count-by", "seq", "-n", "2", "-o", "ndjson").stdout)
    assert [row["value"] for row in fields] == ["0", "1"]  # not a string: its JSON
    table = run_ops(journal, "--since", "10m", "--failed", "--count-by", "endpoint", "-o", "table").stdout
    assert table.splitlines()[0].split() == ["FAILED", "OPS", "FAIL%", "P50", "MS", "P95", "MS", "NEWEST", "ENDPOINT"]
    assert table.splitlines()[1].split()[:3] == ["3", "5", "60.0%"] and table.splitlines()[1].endswith("/mcp/search")


def test_count_by_over_http_is_one_scan_bounded_by_max_scan_bytes(serve):
    server = serve(max_scan_bytes=1000, max_file_bytes=5000, keep_files=100)
    client = server.client()
    post_seqs(client, range(100), success=False, error="boom")
    body = history_page(client, "count_by=endpoint&limit=3")
    assert body["truncated"] is True and body["count"] == 3  # limit: the first groups
    whole = history_page(client, "count_by=error")
    assert whole["truncated"] is True and 0 < whole["groups"][0]["ops"] < 100
    assert body["scanned_bytes"] < 1000 + 2 * od.BLOCK_BYTES
    cursor = history_page(client, "limit=1")["cursor"]
    assert history_page(client, f"count_by=endpoint&cursor={cursor}", expect=400)["error"].startswith(
        "invalid query: cursor does not go with count_by")
    assert history_page(client, "count_by=", expect=400)["error"].startswith("invalid query: count_by ")


# -----------------------------------------------------------------------------
# [SECTION] Analysis
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    ("Timeout after 30s calling 10.0.0.12:8080", "timeout after 5s calling 10.0.0.7:443"),
    ("user 4521 not found", "User 17 not found"),
    ("run 3f2a9c1e-77b0-4a8e-9a3f-1c2d3e4f5a6b failed", "run 00000000-1111-2222-3333-444455556666 failed"),
    ("object 0xdeadbeef freed twice", "object 0x7f3a freed twice"),
    ("commit a3f9c21b not found", "commit 0b1c2d3e4f not found"),
    ("cannot open /var/data/run-1/out.json", "cannot open /tmp/x/y.json"),
    ("key 'alpha' missing", 'key "beta-2" missing'),
    ("too   many\n\tspaces", "too many spaces"),
])
def test_error_signatures_match_the_same_failure_with_other_ids(a, b):
    assert od.error_signature(a) == od.error_signature(b)


def test_error_signatures_keep_different_failures_apart_and_are_bounded():
    assert od.error_signature("connection refused") != od.error_signature("connection reset")
    assert od.error_signature("user 42 not found") == "user <n> not found"
    assert od.error_signature("") == od.error_signature(None) == od.NO_ERROR_SIGNATURE
    assert len(od.error_signature("word " * 500)) == 200


def test_failure_clusters_are_served_largest_first(serve):
    server = serve(analyze_interval_s=0.05)
    client = server.client()
    batch = [
        {"endpoint": "/db", "error": f"timeout after {n}ms on shard {n % 3}", "source": "mcp",
         "timestamp": f"2026-11-24T10:00:0{n}Z"} for n in range(4)
    ] + [
        {"endpoint": "/db", "error": "connection refused", "source": "scenario", "timestamp": "2026-11-24T11:00:00Z"},
        {"endpoint": "/api", "error": "timeout after 5ms on shard 1", "source": "langfuse", "timestamp": "2026-11-24T09:00:00Z"},
        {"endpoint": "/db", "success": True},
    ]
    assert client.post("/observer/events", batch)[0] == 200
    errors = wait_for(lambda: (e := client.get("/observer/errors")[1])["clusters"] and e, what="analysis")
    assert od.parse_rfc3339(errors["analyzed_at"])
    first, *rest = errors["clusters"]
    assert first == {"endpoint": "/db", "signature": "timeout after <n>ms on shard <n>", "count": 4,
                     "first_seen": "2026-11-24T10:00:00Z", "last_seen": "2026-11-24T10:00:03Z",
                     "sources": {"mcp": 4}, "sample_error": "timeout after 3ms on shard 0"}
    assert [(c["endpoint"], c["count"]) for c in rest] == [("/db", 1), ("/api", 1)]


def test_review_verdicts_on_known_data(serve):
    server = serve()
    batch = (
        [{"endpoint": "/healthy", "success": True, "duration_ms": 10 * i} for i in range(1, 21)]
        + [{"endpoint": "/degraded", "success": i >= 2, "error": "" if i >= 2 else "HTTP 500"} for i in range(10)]
        + [{"endpoint": "/failing", "success": i % 2 == 0, "error": "timeout 30s"} for i in range(10)]
        + [{"endpoint": "/slow", "success": True, "duration_ms": 9000} for _ in range(6)]
        + [{"endpoint": "/rare", "success": True}, {"endpoint": "/rare", "source": "scenario"}]
    )
    assert server.client().post("/observer/events", batch)[0] == 200
    result = review(server)
    assert (result["method"], result["ops_considered"]) == ("heuristic", len(batch))
    verdicts = {r["endpoint"]: r["verdict"] for r in result["reviews"]}
    assert verdicts == {"/healthy": "healthy", "/degraded": "degraded", "/failing": "failing",
                        "/slow": "degraded", "/rare": "insufficient_data"}
    assert [r["verdict"] for r in result["reviews"]][:1] == ["failing"]
    healthy = next(r for r in result["reviews"] if r["endpoint"] == "/healthy")
    assert (healthy["total"], healthy["failures"], healthy["p50_duration_ms"], healthy["p95_duration_ms"]) == (20, 0, 100, 190)
    failing = next(r for r in result["reviews"] if r["endpoint"] == "/failing")
    assert failing["failure_rate"] == 0.5
    assert failing["top_error_signatures"] == [{"signature": "timeout <n>s", "count": 5}]
    assert all(r["reasons"] for r in result["reviews"])
    only = review(server, endpoint="/rare", source="scenario")
    assert only["ops_considered"] == 1
    assert review(server, last_n=6)["reviews"][0]["endpoint"] == "/rare"


def test_only_a_bounded_prefix_of_a_huge_error_is_normalised(monkeypatch):
    seen = []

    class Recording:
        def __init__(self, pattern):
            self.pattern = pattern

        def sub(self, placeholder, text):
            seen.append(len(text))
            return self.pattern.sub(placeholder, text)

    monkeypatch.setattr(od, "_SIGNATURE_RULES", [(Recording(p), r) for p, r in od._SIGNATURE_RULES])
    huge = "timeout after 30s calling 10.0.0.12:8080 " * 100_000  # 4 MB
    assert od.error_signature(huge) == od.error_signature(huge[:od.ERROR_TEXT_KEPT_CHARS] + "tail differs")
    assert seen and max(seen) <= od.ERROR_TEXT_KEPT_CHARS
    assert od.error_signature(huge).startswith("timeout after <n>s calling <n>.<n>:<n> timeout")


def test_each_failure_is_signed_once_however_often_analysis_runs(monkeypatch):
    calls = []
    real = od.error_signature
    monkeypatch.setattr(od, "error_signature", lambda text: calls.append(text) or real(text))
    ring = [od.RingOp(op(f"/{i % 3}", error=f"timeout after {i}s " + "x" * 4000)) for i in range(50)]
    ring += [od.RingOp(op("/ok", success=True))]
    first = od.rank_clusters(od.group_failures(ring))
    assert len(calls) == 50  # successes are never signed
    calls.clear()
    assert od.rank_clusters(od.group_failures(ring)) == first
    assert od.review_ops(ring)[0]["top_error_signatures"][0]["count"] == 17
    assert calls == []


# -----------------------------------------------------------------------------
# [SECTION] Statistics
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("table, expected", [
    ((3, 1, 1, 3), 0.4857142857142857),  # Fisher's tea: 34/70
    ((1, 9, 11, 3), 0.0027594561852200836),
    ((3, 17, 1, 19), 0.6049896049896051),  # 3 failures in 20 against 1 in 20: nothing
    ((10, 90, 30, 70), 0.0006504107076034208),  # 10 in 100 against 30 in 100: something
    ((0, 5, 0, 5), 1.0),
    ((5, 5, 5, 5), 1.0),  # every table as likely as its mirror: the tolerance keeps both
])
def test_fisher_exact_p_matches_hand_computed_values_and_exact_enumeration(table, expected):
    assert od.fisher_exact_p(*table) == pytest.approx(expected, rel=1e-9)
    assert od.fisher_exact_p(*table) == pytest.approx(fisher_by_enumeration(*table), rel=1e-9)


def test_fisher_counts_tables_as_likely_as_the_observed_one_within_a_relative_1e_7():
    # [[2, 8], [8, 2]] and its mirror are equally likely; float sums must not drop either.
    rng = random.Random(3)
    for _ in range(200):
        table = [rng.randint(0, 12) for _ in range(4)]
        assert od.fisher_exact_p(*table) == pytest.approx(fisher_by_enumeration(*table), rel=1e-9), table


@pytest.mark.parametrize("baseline, candidate, u, p", [
    ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], 25.0, 2 / 252),  # exact: the most extreme of 252 splits
    ([6, 7, 8, 9, 10], [1, 2, 3, 4, 5], 0.0, 2 / 252),
    ([1, 2, 3, 4, 5, 6, 7], [1.5, 2.5, 9, 11, 12], 24.0, 0.3434343434343435),
])
def test_mann_whitney_u_exact_for_small_samples_without_ties(baseline, candidate, u, p):
    assert od.mann_whitney_u(baseline, candidate) == pytest.approx((u, p), rel=1e-12)
    assert od.mann_whitney_u(baseline, candidate) == pytest.approx(u_by_enumeration(baseline, candidate), rel=1e-12)


def test_mann_whitney_u_with_ties_is_the_normal_approximation_with_tie_and_continuity_corrections():
    baseline = [12, 15, 15, 18, 20, 20, 20, 22, 25]
    candidate = [18, 20, 24, 24, 27, 30, 30, 31, 35, 40]
    n1, n2 = len(baseline), len(candidate)
    u = sum((c > b) + 0.5 * (c == b) for c in candidate for b in baseline)
    ties = Counter(baseline + candidate).values()
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - sum(t ** 3 - t for t in ties) / (n * (n - 1))))
    z = (max(u, n1 * n2 - u) - n1 * n2 / 2 - 0.5) / sigma
    by_hand = math.erfc(z / math.sqrt(2))  # 2 · P(Z > z)
    assert (u, by_hand) == pytest.approx((79.0, 0.005919358687252546), rel=1e-9)  # SciPy 1.17's answer
    assert od.mann_whitney_u(baseline, candidate) == pytest.approx((u, by_hand), rel=1e-12)


def test_zero_spread_on_both_sides_at_different_values_is_a_real_difference():
    # benchstat once called this "no difference" (golang/go#19634): every new value is larger.
    u, p = od.mann_whitney_u([10.0] * 6, [20.0] * 6)
    assert u == 36 and p == pytest.approx(0.0012619447673879731, rel=1e-9)
    assert od.mann_whitney_u([5.0] * 6, [5.0] * 6) == (18.0, 1.0)


def test_benjamini_hochberg_adjusts_a_family_as_by_hand():
    # sorted: .005 .01 .03 .04 .2 → ·5/rank: .025 .025 .05 .05 .2, each the minimum of those after
    assert od.benjamini_hochberg([0.01, 0.04, 0.03, 0.2, 0.005]) == pytest.approx([0.025, 0.05, 0.05, 0.2, 0.025])
    # ·4/rank: .04 .04 .04 .035: each takes the smallest of those ranked after it
    assert od.benjamini_hochberg([0.03, 0.01, 0.035, 0.02]) == pytest.approx([0.035] * 4)
    assert od.benjamini_hochberg([]) == []


def test_scipy_agrees_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats", reason="scipy is not installed: the hand-computed tests stand alone")
    rng = random.Random(11)
    for trial in range(40):
        old = [rng.choice([rng.random(), rng.randint(0, 9)]) for _ in range(rng.randint(5, 30))]
        new = [rng.choice([rng.random(), rng.randint(0, 9)]) + trial % 3 for _ in range(rng.randint(5, 30))]
        expected = stats.mannwhitneyu(new, old, method="auto")
        assert od.mann_whitney_u(old, new) == pytest.approx((expected.statistic, expected.pvalue), rel=1e-9)
        table = [rng.randint(0, 60) for _ in range(4)]
        expected = stats.fisher_exact([table[:2], table[2:]]).pvalue
        assert od.fisher_exact_p(*table) == pytest.approx(expected, rel=1e-6)


# -----------------------------------------------------------------------------
# [SECTION] Comparisons
# -----------------------------------------------------------------------------

def test_compare_finds_exactly_what_changed_over_http_and_on_the_command_line(serve):
    server = serve()
    post_ops(server.client(), two_hours_of_ops(time.time()))
    status, answer, _ = server.client().get("/observer/compare?baseline=2h..1h&candidate=1h..now")
    assert status == 200, answer
    assert list(answer) == ["verdict", "baseline", "candidate", "by", "scanned_bytes", "truncated", "rows"]
    assert (answer["verdict"], answer["baseline"], answer["candidate"], answer["by"], answer["truncated"]) == (
        "worse", "2h..1h", "1h..now", "endpoint", False)
    assert verdicts_of(answer) == EXPECTED_VERDICTS
    assert [row["verdict"] for row in answer["rows"]] == ["worse", "worse", "~", "too few"]
    triples = next(row for row in answer["rows"] if row["endpoint"] == "/triples")
    assert list(triples) == ["endpoint", "verdict", "baseline", "candidate", "failure_rate", "duration",
                             "new_signatures", "gone_signatures"]
    assert triples["baseline"] == {"ops": 100, "failures": 10, "failure_rate": 0.1,
                                   "p50_ms": triples["baseline"]["p50_ms"], "p95_ms": triples["baseline"]["p95_ms"]}
    assert (triples["candidate"]["ops"], triples["candidate"]["failures"]) == (100, 30)  # the correction is not an op
    assert triples["failure_rate"]["p"] == pytest.approx(od.fisher_exact_p(10, 90, 30, 70))
    assert triples["failure_rate"]["q"] >= triples["failure_rate"]["p"]
    assert triples["new_signatures"] == [{"signature": "connection reset by peer", "count": 10}]  # i % 10 == 1
    steady = next(row for row in answer["rows"] if row["endpoint"] == "/steady")
    assert steady["gone_signatures"] == [{"signature": "disk full", "count": 1}]
    rare = next(row for row in answer["rows"] if row["endpoint"] == "/rare")
    assert rare["failure_rate"] == rare["duration"] == {"p": None, "q": None, "verdict": "too few"}

    cli = run_cli("compare", "2h..1h", "1h..now", str(server.config.persist_path), "-o", "json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["rows"] == answer["rows"]
    table = run_cli("compare", "2h..1h", "1h..now", str(server.config.persist_path), "-o", "table").stdout
    assert "/triples" in table and "+20.0pp" in table and "too few  fewer than 5 ops" in table
    assert re.search(r"/steady .* ~ ", table)


def test_compare_two_runs_and_by_any_field(serve):
    server = serve()
    post_ops(server.client(), two_hours_of_ops(time.time()))
    status, by_run, _ = server.client().get("/observer/compare?baseline=r1&candidate=r2")
    assert status == 200 and verdicts_of(by_run) == EXPECTED_VERDICTS
    status, by_model, _ = server.client().get("/observer/compare?baseline=r1&candidate=r2&by=model&endpoint=/doubles")
    assert status == 200, by_model
    assert {row["model"]: row["verdict"] for row in by_model["rows"]} == {"m0": "worse", "m1": "worse"}
    cli = run_cli("compare", "r1", "r2", str(server.config.persist_path), "--by", "model", "--endpoint", "/doubles")
    assert json.loads(cli.stdout)["rows"] == by_model["rows"]


@pytest.mark.parametrize("query, name", [
    ("candidate=1h..now", "baseline"),
    ("baseline=2h..1h", "candidate"),
    ("baseline=1h..2h&candidate=1h..now", "baseline"),
    ("baseline=r1&candidate=r2&by=verdict", "by"),
    ("baseline=r1&candidate=r2&by=", "by"),
    ("baseline=r1&candidate=r2&success=false", "success"),
])
def test_bad_comparisons_are_400_naming_the_parameter(serve, query, name):
    status, body, _ = serve().client().get("/observer/compare?" + query)
    assert status == 400 and name in body["error"], body


def test_compare_on_the_command_line_names_the_bad_argument(tmp_path):
    journal = tmp_path / "ops.jsonl"
    journal.write_text(json.dumps(op("/a", timestamp=ago(10))) + "\n")
    cli = run_cli("compare", "1h..2h", "1h..now", str(journal))
    assert cli.returncode == 2 and cli.stderr.startswith("observerd.py compare: baseline starts after it ends")
    cli = run_cli("compare", "r1", "r2", str(journal), "--by", "duration")
    assert cli.returncode == 2 and "--by cannot be 'duration'" in cli.stderr


def test_fifty_unchanged_endpoints_with_noise_light_up_no_row():
    """Twenty comparisons (seeds 0-19) of fifty endpoints that did not change: each has 100
    tests, so raw p < 0.05 turns up by chance in nearly all; after Benjamini–Hochberg none."""
    chance_findings = 0
    for seed in range(20):
        rng = random.Random(seed)
        sides = []
        for _ in range(2):
            groups = {}
            for n in range(50):
                tally = groups[f"/e{n}"] = od.Tally()
                for _ in range(40):
                    tally.add(od.RingOp(od.validate_op(op(f"/e{n}", success=rng.random() > 0.2,
                                                          duration_ms=rng.lognormvariate(3, 0.5)))))
            sides.append(groups)
        verdict, rows = od.compare_tallies("endpoint", *sides)
        chance_findings += min(row[metric]["p"] for row in rows for metric in ("failure_rate", "duration")) < 0.05
        assert verdict == "~" and {row["verdict"] for row in rows} == {"~"}, seed
    assert chance_findings >= 15, "the noise must hold chance 'findings' for the test to mean anything"


def test_runs_newest_first_with_their_numbers_over_http_and_on_the_command_line(serve):
    server = serve()
    post_ops(server.client(), two_hours_of_ops(time.time()) + [op("/no-run")])
    status, answer, _ = server.client().get("/observer/runs")
    assert status == 200, answer
    assert [run["run"] for run in answer["runs"]] == ["r2", "r1"]
    r2 = answer["runs"][0]
    assert (r2["ops"], r2["failures"], r2["endpoints"]) == (
        304, 40, ["/doubles", "/rare", "/steady", "/triples"])  # 303 ops and the correction
    assert r2["failure_rate"] == round(40 / 304, 4) and r2["first"] < r2["last"]
    assert list(r2) == ["run", "first", "last", "ops", "failures", "failure_rate", "p50_ms", "p95_ms", "endpoints"]
    cli = run_cli("runs", str(server.config.persist_path), "-o", "json")
    assert json.loads(cli.stdout)["runs"] == answer["runs"]
    status, failed, _ = server.client().get("/observer/runs?endpoint=/triples&success=false&since=1h")
    assert [(run["run"], run["ops"]) for run in failed["runs"]] == [("r2", 30)]
    cli = run_cli("runs", str(server.config.persist_path), "--endpoint", "/triples", "--failed", "--since", "1h")
    assert json.loads(cli.stdout)["runs"] == failed["runs"]


def test_runs_are_bounded_by_max_scan_bytes_and_go_on_by_cursor(serve):
    server = serve(max_scan_bytes=1)
    post_ops(server.client(), [op("/a", run_id=f"r{i // 1000}", pad="x" * 200) for i in range(3000)])
    status, first, _ = server.client().get("/observer/runs")
    assert first["truncated"] and first["cursor"] and sum(run["ops"] for run in first["runs"]) < 3000
    seen = Counter({run["run"]: run["ops"] for run in first["runs"]})
    cursor = first["cursor"]
    for _ in range(1000):  # each page reads at least a block: ~15 of them hold it all
        page = server.client().get(f"/observer/runs?cursor={cursor}")[1]
        seen.update({run["run"]: run["ops"] for run in page["runs"]})
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == {"r0": 1000, "r1": 1000, "r2": 1000}


def test_each_correction_gets_a_verdict_and_an_unhelpful_one_is_escalated_once_across_restarts(
        tmp_path, daemons, fake_service):
    team = fake_service()
    settings = dict(CORRECTION_SETTINGS, escalate_url=team.url + "/api/run")
    daemon = start_durable_daemon(daemons, tmp_path, **settings)
    post_ops(daemon.client(), corrected_endpoints(time.time()))
    wait_for(lambda: len(team.received) == 2, what="the escalations of the two unhelpful corrections")
    sent = {body["correction"]["endpoint"]: body for _, body in team.received}
    assert set(sent) == {"/idle", "/broke"}
    idle = sent["/idle"]
    assert (idle["mode"], idle["source"], idle["verdict"], idle["cluster"]["endpoint"]) == (
        "code_review", "observerd", "no change", "/idle")
    assert idle["comparison"]["baseline"]["failures"] == idle["comparison"]["candidate"]["failures"] == 15
    assert sent["/broke"]["verdict"] == "hurt" and sent["/broke"]["comparison"]["failure_rate"]["verdict"] == "worse"
    expected = {"/later": ("pending", False), "/broke": ("hurt", True), "/idle": ("no change", True),
                "/fixed": ("helped", False)}
    # The team has an escalation before the daemon has its answer, and records it as sent.
    wait_for(lambda: correction_verdicts(daemon.client()) == expected, what="both escalations recorded")
    assert list(correction_verdicts(daemon.client())) == ["/later", "/broke", "/idle", "/fixed"]  # newest first
    cli = run_cli("corrections", "--config", str(tmp_path / "lakehouse.toml"), "-o", "json")
    assert {e["correction"]["endpoint"]: (e["verdict"], e["escalated"]) for e in json.loads(cli.stdout)["corrections"]} == expected
    escalations = daemon.client().get("/observer/escalations")[1]["escalations"]
    assert sorted((e["endpoint"], e["verdict"], e["outcome"]) for e in escalations) == [
        ("/broke", "hurt", "sent"), ("/idle", "no change", "sent")]
    wait_for_analyses(daemon.client())
    assert len(team.received) == 2, "a correction was escalated twice"

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 0
    daemon = start_durable_daemon(daemons, tmp_path, **settings)
    wait_for_analyses(daemon.client())
    assert correction_verdicts(daemon.client()) == expected
    top = run_cli("top", "--once", "--url", f"http://127.0.0.1:{daemon.port}")
    assert re.search(r"hurt +0\.0% → 60\.0%  /broke  \(escalated\)", top.stdout), top.stdout
    assert re.search(r"helped +50\.0% → 0\.0%  /fixed\n", top.stdout), top.stdout
    assert len(team.received) == 2, "a restart escalated a correction again"


def test_a_failed_correction_escalation_is_retried_and_delivered_once(tmp_path, daemons, fake_service):
    down = fake_service(status=503)
    settings = dict(CORRECTION_SETTINGS, escalate_url=down.url + "/api/run", escalate_cooldown_s=3600)
    daemon = start_durable_daemon(daemons, tmp_path, **settings)
    post_ops(daemon.client(), corrected_endpoints(time.time()))
    wait_for(lambda: len(down.received) >= 2, what="the first deliveries")
    wait_for_analyses(daemon.client(), 40)
    # Every analysis would be 80 attempts; doubling from 0.05 s, 30 would take hours.
    assert 2 <= len(down.received) < 30, len(down.received)
    assert {body["correction"]["endpoint"] for _, body in down.received} == {"/idle", "/broke"}
    assert correction_verdicts(daemon.client())["/idle"] == ("no change", False)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 0
    up = fake_service()
    daemon = start_durable_daemon(daemons, tmp_path, **dict(settings, escalate_url=up.url))
    wait_for(lambda: len(up.received) == 2, what="the deliveries once the target is up")
    wait_for_analyses(daemon.client())
    assert len(up.received) == 2
    wait_for(lambda: correction_verdicts(daemon.client())["/idle"] == ("no change", True), what="the delivery recorded")


def test_corrections_judged_on_a_read_cut_short_say_so_and_are_never_escalated(serve, fake_service):
    team = fake_service()
    server = serve(max_scan_bytes=1, escalate_url=team.url, **CORRECTION_SETTINGS)
    now = time.time()
    ops = corrected_endpoints(now)
    early = [o for o in ops if o["timestamp"] < ago(140.5, now)]  # the first half of each before-window
    late = [o for o in ops if o not in early]
    # 300 KB of other ops between them: a read of the journal's last block sees /broke's last 15 ops
    # before its correction (none failed) and the 30 after (18 failed): hurt, on a read cut short.
    post_ops(server.client(), early + [op("/noise", timestamp=ago(140, now), pad="x" * 300) for _ in range(1000)]
             + late)
    wait_for_analyses(server.client(), 5)
    status, answer, _ = server.client().get("/observer/corrections")
    assert status == 200 and answer["truncated"] and answer["count"] == 4
    broke = next(e for e in answer["corrections"] if e["correction"]["endpoint"] == "/broke")
    assert (broke["verdict"], broke["truncated"], broke["comparison"]["baseline"]["ops"]) == ("hurt", True, 15)
    assert team.received == []


def test_the_corrections_of_one_listing_share_max_scan_bytes(serve):
    server = serve(max_scan_bytes=300_000, verdict_window_s=60)
    now = time.time()
    # 2 MB of ops stamped now, then ten corrections stamped an hour back (sent late): each
    # verdict's read goes back through all of it, looking for its endpoint's ops of that hour.
    post_ops(server.client(), [op("/noise", timestamp=ago(1, now), pad="x" * 2000) for _ in range(1000)]
             + [op(f"/fix/{n}", source="overseer_correction", timestamp=ago(3600, now)) for n in range(10)])
    status, answer, _ = server.client().get("/observer/corrections")
    assert status == 200 and answer["count"] == 10 and answer["truncated"]
    # Ten reads of 300 KB each would be 3 MB; shared, the later ones read a block (64 KiB) each.
    assert answer["scanned_bytes"] < 300_000 + 11 * od.BLOCK_BYTES


# -----------------------------------------------------------------------------
# [SECTION] Insights
# -----------------------------------------------------------------------------

def test_delivered_escalations_stay_listed_however_many_attempts_fail():
    insights = od.Insights()

    def attempt(endpoint, outcome, n=0):
        return {"at": f"2026-11-24T10:{n // 60:02d}:{n % 60:02d}Z", "endpoint": endpoint,
                "signature": "boom", "count": 1, "url": "http://team", "outcome": outcome}

    insights.record_escalation(attempt("/a", "sent", 0))
    insights.record_escalation(attempt("/c", "sent", 1))
    insights.record_escalation(attempt("/a", "sent", 2))  # only the newest per cluster is kept
    for n in range(3, 503):
        insights.record_escalation({**attempt("/b", "failed", n), "error": "HTTP 503"})
    listed = insights.escalations()
    assert [(e["endpoint"], e["at"]) for e in listed if e["outcome"] == "sent"] == [
        ("/a", "2026-11-24T10:00:02Z"), ("/c", "2026-11-24T10:00:01Z")]
    failed = [e for e in listed if e["outcome"] == "failed"]
    assert len(failed) == od.Insights.MAX_ESCALATIONS and failed[0]["at"] == "2026-11-24T10:08:22Z"
    assert [e["at"] for e in listed] == sorted((e["at"] for e in listed), reverse=True)


# -----------------------------------------------------------------------------
# [SECTION] Outbound
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("dribbled", ["head", "body"])
def test_an_llm_that_dribbles_its_answer_is_cut_off_at_the_deadline(serve, raw_service, dribbled):
    # One byte every 0.5 s: the whole answer would take about a minute.
    at_once = 0 if dribbled == "head" else SLOW_ANSWER.index(b"\r\n\r\n") + 4
    llm = raw_service(SLOW_ANSWER, at_once=at_once, byte_interval_s=0.5)
    server = serve(review_llm_url=llm.url, outbound_timeout_s=1)
    server.client().post("/observer/events", failures("/x", 6))
    status, result, _ = server.client(timeout=20).post("/observer/review", {"llm": True})
    assert status == 200
    assert (result["method"], result["llm_errors"]) == ("heuristic", [{"backend": "primary", "error": "timed out"}])
    assert result["reviews"][0]["verdict"] == "failing"


def test_a_dribbling_escalation_target_does_not_hold_the_loops(serve, raw_service, tmp_path):
    team = raw_service(SLOW_ANSWER, at_once=0, byte_interval_s=0.5)
    corrections = tmp_path / "overseer.jsonl"
    server = serve(analyze_interval_s=0.05, escalate_url=team.url, escalate_threshold=1, outbound_timeout_s=1,
                   corrections_path=str(corrections), corrections_interval_s=0.05)
    client = server.client()
    assert client.post("/observer/event", {"endpoint": "/x", "error": "boom"})[0] == 200
    attempt = wait_for(lambda: client.get("/observer/escalations")[1]["escalations"], timeout=20,
                       what="the escalation to give up")[0]
    assert (attempt["outcome"], attempt["error"]) == ("failed", "timed out")
    corrections.write_bytes(correction(1))  # the same loop thread tails corrections
    wait_for(lambda: client.get("/observer/stats")[1]["total"] == 2, timeout=20, what="the correction")


@pytest.mark.parametrize("answer, needle", [
    (http_answer(b'{"response": "cut', content_length=100), "IncompleteRead"),
    (b"", "RemoteDisconnected"),
    (b"garbage\r\n\r\n", "BadStatusLine"),
    (http_answer(b'{"response": '), "not valid JSON"),
    (http_answer(b'{"response": "\\ud800 lone surrogate"}'), "valid Unicode"),
    (http_answer(b'{"response": "' + b"x" * 2000 + b'"}'), "larger than 1000 bytes"),
], ids=["incomplete", "no body", "bad status line", "bad json", "lone surrogate", "too large"])
def test_every_failure_of_an_outbound_call_is_an_llm_error_or_a_failed_escalation(
        serve, raw_service, monkeypatch, answer, needle):
    monkeypatch.setattr(od, "OUTBOUND_MAX_ANSWER_BYTES", 1000, raising=False)
    service = raw_service(answer)
    server = serve(review_llm_url=service.url, analyze_interval_s=0.05, escalate_url=service.url,
                   escalate_threshold=1)
    client = server.client()
    client.post("/observer/events", failures("/x", 6))
    status, result, _ = client.post("/observer/review", {"llm": True})
    assert status == 200, result
    [error] = result["llm_errors"]
    assert result["method"] == "heuristic" and needle in error["error"]
    attempt = wait_for(lambda: client.get("/observer/escalations")[1]["escalations"], what="an attempt")[0]
    # An escalation ignores what the answer says, but not a broken or oversized one.
    assert attempt["outcome"] == ("sent" if needle == "valid Unicode" else "failed")


# -----------------------------------------------------------------------------
# [SECTION] HTTP protocol
# -----------------------------------------------------------------------------

def test_body_over_the_cap_is_413_before_reading_it(serve):
    server = serve(max_body_bytes=100)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        # Announce 10 MB but send none of it: the answer must come from the header alone.
        sock.sendall(b"POST /observer/event HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        status, body = parse_response(sock.recv(65536))
    assert status == 413 and "max_body_bytes=100" in body["error"]
    client = server.client()
    assert client.post("/observer/event", {"endpoint": "/" + "x" * 200})[0] == 413
    assert client.post("/observer/event", {"endpoint": "/small"})[0] == 200


def test_body_without_content_length_or_chunks_is_411(serve):
    server = serve()
    raw = raw_exchange(server.port, b"POST /observer/event HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(raw)[0] == 411
    assert server.store.stats()["total"] == 0


def test_keep_alive_serves_two_requests_on_one_connection(serve):
    server = serve()
    client = server.client()
    assert client.post("/observer/event", {"endpoint": "/1"})[0] == 200
    sock = client.conn.sock
    assert client.get("/observer/stats")[1]["total"] == 1
    assert client.conn.sock is sock, "the second request needed a new connection"


def test_each_response_is_sent_in_one_write(serve):
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /observer/health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
    status, body = parse_response(first)
    assert status == 200 and body["status"] == "ok"


def test_client_that_disconnects_mid_request_is_not_a_traceback(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
            sock.sendall(b"POST /observer/event HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"endp")
        with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.sendall(b"GET /observer/stats HTTP/1.1\r\n\r\n")
    assert daemon.client().get("/observer/health")[0] == 200
    assert "Traceback" not in daemon.log


def test_slowloris_connections_never_block_health(serve):
    # Stalled requests may take all of request_timeout_s (longer than the test waits for
    # anything): health must be answered while every one of them is still held open.
    server = serve(request_timeout_s=3600)
    slow = open_slow_requests(server.port, 200)
    try:
        wait_for(lambda: len(server.server.connections) == 200, timeout=60, what="200 slow connections admitted")
        for _ in range(7):
            assert_healthy(server.port)
        wait_for(lambda: len(server.server.connections) == 200, what="only the slow connections to be open")
    finally:
        for sock in slow:
            sock.close()


def test_slowloris_connections_are_closed_at_the_request_deadline(serve):
    server = serve(request_timeout_s=1.0)
    slow = open_slow_requests(server.port, 200)
    try:
        # Dribble a byte every 0.2 s: each recv is quick, but the whole request is not.
        closed = set()
        deadline = time.monotonic() + 60
        while len(closed) < len(slow) and time.monotonic() < deadline:
            for i, sock in enumerate(slow):
                if i in closed:
                    continue
                try:
                    sock.sendall(b"a")
                    sock.setblocking(False)
                    answer = sock.recv(65536)
                    if answer == b"" or answer.startswith(b"HTTP/1.1 408 "):  # 408, then closed
                        closed.add(i)
                except BlockingIOError:
                    pass
                except OSError:
                    closed.add(i)
                finally:
                    sock.setblocking(True)
            time.sleep(0.2)
        assert len(closed) == len(slow), f"{len(slow) - len(closed)} slow connections still open"
    finally:
        for sock in slow:
            sock.close()


def test_a_burst_of_connections_is_accepted_at_once(tmp_path):
    # The accept loop is not running yet, as when it lags behind a burst: every connection
    # must still be established by the kernel's backlog, not dropped and retried after 1 s.
    server = od.ObserverServer(make_config(tmp_path), od.open_store(make_config(tmp_path)))
    port = server.server_address[1]
    burst = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    try:
        # A SYN that finds the accept queue full is dropped, so with a shallow backlog the rest
        # of the burst never connects while nothing accepts. 100 stays under an old somaxconn.
        for _ in range(100):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            burst.append(sock)

        def all_connected():
            _, writable, _ = select.select([], burst, [], 0)
            return len(writable) == len(burst)

        wait_for(all_connected, timeout=60, what="every connection of the burst to be established")
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for sock in burst)
        thread.start()
        for sock in burst[:3] + burst[-3:]:
            sock.settimeout(30)
            sock.sendall(b"GET /observer/health HTTP/1.1\r\n\r\n")
            assert parse_response(sock.recv(65536))[0] == 200
    finally:
        for sock in burst:
            sock.close()
        if thread.is_alive():
            server.shutdown()
        server.server_close()
        server.store.close()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_get_a_4xx_json_error(serve, name):
    server = serve()
    raw = raw_exchange(server.port, MALFORMED[name])
    status, body = parse_response(raw)
    assert 400 <= status < 500, (status, body)
    assert isinstance(body["error"], str) and body["error"]
    assert_healthy(server.port)
    assert server.store.stats()["total"] == 0


def test_access_log_is_off_by_default(tmp_path, daemons):
    quiet = start_durable_daemon(daemons, tmp_path)
    quiet.client().get("/observer/health")
    assert "msg=request" not in quiet.log


def test_access_log_writes_one_line_per_request_when_on(tmp_path, daemons):
    loud = start_durable_daemon(daemons, tmp_path, access_log=True)
    loud.client().post("/observer/event", {"endpoint": "/a"})
    loud.client().get("/observer/nope")
    line = wait_for(lambda: [ln for ln in loud.log.splitlines() if "path=/observer/nope" in ln], what="access line")[0]
    assert re.search(r"msg=request method=GET path=/observer/nope status=404 bytes=\d+ duration_ms=[\d.]+ remote=127\.0\.0\.1", line)
    assert "method=POST path=/observer/event status=200" in loud.log


def test_pipelined_requests_are_answered_in_order(serve, monkeypatch):
    server = serve()
    FsyncSpy(monkeypatch, delay=0.1)  # the first answer is still owed when the rest arrive
    requests = b""
    for i in range(3):
        body = json.dumps({"endpoint": f"/p{i}"}).encode()
        requests += b"POST /observer/event HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    requests += b"GET /observer/stats HTTP/1.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(requests)
        answers = read_responses(sock, 4)
    assert [a for a in answers[:3]] == [(200, {"accepted": True, "ring_size": n}) for n in (1, 2, 3)]
    assert answers[3][0] == 200 and answers[3][1]["total"] == 3


def test_a_client_that_never_reads_answers_is_dropped_without_stalling_others(serve, capsys):
    # A committer that waited for this client would hold every commit for request_timeout_s.
    server = serve(request_timeout_s=3600)
    # Small kernel buffers at both ends (accepted sockets inherit the listener's), so a few dozen
    # unread answers fill them, whatever the disk's speed or the machine's TCP autotuning.
    server.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = json.dumps({"endpoint": "/flood"}).encode()
    request = b"POST /observer/event HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with socket.socket() as greedy:
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.connect(("127.0.0.1", server.port))
        # Far more answers than both buffers hold; the answers are never read.
        flood = threading.Thread(target=send_until_refused, args=(greedy, request * 2000), daemon=True)
        flood.start()
        wait_for(lambda: len(server.store) and not len(server.server.connections), timeout=60,
                 what="the greedy client to be dropped")
        flood.join(60)
    assert len(server.store) < 2000
    assert "client not reading answers" in capsys.readouterr().err
    polite = server.client()
    for i in range(20):
        assert polite.post("/observer/event", {"endpoint": f"/polite{i}"})[0] == 200
    assert server.store.snapshot()[-1]["endpoint"] == "/polite19"


def test_stalled_connections_make_room_for_new_ones_longest_stalled_first(serve):
    server = serve(max_connections=4, request_timeout_s=60)  # the timeout never fires here
    idle = served_keep_alive(server)
    mid_line = served_keep_alive(server)
    mid_line.sendall(b"GET /observer/sta")
    mid_body = served_keep_alive(server)
    mid_body.sendall(b"POST /observer/event HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"endp")
    idle_too = served_keep_alive(server)
    assert len(server.server.connections) == 4
    # Each new connection takes the place of the one stalled the longest, never a newer one.
    newer = [served_keep_alive(server) for _ in range(4)]
    assert read_until_closed(idle) == b""  # between requests: just closed
    for sock in (mid_line, mid_body):
        status, error = parse_response(read_until_closed(sock))
        assert status == 408 and "max_connections=4" in error["error"]
    assert read_until_closed(idle_too) == b""
    for sock in newer:
        sock.sendall(b"GET /observer/stats HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 1)[0][0] == 200
    assert server.store.stats()["total"] == 0
    for sock in (idle, mid_line, mid_body, idle_too, *newer):
        sock.close()


def test_a_cap_full_of_requests_in_flight_answers_503_and_serves_them_all(serve, monkeypatch):
    server = serve(max_connections=2, request_timeout_s=60)
    threads_before = threading.active_count()
    held = FsyncSpy(monkeypatch, held=True)
    body = json.dumps({"endpoint": "/in-flight"}).encode()
    post = b"POST /observer/event HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    in_flight = []
    try:
        for _ in range(2):  # the first commit holds the fsync, then the second queues behind it
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(post)
            in_flight.append(sock)
            wait_for(held.entered.is_set, what="the first commit to reach fsync")
        wait_for(lambda: len(server.store._queue) == 1, what="the second to queue behind it")
        for _ in range(10):
            raw = raw_exchange(server.port, b"GET /observer/health HTTP/1.1\r\n\r\n")
            assert parse_response(raw) == (503, {"error": "too many connections"})
        assert threading.active_count() <= threads_before + 2
    finally:
        held.release()
    for sock in in_flight:
        assert read_responses(sock, 1)[0][0] == 200
        sock.close()
    wait_for(lambda: len(server.server.connections) == 0, what="the slots to free up")
    assert server.client().get("/observer/health")[0] == 200
    assert server.store.stats()["total"] == 2


def test_a_request_in_flight_is_never_the_one_that_makes_room(serve, monkeypatch):
    server = serve(max_connections=2, request_timeout_s=60)
    held = FsyncSpy(monkeypatch, held=True)
    body = json.dumps({"endpoint": "/in-flight"}).encode()
    busy = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        busy.sendall(b"POST /observer/event HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(held.entered.is_set, what="the commit to reach fsync")
        stalled = served_keep_alive(server)  # connected after `busy`, yet it makes room
        assert parse_response(raw_exchange(server.port, b"GET /observer/health HTTP/1.1\r\n\r\n"))[0] == 200
        assert read_until_closed(stalled) == b""
        # Now the cap holds only `busy`, in flight, and a served connection on its way out.
    finally:
        held.release()
    assert read_responses(busy, 1)[0] == (200, {"accepted": True, "ring_size": 1})
    busy.close()


def test_clients_that_never_take_their_answers_make_room_too(serve):
    server = serve(max_connections=3, request_timeout_s=3600, ring_size=100)
    # Kernel buffers made small on both ends of every connection, and answers far larger than
    # any buffer the kernel could tune itself (tcp_wmem and tcp_rmem top out at a few MiB): an
    # answer nobody reads can never be written out, on any machine, however fast.
    accept = server.server.get_request

    def get_request():
        sock, address = accept()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return sock, address

    server.server.get_request = get_request
    client = server.client()
    for n in range(10):
        assert client.post("/observer/event", {"endpoint": f"/big/{n}", "pad": "x" * 2_000_000})[0] == 200
    client.close()
    hogs = []
    try:
        for _ in range(3):
            hog = socket.socket()
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.connect(("127.0.0.1", server.port))
            hog.sendall(b"GET /observer/ops?limit=10 HTTP/1.1\r\nHost: x\r\n\r\n")  # about 20 MB
            hogs.append(hog)

        def all_answering():
            phases = [phase for phase, _ in list(server.server.connections._open.values())]
            return phases.count(od.ConnectionTracker.ANSWERING) == 3

        wait_for(all_answering, timeout=600, what="three answers stuck in unread buffers")
        for _ in range(3):  # each new client takes the place of the hog that has waited longest
            assert parse_response(raw_exchange(server.port, b"GET /observer/health HTTP/1.1\r\n\r\n"))[0] == 200
    finally:
        for hog in hogs:
            hog.close()


def test_large_bodies_are_decoded_a_few_at_a_time_whatever_the_connections(serve, monkeypatch):
    server = serve()
    release, entered = threading.Event(), []
    real_parse = od.parse_json_strict

    def held_parse(data, *args, **kwargs):
        if len(data) >= od.LARGE_BODY_BYTES:
            entered.append(len(data))
            release.wait(60)
        return real_parse(data, *args, **kwargs)

    class CountedPermits:
        """The server's permits, counting who asked for one."""

        def __init__(self, permits):
            self.permits, self.asked = permits, 0

        def __enter__(self):
            self.asked += 1
            self.permits.acquire()

        def __exit__(self, *exc):
            self.permits.release()

    permits = CountedPermits(server.server.large_parses)
    server.server.large_parses = permits
    monkeypatch.setattr(od, "parse_json_strict", held_parse)
    big = json.dumps({"endpoint": "/big", "pad": "x" * od.LARGE_BODY_BYTES})
    routes = ["/observer/event", "/observer/event", "/observer/event", "/observer/events"]
    bodies = [big, big, big, "[" + big + "]"]
    answers = []

    def post(path, body):
        answers.append(server.client(timeout=60).post(path, body)[0])

    posters = [threading.Thread(target=post, args=pair) for pair in zip(routes, bodies)]
    for poster in posters:
        poster.start()
    try:
        wait_for(lambda: permits.asked == 4, timeout=60, what="every large body to ask for a permit")
        assert len(entered) == od.LARGE_BODY_PARSES  # the others wait, holding no decoded body
    finally:
        release.set()
        for poster in posters:
            poster.join(60)
    assert answers == [200] * 4 and len(entered) == 4
    assert server.client().post("/observer/event", {"endpoint": "/small"})[0] == 200  # no permit needed


def test_transfer_encoding_is_seen_whichever_of_its_fields_holds_it(serve):
    server = serve()
    body = b'{"endpoint":"/smuggled"}'
    for fields in (b"Transfer-Encoding: \r\nTransfer-Encoding: chunked\r\n", b"Transfer-Encoding:\r\n"):
        status, error = parse_response(raw_exchange(server.port, raw_post(b"/observer/event", body, fields)))
        assert status == 400 and "Transfer-Encoding" in error["error"], fields  # with Content-Length
    status, _ = parse_response(raw_exchange(server.port, raw_post(b"/observer/event", body, b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n")))
    assert status == 415  # both values count, not just the first
    assert server.store.stats()["total"] == 0


def test_a_request_stalled_past_the_timeout_is_answered_408_and_an_idle_one_just_closed(serve):
    server = serve(request_timeout_s=0.5)
    stalled = {
        "request line": b"GET /observer/sta",
        "headers": b"GET /observer/stats HTTP/1.1\r\nHost: x\r\n",
        "body": b"POST /observer/event HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"endpoint\":",
    }
    for part, data in stalled.items():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(data)
            status, error = parse_response(read_until_closed(sock))
        assert status == 408 and "request_timeout_s=0.5" in error["error"], part
    assert server.store.metrics.rejected.values[("timeout",)] == 3
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as never_spoke:
        assert read_until_closed(never_spoke) == b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as kept_alive:
        kept_alive.sendall(b"GET /observer/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(kept_alive, 1)[0][0] == 200
        assert read_until_closed(kept_alive) == b""  # idle after a request: closed without a word
    assert server.store.stats()["total"] == 0


def test_an_answer_the_client_takes_too_slowly_is_dropped(serve):
    server = serve(request_timeout_s=0.5, ring_size=100)
    client = server.client()
    for i in range(2):
        batch = [{"endpoint": f"/big/{i}/{n}", "pad": "x" * 190_000} for n in range(20)]
        assert client.post("/observer/events", batch)[0] == 200
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", server.port))
        slow.settimeout(10)
        slow.sendall(b"GET /observer/ops?limit=40 HTTP/1.1\r\nHost: x\r\n\r\n")  # about 7.6 MB
        # Take the answer a kilobyte at a time: each send of the server makes progress, but the
        # whole answer would take an hour. The connection must be dropped long before.
        received, dropped, deadline = 0, False, time.monotonic() + 30
        while not dropped and time.monotonic() < deadline:
            try:
                chunk = slow.recv(1024)
            except ConnectionResetError:
                chunk = b""
            received += len(chunk)
            dropped = not chunk or len(server.server.connections) == 0
            time.sleep(0.05)
    assert dropped and received < 7_000_000


def test_head_answers_every_get_route_with_headers_and_no_body(serve):
    server = serve(token="t")
    server.client(token="t").post("/observer/events", [{"endpoint": f"/h{i}"} for i in range(3)])
    auth = b"Authorization: Bearer t\r\n"
    for path in GET_ROUTES:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            # HEAD, then GET: if HEAD sent a body, the GET's status line would not come next.
            sock.sendall(b"HEAD %s HTTP/1.1\r\n%s\r\nGET %s HTTP/1.1\r\n%s\r\n" % (path.encode(), auth, path.encode(), auth))
            stream = sock.makefile("rb")
            status, head = read_head(stream)
            got_status, got = read_head(stream)
            body = stream.read(int(got["content-length"]))
        assert (status, got_status) == (200, 200), path
        assert head["content-type"] == got["content-type"], path
        if path != "/metrics":  # its counters move between the two requests
            assert int(head["content-length"]) == len(body), path
        else:
            assert int(head["content-length"]) > 0
    for path in ("/observer/event", "/observer/events", "/observer/review"):
        status, _, resp = server.client(token="t").request("HEAD", path)
        assert status == 405 and resp.getheader("Allow") == "POST", path


def test_a_body_of_exactly_max_body_bytes_is_accepted_and_one_byte_more_is_413(serve):
    server = serve(max_body_bytes=300)
    client = server.client()
    assert client.post("/observer/event", op_of_size(300))[0] == 200
    status, error, _ = client.post("/observer/event", op_of_size(301))
    assert status == 413 and "max_body_bytes=300" in error["error"]
    gz = {"Content-Encoding": "gzip"}
    assert client.post("/observer/event", gzip.compress(op_of_size(300)), headers=gz)[0] == 200
    status, error, _ = client.post("/observer/event", gzip.compress(op_of_size(301)), headers=gz)
    assert status == 413 and "max_body_bytes=300" in error["error"]
    assert server.store.stats()["total"] == 2


def test_headers_are_capped_at_exactly_100_lines_and_64_kib_each(serve):
    server = serve()

    def get_health(header_lines: bytes) -> int:
        return parse_response(raw_exchange(server.port, b"GET /observer/health HTTP/1.1\r\n" + header_lines + b"\r\n"))[0]

    assert get_health(b"X-H: 1\r\n" * 100) == 200
    assert get_health(b"X-H: 1\r\n" * 101) == 431
    line = b"X-Big: " + b"b" * (65536 - len(b"X-Big: \r\n")) + b"\r\n"  # 64 KiB with its CRLF
    assert get_health(line) == 200
    assert get_health(b"X-Big: b" + line[7:]) == 431


@pytest.mark.parametrize("request_line, status", [
    (b"GET /observer/health HTTP/2.0", 505), (b"GET /observer/health HTTP/0.9", 400),
    (b"BREW /observer/health HTTP/1.1", 501),
])
def test_status_codes_the_readme_lists_for_bad_request_lines(serve, request_line, status):
    server = serve()
    got, error = parse_response(raw_exchange(server.port, request_line + b"\r\nHost: x\r\n\r\n"))
    assert got == status and error["error"]


@pytest.mark.parametrize("case", ERROR_ANSWERS)
def test_each_error_answer_is_counted_under_its_reason(serve, monkeypatch, tmp_path, case):
    settings, request, status, reason, fault = ERROR_ANSWERS[case]
    if settings.get("persist_path") is dev_full:
        settings = {**settings, "persist_path": str(dev_full(tmp_path))}
    server = serve(**settings)
    token = settings.get("token")
    if fault is not None:
        fault(monkeypatch)
    before = rejections(server, token)
    assert parse_response(raw_exchange(server.port, request))[0] == status
    expected = {**before, reason: before[reason] + 1} if reason else before
    assert rejections(server, token) == expected


def test_a_request_cut_off_by_the_timeout_is_counted_as_timeout(serve):
    server = serve(request_timeout_s=0.5)
    before = rejections(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /observer/review HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        assert parse_response(read_until_closed(sock))[0] == 408
    assert rejections(server) == {**before, "timeout": before["timeout"] + 1}


def test_a_connection_refused_at_the_cap_is_counted_and_told_to_retry(serve, monkeypatch):
    server = serve(max_connections=1, request_timeout_s=60)
    before = rejections(server)
    held = FsyncSpy(monkeypatch, held=True)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as in_flight:
        try:
            in_flight.sendall(raw_post(b"/observer/event", b'{"endpoint": "/held"}'))
            wait_for(held.entered.is_set, what="the commit to reach fsync")
            raw = raw_exchange(server.port, b"GET /observer/health HTTP/1.1\r\n\r\n")
        finally:
            held.release()
        assert read_responses(in_flight, 1)[0][0] == 200
    head = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert parse_response(raw) == (503, {"error": "too many connections"})
    assert b"Retry-After: 1" in head and b"Connection: close" in head
    wait_for(lambda: len(server.server.connections) == 0, what="the slot to free up")
    assert rejections(server) == {**before, "too_many_connections": 1}
    # Counted as every answer is, though no thread read its request.
    client = server.client()
    client.conn.request("GET", "/metrics")
    families = parse_exposition(client.conn.getresponse().read().decode())
    assert sample(families, "observerd_http_requests_total", route="unparsed", code="503") == 1


def test_a_malformed_request_target_is_400_not_500(serve):
    server = serve()
    for target in (b"//[", b"http://[::1", b"/observer/ops?x=%zz&limit=[1"):
        status, error = parse_response(raw_exchange(server.port, b"GET " + target + b" HTTP/1.1\r\n\r\n"))
        assert 400 <= status < 500 and "error" in error, target


def test_leading_zeros_and_x_gzip_are_taken_as_the_rfcs_say(serve):
    server = serve(ring_size=50)
    client = server.client()
    assert client.post("/observer/event", {"endpoint": "/a"})[0] == 200
    assert client.get("/observer/ops?limit=" + "0" * 5000 + "1")[1]["count"] == 1
    body = json.dumps({"endpoint": "/zeros"}).encode()
    request = b"POST /observer/event HTTP/1.1\r\nContent-Length: " + b"0" * 5000 + b"%d\r\n\r\n" % len(body)
    assert parse_response(raw_exchange(server.port, request + body))[0] == 200
    status, _, _ = client.post("/observer/event", gzip.compress(b'{"endpoint": "/x-gzip"}'),
                               headers={"Content-Encoding": "x-gzip"})
    assert status == 200
    assert [o["endpoint"] for o in client.get("/observer/ops")[1]["ops"]] == ["/x-gzip", "/zeros", "/a"]


def test_chunked_bodies_are_read_on_every_post_route(serve):
    server = serve()
    op_body = json.dumps({"endpoint": "/chunked", "pad": "x" * 300}).encode()
    assert post_chunked(server.port, b"/observer/event", chunked(op_body, (1, 2, 3, 5, 8, 13, 100)))[0] == 200
    assert post_chunked(server.port, b"/observer/event",
                        chunked(op_body, (64,), extension=b';name="v" ;x', trailers=b"X-Sum: 1\r\nX-T: 2\r\n"))[0] == 200
    batch = b"".join(json.dumps({"endpoint": f"/n{i}"}).encode() + b"\n" for i in range(3))
    status, answer = post_chunked(server.port, b"/observer/events", chunked(gzip.compress(batch), (10,)),
                                  b"Content-Type: application/x-ndjson\r\nContent-Encoding: gzip\r\n")
    assert (status, answer["accepted"]) == (200, 3)
    assert post_chunked(server.port, b"/observer/review", chunked(b'{"endpoint": "/chunked"}'))[1]["ops_considered"] == 2
    # Leading zeros are allowed in a chunk size, however many (RFC 9112 7.1).
    padded = b"%020x\r\n%s\r\n%s\r\n\r\n" % (len(op_body), op_body, b"0" * 20)
    assert post_chunked(server.port, b"/observer/event", padded)[0] == 200
    assert [o["endpoint"] for o in server.store.snapshot()] == ["/chunked", "/chunked", "/n0", "/n1", "/n2",
                                                                 "/chunked"]


@pytest.mark.parametrize("framed, headers, status, needle", [
    (b"zz\r\n{}\r\n0\r\n\r\n", b"", 400, "malformed chunk size"),
    (b"\r\n0\r\n\r\n", b"", 400, "malformed chunk size"),
    (b"2\r\n{}}\r\n0\r\n\r\n", b"", 400, "not followed by CRLF"),
    (b"ffffffffffffffffff\r\n", b"", 413, "max_body_bytes"),
    (b"2\r\n{}\r\n0\r\n\r\n", b"Content-Length: 2\r\n", 400, "must not be sent together"),
    (b"2\r\n{}\r\n0\r\n\r\n", b"Transfer-Encoding: gzip\r\n", 501, "not supported"),
])
def test_malformed_chunked_bodies_are_refused_naming_why(serve, framed, headers, status, needle):
    server = serve()
    got, error = post_chunked(server.port, b"/observer/event", framed, headers)
    assert got == status and needle in error["error"]
    assert server.store.stats()["total"] == 0


def test_a_chunked_body_past_the_cap_is_413_before_the_rest_is_read(serve):
    server = serve(max_body_bytes=1000)
    body = json.dumps({"endpoint": "/big", "pad": "x" * 2000}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        # The chunks past the cap are never sent: the answer must not wait for them.
        sock.sendall(b"POST /observer/event HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunked(body, (600,))[:1300])
        status, error = parse_response(read_until_closed(sock))
    assert status == 413 and "max_body_bytes=1000" in error["error"]
    exact = json.dumps({"endpoint": "/e", "pad": "y" * 950}).encode()
    exact += b" " * (1000 - len(exact))
    assert post_chunked(server.port, b"/observer/event", chunked(exact, (333,)))[0] == 200


def test_while_draining_a_new_connection_never_takes_the_place_of_a_request_in_progress():
    tracker = od.ConnectionTracker(limit=1, request_timeout_s=600)
    in_progress, peer = socket.socketpair()
    newcomer, newcomer_peer = socket.socketpair()
    try:
        assert tracker.admit(in_progress)
        tracker.headers_read(in_progress)  # its body is on the way
        assert tracker.close_idle_and_drain(0) == 1
        assert not tracker.admit(newcomer)  # answered 503 "too many connections" instead
        assert tracker.cut_reason(in_progress) is None
    finally:
        for sock in (in_progress, peer, newcomer, newcomer_peer):
            sock.close()


# -----------------------------------------------------------------------------
# [SECTION] API
# -----------------------------------------------------------------------------

def test_health_stats_and_event_shapes(serve):
    server = serve()
    client = server.client()
    assert client.get("/observer/health")[:2] == (200, {"status": "ok", "service": "observerd", "ring_size": 0})
    status, body, resp = client.post("/observer/event", {"endpoint": "/s", "source": "scenario", "success": True})
    assert (status, body) == (200, {"accepted": True, "ring_size": 1})
    assert resp.getheader("Content-Type") == "application/json"
    status, stats, _ = client.get("/observer/stats")
    assert status == 200
    assert set(stats) == {"total", "successes", "failures", "by_source", "recent_scenario_ops"}
    assert stats["by_source"] == {"scenario": 1}
    assert stats["recent_scenario_ops"][0]["endpoint"] == "/s"
    assert client.get("/observer/health")[1]["ring_size"] == 1


@pytest.mark.parametrize("body, needle", [
    ({"endpoint": ""}, "endpoint"),
    ({"endpoint": "/e", "source": "cron"}, "source"),
    ({"endpoint": "/e", "duration_ms": "fast"}, "duration_ms"),
    ({"endpoint": "/e", "timestamp": "not a time"}, "timestamp"),
    ('{"endpoint": "/e"', "JSON"),
    ("[1, 2]", "object"),
])
def test_bad_op_is_400_naming_the_field_and_changes_nothing(serve, body, needle):
    server = serve()
    client = server.client()
    status, error, _ = client.post("/observer/event", body)
    assert status == 400
    assert needle in error["error"]
    assert client.get("/observer/stats")[1]["total"] == 0
    assert server.config.persist_path.read_bytes() == b""


@pytest.mark.parametrize("path", ["/", "/observer"])
def test_the_root_sends_a_browser_to_the_page_and_lists_the_api_without_a_token(serve, path):
    client = serve(token="tok").client()
    status, body, resp = client.get(path)
    assert (status, resp.getheader("Location")) == (302, "observer/ui")
    assert body["page"] == "/observer/ui"
    assert {"GET /observer/stats", "GET /observer/history", "POST /observer/event", "GET /metrics"} <= set(body["routes"])
    # Relative, so a gateway serving it under a prefix leads to its own page, as a browser resolves it.
    for prefix in ("", "/v1"):
        page = urllib.parse.urlsplit(urllib.parse.urljoin(f"http://gateway{prefix}{path}", "observer/ui")).path
        assert page == f"{prefix}/observer/ui"
    page = http.client.HTTPConnection("127.0.0.1", client.conn.port, timeout=30)
    page.request("GET", urllib.parse.urljoin(path, resp.getheader("Location")))
    answer = page.getresponse()
    assert (answer.status, answer.getheader("Content-Type")) == (200, "text/html; charset=utf-8")
    assert b"<title>" in answer.read()
    page.close()
    assert client.get("/observer/stats")[0] == 401


def test_an_unknown_path_is_404(serve):
    client = serve().client()
    status, body, _ = client.get("/observer/nope")
    assert status == 404 and "error" in body


def test_a_wrong_method_is_405_naming_the_allowed_ones(serve):
    client = serve().client()
    status, body, resp = client.request("DELETE", "/observer/stats")
    assert status == 405 and resp.getheader("Allow") == "GET, HEAD"
    status, body, resp = client.get("/observer/event")
    assert status == 405 and resp.getheader("Allow") == "POST"


def test_auth_token_guards_every_route_but_health(serve):
    server = serve(token="s3cret")
    anonymous = server.client()
    assert anonymous.get("/observer/health")[0] == 200
    for method, path, body in [("GET", "/observer/stats", None), ("POST", "/observer/event", {"endpoint": "/e"})]:
        status, error, resp = anonymous.request(method, path, body)
        assert status == 401 and resp.getheader("WWW-Authenticate").startswith("Bearer")
        assert "s3cret" not in json.dumps(error)
        wrong = server.client(token="s3cres")
        assert wrong.request(method, path, body)[0] == 401
    assert server.client(token="s3cret").post("/observer/event", {"endpoint": "/e"})[0] == 200
    assert server.store.stats()["total"] == 1


def test_the_token_is_compared_in_constant_time(serve, monkeypatch):
    # Spied on, not timed: a plain == leaks the matching prefix's length through timing.
    server = serve(token="s3cret")
    compared = []
    real_compare = od.hmac.compare_digest
    monkeypatch.setattr(od.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real_compare(a, b))
    assert server.client(token="s3cres").get("/observer/stats")[0] == 401
    assert server.client(token="s3cret").get("/observer/stats")[0] == 200
    assert compared == [(b"s3cres", b"s3cret"), (b"s3cret", b"s3cret")]


def test_the_token_never_appears_in_logs_or_error_bodies(tmp_path, daemons):
    secret = "tok-S3CRET-value"
    daemon = start_durable_daemon(daemons, tmp_path, token=secret)
    bodies = []
    for token in (None, "wrong", secret + "x", secret[:-1]):
        client = daemon.client(token=token)
        bodies.append(client.get("/observer/stats")[1])
        bodies.append(client.post("/observer/event", {"endpoint": "/e"})[1])
    good = daemon.client(token=secret)
    bodies.append(good.post("/observer/event", {"endpoint": ""})[1])
    bodies.append(good.get("/observer/nope")[1])
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 0
    assert secret not in json.dumps(bodies)
    assert secret not in daemon.log
    assert "auth=true" in daemon.log


@pytest.mark.parametrize("query, field", [
    ({"source": "cron"}, "source"), ({"last_n": 0}, "last_n"), ({"last_n": True}, "last_n"),
    ({"llm": "yes"}, "llm"), ({"endpoint": 3}, "endpoint"), ({"verbose": True}, "verbose"), ([], "body"),
])
def test_bad_review_requests_are_400_naming_the_field(serve, query, field):
    status, body, _ = serve().client().post("/observer/review", query)
    assert status == 400 and field in body["error"]


def test_review_asks_the_llm_and_falls_back_when_it_fails(serve, fake_service):
    llm = fake_service(reply={"model": "m", "response": "The /x endpoint is failing: check the DB.", "done": True})
    server = serve(review_llm_url=llm.url + "/", review_llm_model="qwen-test")
    server.client().post("/observer/events", failures("/x", 6))
    result = review(server, llm=True)
    assert result["method"] == "heuristic+llm"
    assert result["llm_review"] == "The /x endpoint is failing: check the DB."
    path, sent = llm.received[0]
    assert path == "/api/generate"
    assert (sent["model"], sent["stream"]) == ("qwen-test", False) and "/x" in sent["prompt"]

    broken = fake_service(status=500)
    server = serve(review_llm_url=broken.url)
    server.client().post("/observer/events", failures("/x", 6))
    result = review(server, llm=True)
    assert result["method"] == "heuristic" and "HTTP 500" in result["llm_errors"][0]["error"]
    assert result["reviews"][0]["verdict"] == "failing"

    release = threading.Event()
    hung = fake_service(hold=release)
    server = serve(review_llm_url=hung.url, outbound_timeout_s=0.3)
    try:
        result = review(server, llm=True)
        assert result["method"] == "heuristic" and result["llm_errors"] == [{"backend": "primary", "error": "timed out"}]
    finally:
        release.set()
    assert "configured" in review(serve(), llm=True)["llm_errors"][0]["error"]  # no backend configured


def test_ops_query_filters_newest_first(serve):
    server = serve(ring_size=50)
    client = server.client()
    batch = [{"endpoint": f"/e{i % 3}", "source": "scenario" if i % 2 else "mcp", "success": i % 4 == 0,
              "timestamp": f"2026-11-24T10:00:{i:02d}Z"} for i in range(20)]
    client.post("/observer/events", batch)
    status, body, _ = client.get("/observer/ops")
    assert status == 200 and body["count"] == 20
    assert [o["timestamp"][-3:-1] for o in body["ops"]][:3] == ["19", "18", "17"]
    body = client.get("/observer/ops?source=scenario&endpoint=/e1&limit=2")[1]
    assert [o["timestamp"][-3:-1] for o in body["ops"]] == ["19", "13"] and body["count"] == 2
    body = client.get("/observer/ops?success=true&since=2026-11-24T10:00:08%2B00:00")[1]
    assert [o["timestamp"][-3:-1] for o in body["ops"]] == ["16", "12", "08"]
    assert client.get("/observer/ops?success=false&limit=50")[1]["count"] == 15
    # The history's filters, over the ring: a glob, until, grep and field.
    client.post("/observer/events", [{"endpoint": "/mcp/a", "error": "timed out", "trace_id": "t1"},
                                     {"endpoint": "/mcp/b", "error": "refused", "trace_id": "t2"}])
    endpoints = lambda query: [o["endpoint"] for o in client.get(f"/observer/ops?{query}")[1]["ops"]]
    assert endpoints("endpoint=/mcp/*") == ["/mcp/b", "/mcp/a"]
    assert endpoints("grep=timed%20out") == ["/mcp/a"] and endpoints("field=trace_id%3Dt2") == ["/mcp/b"]
    assert len(endpoints("until=2026-11-24T10:00:01Z&limit=50")) == 2
    assert endpoints("since=1h") == ["/mcp/b", "/mcp/a"]  # only they were stamped by the server, now


@pytest.mark.parametrize("query, param", [
    ("source=cron", "source"), ("success=yes", "success"), ("since=last%20week", "since"),
    ("limit=0", "limit"), ("limit=51", "limit"), ("limit=ten", "limit"), ("color=red", "color"),
    ("limit=1&limit=2", "limit"), ("failed=false", "failed"), ("failed&ok", "ok"),
    ("regex=a", "regex"),
])
def test_bad_ops_query_params_are_400_naming_the_param(serve, query, param):
    status, body, _ = serve(ring_size=50).client().get(f"/observer/ops?{query}")
    assert status == 400 and param in body["error"]


def test_every_route_but_health_and_the_page_needs_the_token(serve):
    server = serve(token="s3cret")
    for token in (None, "s3cres", "S3CRET"):
        client = server.client(token=token)
        assert client.get("/observer/health")[0] == 200
        for method, path, body in GUARDED_ROUTES:
            status, _, resp = client.request(method, path, body)
            assert status == 401 and resp.getheader("WWW-Authenticate").startswith("Bearer"), (token, path)
    assert server.store.stats()["total"] == 0
    assert server.config.persist_path.read_bytes() == b""
    good = server.client(token="s3cret")
    for method, path, body in GUARDED_ROUTES:
        good.conn.request(method, path, body=None if body is None else json.dumps(body),
                          headers={"Authorization": "Bearer s3cret"})
        response = good.conn.getresponse()
        response.read()
        assert response.status == 200, path
    assert server.store.stats()["total"] == 2


def test_the_ops_query_returns_100_by_default(serve):
    server = serve(ring_size=300)
    client = server.client()
    client.post("/observer/events", [{"endpoint": f"/{i}"} for i in range(150)])
    assert client.get("/observer/ops")[1]["count"] == 100
    assert client.get("/observer/ops?limit=300")[1]["count"] == 150


@pytest.mark.parametrize("head, body, status", [
    (b"", b"", 411),
    (b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", 200),  # an empty body: no options
    (b"Content-Length: 0\r\n", b"", 200),
])
def test_review_needs_a_content_length_like_every_route_with_a_body(serve, head, body, status):
    server = serve()
    server.client().post("/observer/event", {"endpoint": "/reviewed"})
    answer = parse_response(raw_exchange(server.port, b"POST /observer/review HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + body))
    assert answer[0] == status
    if status == 200:
        assert answer[1]["ops_considered"] == 1
    else:
        assert "Content-Length required" in answer[1]["error"]


def test_llm_request_counters_exist_from_0(serve):
    assert llm_counts(serve().port) == {("primary", "answered"): 0, ("primary", "failed"): 0,
                                        ("fallback", "answered"): 0, ("fallback", "failed"): 0}


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_the_primary_answers_the_review_in_its_api(serve, backend, api):
    primary, fallback = backend(api, "The /x endpoint is failing: check the DB."), backend("openai")
    server = serve(**chain(primary, fallback, primary_api=api))
    server.client().post("/observer/events", failures("/x", 6))
    result = review(server, llm=True)
    assert (result["method"], result["llm_backend"], result["llm_model"]) == ("heuristic+llm", "primary", "local-test")
    assert result["llm_review"] == "The /x endpoint is failing: check the DB." and result["llm_errors"] == []
    assert result["reviews"][0]["verdict"] == "failing"
    [(path, headers, sent, _)] = primary.requests
    assert path == LLM_PATHS[api] and sent["model"] == "local-test"
    prompt = sent["prompt"] if api == "ollama" else sent["messages"][0]["content"]
    if api == "ollama":
        assert sent["stream"] is False
    else:
        assert [m["role"] for m in sent["messages"]] == ["user"]
    assert "/x" in prompt and "the 1 worst of 1 endpoints" in prompt
    assert "authorization" not in headers  # no key configured, none sent
    assert fallback.requests == []
    assert llm_counts(server.port)[("primary", "answered")] == 1


def test_a_failing_primary_hands_the_review_to_the_fallback(serve, backend):
    primary, fallback = backend("ollama", status=500), backend("openai", "hosted says: roll back")
    server = serve(**chain(primary, fallback))
    server.client().post("/observer/events", failures("/x", 6))
    result = review(server, llm=True)
    assert (result["method"], result["llm_backend"], result["llm_model"]) == ("heuristic+llm", "fallback", "hosted-test")
    assert result["llm_review"] == "hosted says: roll back"
    assert result["llm_errors"] == [{"backend": "primary", "error": "HTTP 500 Internal Server Error"}]
    [(path, _, sent, _)] = fallback.requests
    assert path == "/v1/chat/completions" and sent["model"] == "hosted-test"
    assert sent["messages"] == [{"role": "user", "content": primary.requests[0][2]["prompt"]}]
    counts = llm_counts(server.port)
    assert (counts[("primary", "failed")], counts[("fallback", "answered")]) == (1, 1)


def test_a_slow_primary_is_given_up_at_its_deadline_and_the_fallback_answers(serve, backend):
    # The primary holds the request until teardown: the review can only end by giving it up.
    primary, fallback = backend("ollama", held=True), backend("openai", "hosted says: hi")
    server = serve(**chain(primary, fallback, outbound_timeout_s=2))
    server.client().post("/observer/events", failures("/x", 6))
    result = server.client(timeout=120).post("/observer/review", {"llm": True})[1]
    assert (result["llm_backend"], result["llm_review"]) == ("fallback", "hosted says: hi")
    assert result["llm_errors"] == [{"backend": "primary", "error": "timed out"}]
    assert len(primary.requests) == 1 and not primary.hold.is_set()


def test_when_every_backend_fails_the_review_is_the_heuristic_one_with_both_errors(serve, backend):
    server = serve(**chain(backend("ollama", status=503), no_port_url()))
    server.client().post("/observer/events", failures("/x", 6))
    result = review(server, llm=True)
    assert result["method"] == "heuristic" and result["reviews"][0]["verdict"] == "failing"
    assert not {"llm_review", "llm_backend", "llm_model"} & result.keys()
    [primary, fallback] = result["llm_errors"]
    assert primary == {"backend": "primary", "error": "HTTP 503 Service Unavailable"}
    assert fallback["backend"] == "fallback" and fallback["error"].startswith("unreachable: ")
    counts = llm_counts(server.port)
    assert (counts[("primary", "failed")], counts[("fallback", "failed")]) == (1, 1)


def test_the_prompt_stays_under_its_cap_with_a_ring_of_large_errors(serve, backend):
    primary, fallback = backend("ollama", status=500), backend("openai")
    server = serve(ring_size=1000, **chain(primary, fallback))
    client = server.client(timeout=120)
    for batch in range(4):  # 1000 endpoints of 1 KB names, failing with distinct 4 KB errors
        ops = [{"endpoint": f"/{'e' * 1000}/{batch}/{i}", "error": f"{batch}-{i} " + "boom " * 800}
               for i in range(250)]
        assert client.post("/observer/events", ops)[0] == 200
    result = client.post("/observer/review", {"llm": True})[1]
    assert result["llm_backend"] == "fallback" and len(result["reviews"]) == 1000
    for prompt, body_bytes in [(primary.requests[0][2]["prompt"], primary.requests[0][3]),
                               (fallback.requests[0][2]["messages"][0]["content"], fallback.requests[0][3])]:
        assert len(prompt.encode()) <= od.LLM_PROMPT_MAX_BYTES
        assert body_bytes <= 2 * od.LLM_PROMPT_MAX_BYTES  # even with every quote escaped again
        shown = int(re.search(r"the (\d+) worst of 1000 endpoints", prompt).group(1))
        assert shown >= 1 and prompt.count('"verdict"') == shown
        assert "/" + "e" * (od.LLM_PROMPT_TEXT_CHARS - 1) + "…" in prompt


@pytest.mark.parametrize("api, answer, error", [
    ("ollama", http_answer(HUGE_ANSWER), f"answer is larger than {od.OUTBOUND_MAX_ANSWER_BYTES} bytes"),
    ("ollama", chunked_answer(HUGE_ANSWER), f"answer is larger than {od.OUTBOUND_MAX_ANSWER_BYTES} bytes"),
    ("openai", http_answer(b"<html>502 Bad Gateway</html>"),
     "answer is not valid JSON: Expecting value at line 1 column 1"),
    ("ollama", http_answer(json.dumps(openai_reply("hi")).encode()), "answer has no 'response' text in valid Unicode"),
    ("ollama", http_answer(b'{"response": 42}'), "answer has no 'response' text in valid Unicode"),
    ("ollama", http_answer(b'{"response": "  \\n"}'), "answer has no 'response' text in valid Unicode"),
    ("openai", http_answer(b'{"response": "hi"}'), "answer has no 'choices[0].message.content' text in valid Unicode"),
    ("openai", http_answer(b'{"choices": []}'), "answer has no 'choices[0].message.content' text in valid Unicode"),
    ("openai", http_answer(b'{"choices": "hi"}'), "answer has no 'choices[0].message.content' text in valid Unicode"),
    ("openai", http_answer(b"[1, 2]"), "answer has no 'choices[0].message.content' text in valid Unicode"),
    ("openai", http_answer(b""), "answer has no 'choices[0].message.content' text in valid Unicode"),
    ("ollama", b"garbage\r\n\r\n", "BadStatusLine: garbage"),  # the status line's CRLF is not kept
], ids=["huge", "huge chunked", "not json", "openai shape to ollama", "number", "blank",
        "ollama shape to openai", "no choices", "choices a string", "array", "empty", "bad status"])
def test_a_huge_or_malformed_answer_is_that_backends_error(serve, backend, raw_service, api, answer, error):
    primary, fallback = raw_service(answer), backend("ollama" if api == "openai" else "openai", "fine")
    server = serve(**chain(primary, fallback, primary_api=api,
                           fallback_api="ollama" if api == "openai" else "openai"))
    server.client().post("/observer/events", failures("/x", 6))
    result = server.client(timeout=60).post("/observer/review", {"llm": True})[1]
    assert (result["llm_backend"], result["llm_review"]) == ("fallback", "fine")
    [failed] = result["llm_errors"]
    assert failed["backend"] == "primary" and failed["error"].startswith(error), failed
    assert "\n" not in failed["error"] and "\r" not in failed["error"]


def test_backend_keys_come_from_the_environment_and_show_nowhere(tmp_path, daemons, backend):
    keys = {name: f"{name[:2]}-{os.urandom(16).hex()}" for name in KEY_VARS}
    env = {KEY_VARS[name]: key for name, key in keys.items()}
    # The primary refuses, echoing the key in its reason phrase: the error must not carry it on.
    primary = backend("ollama", status=401, reason=f"invalid key {keys['primary']} for this model")
    fallback, team = backend("openai", "hosted says: hi"), backend(None)
    config = write_settings(tmp_path, {
        "bind": "127.0.0.1:0", "persist_path": "ops.jsonl", "access_log": True, "token": "t0ken",
        "analyze_interval_s": 0.05, "escalate_url": team.url + "/api/run", "escalate_threshold": 1,
        "escalate_token_env": KEY_VARS["escalation"], "review_llm_key_env": KEY_VARS["primary"],
        "review_fallback_key_env": KEY_VARS["fallback"], **chain(primary, fallback)})
    checked = run_cli("check", "--config", str(config), env=env)
    assert checked.returncode == 0, checked.stderr
    for setting, name in [("review_llm_key_env", "primary"), ("review_fallback_key_env", "fallback"),
                          ("escalate_token_env", "escalation")]:
        assert f'{setting} = "{KEY_VARS[name]}"  # {KEY_VARS[name]} is set' in checked.stdout
    daemon = daemons(tmp_path, config=config, env=env).wait_listening()
    client = daemon.client(token="t0ken")
    client.post("/observer/events", failures("/x", 6))
    result = client.post("/observer/review", {"llm": True})[1]
    assert (result["llm_backend"], result["llm_review"]) == ("fallback", "hosted says: hi")
    assert result["llm_errors"] == [{"backend": "primary", "error": "HTTP 401 invalid key (key) for this model"}]
    assert primary.requests[0][1]["authorization"] == f"Bearer {keys['primary']}"
    assert fallback.requests[0][1]["authorization"] == f"Bearer {keys['fallback']}"
    wait_for(lambda: team.requests, what="the escalation")
    assert team.requests[0][1]["authorization"] == f"Bearer {keys['escalation']}"
    escalations = wait_for(lambda: client.get("/observer/escalations")[1]["escalations"], what="it listed")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 0
    assert 'msg="llm review failed" backend=primary' in daemon.log and "msg=request" in daemon.log
    shown = json.dumps([result, escalations]) + checked.stdout + checked.stderr + daemon.log + config.read_text()
    for key in keys.values():
        assert key not in shown


def test_a_key_straddling_the_cut_of_an_outbound_error_is_redacted_before_the_cut():
    key = "sk-" + "k" * 40
    # The reason phrase puts the key across OUTBOUND_ERROR_CHARS: cut first, its head would stay.
    prefix = "HTTP 401 "
    reason = "x" * (od.OUTBOUND_ERROR_CHARS - len(prefix) - 10) + " " + key + " rejected"
    service = FakeService(status=401, reason=reason)
    try:
        with pytest.raises(od.OutboundError) as raised:
            od.call_json(service.url + "/api/generate", 10, {"prompt": "p"}, key=key)
    finally:
        service.close()
    message = str(raised.value)
    assert len(message) <= od.OUTBOUND_ERROR_CHARS and "sk-" not in message and "(key)" in message


def test_the_escalation_carries_its_token_from_the_environment(tmp_path, backend):
    team = backend(None)
    config = od.load_config(str(write_settings(tmp_path, {
        "bind": "127.0.0.1:0", "persist_path": "ops.jsonl", "analyze_interval_s": 0.05,
        "escalate_url": team.url + "/api/run", "escalate_threshold": 1, "escalate_token_env": "TEAM_TOKEN"})),
        environ={"TEAM_TOKEN": "team-s3cret"})
    server = InProcessServer(config)
    try:
        server.client().post("/observer/event", {"endpoint": "/x", "error": "boom"})
        wait_for(lambda: team.requests, what="the escalation")
        path, headers, sent, _ = team.requests[0]
        assert (path, headers["authorization"], sent["mode"]) == ("/api/run", "Bearer team-s3cret", "code_review")
    finally:
        server.close()


def test_the_llm_settings_are_checked_at_startup(tmp_path, daemons):
    printed = check_and_serve_refuse(tmp_path, {
        "escalate_token_env": "1TOKEN", "review_llm_api": "gpt", "review_llm_key_env": "sk-live-abc123",
        "review_fallback_url": "ftp://models.example", "review_fallback_api": ""}, daemons)
    env_name = "must be the name of an environment variable (letters, digits and _, not starting with a digit)"
    assert printed == [
        f"[observerd] escalate_token_env {env_name}",
        "[observerd] review_llm_api must be one of ollama, openai, got 'gpt'",
        f"[observerd] review_llm_key_env {env_name}",
        "[observerd] review_fallback_url must be an http:// or https:// URL",
        "[observerd] review_fallback_api must be one of ollama, openai, got ''",
        "[observerd] review_fallback_model must be set when review_fallback_url is",
    ]


def test_a_key_variable_that_is_unset_warns_and_one_no_header_can_carry_stops_startup(tmp_path, daemons):
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl",
                                     "review_fallback_key_env": "OBSERVERD_TEST_UNSET_KEY"})
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    warning = ("[observerd] review_fallback_key_env names OBSERVERD_TEST_UNSET_KEY, which is not set: "
               "calls go without a key")
    assert f"warning: {warning}" in checked.stderr
    assert ('review_fallback_key_env = "OBSERVERD_TEST_UNSET_KEY"  # OBSERVERD_TEST_UNSET_KEY is not set'
            in checked.stdout)
    daemon = daemons(tmp_path, config=config).wait_listening()
    assert any("level=WARN" in line and warning in line for line in daemon.log.splitlines())
    daemon.stop()

    env = {"OBSERVERD_TEST_UNSET_KEY": "sk-one\nsk-two"}
    checked = run_cli("check", "--config", str(config), env=env)
    problem = ("[observerd] review_fallback_key_env: OBSERVERD_TEST_UNSET_KEY must hold printable ASCII "
               "without leading or trailing spaces")
    assert checked.returncode == 2 and problem in checked.stderr
    refused = daemons(tmp_path, config=config, env=env)
    assert refused.exit_status() == 2 and problem in refused.log
    assert "sk-one" not in checked.stderr + checked.stdout + refused.log


def test_timeline_counts_known_traffic_by_source_and_second(serve):
    server = serve(ring_size=50)
    client = server.client()
    assert client.post("/observer/events", known_traffic())[0] == 200
    timeline = timeline_once_whole(client, 10)
    assert set(timeline) == TIMELINE_KEYS
    assert (timeline["service"], timeline["version"], timeline["ready"], timeline["seconds"]) == (
        "observerd", od.VERSION, True, 60)
    assert 0 <= timeline["uptime_s"] < 3600
    now = od.parse_rfc3339(timeline["now"])
    assert timeline["now"].endswith("Z") and now.timestamp() <= time.time() - 1
    # One second holds them all: the arrival second, whichever of the 60 it is.
    [second] = [i for i, n in enumerate(timeline["totals"]["ok"]) if n]
    assert timeline["sources"] == {
        "langfuse": {"ok": [0] * 60, "failed": [1 if i == second else 0 for i in range(60)]},
        "mcp": {"ok": [3 if i == second else 0 for i in range(60)], "failed": [2 if i == second else 0 for i in range(60)]},
        "scenario": {"ok": [4 if i == second else 0 for i in range(60)], "failed": [0] * 60},
    }
    assert timeline["totals"] == {"ok": [7 if i == second else 0 for i in range(60)],
                                  "failed": [3 if i == second else 0 for i in range(60)]}
    assert timeline["ring"] == {"ops": 10, "capacity": 50, "bytes": server.store.ring.bytes}
    assert timeline["journal"] == {"path": str(server.config.persist_path),
                                   "bytes": server.config.persist_path.stat().st_size}
    assert timeline["fsync_p99_ms"] > 0
    assert timeline["endpoints"] == [
        {"endpoint": "/mcp/search", "ops": 5, "failures": 2, "failure_rate": 0.4, "p50_ms": 10, "p95_ms": 30},
        {"endpoint": "/langfuse/trace", "ops": 1, "failures": 1, "failure_rate": 1.0, "p50_ms": 5, "p95_ms": 5},
        {"endpoint": "/scenario/checkout", "ops": 4, "failures": 0, "failure_rate": 0.0, "p50_ms": 100,
         "p95_ms": 100},
    ]
    short = client.get("/observer/timeline?seconds=5")[1]
    assert short["seconds"] == 5 and all(len(row) == 5 for row in short["totals"].values())
    assert len(client.get("/observer/timeline?seconds=300")[1]["totals"]["ok"]) == 300


def test_timeline_of_an_ephemeral_daemon_has_no_journal_and_no_fsync(serve):
    server = serve(persist_path="")
    assert server.client().post("/observer/event", {"endpoint": "/e"})[0] == 200
    timeline = timeline_once_whole(server.client(), 1)
    assert (timeline["journal"], timeline["fsync_p99_ms"]) == (None, None)
    assert list(timeline["sources"]) == ["mcp"] and sum(timeline["sources"]["mcp"]["failed"]) == 1


def test_timeline_carries_the_first_clusters_and_the_newest_escalations(serve, fake_service):
    target = fake_service()
    server = serve(analyze_interval_s=0.05, escalate_url=target.url, escalate_threshold=1)
    client = server.client()
    client.post("/observer/events", [{"endpoint": f"/failing/{n}", "error": "boom"} for n in range(12)]
                + [{"endpoint": "/failing/0", "error": "boom"}])
    wait_for(lambda: len(client.get("/observer/escalations")[1]["escalations"]) == 12, what="12 escalations")
    timeline = client.get("/observer/timeline")[1]
    clusters = client.get("/observer/errors")[1]["clusters"]
    assert len(clusters) == 12 and timeline["clusters"] == clusters[:10]
    assert timeline["clusters"][0]["endpoint"] == "/failing/0"
    assert timeline["escalations"] == client.get("/observer/escalations")[1]["escalations"][:10]


def test_timeline_ranks_endpoints_over_a_window_or_the_ring_and_dates_the_clusters(serve):
    server = serve(analyze_interval_s=0.05)
    client = server.client()
    now = time.time()
    client.post("/observer/events", [history_op(i, 3600, now, endpoint="/old", success=False) for i in range(3)]
                + [history_op(10 + i, 10, now, endpoint="/new") for i in range(2)])
    recent = client.get("/observer/timeline")[1]
    assert [e["endpoint"] for e in recent["endpoints"]] == ["/new"]
    assert recent["endpoints_window"] == "5m"
    assert 295 <= now - od.parse_rfc3339(recent["endpoints_since"]).timestamp() <= 310
    ring = client.get("/observer/timeline?window=ring")[1]
    assert [e["endpoint"] for e in ring["endpoints"]] == ["/old", "/new"] and ring["endpoints_since"] is None
    assert len(client.get("/observer/timeline?window=2h")[1]["endpoints"]) == 2
    wait_for(lambda: client.get("/observer/timeline")[1]["clusters"], what="an analysis")
    analysed_at = client.get("/observer/timeline")[1]["clusters_analyzed_at"]
    assert abs(od.parse_rfc3339(analysed_at).timestamp() - time.time()) < 600
    # top says which window it ranks over, and when the clusters were found.
    url = f"http://127.0.0.1:{server.port}"
    top = run_cli("top", "--once", "--url", url)
    assert "ENDPOINTS OF THE LAST 5m (since " in top.stdout and "/old" not in top.stdout.split("FAILURE")[0]
    assert "FAILURE CLUSTERS, largest first, as analysed at " in top.stdout
    spelled = run_cli("top", "--once", "--url", url, "--window", "1h 30min")  # sent URL-encoded
    assert spelled.returncode == 0 and "ENDPOINTS OF THE LAST 1h 30min" in spelled.stdout, spelled.stderr
    whole = run_cli("top", "--once", "--url", url, "--window", "ring")
    assert "ENDPOINTS IN THE RING" in whole.stdout and "/old" in whole.stdout.split("FAILURE")[0]
    bad = run_cli("top", "--once", "--url", url, "--window", "5 parsecs")
    assert bad.returncode == 2 and "--window: '5 parsecs' must be a span like 90s, 5m, 1h, or ring" in bad.stderr


@pytest.mark.parametrize("query, param", [
    ("seconds=0", "seconds"), ("seconds=301", "seconds"), ("seconds=abc", "seconds"), ("seconds=", "seconds"),
    ("seconds=-1", "seconds"), ("seconds=1e2", "seconds"), ("seconds=99999999999999999999999", "seconds"),
    ("seconds=1&seconds=2", "seconds"), ("second=5", "second"), ("seconds=5&limit=1", "limit"),
    ("window=5", "window"), ("window=all", "window"), ("window=ring&window=5m", "window"),
])
def test_a_bad_timeline_query_is_400_naming_the_param(serve, query, param):
    status, body, _ = serve().client().get(f"/observer/timeline?{query}")
    assert status == 400 and body["error"].startswith(f"invalid query: {param} ")


@pytest.mark.parametrize("answer", [
    {"service": "observerd"},  # an observerd of another version
    {"service": "observerd", "version": "9", "uptime_s": "soon", "seconds": 60},
    [1, 2, 3],  # another service
])
def test_top_says_when_the_answer_is_not_a_timeline_it_can_show(answer):
    class Handler(od.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = od.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=other.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        result = run_cli("top", "--once", "--url", url)
    finally:
        other.shutdown()
        other.server_close()
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"observerd.py top: {url}: the answer is not a timeline this top can show\n"


def test_ready_is_200_when_a_write_would_be_accepted_ephemeral_too(serve):
    for server in (serve(), serve(persist_path="")):
        client = server.client()
        status, body, resp = client.get("/observer/ready")
        assert (status, body, resp.getheader("Retry-After")) == (200, {"ready": True}, None)
        assert client.request("HEAD", "/observer/ready")[:2] == (200, None)


def test_a_failed_commit_makes_observerd_unready_and_the_next_good_commit_ready(serve, monkeypatch):
    server = serve()
    FsyncSpy(monkeypatch, fail_calls={1})  # a real EIO from the disk, as fsync reports it
    client = server.client()
    assert client.post("/observer/event", {"endpoint": "/lost"})[0] == 503
    status, body, resp = client.get("/observer/ready")
    assert (status, body["ready"], resp.getheader("Retry-After")) == (503, False, "1")
    assert body["reason"] == f"journal cannot be written: Input/output error ({server.config.persist_path})"
    assert client.get("/observer/health")[0] == 200
    assert client.post("/observer/event", {"endpoint": "/kept"})[0] == 200  # writes are still tried
    assert client.get("/observer/ready")[:2] == (200, {"ready": True})


# -----------------------------------------------------------------------------
# [SECTION] Background loops
# -----------------------------------------------------------------------------

def test_playbooks_consolidate_scenarios_and_are_written_atomically(serve, tmp_path):
    playbooks_path = tmp_path / "shared" / "playbooks.json"
    playbooks_path.parent.mkdir()
    server = serve(consolidate_interval_s=0.05, playbooks_path=str(playbooks_path))
    durations = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    batch = [{"endpoint": "/checkout", "source": "scenario", "duration_ms": d, "success": d <= 700,
              "error": "" if d <= 700 else f"HTTP 502 from upstream {d}",
              "timestamp": f"2026-11-24T10:00:{i:02d}Z"} for i, d in enumerate(durations)]
    batch.append({"endpoint": "/checkout", "source": "mcp", "duration_ms": 99999})
    assert server.client().post("/observer/events", batch)[0] == 200
    got = wait_for(lambda: (p := server.client().get("/observer/playbooks")[1])["playbooks"] and p,
                   what="consolidation")
    assert got["playbooks"] == [{
        "endpoint": "/checkout", "runs": 10, "successes": 7, "success_rate": 0.7,
        "p50_duration_ms": 500, "p95_duration_ms": 1000,
        "last_success": "2026-11-24T10:00:06Z", "last_failure": "2026-11-24T10:00:09Z",
        "top_error_signature": "http <n> from upstream <n>",
    }]
    written = wait_for(lambda: playbooks_path.exists() and json.loads(playbooks_path.read_text()),
                       what="playbooks file")
    assert written["playbooks"] == got["playbooks"]
    assert [p.name for p in playbooks_path.parent.iterdir()] == ["playbooks.json"]


@pytest.mark.parametrize("write", ["playbooks", "corrections position"])
def test_a_replaced_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch, serve, write):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(b))) or real_replace(a, b))
    if write == "playbooks":
        path = tmp_path / "playbooks.json"
        server = serve(consolidate_interval_s=0.05, playbooks_path=str(path))
        assert server.client().post("/observer/event", {"endpoint": "/checkout", "source": "scenario"})[0] == 200
        wait_for(path.exists, what="playbooks written")
    else:
        corrections = tmp_path / "corrections.jsonl"
        corrections.write_bytes(od.encode_line(op("/fix", source=od.CORRECTION_SOURCE)))
        tailer, store = make_tailer(tmp_path, corrections)
        tailer.poll()
        store.close()
        path = tailer.sidecar
    names = {str(od.scratch_path(path)), str(path), str(tmp_path)}
    mine = [event for event in list(events) if event[1] in names]
    renamed = mine.index(("rename", str(path)))
    assert mine[renamed - 1:renamed + 2] == [("fsync", str(od.scratch_path(path))), ("rename", str(path)),
                                             ("fsync", str(tmp_path))]


def test_corrections_appended_in_pieces_are_recorded_once(tmp_path, capsys):
    corrections = tmp_path / "corrections.jsonl"
    tailer, store = make_tailer(tmp_path, corrections)
    assert tailer.poll() == 0  # a missing file is not an error
    corrections.write_bytes(correction(1) + correction(2) + correction(3)[:10])
    assert tailer.poll() == 2
    assert tailer.poll() == 0  # the partial third line waits
    append_to(corrections, correction(3)[10:] + b"not json\n" + b'{"source": "mcp"}\n' + correction(4))
    assert tailer.poll() == 2
    assert endpoints(store) == ["/fix/1", "/fix/2", "/fix/3", "/fix/4"]
    assert {o["source"] for o in store.snapshot()} == {"overseer_correction"}
    err = capsys.readouterr().err
    assert "skipped invalid corrections line" in err and "line=4" in err and "line=5" in err
    stored = replay_forward(tmp_path / "ops.jsonl")
    assert [o["endpoint"] for o in stored] == endpoints(store)
    store.close()


def test_corrections_resume_after_restart_without_skips_or_repeats(tmp_path):
    corrections = tmp_path / "corrections.jsonl"
    corrections.write_bytes(correction(1) + correction(2))
    tailer, store = make_tailer(tmp_path, corrections)
    assert tailer.poll() == 2
    store.close()
    append_to(corrections, correction(3))
    tailer, store = make_tailer(tmp_path, corrections)  # a restart
    assert tailer.poll() == 1
    assert endpoints(store) == ["/fix/1", "/fix/2", "/fix/3"]
    store.close()


def test_a_crash_before_the_position_is_saved_repeats_nothing(tmp_path):
    corrections = tmp_path / "corrections.jsonl"
    corrections.write_bytes(correction(1))
    tailer, store = make_tailer(tmp_path, corrections)
    assert tailer.poll() == 1
    saved = tailer.sidecar.read_bytes()
    append_to(corrections, correction(2))
    assert tailer.poll() == 1
    store.close()
    tailer.sidecar.write_bytes(saved)  # as if the process died before saving the new position
    tailer, store = make_tailer(tmp_path, corrections)
    assert tailer.poll() == 0
    assert endpoints(store) == ["/fix/1", "/fix/2"]
    store.close()


def test_a_truncated_or_replaced_corrections_file_is_read_from_its_start(tmp_path):
    corrections = tmp_path / "corrections.jsonl"
    corrections.write_bytes(correction(1) + correction(2))
    tailer, store = make_tailer(tmp_path, corrections)
    assert tailer.poll() == 2
    corrections.write_bytes(correction(3))  # truncated in place: shorter than our offset
    assert tailer.poll() == 1
    replacement = tmp_path / "corrections.new"
    replacement.write_bytes(correction(4) + correction(5) + correction(6))
    os.replace(replacement, corrections)  # a new inode, even though it is longer
    assert tailer.poll() == 3
    assert endpoints(store) == ["/fix/1", "/fix/2", "/fix/3", "/fix/4", "/fix/5", "/fix/6"]
    store.close()


def test_a_replaced_corrections_file_is_read_to_its_end_before_the_new_one(tmp_path):
    corrections = tmp_path / "corrections.jsonl"
    corrections.write_bytes(correction(1))
    tailer, store = make_tailer(tmp_path, corrections)
    assert tailer.poll() == 1
    append_to(corrections, correction(2))  # written just before logrotate moved the file
    os.replace(corrections, tmp_path / "corrections.jsonl.1")
    corrections.write_bytes(correction(3))
    assert tailer.poll() == 2
    assert endpoints(store) == ["/fix/1", "/fix/2", "/fix/3"]
    tailer.close()
    store.close()


def test_the_daemon_tails_corrections_into_its_stats(tmp_path, daemons):
    corrections = tmp_path / "overseer.jsonl"
    daemon = start_durable_daemon(daemons, tmp_path, corrections_path="overseer.jsonl",
                                  corrections_interval_s=0.05)
    corrections.write_bytes(correction(1) + correction(2))
    stats = wait_for(lambda: (s := daemon.client().get("/observer/stats")[1])["total"] == 2 and s,
                     what="corrections to be recorded")
    assert stats["by_source"] == {"overseer_correction": 2}


def test_a_cluster_over_the_threshold_is_escalated_once_per_cooldown(serve, fake_service):
    team = fake_service()
    server = serve(analyze_interval_s=0.05, escalate_url=team.url + "/api/run", escalate_threshold=3,
                   escalate_window_s=600, escalate_cooldown_s=3600)
    client = server.client()
    client.post("/observer/events", failures("/pay", 2) + failures("/other", 1))
    wait_for_analyses(client)  # under the threshold nothing may be sent
    assert team.received == []
    client.post("/observer/events", failures("/pay", 2))
    wait_for(lambda: team.received, what="the escalation")
    path, payload = team.received[0]
    assert path == "/api/run"
    assert (payload["mode"], payload["source"]) == ("code_review", "observerd")
    assert payload["cluster"]["endpoint"] == "/pay" and payload["cluster"]["count"] == 4
    assert payload["cluster"]["signature"] == "upstream <n> for job <n>"
    assert len(payload["recent_failures"]) == 4
    client.post("/observer/events", failures("/pay", 5))
    wait_for_analyses(client)
    assert len(team.received) == 1, "escalated again inside the cooldown"
    escalations = client.get("/observer/escalations")[1]["escalations"]
    assert [(e["endpoint"], e["outcome"]) for e in escalations] == [("/pay", "sent")]


def test_escalation_repeats_after_the_cooldown_and_ignores_old_failures(serve, fake_service):
    team = fake_service()
    server = serve(analyze_interval_s=0.05, escalate_url=team.url, escalate_threshold=2,
                   escalate_window_s=60, escalate_cooldown_s=0.3)
    old = [{**f, "timestamp": "2020-01-01T00:00:00Z"} for f in failures("/old", 5)]
    server.client().post("/observer/events", old + failures("/new", 2))
    wait_for(lambda: len(team.received) >= 2, what="a second escalation after the cooldown")
    assert {p["cluster"]["endpoint"] for _, p in team.received} == {"/new"}


def test_a_down_or_slow_escalation_target_never_slows_ingest(serve, fake_service):
    down = serve(analyze_interval_s=0.05, escalate_url=closed_port_url(), escalate_threshold=1)
    down.client().post("/observer/event", {"endpoint": "/x", "error": "boom"})
    attempt = wait_for(lambda: down.client().get("/observer/escalations")[1]["escalations"],
                       what="a failed attempt")[0]
    assert attempt["outcome"] == "failed" and "unreachable" in attempt["error"]

    release = threading.Event()
    slow_team = fake_service(hold=release)
    slow = serve(analyze_interval_s=0.05, escalate_url=slow_team.url, escalate_threshold=1,
                 outbound_timeout_s=30)
    try:
        client = slow.client()
        client.post("/observer/event", {"endpoint": "/y", "error": "boom"})
        wait_for(lambda: slow_team.received, what="the escalation to be in flight")
        for i in range(50):  # the loop thread is stuck on the slow target meanwhile
            assert client.post("/observer/event", {"endpoint": f"/ok{i}", "success": True})[0] == 200
        assert slow.store.stats()["total"] == 51
        assert not release.is_set()
    finally:
        release.set()


def test_corrections_are_not_failures_clusters_or_escalations(serve, fake_service, tmp_path):
    team = fake_service()
    corrections = tmp_path / "overseer.jsonl"
    server = serve(analyze_interval_s=0.05, corrections_path=str(corrections), corrections_interval_s=0.05,
                   escalate_url=team.url, escalate_threshold=1)
    client = server.client()
    corrections.write_bytes(b"".join(json.dumps({"endpoint": f"/fix/{n}"}).encode() + b"\n" for n in range(3)))
    posted = [{"endpoint": "/fix/posted", "source": "overseer_correction"},
              {"endpoint": "/fix/failed", "source": "overseer_correction", "success": False, "error": "patch rejected"}]
    assert client.post("/observer/events", posted)[0] == 200
    wait_for(lambda: client.get("/observer/stats")[1]["total"] == 5, what="the corrections to be recorded")
    assert client.post("/observer/event", {"endpoint": "/real", "error": "boom"})[0] == 200
    wait_for(lambda: team.received, what="the real failure to be escalated")
    wait_for_analyses(client)
    stats = client.get("/observer/stats")[1]
    assert (stats["total"], stats["successes"], stats["failures"]) == (6, 4, 2)  # /fix/failed and /real
    clusters = client.get("/observer/errors")[1]["clusters"]
    assert [(c["endpoint"], c["signature"]) for c in clusters] == [("/real", "boom")]
    assert [p["cluster"]["endpoint"] for _, p in team.received] == ["/real"]


@pytest.mark.parametrize("forgery", ["malformed refs", "ref skipping a line", "ref past the end",
                                     "sidecar of the wrong shape"])
def test_forged_correction_refs_are_refused_and_never_move_the_tailer(tmp_path, daemons, forgery):
    corrections, sidecar = tmp_path / "overseer.jsonl", tmp_path / "ops.jsonl.corrections-position"
    corrections.write_bytes(correction(1))
    daemon = start_durable_daemon(daemons, tmp_path, corrections_path="overseer.jsonl",
                                  corrections_interval_s=0.05)
    client = daemon.client()
    wait_for(lambda: client.get("/observer/stats")[1]["total"] == 1, what="correction 1")
    after_first = wait_for(lambda: sidecar.exists() and sidecar.read_bytes(), what="the position file")
    append_to(corrections, correction(2))
    wait_for(lambda: client.get("/observer/stats")[1]["total"] == 2, what="correction 2")
    inode = corrections.stat().st_ino

    # A client may not set the tailer's position, in any shape.
    for ref in [{"inode": None, "offset": "x"}, {}, "x", {"inode": inode, "offset": 10**6, "line": 9}]:
        forged = {"endpoint": "/forged", "source": "overseer_correction", "correction_ref": ref}
        for path, body in [("/observer/event", forged), ("/observer/events", [{"endpoint": "/ok"}, forged])]:
            status, answer, _ = client.post(path, body)
            assert status == 400 and "correction_ref" in answer["error"] and "reserved" in answer["error"]
    assert client.get("/observer/stats")[1]["total"] == 2
    daemon.stop()

    # A journal written before that rule can still hold forged refs; and the process died
    # before it saved the position after correction 2, so the log must repair it.
    sidecar.write_bytes(after_first)
    size_with_third = corrections.stat().st_size + len(correction(3))
    refs = {
        "malformed refs": [{"inode": inode, "offset": 10**400, "line": -1}, [inode, 1, 1], "x", None,
                           {"inode": inode, "offset": True, "line": True}, {"inode": inode, "offset": 10**6},
                           {"inode": None, "offset": "x"}, {"inode": inode, "offset": "x"}],
        "ref skipping a line": [{"inode": inode, "offset": size_with_third, "line": 3}],
        "ref past the end": [{"inode": inode, "offset": 10**9, "line": 99}],
        "sidecar of the wrong shape": [],
    }[forgery]
    if forgery == "sidecar of the wrong shape":
        sidecar.write_text(json.dumps({"inode": None, "offset": "x", "line": [1]}))
    with open(tmp_path / "ops.jsonl", "a") as journal:
        for ref in refs:
            journal.write(json.dumps({"endpoint": "/forged", "source": "overseer_correction", "success": True,
                                      "correction_ref": ref}) + "\n")
    append_to(corrections, correction(3))

    daemon = daemons(tmp_path, config=tmp_path / "lakehouse.toml").wait_listening()

    def recorded(endpoint):
        assert daemon.proc.poll() is None, f"daemon exited {daemon.proc.returncode}:\n{daemon.log}"
        return endpoint in journal_corrections(tmp_path)

    wait_for(lambda: recorded("/fix/3"), timeout=10, what="correction 3 (not skipped)")
    append_to(corrections, correction(4))
    wait_for(lambda: recorded("/fix/4"), timeout=10, what="correction 4")
    assert journal_corrections(tmp_path) == ["/fix/1", "/fix/2", "/fix/3", "/fix/4"]
    assert "background task failed" not in daemon.log
    if refs:
        assert "ignored correction refs" in daemon.log


def test_escalation_retry_delay_doubles_per_failure_up_to_the_cooldown():
    assert [od.escalation_retry_delay(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert od.escalation_retry_delay(10**6, 30.0, 1800.0) == 1800.0  # a target down for ever
    assert od.escalation_retry_delay(3, 30.0, 0.0) == 0.0  # no cooldown: every analysis


def test_a_failing_escalation_target_is_retried_with_backoff_not_at_every_analysis(serve, fake_service):
    down = fake_service(status=503)
    server = serve(analyze_interval_s=0.05, escalate_url=down.url, escalate_threshold=1,
                   escalate_cooldown_s=3600)
    client = server.client()
    client.post("/observer/event", {"endpoint": "/x", "error": "boom"})
    analyses = set()

    def analysed(count):
        analyses.add(client.get("/observer/errors")[1]["analyzed_at"])
        return len(analyses) > count

    wait_for(lambda: analysed(40), timeout=120, what="40 analyses")
    attempts = len(down.received)
    # Every analysis would be 40 attempts; doubling from 0.05 s, 20 would take hours.
    assert 1 <= attempts < 20, attempts
    escalations = client.get("/observer/escalations")[1]["escalations"]
    assert len(escalations) >= attempts and {e["outcome"] for e in escalations} == {"failed"}
    assert all("HTTP 503" in e["error"] for e in escalations)
    assert [e["at"] for e in escalations] == sorted((e["at"] for e in escalations), reverse=True)


def test_the_daemons_corrections_tailer_skips_unstorable_lines_and_goes_on(tmp_path, daemons):
    corrections = tmp_path / "overseer.jsonl"
    corrections.write_bytes(
        correction(1)
        + b'{"endpoint": "/fix/lone\\ud800"}\n'
        + f'{{"endpoint": "/fix/deep", "x": {nested(980)}}}\n'.encode()
        + correction(2))
    daemon = start_durable_daemon(daemons, tmp_path, corrections_path="overseer.jsonl",
                                  corrections_interval_s=0.05)
    wait_for(lambda: daemon.client().get("/observer/stats")[1]["total"] == 2, timeout=10,
             what="the lines around the bad ones to be recorded")
    append_to(corrections, correction(3))
    wait_for(lambda: daemon.client().get("/observer/stats")[1]["total"] == 3, timeout=10,
             what="a line appended after the bad ones to be recorded")
    ops = daemon.client().get("/observer/ops")[1]["ops"]
    assert [o["endpoint"] for o in ops] == ["/fix/3", "/fix/2", "/fix/1"]
    warnings = [ln for ln in daemon.log.splitlines() if "skipped invalid corrections line" in ln]
    assert len(warnings) == 2 and "line=2" in warnings[0] and "line=3" in warnings[1]
    assert "background task failed" not in daemon.log


def test_a_target_that_fails_ends_the_round_instead_of_holding_the_loop(tmp_path, fake_service):
    down = fake_service(status=503)
    config = make_config(tmp_path, escalate_url=down.url, escalate_threshold=1, escalate_cooldown_s=3600)
    escalator = od.Escalator(config, od.Insights(), od.Metrics())
    groups = od.group_failures([od.RingOp(op(f"/{i}", error="boom")) for i in range(5)])
    escalator.check(groups)
    assert len(down.received) == 1  # not five: each would cost up to outbound_timeout_s
    escalator.check(groups)
    assert len(down.received) == 2  # the next analysis tries a cluster not yet held back


def test_a_corrections_backlog_is_stored_in_chunks_no_bigger_than_a_post(serve, tmp_path):
    corrections = tmp_path / "overseer.jsonl"
    server = serve(corrections_path=str(corrections), corrections_interval_s=0.05, max_batch=50,
                   max_body_bytes=8192, ring_size=10)
    commits = record_commits(server)
    lines = [padded_correction(n, 300) for n in range(3000)]  # ~1 MB
    backlog = b"".join(lines)
    sidecar = od.corrections_position_path(server.config.persist_path)
    tracemalloc.start()
    try:
        corrections.write_bytes(backlog)
        wait_for(lambda: position_line(sidecar) == len(lines), timeout=300, what="the backlog to be recorded")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024, f"tailing a 1 MB backlog peaked at {peak} bytes"
    sizes = commits
    assert sum(sizes) == len(lines) and max(sizes) <= 50
    # A commit holds at most max_body_bytes of corrections lines.
    assert all(sum(len(lines[n]) for n in range(first, first + size)) <= 8192
               for first, size in zip(itertools.accumulate([0] + sizes), sizes))
    assert [o["endpoint"] for o in replay_forward(server.config.persist_path)] == [
        f"/fix/{n}" for n in range(len(lines))]


def test_a_corrections_line_longer_than_max_body_bytes_is_skipped_unread(serve, tmp_path, capsys):
    corrections = tmp_path / "overseer.jsonl"
    server = serve(corrections_path=str(corrections), corrections_interval_s=0.05, max_body_bytes=4096)
    sidecar = od.corrections_position_path(server.config.persist_path)
    huge = padded_correction(2, 2 * 1024 * 1024)
    written, rest = padded_correction(1, 10) + huge[:1024 * 1024], huge[1024 * 1024:] + padded_correction(3, 10)
    tracemalloc.start()
    try:
        corrections.write_bytes(written)  # the long line is still being written
        wait_for(lambda: endpoints(server.store) == ["/fix/1"], what="the first correction")
        append_to(corrections, rest)
        wait_for(lambda: endpoints(server.store) == ["/fix/1", "/fix/3"], what="the line after it")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024, f"skipping a 2 MB line peaked at {peak} bytes"
    wait_for(lambda: position_line(sidecar) == 3, what="the position past line 3")
    err = capsys.readouterr().err
    assert "skipped invalid corrections line" in err and "line=2" in err
    assert "longer than max_body_bytes=4096" in err


def test_a_lost_corrections_position_is_repaired_reading_the_file_in_blocks(serve, tmp_path):
    corrections = tmp_path / "overseer.jsonl"
    journal = tmp_path / "ops.jsonl"
    settings = dict(persist_path=str(journal), corrections_path=str(corrections),
                    corrections_interval_s=0.05, ring_size=5)
    first = serve(**settings)
    corrections.write_bytes(b"".join(padded_correction(n, 1000) for n in range(2000)))  # ~2 MB
    sidecar = od.corrections_position_path(journal)
    wait_for(lambda: position_line(sidecar) == 2000, timeout=300, what="the corrections to be recorded")
    first.close()
    sidecar.unlink()  # lost: the newest correction_ref in the journal must restore the position
    tracemalloc.start()
    try:
        second = serve(**settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"repairing the position peaked at {peak} bytes"
    append_to(corrections, padded_correction(2000, 10))
    wait_for(lambda: position_line(sidecar) == 2001, what="the next correction")
    recorded = [o["endpoint"] for o in replay_forward(journal)]
    assert recorded == [f"/fix/{n}" for n in range(2001)]  # nothing repeated, nothing skipped
    second.close()


# -----------------------------------------------------------------------------
# [SECTION] Supervisor
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_hears_restoring_ready_not_writable_and_stopping(tmp_path, daemons, fake_systemd, abstract):
    systemd = fake_systemd(abstract=abstract)
    daemon, gate = daemon_holding_its_restore(daemons, tmp_path, env={"NOTIFY_SOCKET": systemd.address},
                                              preexec_fn=limit_file_size(1 << 40))
    systemd.wait(lambda m: m == f"STATUS=not ready: {od.RESTORING}", "saying it restores")
    assert not any("READY=1" in m for m in systemd.messages)
    with open(gate, "wb"):
        pass  # the restore goes on
    ready = systemd.wait(lambda m: "READY=1" in m.split("\n"), "READY=1")
    assert systemd.messages[ready] == "READY=1\nSTATUS=ready"
    client = daemon.client()
    assert client.post("/observer/event", op("/a"))[0] == 200

    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, ((tmp_path / "ops.jsonl").stat().st_size,
                                                              resource.RLIM_INFINITY))
    assert client.post("/observer/event", op("/b"))[0] == 503
    failing = systemd.wait(lambda m: m.startswith("STATUS=not ready: journal cannot be written: File too large"),
                           "saying the journal cannot be written")
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    systemd.wait(lambda m: m == "STATUS=ready", "ready again", after=failing)

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 0
    stopping = systemd.wait(lambda m: m == "STOPPING=1\nSTATUS=shutting down", "STOPPING=1")
    assert stopping == len(systemd.messages) - 1, "nothing after STOPPING=1"
    assert not any("WATCHDOG" in m for m in systemd.messages), "no WATCHDOG_USEC: no pings"


def test_the_watchdog_is_pinged_while_alive_and_not_while_the_committer_is_wedged(tmp_path, daemons, fake_systemd):
    systemd = fake_systemd(abstract=True)
    daemon = daemons(tmp_path, config=write_settings(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl"}),
                     env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "1000000"}).wait_listening()
    first = systemd.wait(lambda m: m == "WATCHDOG=1", "a first ping")
    systemd.wait(lambda m: m == "WATCHDOG=1", "a second ping", after=first + 1)

    # A real fault: the journal's path now names a FIFO no one reads (as a hung NFS server or
    # a dead disk would hold a write), and an append fills its buffer and blocks in write().
    journal = tmp_path / "ops.jsonl"
    journal.unlink()
    os.mkfifo(journal)
    batch = json.dumps([op(f"/wedge/{i}", pad="x" * 1024) for i in range(200)]).encode()
    wedged = socket.create_connection(("127.0.0.1", daemon.port))
    wedged.sendall(b"POST /observer/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(batch) + batch)
    stuck = systemd.wait(lambda m: m.startswith("STATUS=not pinging the watchdog: the committer has held one commit"),
                         "the watchdog withheld")
    # The status counts the seconds held: once it says 3 s or more, six pings would have been due.
    held = systemd.wait(lambda m: re.search(r"held one commit for ([3-9]|\d\d+)\.\d s$", m) is not None,
                        "three seconds held", after=stuck)
    assert "WATCHDOG=1" not in systemd.messages[stuck:held + 1]
    assert daemon.client().get("/observer/health")[0] == 200, "the accept loop still answers"

    # Reading the FIFO lets the write through (its fsync then fails: a FIFO is no file):
    # the committer is free, and the pings resume.
    drained = threading.Thread(target=lambda: open(journal, "rb").read(), daemon=True)
    drained.start()
    systemd.wait(lambda m: m == "WATCHDOG=1", "the pings to resume", after=held)
    wedged.close()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 0
    stopping = systemd.wait(lambda m: m == "STOPPING=1\nSTATUS=shutting down", "STOPPING=1")
    assert stopping == len(systemd.messages) - 1, "nothing after STOPPING=1"


def test_the_readme_unit_is_the_shipped_one_type_notify_with_a_watchdog_and_check_first(tmp_path):
    readme = (HERE / "README.md").read_text()
    unit = (DEPLOY / "observerd.service").read_text()
    shown = readme.split("`/etc/systemd/system/observerd.service`", 1)[1].split("```ini\n", 1)[1].split("```", 1)[0]
    assert shown == unit
    settings = [line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")]
    assert ["Type", "notify"] in settings
    assert [value for key, value in settings if key == "WatchdogSec"] == ["30"]
    (pre,) = [shlex.split(value) for key, value in settings if key == "ExecStartPre"]
    (start,) = [shlex.split(value) for key, value in settings if key == "ExecStart"]
    assert pre[:3] == start[:2] + ["check"] and pre[3:] == start[2:]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not on PATH: the unit's syntax is not verified")
    shutil.copy(DEPLOY / "observerd.service", tmp_path / "observerd.service")
    result = subprocess.run([analyze, "verify", str(tmp_path / "observerd.service")], capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_the_watchdog_is_not_pinged_once_the_accept_loop_stops_going_round(serve, fake_systemd):
    systemd = fake_systemd(abstract=True)
    server = serve()
    notifier = od.SystemdNotifier(server.server, {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "400000"})
    try:
        first = systemd.wait(lambda m: m == "WATCHDOG=1", "a first ping")
        server.server.shutdown()  # serve_forever returns: nothing accepts connections any more
        stopped = systemd.wait(lambda m: m.startswith("STATUS=not pinging the watchdog: the accept loop"),
                               "the watchdog withheld", after=first)
        held = systemd.wait(lambda m: re.search(r"has not gone round for ([2-9]|\d\d+)\.\d s$", m) is not None,
                            "two seconds without a turn", after=stopped)
        assert "WATCHDOG=1" not in systemd.messages[stopped:held + 1]
    finally:
        notifier.stopping()
    stopping = systemd.wait(lambda m: m == "STOPPING=1\nSTATUS=shutting down", "STOPPING=1")
    assert stopping == len(systemd.messages) - 1, "nothing after STOPPING=1"


def test_a_watchdog_too_short_to_keep_is_said_and_pinged_as_often_as_allowed(serve, fake_systemd, capsys):
    systemd = fake_systemd(abstract=True)
    notifier = od.SystemdNotifier(serve().server, {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "1"})
    notifier.stopping()
    assert notifier.ping_interval_s == od.SystemdNotifier.MIN_PING_INTERVAL_S
    assert 'msg="WatchdogSec is too short to be kept; pinging as often as allowed" watchdog_usec=1' in capsys.readouterr().err


# -----------------------------------------------------------------------------
# [SECTION] Daemon
# -----------------------------------------------------------------------------

def test_ready_follows_a_real_write_fault_and_the_probe_finds_the_recovery_without_traffic(tmp_path, daemons):
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl"})
    daemon = daemons(tmp_path, config=config, preexec_fn=limit_file_size(1000)).wait_listening()
    client = daemon.client()
    assert client.get("/observer/ready")[:2] == (200, {"ready": True})
    accepted, status = 0, 200
    while status == 200:
        status, _, _ = client.post("/observer/event", {"endpoint": f"/fill/{accepted}", "pad": "x" * 40})
        accepted += status == 200
    assert status == 503
    path = tmp_path / "ops.jsonl"
    journal = path.read_bytes()
    reason = f"journal cannot be written: File too large ({path.resolve()})"
    unready = (503, {"ready": False, "reason": reason}, "1")
    status, body, resp = client.get("/observer/ready")
    assert (status, body, resp.getheader("Retry-After")) == unready
    # The probe runs every second and fails while the limit stands: a byte appended at the
    # end would fit, the op that failed would not. After two probes the answer must not
    # have changed.
    def probes(found):
        samples = scrape(client)["observerd_journal_probes_total"]["samples"]
        return next(value for _, labels, value in samples if labels == {"found": found})

    wait_for(lambda: probes("failing") >= 2, what="two probes")
    status, body, resp = client.get("/observer/ready")
    assert (status, body, resp.getheader("Retry-After")) == unready
    assert client.get("/observer/health")[0] == 200

    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    wait_for(lambda: client.get("/observer/ready")[0] == 200, what="the probe to find the journal writable")
    assert client.get("/observer/ready")[1] == {"ready": True}
    assert "found_by=probe" in daemon.log and probes("writable") == 1
    assert path.read_bytes() == journal, "the probe must leave the journal as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ops.jsonl.lock", "lakehouse.toml", "ops.jsonl"]
    assert client.post("/observer/event", {"endpoint": "/after"})[0] == 200
    assert len(replay_forward(path)) == accepted + 1


def test_it_answers_before_restoring_and_serves_no_ops_until_restored(tmp_path, daemons):
    path = tmp_path / "ops.jsonl"
    path.write_bytes(b"".join(od.encode_line(op(f"/before/{i}")) for i in range(3)))
    daemon, gate = daemon_holding_its_restore(daemons, tmp_path)
    status, body, resp = get_fresh(daemon.port, "/observer/ready")
    assert (status, body, resp.getheader("Retry-After")) == (503, {"ready": False, "reason": od.RESTORING}, "1")
    assert get_fresh(daemon.port, "/observer/health")[:2] == (200, {"status": "ok", "service": "observerd",
                                                                     "ring_size": 0})
    refused = [("POST", "/observer/event", {"endpoint": "/early"}),
               ("POST", "/observer/events", [{"endpoint": "/e"}]), ("GET", "/observer/stats", None),
               ("GET", "/observer/ops", None), ("GET", "/observer/errors", None),
               ("GET", "/observer/playbooks", None), ("GET", "/observer/escalations", None),
               ("POST", "/observer/review", {})]
    for method, route, body in refused:
        status, answer, resp = get_fresh(daemon.port, route, method, body)
        assert (status, answer, resp.getheader("Retry-After")) == (503, {"error": od.RESTORING}, "1"), route
    # What reads the files on disk, not the ring, is whole already.
    status, history, _ = get_fresh(daemon.port, "/observer/history")
    assert status == 200 and [o["endpoint"] for o in history["ops"]] == ["/before/2", "/before/1", "/before/0"]
    metrics = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    metrics.request("GET", "/metrics")
    response = metrics.getresponse()
    assert response.status == 200
    refusals = sample(parse_exposition(response.read().decode()), "observerd_rejected_total", reason="not_ready")
    assert refusals == len(refused)
    metrics.close()
    assert 'msg="restored ops"' not in daemon.log

    os.close(os.open(gate, os.O_WRONLY))  # the restore goes on
    wait_for(lambda: get_fresh(daemon.port, "/observer/ready")[0] == 200, what="the restore to finish")
    wait_for(lambda: 'msg="restored ops" count=3' in daemon.log, what="the restore's log line")
    client = daemon.client()
    assert client.get("/observer/stats")[1]["total"] == 3
    assert client.post("/observer/event", {"endpoint": "/after"})[1] == {"accepted": True, "ring_size": 4}
    assert endpoints_in(path) == ["/before/0", "/before/1", "/before/2", "/after"]


def test_from_sigterm_to_exit_ready_says_shutting_down_and_health_still_answers(tmp_path, daemons):
    # The drain waits for the request held below as long as the test needs, on any machine.
    script = hooked_daemon_script(tmp_path, "observerd.SHUTDOWN_GRACE_S = 600")
    config = write_settings(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl",
                                       "request_timeout_s": 600.0})
    daemon = daemons(tmp_path, config=config, script=script).wait_listening()
    assert get_fresh(daemon.port, "/observer/ready")[0] == 200
    body = json.dumps({"endpoint": "/in-flight"}).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=60) as held:
        # 100 Continue comes once the request is dispatched and its body awaited: in progress.
        held.sendall(b"POST /observer/event HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert held.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        daemon.proc.send_signal(signal.SIGTERM)

        def ready_status():
            try:
                return get_fresh(daemon.port, "/observer/ready")[0]
            except (OSError, http.client.HTTPException):
                return None  # a connection accepted just as closing began is closed unanswered
        wait_for(lambda: ready_status() == 503, what="ready to say 503")
        status, answer, resp = get_fresh(daemon.port, "/observer/ready")
        assert (status, answer) == (503, {"ready": False, "reason": od.SHUTTING_DOWN})
        assert (resp.getheader("Retry-After"), resp.getheader("Connection")) == ("1", "close")
        assert get_fresh(daemon.port, "/observer/health")[0] == 200
        assert get_fresh(daemon.port, "/observer/stats")[0] == 200
        status, answer, resp = get_fresh(daemon.port, "/observer/event", "POST", {"endpoint": "/late"})
        assert (status, answer, resp.getheader("Retry-After")) == (503, {"error": od.SHUTTING_DOWN}, "1")
        assert daemon.proc.poll() is None, "the drain waits for the request in progress"
        held.sendall(body)
        assert parse_response(read_until_closed(held)) == (200, {"accepted": True, "ring_size": 1})
    assert daemon.exit_status() == 0
    assert "abandoned_connections=0" in daemon.log
    assert endpoints_in(tmp_path / "ops.jsonl") == ["/in-flight"]


# -----------------------------------------------------------------------------
# [SECTION] CLI and main
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    (None, "file not found"),
    ("[observerd\n", "invalid TOML"),
    ("[observerd]\nbogus = 1\n", "unknown key 'bogus'"),
])
def test_bad_config_file_exits_2_with_one_line(tmp_path, content, needle):
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, str(DAEMON), "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "bad.toml" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", list(REFUSED_CONFIGS))
def test_what_serve_refuses_check_refuses_in_the_same_words(tmp_path, daemons, case):
    content, needle = REFUSED_CONFIGS[case]
    if case == "a privileged port" and can_listen_on_port_80_without_privilege():
        pytest.skip("here an unprivileged process may listen on port 80, so no port is privileged")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "lakehouse.toml"
        config.write_text(content.format(port=port))
        checked = subprocess.run([sys.executable, str(DAEMON), "check", "--config", str(config)],
                                 capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                 preexec_fn=without_privileged_ports)
        daemon = daemons(tmp_path, args=["serve"], config=config, preexec_fn=without_privileged_ports)
        assert daemon.exit_status() == 2, daemon.log
    assert checked.returncode == 2, checked.stdout
    *check_lines, summary = checked.stderr.splitlines()
    assert summary.endswith("observerd would not start")
    check_problems = [line.removeprefix(f"{config}: ") for line in check_lines]
    assert check_problems == logged_problems(daemon.log)
    assert any(needle.format(port=port, pid=os.getpid()) in problem for problem in check_problems), check_problems
    assert "Traceback" not in daemon.log + checked.stderr


def test_a_shared_files_other_tables_and_keys_are_theirs_and_a_bare_key_a_warning(tmp_path, daemons):
    config = tmp_path / "lakehouse.toml"
    config.write_text('cluster = "eu-1"\nrign_size = 5\n[server]\nport = 1\n[gateway]\nbind = "x"\n'
                      + LISTENABLE + '[auth]\nsso = "x"\n')
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.splitlines() == [
        f"{config}: warning: top-level key 'cluster' is not read: observerd reads only [observerd] and [auth]",
        f"{config}: warning: top-level key 'rign_size' is not read: observerd reads only [observerd] and "
        "[auth] (did you mean 'ring_size' in [observerd]?)",
        f"{config}: warning: unknown key 'sso' in [auth]",
    ]
    daemons(tmp_path, config=config).wait_listening()
    # Shown beside the problems too, by check and serve alike.
    config.write_text('cluster = "eu-1"\n[observerd]\nrign_size = 5\n')
    checked = run_cli("check", "--config", str(config))
    daemon = daemons(tmp_path, config=config)
    assert (checked.returncode, daemon.exit_status()) == (2, 2)
    warning = "top-level key 'cluster' is not read: observerd reads only [observerd] and [auth]"
    assert f"{config}: warning: {warning}\n" in checked.stderr
    assert f'level=WARN msg="{warning}"' in daemon.log


def test_unwritable_persist_path_exits_2(tmp_path, daemons):
    (tmp_path / "a-file").write_text("")
    daemon = daemons(tmp_path, args=["--bind", "127.0.0.1:0",
                                     "--persist-path", str(tmp_path / "a-file" / "ops.jsonl")])
    assert daemon.exit_status() == 2
    assert "a-file is not a folder" in daemon.log and "Traceback" not in daemon.log


def test_missing_default_config_runs_on_defaults_with_a_warning(tmp_path, daemons):
    daemon = daemons(tmp_path, args=["--bind", "127.0.0.1:0"]).wait_listening()
    assert "level=WARN msg=\"config file not found, using defaults\"" in daemon.log
    status, body, _ = daemon.client().post("/observer/event", {"endpoint": "/e"})
    assert status == 200
    assert (tmp_path / "data/observer/ops.jsonl").exists()


def test_copied_alone_into_an_empty_folder_it_runs(tmp_path, daemons):
    lonely = tmp_path / "host"
    lonely.mkdir()
    shutil.copy(DAEMON, lonely / "observerd.py")
    daemon = daemons(lonely, script=lonely / "observerd.py",
                     args=["--bind", "127.0.0.1:0"]).wait_listening()
    client = daemon.client()
    assert client.post("/observer/event", {"endpoint": "/alone"})[0] == 200
    assert client.get("/observer/stats")[1]["total"] == 1
    assert sorted(p.name for p in lonely.iterdir()) == ["data", "observerd.py"]


def test_sigterm_finishes_in_flight_request_and_exits_0(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path)
    idle = daemon.client()
    assert idle.get("/observer/health")[0] == 200  # an idle keep-alive connection stays open
    body = json.dumps({"endpoint": "/in-flight"}).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        sock.sendall(b"POST /observer/event HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body[:5])
        # 100 Continue comes once the request is dispatched and its body awaited: in progress.
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "shutting down" in daemon.log, what="shutdown to begin")
        sock.sendall(body[5:])
        status, answer = parse_response(sock.recv(65536))
        assert (status, answer["accepted"]) == (200, True)
    assert daemon.exit_status() == 0
    # The idle connection was closed at once, not left to the grace period.
    assert "abandoned_connections=0" in daemon.log
    assert json.loads((tmp_path / "ops.jsonl").read_text())["endpoint"] == "/in-flight"


def test_cli_help_shows_examples():
    help_text = run_cli("--help")
    assert help_text.returncode == 0
    assert "examples:" in help_text.stdout and "check --config" in help_text.stdout


def test_cli_version():
    version = run_cli("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"observerd {od.VERSION}")


def test_the_major_version_says_ops_changed_order_and_the_changes_file_says_how():
    # 2.0 inverted ops' order and --reverse, and made --grep plain text: a major bump, told.
    assert od.VERSION.split(".")[0] == "2"
    changes = (HERE / "CHANGES.md").read_text()
    assert f"## {od.VERSION}" in changes and "`-r` / `--reverse` now means *newest first*" in changes
    assert "Changed in 2.0" in run_cli("ops", "--help").stdout
    assert "2.0 changed ops' order" in run_cli("--help").stdout


@pytest.mark.parametrize("command", ["serve", "check", "stats", "top", "ops"])
def test_every_subcommand_takes_config_and_names_its_help_for_an_unknown_flag(tmp_path, command):
    missing = run_cli(command, "--config", str(tmp_path / "absent.toml"), *(["--once"] if command == "top" else []))
    assert missing.returncode == 2 and f"{tmp_path / 'absent.toml'}" in missing.stderr
    assert "file not found (--config names another)" in missing.stderr
    unknown = run_cli(command, "--colour")
    assert (unknown.returncode, unknown.stderr) == (
        2, f"observerd.py {command}: unrecognized arguments: --colour (see observerd.py {command} --help)\n")


def test_cli_check_prints_effective_settings_with_the_token_masked(tmp_path):
    config = write_config(tmp_path, {"ring_size": 500, "persist_path": "x/ops.jsonl"}, {"token": "hunter2"})
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "ring_size = 500" in result.stdout
    assert f'persist_path = "{tmp_path / "x/ops.jsonl"}"' in result.stdout
    assert "hunter2" not in result.stdout + result.stderr and "# token is set" in result.stdout


def test_cli_check_lists_every_problem_and_exits_2(tmp_path):
    (tmp_path / "file").write_text("")
    config = write_config(tmp_path, {"ring_sise": 1, "max_batch": "many", "bind": "0.0.0.0:1"})
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2
    for needle in ("unknown key 'ring_sise'", "max_batch must be int", "not loopback"):
        assert needle in result.stderr
    config = write_config(tmp_path, {"persist_path": "file/ops.jsonl", "tls_cert": "missing.pem",
                                     "tls_key": "missing.key"})
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2
    assert "persist_path" in result.stderr and "tls_cert" in result.stderr and "missing.pem" in result.stderr


def test_cli_stats_equals_what_a_restart_would_serve(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path)
    batch = [{"endpoint": f"/s{i}", "source": od.SOURCES[i % 4], "success": i % 3 == 0} for i in range(40)]
    daemon.client().post("/observer/events", batch)
    served = daemon.client().get("/observer/stats")[1]
    result = run_cli("stats", str(tmp_path / "ops.jsonl"))
    assert result.returncode == 0 and json.loads(result.stdout) == served
    small = json.loads(run_cli("stats", str(tmp_path / "ops.jsonl"), "--ring-size", "10").stdout)
    assert small == stats_of(replay_forward(tmp_path / "ops.jsonl")[-10:])
    missing = run_cli("stats", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_tls_serves_https_and_a_plain_http_client_fails_cleanly(tmp_path, daemons):
    cert, key = make_self_signed_cert(tmp_path)
    # A plain-HTTP client left hanging would be cut only at request_timeout_s, long after we give up.
    daemon = start_durable_daemon(daemons, tmp_path, tls_cert="cert.pem", tls_key="key.pem",
                                  request_timeout_s=3600)
    context = ssl.create_default_context(cafile=str(cert)) if shutil.which("openssl") else ssl._create_unverified_context()
    https = http.client.HTTPSConnection("127.0.0.1", daemon.port, context=context, timeout=30)
    https.request("POST", "/observer/event", body=json.dumps({"endpoint": "/tls"}))
    response = https.getresponse()
    assert (response.status, json.loads(response.read())["accepted"]) == (200, True)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
            sock.sendall(b"GET /observer/health HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                raw = b"".join(iter(lambda: sock.recv(65536), b""))
            except ConnectionResetError:
                raw = b""
            except socket.timeout:
                raise AssertionError("a plain-HTTP client was left hanging") from None
        assert b"200" not in raw
    https.request("GET", "/observer/stats")
    assert json.loads(https.getresponse().read())["total"] == 1
    assert "Traceback" not in daemon.log


@pytest.mark.parametrize("files, needle", [
    ({}, "file not found"),
    ({"cert.pem": "not a certificate", "key.pem": "not a key"}, "cannot load"),
])
def test_bad_tls_files_stop_startup_naming_them(tmp_path, daemons, files, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "", "tls_cert": "cert.pem",
                                     "tls_key": "key.pem"})
    daemon = daemons(tmp_path, config=config)
    assert daemon.exit_status() == 2
    assert needle in daemon.log and "cert.pem" in daemon.log and "Traceback" not in daemon.log


def test_sighup_reopens_the_log_under_load_without_losing_or_duplicating(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path, ring_size=100000)
    writers = Writers(daemon.port, 6, lambda n, i: {"endpoint": f"/h{n}/{i}"})
    acked = writers.acked
    live, rotated = tmp_path / "ops.jsonl", tmp_path / "ops.jsonl.1"
    wait_for(lambda: len(acked) > 200, timeout=120, what="load")
    os.rename(live, rotated)  # what logrotate does before signalling, with `create`
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reopened journal" in daemon.log, timeout=60, what="the reopen")
    wait_for(lambda: live.exists() and len(replay_forward(live)) > 100, timeout=120, interval=0.1,
             what="ops in the new file")
    writers.stop()
    in_old = [o["endpoint"] for o in replay_forward(rotated)]
    in_new = [o["endpoint"] for o in replay_forward(live)]
    assert sorted(in_old + in_new) == sorted(acked), "lost or duplicated ops across the reopen"
    assert daemon.proc.poll() is None
    assert daemon.client().get("/observer/stats")[1]["total"] == len(acked)


def test_check_reports_every_startup_problem_at_once_and_serve_refuses_the_same(tmp_path, daemons):
    # /proc refuses new entries even to root, whom access() would let through.
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "/proc/nope/ops.jsonl",
                                     "tls_cert": "missing.pem", "tls_key": "missing.key"})
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2
    printed = [line.split(": ", 1)[1] for line in result.stderr.splitlines()[:-1]]
    assert len(printed) == 3, result.stderr
    assert printed[0].startswith("persist_path /proc/nope/ops.jsonl: ")
    assert printed[1] == f"tls_cert {tmp_path / 'missing.pem'}: file not found"
    assert printed[2] == f"tls_key {tmp_path / 'missing.key'}: file not found"
    daemon = daemons(tmp_path, config=config)
    assert daemon.exit_status() == 2
    assert logged_problems(daemon.log) == printed
    assert "msg=listening" not in daemon.log and "Traceback" not in daemon.log


def test_check_names_a_persist_path_that_is_a_folder(tmp_path):
    (tmp_path / "ops.jsonl").mkdir()
    result = run_cli("check", "--config", str(write_config(tmp_path, {"persist_path": "ops.jsonl"})))
    assert result.returncode == 2 and f"persist_path {tmp_path / 'ops.jsonl'}: is a folder" in result.stderr


def test_a_playbooks_path_in_a_missing_folder_is_created_at_startup(tmp_path, daemons):
    config = write_config(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl",
                                     "playbooks_path": "shared/today/playbooks.json",
                                     "consolidate_interval_s": 0.05})
    assert run_cli("check", "--config", str(config)).returncode == 0
    daemon = daemons(tmp_path, config=config).wait_listening()
    written = tmp_path / "shared" / "today" / "playbooks.json"
    wait_for(written.exists, what="the playbooks file")
    assert json.loads(written.read_text())["playbooks"] == []
    assert "background task failed" not in daemon.log


@pytest.mark.parametrize("args", SUBCOMMANDS)
def test_an_older_python_is_named_in_one_line_and_exit_2(tmp_path, args):
    # As Python 3.10.12 would run the file: version_info is all the check may look at.
    runner = ("import runpy, sys; sys.version_info = (3, 10, 12, 'final', 0); "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", runner, str(DAEMON), *args], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (
        2, "observerd needs Python 3.11 or newer; this is 3.10.12\n", "")
    assert list(tmp_path.iterdir()) == []


def test_a_real_older_python_is_named_in_one_line_and_exit_2(tmp_path):
    interpreters = older_pythons()
    if not interpreters:
        pytest.skip("no python3.8, 3.9 or 3.10 on PATH")
    for python in interpreters:
        version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, timeout=60).stdout.strip()
        for args in SUBCOMMANDS:
            result = subprocess.run([python, str(DAEMON), *args], capture_output=True, text=True,
                                    timeout=60, cwd=tmp_path)
            expected = f"observerd needs Python 3.11 or newer; this is {version}\n"
            assert (result.returncode, result.stderr) == (2, expected), (python, args)


def test_sighup_during_startup_is_not_fatal_and_reopens_the_log(held_daemon, tmp_path):
    daemon = held_daemon()
    for _ in range(3):
        daemon.proc.send_signal(signal.SIGHUP)
    daemon.release()
    daemon.wait_listening()
    wait_for(lambda: "reopened journal" in daemon.log, what="the reopen the SIGHUP asked for")
    assert daemon.client().post("/observer/event", {"endpoint": "/after-early-hup"})[0] == 200
    assert replay_forward(tmp_path / "ops.jsonl")[-1]["endpoint"] == "/after-early-hup"
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_startup_stops_cleanly(held_daemon, signum):
    daemon = held_daemon()
    daemon.proc.send_signal(signum)
    daemon.release()
    assert daemon.exit_status() == 0
    assert "msg=stopped" in daemon.log and "Traceback" not in daemon.log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_before_the_config_is_read_stops_cleanly_without_a_traceback(tmp_path, daemons, signum):
    # The config is a FIFO: the daemon is held reading it, before serve, until the test writes it.
    config = tmp_path / "lakehouse.toml"
    os.mkfifo(config)
    daemon = daemons(tmp_path, config=config)
    with open(config, "w") as fifo:  # opened once the daemon opens it to read
        daemon.proc.send_signal(signum)
        fifo.write('[observerd]\nbind = "127.0.0.1:0"\npersist_path = ""\n')
    assert daemon.exit_status() == 0, daemon.log
    assert f'msg="shutting down" signal={signal.Signals(signum).name}' in daemon.log
    assert "msg=stopped" in daemon.log and "Traceback" not in daemon.log


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(tmp_path):
    config = tmp_path / "lakehouse.toml"
    os.mkfifo(config)
    proc = subprocess.Popen([sys.executable, str(DAEMON), "check", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint())
    with open(config, "w"):  # opened once check opens it to read, and left unwritten
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stdout, stderr) == (130, "", "observerd.py check: interrupted\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_the_restore_of_a_long_journal_stops_it_at_once(tmp_path, daemons, signum):
    # Long enough that the restore is still running when the signal comes, on any machine: it
    # is sent as soon as the restore says it started, and the log says which came first.
    line = od.encode_line(op("/restored", success=False, error="boom"))
    (tmp_path / "ops.jsonl").write_bytes(line * 300_000)
    config = write_settings(tmp_path, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl",
                                       "ring_size": 1_000_000, "max_ring_bytes": 1 << 40,
                                       "dedupe_window": 1_000_000})
    daemon = daemons(tmp_path, config=config)
    wait_for(lambda: 'msg="restoring ops"' in daemon.log or daemon.proc.poll() is not None,
             what="the restore to start")
    daemon.proc.send_signal(signum)
    assert daemon.exit_status() == 0, daemon.log
    name = signal.Signals(signum).name
    assert f'msg="shutting down" signal={name} restored=false' in daemon.log
    assert "msg=stopped" in daemon.log and 'msg="restored ops"' not in daemon.log
    assert "Traceback" not in daemon.log


def test_check_reports_every_declared_setting_once(tmp_path):
    result = run_cli("check", "--config", str(write_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    document = tomllib.loads(result.stdout)
    reported = [key if table == "observerd" else f"[{table}] {key}"
                for table, settings in document.items() for key in settings]
    assert reported == [s.label for s in od.SETTINGS if not s.secret]


@pytest.mark.parametrize("settings, flags, total", [
    ({}, [], 2 + 3 + 4),
    ({"keep_files": 1}, [], 2 + 3),
    ({"keep_files": 0}, [], 2),
    ({"ring_size": 4}, [], 4),
    ({"ring_size": 4}, ["--ring-size", "6"], 6),
])
def test_cli_stats_restores_with_the_configs_ring_settings(tmp_path, settings, flags, total):
    write_rotated_journal(tmp_path / "ops.jsonl", [2, 3, 4])
    # A bind beyond loopback without a token: serve would refuse it, stats listens nowhere.
    config = write_config(tmp_path, {"bind": "0.0.0.0:1", **settings})
    result = run_cli("stats", str(tmp_path / "ops.jsonl"), "--config", str(config), *flags)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total"] == total


def test_cli_stats_reads_the_configs_journal_or_a_running_daemon(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path)
    client = daemon.client()
    client.post("/observer/events", [{"endpoint": f"/s{i}", "success": i % 2 == 0} for i in range(7)])
    served = client.get("/observer/stats")[1]
    config = str(tmp_path / "lakehouse.toml")
    from_files = run_cli("stats", "--config", config, cwd="/")
    assert from_files.returncode == 0, from_files.stderr
    assert json.loads(from_files.stdout) == served
    from_daemon = run_cli("stats", "--url", f"http://127.0.0.1:{daemon.port}")
    assert from_daemon.returncode == 0, from_daemon.stderr
    assert json.loads(from_daemon.stdout) == served
    # A journal that is not there names the path looked for, where it came from, and the way out.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = write_settings(elsewhere, {"persist_path": "gone/ops.jsonl"})
    for command in ("stats", "ops"):
        result = run_cli(command, "--config", str(other))
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (f"{elsewhere / 'gone' / 'ops.jsonl'}: no journal there: file not found, nor "
                                 f"rotated segments beside it; it is the persist_path of {other}: --config chooses "
                                 "another config, FILE another journal\n")
        default = run_cli(command, cwd=tmp_path)  # its lakehouse.toml, the daemon's, read by default
        assert default.returncode == 0, default.stderr
    (tmp_path / "empty").mkdir()
    nothing = run_cli("ops", cwd=tmp_path / "empty")
    assert nothing.returncode == 2 and "the default persist_path (lakehouse.toml was not found)" in nothing.stderr


def test_cli_stats_names_a_bad_setting_and_exits_2(tmp_path):
    write_rotated_journal(tmp_path / "ops.jsonl", [1])
    journal = str(tmp_path / "ops.jsonl")
    bad_file = run_cli("stats", journal, "--config", str(write_config(tmp_path, {"keep_files": -1})))
    assert bad_file.returncode == 2 and "[observerd] keep_files must be >= 0, got -1" in bad_file.stderr
    (tmp_path / "no-config").mkdir()
    bad_flag = run_cli("stats", journal, "--recent-scenarios", "-1", cwd=tmp_path / "no-config")
    assert bad_flag.returncode == 2 and "--recent-scenarios must be >= 0, got -1" in bad_flag.stderr


def test_a_combined_pem_may_be_both_tls_cert_and_tls_key(tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    config = write_config(tmp_path, {"persist_path": "ops.jsonl", "tls_cert": "combined.pem",
                                     "tls_key": "combined.pem"})
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr


def test_top_once_shows_the_numbers_stats_serves(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path, token="s3cret", ring_size=500, analyze_interval_s=0.05)
    client = daemon.client(token="s3cret")
    assert client.post("/observer/events", known_traffic())[0] == 200
    timeline_once_whole(client, 10)
    wait_for(lambda: client.get("/observer/errors")[1]["clusters"], what="the failures' analysis")
    stats = client.get("/observer/stats")[1]
    url = f"http://127.0.0.1:{daemon.port}"
    result = run_cli("top", "--once", "--url", url, "--token", "s3cret")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    rows = top_snapshot_rows(result.stdout)
    assert set(rows) == {*stats["by_source"], "all"}
    for source, total in stats["by_source"].items():
        assert rows[source][1] + rows[source][2] == total
    assert rows["all"][1:] == [stats["successes"], stats["failures"]]
    assert f"ring {stats['total']}/500 ops" in result.stdout
    assert f"observerd {od.VERSION} at {url}" in result.stdout
    assert "/mcp/search" in result.stdout and "upstream <n> for job <n>" in result.stdout
    # Without --once, on a pipe: the same snapshot; the token from the environment.
    piped = run_cli("top", "--url", url, env={"OBSERVERD_TOKEN": "s3cret"})
    assert piped.returncode == 0
    # EV/S is the newest whole second's: by now a later one, without ops.
    assert {name: row[1:] for name, row in top_snapshot_rows(piped.stdout).items()} == {
        name: row[1:] for name, row in rows.items()}
    unauthorized = run_cli("top", "--once", "--url", url, env={"OBSERVERD_TOKEN": "wrong"})
    assert unauthorized.returncode == 1 and unauthorized.stdout == ""
    # A 401 names the token source tried (never the token) and how to pass one.
    assert unauthorized.stderr.splitlines() == [
        f"observerd.py top: {url}: HTTP 401 Unauthorized: missing or invalid bearer token; the token from "
        "OBSERVERD_TOKEN was refused: set OBSERVERD_TOKEN, or [auth] token in the file --config names"]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 0
    gone = run_cli("top", "--once", "--url", url)
    assert gone.returncode == 1 and len(gone.stderr.splitlines()) == 1 and "unreachable" in gone.stderr


def test_top_takes_the_daemons_url_and_token_from_the_config(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path, token="s3cret")
    daemon.client(token="s3cret").post("/observer/events", known_traffic())
    url = f"http://127.0.0.1:{daemon.port}"
    no_env = {"OBSERVERD_TOKEN": ""}

    def client_config(name: str, **settings) -> str:
        folder = tmp_path / name
        folder.mkdir()
        return str(write_settings(folder, settings))

    # A wildcard bind is reached on loopback; the token comes from [auth].
    shared = client_config("shared", bind=f"0.0.0.0:{daemon.port}", token="s3cret")
    top = run_cli("top", "--once", "--config", shared, env=no_env)
    assert top.returncode == 0, top.stderr
    assert f"at {url} " in top.stdout and "/mcp/search" in top.stdout
    # A 401 names the source of the token tried, never the token, and how to pass one. A bind
    # beyond loopback without a token in the file is the daemon's to check (systemd may give it
    # OBSERVERD_TOKEN): top asks, and says what to pass.
    tokenless = client_config("tokenless", bind=f"0.0.0.0:{daemon.port}")
    refused = run_cli("top", "--once", "--config", tokenless, env=no_env)
    assert refused.returncode == 1 and refused.stderr.splitlines() == [
        f"observerd.py top: {url}: HTTP 401 Unauthorized: missing or invalid bearer token; the daemon wants a "
        f"token and no token (none in --token, OBSERVERD_TOKEN or [auth] token of {tokenless}) was found: "
        "set OBSERVERD_TOKEN, or [auth] token in the file --config names"]
    wrong = client_config("wrong", bind=f"127.0.0.1:{daemon.port}", token="guess")
    refused = run_cli("stats", "--config", wrong, "--url", url, env=no_env)
    assert refused.returncode == 1 and f"the token from [auth] token of {wrong} was refused" in refused.stderr
    assert "guess" not in refused.stderr
    # The flag and the variable come first, as for the daemon.
    assert run_cli("top", "--once", "--config", wrong, "--token", "s3cret", env=no_env).returncode == 0
    assert run_cli("top", "--once", "--config", wrong, env={"OBSERVERD_TOKEN": "s3cret"}).returncode == 0
    missing = run_cli("top", "--once", "--config", str(tmp_path / "nope.toml"))
    assert (missing.returncode, missing.stderr) == (2, f"{tmp_path / 'nope.toml'}: file not found "
                                                       "(--config names another)\n")


def test_top_over_tls_trusts_the_certificate_its_config_names(tmp_path, daemons):
    make_self_signed_cert(tmp_path)
    daemon = start_durable_daemon(daemons, tmp_path, tls_cert="cert.pem", tls_key="key.pem", request_timeout_s=5)
    client_folder = tmp_path / "client"
    client_folder.mkdir()
    config = write_settings(client_folder, {"bind": f"127.0.0.1:{daemon.port}", "tls_cert": str(tmp_path / "cert.pem"),
                                            "tls_key": str(tmp_path / "key.pem")})
    top = run_cli("top", "--once", "--config", str(config))
    assert top.returncode == 0, top.stderr
    assert f"at https://127.0.0.1:{daemon.port} " in top.stdout
    # Without the config's certificate, a self-signed one is refused as by any client.
    untrusted = run_cli("top", "--once", "--url", f"https://127.0.0.1:{daemon.port}", env={"SSL_CERT_FILE": os.devnull})
    assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_top_draws_resizes_sorts_and_quits_on_a_terminal(serve, screens):
    server = serve()
    # The endpoint failing most, first in its table, is twice as wide on a terminal as it is long:
    # at 13 rows it is the last line, and runs past the screen's last cell.
    wide = [{"endpoint": "/検索" * 40, "error": "boom"}] * 5
    server.client().post("/observer/events", known_traffic() + wide)
    screen = screens([sys.executable, str(DAEMON), "top", "--url", f"http://127.0.0.1:{server.port}"])
    screen.shows(od.VERSION)
    screen.shows("scenario")
    screen.shows("/mcp/search")
    # A 1x1 screen shows nothing (the last column stays free), but it is cleared: bytes are drawn.
    for rows, cols, needle in ((5, 20, "observerd"), (1, 1, ""), (2, 3, "o…"), (13, 50, "検索"),
                               (24, 50, "observerd"), (40, 100, "observerd")):
        mark = screen.mark()
        screen.resize(rows, cols)
        screen.shows(needle, since=mark, what=f"a redraw at {cols}x{rows}")
    screen.shows("scenario", since=mark)
    mark = screen.mark()
    screen.press(b"s")
    screen.shows("rate", since=mark, what="the endpoints sorted by failure rate")
    mark = screen.mark()
    screen.press(b"w")
    screen.shows("IN THE RING", since=mark, what="the endpoints ranked over the whole ring")
    screen.press(b"q")
    assert screen.proc.wait(60) == 0
    assert "Traceback" not in screen.text()


def test_top_survives_the_daemon_going_away_and_coming_back(tmp_path, daemons, screens):
    first = start_durable_daemon(daemons, tmp_path, token="s3cret")
    port = first.port
    first.client(token="s3cret").post("/observer/event", {"endpoint": "/before-restart"})
    screen = screens([sys.executable, str(DAEMON), "top", "--url", f"http://127.0.0.1:{port}"],
                     env={"OBSERVERD_TOKEN": "s3cret"})
    screen.shows("/before-restart")
    mark = screen.mark()
    first.proc.send_signal(signal.SIGTERM)
    assert first.exit_status() == 0
    screen.shows("disconnected,", since=mark)
    screen.shows("retrying", since=mark)
    mark = screen.mark()
    second = start_durable_daemon(daemons, tmp_path, token="s3cret", bind=f"127.0.0.1:{port}")
    second.client(token="s3cret").post("/observer/event", {"endpoint": "/after-restart"})
    screen.shows("/after-restart", since=mark)
    screen.press(b"q")
    assert screen.proc.wait(60) == 0
    assert "Traceback" not in screen.text()


def test_top_says_why_it_is_not_ready_and_keeps_its_last_screen_marked_stale(tmp_path, daemons, tmux_screens):
    (tmp_path / "ops.jsonl").write_bytes(od.encode_line(op("/restored", success=False, error="boom")))
    daemon, gate = daemon_holding_its_restore(daemons, tmp_path)
    screen = tmux_screens([sys.executable, str(DAEMON), "top", "--url", f"http://127.0.0.1:{daemon.port}"])
    screen.shows(f"NOT READY: {od.RESTORING}")
    os.close(os.open(gate, os.O_WRONLY))  # the restore goes on
    assert "NOT READY" not in screen.shows("/restored")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_status() == 0
    text = screen.shows("STALE since ")
    assert re.search(r"^STALE since \d\d:\d\d:\d\dZ, disconnected, retrying every 1 s: ", text, re.M), text
    assert "/restored" in text and f"observerd {od.VERSION}" in text, text


def test_check_prints_the_effective_settings_as_toml_that_loads_back(tmp_path):
    # A path with a quote, a backslash, DEL and non-ASCII in it, and a token from file and env.
    config = write_config(tmp_path, {"persist_path": 'we"ird\\\u007f\u00e9/ops.jsonl', "ring_size": 7,
                                     "request_timeout_s": 2.5}, {"token": "hunter2"})
    result = run_cli("check", "--config", str(config), env={"OBSERVERD_TOKEN": "env-s3cret"})
    assert result.returncode == 0, result.stderr
    document = tomllib.loads(result.stdout)
    assert document["observerd"]["persist_path"] == str(tmp_path / 'we"ird\\\x7f\u00e9/ops.jsonl')
    assert (document["observerd"]["ring_size"], document["observerd"]["request_timeout_s"]) == (7, 2.5)
    assert document["auth"] == {} and "# token is set (never shown)" in result.stdout
    assert "hunter2" not in result.stdout and "s3cret" not in result.stdout
    # What check prints is a config that loads to the same settings (the token aside).
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / "effective.toml"
    again.write_text(result.stdout)
    reprinted = run_cli("check", "--config", str(again))
    assert reprinted.returncode == 0, reprinted.stderr
    assert tomllib.loads(reprinted.stdout) == document
    assert "# token is not set (never shown)" in reprinted.stdout


def test_output_into_a_pipe_the_reader_closed_ends_quietly(tmp_path, serve):
    config = write_config(tmp_path)
    write_rotated_journal(tmp_path / "ops.jsonl", [3])
    server = serve()
    for args in (["check", "--config", str(config)], ["stats", str(tmp_path / "ops.jsonl")],
                 ["top", "--once", "--url", f"http://127.0.0.1:{server.port}"]):
        result = run_into_a_closed_pipe(*args)
        assert (result.returncode, result.stderr) == (0, ""), (args, result.stderr)
    shell = subprocess.run(f"{sys.executable} {DAEMON} check --config {config} | head -1", shell=True,
                           capture_output=True, text=True, timeout=60)
    assert shell.stdout.startswith("# ") and shell.stderr == ""


@pytest.mark.parametrize("command", ["", "serve", "check", "stats", "top", "ops"])
def test_every_subcommand_has_help_with_examples_and_the_exit_statuses(command):
    result = run_cli(*filter(None, [command]), "--help")
    assert result.returncode == 0 and result.stderr == ""
    examples = result.stdout.split("examples:\n")[1]
    assert f"observerd.py {command}".strip() in examples
    assert "exit status: 0 ok; 1 runtime error" in result.stdout and "2 usage or config error" in result.stdout


@pytest.mark.parametrize("args, problem", [
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["stats"], "no journal there: file not found, nor rotated segments beside it; it is the default persist_path"),
    (["ops", "--lines", "-1"], "argument -n/--lines: must be a whole number >= 0, got '-1'"),
    (["check", "--bogus"], "unrecognized arguments: --bogus"),
    (["top", "--interval", "0"], "--interval: '0' is not a number of seconds from 0.1 to 3600"),
    (["top", "--url", "localhost:3219"], "--url: 'localhost:3219' is not an http:// or https:// URL"),
    (["stats", "x.jsonl", "--ring-size", "many"], "--ring-size: invalid int value: 'many'"),
])
def test_a_usage_error_is_one_line_naming_the_problem_and_exits_2(tmp_path, args, problem):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and problem in result.stderr, result.stderr


def test_stats_of_a_file_it_cannot_read_is_one_line_and_exit_1(tmp_path):
    not_a_file = run_cli("stats", str(tmp_path))
    assert (not_a_file.returncode, not_a_file.stderr) == (2, f"{tmp_path}: not a regular file\n")
    write_rotated_journal(tmp_path / "ops.jsonl", [1])
    (tmp_path / "ops.jsonl.1").mkdir()  # restore reads on into the segments: this one fails
    result = run_cli("stats", str(tmp_path / "ops.jsonl"), cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"{tmp_path / 'ops.jsonl.1'}: cannot read: Is a directory\n"


def test_top_shows_what_clients_sent_without_letting_it_drive_the_terminal(serve):
    server = serve(analyze_interval_s=0.05)
    hostile = "/evil\x1b]2;owned\x07\x1b[2J\r\n\u202egnp.exe\x9b"
    server.client().post("/observer/events", [{"endpoint": hostile, "error": "\x1b[31mred\tboom"}] * 2)
    wait_for(lambda: server.client().get("/observer/errors")[1]["clusters"], what="the failures' analysis")
    result = run_cli("top", "--once", "--url", f"http://127.0.0.1:{server.port}")
    assert result.returncode == 0, result.stderr
    assert "/evil\\u001b]2;owned\\u0007\\u001b[2J\\r\\n\\u202egnp.exe\\u009b" in result.stdout
    assert "\\u001b[<n>mred boom" in result.stdout  # the cluster's signature
    assert not od._UNSHOWABLE.search(result.stdout.replace("\n", ""))


def test_ops_applies_each_filter_and_reads_the_rotated_segments(tmp_path):
    now = time.time()
    ops = write_history_segments(tmp_path, now)
    newest_first = ops[::-1]
    journal = str(tmp_path / "ops.jsonl")

    def check(args, keep, n=50):
        result = run_ops(journal, "-o", "ndjson", *args)
        assert result.returncode == 0, result.stderr
        assert ndjson(result.stdout) == [o for o in newest_first if keep(o)][:n][::-1], args
        return result

    check([], lambda o: True)
    result = check(["-n", "1000"], lambda o: True, n=1000)
    # Each corrupt line is skipped and counted, in one line of stderr, not one per line.
    assert result.stderr.count("\n") == 1 and "skipped 6 line(s)" in result.stderr
    check(["-n", "3"], lambda o: True, n=3)
    check(["--endpoint", "/h/7"], lambda o: o["endpoint"] == "/h/7")
    check(["--endpoint", "/h/1?"], lambda o: re.fullmatch(r"/h/1\d", o["endpoint"]))
    check(["--source", "scenario"], lambda o: o["source"] == "scenario")
    check(["--failed", "-n", "1000"], lambda o: not o["success"], n=1000)
    check(["--ok", "-n", "1000"], lambda o: o["success"], n=1000)
    check(["--regex", r"502 for job \d*5$"], lambda o: o.get("error", "").endswith("5"))
    check(["--grep", "502 for job 1"], lambda o: "502 for job 1" in o.get("error", ""))
    check(["--grep", "job \\d"], lambda o: False)  # plain text, not a regex
    check(["--endpoint", "/h/7", "--endpoint", "/h/1?", "--source", "mcp", "--source", "langfuse"],
          lambda o: re.fullmatch(r"/h/(7|1\d)", o["endpoint"]) and o["source"] == "mcp")
    check(["--field", "trace=t3"], lambda o: o["trace"] == "t3")
    check(["--field", "seq=12"], lambda o: o["seq"] == 12)
    # Relative and absolute times; ops stamped out of order are judged by their own stamp.
    check(["--since", "2h", "-n", "1000"], lambda o: od.op_time(o).timestamp() >= now - 7200, n=1000)
    check(["--since", "150m", "--until", "100m"],
          lambda o: now - 9000 <= od.op_time(o).timestamp() <= now - 6000)
    until = history_op(0, 9000, now)["timestamp"]
    check(["--until", until, "--failed"], lambda o: not o["success"] and o["timestamp"] <= until)
    check(["--failed", "--source", "scenario", "--since", "10000s"],
          lambda o: not o["success"] and o["source"] == "scenario" and od.op_time(o).timestamp() >= now - 10000)
    # As journalctl: -r (--reverse) prints newest first, --lines is -n, and all is every op.
    for flags in (["-n", "5", "-r"], ["--lines", "5", "--reverse"]):
        assert ndjson(run_ops(journal, "-o", "ndjson", *flags).stdout) == newest_first[:5]
    assert ndjson(run_ops(journal, "-o", "ndjson", "-n", "all").stdout) == ops


def test_ops_reads_the_journal_and_segments_the_config_names(tmp_path):
    ops = write_history_segments(tmp_path, time.time())
    config = write_settings(tmp_path, {"persist_path": "ops.jsonl", "keep_files": 1})
    result = run_ops("--config", str(config), "-n", "1000", "-o", "ndjson", cwd="/")
    assert result.returncode == 0, result.stderr
    assert ndjson(result.stdout) == ops[30:]  # .2 is beyond keep_files = 1
    # A file named alone: no config is read (not even a broken one in the working folder), and
    # every segment beside it is, however far.
    (tmp_path / "ops.jsonl.2").rename(tmp_path / "ops.jsonl.7")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "lakehouse.toml").write_text("[observerd]\nkeep_files = 'x'\n")
    alone = run_ops(str(tmp_path / "ops.jsonl"), "-n", "1000", cwd=tmp_path / "elsewhere")
    assert alone.returncode == 0 and ndjson(alone.stdout) == ops


def test_ops_outputs_a_table_one_json_array_or_ndjson(tmp_path):
    now = time.time()
    ops = [history_op(1, 30, now, endpoint="/mcp/search", success=True, duration_ms=12.5),
           history_op(2, 20, now, endpoint="/scenario/checkout\x1b[2J", source="scenario",
                      error="HTTP 502 from the payment gateway, after three retries"),
           history_op(3, 10, now, endpoint="/mcp/search", success=False, error="timeout\nafter 30s")]
    path = tmp_path / "ops.jsonl"
    path.write_bytes(b"".join(map(od.encode_line, ops)))
    as_json = run_ops(str(path), "-o", "json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == ops
    assert ndjson(run_ops(str(path), "-o", "ndjson").stdout) == ops
    assert ndjson(run_ops(str(path)).stdout) == ops  # not a terminal: ndjson
    table = run_ops(str(path), "-o", "table", env={"COLUMNS": "120"}).stdout.splitlines()
    assert re.split(r"\s{2,}", table[0]) == ["TIME", "SOURCE", "ENDPOINT", "OK", "DURATION", "ERROR"]
    assert len(table) == 4 and all(len(line) <= 120 for line in table)
    oldest, middle, newest = table[1:]
    # What a client sent is shown, never obeyed: controls as their JSON escapes.
    assert newest.startswith(ops[2]["timestamp"]) and " FAIL " in newest and "timeout\\nafter 30s" in newest
    assert "\x1b" not in middle and "/scenario/checkout\\u001b[2J" in middle
    assert middle.endswith("…") and "HTTP 502 from the" in middle
    assert re.search(r" ok +12\.5ms$", oldest)
    # Columns line up: each column starts where its title does.
    for title in ("ENDPOINT", "OK", "ERROR"):
        column = table[0].index(title)
        assert all(line[column - 2:column] == "  " and line[column] != " " for line in table[1:] if len(line) > column)
    wide = run_ops(str(path), "-o", "table", env={"COLUMNS": "1000"}).stdout
    assert "HTTP 502 from the payment gateway, after three retries" in wide


@pytest.mark.parametrize("args, status, needle", [
    (["--since", "last week"], 2, "--since must be a time like 2026-12-06T04:00:00Z, '2026-12-06 04:00'"),
    (["--until", "2026-13-01T00:00:00Z"], 2, "--until must be"),
    (["--regex", "("], 2, "--regex is not a valid regular expression"),
    (["--grep", "a", "--grep", "b"], 2, "--grep is given more than once"),
    (["--failed", "--ok"], 2, "--ok contradicts failed"),
    (["-f", "-r"], 2, "-f with -r: following prints oldest first, -r newest first"),
    (["-f", "--count-by", "endpoint"], 2, "-f with --count-by"),
    (["--lines", "some"], 2, "--lines: must be a whole number"),
    (["--nope"], 2, "unrecognized arguments: --nope (see observerd.py ops --help)"),
    (["--count-by", ""], 2, "--count-by must name a field"),
    (["--field", "novalue"], 2, "--field must be key=value"),
    (["--source", "nope"], 2, "--source must be one of"),
    (["-f", "-o", "json"], 2, "-f with -o json: one array"),
])
def test_ops_names_a_bad_argument_in_one_line_and_exits_2(tmp_path, args, status, needle):
    path = tmp_path / "ops.jsonl"
    path.write_bytes(od.encode_line(op()))
    result = run_ops(str(path), *args)
    assert (result.returncode, result.stdout) == (status, "")
    assert needle in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_ops_without_a_journal_says_why_and_exits_2(tmp_path):
    missing = run_ops(str(tmp_path / "none.jsonl"))
    assert missing.returncode == 2 and "none.jsonl: no journal there" in missing.stderr
    ephemeral = run_ops("--config", str(write_settings(tmp_path, {"persist_path": ""})))
    assert ephemeral.returncode == 2 and "ephemeral" in ephemeral.stderr
    assert missing.stderr.count("\n") == ephemeral.stderr.count("\n") == 1
    bad = run_ops("--config", str(write_settings(tmp_path, {"keep_files": -1})))
    assert bad.returncode == 2 and "keep_files must be >= 0" in bad.stderr


def test_ops_that_cannot_read_the_journal_says_so_in_one_line_and_exits_1(tmp_path):
    (tmp_path / "ops.jsonl").write_bytes(od.encode_line(op()))
    os.symlink("ops.jsonl.1", tmp_path / "ops.jsonl.1")  # a loop: no file can be read there
    result = run_ops(str(tmp_path / "ops.jsonl"))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"{tmp_path / 'ops.jsonl.1'}: cannot read: Too many levels of symbolic links\n"


def test_ops_help_has_an_example():
    result = run_ops("--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "--since 1h --failed" in result.stdout
    assert "exit status" in result.stdout


def test_ops_into_a_pipe_that_closes_early_ends_quietly(tmp_path):
    path = tmp_path / "ops.jsonl"
    # Far more than a pipe holds, so the writer is still writing when head exits.
    path.write_bytes(b"".join(od.encode_line(history_op(i, 100, extra="x" * 200)) for i in range(5000)))
    result = subprocess.run(f"{shlex.quote(sys.executable)} {shlex.quote(str(DAEMON))} ops "
                            f"{shlex.quote(str(path))} -n 5000 | head -n 1; exit ${{PIPESTATUS[0]}}",
                            shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout)["seq"] == 0  # the newest 5000, oldest first


def test_ops_follow_prints_appended_ops_across_the_daemons_rotations(tmp_path, daemons, followers):
    daemon = start_durable_daemon(daemons, tmp_path, max_file_bytes=1200, keep_files=50)
    client = daemon.client()
    post_seqs(client, range(10))
    post_seqs(client, [10], keep="yes")
    follower = followers(str(tmp_path / "ops.jsonl"), "-n", "3", "--field", "keep=yes")
    follower.wait_seqs([10], "the backlog: the one op kept")
    post_seqs(client, range(11, 14), keep="no")
    post_seqs(client, range(14, 30), keep="yes")
    follower.wait_seqs([10] + list(range(14, 30)), "every kept op once, in order, across rotations")
    # Stopped while the daemon rotates several times: on waking it reads the segments rotated
    # meanwhile too, not only the file the path names now.
    follower.proc.send_signal(signal.SIGSTOP)
    rotations = daemon.log.count('msg="rotated journal"')
    post_seqs(client, range(30, 80), keep="yes")
    assert daemon.log.count('msg="rotated journal"') - rotations >= 3
    follower.proc.send_signal(signal.SIGCONT)
    follower.wait_seqs([10] + list(range(14, 80)), "the ops of every segment rotated while it slept")
    status, stderr = follower.interrupt()
    assert (status, stderr) == (0, "")


def test_ops_follow_reads_every_segment_newer_than_a_file_rotated_away_while_it_slept(tmp_path, daemons,
                                                                                     followers):
    daemon = start_durable_daemon(daemons, tmp_path, max_file_bytes=1200, keep_files=2)
    client = daemon.client()
    live = tmp_path / "ops.jsonl"
    follower = followers(str(live), "-n", "1")
    post_seqs(client, [0])
    follower.wait_seqs([0], "the backlog")
    follower.proc.send_signal(signal.SIGSTOP)
    followed = live.stat().st_ino
    names = [live] + [tmp_path / f"ops.jsonl.{n}" for n in (1, 2)]
    seq = 1
    # Until the file it follows is deleted (rotated past keep_files), and no further: every
    # segment on disk then came after it.
    while any(path.exists() and path.stat().st_ino == followed for path in names):
        post_seqs(client, [seq])
        seq += 1
    follower.proc.send_signal(signal.SIGCONT)
    follower.wait_seqs(list(range(seq)), "the rest of the deleted file, then every segment after it")


def test_ops_follow_starts_with_the_newest_n_oldest_first(tmp_path, daemons, followers):
    daemon = start_durable_daemon(daemons, tmp_path)
    post_seqs(daemon.client(), range(10))
    follower = followers(str(tmp_path / "ops.jsonl"), "-n", "3")
    follower.wait_seqs([7, 8, 9], "the backlog")
    post_seqs(daemon.client(), [10])
    follower.wait_seqs([7, 8, 9, 10], "the new op")


def test_ops_follow_moves_to_the_new_file_after_logrotate_and_sighup(tmp_path, daemons, followers):
    daemon = start_durable_daemon(daemons, tmp_path)
    client = daemon.client()
    post_seqs(client, range(5))
    live = tmp_path / "ops.jsonl"
    follower = followers(str(live), "-n", "1")
    follower.wait_seqs([4], "the backlog")
    post_seqs(client, range(5, 8))
    follower.wait_seqs([4, 5, 6, 7], "ops before the rotation")
    os.rename(live, tmp_path / "ops.jsonl-20261126")  # logrotate's move, without `create`
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reopened journal" in daemon.log, timeout=60, what="the reopen")
    post_seqs(client, range(8, 12))
    follower.wait_seqs(list(range(4, 12)), "ops after the SIGHUP, in the new file")
    os.rename(live, tmp_path / "ops.jsonl-20261127")
    post_seqs(client, range(12, 15))  # no signal: the next append makes the path again
    follower.wait_seqs(list(range(4, 15)), "ops after a move without a signal")
    assert follower.interrupt() == (0, "")


def test_ops_follow_into_a_pipe_that_closes_ends_quietly(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path)
    client = daemon.client()
    post_seqs(client, range(2))
    pipeline = subprocess.Popen(f"{shlex.quote(sys.executable)} {shlex.quote(str(DAEMON))} ops -f -n 2 "
                                f"{shlex.quote(str(tmp_path / 'ops.jsonl'))} | head -n 3; exit ${{PIPESTATUS[0]}}",
                                shell=True, executable="/bin/bash", stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    i = 2
    # head exits after its third line; ops learns it at its next write, and must end quietly.
    while pipeline.poll() is None:
        post_seqs(client, [i])
        i += 1
        time.sleep(0.05)
        assert i < 5000, "ops -f never noticed its reader had gone"
    assert (pipeline.returncode, pipeline.stderr.read()) == (0, "")
    first = seqs(ndjson(pipeline.stdout.read()))
    assert first == list(range(first[0], first[0] + 3))  # the backlog's two, and the next


def test_ops_follow_reads_a_file_truncated_in_place_from_its_start(tmp_path):
    path = tmp_path / "ops.jsonl"
    path.write_bytes(b"".join(od.encode_line(history_op(i, 10)) for i in range(3)))
    with od.JournalFiles(path, 0) as files:
        follower = od.JournalFollower(path, 0, od.OpFilter({}, time.time()), od.SkippedLines(), files.live())
    try:
        append_to(path, od.encode_line(history_op(3, 5)))
        assert seqs(plain(follower.poll())) == [3]
        with open(path, "r+b") as f:  # logrotate's copytruncate
            f.truncate(0)
        append_to(path, od.encode_line(history_op(4, 1)))
        assert seqs(plain(follower.poll())) == [4]
    finally:
        follower.close()


def test_ops_since_reads_on_through_lines_another_writer_spelled_otherwise(tmp_path):
    now = datetime.now(timezone.utc)
    lines = []
    for i in range(20_000):  # ~2 MB, all in the last half hour, keys in another order than observerd's
        stamp = (now - timedelta(seconds=i * 0.09)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        endpoint = "/rare" if i in (0, 19_999) else f"/common/{i % 7}"
        lines.append(json.dumps({"duration_ms": 1, "success": True, "timestamp": stamp, "source": "mcp",
                                 "endpoint": endpoint, "n": i}))
    journal = tmp_path / "other.jsonl"
    journal.write_text("\n".join(reversed(lines)) + "\n")
    result = run_cli("ops", str(journal), "--since", "1h", "--endpoint", "/rare", "-o", "ndjson")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["n"] for line in result.stdout.splitlines()] == [19_999, 0]


def test_ops_follow_starts_with_the_newest_ten_as_tail_does(tmp_path, daemons, followers):
    daemon = start_durable_daemon(daemons, tmp_path)
    post_seqs(daemon.client(), range(15))
    follower = followers(str(tmp_path / "ops.jsonl"))
    follower.wait_seqs(list(range(5, 15)), "the newest ten")
    post_seqs(daemon.client(), [15])
    follower.wait_seqs(list(range(5, 16)), "the new op")


def test_ops_over_url_refuses_what_the_daemon_cannot_do_in_one_line(serve):
    url = f"http://127.0.0.1:{serve().port}"
    for args, needle in ((["-f"], "-f follows the journal's files, not --url"),
                         (["--regex", "a.b"], "--regex is the command line's only"),
                         (["ops.jsonl"], "FILE and --url name two journals")):
        result = run_ops("--url", url, *args)
        assert (result.returncode, result.stdout) == (2, "")
        assert needle in result.stderr and result.stderr.count("\n") == 1, result.stderr


# -----------------------------------------------------------------------------
# [SECTION] Browser page
# -----------------------------------------------------------------------------

def test_ui_page_is_served_with_its_security_headers_and_an_etag(serve):
    resp, body = get_page(serve().port)
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/html; charset=utf-8"
    assert resp.getheader("X-Content-Type-Options") == "nosniff"
    assert resp.getheader("Cache-Control") == "no-cache"
    csp = csp_directives(resp.getheader("Content-Security-Policy"))
    assert csp["default-src"] == ["'none'"] and csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == csp["base-uri"] == csp["form-action"] == ["'none'"]
    assert csp["img-src"] == ["data:"]
    assert all(len(csp[name]) == 1 and csp[name][0].startswith("'sha256-") for name in ("script-src", "style-src"))
    etag = resp.getheader("ETag")
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag), etag  # strong: no W/
    assert etag.strip('"') == od.hashlib.sha256(body).hexdigest()[:32]


@pytest.mark.parametrize("if_none_match, status", [
    ("{etag}", 304), ("W/{etag}", 304), ('"other", {etag}', 304), ("*", 304),
    ('"other"', 200), ("{etag}x", 200),
])
def test_ui_page_answers_304_when_the_browser_holds_it(serve, if_none_match, status):
    server = serve()
    etag = get_page(server.port)[0].getheader("ETag")
    head = "GET /observer/ui HTTP/1.1\r\nHost: x\r\nIf-None-Match: {}\r\nConnection: close\r\n\r\n"
    raw = raw_exchange(server.port, head.format(if_none_match.format(etag=etag)).encode())
    stream = io.BytesIO(raw)
    got, headers = read_head(stream)
    assert got == status and headers["etag"] == etag
    assert headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    assert int(headers["content-length"]) == len(od.UI_DOCUMENT.payload)
    assert len(stream.read()) == (0 if status == 304 else len(od.UI_DOCUMENT.payload))


def test_ui_page_parses_and_holds_every_element_its_script_fills():
    page = PageParts(od.UI_DOCUMENT.payload.decode())
    assert len(page.scripts) == 1 and len(page.styles) == 1
    filled = set(re.findall(r'\$\("([\w-]+)"\)', page.scripts[0]))
    assert {"chart", "conn", "ready", "endpoints-body", "ops-body", "history-body", "token"} <= filled
    assert filled <= set(page.ids), filled - set(page.ids)
    assert len(page.ids) == len(set(page.ids))
    assert "innerHTML" not in page.scripts[0] and "outerHTML" not in page.scripts[0]
    assert "insertAdjacentHTML" not in page.scripts[0] and "document.write" not in page.scripts[0]
    assert not [name for _, name, _ in page.attributes if name.startswith("on")]  # CSP blocks them


def test_ui_page_refers_to_nothing_outside_itself_and_its_api():
    page = PageParts(od.UI_DOCUMENT.payload.decode())
    url = re.compile(r"(?i)(?:[a-z][a-z0-9+.-]*:)?//[^\s*/]|url\(|@import|\bimport\s*\(")
    for text in page.scripts + page.styles:
        assert not url.search(text), url.search(text)
    links = [(tag, name, value) for tag, name, value in page.attributes
             if name in ("src", "href", "action", "formaction", "srcset", "poster", "data", "xlink:href")]
    assert links == [("link", "href", "data:,")]  # no favicon request either
    assert len(od.UI_DOCUMENT.payload) < 40 * 1024


def test_ui_page_fetches_relative_paths_so_the_gateway_prefix_is_kept():
    script = PageParts(od.UI_DOCUMENT.payload.decode()).scripts[0]
    fetched = re.findall(r'\bapi\("([^"?]+)', script)
    assert set(fetched) >= {"timeline", "stats", "playbooks", "ready", "history"}, fetched
    assert "/observer" not in script


def test_ui_csp_hashes_match_the_inline_script_and_style(serve):
    resp, body = get_page(serve().port)
    page = PageParts(body.decode())
    csp = csp_directives(resp.getheader("Content-Security-Policy"))
    for directive, text in (("script-src", page.scripts[0]), ("style-src", page.styles[0])):
        digest = od.base64.b64encode(od.hashlib.sha256(text.encode()).digest()).decode()
        assert csp[directive] == [f"'sha256-{digest}'"], directive


def test_ui_page_loads_while_the_daemon_restores_and_its_data_waits(tmp_path, daemons):
    daemon, gate = daemon_holding_its_restore(daemons, tmp_path)
    resp, body = get_page(daemon.port)
    assert resp.status == 200 and body == od.UI_DOCUMENT.payload
    assert get_fresh(daemon.port, "/observer/stats")[:2] == (503, {"error": od.RESTORING})
    os.close(os.open(gate, os.O_WRONLY))
    wait_for(lambda: get_fresh(daemon.port, "/observer/stats")[0] == 200, what="the restore to finish")


def test_ui_page_needs_no_token_but_its_data_does(serve):
    server = serve(token="s3cret")
    resp, body = get_page(server.port)
    assert resp.status == 200 and b"<svg" in body
    assert get_page(server.port, method="HEAD")[0].status == 200
    client = server.client()
    for path in ("/observer/timeline", "/observer/stats", "/observer/playbooks", "/observer/ops",
                 "/observer/history", "/observer/ready"):
        assert client.get(path)[0] == 401, path


@in_chromium
def test_chromium_shows_what_stats_says_and_survives_a_restart(tmp_path, daemons, fake_service):
    daemon = start_observed_daemon(daemons, tmp_path, escalate_url=fake_service().url + "/api/run")
    client = daemon.client()
    posted = page_traffic()
    post_over_time(client, posted, 20)
    failed_newest_first = [o["error"] for o in reversed(posted) if o["endpoint"] == "/mcp/fail"]
    wait_for(lambda: client.get("/observer/escalations")[1]["escalations"]
             and client.get("/observer/playbooks")[1]["playbooks"], what="escalation and playbooks")
    stats = client.get("/observer/stats")[1]
    url = f"http://127.0.0.1:{daemon.port}/observer/ui"
    shots = screenshot_folder(tmp_path)
    browser = Browser(tmp_path)
    try:
        tab = browser.tab(1280, 800)
        tab.go(url)
        state = tab.wait(f"(s => s.connClass === 'ok' && s.escalations[0].length > 1 && s.playbooks[0].length > 1 && s)({PAGE_STATE})",
                         "the first refresh with data")
        # The header's counts are /observer/stats'; the chart counted the same ops per source.
        assert (number_in(state["total"]), number_in(state["ok"]), number_in(state["failed"])) == (
            stats["total"], stats["successes"], stats["failures"])
        assert state["bySource"] == stats["by_source"]
        for source, count in stats["by_source"].items():
            assert f"{source}: {count} ops in 300 s" in state["legend"]
        assert f"failures (all sources): {stats['failures']} ops in 300 s" in state["legend"]
        assert state["polylines"] == [300] * (len(stats["by_source"]) + 1)  # a point a second
        assert state["ready"] == "ready"
        # The failing endpoint leads the table and the clusters, and was escalated.
        assert state["endpoints"][0][:3] == ["/mcp/fail", "60", "60"]
        assert state["clusters"][0][:2] == ["/mcp/fail", "60"]
        assert [state["escalations"][0][1], state["escalations"][0][3]] == ["/mcp/fail", "sent"]
        assert state["playbooks"][0][:2] == ["/scenario/checkout", "12"]
        # Hostile strings are shown as text: nothing they hold ran, or even became an element.
        assert [HOSTILE, "<script>alert(2)</script>"] in [[row[2], row[5]] for row in state["ops"]]
        assert state["images"] == 0 and tab.problems() == []
        tab.screenshot(shots / "ui-1280x800.png")

        # The table sorts by a header, both ways.
        tab.js('document.querySelector("#endpoints button[data-sort=ops]").click()')
        ops_column = [number_in(row[1]) for row in tab.js(PAGE_STATE)["endpoints"]]
        assert ops_column == sorted(ops_column, reverse=True)
        tab.js('document.querySelector("#endpoints button[data-sort=ops]").click()')
        assert [number_in(row[1]) for row in tab.js(PAGE_STATE)["endpoints"]] == sorted(ops_column)

        # The endpoints are of the last 5 minutes, or of the whole ring at a click; clusters are dated.
        assert state["endpointsOver"].startswith("Over the ops of the ring stamped since ")
        assert state["clustersNote"].startswith("As the analysis at ")
        tab.js('document.getElementById("endpoints-window").click()')
        tab.wait(f"(s => s.endpointsOver === 'Over the ops in the ring')({PAGE_STATE})", "the whole ring")
        tab.js('document.getElementById("endpoints-window").click()')
        tab.wait(f"(s => s.endpointsOver.startsWith('Over the ops of the ring stamped'))({PAGE_STATE})", "5 min")

        # Filters narrow the recent ops.
        tab.js('document.getElementById("f-failed").click()')
        tab.wait(f"(s => s.ops.length && s.ops.every((r) => r[3] === 'FAIL'))({PAGE_STATE})", "failed ops only")
        type_into(tab, "f-text", "JOB 7")
        assert sorted(row[5] for row in tab.js(PAGE_STATE)["ops"]) == ["upstream 502 for job 7"]

        # An endpoint opens its ops from the journal, 50 at a time, older ones by cursor;
        # an endpoint that looks like a glob means itself only.
        click(tab, "endpoints-body", "/q[1]")
        state = tab.wait(f"(s => s.history.length && s.historyNote && s)({PAGE_STATE})", "history of /q[1]")
        assert [row[2] for row in state["history"]] == ["/q[1]"] and state["olderHidden"]
        click(tab, "clusters-body", "/mcp/fail")
        state = tab.wait(f"(s => s.history.length === 50 && !s.olderHidden && s)({PAGE_STATE})", "a first page")
        assert {row[2] for row in state["history"]} == {"/mcp/fail"}
        assert [row[5] for row in state["history"]] == failed_newest_first[:50]
        tab.js('document.getElementById("history-older").click()')
        state = tab.wait(f"(s => s.history.length === 60 && s)({PAGE_STATE})", "the older page")
        assert state["olderHidden"] and "no older ops" in state["historyNote"]
        assert [row[5] for row in state["history"]] == failed_newest_first
        tab.js('document.getElementById("history-close").click(); document.getElementById("f-failed").click(); '
               'document.querySelector("#endpoints button[data-sort=failures]").click()')
        type_into(tab, "f-text", "")

        for width, height, dark in ((1280, 800, True), (390, 844, False), (390, 844, True)):
            tab.view(width, height, dark)
            tab.js("document.activeElement.blur(); window.scrollTo(0, 0)")
            tab.wait("(c => c.viewBox.baseVal.width === Math.max(300, c.clientWidth))(document.getElementById('chart'))",
                     "the chart redrawn")
            tab.screenshot((tmp_path if dark else shots) / f"ui-{width}x{height}{'-dark' if dark else ''}.png")
            assert tab.js(PAGE_LAYOUT) == {"sideways": [], "cutHeaders": [], "cutSignatures": [],
                                           "pageSideways": False}, (width, dark)
        assert any(LONG_ERROR[:40] in row[4] for row in tab.js(PAGE_STATE)["clusters"])

        # New data redraws the table under a keyboard user's focus, which stays where it was.
        tab.js('[...document.querySelectorAll("#ops-body button")].find((b) => b.textContent === "/q1").focus()')
        assert client.post("/observer/event", {"endpoint": "/new"})[0] == 200
        tab.wait(f"{PAGE_STATE}.ops[0][2] === '/new'", "the new op listed")
        assert tab.js("document.activeElement.textContent") == "/q1"
        assert tab.js("document.getElementById('ops-body').contains(document.activeElement)")
        stats = client.get("/observer/stats")[1]

        # Hidden, the page stops asking; shown again, it starts at once.
        tab.js("(real => { window.fetches = 0; window.fetch = (...a) => (window.fetches++, real(...a)); })(window.fetch)")
        tab.js('Object.defineProperty(document, "hidden", {configurable: true, get: () => true}); '
               'document.dispatchEvent(new Event("visibilitychange"))')
        time.sleep(3)  # any refresh already under way ends
        before = tab.js("window.fetches")
        time.sleep(5)  # more than two refresh periods: nothing may be asked
        assert tab.js("window.fetches") == before
        tab.js('delete document.hidden; document.dispatchEvent(new Event("visibilitychange"))')
        tab.wait(f"window.fetches > {before}", "refreshing again")

        # The daemon goes away: the page says so; it comes back: the page recovers by itself.
        daemon.proc.kill()
        daemon.exit_status()
        tab.wait(f"{PAGE_STATE}.conn.startsWith('disconnected — retrying')", "disconnected")
        write_settings(tmp_path, {"bind": f"127.0.0.1:{daemon.port}", "persist_path": "ops.jsonl"})
        daemons(tmp_path, config=tmp_path / "lakehouse.toml").wait_listening()
        state = tab.wait(f"(s => s.connClass === 'ok' && s)({PAGE_STATE})", "live again")
        assert number_in(state["total"]) == stats["total"]
        assert tab.problems() == []
    finally:
        browser.close()
    print(f"screenshots: {shots}/ui-1280x800.png, {shots}/ui-390x844.png; dark ones in {tmp_path}")


@in_chromium
def test_chromium_says_why_it_is_not_ready_until_it_is(tmp_path, daemons):
    daemon, gate = daemon_holding_its_restore(daemons, tmp_path)
    browser = Browser(tmp_path)
    try:
        tab = browser.tab(1280, 800)
        tab.go(f"http://127.0.0.1:{daemon.port}/observer/ui")
        state = tab.wait(f"(s => s.ready.startsWith('not ready') && s)({PAGE_STATE})", "not ready, and why")
        assert state["ready"] == f"not ready: {od.RESTORING}" and state["connClass"] == "bad"
        assert state["conn"] == f"GET stats: 503 {od.RESTORING} — retrying" and state["total"] == "…"
        assert state["endpoints"] == [["no ops in the last 5m"]]  # what the timeline said, meanwhile
        os.close(os.open(gate, os.O_WRONLY))
        state = tab.wait(f"(s => s.connClass === 'ok' && s)({PAGE_STATE})", "ready once restored")
        assert state["ready"] == "ready" and tab.problems() == []
    finally:
        browser.close()


@in_chromium
def test_chromium_asks_for_the_token_and_says_when_it_is_wrong(tmp_path, daemons):
    daemon = start_observed_daemon(daemons, tmp_path, token="s3cret", access_log=True)
    client = daemon.client(token="s3cret")
    assert client.post("/observer/events", page_traffic())[0] == 200
    stats = client.get("/observer/stats")[1]
    url = f"http://127.0.0.1:{daemon.port}/observer/ui"
    browser = Browser(tmp_path)
    try:
        tab = browser.tab(1280, 800)
        tab.go(url)
        state = tab.wait(f"(s => !s.authHidden && s)({PAGE_STATE})", "the token form")
        assert "needs its bearer token" in state["authMessage"] and state["total"] == "…"
        tab.js('document.getElementById("token").value = "é"; document.getElementById("auth").requestSubmit()')
        tab.wait(f"{PAGE_STATE}.authMessage.includes('printable ASCII')", "a token fetch could not send, refused")
        submit = ('document.getElementById("token").value = {}; '
                  'document.getElementById("auth").requestSubmit()')
        tab.js(submit.format(json.dumps("s3cres")))
        state = tab.wait(f"(s => !s.authHidden && s.authMessage.includes('refused') && s)({PAGE_STATE})",
                         "the wrong token refused")
        assert "401" in state["authMessage"] and state["total"] == "…"
        print(f"screenshot: {tab.screenshot(tmp_path / 'ui-token-refused.png')}")
        tab.js(submit.format(json.dumps("s3cret")))
        state = tab.wait(f"(s => s.connClass === 'ok' && s)({PAGE_STATE})", "data with the right token")
        assert state["authHidden"] and number_in(state["total"]) == stats["total"]
        # Kept for this tab only, and never put in the address.
        assert tab.js('sessionStorage.getItem("observerd.token")') == "s3cret"
        assert tab.js("location.href") == url and tab.js('document.getElementById("token").value') == ""
        assert "/observer/timeline" in daemon.log and "s3cret" not in daemon.log
        assert tab.problems() == []
    finally:
        browser.close()


@in_chromium
def test_chromium_shows_the_latest_correction_verdicts(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path, **CORRECTION_SETTINGS)
    post_ops(daemon.client(), corrected_endpoints(time.time()))
    wait_for(lambda: len(daemon.client().get("/observer/timeline")[1]["corrections"]) == 4, what="four verdicts")
    browser = Browser(tmp_path)
    try:
        tab = browser.tab(1280, 800)
        tab.go(f"http://127.0.0.1:{daemon.port}/observer/ui")
        rows = tab.wait("(r => r.length === 4 && r[0].length > 1 && r)(Array.from("
                        "document.querySelectorAll('#corrections-body tr'), (tr) => Array.from(tr.cells, (td) => td.textContent)))",
                        "the correction verdicts")
        assert [row[1:3] for row in rows] == [["/later", "pending"], ["/broke", "hurt"], ["/idle", "no change"],
                                              ["/fixed", "helped"]]
        assert rows[1][3] == "0 % → 60 %" and tab.problems() == []
    finally:
        browser.close()


# -----------------------------------------------------------------------------
# [SECTION] Docs: a README a newcomer finishes, links that resolve, every example honest (no one section's)
# -----------------------------------------------------------------------------

README_MAX_LINES = 400
# The pages a person reads: the README, every page of docs/, and the benchmark's.
DOC_PAGES = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md")), HERE / "bench" / "README.md"]
DOC_SUBCOMMANDS = ("serve", "check", "stats", "top", "ops", "runs", "compare", "corrections")


def test_the_readme_stays_at_most_400_lines():
    lines = len((HERE / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move the detail into docs/"


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def heading_anchors(text: str) -> set[str]:
    """The #anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as -."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} (.+)$", without_code_blocks(text), re.M)}


def test_every_link_between_the_docs_resolves_to_a_file_and_heading():
    broken = []
    for page in DOC_PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code_blocks(text)):
            if re.match(r"[a-z]+:", target):
                continue  # another site's page
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(HERE)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text()):
                broken.append(f"{page.relative_to(HERE)}: {target} (no such heading)")
    assert broken == []


def test_one_table_in_the_docs_lists_each_filter_with_its_flag_and_its_query_parameter():
    tables = [(page, table) for page in DOC_PAGES
              for table in re.findall(r"^\| flag \| query parameter \|.*\n(?:\|.*\n)+", page.read_text(), re.M)]
    assert len(tables) == 1, [page.name for page, _ in tables]
    rows = [row.split(" | ")[:2] for row in tables[0][1].splitlines()[2:]]
    flags = [flag for flag_cell, _ in rows for flag in re.findall(r"`--([a-z-]+)", flag_cell)]
    assert flags == [f.name for f in od.FILTERS]
    for spec in od.FILTERS:
        (parameters,) = [parameter for flag_cell, parameter in rows if f"`--{spec.name}" in flag_cell]
        assert (f"`{spec.name}" in parameters) == spec.http, spec.name


def doc_command_lines(page: Path) -> list[str]:
    """Each command line of a page's code blocks, a `\\` continuation joined and a `$ ` prompt
    left out; then each `curl …` of the page's inline code."""
    lines, in_block, pending = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_block, pending = not in_block, ""
        elif in_block:
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1]
                continue
            pending = ""
            lines.append(line.removeprefix("$ "))
    return lines + re.findall(r"`(curl [^`]+)`", without_code_blocks(page.read_text()))


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at |, &&, ;), as words; comments left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split = True
    commands, words = [], []
    for word in lexer:
        if word in ("|", "||", "&&", ";", "&", ">", ">>", "<"):
            commands.append(words)
            words = []
        else:
            words.append(word)
    return [words for words in commands + [words] if words]


def doc_examples(program: str) -> list[tuple[str, str, list[str]]]:
    """(page, line, words) of every example in the docs running `program`; for observerd.py the
    words are the variables set for it (`OBSERVERD_TOKEN=…`), then its arguments."""
    examples = []
    for page in DOC_PAGES:
        for line in doc_command_lines(page):
            if program not in line:
                continue  # other code: Python, Go, TOML, output
            for words in shell_commands(line):
                if program == "observerd.py":
                    at = next((i for i, word in enumerate(words) if word.endswith("/observerd.py")
                               or word == "observerd.py"), None)
                    # `python3 …/observerd.py ARGS`, not `install observerd.py /opt/…`
                    if at and re.search(r"(^|/)python3?(\.\d+)?$", words[at - 1]):
                        env = [word for word in words[:at - 1] if re.match(r"[A-Z_]+=", word)]
                        examples.append((page.name, line, env + words[at + 1:]))
                elif words[0] == program:
                    examples.append((page.name, line, words))
    return examples


def test_every_observerd_example_of_the_docs_runs(daemons, tmp_path):
    """Each `python3 observerd.py …` line of the README and docs/ through the real parser, and
    the read-only ones for real against a daemon and its journal: a flag, subcommand or value the
    code does not take fails here. serve runs as check with the same flags; `-f` runs without
    following; the config, --url and a FILE are this test's."""
    now = time.time()
    journal = tmp_path / "ops.jsonl"
    journal.write_bytes(b"".join(od.encode_line(op(
        endpoint, source=endpoint.split("/")[1], success=i % 3 != 0, duration_ms=i,
        error=None if i % 3 else "upstream timeout after 3000 ms", run_id=f"run-{980 + i // 20}",
        trace_id=f"{i:016x}", timestamp=od.rfc3339_of(now - 7200 + i * 36)))
        for i in range(200) for endpoint in ("/mcp/search", "/scenario/checkout")))
    settings = {"persist_path": "ops.jsonl", "runtime_dir": "run"}
    daemon = daemons(tmp_path, config=write_settings(tmp_path, {"bind": "127.0.0.1:0", **settings}))
    daemon.wait_listening()
    url = f"http://127.0.0.1:{daemon.port}"
    config = write_settings(tmp_path, {"bind": f"127.0.0.1:{daemon.port}", **settings})  # the default
    examples = doc_examples("observerd.py")
    assert len(examples) >= 20 and {"README.md", "debugging.md", "comparisons.md"} <= {e[0] for e in examples}
    ran = Counter()
    for page, line, words in examples:
        env = dict(word.split("=", 1) for word in itertools.takewhile(lambda w: re.match(r"[A-Z_]+=", w), words))
        argv = words[len(env):]
        taken = {"--config": str(config), "--url": url, "--bind": "127.0.0.1:0"}
        for i, word in enumerate(argv):
            if i and argv[i - 1] in taken:
                argv[i] = taken[argv[i - 1]]
            elif word.endswith(".jsonl"):
                argv[i] = str(journal)
        if any(word.startswith("[") for word in argv):  # a synopsis: each flag its command's
            sub = next((word for word in argv if word in DOC_SUBCOMMANDS), None)
            usage = run_cli(*([sub] if sub else []), "--help").stdout
            assert all(re.search(rf"{flag}\b", usage) for flag in re.findall(r"--?[a-z][\w-]*", line)), \
                f"{page}: {line}"
            continue
        parser = od.build_parser()
        try:
            args, unknown = parser.parse_known_args(argv)
        except SystemExit as exc:
            assert exc.code == 0 and {"--help", "--version"} & set(argv), f"{page}: {line}"
            continue
        assert unknown == [], f"{page}: {line}: {unknown}"
        command = args.command or "serve"
        if command == "serve":
            argv = ["check", *(word for word in argv if word != "serve")]
        argv = [word for word in argv if word not in ("-f", "--follow")]
        result = subprocess.run([sys.executable, str(DAEMON), *argv], capture_output=True, text=True,
                                timeout=60, cwd=tmp_path, env={**os.environ, **env},
                                preexec_fn=default_sigint())
        assert result.returncode == 0 and "Traceback" not in result.stderr, \
            f"{page}: {line}\n{argv}\n{result.stderr}"
        ran[command] += 1
    assert set(ran) == set(DOC_SUBCOMMANDS), ran


def test_every_curl_example_of_the_docs_names_a_route_and_method_the_daemon_serves(serve):
    """Each `curl …` of the README and docs/, sent to a real daemon: its route and method exist,
    a GET's query parameters are all known (an unknown one is a 400), a JSON body is taken."""
    server = serve()
    examples = doc_examples("curl")
    assert len(examples) >= 15 and "README.md" in {page for page, _, _ in examples}
    for page, line, words in examples:
        flags_with_values = {"-X", "-H", "-d", "--data", "--data-binary", "-o", "-w", "--cacert"}
        values = {flag: words[i + 1] for i, flag in enumerate(words[:-1]) if flag in flags_with_values}
        (target,) = [word for i, word in enumerate(words[1:], 1)
                     if ":3219" in word and words[i - 1] not in flags_with_values]
        parts = urllib.parse.urlsplit(target if "://" in target else "http://" + target)
        body = values.get("-d", values.get("--data", values.get("--data-binary")))
        method = values.get("-X", "POST" if body is not None else "GET")
        route = od.ObserverHandler.ROUTES.get(parts.path)
        assert route is not None and method in route.methods, f"{page}: {line}"
        if body is not None and body.startswith(("{", "[")):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request(method, parts.path, body=body.encode())
            status = conn.getresponse().status
            conn.close()
            assert status == 200, f"{page}: {line}: {status}"
        elif method == "GET":
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""))
            answer = conn.getresponse()
            error = answer.read()
            conn.close()
            # 410: a cursor of the example's journal, not of this one
            assert answer.status in (200, 302, 410), f"{page}: {line}: {answer.status} {error[:300]}"


# -----------------------------------------------------------------------------
# [SECTION] End to end: crashes under load, fuzzing, restarts (no one section's)
# -----------------------------------------------------------------------------

def test_unknown_fields_round_trip_through_file_stats_and_restart(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path)
    sent = {"endpoint": "/run", "source": "scenario", "trace_id": "t-1", "langfuse": {"span": [1, 2.5, None]},
            "timestamp": "2026-11-24T19:56:56.123456Z"}
    assert daemon.client().post("/observer/event", sent)[0] == 200
    stored = json.loads((tmp_path / "ops.jsonl").read_text())
    assert stored == {**sent, "success": False, "duration_ms": 0}
    daemon.stop()
    daemon = start_durable_daemon(daemons, tmp_path)
    assert daemon.client().get("/observer/stats")[1]["recent_scenario_ops"] == [stored]


def test_sigkill_under_concurrent_load_loses_no_acknowledged_op(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path, ring_size=100000)
    writers = Writers(daemon.port, 8, lambda n, i: {"endpoint": f"/w{n}/{i}", "success": i % 3 == 0})
    acked = writers.acked
    wait_for(lambda: len(acked) >= 400, timeout=120, what="400 acknowledged ops")
    daemon.proc.kill()
    daemon.exit_status()
    writers.stop()

    lines = (tmp_path / "ops.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"", "file must end with a complete line"
    stored = [od.validate_op(od.parse_json_strict(line)) for line in lines[:-1]]
    stored_endpoints = {o["endpoint"] for o in stored}
    missing = [e for e in acked if e not in stored_endpoints]
    assert not missing, f"{len(missing)} acknowledged ops lost, e.g. {missing[:3]}"

    daemon = start_durable_daemon(daemons, tmp_path, ring_size=100000)
    assert daemon.client().get("/observer/stats")[1] == stats_of(stored, ring_size=100000)


def test_fuzzed_requests_never_kill_the_daemon_and_stats_match_the_200s(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path, ring_size=10000, request_timeout_s=0.5)
    rng = random.Random(20261124)
    accepted = 0
    for i in range(3000):
        raw = raw_exchange(daemon.port, fuzz_request(rng, i))
        if not raw:
            continue
        status, body = parse_response(raw)
        assert status < 500 or status in (501, 505), (i, status, body)
        if status == 200 and body and body.get("accepted") is True:
            accepted += 1
    assert daemon.proc.poll() is None, "daemon died"
    assert accepted > 200
    stats = daemon.client().get("/observer/stats")[1]
    assert stats["total"] == accepted
    assert stats == stats_of(replay_forward(tmp_path / "ops.jsonl"), ring_size=10000)
    assert "Traceback" not in daemon.log


def test_hostile_ops_keep_the_daemon_small_and_are_served_whole(tmp_path, daemons):
    daemon = start_durable_daemon(daemons, tmp_path, max_ring_bytes=8 * MIB)
    client = daemon.client(timeout=60)
    # 2 MiB of [{},{},…] decodes to ~50 MB: held decoded, ten of them were half a gigabyte.
    body = b'{"endpoint":"/hostile","source":"scenario","x":[' + b"{}," * (2 * MIB // 3) + b"{}]}"
    for _ in range(10):
        assert client.post("/observer/event", body)[0] == 200
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    assert rss_kib < 200 * 1024, status
    client.conn.request("GET", "/metrics")
    families = parse_exposition(client.conn.getresponse().read().decode())
    assert 0 < sample(families, "observerd_ring_bytes") <= 8 * MIB
    stats = client.get("/observer/stats")[1]
    assert 1 <= stats["total"] < 10  # the ring covers fewer ops; the journal keeps all ten
    assert len(stats["recent_scenario_ops"]) == stats["total"]
    assert len(stats["recent_scenario_ops"][-1]["x"]) == 2 * MIB // 3 + 1
    assert len((tmp_path / "ops.jsonl").read_bytes().splitlines()) == 10
    ops = client.get(f"/observer/ops?limit={stats['total']}")[1]
    assert ops["count"] == stats["total"] and ops["ops"][0] == stats["recent_scenario_ops"][-1]


# -----------------------------------------------------------------------------
# [SECTION] Deploy files: the shipped rules (promtool), a real Prometheus over two daemons, the shippers
# and the unit (beside the code, in deploy/)
# -----------------------------------------------------------------------------

@needs_promtool
def test_the_shipped_rules_pass_promtool_check_and_their_unit_tests():
    for argv in (["check", "rules", RULES], ["test", "rules", DEPLOY / "observerd.rules.test.yml"]):
        result = subprocess.run([PROMTOOL, *map(str, argv)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_runbook_section_in_the_docs_and_every_section_an_alert():
    alerts = alerts_and_runbooks()
    assert len(alerts) >= 8
    runbook = HERE / "docs" / "alerts.md"
    sections = re.findall(r"^## (\w+)$", runbook.read_text(), re.M)
    assert sorted(sections) == sorted(alerts)
    for alert, target in alerts.items():
        assert target == f"docs/alerts.md#{alert.lower()}", alert


def test_the_rules_read_only_metrics_observerd_exports_and_the_readme_lists_every_one():
    families = parse_exposition(od.Metrics().render())
    exported = set(families) | {f"{name}_{part}" for name, family in families.items()
                                if family["type"] == "histogram" for part in ("bucket", "sum", "count")}
    exprs = " ".join(re.findall(r"expr: (.*(?:\n {10,}.*)*)", RULES.read_text()))
    read = set(re.findall(r"(?<![\w:])observerd_\w+", exprs))
    assert read and read <= exported, read - exported
    readme_metrics = next(line for line in (HERE / "README.md").read_text().splitlines()
                          if line.startswith("| `GET /metrics` |"))
    assert [name for name in families if f"`{name}" not in readme_metrics] == []


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not on PATH (apt-get install prometheus)")
def test_a_real_prometheus_over_two_daemons_sums_the_fleet_and_alerts_on_one_journal(tmp_path, daemons, prometheus):
    started = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        config = write_settings(folder, {"bind": "127.0.0.1:0", "persist_path": "ops.jsonl"})
        started.append(daemons(folder, config=config, preexec_fn=limit_file_size(1 << 40)).wait_listening())
    a, b = started
    instance = {daemon: f"127.0.0.1:{daemon.port}" for daemon in started}
    prom = prometheus(tmp_path / "prometheus", list(instance.values()))
    wait_for(lambda: prom.by_instance("up") == {i: 1.0 for i in instance.values()}, timeout=120,
             what="prometheus to scrape both")
    # Traffic after the first scrape, so that the rates see it; in two rounds, each scraped,
    # as an endpoint's series starts at its first count (a client library's new label does too).
    for round_ in (1, 2):
        for daemon, ops in ((a, [op(f"/a/{i % 3}", success=i % 4 != 0) for i in range(15)]),
                            (b, [op("/b", success=True)] * 5 + [op("/b", source="scenario")] * 5)):
            assert daemon.client().post("/observer/events", ops)[0] == 200
        # Both scraped, with every op each instance stored.
        counts = {instance[a]: 15.0 * round_, instance[b]: 10.0 * round_}
        wait_for(lambda: prom.by_instance("sum by (instance) (observerd_events_total)") == counts,
                 timeout=120, what=f"prometheus to scrape {counts}")
    assert prom.query("sum(observerd_events_total)") == {(): 50.0}

    # The fleet rule, at an evaluation's own timestamp, is the sum of both instances' rates
    # computed from the raw counters at that time (retried: a scrape may land between the two).
    def fleet_is_the_sum() -> bool:
        recorded = prom.get("/api/v1/query", query="job_source:observerd_events:rate5m[5s]")["result"]
        if not recorded:
            return False
        for series in recorded:
            at, value = series["values"][-1]
            source = series["metric"]["source"]
            per_instance = prom.query(f'sum by (instance) (rate(observerd_events_total{{source="{source}"}}[5m]))',
                                      time=at)
            if len(per_instance) != 2 or not math.isclose(float(value), sum(per_instance.values()), rel_tol=1e-9):
                return False
            if source == "mcp" and not all(rate > 0 for rate in per_instance.values()):
                return False  # both instances' mcp ops are in the window: the sum has two terms
        return True
    wait_for(fleet_is_the_sum, timeout=120, what="the fleet rule to equal the sum of the instances")
    # Per endpoint too, over the fleet.
    wait_for(lambda: {dict(labels)["endpoint"] for labels in prom.query("job_endpoint:observerd_events:rate5m > 0")}
             == {"/a/0", "/a/1", "/a/2", "/b"}, timeout=120, what="the endpoints' fleet rates")

    assert prom.firing("ObserverdJournalNotWritable") == set()
    # A real fault on a's journal only: its file may not grow (a full disk, as the process sees it).
    resource.prlimit(a.proc.pid, resource.RLIMIT_FSIZE, ((tmp_path / "a" / "ops.jsonl").stat().st_size,
                                                         resource.RLIM_INFINITY))
    assert a.client().post("/observer/event", op("/a/lost"))[0] == 503
    assert b.client().post("/observer/event", op("/b"))[0] == 200
    wait_for(lambda: prom.firing("ObserverdJournalNotWritable") == {instance[a]}, timeout=120,
             what="the not-writable alert for a")
    assert prom.firing("ObserverdNotReady") == set() and prom.firing("ObserverdDown") == set()

    resource.prlimit(a.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    wait_for(lambda: prom.firing("ObserverdJournalNotWritable") == set(), timeout=120,
             what="the not-writable alert to resolve")
    assert prom.by_instance("observerd_journal_writable") == {i: 1.0 for i in instance.values()}


def test_the_scaling_out_page_shows_the_deploy_files_exactly():
    shown = shown_deploy_files()
    assert sorted(shown) == ["clickhouse.sql", "fluent-bit.conf", "prometheus-global.yml", "prometheus.yml",
                             "vector.toml"]
    for name, text in shown.items():
        assert text == (DEPLOY / name).read_text(), name


@needs_promtool
def test_the_shipped_prometheus_configs_pass_promtool_check_config(tmp_path):
    # As installed: beside the rules, with the token file the scrape config names.
    for name in ("prometheus.yml", "prometheus-global.yml", "observerd.rules.yml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    (tmp_path / "observerd.token").write_text("s3cret\n")
    for name in ("prometheus.yml", "prometheus-global.yml"):
        result = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / name)], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_shippers_read_the_journal_and_its_segments_and_nothing_else_beside_them(tmp_path):
    vector = tomllib.loads((DEPLOY / "vector.toml").read_text())
    fluent_bit = re.search(r"^\s+Path\s+(\S+)$", (DEPLOY / "fluent-bit.conf").read_text(), re.M)[1].split(",")
    # Every file observerd keeps beside the journal the configs name, as check knows them.
    config = make_config(tmp_path, persist_path="/var/lib/observerd/ops.jsonl", keep_files=12)
    wanted = list(od.segment_paths(config.persist_path, config.keep_files))
    beside = [path for setting, _, path in od.files_of_settings(config)
              if setting == "persist_path" and path not in wanted]
    assert len(beside) >= 4
    for patterns in (vector["sources"]["observerd_journal"]["include"], fluent_bit):
        def read(path):
            return any(fnmatch.fnmatchcase(str(path), pattern) for pattern in patterns)
        assert all(map(read, wanted)), patterns
        assert not any(map(read, beside)), patterns
    # Every column Vector fills is in the ClickHouse table.
    columns = set(re.findall(r"^    (\w+) ", (DEPLOY / "clickhouse.sql").read_text(), re.M))
    remap = vector["transforms"]["observerd_ops"]["source"]
    filled = set(re.findall(r'"(\w+)": ', remap)) | set(re.findall(r"row\.(\w+) =", remap))
    assert filled and filled <= columns, filled - columns
    assert vector["sinks"]["clickhouse"]["table"] == "ops" and "CREATE TABLE IF NOT EXISTS observerd.ops" in (
        DEPLOY / "clickhouse.sql").read_text()


@pytest.mark.parametrize("tool, argv", [("vector", ["validate", "--no-environment", "vector.toml"]),
                                        ("fluent-bit", ["--dry-run", "-c", "fluent-bit.conf"])])
def test_the_shipper_configs_pass_their_own_tools_check_where_installed(tool, argv):
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not on PATH: deploy/{argv[-1]} is untested here (docs/scaling-out.md says so)")
    result = subprocess.run([path, *argv], capture_output=True, text=True, timeout=120, cwd=DEPLOY,
                            env={**os.environ, "CLICKHOUSE_PASSWORD": "x", "HOSTNAME": "host-a"})
    assert result.returncode == 0, result.stdout + result.stderr
