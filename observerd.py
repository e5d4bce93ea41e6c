#!/usr/bin/env python3
"""observerd: the witness of the lakehouse, in one standard-library-only file.

Every operation the lakehouse's autonomous work performs (MCP tools, scenario runners,
Langfuse traces, overseer corrections) is POSTed here as an ObservedOp. observerd appends
each op to a JSONL journal and fsyncs it *before* the op enters memory or is acknowledged,
keeps the newest ``ring_size`` ops in a ring for live statistics, restores that ring from the
journal's tail on restart, and watches what it records: failure clusters, playbooks, escalations.

Run it as ``python observerd.py --config lakehouse.toml``; Python 3.11+ and nothing else.
``python observerd.py --help`` lists the subcommands (serve, check, stats, top, ops, runs, compare,
corrections).

The file reads top to bottom, each section depending only on those above it, but for the data
at the end (the page the API serves, as templates go last); ``grep -nF '# [SECTION]'`` lists them:
Logging, Metrics, Config, Model, Files, Journal, Store, History, Analysis, Statistics,
Comparisons, Insights, Outbound, HTTP protocol, API, Background loops, Supervisor, Daemon, CLI and
main; then the data: Browser page.
"""

from __future__ import annotations

import sys

# Before anything that needs 3.11 (tomllib, dataclass slots) runs: one line, not a traceback.
if sys.version_info < (3, 11):
    sys.stderr.write("observerd needs Python 3.11 or newer; this is %d.%d.%d\n" % tuple(sys.version_info[:3]))
    sys.exit(2)

import signal

if __name__ == "__main__":
    # Run as a program, a stop signal from the first line on waits, blocked, for main to take
    # it: serve stops cleanly at any moment of startup (see serve), the other commands say so
    # in one line, and neither prints a traceback from whichever import it landed in.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

import argparse
import base64
import errno
import fcntl
import bisect
import difflib
import errno
import fnmatch
import functools
import hashlib
import hmac
import itertools
import http.client
import ipaddress
import json
import math
import os
import pwd
import queue
import re
import resource
import shutil
import socket
import ssl
import stat
import struct
import tempfile
import threading
import time
import tomllib
import traceback
import zlib
from collections import Counter, deque
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field as dataclass_field, make_dataclass
from typing import NamedTuple
from datetime import datetime, timedelta, timezone, tzinfo
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

VERSION = "2.0.0"
SERVICE = "observerd"


# =============================================================================
# [SECTION] Logging: one key=value line per event on stderr, like Go's slog text handler
# =============================================================================

_LOG_LOCK = threading.Lock()
# What a terminal would obey rather than show: C0 and C1 controls, and the invisible and
# bidi marks that reorder or hide text. A log value holding any is quoted, with them escaped.
_UNSHOWABLE_CHARS = "\x00-\x1f\x7f-\x9f\xad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\U000e0000-\U000e007f"
_UNSHOWABLE = re.compile(f"[{_UNSHOWABLE_CHARS}]")
_BARE_VALUE = re.compile(f"[^\\s\"=\\\\{_UNSHOWABLE_CHARS}]+")


class PerSecond:
    """A text that changes once a second (a timestamp's date part, the Date header), formatted
    once for each second asked: formatting is most of what stamping costs."""

    def __init__(self, render: Callable[[int], str]) -> None:
        self._render = render
        self._last: tuple[int, str] = (-1, "")  # replaced whole: a reader never sees half of it

    def __call__(self, second: int) -> str:
        last_second, text = self._last
        if second != last_second:
            text = self._render(second)
            self._last = (second, text)
        return text


def rfc3339_second(second: int) -> str:
    """A whole UTC second as RFC 3339 spells it: YYYY-MM-DDTHH:MM:SS (no zone)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


_rfc3339_second_now = PerSecond(rfc3339_second)


def rfc3339_of(seconds: float) -> str:
    """A time as UTC RFC 3339 with microseconds and a Z suffix, as observerd stamps ops."""
    whole = math.floor(seconds)
    return f"{_rfc3339_second_now(whole)}.{int((seconds - whole) * 1_000_000):06d}Z"


def utc_now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with microseconds and a Z suffix."""
    return rfc3339_of(time.time())


def showable(text: str) -> str:
    """text with what a client sent (an endpoint, an error) shown to a terminal, never obeyed
    by it: each control as its JSON escape, like \\u001b."""
    return _UNSHOWABLE.sub(lambda match: json.dumps(match[0])[1:-1], text)


def _logfmt_value(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = ""
    else:
        text = str(value)
    return text if _BARE_VALUE.fullmatch(text) else showable(json.dumps(text, ensure_ascii=False))


def log(level: str, msg: str, **fields: object) -> None:
    """Write one log line: time, level, msg, then the fields in the order given."""
    parts = [f"time={utc_now_rfc3339()}", f"level={level}", f"msg={_logfmt_value(msg)}"]
    parts.extend(f"{key}={_logfmt_value(value)}" for key, value in fields.items())
    line = " ".join(parts) + "\n"
    with _LOG_LOCK:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # a full or closed stderr must never take a request down with it


# =============================================================================
# [SECTION] Metrics: counters, gauges and histograms in Prometheus text format 0.0.4, and the cap on
# label values clients choose
# =============================================================================

ENDPOINT_LABELS = 32  # endpoints observerd_endpoint_events_total names; the rest are OTHER_LABEL
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _format_labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values)) + "}"


def _format_number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class Metric:
    """One metric family: a counter or gauge, with values per label set.

    A family without labels starts at 0; one with labels starts at 0 for each label set
    declared, so that increase() sees the first event instead of a series appearing at 1.
    """

    def __init__(self, name: str, kind: str, help_text: str, labels: tuple[str, ...] = (),
                 from_zero: bool = True):
        self.name, self.kind, self.help_text, self.labels = name, kind, help_text, labels
        self.values: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()
        if not labels and from_zero:  # else no sample until set: a gauge of something absent
            self.declare([()])

    def _zero(self) -> object:
        return 0

    def declare(self, label_sets) -> None:
        """Export each of these label value tuples from 0 (those already counted stay)."""
        with self._lock:
            for label_values in label_sets:
                self.values.setdefault(tuple(label_values), self._zero())

    def inc(self, *label_values: str, amount: float = 1) -> None:
        with self._lock:
            self.values[label_values] = self.values.get(label_values, 0) + amount

    def add(self, amounts: dict[tuple[str, ...], float]) -> None:
        """inc() of each label value tuple by its amount, under one lock."""
        with self._lock:
            for label_values, amount in amounts.items():
                self.values[label_values] = self.values.get(label_values, 0) + amount

    def set(self, value: float, *label_values: str) -> None:
        self.values[label_values] = value

    def samples(self):
        with self._lock:
            items = sorted(self.values.items())
        for label_values, value in items:
            yield f"{self.name}{_format_labels(self.labels, label_values)} {_format_number(value)}"


class _Distribution:
    """One label set's histogram: a count per bucket (the last above every bound), sum, count."""

    __slots__ = ("buckets", "sum", "count")

    def __init__(self, bucket_count: int):
        self.buckets = [0] * bucket_count
        self.sum = 0.0
        self.count = 0


class Histogram(Metric):
    """A histogram with fixed buckets, per label set."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = SECONDS_BUCKETS):
        self.buckets = buckets
        super().__init__(name, "histogram", help_text, labels)

    def _zero(self) -> _Distribution:
        return _Distribution(len(self.buckets) + 1)

    def observe(self, value: float, *label_values: str) -> None:
        with self._lock:
            state = self.values.get(label_values)
            if state is None:
                state = self.values[label_values] = self._zero()
            state.buckets[bisect.bisect_left(self.buckets, value)] += 1
            state.sum += value
            state.count += 1

    def quantile(self, q: float, *label_values: str) -> float | None:
        """An estimate of the q-quantile (0 < q <= 1) of everything observed; None before any.

        As Prometheus's histogram_quantile() estimates it: linear within the bucket the rank
        falls in, so it is off by at most that bucket's width; past the last bound, that bound.
        """
        with self._lock:
            state = self.values.get(label_values)
            if state is None or not state.count:
                return None
            counts = list(state.buckets)
            rank = q * state.count
        below, lower = 0, 0.0
        for upper, count in zip(self.buckets, counts):
            if below + count >= rank:
                return lower + (upper - lower) * (rank - below) / count
            below, lower = below + count, upper
        return float(self.buckets[-1])

    def samples(self):
        with self._lock:
            items = sorted((k, (list(v.buckets), v.sum, v.count)) for k, v in self.values.items())
        names = self.labels + ("le",)
        for label_values, (counts, total, count) in items:
            cumulative = 0
            for bound, n in zip(self.buckets + (math.inf,), counts):
                cumulative += n
                le = _format_number(bound if bound == math.inf else float(bound))
                yield f"{self.name}_bucket{_format_labels(names, label_values + (le,))} {cumulative}"
            yield f"{self.name}_sum{_format_labels(self.labels, label_values)} {_format_number(total)}"
            yield f"{self.name}_count{_format_labels(self.labels, label_values)} {count}"


OTHER_LABEL = "(other)"  # the label value standing for every value a cap leaves unnamed


class CappedLabel:
    """Client text (an endpoint) as a label value, from a bounded set: the first `cap` values
    named keep their names, every later one is OTHER_LABEL, so the series a scrape holds stay
    bounded whatever clients send. Names are never given up: a counter's series must not move.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, value: str) -> bool:
        """Whether value is named already (read without the lock: names are only ever added)."""
        return value in self._named

    def name(self, value: str) -> tuple[str, bool]:
        """(the label value for value, whether it was named just now)."""
        if value in self._named:
            return value, False
        if len(self._named) >= self.cap:  # full for good: no lock to find that
            return OTHER_LABEL, False
        with self._lock:
            if value in self._named:
                return value, False
            if len(self._named) < self.cap:
                self._named.add(value)
                return value, True
        return OTHER_LABEL, False


class Metrics:
    """Every metric observerd exports, rendered for GET /metrics.

    sources, rejection_reasons and llm_backends are the label values known at startup (declared
    where they are defined, further down): each combination is exported from 0.
    """

    LLM_OUTCOMES = ("answered", "failed")
    ESCALATION_OUTCOMES = ("sent", "failed")
    SUCCESS = ("true", "false")

    def __init__(self, sources: tuple[str, ...] = (), rejection_reasons: tuple[str, ...] = (),
                 llm_backends: tuple[str, ...] = ()):
        self.events = Metric("observerd_events_total", "counter",
                             "Ops accepted and made durable, by source and success.", ("source", "success"))
        self.endpoint_events = Metric(
            "observerd_endpoint_events_total", "counter",
            f"Ops accepted and made durable, by endpoint and success: the {ENDPOINT_LABELS} busiest endpoints "
            f"in the ring at restore, then the first new ones, by name; every other as {OTHER_LABEL}.",
            ("endpoint", "success"))
        self.duplicates = Metric("observerd_duplicates_total", "counter",
                                 "Ops acknowledged but not stored again: their op_id was already stored.")
        self.ring_ops = Metric("observerd_ring_ops", "gauge", "Ops currently in the in-memory ring.")
        self.ring_bytes = Metric("observerd_ring_bytes", "gauge",
                                 "Memory held by the ring's ops, as max_ring_bytes counts it.")
        self.rejected = Metric("observerd_rejected_total", "counter",
                               "Requests refused, by reason.", ("reason",))
        self.persist_errors = Metric("observerd_persist_errors_total", "counter",
                                     "Appends to the JSONL journal that failed and were rolled back.")
        self.journal_probes = Metric("observerd_journal_probes_total", "counter",
                                     "Checks of a journal that could not be written, by what they found.",
                                     ("found",))
        self.fsync_seconds = Histogram("observerd_fsync_seconds", "Time spent in fsync of the JSONL journal.")
        self.ready = Metric("observerd_ready", "gauge",
                            "1 when a write would be accepted now (GET /observer/ready is 200), else 0.")
        self.journal_writable = Metric(
            "observerd_journal_writable", "gauge",
            "1 while the journal takes appends, 0 from a failed append until one succeeds or the probe "
            "finds one would; absent without a journal.", from_zero=False)
        self.journal_disk_free = Metric(
            "observerd_journal_disk_free_bytes", "gauge",
            "Bytes observerd may still write on the filesystem holding the journal; absent without one.",
            from_zero=False)
        self.journal_disk_size = Metric(
            "observerd_journal_disk_size_bytes", "gauge",
            "Size of the filesystem holding the journal; absent without one.", from_zero=False)
        self.escalations = Metric("observerd_escalations_total", "counter",
                                  "Deliveries of failure clusters to escalate_url, by outcome.", ("outcome",))
        self.http_requests = Metric("observerd_http_requests_total", "counter",
                                    "HTTP responses, by route and status code.", ("route", "code"))
        self.http_seconds = Histogram("observerd_http_request_seconds",
                                      "Time from request line to response ready to send, by route.", ("route",))
        self.llm_requests = Metric("observerd_llm_requests_total", "counter",
                                   "Calls of the review to its LLM backends, by backend and outcome.",
                                   ("backend", "outcome"))
        self.start_time = Metric("observerd_start_time_seconds", "gauge",
                                 "Start time of the process, in seconds since the Unix epoch.")
        self.build_info = Metric("observerd_build_info", "gauge",
                                 "Always 1; the labels say what is running.", ("version", "python"))
        self.start_time.set(time.time())
        self.build_info.set(1, VERSION, ".".join(map(str, sys.version_info[:3])))
        self.events.declare((source, success) for source in sources for success in self.SUCCESS)
        self.endpoint_events.declare((OTHER_LABEL, success) for success in self.SUCCESS)
        self.escalations.declare((outcome,) for outcome in self.ESCALATION_OUTCOMES)
        self.rejected.declare((reason,) for reason in rejection_reasons)
        self.journal_probes.declare([("failing",), ("writable",)])
        self.llm_requests.declare((backend, outcome) for backend in llm_backends for outcome in self.LLM_OUTCOMES)

    def render(self) -> str:
        lines = []
        for metric in vars(self).values():
            lines.append(f"# HELP {metric.name} {metric.help_text}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"


# =============================================================================
# [SECTION] Config: the [observerd] and [auth] tables of the shared lakehouse.toml
# =============================================================================

DEFAULT_CONFIG_PATH = "lakehouse.toml"


@dataclass(frozen=True, slots=True)
class Setting:
    """One key observerd reads from lakehouse.toml: all the code and the README know of it."""

    name: str
    kind: type  # exact: a bool is not an int here; an int is taken where a float is wanted
    default: object
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    path: bool = False  # "" = none; relative to the folder it was given in (see load_config)
    url: str = ""  # "endpoint": used as given; "base": paths are appended, so a trailing / goes
    table: str = "observerd"
    secret: bool = False  # never shown: check says only whether it is set
    choices: tuple[str, ...] = ()  # the values it may take, if it is one of a few
    env: bool = False  # names an environment variable whose value, a secret, is read at load

    @property
    def in_file(self) -> str:
        """How problems name it when the file gave it."""
        return f"[{self.table}] {self.name}"

    @property
    def label(self) -> str:
        """How the README's settings table names it."""
        return self.name if self.table == "observerd" else self.in_file

    @property
    def flag(self) -> str:
        """How the command line spells it, where it takes it."""
        return "--" + self.name.replace("_", "-")

    @property
    def env_value(self) -> str:
        """The Config attribute holding the value of the variable an env setting names."""
        return self.name.removesuffix("_env")


# A year: every duration setting stays below it, where the platform's timers still work.
MAX_SECONDS = 365 * 24 * 3600
# How an LLM backend is spoken to (see ask_llm): Ollama's /api/generate, or the OpenAI-compatible
# /v1/chat/completions that hosted APIs (and Ollama, vLLM, llama.cpp) serve.
LLM_APIS = ("ollama", "openai")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The one declaration of every setting, in the README's order (a test compares the two).
SETTINGS = (
    Setting("bind", str, "127.0.0.1:3219", "host:port to listen on ([v6]:port for IPv6)"),
    Setting("persist_path", str, "data/observer/ops.jsonl", 'the JSONL journal; "" = ephemeral',
            path=True),
    Setting("ring_size", int, 2000, "ops kept in memory", minimum=1),
    Setting("max_ring_bytes", int, 64 * 1024 * 1024, "memory bound of the ring's ops", minimum=1),
    Setting("recent_scenarios", int, 10, "cap of recent_scenario_ops in stats", minimum=0),
    Setting("max_body_bytes", int, 4 * 1024 * 1024, "request body cap", minimum=1),
    Setting("request_timeout_s", float, 10.0, "time for a whole request or answer",
            minimum=0.001, maximum=MAX_SECONDS),
    Setting("max_connections", int, 256, "open connections", minimum=1),
    Setting("allow_unauthenticated", bool, False, "allow a non-loopback bind without a token"),
    Setting("max_batch", int, 1000, "ops per POST /observer/events", minimum=1),
    Setting("dedupe_window", int, 100_000, "stored ops whose op_ids are remembered; 0 = off", minimum=0),
    Setting("max_file_bytes", int, 0, "rotate the journal past this size; 0 = never", minimum=0),
    Setting("keep_files", int, 3, "rotated journal segments kept", minimum=0, maximum=1000),
    Setting("runtime_dir", str, "/dev/shm/observerd",
            'tmpfs folder recording journal bytes whose fsync failed, until reboot; "" = none', path=True),
    Setting("max_scan_bytes", int, 64 * 1024 * 1024, "journal bytes one GET /observer/history reads",
            minimum=1),
    Setting("run_field", str, "run_id", "the op field naming the run an op belongs to"),
    Setting("analyze_interval_s", float, 30.0, "failure clustering period; 0 = off",
            minimum=0, maximum=MAX_SECONDS),
    Setting("corrections_path", str, "", 'the overseer\'s corrections JSONL; "" = off', path=True),
    Setting("corrections_interval_s", float, 5.0, "corrections tailing period",
            minimum=0, maximum=MAX_SECONDS),
    Setting("verdict_window_s", float, 900.0, "ops compared before and after each correction",
            minimum=0.001, maximum=MAX_SECONDS),
    Setting("playbooks_path", str, "", 'where playbooks are written; "" = serve only', path=True),
    Setting("consolidate_interval_s", float, 60.0, "playbook folding period; 0 = off",
            minimum=0, maximum=MAX_SECONDS),
    Setting("escalate_url", str, "", 'the LLM team\'s /api/run; "" = never escalate', url="endpoint"),
    Setting("escalate_threshold", int, 5, "failures of a cluster that escalate it", minimum=1),
    Setting("escalate_window_s", float, 300.0, "the window those failures fall in",
            minimum=0.001, maximum=MAX_SECONDS),
    Setting("escalate_cooldown_s", float, 1800.0, "quiet time after an escalation",
            minimum=0, maximum=MAX_SECONDS),
    Setting("escalate_token_env", str, "", "environment variable holding escalate_url's bearer token",
            env=True),
    Setting("review_llm_url", str, "", "base URL of the first LLM backend of the review", url="base"),
    Setting("review_llm_model", str, "llama3", "model name sent to it"),
    Setting("review_llm_api", str, "ollama", "how it is spoken to", choices=LLM_APIS),
    Setting("review_llm_key_env", str, "", "environment variable holding its bearer key", env=True),
    Setting("review_fallback_url", str, "", "base URL of the LLM backend asked when the first fails",
            url="base"),
    Setting("review_fallback_model", str, "", "model name sent to it"),
    Setting("review_fallback_api", str, "openai", "how it is spoken to", choices=LLM_APIS),
    Setting("review_fallback_key_env", str, "", "environment variable holding its bearer key", env=True),
    Setting("outbound_timeout_s", float, 5.0, "total time of an outbound HTTP call",
            minimum=0.001, maximum=MAX_SECONDS),
    Setting("tls_cert", str, "", "PEM certificate chain: serve HTTPS", path=True),
    Setting("tls_key", str, "", "PEM private key of tls_cert", path=True),
    Setting("access_log", bool, False, "log one line per request"),
    Setting("token", str, "", "bearer token every route but health and the page needs", table="auth", secret=True),
)
SETTING = {setting.name: setting for setting in SETTINGS}


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason, ``warnings`` what else
    was found wrong on the way."""

    def __init__(self, source: str, problems: list[str], warnings: tuple[str, ...] = ()):
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems
        self.warnings = warnings


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ConfigBase:
    """What Config derives from its fields: the bind address."""

    __slots__ = ()

    @property
    def bind(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def address_family(self) -> socket.AddressFamily:
        """The family of the socket serve listens on."""
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


Config = make_dataclass(
    "Config",
    [("host", str), ("port", int)]  # bind, parsed
    + [(s.name, (Path | None) if s.path else s.kind, dataclass_field(repr=not s.secret)) for s in SETTINGS
       if s.name != "bind"]
    + [(s.env_value, str, dataclass_field(repr=False)) for s in SETTINGS if s.env]  # "" = none
    + [("source", str), ("warnings", tuple)],  # warnings: WARN in serve, printed by check
    bases=(_ConfigBase,), frozen=True, slots=True,
    namespace={"__module__": __name__, "__doc__": "The effective settings, after file, CLI flags "
               "and environment: one attribute per setting."},
)


def parse_bind(text: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port") into its parts; raises ValueError."""
    scheme, sep, rest = text.partition("://")
    if sep:
        raise ValueError(f"bind {text!r} must be host:port, without {scheme}://: e.g. {rest.partition('/')[0]!r}")
    if any(char.isspace() for char in text):
        raise ValueError(f"bind {text!r} must be host:port, without spaces")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"bind {text!r} must be host:port")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"bind {text!r}: port must be 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"bind {text!r}: host is empty (use 0.0.0.0 for all interfaces)")
    return host, port


def fits_a_header(secret: str) -> bool:
    """Whether a token or key can be sent in an HTTP header as it is."""
    return secret.isascii() and secret.isprintable() and secret == secret.strip()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class GivenValue:
    """A setting's value as given, and where: the name problems use and the folder paths join."""

    value: object
    where: str
    folder: Path


def _checked(setting: Setting, value: object, where: str, problems: list[str]) -> object | None:
    """value if it has the setting's type and bounds, else None with the problem noted."""
    kind = setting.kind
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        problems.append(f"{where} must be {kind.__name__}, got {type(value).__name__}")
        return None
    if kind is float and not math.isfinite(value):  # TOML has nan and inf; no timer takes them
        problems.append(f"{where} must be a finite number, got {value}")
        return None
    if setting.minimum is not None and value < setting.minimum:
        problems.append(f"{where} must be >= {setting.minimum}, got {value}")
        return None
    if setting.maximum is not None and value > setting.maximum:
        problems.append(f"{where} must be <= {setting.maximum}, got {value}")
        return None
    return value


def _close_match(word: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate a typing slip most likely made word of, or None."""
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    close = difflib.get_close_matches(word.lower(), by_lower, n=1, cutoff=cutoff)
    return by_lower[close[0]] if close else None


def _read_table(name: str, table: object, folder: Path, given: dict[str, GivenValue],
                problems: list[str], unknown: list[str]) -> None:
    """Check one TOML table against the settings; unknown keys go to the unknown list."""
    if table is None:
        return
    if not isinstance(table, dict):
        problems.append(f"[{name}] must be a table")
        return
    for key, value in table.items():
        setting = SETTING.get(key)
        if setting is not None and setting.table != name:
            problems.append(f"{key} in [{name}] is not read there: it belongs in [{setting.table}]")
            continue
        if setting is None:
            hint = _close_match(key, [s.name for s in SETTINGS if s.table == name])
            unknown.append(f"unknown key {key!r} in [{name}]" + (f" (did you mean {hint!r}?)" if hint else ""))
            continue
        value = _checked(setting, value, setting.in_file, problems)
        if value is not None:
            given[key] = GivenValue(value, setting.in_file, folder)


# How alike a table's name must be to [observerd] to be taken for a misspelling of it: [observed],
# [observer] and [Observerd] are; [server], which another daemon may well read, is not.
TABLE_TYPO_CUTOFF = 0.85


def _read_top_level(document: dict, named: bool, problems: list[str], warnings: list[str]) -> None:
    """What lies outside observerd's own tables. A setting above any table, a table named almost
    [observerd], or a named file without [observerd] is a problem: the daemon would run on
    defaults nobody chose. Other daemons' tables are theirs; a bare key of theirs is noted."""
    misspelled = False
    for key, value in document.items():
        if key in ("observerd", "auth"):
            continue
        setting = SETTING.get(key)
        if isinstance(value, dict):
            if _close_match(key, ["observerd"], TABLE_TYPO_CUTOFF):
                problems.append(f"table [{key}] is not read: did you mean [observerd]?")
                misspelled = True
        elif setting is not None:
            problems.append(f"{key} is above any table, where it is not read: it belongs in [{setting.table}]")
        else:
            hint = _close_match(key, SETTING)
            warnings.append(f"top-level key {key!r} is not read: observerd reads only [observerd] and [auth]"
                            + (f" (did you mean {hint!r} in [{SETTING[hint].table}]?)" if hint else ""))
    if named and "observerd" not in document and not misspelled:
        problems.append("no [observerd] table: observerd reads its settings from [observerd]")


def _read_config_file(source: str, named: bool, warnings: list[str]) -> tuple[dict, Path]:
    """The config file's document and the folder its relative paths start from; a missing
    file is a warning unless it was named (--config). Raises ConfigError."""
    try:
        with open(source, "rb") as f:
            return tomllib.load(f), Path(source).resolve().parent
    except FileNotFoundError:
        if named:
            raise ConfigError(source, ["file not found (--config names another)"]) from None
        warnings.append("config file not found, using defaults")
        return {}, Path.cwd()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"invalid TOML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from None


def _resolved_values(given: dict[str, GivenValue], problems: list[str]) -> dict[str, object]:
    """Each setting's value as Config holds it: paths resolved, URLs, choices and variable
    names checked."""
    values = {}
    for setting in SETTINGS:
        value = given[setting.name].value
        if setting.path:
            value = given[setting.name].folder / value if value else None
            if setting.name == "persist_path" and value is not None:
                # The journal by its real path: rotation renames files, never a symlink to one,
                # and its lock and record are found whichever spelling a command was given.
                value = Path(os.path.realpath(value))
        elif setting.url and value:
            if not value.startswith(("http://", "https://")):
                problems.append(f"{given[setting.name].where} must be an http:// or https:// URL")
            if setting.url == "base":
                value = value.rstrip("/")
        elif setting.choices and value not in setting.choices:
            problems.append(f"{given[setting.name].where} must be one of {', '.join(setting.choices)}, "
                            f"got {value[:40]!r}")
        elif setting.env and value and not _ENV_NAME.fullmatch(value):
            # Not shown: a key pasted here by mistake must not reach the log.
            problems.append(f"{given[setting.name].where} must be the name of an environment variable "
                            "(letters, digits and _, not starting with a digit)")
        values[setting.name] = value
    return values


def _read_keys(values: dict, given: dict[str, GivenValue], environ, problems: list[str],
               warnings: list[str]) -> None:
    """The keys of the *_env settings, from the variables they name."""
    for setting in (s for s in SETTINGS if s.env):
        # A key is read from the variable its setting names, never from the file.
        name, where = values[setting.name], given[setting.name].where
        named = _ENV_NAME.fullmatch(name) is not None  # not "", nor a bad name (a problem above)
        key = environ.get(name, "") if named else ""
        if named and not key:
            warnings.append(f"{where} names {name}, which is not set: calls go without a key")
        elif not fits_a_header(key):
            problems.append(f"{where}: {name} must hold printable ASCII without leading or trailing spaces")
        values[setting.env_value] = key


def load_config(path: str | None, environ: dict[str, str] | None = None, **flags: object) -> Config:
    """Read the config file (path None = the default file, optional), then apply overrides.

    flags are settings given on the command line by name (None = not given), e.g. bind="…".
    Precedence: CLI flags > OBSERVERD_TOKEN env var > file > defaults. A relative path is
    relative to the folder it was given in: the config file's for file values (and defaults),
    the working directory for CLI flags. The keys of the *_env settings come only from the
    variables they name, in environ. Raises ConfigError listing every problem found.
    """
    environ = os.environ if environ is None else environ
    source = path or DEFAULT_CONFIG_PATH
    warnings: list[str] = []
    document, file_folder = _read_config_file(source, path is not None, warnings)
    problems: list[str] = []
    _read_top_level(document, path is not None, problems, warnings)
    given = {s.name: GivenValue(s.default, s.in_file, file_folder) for s in SETTINGS}
    _read_table("observerd", document.get("observerd"), file_folder, given, problems, problems)
    # [auth] is shared with the other lakehouse daemons, which may read keys observerd does not.
    _read_table("auth", document.get("auth"), file_folder, given, problems, warnings)
    for name, value in flags.items():
        setting = SETTING[name]
        if value is not None:
            value = _checked(setting, value, setting.flag, problems)
        if value is not None:
            given[name] = GivenValue(value, setting.flag, Path.cwd())

    host, port, bind_parsed = "127.0.0.1", 0, True
    try:
        host, port = parse_bind(given["bind"].value)
    except ValueError as exc:
        problems.append(str(exc))
        bind_parsed = False
    values = _resolved_values(given, problems)
    _read_keys(values, given, environ, problems, warnings)
    for backend in ("review_llm", "review_fallback"):
        if values[f"{backend}_url"] and not values[f"{backend}_model"]:
            problems.append(f"{given[f'{backend}_model'].where} must be set when {backend}_url is")

    if not values["run_field"] or "=" in values["run_field"]:
        # A run is found by the field filter, key=value: a key holding = could not be asked for.
        problems.append(f"{given['run_field'].where} must name a field, without =")
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        problems.append("[observerd] tls_cert and tls_key must be set together")

    token = values["token"] = environ.get("OBSERVERD_TOKEN") or values["token"]
    if token and not fits_a_header(token):
        # It travels in an HTTP header: anything else could never match what a client sends.
        where = "OBSERVERD_TOKEN" if environ.get("OBSERVERD_TOKEN") else "[auth] token"
        problems.append(f"{where} must be printable ASCII without leading or trailing spaces")
    if bind_parsed and not token and not is_loopback(host) and not values["allow_unauthenticated"]:
        problems.append(
            f"bind {given['bind'].value} is not loopback and [auth] token is empty: set a token "
            "(or OBSERVERD_TOKEN), or set allow_unauthenticated = true in [observerd]"
        )
    if problems:
        raise ConfigError(source, problems, tuple(warnings))
    del values["bind"]
    return Config(host=host, port=port, **values, source=source, warnings=tuple(warnings))


# =============================================================================
# [SECTION] Model: ObservedOp, its validation and defaults, strict JSON, gzip and batch bodies
# =============================================================================

CORRECTION_SOURCE = "overseer_correction"
# Where the corrections tailer notes each correction's line; only observerd may write it.
CORRECTION_REF = "correction_ref"
# How the key reads in a journal line: inside a JSON string its quotes would be escaped.
_CORRECTION_REF_KEY = f'"{CORRECTION_REF}":'.encode()
SOURCES = ("mcp", "scenario", "langfuse", CORRECTION_SOURCE)
DEFAULT_SOURCE = "mcp"
OPTIONAL_TEXT_FIELDS = ("input_summary", "output_summary", "error")
OP_ID = "op_id"
MAX_OP_ID_CHARS = 128
MAX_JSON_DEPTH = 64  # arrays and objects nested in an op, the op itself included
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)


class InvalidOp(ValueError):
    """An op, or a JSON document meant to hold one, was rejected; names the field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 date-time with offset; raises ValueError."""
    if not _RFC3339.fullmatch(text):
        raise ValueError("must be an RFC 3339 date-time like 2026-11-24T19:56:56Z")
    try:
        return datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"is not a valid date-time: {exc}") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _object_without_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


_STRICT_JSON = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicate_keys,
    parse_constant=_reject_constant,
    parse_float=_finite_float,
)


def parse_json_strict(data: bytes | str, what: str = "body") -> object:
    """Decode UTF-8 JSON, refusing NaN/Infinity, duplicate keys, huge and deep values.

    Raises InvalidOp naming `what` with a reason a client can act on.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return _STRICT_JSON.decode(text)
    except UnicodeDecodeError as exc:
        raise InvalidOp(what, f"is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InvalidOp(what, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidOp(what, f"is nested more than MAX_JSON_DEPTH={MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:
        raise InvalidOp(what, f"is not valid JSON: {str(exc)[:120]}") from None


def _has_lone_surrogate(text: str) -> bool:
    return _LONE_SURROGATE.search(text) is not None


def _unstorable(container: dict | list, depth: int) -> tuple[list, str] | None:
    """Where a decoded value cannot round-trip through the journal: (path, reason), innermost first.

    JSON can carry lone surrogates ("\\ud800") that UTF-8 cannot encode, and nesting that
    recursive encoders and decoders cannot follow back; either would break every later read.
    """
    if depth > MAX_JSON_DEPTH:
        return [], f"is nested more than MAX_JSON_DEPTH={MAX_JSON_DEPTH} levels deep"
    for key, item in container.items() if isinstance(container, dict) else enumerate(container):
        # A list index is an int; isascii() first, as nearly every string is ASCII.
        if type(key) is str and not key.isascii() and _has_lone_surrogate(key):
            return [], "has a key with a lone surrogate, which UTF-8 cannot encode"
        if type(item) is str:
            if not item.isascii() and _has_lone_surrogate(item):
                return [key], "contains a lone surrogate, which UTF-8 cannot encode"
        elif isinstance(item, (dict, list)):
            found = _unstorable(item, depth + 1)
            if found is not None:
                found[0].append(key)
                return found
    return None


def _path_name(path: list) -> str:
    """["extra", "spans", 3] as extra.spans[3], cut to a length an error message can carry."""
    name = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path[:8])
    name = name.removeprefix(".")[:200] + ("…" if len(path) > 8 else "")
    return name or "body"


# Field checkers, each rule written once for ops, query parameters and review bodies: each
# returns the value it was given or raises InvalidOp naming the field.
_JSON_KINDS = {dict: "a JSON object", str: "a string", bool: "a boolean"}


def check_type(value: object, kind: type, field: str):
    """value itself if it is of kind (dict, str or bool) exactly, as JSON decodes them."""
    if type(value) is not kind:
        raise InvalidOp(field, f"must be {_JSON_KINDS[kind]}, got {json_type(value)}")
    return value


def check_positive_int(value: object, field: str, maximum: int | None = None) -> int:
    """An integer from 1 to maximum; a boolean is not one, though Python counts it as an int."""
    if type(value) is not int or value < 1 or (maximum is not None and value > maximum):
        raise InvalidOp(field, "must be a positive integer" if maximum is None
                        else f"must be an integer from 1 to {maximum}")
    return value


def check_source(value: object, field: str) -> str:
    if value not in SOURCES:
        shown = repr(value) if isinstance(value, str) else json_type(value)
        raise InvalidOp(field, f"must be one of {', '.join(SOURCES)}, got {shown[:80]}")
    return value


def check_time(value: str, field: str) -> datetime:
    try:
        return parse_rfc3339(value)
    except ValueError as exc:
        raise InvalidOp(field, str(exc)) from None


def check_op_id(value: object, field: str) -> str:
    """A client's idempotency key: 1 to MAX_OP_ID_CHARS printable characters."""
    if not 1 <= len(check_type(value, str, field)) <= MAX_OP_ID_CHARS or not value.isprintable():
        raise InvalidOp(field, f"must be 1 to {MAX_OP_ID_CHARS} printable characters")
    return value


def reject_unknown(keys, allowed: tuple[str, ...], what: str) -> None:
    """Raise InvalidOp naming the first key not in allowed, as not a `what`."""
    for key in keys:
        if key not in allowed:
            raise InvalidOp(key, f"is not a {what} (use {', '.join(allowed)})")


def validate_op(raw: object) -> dict:
    """Check one decoded ObservedOp and return it as stored: defaults filled, extras kept.

    The known fields come first in a fixed order, then unknown keys verbatim in the order
    given, so records round-trip with the other lakehouse services. An op_id comes first of
    all, so a restart finds it at the start of the line (see window_entry). Raises InvalidOp.
    """
    check_type(raw, dict, "body")
    op_id = check_op_id(raw[OP_ID], OP_ID) if OP_ID in raw else None

    endpoint = raw.get("endpoint")
    if endpoint is None:
        raise InvalidOp("endpoint", "is required")
    if not check_type(endpoint, str, "endpoint").strip():
        raise InvalidOp("endpoint", "must not be blank")

    source = raw.get("source")
    if source is None or source == "":
        source = DEFAULT_SOURCE
    else:
        check_source(source, "source")

    timestamp = raw.get("timestamp")
    if timestamp is None or timestamp == "":
        timestamp = utc_now_rfc3339()
    else:
        check_time(check_type(timestamp, str, "timestamp"), "timestamp")

    success = raw.get("success")
    if success is None:
        # A correction records a fix the overseer made: unless it says it failed, it did not.
        success = source == CORRECTION_SOURCE
    else:
        check_type(success, bool, "success")

    duration = raw.get("duration_ms")
    if duration is None:
        duration = 0
    elif type(duration) is not int and type(duration) is not float:  # a boolean is neither
        raise InvalidOp("duration_ms", f"must be a number, got {json_type(duration)}")
    elif duration < 0:
        raise InvalidOp("duration_ms", "must be >= 0")
    elif duration > sys.float_info.max or not math.isfinite(duration):
        # Reviews and playbooks compute with it as a float: 1e400 as an int would overflow there.
        raise InvalidOp("duration_ms", f"must be finite and at most {sys.float_info.max:g}")

    for field in OPTIONAL_TEXT_FIELDS:
        value = raw.get(field)
        if value is not None:
            check_type(value, str, field)

    found = _unstorable(raw, 1)
    if found is not None:
        path, reason = found
        raise InvalidOp(_path_name(path[::-1]), reason)

    op = {
        "endpoint": endpoint,
        "source": source,
        "timestamp": timestamp,
        "success": success,
        "duration_ms": duration,
    }
    if op_id is not None:
        op = {OP_ID: op_id, **op}
    for key, value in raw.items():
        if key not in op:
            op[key] = value
    return op


def validate_posted_op(raw: object) -> dict:
    """validate_op for an op a client sent: a client may not set the tailer's position."""
    op = validate_op(raw)
    if CORRECTION_REF in op:
        raise InvalidOp(CORRECTION_REF, "is reserved: observerd sets it on the corrections it tails")
    return op


class TooLarge(ValueError):
    """A number, a batch or an inflated body is over its bound (max_batch, max_body_bytes, …)."""


def bounded_int(text: str, maximum: int) -> int:
    """A non-negative decimal integer from client text, at most maximum.

    Raises ValueError for anything but ASCII digits and TooLarge above maximum (a bound below
    10**18), judged by the number of digits first, so thousands of digits never reach int().
    """
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{text[:20]!r} is not a non-negative integer")
    if len(text) > 18:  # leading zeros are allowed, and thousands of digits must not reach int()
        significant = text.lstrip("0") or "0"
        if len(significant) > 18:
            raise TooLarge(f"{significant[:20]}… is more than {maximum}")
        text = significant
    value = int(text)
    if value > maximum:
        raise TooLarge(f"{text[:20]} is more than {maximum}")
    return value


GZIP_MAGIC = b"\x1f\x8b"
GZIP_FEED_BYTES = 8192  # input given to zlib at a time: what it copies when a member ends


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Inflate a gzip body, every member of it, refusing to produce more than limit bytes.

    A gzip bomb (10 MB of zeros is 10 KB compressed) is stopped after limit + 1 bytes in
    total. Members follow each other (`gzip -c a b`); anything else after one is refused.
    """
    view = memoryview(data)
    pieces, size, pos = [], 0, 0
    try:
        while True:
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            while not inflater.eof:
                if pos == len(view):
                    raise InvalidOp("body", "is a truncated gzip stream")
                chunk = view[pos:pos + GZIP_FEED_BYTES]
                # Output stops short of the input only at limit + 1 bytes, which is refused.
                piece = inflater.decompress(chunk, limit + 1 - size)
                size += len(piece)
                if size > limit:
                    raise TooLarge(f"body inflates past max_body_bytes={limit}")
                pieces.append(piece)
                pos += len(chunk) - len(inflater.unused_data)
            if pos == len(view):
                return b"".join(pieces)
            if not GZIP_MAGIC.startswith(view[pos:pos + 2]):
                raise InvalidOp("body", f"has trailing garbage after the gzip stream ({len(view) - pos} bytes)")
    except zlib.error as exc:
        raise InvalidOp("body", f"is not valid gzip: {exc}") from None


def parse_batch(body: bytes, ndjson: bool, max_batch: int) -> list[dict]:
    """Decode and validate a batch (a JSON array, or NDJSON lines), all or nothing.

    Raises InvalidOp naming the index of the first bad op, or TooLarge.
    """
    if ndjson:
        lines = [line for line in body.split(b"\n") if line.strip()]
        if len(lines) > max_batch:
            raise TooLarge(f"batch of {len(lines)} ops exceeds max_batch={max_batch}")
        docs = [parse_json_strict(line, f"op {i}") for i, line in enumerate(lines)]
    else:
        docs = parse_json_strict(body)
        if not isinstance(docs, list):
            raise InvalidOp("body", f"must be a JSON array of ops (or NDJSON with Content-Type: "
                            f"application/x-ndjson), got {json_type(docs)}")
        if len(docs) > max_batch:
            raise TooLarge(f"batch of {len(docs)} ops exceeds max_batch={max_batch}")
    ops = []
    for i, doc in enumerate(docs):
        try:
            ops.append(validate_posted_op(doc))
        except InvalidOp as exc:
            raise InvalidOp(f"op {i}", f"is invalid: {exc}") from None
    return ops


# =============================================================================
# [SECTION] Files: a file read a block at a time, forward or backward, and its lines backward;
# every reader of the journal, the unsynced record and the corrections file reads through it
# =============================================================================

BLOCK_BYTES = 64 * 1024  # one read of a file; the most a reader holds of a line it has not ended


def file_identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file path names now, None if it names none."""
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return status.st_dev, status.st_ino


def file_size(path: Path) -> int:
    """Bytes of the file path names now; 0 while it names none."""
    try:
        return os.stat(path).st_size
    except (FileNotFoundError, NotADirectoryError):
        return 0


def blocks(fd: int, start: int, end: int):
    """(offset, block) of the bytes [start, end) of a file, in order; stops where the file ends."""
    while start < end:
        block = os.pread(fd, min(end - start, BLOCK_BYTES), start)
        if not block:
            return
        yield start, block
        start += len(block)


def blocks_backward(fd: int, end: int, floor: int = 0):
    """(offset, block) of the bytes [floor, end) of a file, newest first; raises OSError if the
    file holds fewer (it shrank while it was read)."""
    while end > floor:
        start = max(floor, end - BLOCK_BYTES)
        block = os.pread(fd, end - start, start)
        if len(block) != end - start:
            raise OSError(f"the file shrank while it was read (at byte {start + len(block)})")
        yield start, block
        end = start


def complete_end(fd: int, end: int, floor: int = 0) -> int:
    """Just after the last newline before end (floor if there is none after floor)."""
    for start, block in blocks_backward(fd, end, floor):
        newline = block.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
    return floor


def _joined(pieces: list[bytes]) -> bytes:
    """The pieces as one bytes, the list emptied: only the result stays held."""
    whole = b"".join(pieces)
    pieces.clear()
    return whole


def open_for_reading(path: Path) -> int | None:
    """A descriptor of the regular file at path, None if there is none."""
    try:
        # O_NONBLOCK: a FIFO put there must not hang the reader; a regular file ignores it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


class FollowedFile:
    """A file read as it grows, as tail -F reads one: its complete lines from an offset on (a
    line still being written waits for its newline), read again from the top once truncated
    in place (copytruncate), and told apart from the file its path names next by its inode,
    so that a reader drains it to its end before it moves to the new one."""

    __slots__ = ("path", "fd", "ino", "offset", "retire_at")

    def __init__(self, path: Path, fd: int, offset: int = 0, retire_at: float | None = None):
        self.path, self.fd, self.ino = path, fd, os.fstat(fd).st_ino
        self.offset, self.retire_at = offset, retire_at

    @classmethod
    def open(cls, path: Path) -> FollowedFile | None:
        """The regular file at path, followed from its start; None if there is none."""
        fd = open_for_reading(path)
        return None if fd is None else cls(path, fd)

    def truncated(self) -> bool:
        """Whether the file is now shorter than what was read of it; if so, it is read from
        its start again."""
        if os.fstat(self.fd).st_size >= self.offset:
            return False
        self.offset = 0
        return True

    def replaced(self) -> bool:
        """Whether the path names another file now (or none)."""
        fd = open_for_reading(self.path)
        if fd is None:
            return False  # gone: nothing newer to move to yet
        try:
            return os.fstat(fd).st_ino != self.ino
        finally:
            os.close(fd)

    def lines(self, max_line: float = math.inf):
        """(start, end, line) of the complete lines from offset on, in order, each without its
        newline; line is None for one longer than max_line, read past and never held whole.
        The caller moves offset (to an end) as it takes lines."""
        start, pieces, held, too_long = self.offset, [], 0, False
        for at, block in blocks(self.fd, self.offset, os.fstat(self.fd).st_size):
            cut = 0
            while (newline := block.find(b"\n", cut)) >= 0:
                end = at + newline + 1
                too_long = too_long or held + newline - cut > max_line
                if too_long:
                    yield start, end, None
                else:
                    pieces.append(block[cut:newline])
                    yield start, end, pieces[0] if len(pieces) == 1 else b"".join(pieces)
                start, pieces, held, too_long, cut = end, [], 0, False, newline + 1
            if not too_long:
                pieces.append(block[cut:])
                held += len(block) - cut
                too_long = held > max_line
                if too_long:
                    pieces = []

    def rest(self) -> bytes:
        """The bytes after offset: a last line that never got its newline."""
        return os.pread(self.fd, max(0, os.fstat(self.fd).st_size - self.offset), self.offset)

    def close(self) -> None:
        os.close(self.fd)


class LinesBackward:
    """A file's lines before an offset, newest first, read a block at a time: each byte is read
    once and copied once more; a line longer than a block is held whole, never twice over."""

    def __init__(self, fd: int, end: int):
        self.fd = fd
        self.end = end
        self.read_bytes = 0

    def chunks(self):
        """(offset, lines) from end back to the file's start, newest chunk first; lines start at
        offset, in file order, each ending in a newline but for whatever follows the last
        newline before end (a line still being written)."""
        carry: list[bytes] = []  # the end of a line whose start is further back, newest first
        for start, block in blocks_backward(self.fd, self.end):
            self.read_bytes += len(block)
            cut = block.find(b"\n") + 1 if start else 0
            if start and not cut:
                carry.append(block)
                continue
            pieces = [block[cut:], *reversed(carry)]
            carry = [block[:cut]]
            if len(pieces[0]) or len(pieces) > 1:
                yield start + cut, _joined(pieces)

    def lines(self):
        """(offset, line) newest first, each without its newline; the bytes after the last
        newline before end, if any, come first."""
        for offset, chunk in self.chunks():
            lines = chunk.split(b"\n")
            pos = offset + len(chunk) + 1
            del chunk  # from here on only the lines are held
            if not lines[-1]:
                lines.pop()
                pos -= 1
            while lines:
                line = lines.pop()
                pos -= len(line) + 1
                yield pos, line


# =============================================================================
# [SECTION] Journal: the durable JSONL file (its lines as ring ops and in answers, appends, rotation,
# torn-tail repair, the write probe, tail and op_id restore) and the atomic file writes the
# loops use too
# =============================================================================

_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class PersistError(Exception):
    """An append could not be made durable; the journal was rolled back to before it."""


def encode_line(op: dict) -> bytes:
    """One op as one JSONL line, UTF-8, newline-terminated."""
    return (_LINE_ENCODER.encode(op) + "\n").encode("utf-8")


# validate_op puts an op_id first, so encode_line starts its line with this: the top-level
# key for sure, as nothing precedes it. An id is at most 4 UTF-8 bytes a character (the
# encoder escapes only quotes and backslashes among printable ones), plus its closing quote.
_OP_ID_START = f'{{"{OP_ID}":"'.encode()
_OP_ID_SPAN_BYTES = len(_OP_ID_START) + 4 * MAX_OP_ID_CHARS + 1
# How the timestamp key reads in a line: a bare quote cannot occur inside an encoded string,
# so its first occurrence is the key, after op_id, endpoint and source.
_TIMESTAMP_KEY = b',"timestamp":"'
_ENDPOINT_NEXT = ',"endpoint":"'  # validate_op's order: op_id, then endpoint


def window_entry(line: bytes) -> tuple[str, int] | None:
    """(op_id, content digest) of a journal line as encode_line writes it, found without
    decoding the line; None if it does not read as such a line: an op_id first, endpoint
    next, a closing brace last.

    Restore trusts these marks instead of validating each of up to dedupe_window lines (a
    second per 100,000 here): every line observerd writes has them, and a foreign line
    that imitates them is taken at its word (see docs/clients.md, Idempotent ops). A byte that is
    not UTF-8 becomes a lone surrogate, which no op_id a client sends can hold.

    The digest is what a duplicate is compared with: a hash of the line without its
    timestamp, which the server fills when a client leaves it out, and a client may restamp
    at each attempt.
    """
    stop = len(line) - line.endswith(b"\n")
    if not line.startswith(_OP_ID_START) or not line[:stop].endswith(b"}"):
        return None
    head = line[:_OP_ID_SPAN_BYTES + len(_ENDPOINT_NEXT)].decode("utf-8", "surrogateescape")
    try:
        op_id, after = json.decoder.scanstring(head, len(_OP_ID_START))
    except ValueError:  # not closed within an op_id's length: not a line observerd wrote
        return None
    if not head.startswith(_ENDPOINT_NEXT, after):
        return None
    start = line.find(_TIMESTAMP_KEY)
    end = line.find(b'"', start + len(_TIMESTAMP_KEY)) if start >= 0 else -1
    return op_id, hash(line[:stop] if end < 0 else line[:start] + line[end:stop])


# Error text beyond this many characters is not kept in the ring, and not normalised into a
# signature: the rules cost ~0.7 s per MB, and past a few KiB the 200 normalised characters
# a signature keeps are long since settled.
ERROR_TEXT_KEPT_CHARS = 4096
SIGNATURE_MAX_CHARS = 200  # what an error signature keeps of the normalised text


class RingOp:
    """An op as the ring holds it: its journal line and the few fields stats and analysis read.

    A decoded op costs memory by its shape, not its size (a 4 MiB body of [{},{},…] decodes
    to ~100 MB); the line costs its length, so the ring can be bounded in bytes. Reads like a
    mapping of those fields, so analysis takes RingOps and op dicts alike; to_dict() decodes
    the whole op.
    """

    __slots__ = ("line", "endpoint", "source", "timestamp", "success", "duration_ms", "error", "size",
                 "signature")
    FIELDS = frozenset(("endpoint", "source", "timestamp", "success", "duration_ms", "error"))
    SIGNATURE_BYTES = 50 + SIGNATURE_MAX_CHARS  # what a cached signature costs, as a str

    def __init__(self, op: dict):
        self.line = encode_line(op)
        self.endpoint = op["endpoint"]
        self.source = sys.intern(op["source"])
        self.timestamp = op["timestamp"]
        self.success = op["success"]
        self.duration_ms = op["duration_ms"]
        error = op.get("error")
        self.error = error[:ERROR_TEXT_KEPT_CHARS] if isinstance(error, str) else None
        self.signature: str | None = None  # a failure's error signature, once analysis computed it
        # What this op costs in memory, as the ring's byte bound counts it.
        self.size = (sys.getsizeof(self) + sys.getsizeof(self.line) + sys.getsizeof(self.endpoint)
                     + sys.getsizeof(self.timestamp) + sys.getsizeof(self.error)
                     + (self.SIGNATURE_BYTES if self.success is not True else 0))

    def __getitem__(self, key: str):
        if key not in self.FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        value = getattr(self, key) if key in self.FIELDS else None
        return default if value is None else value

    def to_dict(self) -> dict:
        return json.loads(self.line)

    def __repr__(self) -> str:
        return f"RingOp({self.line[:80]!r})"


class _RingOpFound(Exception):
    pass


class _PlainJSONEncoder(json.JSONEncoder):
    """The C encoder, giving up at the first RingOp (it calls default() only for those)."""

    def default(self, o):
        raise _RingOpFound


_JSON_ENCODER = _PlainJSONEncoder(ensure_ascii=False)


def encode_json(value: object) -> bytes:
    """JSON as UTF-8, writing each RingOp as its stored line instead of decoding it.

    Answers that carry ring ops (ops, stats, escalations) so cost their ops' length, never
    their decoded size; anything without ring ops goes through the C encoder alone.
    """
    try:
        return _JSON_ENCODER.encode(value).encode("utf-8")
    except _RingOpFound:
        return _encode_with_ring_ops(value)


def _encode_with_ring_ops(value: object) -> bytes:
    if isinstance(value, RingOp):
        return value.line[:-1]
    if isinstance(value, dict):
        return b"{" + b", ".join(encode_json(k) + b": " + _encode_with_ring_ops(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b", ".join(map(_encode_with_ring_ops, value)) + b"]"
    return encode_json(value)


def fsync(fd: int, path: Path) -> None:
    """os.fsync, whose error names the path: a startup or shutdown failure says which file."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def fsync_dir(path: Path) -> None:
    """Make a directory entry change (create, rename) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd, path)
    finally:
        os.close(fd)


def make_dirs_durably(folder: Path) -> None:
    """Create folder and any missing parents, fsyncing each parent that gained an entry."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        os.mkdir(created)
        fsync_dir(created.parent)


def scratch_path(path: Path) -> Path:
    """The hidden name write_file_atomically writes path's new contents under first."""
    return path.with_name(f".{path.name}.tmp")


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replace path with data so readers see the old file or the new one, never a mix."""
    temp = scratch_path(path)
    with open(temp, "wb") as f:
        try:
            f.write(data)
            f.flush()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(temp)) from None
        fsync(f.fileno(), temp)
    os.replace(temp, path)
    fsync_dir(path.parent)


def repair_torn_tail(path: Path) -> int:
    """Cut a file back to the end of its last complete line; returns bytes dropped.

    A crash mid-append can leave a partial last line; without this the next append would
    be glued onto it. A file that ends in a newline (or is empty) is not touched.
    """
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = complete_end(f.fileno(), size)
        if end == size:
            return 0
        f.truncate(end)
        f.flush()
        fsync(f.fileno(), path)
        return size - end


def segment_paths(path: Path, keep_files: int):
    """The live file and its rotated segments, newest first: ops.jsonl, ops.jsonl.1, …

    Named one at a time, as readers stop early: restore once the ring is full, rotation at
    the first gap.
    """
    yield path
    for n in range(1, keep_files + 1):
        yield path.with_name(f"{path.name}.{n}")


def rotation_scratch_paths(path: Path) -> tuple[Path, Path]:
    """The hidden names a rotation uses: the new live file until it is renamed into place,
    and the oldest segment, set aside until the rotation can no longer fail."""
    return path.with_name(f".{path.name}.next"), path.with_name(f".{path.name}.dropped")


def probe_scratch_path(path: Path) -> Path:
    """The hidden name Journal.probe() writes its test byte under, beside the journal."""
    return path.with_name(f".{path.name}.probe")


# Read and write: an append checks the file's last byte before writing.
_APPEND_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def lock_path(journal: Path) -> Path:
    """The lock file of a journal: beside it in its resolved folder, so every spelling of its
    path (a symlink to the file or a folder, ./, ..) finds the same one."""
    resolved = Path(os.path.realpath(journal))  # realpath, unlike resolve(), never raises on a loop
    return resolved.with_name(f".{resolved.name}.lock")


class JournalLocked(Exception):
    """Another process holds the journal's lock: a second daemon would corrupt it."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"journal {path} is in use by another observerd (pid {pid or 'unknown'})")
        self.pid = pid


def _lock_file_lines(fd: int) -> list[str]:
    """What the holder wrote in a lock file: its pid, then its record's path (see UnsyncedRecord)."""
    return os.pread(fd, 4096, 0).decode("utf-8", "surrogateescape").splitlines()


class JournalLock:
    """One writer per journal: an exclusive flock on a lock file beside it, held until exit.

    The kernel releases a flock when its holder dies, however it dies, so the file is never
    deleted and no stale pid can block a restart; the pid inside only names the holder. A
    lock file, not the journal itself: rotation moves the journal to another inode. The holder
    also writes where it records unsynced ranges, so a reader given only the journal finds them.
    """

    def __init__(self, journal: Path, record: Path | None):
        self.journal = journal
        self.path = lock_path(journal)
        self.record = record
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock or raise JournalLocked; OSError if the lock file cannot be made."""
        make_dirs_durably(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{self.record or ''}\n".encode("utf-8", "surrogateescape"), 0)
        except BlockingIOError:
            lines = _lock_file_lines(fd)
            os.close(fd)
            raise JournalLocked(self.journal, int(lines[0]) if lines and lines[0].isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = -1


def journal_holder(journal: Path) -> int | None:
    """The pid of the daemon holding journal's lock (0 if unknown), None if none holds it.

    Read from /proc/locks, so a reader takes no lock, not even for a moment (a daemon starting
    in that moment would be refused). Where it cannot be read, a shared lock let go at once asks.
    """
    try:
        status = os.stat(lock_path(journal))
    except OSError:
        return None  # no lock file: no daemon ever ran on it, or its folder is not readable
    held = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2147252 0 EOF"; a waiter's line has "->".
            for fields in map(str.split, f):
                if fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and fields[5:6] == [held]:
                    return int(fields[4]) if fields[4].isdigit() else 0
        return None
    except OSError:
        pass
    try:
        fd = os.open(lock_path(journal), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        lines = _lock_file_lines(fd)
        return int(lines[0]) if lines and lines[0].isdigit() else 0
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


class Unsynced(NamedTuple):
    """Bytes of a journal file not known to be durable: an append whose fsync failed and that
    could not be cut away, or (at_startup) a whole file whose fsync failed when a start tried it."""

    dev: int
    ino: int
    start: int
    end: int
    crc: int  # of the bytes as written: a range the file no longer holds (truncated, rewritten) is void
    name: str  # the file's name when the range was recorded, for people
    at_startup: bool = False

    def holds(self, fd: int) -> bool:
        """Whether the file open at fd still holds these bytes: only then do they count."""
        if os.fstat(fd).st_size < self.end:
            return False
        crc, read = 0, 0
        for _, block in blocks(fd, self.start, self.end):
            crc, read = zlib.crc32(block, crc), read + len(block)
        return read == self.end - self.start and crc == self.crc


class UntrustedJournal(Exception):
    """A journal file whose fsync failed at an earlier start: it cannot be trusted until reboot."""


class UnsyncedRecord:
    """The journal's byte ranges that are never to be trusted: written but not known durable.

    After a failed fsync the kernel may have dropped the dirty pages while the page cache still
    serves the bytes ("fsyncgate"): a later fsync returns 0, so neither this process nor the
    next can tell them from durable ones. Such a range is recorded before its 503 is sent, in
    a small file on tmpfs (runtime_dir), keyed by the journal file's device and inode, so
    rotation does not lose it: tmpfs needs no block of the failing disk, and it lasts exactly
    as long as the page cache can hold what the disk does not, until the next reboot. Restore
    and every reader skip a recorded range; the next start cuts it where it ends its file.
    """

    def __init__(self, path: Path, journal: Path):
        self.path = path
        self.journal = journal
        self._cached: tuple[tuple[int, int], list[Unsynced]] | None = None

    @classmethod
    def in_folder(cls, folder: Path, journal: Path) -> "UnsyncedRecord":
        """The record of journal in runtime_dir: one file per journal, named by its real path."""
        resolved = os.path.realpath(journal)
        digest = hashlib.sha256(resolved.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return cls(folder / f"{Path(resolved).name}.{digest}.unsynced", Path(resolved))

    @classmethod
    def of_journal(cls, journal: Path) -> "UnsyncedRecord | None":
        """The record a daemon of this journal wrote its lock file's second line; None if none."""
        try:
            fd = os.open(lock_path(journal), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            lines = _lock_file_lines(fd)
        finally:
            os.close(fd)
        return cls(Path(lines[1]), journal) if len(lines) > 1 and lines[1] else None

    def ranges(self) -> list[Unsynced]:
        """The recorded ranges, [] if there is no record. Raises OSError or ValueError if it
        cannot be read or is not a record (then nothing must be written over it)."""
        try:
            with open(self.path, "rb") as f:
                status = os.fstat(f.fileno())
                key = (status.st_mtime_ns, status.st_ino)
                if self._cached is not None and self._cached[0] == key:
                    return self._cached[1]
                document = json.loads(f.read())
        except FileNotFoundError:
            return []
        try:
            ranges = [Unsynced(*entry) for entry in document["ranges"]]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a record of unsynced ranges: {exc}") from None
        if not all(type(r.start) is type(r.end) is int and 0 <= r.start < r.end for r in ranges):
            raise ValueError("not a record of unsynced ranges: a range is not 0 <= start < end")
        self._cached = key, ranges
        return ranges

    def by_file(self) -> dict[tuple[int, int], list[Unsynced]]:
        """(dev, ino) -> the recorded ranges of that file, for readers to skip; {} (logged) if
        the record cannot be read."""
        found: dict[tuple[int, int], list[Unsynced]] = {}
        try:
            ranges = self.ranges()
        except (OSError, ValueError) as exc:
            if self._cached is None or self._cached[0] != (0, 0):  # once, not at every poll
                log("ERROR", "cannot read the record of unsynced journal ranges", path=self.path, error=exc)
                self._cached = (0, 0), []
            return found
        for entry in ranges:
            found.setdefault((entry.dev, entry.ino), []).append(entry)
        return found

    def write(self, ranges: list[Unsynced]) -> None:
        """Replace the record (atomically; removed when empty). Raises OSError."""
        if not ranges:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        document = {"journal": str(self.journal), "ranges": [list(entry) for entry in ranges]}
        write_file_atomically(self.path, encode_json(document) + b"\n")

    def add(self, entry: Unsynced) -> None:
        try:
            ranges = self.ranges()
        except ValueError as exc:
            raise OSError(f"{self.path}: {exc}") from None
        self.write(ranges + [entry])

    def remove(self, dev: int, ino: int) -> None:
        """Forget the ranges of one file (rotated away: its inode may be reused)."""
        ranges = self.ranges()
        kept = [r for r in ranges if (r.dev, r.ino) != (dev, ino)]
        if len(kept) != len(ranges):
            self.write(kept)

    def honour(self, files: list[Path]) -> None:
        """Before the journal is read: cut each recorded range that ends its file, keeping the
        cut bytes beside it for forensics; keep (and so skip) the others; forget those of files
        no longer among files or no longer holding their bytes. Raises UntrustedJournal for a
        file whose fsync failed at an earlier start, OSError if a cut fails (then files cut
        before it stay cut, and the record still names the rest)."""
        try:
            ranges = self.ranges()
        except ValueError as exc:
            raise OSError(f"{self.path}: {exc}") from None
        if not ranges:
            return
        opened = {}
        try:
            for name in files:
                try:
                    fd = os.open(name, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                status = os.fstat(fd)
                opened[(status.st_dev, status.st_ino)] = (name, fd)
            kept = []
            for entry in sorted(ranges, key=lambda r: r.start, reverse=True):  # a file's last range first
                name, fd = opened.get((entry.dev, entry.ino), (None, -1))
                if name is None or not entry.holds(fd):
                    continue  # rotated away, cut already, or truncated or rewritten since
                if entry.at_startup:
                    raise UntrustedJournal(
                        f"the fsync of journal file {name} failed at an earlier start, so its bytes "
                        f"cannot be told durable until the host reboots; to trust it anyway, remove "
                        f"{self.path}")
                if not self._cut(entry, name, fd):
                    kept.append(entry)
            self.write(kept)
        finally:
            for _, fd in opened.values():
                os.close(fd)

    def _cut(self, entry: Unsynced, name: Path, fd: int) -> bool:
        """Cut a range off the end of its file, its bytes kept as .NAME.unsynced-INO-START; False
        (the range stays recorded) if lines follow it or its bytes cannot be kept."""
        size = os.fstat(fd).st_size
        if any(b"\n" in block for _, block in blocks(fd, entry.end, size)):
            # Complete lines follow it (written after it): it stays, and readers skip it.
            log("WARN", "journal holds bytes whose fsync failed; every reader skips them",
                path=name, start=entry.start, end=entry.end)
            return False
        forensics = name.with_name(f".{name.name}.unsynced-{entry.ino}-{entry.start}")
        try:
            write_file_atomically(forensics, os.pread(fd, size - entry.start, entry.start))
        except OSError as exc:
            log("WARN", "cannot keep the bytes whose fsync failed aside; they stay in the journal, "
                "recorded, and every reader skips them", path=name, start=entry.start, end=entry.end,
                error=exc.strerror or exc)
            return False
        os.ftruncate(fd, entry.start)
        fsync(fd, name)
        log("WARN", "cut bytes whose fsync failed from the journal", path=name, start=entry.start,
            end=size, kept_in=forensics)
        return True


class UnsyncedRanges:
    """What a reader skips: the record's ranges of failed appends, each checked against the file
    it reads. A file recorded at a failed startup is not skipped: its ops were acknowledged once
    their fsync succeeded; only whether the disk still holds them is unknown."""

    def __init__(self, record: UnsyncedRecord | None):
        self._by_file = {} if record is None else record.by_file()

    def of(self, fd: int) -> tuple[tuple[int, int], ...]:
        """(start, end) of the recorded ranges the file open at fd still holds."""
        status = os.fstat(fd)
        entries = self._by_file.get((status.st_dev, status.st_ino), ())
        return tuple((entry.start, entry.end) for entry in entries if not entry.at_startup and entry.holds(fd))


def overlaps(ranges: tuple[tuple[int, int], ...], start: int, length: int) -> bool:
    """Whether the bytes [start, start + length) touch any of ranges."""
    return any(start < end and begin < start + length for begin, end in ranges)


def disk_space(folder: Path) -> tuple[int, int]:
    """(bytes observerd may write, bytes in all) of the filesystem holding folder."""
    disk = os.statvfs(folder)
    free_blocks = disk.f_bfree if os.geteuid() == 0 else disk.f_bavail  # root may use the reserve
    return free_blocks * disk.f_frsize, disk.f_blocks * disk.f_frsize


def try_append_room(path: Path, length: int) -> None:
    """Raise OSError if an append of length bytes to the file at path would fail now.

    The journal is never touched, so no probe can leave a byte in it or truncate another
    writer's line away. First the limits an append meets, asked without writing: room on the
    disk for the whole append, and the file size limit. Then one byte goes to a scratch file
    beside the journal, at the offset where that append would end in the file the path names
    now (sparse: one block), is fsynced, and the file removed: that meets a failing device, a
    quota, no free descriptors. Whatever is at the scratch name is unlinked first and the file
    made anew (O_EXCL, O_NOFOLLOW), so a symlink planted there is never followed; a folder
    observerd may not create files in leaves the limits as the answer.
    """
    try:
        end = os.stat(path).st_size
    except FileNotFoundError:
        end = 0  # the next append makes the path again
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if (limit != resource.RLIM_INFINITY and end + length > limit) or disk_space(path.parent)[0] < length:
        raise OSError("no room for the failed append")
    scratch = probe_scratch_path(path)
    scratch.unlink(missing_ok=True)
    try:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except PermissionError:
        return  # a folder observerd may read but not create in: the limits decide
    try:
        os.pwrite(fd, b"\n", end + max(length, 1) - 1)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(scratch)


def rotate_segments(path: Path, keep_files: int, record: UnsyncedRecord | None) -> int:
    """Shift ops.jsonl -> .1 -> .2 …, dropping the oldest beyond keep_files, all or nothing;
    returns a descriptor of the new, empty live file. Raises OSError, having undone what it did.

    What can fail for want of a resource (creating the new file, opening the folder to fsync
    it) happens while every rename can still be undone, and the oldest segment is only set
    aside until the end: a rotation that fails leaves the folder as it was and loses nothing.
    """
    fresh, dropped = rotation_scratch_paths(path)
    moves = []
    for source, target in itertools.pairwise(itertools.chain(segment_paths(path, keep_files), [dropped])):
        if not source.exists():
            break  # a gap: the segments after it keep their names
        moves.append((source, target))
    moves.reverse()
    moves.append((fresh, path))
    fd, done = -1, []
    try:
        fd = os.open(fresh, _APPEND_FLAGS | os.O_TRUNC, 0o644)
        for source, target in moves:
            os.rename(source, target)
            done.append((source, target))
        fsync_dir(path.parent)
    except OSError as exc:
        shifted = []  # the renames that could not be undone, as the commands that undo them
        for source, target in reversed(done):
            try:
                os.rename(target, source)
            except OSError as undo_exc:
                shifted.append(f"mv {target} {source}")
                log("ERROR", "cannot undo rotation step", path=target, error=undo_exc)
        if fd >= 0:
            os.close(fd)
            try:
                os.unlink(fresh)
            except OSError:
                pass  # an empty leftover, truncated by the next rotation
        if shifted:
            # No op is lost: each file is under a neighbour's name. The next append makes the
            # path again if it is gone; stop observerd and run these, in order, to restore it.
            log("ERROR", "cannot rotate journal; its folder is left shifted", path=path, error=exc,
                to_recover="; ".join(shifted))
        else:
            log("ERROR", "cannot rotate journal; left as it was", path=path, error=exc)
        raise
    if moves[0][1] == dropped:
        try:
            status = os.stat(dropped)
            os.unlink(dropped)
            if record is not None:
                record.remove(status.st_dev, status.st_ino)  # its inode may be reused
        except (OSError, ValueError):
            pass  # replaced by the next rotation's oldest segment
    log("INFO", "rotated journal", path=path, keep_files=keep_files)
    return fd


class Journal:
    """The append-only JSONL file: every append is written and fsynced, or rolled back.

    Other writers may append to the file too, so where it ends is asked of the file itself
    at each append, never remembered: a rollback removes only the bytes of the failed
    append, and an op never lands glued to another writer's unfinished line.
    """

    def __init__(self, path: Path, max_file_bytes: int = 0, keep_files: int = 0,
                 metrics: Metrics | None = None, lock: JournalLock | None = None,
                 record: UnsyncedRecord | None = None):
        self.path = path
        self.max_file_bytes = max_file_bytes
        self.keep_files = keep_files
        self.metrics = metrics or Metrics()
        self.writer_lock = lock  # taken before the files are touched, let go after they are closed
        self.record = record  # where ranges go that a failed fsync left and no cut removed
        self._fd = -1
        # A failed append's bytes while they are neither cut away nor recorded: no append,
        # reopen or probe goes on until one of the two is done (see _settle).
        self._pending: Unsynced | None = None
        self._pending_logged = False
        # Why the last append failed, while none has succeeded since (and no probe() did):
        # observerd is not ready. And that append's length, which probe() makes room for.
        self.failure: str | None = None
        self._failed_bytes = 0
        self._lock = threading.Lock()

    def open(self) -> None:
        """Take the lock, honour the record of unsynced ranges, repair a torn tail, then open
        for appends, creating the file (and folders) durably. Raises JournalLocked,
        UntrustedJournal or OSError."""
        if self.writer_lock is not None:
            self.writer_lock.acquire()
        try:
            if self.record is not None:
                self.record.honour(list(segment_paths(self.path, self.keep_files)))
            if self.path.exists():
                dropped = repair_torn_tail(self.path)
                if dropped:
                    log("WARN", "repaired torn tail of journal", path=self.path, dropped_bytes=dropped)
            self._fd = self._open_for_append()
            probe_scratch_path(self.path).unlink(missing_ok=True)  # left only by a crash mid-probe
        except BaseException:
            if self.writer_lock is not None:
                self.writer_lock.release()
            raise

    def _open_for_append(self) -> int:
        """Open the path, creating it and its folders if need be, and fsync its folder.

        The folder is fsynced whoever created the file (we, or logrotate before a SIGHUP):
        the ops acknowledged into it are only as durable as its directory entry.
        """
        make_dirs_durably(self.path.parent)
        fd = os.open(self.path, _APPEND_FLAGS, 0o644)
        try:
            fsync_dir(self.path.parent)
        except OSError:
            os.close(fd)
            raise
        return fd

    def append_durably(self, data: bytes) -> None:
        """Write data and fsync it; on any failure leave the journal as it was and raise PersistError."""
        with self._lock:
            try:
                self._append(data)
            except OSError as exc:
                self.metrics.persist_errors.inc()
                if self.failure is None:
                    log("WARN", "journal not writable; not ready until a write succeeds", path=self.path,
                        error=exc.strerror or exc)
                self.failure, self._failed_bytes = f"{exc.strerror or exc} ({self.path})", len(data)
                raise PersistError(self.failure) from exc
            self._writable("append")

    def probe(self) -> None:
        """While appends fail: would the failed one succeed now? If so, clear the failure.

        The journal is not written (see try_append_room); only a failed append's bytes that
        are neither cut nor recorded are tried again first (see _settle), and while they stay
        so the failure stays. A fault of the file alone (chattr +i) it cannot see: a commit
        that succeeds clears the failure then. Under the append lock, so never beside a
        commit, a rotation or a reopen.
        """
        with self._lock:
            if self.failure is None:
                return
            try:
                if self._pending is not None:
                    self._settle()
                try_append_room(self.path, self._failed_bytes)
            except OSError:
                self.metrics.journal_probes.inc("failing")
                return  # still failing: the failure keeps the append's own reason
            self.metrics.journal_probes.inc("writable")
            self._writable("probe")

    def _writable(self, found_by: str) -> None:
        if self.failure is not None:
            self.failure = None
            log("INFO", "journal writable again", path=self.path, found_by=found_by)

    def _append(self, data: bytes) -> None:
        if self._pending is not None:
            self._settle()
        # An fstat and a stat per group commit (a few µs beside the fsync): an op is acked
        # only into the file persist_path names, whatever became of the one we hold.
        status = os.fstat(self._fd)
        named = file_identity(self.path)
        if named != (status.st_dev, status.st_ino):
            # Another file there: logrotate's `create`, or a restore from backup; reopening
            # before logrotate's SIGHUP is what the SIGHUP will do. Nothing there: rm, mv of
            # the file or its folder, or an rm of a hard link's other name; appends to the
            # file we hold would be missing from the path at restart, so the path is made
            # again. The price is logrotate's moment between its rename and its `create`:
            # that opens with O_EXCL, so if an append falls in it, logrotate renames our new
            # file to ops.jsonl-YYYYMMDDHH.backup (logging "destination … already exists"),
            # creates its own, and the next append follows; those ops are in the .backup.
            # An rm racing this very append takes it along, as it would a moment earlier.
            if named is None:
                log("WARN", "journal file is gone from its path; making the path again", path=self.path,
                    links_left=status.st_nlink)
            else:
                log("INFO", "journal path names another file; reopening it", path=self.path)
            self._reopen()
            status = os.fstat(self._fd)
        size = status.st_size
        if self.max_file_bytes and size and size + len(data) > self.max_file_bytes:
            # Between appends, so no line is ever split across segments.
            fd = rotate_segments(self.path, self.keep_files, self.record)
            os.close(self._fd)
            self._fd, size = fd, 0
            status = os.fstat(fd)
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            # Another writer's line is unfinished. Glued onto it, our first op would be
            # lost in one unparseable line, so it starts its own; if that writer was
            # still writing, its line was broken either way, by whatever came next.
            data = b"\n" + data
        view = memoryview(data)
        start = None
        try:
            while view:
                written = os.write(self._fd, view)
                if start is None:
                    # O_APPEND put these bytes at the end of the file as it was at this
                    # write, after anything appended since we looked: ours begin here.
                    start = os.lseek(self._fd, 0, os.SEEK_CUR) - written
                view = view[written:]
            started = time.perf_counter()
            os.fsync(self._fd)
            self.metrics.fsync_seconds.observe(time.perf_counter() - started)
        except OSError:
            if start is not None:
                # Written, not known durable: never to be trusted, by this process or the next.
                sent = data[:len(data) - len(view)]
                self._pending = Unsynced(status.st_dev, status.st_ino, start, start + len(sent),
                                         zlib.crc32(sent), self.path.name)
                self._pending_logged = False
                try:
                    self._settle()
                except OSError:
                    pass  # logged; retried before the next append, by the probe and at close
            raise

    def _settle(self) -> None:
        """Cut the failed append's bytes away, or else record them; raises OSError while
        neither is done, and until then nothing more is appended (nothing is acknowledged).

        The cut keeps lines other writers appended before ours. One appended after ours, in
        the moment between the failed write and the truncate, goes with ours: no lock we
        could take binds another writer. A file already shorter (truncated by someone) is
        left as it is rather than extended with zeros. A cut counts once it is fsynced.
        Recorded bytes stay where they are, and appends go on after them.
        """
        pending = self._pending
        try:
            if os.fstat(self._fd).st_size > pending.start:
                os.ftruncate(self._fd, pending.start)
            fsync(self._fd, self.path)  # every time: a truncate whose fsync failed is no cut yet
        except OSError as cut_error:
            # Recorded only while the file holds them: a range past its end would cover the
            # next append, acknowledged, which would be skipped and cut as if it had failed.
            still_there = os.fstat(self._fd).st_size > pending.start
            try:
                if not still_there:
                    raise OSError("the truncate that cut them is not durable yet") from None
                if self.record is None:
                    raise OSError('runtime_dir is ""') from None
                self.record.add(pending)
            except OSError as record_error:
                if not self._pending_logged:
                    self._pending_logged = True
                    log("ERROR", "journal bytes whose fsync failed can be neither cut nor recorded; "
                        "not acknowledging writes until one can", path=self.path, start=pending.start,
                        end=pending.end, cut_error=cut_error.strerror or cut_error,
                        record_error=record_error.strerror or record_error)
                raise cut_error from None
            log("WARN", "journal bytes whose fsync failed could not be cut; recorded, so no reader "
                "trusts them", path=self.path, start=pending.start, end=pending.end, record=self.record.path,
                error=cut_error.strerror or cut_error)
        self._pending = None

    def reopen(self) -> None:
        """Close and reopen the path, e.g. after logrotate moved the file away (SIGHUP).

        Appends hold the same lock, so every op lands whole in the old file or the new one.
        Raises OSError, the old file still in use, if the path cannot be opened.
        """
        with self._lock:
            self._reopen()

    def _reopen(self) -> None:
        if self._pending is not None:
            self._settle()  # its offset is in the file being left
        fd = self._open_for_append()
        os.close(self._fd)
        self._fd = fd

    def close(self) -> None:
        """Settle a failed append (its last chance to be cut or recorded), close the file, let
        go of the lock. Raises OSError naming the path if either fails (the lock is let go)."""
        with self._lock:
            try:
                if self._pending is not None:
                    unsettled = self._pending
                    try:
                        self._settle()
                    except OSError as exc:
                        # Nothing marks those bytes now: the next start trusts them.
                        raise OSError(exc.errno, f"journal bytes {unsettled.start}-{unsettled.end} whose "
                                      "fsync failed are neither cut nor recorded; the next start trusts "
                                      "them", str(self.path)) from None
                if self._fd >= 0:
                    fd, self._fd = self._fd, -1
                    try:
                        os.close(fd)
                    except OSError as exc:
                        raise OSError(exc.errno, exc.strerror, str(self.path)) from None
            finally:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                if self.writer_lock is not None:
                    self.writer_lock.release()


def decode_stored_line(line: bytes) -> dict:
    """A journal line as every read serves it: decoded strictly and validated.

    Raises whatever a stored line makes that raise (InvalidOp, RecursionError, a rule added
    later): readers skip such a line, never stop at it.
    """
    return validate_op(parse_json_strict(line))


def _make_durable(fd: int, path: Path, status: os.stat_result, record: UnsyncedRecord | None) -> None:
    """fsync a journal file before restore trusts it; if that fails, record the file, so that
    no later start trusts it either (its fsync would return 0 without making anything durable)."""
    if not stat.S_ISREG(status.st_mode):
        return  # a device put there (/dev/full in a test) has no pages to make durable
    try:
        fsync(fd, path)
    except OSError as exc:
        try:
            if record is None:
                raise OSError("runtime_dir is not set") from None
            crc = 0
            for _, block in blocks(fd, 0, status.st_size):
                crc = zlib.crc32(block, crc)
            record.add(Unsynced(status.st_dev, status.st_ino, 0, status.st_size, crc, path.name,
                                at_startup=True))
        except OSError as record_error:
            log("ERROR", "cannot record a journal file whose fsync failed; the next start will trust it",
                path=path, error=record_error.strerror or record_error)
        else:
            log("ERROR", "fsync of a journal file failed at startup; recorded, so no start trusts it "
                "until the host reboots", path=path, record=record.path)
        raise exc


class Restored(NamedTuple):
    """What a restart reads back from the journal's tail, each oldest first."""

    ops: list[RingOp]  # the newest valid ops that fit the ring
    op_ids: list[tuple[str, int] | None]  # window_entry() of the newest `window` lines


def restore_journal(path: Path, ring_size: int, keep_files: int = 0, max_bytes: float = math.inf,
                    window: int = 0, record: UnsyncedRecord | None = None, durable: bool = False,
                    stopping: threading.Event | None = None) -> Restored | None:
    """The ring's ops and the op_id window's entries from the journal's tail, in one pass.

    Reads backwards from the end of the live file, then of each older segment, until the ring
    holds ring_size ops or max_bytes of them (always at least the newest, as the ring does)
    and `window` lines have been seen, so the cost depends on those bounds, not on the length
    of the history. Blank lines are skipped silently; for the ring a malformed or invalid line
    is skipped with a warning naming its segment and byte offset, exactly as a forward replay
    would skip it, while in the window every line takes a slot (None when it holds no op_id,
    or one a newer line holds): window lines are never decoded (see window_entry). Lines in a
    range the record holds are skipped as if absent. None once stopping is set: a daemon told
    to stop while restoring a long journal stops at once.

    durable (the daemon's restore): each file is fsynced before its first line is trusted, as
    a crash between an append's write and its fsync leaves bytes no fsync covered. If that
    fsync fails, the file is recorded (a later fsync would return 0 without making anything
    durable) and OSError is raised: observerd does not start on it.
    """
    ops: list[RingOp] = []
    op_ids: list[tuple[str, int] | None] = []
    seen: set[str] = set()
    held, ring_full = 0, ring_size <= 0
    unsynced = UnsyncedRanges(record)
    for segment in segment_paths(path, keep_files):
        if ring_full and len(op_ids) >= window:
            break
        try:
            f = open(segment, "rb")
        except FileNotFoundError:
            continue
        with f:
            status = os.fstat(f.fileno())
            if durable:
                _make_durable(f.fileno(), segment, status, record)
            skip = unsynced.of(f.fileno())
            for offset, line in LinesBackward(f.fileno(), status.st_size).lines():
                if stopping is not None and stopping.is_set():
                    return None
                if not line.strip() or (skip and overlaps(skip, offset, len(line) + 1)):
                    continue
                if len(op_ids) < window:
                    entry = window_entry(line)
                    if entry is not None and entry[0] not in seen:
                        seen.add(entry[0])
                        op_ids.append(entry)
                    else:
                        op_ids.append(None)
                if not ring_full:
                    try:
                        ring_op = RingOp(decode_stored_line(line))
                    except Exception as exc:
                        # Whatever a stored line makes decoding or encoding raise (InvalidOp,
                        # RecursionError, UnicodeEncodeError, a rule added later), it is one bad
                        # line, never a reason to stop startup.
                        log("WARN", "skipped invalid journal line", path=segment, offset=offset, reason=exc)
                    else:
                        if ops and held + ring_op.size > max_bytes:
                            ring_full = True
                        else:
                            ops.append(ring_op)
                            held += ring_op.size
                            ring_full = len(ops) >= ring_size
                if ring_full and len(op_ids) >= window:
                    break
    return Restored(ops[::-1], op_ids[::-1])


# =============================================================================
# [SECTION] Store: the ring with live counters, per-second arrivals and the op_id window, fed through
# group commit, and whether a write would be taken now
# =============================================================================


class Ring:
    """The newest ops, bounded by count and by bytes, with counters kept current.

    Past max_bytes the oldest ops leave early (the newest always stays, however large), so
    a ring of huge ops covers fewer of them; the journal keeps everything.
    """

    def __init__(self, ring_size: int, recent_scenarios: int, max_bytes: float = math.inf):
        self.ops: deque[RingOp] = deque()
        self.ring_size = ring_size
        self.max_bytes = max_bytes
        self.bytes = 0
        self.successes = 0
        self.by_source: dict[str, int] = {}
        # maxlen=0 keeps nothing, which is what recent_scenarios = 0 asks for.
        self.recent_scenarios: deque[RingOp] = deque(maxlen=recent_scenarios)

    def apply(self, op: RingOp) -> None:
        self.ops.append(op)
        self.bytes += op.size
        self.successes += op.success is True
        self.by_source[op.source] = self.by_source.get(op.source, 0) + 1
        if op.source == "scenario":
            self.recent_scenarios.append(op)
        while len(self.ops) > self.ring_size or (self.bytes > self.max_bytes and len(self.ops) > 1):
            self._evict(self.ops.popleft())

    def refill(self, ops: list[RingOp]) -> None:
        """Apply restored ops, oldest first, as if they had just arrived."""
        for op in ops:
            self.apply(op)

    def _evict(self, op: RingOp) -> None:
        self.bytes -= op.size
        self.successes -= op.success is True
        left = self.by_source[op.source] - 1
        if left:
            self.by_source[op.source] = left
        else:
            del self.by_source[op.source]
        # The evicted op is the ring's oldest, so if it is still listed it is listed first.
        if self.recent_scenarios and self.recent_scenarios[0] is op:
            self.recent_scenarios.popleft()

    def stats(self) -> dict:
        total = len(self.ops)
        return {
            "total": total,
            "successes": self.successes,
            "failures": total - self.successes,
            "by_source": dict(self.by_source),
            "recent_scenario_ops": list(self.recent_scenarios),
        }


TIMELINE_SECONDS = 300  # how far back GET /observer/timeline reaches
DEFAULT_ENDPOINTS_WINDOW = "5m"  # the ops top and the page rank endpoints over, by their timestamps
TIMELINE_SOURCES = 32  # distinct sources a second counts by name; the rest go to OTHER_LABEL


class ArrivalCounts:
    """Ops by the second they were stored (server clock), for the last TIMELINE_SECONDS.

    One bucket per second in a ring of slots, each a dict source -> [ok, failed] of at most
    TIMELINE_SOURCES + 1 keys: memory stays the same however many ops arrive or however long
    observerd runs. Counting by arrival, not by the ops' own timestamps, keeps a client whose
    clock is off (or a batch of old ops) from landing outside the window. One slot more than
    the window holds the second still running, which the window never shows.
    """

    SLOTS = TIMELINE_SECONDS + 1

    def __init__(self):
        self._seconds = [-1] * self.SLOTS  # the second each slot counts, -1 = none yet
        self._buckets: list[dict[str, list[int]]] = [{} for _ in range(self.SLOTS)]
        self._lock = threading.Lock()

    def add(self, tally: dict[tuple[str, bool], int]) -> None:
        """Count (source, success) -> ops that arrived now."""
        second = int(time.time())
        slot = second % self.SLOTS
        with self._lock:
            bucket = self._buckets[slot]
            if self._seconds[slot] != second:
                self._seconds[slot] = second
                bucket.clear()
            for (source, ok), count in tally.items():
                counts = bucket.get(source)
                if counts is None:
                    if len(bucket) >= TIMELINE_SOURCES:
                        source = OTHER_LABEL
                    counts = bucket.setdefault(source, [0, 0])
                counts[not ok] += count

    def series(self, seconds: int, newest: int) -> tuple[dict[str, dict[str, list[int]]], dict[str, list[int]]]:
        """Per-second counts from newest - seconds + 1 to newest, oldest first: per source (only
        those with ops then) and in total, each {"ok": [...], "failed": [...]}."""
        first = newest - seconds + 1
        with self._lock:
            held = [(self._seconds[s % self.SLOTS], dict(self._buckets[s % self.SLOTS]))
                    for s in range(first, newest + 1)]
        totals = {"ok": [0] * seconds, "failed": [0] * seconds}
        sources: dict[str, dict[str, list[int]]] = {}
        for index, (second, bucket) in enumerate(held):
            if second != first + index:
                continue  # a slot not written since that second: nothing arrived then
            for source, (ok, failed) in bucket.items():
                row = sources.get(source)
                if row is None:
                    row = sources[source] = {"ok": [0] * seconds, "failed": [0] * seconds}
                row["ok"][index] = ok
                row["failed"][index] = failed
                totals["ok"][index] += ok
                totals["failed"][index] += failed
        return dict(sorted(sources.items())), totals


class OpIdWindow:
    """The op_ids of the last `size` ops stored, each with its content digest (window_entry).

    Every stored op takes a slot, with an op_id or without (None), so the window covers the
    same ops a restart reads back (restore_journal). An id is held once: a duplicate is never
    stored. Memory: `size` slots of 8 bytes, plus each id held (see docs/clients.md, Idempotent ops).
    """

    def __init__(self, size: int):
        self.size = size
        self._slots: deque[str | None] = deque()
        self._digests: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._digests)

    def digest(self, op_id: str) -> int | None:
        """The content digest of the stored op holding op_id, None if no op in the window does."""
        return self._digests.get(op_id)

    def remember(self, entries: list[tuple[str, int] | None]) -> None:
        """Take the slots of newly stored ops, oldest first: (op_id, digest) or None each.

        The oldest slots are given up first, so no more than `size` ids are ever held.
        """
        entries = entries[max(0, len(entries) - self.size):]
        for _ in range(len(self._slots) + len(entries) - self.size):
            oldest = self._slots.popleft()
            if oldest is not None:
                del self._digests[oldest]
        if any(entries):
            self._slots.extend(entry and entry[0] for entry in entries)
            self._digests.update(entry for entry in entries if entry is not None)
        else:  # most commits: no op_id at all
            self._slots.extend(entries)

    def restore(self, older: list[tuple[str, int] | None]) -> None:
        """Put the entries of ops stored before this process started before any stored since."""
        since = [None if op_id is None else (op_id, self._digests[op_id]) for op_id in self._slots]
        entries = [None if entry is not None and entry[0] in self._digests else entry
                   for entry in older] + since
        entries = entries[max(0, len(entries) - self.size):]
        self._slots = deque(entry and entry[0] for entry in entries)
        self._digests = dict(entry for entry in entries if entry is not None)


class Stored(NamedTuple):
    """What a commit did for one caller: the ring's length after it, and how many of the
    caller's ops were duplicates, acknowledged without being stored again."""

    ring_size: int
    duplicates: int


class _PendingCommit:
    """One caller's ops in the commit queue, and what to call once they are durable."""

    __slots__ = ("ops", "ids", "data", "on_done", "duplicates")

    def __init__(self, ops: list[RingOp], ids: list[tuple[str, int] | None] | None, on_done):
        self.ops = ops
        self.ids = ids  # (op_id, content digest) or None per op; None when no op has an op_id
        self.data = b"".join(op.line for op in ops)
        self.on_done = on_done
        self.duplicates = 0


# Why observerd would not take a write now, besides a journal that cannot be written.
RESTORING = "observerd is restoring its ring from the journal"
SHUTTING_DOWN = "observerd is shutting down"


class StoredCounts:
    """Stored ops counted in the metrics and by arrival second, once per (source, success) and
    per (endpoint, success); each endpoint as observerd_endpoint_events_total labels it."""

    def __init__(self, metrics: Metrics, arrivals: ArrivalCounts):
        self.metrics, self.arrivals = metrics, arrivals
        self.endpoint_labels = CappedLabel(ENDPOINT_LABELS)

    def add(self, ops) -> None:
        """Count stored ops."""
        each: dict[tuple[str, str, bool], int] = {}  # one dict update per op, the rest per key
        for op in ops:
            key = (op.source, op.endpoint, op.success is True)
            each[key] = each.get(key, 0) + 1
        tally: dict[tuple[str, bool], int] = {}
        by_source: dict[tuple[str, str], int] = {}
        by_endpoint: dict[tuple[str, str], int] = {}
        named = self.endpoint_labels
        for (source, endpoint, ok), count in each.items():
            tally[source, ok] = tally.get((source, ok), 0) + count
            success = "true" if ok else "false"
            by_source[source, success] = by_source.get((source, success), 0) + count
            label = (endpoint if endpoint in named else self.endpoint_label(endpoint), success)
            by_endpoint[label] = by_endpoint.get(label, 0) + count
        self.metrics.events.add(by_source)
        self.metrics.endpoint_events.add(by_endpoint)
        self.arrivals.add(tally)

    def endpoint_label(self, endpoint: str) -> str:
        """endpoint as observerd_endpoint_events_total labels it; a newly named one is exported
        from 0 for both outcomes, so increase() sees its first op of either."""
        label, new = self.endpoint_labels.name(endpoint)
        if new:
            self.metrics.endpoint_events.declare((label, success) for success in Metrics.SUCCESS)
        return label


class OpStore:
    """Persist-then-apply: ops reach the ring only after their lines are fsynced.

    Group commit: callers queue their ops with a completion callback; one committer thread
    takes everything queued so far, appends it in one write, fsyncs once, applies the ops to
    the ring in file order, then runs the callbacks (for HTTP, they send the answers, 200 or 503). It wakes
    on the first op queued, so a lone op is written at once: there is no timer. A failed
    write fails exactly that batch and applies none of it. Without a journal (ephemeral), ops
    are committed and their callback run in the caller's thread, one caller at a time.

    A store with a journal takes no op until restore() has filled the ring and the op_id window
    from it: an op applied before then would be restored again, older ops would follow it, and a
    retry of an op stored before the restart would be stored twice.

    Exactly once per op_id: commits run one at a time, and an op whose op_id the window holds,
    or an earlier op of the same commit holds, is a duplicate and is not written. An id enters
    the window only once its op is durable, so a duplicate of an op still in flight waits for
    that commit's outcome (it is in a later one): stored, it is a duplicate; failed, the id
    was never held and the duplicate is stored.
    """

    def __init__(self, ring: Ring, journal: Journal | None, metrics: Metrics | None = None,
                 window: OpIdWindow | None = None):
        self.ring = ring
        self.journal = journal
        self.metrics = metrics or Metrics()
        self.window = window  # None: deduplication off
        self.arrivals = ArrivalCounts()
        self.counts = StoredCounts(self.metrics, self.arrivals)
        self.restored = journal is None
        # When the committer took the batch it is committing now (monotonic); None while it waits.
        self.committing_since: float | None = None
        self._ring_lock = threading.Lock()
        self._commit_lock = threading.Lock()  # ephemeral: the callers' turn to commit
        self._queue: list[_PendingCommit] = []
        self._queue_cond = threading.Condition()
        self._closing = False
        self._committer = None
        if journal is not None:
            self._committer = threading.Thread(target=self._run_committer, name="committer", daemon=True)
            self._committer.start()

    def restore(self, stopping: threading.Event | None = None) -> None:
        """Fill the ring and the op_id window from the journal's tail, and log it, unless
        stopping is set first; raises OSError if unreadable."""
        if self.journal is not None:
            started = time.perf_counter()
            path, keep_files = self.journal.path, self.journal.keep_files
            log("INFO", "restoring ops", path=path)
            restored = restore_journal(path, self.ring.ring_size, keep_files, self.ring.max_bytes,
                                       0 if self.window is None else self.window.size,
                                       self.journal.record, durable=True, stopping=stopping)
            if restored is None:
                return
            ops, op_ids = restored
            with self._ring_lock:
                self.ring.refill(ops)
                if self.window is not None:
                    self.window.restore(op_ids)
            # The busiest endpoints of the ring are named first: a restart converges on them.
            for endpoint, _ in Counter(op.endpoint for op in ops).most_common(ENDPOINT_LABELS):
                self.counts.endpoint_label(endpoint)
            self.restored = True
            log("INFO", "restored ops", count=len(self), op_ids=len(self.window or ()), path=path,
                ms=round((time.perf_counter() - started) * 1000, 1))

    def unready_reason(self) -> str | None:
        """Why a write would not be taken now (restoring, or the journal failing), or None."""
        if not self.restored:
            return RESTORING
        if self.journal is not None and self.journal.failure is not None:
            return f"journal cannot be written: {self.journal.failure}"
        return None

    def submit(self, ops: list[dict], on_done) -> None:
        """Make ops durable, apply them, then call on_done(stored, error).

        stored is a Stored, or None with error a PersistError (nothing was applied) or an
        unexpected exception. The ops are kept as RingOps from here on; the dicts are the
        caller's to drop.
        """
        ring_ops = [RingOp(op) for op in ops]
        ids = None
        if self.window is not None and any(OP_ID in op for op in ops):
            ids = [window_entry(ring_op.line) for ring_op in ring_ops]
        pending = _PendingCommit(ring_ops, ids, on_done)
        if self.journal is None:
            with self._commit_lock:
                ring_len, error = self._commit([pending])
            self._answer([pending], ring_len, error)
            return
        with self._queue_cond:
            if not self._closing:
                self._queue.append(pending)
                self._queue_cond.notify()
                return
        on_done(None, PersistError(SHUTTING_DOWN))

    def submit_and_wait(self, ops: list[dict]) -> Stored:
        """submit() and wait: returns what was stored, or raises the commit's error."""
        result: list = []
        done = threading.Lock()
        done.acquire()

        def on_done(stored, error):
            result.extend((stored, error))
            done.release()

        self.submit(ops, on_done)
        done.acquire()
        stored, error = result
        if error is not None:
            raise error
        return stored

    def _run_committer(self) -> None:
        while True:
            with self._queue_cond:
                while not self._queue and not self._closing:
                    self._queue_cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
                self.committing_since = time.monotonic()
            self._answer(batch, *self._commit(batch))
            self.committing_since = None

    def committer_stuck_s(self) -> float:
        """Seconds the committer has spent on the batch it holds (0 while it waits, or without
        a journal); inf once it has died."""
        if self._committer is None:
            return 0.0
        if not self._committer.is_alive():
            return 0.0 if self._closing else math.inf
        since = self.committing_since
        return 0.0 if since is None else time.monotonic() - since

    def _commit(self, batch: list[_PendingCommit]) -> tuple[int, Exception | None]:
        """Store the batch's ops but duplicates: write and fsync them (with a journal), then
        apply them to the ring and remember their ids. Returns (ring length, error)."""
        try:
            if self.window is None:
                fresh, entries, conflicts = [op for pending in batch for op in pending.ops], None, {}
            else:
                with self._ring_lock:
                    fresh, entries, conflicts = self._admit(batch)
            if self.journal is not None and fresh:
                # Each caller joined its lines in its own thread; duplicates undo that.
                deduplicated = any(pending.duplicates for pending in batch)
                self.journal.append_durably(b"".join(op.line for op in fresh) if deduplicated
                                            else b"".join(pending.data for pending in batch))
            with self._ring_lock:
                for op in fresh:
                    self.ring.apply(op)
                if entries is not None:
                    self.window.remember(entries)
                ring_len = len(self.ring.ops)
        except PersistError as exc:
            return 0, exc
        except Exception as exc:
            log("ERROR", "commit failed", error=repr(exc), traceback=traceback.format_exc())
            return 0, exc
        self.counts.add(fresh)
        duplicates = sum(pending.duplicates for pending in batch)
        if duplicates:
            self.metrics.duplicates.inc(amount=duplicates)
        # One line per op_id, not per duplicate: a batch of a thousand is still one line.
        for op_id, count in conflicts.items():
            log("WARN", "duplicate op_id with different content; the first stored version is kept",
                duplicates=count, op_id=op_id)
        return ring_len, None

    def _admit(self, batch: list[_PendingCommit]) -> tuple[list[RingOp], list, dict[str, int]]:
        """The batch's ops to store, in order, with their window entries, and how many
        duplicates of each op_id differ from the stored op. A duplicate (its op_id in the
        window, or on an earlier op of the batch) is left out and counted on its pending."""
        fresh, entries, conflicts = [], [], {}
        claimed: dict[str, int] = {}  # op_id -> content digest, of this batch's ops
        for pending in batch:
            if pending.ids is None:
                fresh.extend(pending.ops)
                entries += [None] * len(pending.ops)
                continue
            for ring_op, entry in zip(pending.ops, pending.ids):
                if entry is not None:
                    op_id, digest = entry
                    first = claimed.get(op_id)
                    if first is None:
                        first = self.window.digest(op_id)
                    if first is not None:
                        pending.duplicates += 1
                        if first != digest:
                            conflicts[op_id] = conflicts.get(op_id, 0) + 1
                        continue
                    claimed[op_id] = digest
                fresh.append(ring_op)
                entries.append(entry)
        return fresh, entries, conflicts

    def _answer(self, batch: list[_PendingCommit], ring_len: int, error: Exception | None) -> None:
        for pending in batch:
            try:
                pending.on_done(None if error else Stored(ring_len, pending.duplicates), error)
            except Exception as exc:
                log("ERROR", "commit callback failed", error=repr(exc), traceback=traceback.format_exc())

    def stats(self) -> dict:
        with self._ring_lock:
            return self.ring.stats()

    def snapshot(self) -> list[RingOp]:
        """The ring's ops, oldest first, as a list the caller may keep."""
        with self._ring_lock:
            return list(self.ring.ops)

    def __len__(self) -> int:
        return len(self.ring.ops)

    def reopen_journal(self) -> None:
        if self.journal is not None:
            self.journal.reopen()
            log("INFO", "reopened journal", path=self.journal.path)

    def close(self) -> None:
        """Commit what is queued, stop the committer, close the journal."""
        with self._queue_cond:
            self._closing = True
            self._queue_cond.notify()
        if self._committer is not None:
            self._committer.join()
        if self.journal is not None:
            self.journal.close()


# =============================================================================
# [SECTION] History: the filter language (FILTERS, times as journalctl reads them), and the journal on
# disk (live file and rotated segments) read backwards through it, from a position that
# survives appends and rotation, or followed as it grows
# =============================================================================


class Filter(NamedTuple):
    """One filter of ops, declared once: the HTTP query parameter of this name and the
    command line's --name mean the same (GET /observer/history and /observer/ops, ops)."""

    name: str
    metavar: str | None  # None: a switch, --failed on the command line, failed=true over HTTP
    help: str
    repeatable: bool = False  # given again: any of the values (HTTP: the parameter repeated)
    http: bool = True  # False: the command line's only


FILTERS = (
    Filter("since", "TIME", "stamped at or after TIME: 2026-12-06T04:00:00Z, '2026-12-06 04:00', 2026-12-06, "
           "15m, '10 min ago', now, today, yesterday (local time unless a zone is given)"),
    Filter("until", "TIME", "stamped at or before TIME: the same forms"),
    Filter("endpoint", "E", "of endpoint E, exact or a glob like '/mcp/*'; repeated: of any of them",
           repeatable=True),
    Filter("source", "S", f"of source S ({', '.join(SOURCES)}); repeated: of any of them", repeatable=True),
    Filter("failed", None, "that failed"),
    Filter("ok", None, "that succeeded"),
    Filter("grep", "TEXT", "whose error, input_summary or output_summary holds TEXT (plain text)"),
    Filter("regex", "REGEX", "whose error, input_summary or output_summary a Python regex finds "
           "something in (the command line's only: a regex could stall the daemon)", http=False),
    Filter("field", "KEY=VALUE", "with that value in a field: a string as is, anything else as its "
           "JSON (retries=3)"),
)
FILTER = {f.name: f for f in FILTERS}
# success=true|false: ok and failed as the page and clients of 1.x spell them, kept over HTTP.
SUCCESS_ALIAS = "success"
HISTORY_FILTERS = tuple(f.name for f in FILTERS if f.http) + (SUCCESS_ALIAS,)
# Timestamps are the clients': batches arrive late and clocks differ, so the file is not in
# timestamp order. A scan with since goes on past the first older op, and stops only once
# this much of the file in a row has shown nothing at or after since.
SINCE_RUN_BYTES = 1024 * 1024
# Time spans as systemd.time(7) spells them: 90s, 15m, "1h 30min", "10 min ago".
_SPAN = re.compile(r"(?:[0-9]{1,12} *[a-z]+ *)+")
_SPAN_PART = re.compile(r"([0-9]{1,12}) *([a-z]+)")
_SPAN_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
    **dict.fromkeys(("w", "week", "weeks"), 7 * 86400),
}
_DAY_WORDS = {"today": 0, "yesterday": -1, "tomorrow": 1}
# A calendar time, RFC 3339 or journalctl's: a date, or a time of today, with optional seconds,
# fraction and zone (Z, UTC or an offset); none given: the reader's zone.
_CALENDAR_TIME = re.compile(
    r"(?:([0-9]{4})-([0-9]{2})-([0-9]{2}))?(?:(?(1)[t ])([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,9}))?)?)?"
    r" *(z|utc|[+-][0-9]{2}:?[0-9]{2})?")
TIME_FORMS = ("2026-12-06T04:00:00Z, '2026-12-06 04:00', 2026-12-06, 04:00, 90s, 15m, 2h, 7d, "
              "'10 min ago', now, today, yesterday")
# What makes a regex depend on the text around a match (anchors, word edges, lookaround):
# without any, a pattern that matches a field's text matches a line holding it verbatim.
_REGEX_CONTEXT = re.compile(r"[\^$]|\\[AZbB]|\(\?<?[=!]")
# The first fields of an op as observerd writes it (validate_op's order, an op_id first if
# any, encode_line's spelling, no value left to a default): a line that starts so holds
# exactly these values, read without decoding it.
_HEAD_FIELDS = (rb'\{(?:"' + OP_ID.encode() + rb'":"[^"\\]*(?:\\.[^"\\]*)*",)?'
                rb'"endpoint":"([^"\\]*(?:\\.[^"\\]*)*)","source":"([^"\\]+)",'
                rb'"timestamp":"([^"\\]+)","success":([tf])')
_CANONICAL_HEAD = re.compile(_HEAD_FIELDS)
# The newline before a line that does not start so (another writer's spelling).
_NOT_CANONICAL = re.compile(rb"\n(?!" + _HEAD_FIELDS + rb")")
_GREP_FIELDS = ("error", "input_summary", "output_summary")


class RotatedAway(Exception):
    """A history cursor names a segment that is no longer kept."""


def _escaped(text: str) -> bytes:
    """text as a journal line spells it inside a JSON string."""
    return _LINE_ENCODER.encode(text)[1:-1].encode("utf-8")


@functools.lru_cache(maxsize=64)  # a line's timestamp is asked for by each step judging it
def _seconds(timestamp: str) -> float:
    """An RFC 3339 timestamp as seconds since the epoch; raises ValueError."""
    return parse_rfc3339(timestamp).timestamp()


def _utc_second(seconds: float) -> bytes | None:
    """The UTC second a time falls in, as RFC 3339 spells it (YYYY-MM-DDTHH:MM:SS); None if the
    year has not four digits, where spellings stop sorting as times do."""
    try:
        text = rfc3339_second(math.floor(seconds))
    except (OverflowError, OSError, ValueError):
        return None
    return text.encode() if len(text) == 19 else None


def _span_seconds(text: str) -> int | None:
    """A span like 90s, 15m or "1h 30min" in seconds; None if text is not one."""
    if not _SPAN.fullmatch(text):
        return None
    total = 0
    for count, unit in _SPAN_PART.findall(text):
        if unit not in _SPAN_UNITS:
            return None
        total += int(count) * _SPAN_UNITS[unit]
    return total


def _zone_of(text: str | None, zone: tzinfo | None) -> tzinfo | None:
    if text is None:
        return zone
    if text in ("z", "utc"):
        return timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))


def parse_time_bound(text: str, name: str, now: float, *, zone: tzinfo | None = None) -> float:
    """since or until, as journalctl reads them, in seconds since the epoch: a calendar time
    (RFC 3339, "2026-12-06 04:00", 2026-12-06, 04:00 today), a span before now (15m, "1h 30min",
    "10 min ago", -2h) or after it (+1h), now, today, yesterday, tomorrow.

    A time without a zone, and the day words, are in zone: None, the local one (the command
    line's, as journalctl); the daemon passes UTC. Raises InvalidOp naming the bound.
    """
    word = " ".join(text.lower().split())
    if word == "now":
        return now
    span = _span_seconds(word.removesuffix(" ago") if word.endswith(" ago") else
                         word[1:].lstrip() if word[:1] in "+-" else word)
    if span is not None:
        return now + span if word[:1] == "+" else now - span
    try:
        if word in _DAY_WORDS:
            day = datetime.fromtimestamp(now, zone).date() + timedelta(days=_DAY_WORDS[word])
            return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
        calendar = _CALENDAR_TIME.fullmatch(word)
        if calendar and (calendar[1] or calendar[4]):
            year, month, day, hour, minute, second, fraction, offset = calendar.groups()
            at_zone = _zone_of(offset, zone)
            if year is None:  # a time of today
                today = datetime.fromtimestamp(now, at_zone).date()
                year, month, day = today.year, today.month, today.day
            return datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                            int(second or 0), int((fraction or "0").ljust(6, "0")[:6]),
                            tzinfo=at_zone).timestamp()
    except (ValueError, OverflowError, OSError):
        pass
    raise InvalidOp(name, f"must be a time like {TIME_FORMS}")


def filter_args(args) -> dict[str, str | list[str]]:
    """The filters among parsed flags, as OpFilter takes them: a switch given is "true"."""
    given = {}
    for spec in FILTERS:
        value = getattr(args, spec.name, None)
        if value is not None and value is not False:
            given[spec.name] = "true" if value is True else value
    return given


def refuse_command_line_only(names) -> None:
    """Raise InvalidOp naming the first of names that is a filter only the command line takes."""
    for name in names:
        if name in FILTER and not FILTER[name].http:
            raise InvalidOp(name, "is the command line's only (a regex could stall the daemon): use grep, "
                            "plain text")


def field_text(value: object) -> str:
    """A field's value as filters match it and comparisons group by it: a string as is,
    anything else as its JSON."""
    return value if isinstance(value, str) else _LINE_ENCODER.encode(value)


def _wanted_outcome(one: dict[str, str]) -> bool | None:
    """The success the outcome filters (failed, ok, the success alias) ask for; None: any.
    Raises InvalidOp naming one that contradicts another."""
    success, outcome_named = None, None
    for name, wanted in (("failed", False), ("ok", True), (SUCCESS_ALIAS, None)):
        if name not in one:
            continue
        if name == SUCCESS_ALIAS:
            if one[name] not in ("true", "false"):
                raise InvalidOp(name, "must be true or false")
            wanted = one[name] == "true"
        elif one[name] not in ("", "true"):
            raise InvalidOp(name, "must be true, or given without a value")
        if success is not None and success != wanted:
            raise InvalidOp(name, f"contradicts {outcome_named}")
        success, outcome_named = wanted, name
    return success


def _field_filter(text: str) -> tuple[tuple[str, str], bytes]:
    """(key, value) of a field filter's key=value, and the bytes a line it keeps must hold."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InvalidOp("field", "must be key=value")
    try:  # a number or a structure may be spelled otherwise in a line: then the key
        spelled_freely = not isinstance(json.loads(value), (str, bool, type(None)))
    except ValueError:
        spelled_freely = False
    return (key, value), (b'"' + _escaped(key) + b'"' if spelled_freely or not value else _escaped(value))


class OpFilter:
    """What a history query keeps: the ops passing every filter given (none given: all).

    A line is judged in up to three steps, each dearer than the one before and each sure
    when it rules a line out: a needle (bytes the line must hold: the filter value likely
    rarest; a line with any backslash always goes on, as an escape may spell it otherwise),
    the raw line (its canonical head: endpoint, source, timestamp, success read off its
    start; and the grep over its text), then the decoded, validated op.
    """

    def __init__(self, given: dict[str, str | list[str]], now: float, *, zone: tzinfo | None = None):
        """given: filter name (FILTERS, or the success alias) -> its text, or its texts when
        repeated; zone: where times without one are (see parse_time_bound). Raises InvalidOp
        naming the filter."""
        values = {name: [text] if isinstance(text, str) else list(text) for name, text in given.items()}
        reject_unknown(values, tuple(FILTER) + (SUCCESS_ALIAS,), "filter")
        for name, texts in values.items():
            if len(texts) > 1 and not (name in FILTER and FILTER[name].repeatable):
                raise InvalidOp(name, "is given more than once")
            for text in texts:
                if _has_lone_surrogate(text):  # from bytes that are not UTF-8, on a command line
                    raise InvalidOp(name, "is not valid UTF-8")
        one = {name: texts[0] for name, texts in values.items() if texts}
        self._given, self._now, self._zone = values, now, zone
        self.since = self.until = None
        for name in ("since", "until"):
            if name in one:
                setattr(self, name, parse_time_bound(one[name], name, now, zone=zone))
        self.success = _wanted_outcome(one)
        needles: list[bytes] = []  # the likely rarest first
        endpoints = values.get("endpoint", [])
        self.endpoints = frozenset(e for e in endpoints if not any(c in e for c in "*?["))
        globs = [e for e in endpoints if e not in self.endpoints]
        self.endpoint_globs = [re.compile(fnmatch.translate(glob)) for glob in globs]
        if len(endpoints) == 1 and self.endpoints:
            needles.append(b'"' + _escaped(endpoints[0]) + b'"')
        self.field = None
        if "field" in one:
            self.field, needle = _field_filter(one["field"])
            needles.append(needle)
        # Each a line's error, input_summary or output_summary must hold, with whether it can
        # be tried on a line's raw text (no anchors or lookarounds, which the text around
        # a field would fool).
        self.patterns: list[tuple[re.Pattern, bool]] = []
        if "grep" in one:
            self.patterns.append((re.compile(re.escape(one["grep"])), True))
            if one["grep"]:
                needles.append(_escaped(one["grep"]))  # plain text: the line holds it
        if "regex" in one:
            try:
                pattern = re.compile(one["regex"])
            except (re.error, RecursionError, OverflowError) as exc:
                raise InvalidOp("regex", f"is not a valid regular expression: {exc}") from None
            self.patterns.append((pattern, not _REGEX_CONTEXT.search(one["regex"])))
        raw_patterns = [pattern for pattern, raw in self.patterns if raw]
        self.raw_pattern = raw_patterns[0] if raw_patterns else None  # candidate_lines scans with it
        self.greps_raw = bool(raw_patterns)
        if len(endpoints) == 1 and globs:
            # The longest stretch without wildcards before any [set] is in every match.
            glob_literal = max(re.split(r"[*?]", globs[0].partition("[")[0]), key=len)
            if glob_literal:
                needles.append(_escaped(glob_literal))
        self.sources = None
        if "source" in values:
            self.sources = frozenset(check_source(text, "source") for text in values["source"])
            if len(self.sources) == 1 and DEFAULT_SOURCE not in self.sources:  # a line may leave the default out
                needles.append(b'"' + next(iter(self.sources)).encode() + b'"')
        # Failures are mostly few, but only a canonical head spells success just so: lines
        # without one are let through too (see candidate_lines).
        self.needs_canonical = not needles and self.success is False
        if self.needs_canonical:
            needles.append(b'"success":false')
        self.needle = needles[0] if needles else None
        self._timed = self.since is not None or self.until is not None
        # The seconds since and until fall in, to judge most UTC timestamps without parsing them.
        self._since_second, self._until_second = (
            None if bound is None else _utc_second(bound) for bound in (self.since, self.until))
        self._seconds_judge = ((self.since is None or self._since_second is not None)
                               and (self.until is None or self._until_second is not None))
        self._sources = None if self.sources is None else {source.encode() for source in self.sources}
        self._judges_endpoint = bool(endpoints)
        self._judges_head = (self._timed or self._judges_endpoint or self.sources is not None
                             or self.success is not None)
        self.judges_raw = self._judges_head or self.greps_raw

    @classmethod
    def from_query(cls, params: dict[str, list[str]], now: float) -> "OpFilter":
        """The filters among an HTTP query's parameters; times without a zone are UTC."""
        refuse_command_line_only(params)
        return cls({name: texts for name, texts in params.items() if name in HISTORY_FILTERS}, now,
                   zone=timezone.utc)

    @classmethod
    def from_args(cls, args, now: float) -> "OpFilter":
        """The filters given as flags (an argparse namespace with one attribute per filter:
        None, a switch's True, or the texts given); times without a zone are local."""
        return cls(filter_args(args), now)

    def counting(self) -> tuple["OpFilter", bool]:
        """The filter a count by group scans with, and whether only groups with failures are
        shown: failed only is left out of the scan, as each group's failure rate is over all
        its ops."""
        if self.success is not False:
            return self, False
        given = {name: texts for name, texts in self._given.items() if name not in ("failed", SUCCESS_ALIAS)}
        return OpFilter(given, self._now, zone=self._zone), True

    @property
    def needs_whole_op(self) -> bool:
        """Whether it judges fields the ring keeps only in the op's line."""
        return bool(self.patterns) or self.field is not None

    def _endpoint_ok(self, endpoint: str) -> bool:
        if not self._judges_endpoint:
            return True
        return endpoint in self.endpoints or any(glob.match(endpoint) for glob in self.endpoint_globs)

    def _time_ok(self, seconds: float) -> bool:
        return (self.since is None or seconds >= self.since) and (self.until is None or seconds <= self.until)

    def rules_out(self, line: bytes) -> bool:
        """Whether the line is ruled out before it is decoded: by its canonical head, or by a
        grep that finds nothing in its text (where no escape can hide what the fields say)."""
        if self.greps_raw and b"\\" not in line:
            text = line.decode("utf-8", "replace")
            if not all(pattern.search(text) for pattern, raw in self.patterns if raw):
                return True
        head = _CANONICAL_HEAD.match(line) if self._judges_head else None
        if head is None:
            return False
        endpoint, source, timestamp, success = head.groups()
        if ((self.success is not None and (success == b"t") != self.success)
                or (self._sources is not None and source not in self._sources)):
            return True
        try:
            if self._timed:
                in_window = self._second_in_window(timestamp)
                if not (self._time_ok(_seconds(timestamp.decode("ascii"))) if in_window is None else in_window):
                    return True
            if not self._judges_endpoint:
                return False
            return not self._endpoint_ok(endpoint.decode("utf-8") if b"\\" not in endpoint
                                         else json.loads(b'"' + endpoint + b'"'))
        except ValueError:
            return True  # a line no read serves (decoding it fails too)

    def _second_in_window(self, timestamp: bytes) -> bool | None:
        """Whether a UTC timestamp (…Z) is within since and until, by the second it falls in:
        spelled alike, seconds sort as their text does. None when that cannot tell."""
        if (not self._seconds_judge or len(timestamp) < 20 or timestamp[10:11] != b"T"
                or timestamp[-1:] != b"Z" or timestamp[19:20] not in (b".", b"Z")):
            return None
        second = timestamp[:19]
        if self._since_second is not None and second <= self._since_second:
            return None if second == self._since_second else False
        if self._until_second is not None and second >= self._until_second:
            return None if second == self._until_second else False
        return True

    def stamped_in_window(self, timestamp: str) -> bool:
        """Whether a timestamp is within since and until: by its second's spelling when that
        tells, else parsed."""
        in_window = self._second_in_window(timestamp.encode("ascii", "replace"))
        return self._time_ok(_seconds(timestamp)) if in_window is None else in_window

    def accepts(self, op: dict) -> bool:
        """The final word, on the decoded and validated op."""
        if (not self._endpoint_ok(op["endpoint"])
                or (self.sources is not None and op["source"] not in self.sources)
                or (self.success is not None and (op["success"] is True) != self.success)
                or (self._timed and not self._time_ok(_seconds(op["timestamp"])))):
            return False
        for pattern, _ in self.patterns:
            if not any(isinstance(op.get(name), str) and pattern.search(op[name]) for name in _GREP_FIELDS):
                return False
        if self.field is not None:
            key, wanted = self.field
            if key not in op:
                return False
            return field_text(op[key]) == wanted
        return True

    def head_is_recent(self, line: bytes) -> bool:
        """Whether the line's op is at or after since: read off its canonical head, or, for a
        line another writer spelled otherwise, decoded (one line a block is judged)."""
        head = _CANONICAL_HEAD.match(line)
        try:
            timestamp = head[3].decode("ascii") if head is not None else decode_stored_line(line)["timestamp"]
            return _seconds(timestamp) >= self.since
        except Exception:  # a line no read serves: it says nothing of the time
            return False


class SkippedLines:
    """Lines no read could serve: counted, and where the first was, to report once."""

    def __init__(self):
        self.count = 0
        self.first: tuple[Path, int] | None = None

    def decode(self, line: bytes, path: Path, offset: int) -> dict | None:
        """decode_stored_line, or None (counted) for a line it refuses."""
        try:
            return decode_stored_line(line)
        except Exception:  # whatever a stored line makes decoding raise, it is one bad line
            self.count += 1
            self.first = self.first or (path, offset)
            return None


class Segment(NamedTuple):
    """One file of the journal opened for reading: the live file or a rotated segment."""

    path: Path
    fd: int
    ino: int
    end: int  # where its last complete line ended when opened; a line being written is not read
    unsynced: tuple[tuple[int, int], ...]  # recorded ranges no reader trusts (see UnsyncedRecord)


class JournalFiles:
    """The journal's files as they were when listed, newest first, each opened when it is first
    read and read through that descriptor: a rotation or deletion meanwhile changes nothing
    of what is read, and only the files in hand hold descriptors.

    Files only ever move to older names, so one is looked for under the name it was listed
    by and the older ones; a rotation while they are listed can show one file under two
    names: it is listed once, under the newer.
    """

    def __init__(self, path: Path, keep_files: int, record: UnsyncedRecord | None = None):
        self.path, self.keep_files, self.record = path, keep_files, record
        self.listed: list[tuple[int, int]] = []  # (its place in segment_paths, inode)
        self._opened: dict[int, Segment] = {}
        self._unsynced = UnsyncedRanges(record)
        for place, name in enumerate(segment_paths(path, keep_files)):
            try:
                status = os.stat(name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(status.st_mode) and all(ino != status.st_ino for _, ino in self.listed):
                self.listed.append((place, status.st_ino))
        # Opened now: where the live file ends now is where a query starts, and a follow goes on.
        self._live = self.segment(0) if self.listed and self.listed[0][0] == 0 else None

    def live(self) -> Segment | None:
        """The file the path named when listed, if it named one."""
        return self._live

    def __len__(self) -> int:
        return len(self.listed)

    def segment(self, index: int) -> Segment | None:
        """The index-th file listed, opened; None if it is gone."""
        if index not in self._opened:
            place, ino = self.listed[index]
            for name in itertools.islice(segment_paths(self.path, self.keep_files), place, None):
                fd = open_for_reading(name)
                if fd is None:
                    continue
                status = os.fstat(fd)
                if status.st_ino == ino:
                    self._opened[index] = Segment(name, fd, ino, complete_end(fd, status.st_size),
                                                  self._unsynced.of(fd))
                    break
                os.close(fd)
            else:
                return None
        return self._opened[index]

    def release(self, index: int) -> None:
        segment = self._opened.pop(index, None)
        if segment is not None:
            os.close(segment.fd)

    def close(self) -> None:
        for index in list(self._opened):
            self.release(index)

    def __enter__(self) -> "JournalFiles":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def cursor(self, index: int, offset: int) -> str | None:
        """The cursor of the ops before offset in the index-th file, None if none older is kept:
        inode.offset.crc, the crc of the file's first bytes telling a reused inode apart."""
        segment = self.segment(index)
        while offset == 0 or segment is None:
            index += 1
            if index == len(self.listed):
                return None
            segment = self.segment(index)
            offset = segment.end if segment is not None else 0
        return f"{segment.ino}.{offset}.{zlib.crc32(os.pread(segment.fd, min(offset, 4096), 0)):08x}"

    def resume(self, cursor: str) -> tuple[int, int]:
        """The (file index, offset) a cursor names. Raises InvalidOp if it is malformed,
        RotatedAway if its file is no longer kept (or no longer holds what it did)."""
        try:
            ino_text, offset_text, crc = cursor.split(".")
            ino, offset = bounded_int(ino_text, 2 ** 64), bounded_int(offset_text, 2 ** 63)
            if offset == 0 or len(crc) != 8 or crc.strip("0123456789abcdef"):
                raise ValueError
        except ValueError:
            raise InvalidOp("cursor", "is malformed: pass back the cursor of an answer as it was") from None
        for index, (_, listed_ino) in enumerate(self.listed):
            segment = self.segment(index) if listed_ino == ino else None
            if segment is not None and offset <= segment.end and self.cursor(index, offset).endswith("." + crc):
                return index, offset
        raise RotatedAway("the ops at this cursor were rotated away (segments beyond keep_files are "
                          "deleted); start again without a cursor")


def candidate_lines(chunk: bytes, op_filter: OpFilter):
    """(index, line) of the chunk's lines that may pass the filter, newest first.

    With a needle, those holding it; with none but a grep to try on raw text (and an ASCII
    chunk), those its matches touch; either way, any holding a backslash (an escape may spell
    a value otherwise), and for a needle only a canonical head spells, any without one. They
    are found by bytes.find and regexes over the whole chunk, so a line passed over costs no
    Python work. Otherwise, every line.
    """
    needle = op_filter.needle
    ascii_text = op_filter.greps_raw and needle is None and chunk.isascii()
    if needle is None and not ascii_text:
        pos = len(chunk) - 1  # the newline ending the newest line
        while pos >= 0:
            start = chunk.rfind(b"\n", 0, pos) + 1
            yield start, chunk[start:pos]
            pos = start - 1
        return
    starts = set()
    if ascii_text:  # character offsets are byte offsets
        text = chunk.decode("ascii")
        for match in op_filter.raw_pattern.finditer(text):
            starts.add(text.rfind("\n", 0, match.start()) + 1)
            newline = text.find("\n", match.start(), match.end() - 1)
            while newline >= 0:  # a match running on into the lines after
                starts.add(newline + 1)
                newline = text.find("\n", newline + 1, match.end() - 1)
    for wanted in (needle, b"\\") if needle is not None else (b"\\",):
        hit = chunk.find(wanted)
        while hit >= 0:
            starts.add(chunk.rfind(b"\n", 0, hit) + 1)
            hit = chunk.find(wanted, chunk.find(b"\n", hit))
    if op_filter.needs_canonical:
        starts.update(match.end() for match in _NOT_CANONICAL.finditer(chunk, 0, len(chunk) - 1))
        if not _CANONICAL_HEAD.match(chunk):
            starts.add(0)
    for start in sorted(starts, reverse=True):
        yield start, chunk[start:chunk.find(b"\n", start)]


class HistoryPage(NamedTuple):
    """What read_history found, and where it stopped."""

    ops: list  # newest first (or what read_history was given as into), each as kept_as made it
    cursor: str | None  # where the next page starts; None: nothing older is kept, or wanted
    scanned_bytes: int
    truncated: bool  # max_scan_bytes stopped the scan before it found limit ops


def read_history(files: JournalFiles, op_filter: OpFilter, limit: float, cursor: str | None = None,
                 max_scan_bytes: float = math.inf, skipped: SkippedLines | None = None, into=None,
                 kept_as: Callable[[dict], object] = RingOp) -> HistoryPage:
    """The newest `limit` ops op_filter keeps, before cursor (or from the end), newest first;
    into: where they are appended (anything with append and len; default a new list), which
    the page returns as its ops; each as kept_as makes it of the decoded op (a RingOp, or for
    a reader that only counts, the op itself: it spares encoding each op again).

    Stops at limit ops; once max_scan_bytes are read (at the end of the chunk of whole
    lines in hand, so a page always moves on); with since, once SINCE_RUN_BYTES in a row have
    shown no op at or after since (of the ops it decoded, and the oldest line of each chunk:
    a block's worth). Raises InvalidOp or RotatedAway for the cursor, OSError for the files.
    """
    skipped = skipped or SkippedLines()
    ops = [] if into is None else into
    first, resume_at = files.resume(cursor) if cursor is not None else (0, None)
    scanned = behind = 0  # behind: bytes back from the start of the scan to the segment in hand
    recent_at = 0  # bytes back from the start to the last op seen at or after since
    for index in range(first, len(files)):
        segment = files.segment(index)
        if segment is None:
            break  # deleted while this read ran, and everything older with it
        top = resume_at if index == first and resume_at is not None else segment.end
        reader = LinesBackward(segment.fd, top)
        for offset, lines in reader.chunks():
            for start, line in candidate_lines(lines, op_filter):
                if not line.strip() or (op_filter.judges_raw and op_filter.rules_out(line)):
                    continue
                if segment.unsynced and overlaps(segment.unsynced, offset + start, len(line) + 1):
                    continue
                op = skipped.decode(line, segment.path, offset + start)
                if op is None:
                    continue
                if op_filter.since is not None and _seconds(op["timestamp"]) >= op_filter.since:
                    recent_at = behind + top - offset - start
                if op_filter.accepts(op):
                    ops.append(kept_as(op))
                    if len(ops) == limit:
                        return HistoryPage(ops, files.cursor(index, offset + start),
                                           scanned + reader.read_bytes, False)
            read = scanned + reader.read_bytes
            if op_filter.since is not None:
                if op_filter.head_is_recent(lines[:lines.find(b"\n")]):
                    recent_at = behind + top - offset
                if behind + top - offset - recent_at >= SINCE_RUN_BYTES:
                    return HistoryPage(ops, None, read, False)
            if read >= max_scan_bytes and (offset or index + 1 < len(files)):
                return HistoryPage(ops, files.cursor(index, offset), read, True)
        scanned += reader.read_bytes
        behind += top
        files.release(index)
    return HistoryPage(ops, None, scanned, False)


class JournalFollower:
    """The ops appended to the journal from a point on, as `tail -F` follows a path.

    Once the path names another file (observerd rotated, logrotate moved the file and a
    SIGHUP or the next append made the path again), the rest of the file followed so far
    is read, then the segments rotated since, then the new live file from its start. A
    file left is still read for RETIRE_S, as a writer that looked at the path just before
    it changed may land one last append there.
    """

    RETIRE_S = 2.0

    def __init__(self, path: Path, keep_files: int, op_filter: OpFilter, skipped: SkippedLines,
                 live: Segment | None, record: UnsyncedRecord | None = None):
        """live: the live file as JournalFiles listed it (followed from its end), if it was."""
        self.path, self.keep_files, self.record = path, keep_files, record
        self._unsynced = UnsyncedRanges(None)
        self.op_filter = op_filter
        self.skipped = skipped
        self._files: list[FollowedFile] = []  # in the order they are read: oldest first
        self._current: FollowedFile | None = None  # the one the path named when last looked at
        if live is not None:
            self._current = FollowedFile(live.path, os.dup(live.fd), live.end)
            self._files.append(self._current)

    def poll(self) -> list[RingOp]:
        """The ops appended since the last poll that the filter keeps, in file order."""
        kept: list[RingOp] = []
        self._unsynced = UnsyncedRanges(self.record)  # a range may be recorded while followed
        for followed in self._files:
            self._read(followed, kept)
        if self._current.replaced() if self._current is not None else self.path.is_file():
            self._take_new_files(kept)
        now = time.monotonic()
        for followed in [f for f in self._files if f.retire_at is not None and f.retire_at <= now]:
            rest = followed.rest()
            if rest.strip():
                self.skipped.decode(rest, followed.path, followed.offset)
            followed.close()
            self._files.remove(followed)
        return kept

    def _take_new_files(self, kept: list[RingOp]) -> None:
        """Follow what came after the current file: the segments rotated since it (a rotation
        or two between polls), then the live file."""
        retire_at = time.monotonic() + self.RETIRE_S
        if self._current is not None:
            self._current.retire_at = retire_at
        with JournalFiles(self.path, self.keep_files, self.record) as files:
            inodes = [ino for _, ino in files.listed]
            if self._current is not None and self._current.ino in inodes:
                newer = inodes.index(self._current.ino)
            elif self._current is not None and os.fstat(self._current.fd).st_nlink == 0:
                # Deleted: rotated past keep_files, so every segment listed came after it.
                newer = len(inodes)
            else:  # moved to another name (logrotate's own): only the new live file
                newer = 1 if files.live() is not None else 0
            self._current = None
            for index in reversed(range(newer)):
                segment = files.segment(index)
                if segment is None:
                    continue
                live = segment is files.live()
                followed = FollowedFile(segment.path, os.dup(segment.fd), 0, None if live else retire_at)
                self._files.append(followed)
                self._read(followed, kept)
                if live:
                    self._current = followed

    def _read(self, followed: FollowedFile, kept: list[RingOp]) -> None:
        followed.truncated()
        skip = self._unsynced.of(followed.fd)
        for start, end, line in followed.lines():
            followed.offset = end
            if skip and overlaps(skip, start, end - start):
                continue
            if line.strip() and not (self.op_filter.judges_raw and self.op_filter.rules_out(line)):
                op = self.skipped.decode(line, followed.path, start)
                if op is not None and self.op_filter.accepts(op):
                    kept.append(RingOp(op))

    def close(self) -> None:
        for followed in self._files:
            followed.close()
        self._files, self._current = [], None


# =============================================================================
# [SECTION] Analysis: failure signatures, clusters, playbooks, reviews (pure, but for cached signatures)
# =============================================================================

_SIGNATURE_RULES = [
    (re.compile(r"\"[^\"]*\"|'[^']*'"), "<str>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<uuid>"),
    (re.compile(r"(?:[a-z]:)?(?:[\\/][\w.\-~@%+]+){2,}[\\/]?|(?<![\w.])\.{0,2}/[\w.\-~@%+]+"), "<path>"),
    (re.compile(r"\b0x[0-9a-f]+\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{6,}\b"), "<hex>"),
    (re.compile(r"[-+]?\d+(?:\.\d+)?"), "<n>"),
    (re.compile(r"\s+"), " "),
]
NO_ERROR_SIGNATURE = "<no error text>"


def error_signature(text: str | None) -> str:
    """Normalise an error so the same failure with different ids, paths or numbers matches.

    Errors longer than ERROR_TEXT_KEPT_CHARS are signed by that prefix, as the ring keeps them.
    """
    signature = (text or "")[:ERROR_TEXT_KEPT_CHARS].lower()
    for pattern, placeholder in _SIGNATURE_RULES:
        signature = pattern.sub(placeholder, signature)
    return signature.strip()[:SIGNATURE_MAX_CHARS] or NO_ERROR_SIGNATURE


def signature_of(op) -> str:
    """An op's error signature; a RingOp's is computed once, as analysis runs every interval."""
    if not isinstance(op, RingOp):
        return error_signature(op.get("error"))
    if op.signature is None:
        op.signature = error_signature(op.error)
    return op.signature


def op_time(op: dict) -> datetime:
    return parse_rfc3339(op["timestamp"])


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def group_failures(ops: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Failed ops by (endpoint, error signature), each group oldest first.

    Overseer corrections are left out, even one that says it failed: they are the overseer's
    answer to failures, and clustering or escalating them would feed its work back to it.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for op in ops:
        if op["success"] is not True and op["source"] != CORRECTION_SOURCE:
            key = (op["endpoint"], signature_of(op))
            groups.setdefault(key, []).append(op)
    return groups


def count_signatures(failures: list[dict]) -> Counter[str]:
    """How often each error signature occurs; most_common() breaks ties by first seen."""
    return Counter(signature_of(op) for op in failures)


def describe_cluster(key: tuple[str, str], members: list[dict]) -> dict:
    return {
        "endpoint": key[0],
        "signature": key[1],
        "count": len(members),
        "first_seen": min(members, key=op_time)["timestamp"],
        "last_seen": max(members, key=op_time)["timestamp"],
        "sources": dict(Counter(op["source"] for op in members)),
        "sample_error": members[-1].get("error") or "",
    }


def rank_clusters(groups: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """Failure clusters, largest first (ties: most recent first, then endpoint)."""
    clusters = [describe_cluster(key, members) for key, members in groups.items()]
    clusters.sort(key=lambda c: (c["endpoint"], c["signature"]))
    clusters.sort(key=lambda c: parse_rfc3339(c["last_seen"]), reverse=True)
    clusters.sort(key=lambda c: c["count"], reverse=True)
    return clusters


def consolidate_playbooks(ops: list[dict]) -> list[dict]:
    """One playbook per endpoint of the scenario ops, sorted by endpoint."""
    runs: dict[str, list[dict]] = {}
    for op in ops:
        if op["source"] == "scenario":
            runs.setdefault(op["endpoint"], []).append(op)
    playbooks = []
    for endpoint in sorted(runs):
        members = runs[endpoint]
        durations = sorted(op["duration_ms"] for op in members)
        successes = [op for op in members if op["success"] is True]
        failures = [op for op in members if op["success"] is not True]
        top_signature = count_signatures(failures).most_common(1)
        playbooks.append({
            "endpoint": endpoint,
            "runs": len(members),
            "successes": len(successes),
            "success_rate": round(len(successes) / len(members), 4),
            "p50_duration_ms": percentile(durations, 50),
            "p95_duration_ms": percentile(durations, 95),
            "last_success": max((op["timestamp"] for op in successes), key=parse_rfc3339, default=None),
            "last_failure": max((op["timestamp"] for op in failures), key=parse_rfc3339, default=None),
            "top_error_signature": top_signature[0][0] if top_signature else None,
        })
    return playbooks


# Review verdicts, in order of precedence. Documented in docs/internals.md.
REVIEW_MIN_OPS = 5
REVIEW_FAILING_RATE = 0.5
REVIEW_DEGRADED_RATE = 0.1
REVIEW_SLOW_P95_MS = 5000


def review_endpoint(endpoint: str, ops: list[dict]) -> dict:
    """Heuristic health of one endpoint's ops, with the reasons for the verdict."""
    durations = sorted(op["duration_ms"] for op in ops)
    failures = [op for op in ops if op["success"] is not True]
    rate = len(failures) / len(ops)
    p50, p95 = percentile(durations, 50), percentile(durations, 95)
    top = count_signatures(failures).most_common(3)
    reasons = []
    if len(ops) < REVIEW_MIN_OPS:
        verdict = "insufficient_data"
        reasons.append(f"only {len(ops)} ops; at least {REVIEW_MIN_OPS} are needed for a verdict")
    else:
        if rate >= REVIEW_FAILING_RATE:
            reasons.append(f"failure rate {rate:.0%} is at or above {REVIEW_FAILING_RATE:.0%}")
        elif rate >= REVIEW_DEGRADED_RATE:
            reasons.append(f"failure rate {rate:.0%} is at or above {REVIEW_DEGRADED_RATE:.0%}")
        if p95 is not None and p95 > REVIEW_SLOW_P95_MS:
            reasons.append(f"p95 duration {p95:g} ms is above {REVIEW_SLOW_P95_MS} ms")
        if top and rate >= REVIEW_DEGRADED_RATE:
            reasons.append(f"most common error: {top[0][0]!r} ({top[0][1]}x)")
        if rate >= REVIEW_FAILING_RATE:
            verdict = "failing"
        elif reasons:
            verdict = "degraded"
        else:
            verdict = "healthy"
            reasons.append(f"failure rate {rate:.0%} and p95 {p95:g} ms are within bounds")
    return {
        "endpoint": endpoint,
        "total": len(ops),
        "failures": len(failures),
        "failure_rate": round(rate, 4),
        "p50_duration_ms": p50,
        "p95_duration_ms": p95,
        "top_error_signatures": [{"signature": sig, "count": n} for sig, n in top],
        "verdict": verdict,
        "reasons": reasons,
    }


def rank_endpoints(ops: list[dict], limit: int) -> list[dict]:
    """The first limit endpoints by most failures, then most ops, then name: each with its ops,
    failures, failure rate and p50/p95 duration."""
    durations: dict[str, list[float]] = {}
    failed: Counter[str] = Counter()
    for op in ops:
        endpoint = op["endpoint"]
        durations.setdefault(endpoint, []).append(op["duration_ms"])
        if op["success"] is not True:
            failed[endpoint] += 1
    ranked = []
    for endpoint in sorted(durations, key=lambda e: (-failed[e], -len(durations[e]), e))[:limit]:
        values = sorted(durations[endpoint])
        ranked.append({"endpoint": endpoint, "ops": len(values), "failures": failed[endpoint],
                       "failure_rate": round(failed[endpoint] / len(values), 4),
                       "p50_ms": percentile(values, 50), "p95_ms": percentile(values, 95)})
    return ranked


COUNT_BY_SIGNATURE = "signature"  # count_by's one name that is not an op field


def count_value(op, field: str) -> str | None:
    """What op is counted under by field: its value (a string as is, anything else as its
    JSON, as --field spells it; None when it has none), or for signature its failure's error
    signature (None for a success)."""
    if field == COUNT_BY_SIGNATURE:
        return None if op["success"] is True else signature_of(op)
    value = op.get(field) if not isinstance(op, RingOp) or field in RingOp.FIELDS else op.to_dict().get(field)
    return None if value is None else value if isinstance(value, str) else _LINE_ENCODER.encode(value)


class GroupCounter:
    """count_by's groups, counted as ops are appended (read_history appends each op it keeps
    here), so a count over a long window holds a row per value, never the ops."""

    def __init__(self, field: str):
        """field: what count_value groups by; raises InvalidOp naming count_by if it is none."""
        if not field or _has_lone_surrogate(field):
            raise InvalidOp("count_by", f"must name a field: endpoint, source, {COUNT_BY_SIGNATURE}, or any op field")
        self.field = field
        self.counted = 0
        # value -> [failures, durations, newest seconds, newest timestamp]
        self._groups: dict[str | None, list] = {}

    def append(self, op) -> None:
        group = self._groups.setdefault(count_value(op, self.field), [0, [], -math.inf, None])
        group[0] += op["success"] is not True
        group[1].append(op["duration_ms"])
        seconds = _seconds(op["timestamp"])
        if seconds > group[2]:
            group[2], group[3] = seconds, op["timestamp"]
        self.counted += 1

    def __len__(self) -> int:
        return self.counted

    def rows(self, failed_only: bool = False) -> list[dict]:
        """One row per value: ops, failures, failure rate, p50/p95 duration, the newest
        timestamp; most failures first, then most ops, then by value. failed_only: only the
        groups with failures, each rate still over all the group's ops."""
        rows = []
        for value, (failures, durations, _, newest) in self._groups.items():
            if failed_only and not failures:
                continue
            durations = sorted(durations)
            rows.append({"value": value, "ops": len(durations), "failures": failures,
                         "failure_rate": round(failures / len(durations), 4), "p50_ms": percentile(durations, 50),
                         "p95_ms": percentile(durations, 95), "newest": newest})
        rows.sort(key=lambda row: (-row["failures"], -row["ops"], row["value"] is None, row["value"] or ""))
        return rows


def review_ops(ops: list[dict]) -> list[dict]:
    """Reviews per endpoint, worst verdict first."""
    by_endpoint: dict[str, list[dict]] = {}
    for op in ops:
        by_endpoint.setdefault(op["endpoint"], []).append(op)
    rank = {"failing": 0, "degraded": 1, "healthy": 2, "insufficient_data": 3}
    reviews = [review_endpoint(endpoint, members) for endpoint, members in by_endpoint.items()]
    reviews.sort(key=lambda r: (rank[r["verdict"]], r["endpoint"]))
    return reviews


# What an LLM review sends, whatever the ring holds: a ring of a thousand endpoints failing
# with 4 KB errors must not become a prompt of megabytes. Documented in docs/internals.md.
LLM_PROMPT_MAX_BYTES = 16 * 1024
LLM_PROMPT_TEXT_CHARS = 200  # each endpoint, signature and reason is cut to this
LLM_PROMPT = ("You review the health of services observed by the lakehouse. Given these heuristic "
              "findings as JSON (the {shown} worst of {total} endpoints, worst first), say what is "
              "wrong, what is likely causing it, and what to check first. Be brief.\n\n")


def _cut_for_prompt(text: str) -> str:
    return text if len(text) <= LLM_PROMPT_TEXT_CHARS else text[:LLM_PROMPT_TEXT_CHARS] + "…"


def llm_prompt(reviews: list[dict]) -> str:
    """The prompt of an LLM review: the reviews worst first, each text cut, as many as fit in
    LLM_PROMPT_MAX_BYTES of UTF-8."""
    total = len(reviews)
    budget = LLM_PROMPT_MAX_BYTES - len(LLM_PROMPT.format(shown=total, total=total).encode()) - len("[]")
    shown = []
    for review in reviews:
        part = json.dumps({
            **review,
            "endpoint": _cut_for_prompt(review["endpoint"]),
            "top_error_signatures": [{**top, "signature": _cut_for_prompt(top["signature"])}
                                     for top in review["top_error_signatures"]],
            "reasons": [_cut_for_prompt(reason) for reason in review["reasons"]],
        }, ensure_ascii=False)
        budget -= len(part.encode()) + len(",")
        if budget < 0:
            break
        shown.append(part)
    return LLM_PROMPT.format(shown=len(shown), total=total) + "[" + ",".join(shown) + "]"


# =============================================================================
# [SECTION] Statistics: the tests a comparison runs (Fisher exact, Mann–Whitney U, Benjamini–Hochberg)
# =============================================================================

# Two tables whose probabilities differ by less than this (relatively) are equally likely:
# floating-point sums must not make the observed table rarer than its mirror (R, SciPy).
FISHER_RELATIVE_TOLERANCE = 1e-7
# SciPy's method="auto": the exact U distribution when a side has at most this many values and
# none are tied. Past MWU_EXACT_MAX_CELLS (n1·n2) it would cost seconds for a p the normal
# approximation already gives to three digits, so that is used instead.
MWU_EXACT_MAX_OPS = 8
MWU_EXACT_MAX_CELLS = 20_000


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_exact_p(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p of Fisher's exact test of the 2×2 table [[a, b], [c, d]]: given its margins,
    the probability of every table no more likely than the observed one."""
    row, other_row, column = a + b, c + d, a + c
    low, high = max(0, column - other_row), min(column, row)
    if low == high:
        return 1.0
    logs = [_log_comb(row, x) + _log_comb(other_row, column - x) for x in range(low, high + 1)]
    top = max(logs)
    densities = [math.exp(value - top) for value in logs]
    observed = densities[a - low] * (1 + FISHER_RELATIVE_TOLERANCE)
    return min(1.0, math.fsum(p for p in densities if p <= observed) / math.fsum(densities))


def _u_counts(m: int, n: int) -> list[int]:
    """How many of the C(m+n, m) orderings of m and n distinct values give each U from 0 to
    m·n: the coefficients of the Gaussian binomial [m+n choose m]."""
    m, n = sorted((m, n))
    top = m * n
    counts = [1] + [0] * top
    for i in range(1, m + 1):
        for j in range(top, n + i - 1, -1):  # times (1 - q^(n+i))
            counts[j] -= counts[j - n - i]
        for j in range(i, top + 1):  # divided by (1 - q^i)
            counts[j] += counts[j - i]
    return counts


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def mann_whitney_u(baseline: list[float], candidate: list[float]) -> tuple[float, float]:
    """(U, p) of the two-sided Mann–Whitney U test, as SciPy's method="auto" computes it.

    U is the candidate's: the pairs in which its value is the larger (a tie counts one half),
    so U above n1·n2/2 says the candidate's values tend to be larger. p is exact when a side
    has at most MWU_EXACT_MAX_OPS values and there are no ties; otherwise the normal
    approximation with the tie correction of the variance and a continuity correction.
    """
    n1, n2 = len(baseline), len(candidate)
    ranked = sorted(itertools.chain(((value, 0) for value in baseline), ((value, 1) for value in candidate)))
    rank_sum = 0.0  # of the candidate's values, ties given their mean rank
    tie_term = 0  # Σ (t³ - t) over groups of t tied values
    start = 0
    for _, group in itertools.groupby(ranked, key=lambda pair: pair[0]):
        sides = [side for _, side in group]
        size = len(sides)
        rank_sum += (start + 1 + start + size) / 2 * sum(sides)
        tie_term += size ** 3 - size
        start += size
    u = rank_sum - n2 * (n2 + 1) / 2
    larger = max(u, n1 * n2 - u)
    if min(n1, n2) <= MWU_EXACT_MAX_OPS and not tie_term and n1 * n2 <= MWU_EXACT_MAX_CELLS:
        counts = _u_counts(n1, n2)
        p = 2 * sum(counts[int(larger):]) / math.comb(n1 + n2, n1)
    else:
        n = n1 + n2
        spread = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
        p = 1.0 if spread == 0 else 2 * normal_sf((larger - n1 * n2 / 2 - 0.5) / spread)
    return u, min(1.0, p)


def benjamini_hochberg(ps: list[float]) -> list[float]:
    """The adjusted p (q) of each p in one family: the false discovery rate at which it would
    first count as significant (Benjamini–Hochberg step-up)."""
    order = sorted(range(len(ps)), key=ps.__getitem__)
    qs = [1.0] * len(ps)
    running = 1.0
    for rank in range(len(ps), 0, -1):
        index = order[rank - 1]
        running = min(running, ps[index] * len(ps) / rank)
        qs[index] = running
    return qs


# =============================================================================
# [SECTION] Comparisons: runs, two sets of ops compared with significance, and a verdict on each
# overseer correction; read from the journal by History, judged by Statistics
# =============================================================================

SCAN_PAGE_OPS = 1000  # decoded ops a scan holds at once: read_history hands them over a page at a time
MIN_COMPARED_OPS = 5  # a side with fewer is "too few" for a test
SIGNIFICANCE = 0.05  # the false discovery rate of one comparison (Benjamini–Hochberg)
COMPARE_SIGNATURES = 20  # new and gone error signatures listed per row, the most frequent first
TOO_FEW = "too few"
# A row's own keys: grouping by a field of one of these names would overwrite one of them.
COMPARE_ROW_KEYS = ("verdict", "baseline", "candidate", "failure_rate", "duration", "new_signatures",
                    "gone_signatures")
COMPARE_FILTERS = ("endpoint", "source", "grep", "regex", "field")  # regex: the command line's only
_VERDICT_ORDER = {"worse": 0, "better": 1, "~": 2, TOO_FEW: 3}
CORRECTION_VERDICTS = {"better": "helped", "worse": "hurt", "~": "no change", TOO_FEW: "too few ops"}
PENDING = "pending"
# The verdicts that leave a correction's endpoint no better: escalated while it still fails.
UNHELPFUL = ("no change", "hurt")


def chronological(timestamp: str) -> str:
    """A valid timestamp spelled as rfc3339_of spells times, so that such spellings sort as the
    times do: most are already (observerd's own stamps), and cost no parsing."""
    if len(timestamp) == 27 and timestamp[10] == "T" and timestamp[19] == "." and timestamp[26] == "Z":
        return timestamp
    return rfc3339_of(_seconds(timestamp))


class Scan(NamedTuple):
    scanned_bytes: int
    truncated: bool  # max_scan_bytes stopped it before the filters' range ended
    cursor: str | None  # where the rest of a truncated scan starts


def _the_op(op: dict) -> dict:
    return op


def scan_journal(files: JournalFiles, op_filter: OpFilter, visit: Callable[[dict], None],
                 max_scan_bytes: float, cursor: str | None = None, skipped: SkippedLines | None = None) -> Scan:
    """Hand visit every op op_filter keeps (decoded), newest first, read_history's page at a
    time: a scan holds one page of ops however many it reads, and stops where history would."""
    scanned = 0
    while True:
        page = read_history(files, op_filter, SCAN_PAGE_OPS, cursor, max_scan_bytes - scanned, skipped,
                            kept_as=_the_op)
        scanned += page.scanned_bytes
        for op in page.ops:
            visit(op)
        if page.truncated or page.cursor is None:
            return Scan(scanned, page.truncated, page.cursor)
        cursor = page.cursor


class Tally:
    """One group's ops on one side of a comparison, counted as a scan hands them over.

    An op sent without a duration is stored with duration_ms 0, so 0 means none: such ops
    count in ops and failures, not in the durations (a failure that never ran must not make
    an endpoint look faster).
    """

    __slots__ = ("ops", "failures", "durations", "signatures")

    def __init__(self):
        self.ops = self.failures = 0
        self.durations: list[float] = []
        self.signatures: Counter[str] = Counter()

    def add(self, op: dict) -> None:
        self.ops += 1
        if op["success"] is not True:
            self.failures += 1
            self.signatures[signature_of(op)] += 1
        if op["duration_ms"]:
            self.durations.append(op["duration_ms"])

    def summary(self) -> dict:
        durations = sorted(self.durations)
        return {"ops": self.ops, "failures": self.failures,
                "failure_rate": round(self.failures / self.ops, 4) if self.ops else None,
                "p50_ms": percentile(durations, 50), "p95_ms": percentile(durations, 95)}


def combined_verdict(verdicts: list[str]) -> str:
    """worse if any is, better if any is and none is worse, too few if all are, else ~."""
    if "worse" in verdicts:
        return "worse"
    if "better" in verdicts:
        return "better"
    return TOO_FEW if verdicts and all(v == TOO_FEW for v in verdicts) else "~"


def _signature_counts(counts: Counter[str], absent_from: Counter[str]) -> list[dict]:
    found = [(signature, count) for signature, count in counts.most_common() if signature not in absent_from]
    return [{"signature": signature, "count": count} for signature, count in found[:COMPARE_SIGNATURES]]


def compare_tallies(by: str, baseline: dict[str | None, Tally],
                    candidate: dict[str | None, Tally]) -> tuple[str, list[dict]]:
    """(the comparison's verdict, its rows): each group's failure rate (Fisher exact) and
    durations (Mann–Whitney U), every test of every row one Benjamini–Hochberg family at
    SIGNIFICANCE; rows worst verdict first, then by group."""
    rows, tests = [], []
    for key in sorted(baseline.keys() | candidate.keys(), key=lambda k: (k is None, k or "")):
        old, new = baseline.get(key) or Tally(), candidate.get(key) or Tally()
        row = {by: key, "verdict": TOO_FEW, "baseline": old.summary(), "candidate": new.summary(),
               "failure_rate": {"p": None, "q": None, "verdict": TOO_FEW},
               "duration": {"p": None, "q": None, "verdict": TOO_FEW},
               "new_signatures": _signature_counts(new.signatures, old.signatures),
               "gone_signatures": _signature_counts(old.signatures, new.signatures)}
        if min(old.ops, new.ops) >= MIN_COMPARED_OPS:
            p = fisher_exact_p(old.failures, old.ops - old.failures, new.failures, new.ops - new.failures)
            tests.append((row["failure_rate"], p, new.failures * old.ops - old.failures * new.ops))
        if min(len(old.durations), len(new.durations)) >= MIN_COMPARED_OPS:
            u, p = mann_whitney_u(old.durations, new.durations)
            tests.append((row["duration"], p, u - len(old.durations) * len(new.durations) / 2))
        rows.append(row)
    for (metric, p, direction), q in zip(tests, benjamini_hochberg([p for _, p, _ in tests])):
        significant = q <= SIGNIFICANCE and direction != 0
        metric.update(p=p, q=q, verdict=("worse" if direction > 0 else "better") if significant else "~")
    for row in rows:
        row["verdict"] = combined_verdict([row["failure_rate"]["verdict"], row["duration"]["verdict"]])
    rows.sort(key=lambda row: _VERDICT_ORDER[row["verdict"]])
    verdict = combined_verdict([row["verdict"] for row in rows])
    return ("~" if verdict == TOO_FEW else verdict), rows


def compare_side(text: str, name: str, now: float, zone: tzinfo | None = None) -> dict[str, str] | str:
    """One side of a comparison: the since and until of a time range SINCE..UNTIL (both ends in
    the --since grammar), or else a run id."""
    if not text:
        raise InvalidOp(name, "is required: a time range SINCE..UNTIL like 2h..1h, or a run id")
    since, dots, until = text.partition("..")
    if dots:
        try:
            start, end = (parse_time_bound(since, name, now, zone=zone),
                          parse_time_bound(until, name, now, zone=zone))
        except InvalidOp:
            return text
        if start > end:
            raise InvalidOp(name, f"starts after it ends: {since} is later than {until}")
        return {"since": since, "until": until}
    return text


def check_by(by: str) -> str:
    if not by:
        raise InvalidOp("by", "must name a field")
    if by in COMPARE_ROW_KEYS:
        raise InvalidOp("by", f"cannot be {by!r}, a key of each row itself ({', '.join(COMPARE_ROW_KEYS)})")
    return by


def compare_journal(files: JournalFiles, baseline: str, candidate: str, given: dict[str, str], by: str,
                    run_field: str, now: float, max_scan_bytes: float, zone: tzinfo | None = None,
                    skipped: SkippedLines | None = None) -> dict:
    """Compare the ops of two sides (compare_side) passing the filters given (COMPARE_FILTERS),
    grouped by the field by; corrections are never among them. Each side reads up to
    max_scan_bytes. Raises InvalidOp naming the parameter."""
    reject_unknown(given, COMPARE_FILTERS, "filter")
    check_by(by)
    sides = [compare_side(text, name, now, zone) for name, text in (("baseline", baseline), ("candidate", candidate))]
    tallies, scanned, truncated = [], 0, False
    for side in sides:
        side_given, run = dict(given), None
        if isinstance(side, dict):
            side_given.update(side)
        elif "field" in side_given:
            run = side  # the filter holds the user's field: the run is checked on the decoded op
        else:
            side_given["field"] = f"{run_field}={side}"
        op_filter = OpFilter(side_given, now, zone=zone)
        groups: dict[str | None, Tally] = {}

        def visit(op: dict) -> None:
            if op["source"] == CORRECTION_SOURCE:
                return
            if run is not None and (run_field not in op or field_text(op[run_field]) != run):
                return
            key = field_text(op[by]) if by in op else None
            (groups.get(key) or groups.setdefault(key, Tally())).add(op)

        scan = scan_journal(files, op_filter, visit, max_scan_bytes, skipped=skipped)
        tallies.append(groups)
        scanned += scan.scanned_bytes
        truncated = truncated or scan.truncated
    verdict, rows = compare_tallies(by, *tallies)
    return {"verdict": verdict, "baseline": baseline, "candidate": candidate, "by": by,
            "scanned_bytes": scanned, "truncated": truncated, "rows": rows}


class RunTally:
    """One run's ops, counted as a scan hands them over."""

    __slots__ = ("run", "first", "last", "first_at", "last_at", "ops", "failures", "durations", "endpoints")

    def __init__(self, run: object):
        self.run = run
        self.first = self.last = None
        self.first_at = self.last_at = ""  # chronological(first), chronological(last)
        self.ops = self.failures = 0
        self.durations: list[float] = []
        self.endpoints: set[str] = set()

    def add(self, op: dict) -> None:
        at = chronological(op["timestamp"])
        if at < self.first_at or not self.first_at:
            self.first, self.first_at = op["timestamp"], at
        if at > self.last_at:
            self.last, self.last_at = op["timestamp"], at
        self.ops += 1
        self.failures += op["success"] is not True
        if op["duration_ms"]:  # as a comparison counts it (see Tally)
            self.durations.append(op["duration_ms"])
        self.endpoints.add(op["endpoint"])

    def describe(self) -> dict:
        durations = sorted(self.durations)
        return {"run": self.run, "first": self.first, "last": self.last, "ops": self.ops,
                "failures": self.failures, "failure_rate": round(self.failures / self.ops, 4),
                "p50_ms": percentile(durations, 50), "p95_ms": percentile(durations, 95),
                "endpoints": sorted(self.endpoints)}


def list_runs(files: JournalFiles, op_filter: OpFilter, run_field: str, limit: int, cursor: str | None,
              max_scan_bytes: float, skipped: SkippedLines | None = None) -> dict:
    """The runs among the ops op_filter keeps (an op is in the run its run_field names), the
    limit last active first. A run the scan limit cuts shows only its part read: the cursor
    reads on."""
    runs: dict[str | tuple[str], RunTally] = {}

    def visit(op: dict) -> None:
        if run_field in op:
            value = op[run_field]
            # 42 and "42" are two runs, as the journal tells them apart.
            key = value if isinstance(value, str) else (_LINE_ENCODER.encode(value),)
            (runs.get(key) or runs.setdefault(key, RunTally(value))).add(op)

    scan = scan_journal(files, op_filter, visit, max_scan_bytes, cursor, skipped)
    newest = sorted(runs.values(), key=lambda run: run.last_at, reverse=True)[:limit]
    return {"runs": [run.describe() for run in newest], "count": len(newest), "cursor": scan.cursor,
            "scanned_bytes": scan.scanned_bytes, "truncated": scan.truncated}


def correction_key(correction: RingOp) -> str:
    """What names a correction across restarts: a digest of its journal line."""
    return hashlib.sha256(correction.line).hexdigest()[:32]


def judge_correction(files: JournalFiles, correction: RingOp, window_s: float, now: float,
                     max_scan_bytes: float, skipped: SkippedLines | None = None) -> dict:
    """A correction's verdict: its endpoint's ops in the window_s before it against those in
    the window_s from it on, compared as compare_journal does; pending until that has passed."""
    at = _seconds(correction.timestamp)
    before, after = Tally(), Tally()
    op_filter = OpFilter({"endpoint": correction.endpoint, "since": rfc3339_of(at - window_s),
                          "until": rfc3339_of(at + window_s)}, now)

    def visit(op: dict) -> None:
        # The endpoint again: a filter takes one with * ? [ as a glob.
        if op["source"] != CORRECTION_SOURCE and op["endpoint"] == correction.endpoint:
            (before if _seconds(op["timestamp"]) < at else after).add(op)

    scan = scan_journal(files, op_filter, visit, max_scan_bytes, skipped=skipped)
    _, (row,) = compare_tallies("endpoint", {correction.endpoint: before}, {correction.endpoint: after})
    return {"correction": correction, "key": correction_key(correction),
            "verdict": PENDING if now < at + window_s else CORRECTION_VERDICTS[row["verdict"]],
            "before": {"since": rfc3339_of(at - window_s), "until": correction.timestamp},
            "after": {"since": correction.timestamp, "until": rfc3339_of(at + window_s)},
            "comparison": row, "scanned_bytes": scan.scanned_bytes, "truncated": scan.truncated}


def escalated_corrections_path(persist_path: Path) -> Path:
    """The sidecar file listing the corrections already escalated, so a restart sends none twice."""
    return persist_path.with_name(persist_path.name + ".escalated-corrections")


class EscalatedCorrections:
    """The keys of the corrections escalated, newest last, kept in a sidecar (None: in memory)."""

    KEEP = 10_000  # far more than the corrections of any verdict horizon

    def __init__(self, path: Path | None):
        self.path = path
        self.keys: list[str] = []
        if path is not None and path.exists():
            try:
                keys = parse_json_strict(path.read_bytes(), "escalated corrections")
            except (OSError, InvalidOp) as exc:
                log("WARN", "ignoring unreadable escalated corrections", path=path, error=exc)
            else:
                if isinstance(keys, list) and all(isinstance(key, str) for key in keys):
                    self.keys = keys
                else:
                    log("WARN", "ignoring escalated corrections of the wrong shape", path=path)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def add(self, key: str) -> None:
        self.keys = [*self.keys, key][-self.KEEP:]
        if self.path is not None:
            write_file_atomically(self.path, json.dumps(self.keys).encode())


def list_corrections(files: JournalFiles, given: dict[str, str | list[str]], limit: int, window_s: float,
                     now: float, max_scan_bytes: float, escalated: EscalatedCorrections,
                     skipped: SkippedLines | None = None, zone: tzinfo | None = None) -> dict:
    """The limit newest corrections passing the filters given, each judged; all the scans
    together read about max_scan_bytes at most (a correction judged on a read cut short says
    truncated)."""
    op_filter = OpFilter({**given, "source": CORRECTION_SOURCE}, now, zone=zone)
    page = read_history(files, op_filter, limit, None, max_scan_bytes, skipped)
    scanned, truncated = page.scanned_bytes, page.truncated
    judged = []
    for correction in page.ops:
        entry = judge_correction(files, correction, window_s, now, max_scan_bytes - scanned, skipped)
        scanned += entry.pop("scanned_bytes")
        truncated = truncated or entry["truncated"]
        entry["escalated"] = entry["key"] in escalated
        judged.append(entry)
    return {"corrections": judged, "count": len(judged), "window_s": window_s,
            "scanned_bytes": scanned, "truncated": truncated}


# =============================================================================
# [SECTION] Insights: what the background loops found last, read by the API
# =============================================================================


class Insights:
    """The background loops' latest results, read by the HTTP handlers."""

    MAX_ESCALATIONS = 100  # of each kind: delivered (the newest per cluster), and failed

    def __init__(self):
        self._lock = threading.Lock()
        self.clusters: dict = {"analyzed_at": None, "clusters": []}
        self.playbooks: dict = {"consolidated_at": None, "playbooks": []}
        self.corrections: list[dict] = []  # the newest corrections judged, newest first
        # Escalation attempts as (sequence, attempt), each collection oldest first. Kept apart
        # so that a target that keeps failing never pushes the delivered ones out of sight.
        self._attempts = 0
        self._delivered: dict[tuple[str, str, str | None], tuple[int, dict]] = {}
        self._failed: deque[tuple[int, dict]] = deque(maxlen=self.MAX_ESCALATIONS)

    def publish_clusters(self, clusters: list[dict]) -> None:
        self.clusters = {"analyzed_at": utc_now_rfc3339(), "clusters": clusters}

    def publish_playbooks(self, playbooks: list[dict]) -> dict:
        self.playbooks = {"consolidated_at": utc_now_rfc3339(), "playbooks": playbooks}
        return self.playbooks

    def publish_corrections(self, judged: list[dict]) -> None:
        self.corrections = judged

    def record_escalation(self, attempt: dict) -> None:
        with self._lock:
            self._attempts += 1
            entry = (self._attempts, attempt)
            if attempt["outcome"] != "sent":
                self._failed.append(entry)
                return
            key = (attempt["endpoint"], attempt["signature"], attempt.get("correction"))
            self._delivered.pop(key, None)
            self._delivered[key] = entry
            if len(self._delivered) > self.MAX_ESCALATIONS:
                del self._delivered[next(iter(self._delivered))]

    def escalations(self) -> list[dict]:
        """The newest delivered escalation of each cluster and the recent failed attempts,
        newest first."""
        with self._lock:
            entries = [*self._delivered.values(), *self._failed]
        entries.sort(key=lambda entry: entry[0], reverse=True)
        return [attempt for _, attempt in entries]


# =============================================================================
# [SECTION] Outbound: HTTP calls to other services (escalation, LLM review; top to the daemon), each
# within a deadline
# =============================================================================


def _shutdown_quietly(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        # The plain socket's shutdown, also for TLS: it wakes a reader blocked in recv
        # without tearing down the TLS state that reader (or a 408 after it) is using.
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


OUTBOUND_MAX_ANSWER_BYTES = 4 * 1024 * 1024
OUTBOUND_ERROR_CHARS = 300  # of an OutboundError's one line


class OutboundError(Exception):
    """An outbound call failed or ran out of time; the message says how, briefly. status: the
    HTTP status of an answer that was not a 2xx, else None."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def call_json(url: str, timeout_s: float, payload: object = None, key: str = "",
              tls: ssl.SSLContext | None = None) -> object:
    """GET url (POST payload as JSON, when given), with key as its bearer token if any, and
    decode the JSON answer, all within timeout_s; tls: how an https URL is verified (None:
    as any client does). Raises OutboundError, whose message is one short line and never
    holds key."""
    try:
        return _call_json(url, timeout_s, payload, key, tls)
    except OutboundError as exc:
        # Errors reach logs and answers, and a peer's words (a reason phrase, a JSON key) may
        # echo the key: it is taken out before the message is cut, so no part of it is left.
        message = " ".join(str(exc).split())
        if key:
            message = message.replace(key, "(key)")
        raise OutboundError(message[:OUTBOUND_ERROR_CHARS], exc.status) from None


def _call_json(url: str, timeout_s: float, payload: object, key: str, tls: ssl.SSLContext | None) -> object:
    """call_json's exchange.

    A socket timeout bounds each read, not the call: a server dribbling its answer a byte at
    a time would hold the caller (a review, or the one loop thread) for as long as it likes.
    So at the deadline a timer shuts the socket down under the blocked reader, as
    close_expired() does for clients. Whatever the HTTP client raises is an OutboundError.
    """
    connection: http.client.HTTPConnection | None = None
    connected = False
    expired = threading.Event()

    def expire():
        expired.set()
        if connection is not None and connection.sock is not None:
            _shutdown_quietly(connection.sock)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        parts = urlsplit(url)
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout_s, context=tls)
        else:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        connection.connect()
        connected = True
        if expired.is_set():
            raise TimeoutError  # the deadline passed while connecting: no socket to shut down then
        headers = {"User-Agent": f"{SERVICE}/{VERSION}"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if payload is not None:
            headers["Content-Type"] = "application/json"
        connection.request("GET" if payload is None else "POST",
                           urlunsplit(("", "", parts.path or "/", parts.query, "")),
                           body=None if payload is None else encode_json(payload), headers=headers)
        response = connection.getresponse()
        body = response.read(OUTBOUND_MAX_ANSWER_BYTES + 1)
        if expired.is_set():
            raise TimeoutError  # the shutdown may have ended the answer early
        if response.length and len(body) <= OUTBOUND_MAX_ANSWER_BYTES:
            # read(amt) hands back a short body quietly when the server hangs up early.
            raise http.client.IncompleteRead(body, response.length)
    except Exception as exc:
        if expired.is_set() or isinstance(exc, TimeoutError):
            raise OutboundError("timed out") from None
        if not connected and isinstance(exc, OSError):
            raise OutboundError(f"unreachable: {exc.strerror or exc}") from None
        raise OutboundError(f"{type(exc).__name__}: {exc}") from None
    finally:
        timer.cancel()
        if connection is not None:
            connection.close()
    if not 200 <= response.status < 300:
        try:  # an observerd's 4xx names the problem in its error field
            said = json.loads(body)["error"]
        except Exception:  # any other answer: the status says all there is
            said = None
        raise OutboundError(f"HTTP {response.status} {response.reason}"
                            + (f": {said}" if isinstance(said, str) else ""), response.status)
    if len(body) > OUTBOUND_MAX_ANSWER_BYTES:
        raise OutboundError(f"answer is larger than {OUTBOUND_MAX_ANSWER_BYTES} bytes")
    try:
        return parse_json_strict(body, "answer") if body.strip() else None
    except InvalidOp as exc:
        raise OutboundError(str(exc)) from None


# The review's chain of LLM backends, in the order it asks them; each a label value of
# observerd_llm_requests_total.
LLM_BACKENDS = ("primary", "fallback")


@dataclass(frozen=True, slots=True)
class LLMBackend:
    """One model the review may ask: its place in the chain, how it is spoken to, its key."""

    name: str  # one of LLM_BACKENDS
    api: str  # one of LLM_APIS
    url: str
    model: str
    key: str = dataclass_field(repr=False)  # "" = none


def llm_backends(config: Config) -> list[LLMBackend]:
    """The backends configured (those with a URL), in the order the review asks them."""
    chain = [
        LLMBackend("primary", config.review_llm_api, config.review_llm_url, config.review_llm_model,
                   config.review_llm_key),
        LLMBackend("fallback", config.review_fallback_api, config.review_fallback_url,
                   config.review_fallback_model, config.review_fallback_key),
    ]
    return [backend for backend in chain if backend.url]


def ask_llm(backend: LLMBackend, prompt: str, timeout_s: float) -> str:
    """The backend's answer to prompt, within timeout_s; raises OutboundError, also when the
    answer holds no text."""
    if backend.api == "ollama":
        answer = call_json(f"{backend.url}/api/generate", timeout_s,
                           {"model": backend.model, "prompt": prompt, "stream": False}, backend.key)
        where = "response"
        text = answer.get(where) if isinstance(answer, dict) else None
    else:
        answer = call_json(f"{backend.url}/v1/chat/completions", timeout_s,
                           {"model": backend.model, "messages": [{"role": "user", "content": prompt}]},
                           backend.key)
        where = "choices[0].message.content"
        try:
            text = answer["choices"][0]["message"]["content"]
        except (TypeError, KeyError, IndexError):
            text = None
    # A \ud800 escape decodes to a lone surrogate, which no UTF-8 answer can carry on.
    if not isinstance(text, str) or not text.strip() or _has_lone_surrogate(text):
        raise OutboundError(f"answer has no '{where}' text in valid Unicode")
    return text


# =============================================================================
# [SECTION] HTTP protocol: one error path, request parsing, connection limits and deadlines, TLS,
# the one place every answer is counted, and the handler every route runs in, which answers from
# its own thread or, deferred, from another
# =============================================================================


MAX_HEADERS = 100
MAX_LINE_BYTES = 65536
SERVER_NAME = f"{SERVICE}/{VERSION}"
_REASONS = {status.value: status.phrase for status in HTTPStatus}
# What observerd_rejected_total counts refusals under; RequestError.reason is one of them.
REJECTION_REASONS = ("invalid", "unauthorized", "timeout", "length_required", "too_large",
                     "unsupported_encoding", "persist_failed", "too_many_connections", "not_ready",
                     "journal_unreadable")
# Every 503 carries it: the seconds a client waits before sending the same request again.
RETRY_AFTER_S = 1


class RequestError(Exception):
    """Answer this request with status and {"error": message}, plus headers.

    reason is what observerd_rejected_total counts it under (one of REJECTION_REASONS), or
    None for an answer that is not a refusal of the client's input (404, 405, 500, ...).
    """

    def __init__(self, status: int, message: str, reason: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = headers or {}


INTERNAL_ERROR = RequestError(500, "internal error")
OVERLOADED = RequestError(503, "too many connections", "too_many_connections")


def request_error(exc: Exception, parsed: str | None = None) -> RequestError:
    """The answer a failure below HTTP gets: the one place such errors become statuses.

    parsed names what the request carried, for an InvalidOp ("op" gives "invalid op: ...").
    """
    if isinstance(exc, InvalidOp):
        return RequestError(400, f"invalid {parsed}: {exc}" if parsed else str(exc), "invalid")
    if isinstance(exc, TooLarge):
        return RequestError(413, str(exc), "too_large")
    if isinstance(exc, PersistError):
        return RequestError(503, f"op not persisted: {exc}", "persist_failed")
    return INTERNAL_ERROR


_http_date_of = PerSecond(lambda second: formatdate(second, usegmt=True))


def http_date() -> str:
    """The Date header value."""
    return _http_date_of(int(time.time()))


class Document(NamedTuple):
    """An answer that is not JSON: its bytes, their media type, and headers of its own."""

    payload: bytes
    content_type: str
    headers: dict[str, str]


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names etag (weak comparison, RFC 9110 13.1.3)."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def render_answer(status: int, body: object, close: bool, head_only: bool = False) -> tuple[bytes, int]:
    """Status line, headers and body as one buffer, and the body's size: every answer's bytes.

    body is JSON, a Document, or a RequestError: {"error": message} and its headers. A 503
    always says when to retry. A 304 carries no body (RFC 9110 15.4.5) but the Content-Length a
    200 would have, like HEAD.
    """
    headers = None
    if isinstance(body, Document):
        payload, content_type, headers = body
    else:
        if type(body) is RequestError:
            body, headers = {"error": body.message}, body.headers
        payload, content_type = encode_json(body), "application/json"
    head_only = head_only or status == 304
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}",
        f"Server: {SERVER_NAME}",
        f"Date: {http_date()}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(payload)}",
    ]
    if headers:
        lines.extend(f"{name}: {value}" for name, value in headers.items())
    if status == 503:
        lines.append(f"Retry-After: {RETRY_AFTER_S}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return (head if head_only else head + payload), len(payload)


class Phase(NamedTuple):
    """Where a connection is: its phase, and the deadline it must leave it by (None in flight)."""

    name: str
    deadline: float | None


class ConnectionTracker:
    """Caps open connections and cuts off those that take too long to send a request.

    A per-recv socket timeout alone lets a client dribble one byte at a time forever
    (slowloris), so each connection gets a deadline for its whole next request, which
    close_expired() enforces by shutting down the reading side under the blocked reader: it
    sees the request end early, asks cut_reason() why, and answers 408 itself. At the cap, a
    new connection takes the place of the one stalled the longest (idle, mid-request, or not taking its answer) the
    same way; only a cap full of connections being served refuses it. An answer the client
    does not take before its own deadline is dropped (both sides shut down).
    """

    IDLE, READING, IN_FLIGHT, ANSWERING = "idle", "reading", "in_flight", "answering"

    def __init__(self, limit: int, request_timeout_s: float):
        self.limit = limit
        self.request_timeout_s = request_timeout_s
        # socket -> (phase, deadline): for the request to arrive whole (idle, reading), or for
        # the client to take the answer this thread writes (answering); None while in flight.
        self._open: dict[socket.socket, Phase] = {}
        # Connections owed an answer that another thread will send (at most one each, as the
        # handler's turn lock ensures); such a connection is in flight.
        self._owed: set[socket.socket] = set()
        # Connections whose reading side was shut down, and why; on their way out, so they
        # no longer count against the cap.
        self._cut: dict[socket.socket, str] = {}
        self._timeout_reason = f"request not complete within request_timeout_s={request_timeout_s:g}"
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._closing = False

    def admit(self, sock: socket.socket) -> bool:
        with self._lock:
            stalled = None
            if len(self._open) - len(self._cut) >= self.limit:
                # Waiting on its client: for a request to arrive, or for it to take an answer.
                # The earliest deadline is the one that has waited the longest.
                waiting = [(deadline, s, phase) for s, (phase, deadline) in self._open.items()
                           if phase != self.IN_FLIGHT and s not in self._owed and s not in self._cut]
                if not waiting or self._closing:  # the drain waits for those requests: keep them
                    return False
                _, stalled, phase = min(waiting, key=lambda entry: entry[0])
                self._cut[stalled] = f"request stalled while all max_connections={self.limit} were taken"
            self._open[sock] = Phase(self.IDLE, time.monotonic() + self.request_timeout_s)
        if stalled is not None:
            self._cut_off(stalled, phase)
        return True

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(sock, None)
            self._owed.discard(sock)
            self._cut.pop(sock, None)
            self._drained.notify_all()

    def awaiting_request(self, sock: socket.socket, again: bool) -> None:
        """Before each request: it must arrive, whole, before a fresh deadline. Once closing,
        a connection is kept alive for no further request (again), but its first is answered."""
        with self._lock:
            self._open[sock] = Phase(self.IDLE, time.monotonic() + self.request_timeout_s)
            close_now = again and self._closing and sock not in self._owed
        if close_now:
            _shutdown_quietly(sock)

    def answer_deferred(self, sock: socket.socket) -> None:
        """Another thread will send this request's answer: until then it is in flight."""
        with self._lock:
            self._owed.add(sock)

    def answer_sent(self, sock: socket.socket) -> None:
        with self._lock:
            self._owed.discard(sock)
            close_now = self._closing and sock in self._open and self._open[sock].name == self.IDLE
        if close_now:
            _shutdown_quietly(sock)

    # The transitions below only replace the value of a key that admit() added, which is
    # atomic and never resizes the dict under an iterating reader, so they skip the lock.
    def headers_read(self, sock: socket.socket) -> None:
        """A body follows the headers: shutdown waits for it; its deadline still runs."""
        self._open[sock] = Phase(self.READING, self._open[sock].deadline)

    def request_read(self, sock: socket.socket) -> None:
        """The whole request is read: it is in flight and no longer has a deadline."""
        self._open[sock] = Phase(self.IN_FLIGHT, None)

    def answering(self, sock: socket.socket) -> None:
        """This thread writes the answer: the client must take it before a fresh deadline."""
        self._open[sock] = Phase(self.ANSWERING, time.monotonic() + self.request_timeout_s)

    def cut_reason(self, sock: socket.socket) -> str | None:
        """Why this connection's request could not be read whole in time; None if it could."""
        with self._lock:
            reason = self._cut.get(sock)
            deadline = self._open[sock].deadline if sock in self._open else None
        if reason is None and deadline is not None and deadline <= time.monotonic():
            reason = self._timeout_reason
        return reason

    def close_expired(self) -> None:
        """Cut off requests past their deadline (the reader answers 408) and untaken answers."""
        now = time.monotonic()
        with self._lock:
            expired = [(s, phase) for s, (phase, d) in self._open.items()
                       if d is not None and d < now and s not in self._owed and s not in self._cut]
            for sock, _ in expired:
                self._cut[sock] = self._timeout_reason
        for sock, phase in expired:
            self._cut_off(sock, phase)

    def _cut_off(self, sock: socket.socket, phase: str) -> None:
        """Shut the reading side, so the reader answers 408; an untaken answer is dropped whole."""
        _shutdown_quietly(sock, socket.SHUT_RDWR if phase == self.ANSWERING else socket.SHUT_RD)

    def close_idle_and_drain(self, timeout_s: float) -> int:
        """Keep no connection alive past its request from now on, close idle ones, and let
        requests in progress finish. Connections accepted meanwhile get one request
        answered (GET /observer/ready says shutting down, writes are refused).

        Returns how many connections were still open when the wait ran out.
        """
        with self._lock:
            self._closing = True
            idle = [s for s, (phase, _) in self._open.items()
                    if phase == self.IDLE and s not in self._owed]
        for sock in idle:
            _shutdown_quietly(sock)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._open and time.monotonic() < deadline:
                self._drained.wait(deadline - time.monotonic())
            return len(self._open)

    @property
    def closing(self) -> bool:
        return self._closing

    def __len__(self) -> int:
        return len(self._open)


class StartupError(Exception):
    """A setting that loaded fine cannot be used (a TLS file, say); names it."""


def tls_context(config: Config) -> ssl.SSLContext:
    """The server's TLS context from tls_cert and tls_key; raises StartupError naming them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"tls_cert {config.tls_cert} / tls_key {config.tls_key}: "
                           f"cannot load: {getattr(exc, 'reason', None) or exc}") from None
    return context


# Decoding a body can cost ~25x its size ([{},{},…] is 3 bytes an object, ~100 in memory).
# Bodies from this size on are decoded at most LARGE_BODY_PARSES at a time, which bounds that
# memory for any number of connections, at no cost in throughput: decoding holds the GIL.
LARGE_BODY_BYTES = 16 * 1024
LARGE_BODY_PARSES = 2


class RequestHeaders:
    """Request headers by lower-cased name; the subset of email.message.Message we use."""

    __slots__ = ("_values",)

    def __init__(self):
        self._values: dict[str, list[str]] = {}

    def add(self, name: str, value: str) -> None:
        self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default=None):
        """Every value of the header, joined as one list: two fields are one comma-separated list."""
        values = self._values.get(name.lower())
        if not values:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def get_all(self, name: str, default=None):
        return self._values.get(name.lower(), default)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._values


class IncompleteRequest(Exception):
    """The connection stopped delivering before the head was whole: the client's doing, or ours."""


def read_request_head(request_line: bytes, rfile) -> tuple[str, str, str, RequestHeaders]:
    """Parse an HTTP/1.x request line and its headers; raises RequestError or IncompleteRequest.

    The stdlib parses headers with the email package, which costs more per request than
    everything else observerd does; this parser keeps the stdlib's limits (64 KiB lines,
    100 headers) at a fraction of the cost.
    """
    if not request_line.endswith(b"\n"):
        raise IncompleteRequest("request line ended early")
    words = request_line.decode("iso-8859-1").rstrip("\r\n").split()
    if len(words) != 3:
        raise RequestError(400, "malformed request line", "invalid")
    method, target, version = words
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/") and version[5:6].isdigit() and version[5:6] != "0":
            raise RequestError(505, f"HTTP version {version[5:][:10]} not supported")
        raise RequestError(400, "malformed HTTP version in request line", "invalid")
    return method, target, version, read_fields(rfile, "header")


def read_fields(rfile, what: str) -> RequestHeaders:
    """Field lines up to the empty line: a request's headers, or a chunked body's trailers."""
    fields = RequestHeaders()
    for _ in range(MAX_HEADERS + 1):
        line = rfile.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise RequestError(431, f"{what} line too long", "invalid")
        if line in (b"\r\n", b"\n"):
            return fields
        if not line.endswith(b"\n"):
            raise IncompleteRequest(f"{what}s ended early")
        name, sep, value = line.decode("iso-8859-1").partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise RequestError(400, f"malformed {what} line", "invalid")
        fields.add(name, value.strip())
    raise RequestError(431, f"more than {MAX_HEADERS} {what}s", "invalid")


@dataclass(frozen=True)
class Route:
    """A path's handlers by method, whether it needs the bearer token, what its body or
    query holds, as its 400s name it ("invalid op: ..."), and when it answers 503."""

    methods: dict[str, Callable]  # HTTP method -> the handler's method answering it
    auth: bool = True
    parses: str | None = None
    answers_unready: bool = False  # answers in every state; the others serve ops: 503 until restored
    stores: bool = False  # stores ops: 503 once shutting down, too


DEFERRED = object()  # a handler's status when the committer thread will send the answer


def store_failure(error: Exception, op_count: int) -> RequestError:
    """A failed commit as the answer its caller gets; logged once per caller."""
    if isinstance(error, PersistError):
        log("ERROR", "op not persisted", ops=op_count, error=error)
    return request_error(error)


@dataclass(frozen=True, slots=True)
class Exchange:
    """What an answer needs to know of its request, so another thread can send it."""

    command: str
    path: str
    route: str
    started: float | None
    remote: str


def _send_without_blocking(sock: socket.socket, data: bytes) -> bool:
    """Send all of data now or report failure; the committer must never wait on a client."""
    try:
        return sock.send(data, socket.MSG_DONTWAIT) == len(data)
    except OSError:
        return False


def _read_framing_line(rfile, what: str, cut_short: Callable[[str], RequestError]) -> bytes:
    """One CRLF-ended line of a body's framing, at most MAX_LINE_BYTES."""
    line = rfile.readline(MAX_LINE_BYTES + 1)
    if len(line) > MAX_LINE_BYTES:
        raise RequestError(400, f"{what} too long", "invalid")
    if not line.endswith(b"\n"):
        raise cut_short(f"body ended in a {what}")
    return line


def read_chunks(rfile, limit: int, cut_short: Callable[[str], RequestError]) -> bytes:
    """The chunks of a chunked body, joined (RFC 9112 7.1): extensions and trailers read and
    ignored, and 413 as soon as the chunks pass limit, before the rest is read; cut_short
    says why a body that ended early did."""
    chunks, size = [], 0
    while True:
        line = _read_framing_line(rfile, "chunk size line", cut_short)
        size_text = line.partition(b";")[0].strip()
        if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
            raise RequestError(400, "malformed chunk size", "invalid")
        digits = size_text.lstrip(b"0")  # leading zeros are allowed, however many
        chunk_size = int(digits or b"0", 16) if len(digits) <= 16 else limit + 1
        if chunk_size == 0:
            break
        size += chunk_size
        if size > limit:
            raise TooLarge(f"chunked body exceeds max_body_bytes={limit}")
        chunk = rfile.read(chunk_size) or b""
        if len(chunk) < chunk_size:
            raise cut_short(f"chunk ended after {len(chunk)} of {chunk_size} bytes")
        if _read_framing_line(rfile, "chunk end", cut_short).strip(b"\r\n"):
            raise RequestError(400, "chunk data is not followed by CRLF", "invalid")
        chunks.append(chunk)
    try:
        read_fields(rfile, "trailer")  # read to the end of the body, and ignored
    except IncompleteRequest as exc:
        raise cut_short(str(exc)) from None
    return b"".join(chunks)


def account(server, exchange: Exchange, status: int, body: object, sent_bytes: int) -> None:
    """Every answer passes here, before it is sent (the overload 503 too): counted, timed and
    (with access_log) logged, so a client that has its answer sees it counted."""
    metrics = server.metrics
    seconds = time.perf_counter() - exchange.started if exchange.started is not None else 0.0
    metrics.http_requests.inc(exchange.route, str(status))
    metrics.http_seconds.observe(seconds, exchange.route)
    if type(body) is RequestError and body.reason is not None:
        metrics.rejected.inc(body.reason)
    if server.config.access_log:
        log("INFO", "request", method=exchange.command, path=exchange.path[:200], status=status,
            bytes=sent_bytes, duration_ms=round(seconds * 1000, 3), remote=exchange.remote)


class HTTPHandler(BaseHTTPRequestHandler):
    """Reads requests, routes them through ROUTES, and writes each answer, a RequestError's
    too, in one send. The API below says what the routes are."""

    ROUTES: dict[str, Route] = {}

    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    sys_version = ""
    disable_nagle_algorithm = True
    server: ObserverServer
    def setup(self):
        # Kernel-side timeouts instead of a Python socket timeout, which would poll() before
        # every recv and send; the whole-request deadline is ConnectionTracker's job.
        timeout = self.server.config.request_timeout_s
        timeval = struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000))
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        if isinstance(self.request, ssl.SSLSocket):
            # On this connection's thread, so a slow or plain-HTTP client never holds up
            # the accept loop; a failed handshake just ends this connection.
            self.request.do_handshake()
        # Held while an answer is owed on this connection, so answers leave in request order.
        self._turn = threading.Lock()
        self._dropped = False  # the committer could not deliver an answer: stop serving
        self._kept_alive = False  # from its second request on, the connection was kept alive
        super().setup()

    def finish(self):
        self.wait_for_turn()  # the last answer the committer owes goes out before the socket closes
        super().finish()

    def wait_for_turn(self) -> None:
        """Until the committer has sent the answer this connection is owed, if any."""
        with self._turn:
            pass

    def handle_one_request(self):
        self._started, self._route, self.command, self.path = None, "unparsed", "", ""
        self.server.connections.awaiting_request(self.connection, self._kept_alive)
        self._kept_alive = True
        super().handle_one_request()

    def parse_request(self) -> bool:
        """Fill command, path, version and headers; answer and return False if malformed."""
        self.close_connection = True
        self._started = time.perf_counter()
        self.request_version = "HTTP/1.1"
        self.requestline = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
        try:
            self.command, self.path, self.request_version, self.headers = read_request_head(
                self.raw_requestline, self.rfile)
        except IncompleteRequest as exc:
            self.refuse(self.cut_short(str(exc)))
            return False
        except RequestError as exc:
            self.refuse(exc)
            return False
        connection = self.headers.get("Connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        return True

    def do_GET(self):
        self.dispatch()

    def admit(self, route: Route) -> None:
        """Raise a RequestError to refuse a routed request before its handler runs (who may
        ask, and when): the application's to say; this admits every one."""

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def dispatch(self) -> None:
        # A pipelined request is handled only once the answer owed before it has gone out,
        # so it sees that request's effects (read your writes) and answers stay in order.
        self.wait_for_turn()
        if self._dropped:
            self.close_connection = True
            return
        self._body_unread = bool(
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
            or "Transfer-Encoding" in self.headers
        )
        if self._body_unread:
            self.server.connections.headers_read(self.connection)
        else:
            self.server.connections.request_read(self.connection)
        route = None
        try:
            try:
                self.target = urlsplit(self.path)
            except ValueError:  # e.g. "//[": an unclosed IPv6 literal
                raise RequestError(400, "malformed request target", "invalid") from None
            path = self.target.path
            route = self.ROUTES.get(path)
            if route is None:
                self._route = "unmatched"
                raise RequestError(404, f"no route for {path[:200]}")
            self._route = path
            # HEAD is GET without the body, which render_answer leaves out.
            handler = route.methods.get("GET" if self.command == "HEAD" else self.command)
            if handler is None:
                allow = ", ".join([*route.methods, "HEAD"] if "GET" in route.methods else route.methods)
                raise RequestError(405, f"method {self.command} not allowed; use {allow}",
                                   headers={"Allow": allow})
            self.admit(route)
            status, body = handler(self)
            if status is DEFERRED:
                return
        except RequestError as exc:
            status, body = exc.status, exc
        except Exception as exc:
            body = request_error(exc, route and route.parses)
            if body is INTERNAL_ERROR:
                log("ERROR", "handler failed", path=self.path[:200], error=repr(exc),
                    traceback=traceback.format_exc())
            status = body.status
        if self._body_unread:
            self.close_connection = True
        self.send_answer(status, body)

    def read_body(self) -> bytes:
        """The request body, sized or chunked, bounded by max_body_bytes while it is read."""
        limit = self.server.config.max_body_bytes
        if "Transfer-Encoding" in self.headers:
            body = self.read_chunked_body(limit)
        else:
            body = self.read_sized_body(limit)
        self._body_unread = False
        self.server.connections.request_read(self.connection)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):  # RFC 9110 8.4.1.3: x-gzip is gzip
            try:
                return gunzip_bounded(body, limit)
            except InvalidOp as exc:  # about the encoding, not what the route parses from it
                raise request_error(exc) from None
        if encoding != "identity":
            raise RequestError(415, f"Content-Encoding {encoding[:40]!r} is not supported; use gzip or none",
                               "unsupported_encoding")
        return body

    def read_sized_body(self, limit: int) -> bytes:
        """A body of Content-Length bytes, its length checked before a byte is read."""
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise RequestError(411, "Content-Length required", "length_required")
        if len({value.strip() for value in lengths}) != 1:
            raise RequestError(400, "conflicting Content-Length headers", "invalid")
        text = lengths[0].strip()
        try:
            length = bounded_int(text, limit)
        except TooLarge:
            raise TooLarge(f"body of {text[:20]} bytes exceeds max_body_bytes={limit}") from None
        except ValueError:
            raise RequestError(400, "Content-Length must be a non-negative integer", "invalid") from None
        self.continue_if_expected()
        body = self.rfile.read(length) or b""  # None: the kernel's receive timeout hit first
        if len(body) < length:
            raise self.cut_short(f"body ended after {len(body)} of {length} bytes")
        return body

    def read_chunked_body(self, limit: int) -> bytes:
        """A chunked body (RFC 9112 7.1): extensions and trailers read and ignored, and 413 as
        soon as the chunks pass limit, before the rest is read."""
        if "Content-Length" in self.headers:  # which one frames the body? a smuggler's question
            raise RequestError(400, "Content-Length and Transfer-Encoding must not be sent together",
                               "invalid")
        codings = self.headers.get("Transfer-Encoding")
        if [coding.strip().lower() for coding in codings.split(",")] != ["chunked"]:
            raise RequestError(501, f"Transfer-Encoding {codings[:40]!r} is not supported; "
                               "use chunked, or Content-Length")
        self.continue_if_expected()
        return read_chunks(self.rfile, limit, self.cut_short)

    def continue_if_expected(self) -> None:
        if self.headers.get("Expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def cut_short(self, message: str) -> RequestError:
        """A request that ended early: 408 if we cut it off (too slow), else 400 (the client did)."""
        why = self.server.connections.cut_reason(self.connection)
        return RequestError(400, message, "invalid") if why is None else RequestError(408, why, "timeout")

    def can_answer_later(self) -> bool:
        """Whether another thread may send this request's answer: not on TLS, as an SSL object
        must not be written by one thread while another reads it."""
        return not isinstance(self.request, ssl.SSLSocket)

    def answer_later(self) -> Callable[[int, object], None]:
        """Take this connection's turn and return what sends its answer, once, from any thread;
        the handler returns (DEFERRED, None) and this thread goes back to reading the next
        request meanwhile. Answers still leave in request order: the next request waits for
        the turn."""
        exchange, close, sock = self.exchange(), self.close_connection, self.connection
        connections = self.server.connections
        self._turn.acquire()  # free: dispatch waited for it
        connections.answer_deferred(sock)

        def answer(status: int, body: object) -> None:
            try:
                data, size = render_answer(status, body, close or connections.closing, exchange.command == "HEAD")
                account(self.server, exchange, status, body, size)
                if not self._dropped and not _send_without_blocking(sock, data):
                    self._dropped = True
                    log("INFO", "connection dropped", remote=exchange.remote, error="client not reading answers")
                    _shutdown_quietly(sock)
            finally:
                connections.answer_sent(sock)
                self._turn.release()

        return answer

    def exchange(self) -> Exchange:
        return Exchange(self.command or "-", self.path or "-", self._route, self._started,
                        self.client_address[0])

    def send_answer(self, status: int, body: object) -> None:
        """Answer from this thread, in a single write so keep-alive never stalls."""
        if self.server.connections.closing:
            self.close_connection = True
        exchange = self.exchange()
        data, size = render_answer(status, body, self.close_connection, exchange.command == "HEAD")
        account(self.server, exchange, status, body, size)
        self.server.connections.answering(self.connection)
        self.wfile.write(data)

    def refuse(self, error: RequestError) -> None:
        """Answer a request that cannot be read, and close the connection."""
        self.close_connection = True
        self.wait_for_turn()
        self.send_answer(error.status, error)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own errors (request line too long, unknown method) as JSON too."""
        self.refuse(RequestError(code, message or _REASONS.get(code, "error")))

    def log_message(self, format, *args):
        log("WARN", format % args, remote=self.client_address[0])


# =============================================================================
# [SECTION] API: who may ask and when, storing ops, the routes, what they parse, and the server
# that serves them
# =============================================================================


OPS_QUERY_PARAMS = HISTORY_FILTERS + ("limit",)
DEFAULT_LIMIT = 100
HISTORY_QUERY_PARAMS = HISTORY_FILTERS + ("limit", "cursor", "count_by")
MAX_HISTORY_LIMIT = 1000
COMPARE_QUERY_PARAMS = ("baseline", "candidate", "by") + COMPARE_FILTERS
CORRECTIONS_QUERY_PARAMS = ("since", "until", "endpoint", "limit")
RUNS_QUERY_PARAMS = HISTORY_FILTERS + ("limit", "cursor")
DEFAULT_CORRECTIONS = 20
MAX_CORRECTIONS = 100  # each is judged by a scan of its own
# History calls reading at once; others wait their turn. Each holds up to about max_scan_bytes
# of ops, and one decoded line, so this bounds their memory whatever the connections.
HISTORY_READS = 2


def query_params(query: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    """A query string's parameters, each one of allowed and given at most once unless it is a
    repeatable filter (OpFilter judges those); raises InvalidOp."""
    params = parse_qs(query, keep_blank_values=True)
    refuse_command_line_only(params)  # saying why, rather than only that it is unknown
    reject_unknown(params, allowed, "query parameter")
    for name, values in params.items():
        if len(values) > 1 and not (name in FILTER and FILTER[name].repeatable):
            raise InvalidOp(name, "is given more than once")
    return params


def count_param(text: str, name: str, maximum: int) -> int:
    """A query parameter that must be an integer from 1 to maximum; raises InvalidOp naming it."""
    try:
        value = bounded_int(text, maximum)
    except ValueError:  # not digits, or too large: the same message either way
        value = 0
    return check_positive_int(value, name, maximum)


def query_ops(ops: list[RingOp], params: dict[str, list[str]], ring_size: int, now: float) -> list[RingOp]:
    """The ring's ops passing GET /observer/ops' filters, the history's, newest first; raises
    InvalidOp naming the parameter."""
    limit = min(DEFAULT_LIMIT, ring_size)
    if "limit" in params:
        limit = count_param(params["limit"][0], "limit", ring_size)
    op_filter = OpFilter.from_query(params, now)
    whole = op_filter.needs_whole_op
    matched = []
    for op in reversed(ops):
        if op_filter.accepts(op.to_dict() if whole else op):
            matched.append(op)
            if len(matched) == limit:
                break
    return matched


TIMELINE_PARAMS = ("seconds", "window")
DEFAULT_TIMELINE_SECONDS = 60
TIMELINE_ENDPOINTS = 20
TIMELINE_CLUSTERS = 10
TIMELINE_ESCALATIONS = 10
TIMELINE_CORRECTIONS = 10


def timeline_query(query: str) -> tuple[int, str]:
    """The window GET /observer/timeline is asked for, and the endpoints' window (a span, or
    ring); raises InvalidOp."""
    given = query_params(query, TIMELINE_PARAMS)
    seconds = count_param(given["seconds"][0], "seconds", TIMELINE_SECONDS) if "seconds" in given \
        else DEFAULT_TIMELINE_SECONDS
    window = given["window"][0] if "window" in given else DEFAULT_ENDPOINTS_WINDOW
    window_seconds(window)
    return seconds, window


def window_seconds(window: str) -> int | None:
    """An endpoints' window in seconds (None: the whole ring); raises InvalidOp naming window."""
    if window == "ring":
        return None
    span = _span_seconds(window)
    if span is None:
        raise InvalidOp("window", "must be a span like 90s, 5m, 1h, or ring")
    return span


def ranked_endpoints(ops: list[RingOp], window: str, now: float) -> tuple[list[dict], str | None]:
    """The ring's endpoints ranked over the ops stamped within the window (all: ring), and the
    time the window starts at (None: the ring)."""
    span = window_seconds(window)
    if span is None:
        return rank_endpoints(ops, TIMELINE_ENDPOINTS), None
    recent = OpFilter({"since": f"{span}s"}, now)
    ops = [op for op in ops if recent.stamped_in_window(op.timestamp)]
    since = rfc3339_second(math.floor(now - span)) + "Z"
    return rank_endpoints(ops, TIMELINE_ENDPOINTS), since


REVIEW_OPTIONS = ("endpoint", "source", "last_n", "llm")


def parse_review_request(query: object) -> tuple[str | None, str | None, int | None, bool]:
    """Check a POST /observer/review body: endpoint, source, last_n, llm (all optional)."""
    reject_unknown(check_type(query, dict, "body"), REVIEW_OPTIONS, "review option")
    endpoint, source = query.get("endpoint"), query.get("source")
    last_n, use_llm = query.get("last_n"), query.get("llm", False)
    if endpoint is not None:
        check_type(endpoint, str, "endpoint")
    if source is not None:
        check_source(source, "source")
    if last_n is not None:
        check_positive_int(last_n, "last_n")
    return endpoint, source, last_n, check_type(use_llm, bool, "llm")


class APIHandler(HTTPHandler):
    """What every route of the API shares: who may ask and when, the bound on bodies decoded
    at once, and storing ops durably before the answer."""

    def admit(self, route: Route) -> None:
        if route.auth:
            self.authorize()
        if not route.answers_unready:
            self.check_available(route.stores)

    def authorize(self) -> None:
        token = self.server.config.token
        if not token:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, credential = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
        ):
            raise RequestError(401, "missing or invalid bearer token", "unauthorized",
                               {"WWW-Authenticate": f'Bearer realm="{SERVICE}"'})

    def check_available(self, stores: bool) -> None:
        """503 while the ring is being restored, and for a write once shutting down (one whose
        request was dispatched before still completes: that is what the drain waits for)."""
        if not self.server.store.restored:
            raise RequestError(503, RESTORING, "not_ready")
        if stores and self.server.connections.closing:
            raise RequestError(503, SHUTTING_DOWN, "not_ready")

    def decoding(self, body: bytes):
        """Held while a body is decoded and until its ops are stored as RingOps (or dropped)."""
        return self.server.large_parses if len(body) >= LARGE_BODY_BYTES else nullcontext()

    def store_and_answer(self, ops: list[dict], make_body):
        """Store ops durably, then answer 200 with make_body(stored), or store_failure's.

        On a plain TCP connection the committer thread sends the answer itself as soon as the
        batch is fsynced, so this thread goes straight back to reading the next request: one
        thread wake per request fewer, which is most of the cost of durability here. TLS
        connections (an SSL object must not be written by one thread while another reads
        it) and the ephemeral store answer from this thread.
        """
        store, op_count = self.server.store, len(ops)
        if store.journal is None or not self.can_answer_later():
            try:
                return 200, make_body(store.submit_and_wait(ops))
            except PersistError as exc:
                raise store_failure(exc, op_count) from None
        answer = self.answer_later()

        def stored_or_failed(stored: Stored | None, error: BaseException | None) -> None:
            if error is None:
                answer(200, make_body(stored))
            else:
                failure = store_failure(error, op_count)
                answer(failure.status, failure)

        try:
            store.submit(ops, stored_or_failed)
        except Exception as exc:  # never leave the turn held: the connection would hang
            log("ERROR", "commit failed", error=repr(exc), traceback=traceback.format_exc())
            stored_or_failed(None, exc)
        return DEFERRED, None


class ObserverHandler(APIHandler):
    """The API: one method per route, and the table that routes to them."""

    def get_index(self):
        return 302, INDEX_DOCUMENT

    def get_health(self):
        return 200, {"status": "ok", "service": SERVICE, "ring_size": len(self.server.store)}

    def get_ready(self):
        reason = self.server.unready_reason()
        return (200, {"ready": True}) if reason is None else (503, {"ready": False, "reason": reason})

    def get_stats(self):
        return 200, self.server.store.stats()

    def get_ui(self):
        etag = UI_DOCUMENT.headers["ETag"]
        return (304 if etag_matches(self.headers.get("If-None-Match"), etag) else 200), UI_DOCUMENT

    def post_event(self):
        body = self.read_body()
        with self.decoding(body):
            op = validate_posted_op(parse_json_strict(body))
            if OP_ID not in op:  # the answer clients of the Go service compare, byte for byte
                return self.store_and_answer([op], lambda stored: {"accepted": True, "ring_size": stored.ring_size})
            return self.store_and_answer([op], lambda stored: {
                "accepted": True, "duplicate": stored.duplicates == 1, "ring_size": stored.ring_size})

    def post_events(self):
        body = self.read_body()
        media_type = (self.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
        with self.decoding(body):
            ops = parse_batch(body, media_type == "application/x-ndjson", self.server.config.max_batch)
            if not ops:
                return 200, {"accepted": 0, "ring_size": len(self.server.store)}
            count = len(ops)  # the answer must not keep the decoded ops alive until it is sent
            if not any(OP_ID in op for op in ops):
                return self.store_and_answer(ops, lambda stored: {"accepted": count, "ring_size": stored.ring_size})
            return self.store_and_answer(ops, lambda stored: {
                "accepted": count - stored.duplicates, "duplicates": stored.duplicates,
                "ring_size": stored.ring_size})

    def get_ops(self):
        params = query_params(self.target.query, OPS_QUERY_PARAMS)
        ops = query_ops(self.server.store.snapshot(), params, self.server.config.ring_size, time.time())
        return 200, {"ops": ops, "count": len(ops)}

    def get_timeline(self):
        seconds, window = timeline_query(self.target.query)
        server, store = self.server, self.server.store
        endpoints, endpoints_since = ranked_endpoints(store.snapshot(), window, time.time())
        clusters = server.insights.clusters
        newest = int(time.time()) - 1  # the second still running is not whole yet
        sources, totals = store.arrivals.series(seconds, newest)
        fsync_p99 = store.metrics.fsync_seconds.quantile(0.99)
        journal = store.journal
        return 200, {
            "service": SERVICE,
            "version": VERSION,
            "uptime_s": round(time.monotonic() - server.started, 1),
            "ready": server.unready_reason() is None,  # as GET /observer/ready says, and why not
            "reason": server.unready_reason(),
            "now": rfc3339_second(newest) + "Z",
            "seconds": seconds,
            "sources": sources,
            "totals": totals,
            "ring": {"ops": len(store), "capacity": server.config.ring_size, "bytes": store.ring.bytes},
            "journal": None if journal is None else {"path": str(journal.path), "bytes": file_size(journal.path)},
            "fsync_p99_ms": None if fsync_p99 is None else round(fsync_p99 * 1000, 3),
            "endpoints_window": window,
            "endpoints_since": endpoints_since,
            "endpoints": endpoints,
            "clusters_analyzed_at": clusters["analyzed_at"],
            "clusters": clusters["clusters"][:TIMELINE_CLUSTERS],
            "escalations": server.insights.escalations()[:TIMELINE_ESCALATIONS],
            "corrections": [{"timestamp": entry["correction"].timestamp, "endpoint": entry["correction"].endpoint,
                             "verdict": entry["verdict"], "escalated": entry["escalated"],
                             "before": entry["comparison"]["baseline"], "after": entry["comparison"]["candidate"]}
                            for entry in server.insights.corrections[:TIMELINE_CORRECTIONS]],
            "verdict_window_s": server.config.verdict_window_s,
        }

    @contextmanager
    def journal_files(self):
        """The journal on disk, read through this thread's own descriptors and no lock of the
        store, so ingest goes on meanwhile; at most HISTORY_READS calls read at once, and
        max_scan_bytes bounds the work of each scan."""
        config = self.server.config
        if config.persist_path is None:
            raise RequestError(409, "no journal: observerd runs ephemeral")
        try:
            with self.server.history_reads, JournalFiles(config.persist_path, config.keep_files,
                                                         self.server.store.journal.record) as files:
                yield files
        except RotatedAway as exc:
            raise RequestError(410, str(exc)) from None
        except OSError as exc:
            raise RequestError(503, f"cannot read the journal: {exc.strerror or exc}",
                               "journal_unreadable") from None

    def history_query(self, allowed: tuple[str, ...], default_limit: int, max_limit: int) -> tuple[dict, int]:
        """(the query's parameters, its limit), checked; raises InvalidOp naming the parameter."""
        given = query_params(self.target.query, allowed)
        return given, count_param(given["limit"][0], "limit", max_limit) if "limit" in given else default_limit

    def get_history(self):
        given, limit = self.history_query(HISTORY_QUERY_PARAMS, DEFAULT_LIMIT, MAX_HISTORY_LIMIT)
        count_by = given["count_by"][0] if "count_by" in given else None
        cursor = given["cursor"][0] if "cursor" in given else None
        op_filter = OpFilter.from_query(given, time.time())
        counter, skipped = None, SkippedLines()
        if count_by is not None:
            counter = GroupCounter(count_by)
            if cursor is not None:
                raise InvalidOp("cursor", "does not go with count_by: its one scan has no next page")
            op_filter, failed_only = op_filter.counting()
        with self.journal_files() as files:
            page = read_history(files, op_filter, math.inf if counter is not None else limit, cursor,
                                self.server.config.max_scan_bytes, skipped, counter)
        if counter is not None:
            groups = counter.rows(failed_only)
            if "limit" in given:
                groups = groups[:limit]
            return 200, {"count_by": count_by, "groups": groups, "count": len(groups),
                         "scanned_bytes": page.scanned_bytes, "truncated": page.truncated,
                         "skipped_lines": skipped.count}
        return 200, {"ops": page.ops, "count": len(page.ops), "cursor": page.cursor,
                     "scanned_bytes": page.scanned_bytes, "truncated": page.truncated,
                     "skipped_lines": skipped.count}

    def get_runs(self):
        given, limit = self.history_query(RUNS_QUERY_PARAMS, DEFAULT_LIMIT, MAX_HISTORY_LIMIT)
        op_filter = OpFilter.from_query(given, time.time())
        config, skipped = self.server.config, SkippedLines()
        with self.journal_files() as files:
            answer = list_runs(files, op_filter, config.run_field, limit, given.get("cursor", [None])[0],
                               config.max_scan_bytes, skipped)
        return 200, {**answer, "skipped_lines": skipped.count}

    def get_compare(self):
        given = query_params(self.target.query, COMPARE_QUERY_PARAMS)
        config, now = self.server.config, time.time()
        with self.journal_files() as files:
            return 200, compare_journal(
                files, given.get("baseline", [""])[0], given.get("candidate", [""])[0],
                {name: given[name] for name in COMPARE_FILTERS if name in given}, given.get("by", ["endpoint"])[0],
                config.run_field, now, config.max_scan_bytes, zone=timezone.utc)

    def get_corrections(self):
        given, limit = self.history_query(CORRECTIONS_QUERY_PARAMS, DEFAULT_CORRECTIONS, MAX_CORRECTIONS)
        config = self.server.config
        filters = {name: given[name] for name in CORRECTIONS_QUERY_PARAMS if name in given and name != "limit"}
        with self.journal_files() as files:
            escalated = EscalatedCorrections(escalated_corrections_path(config.persist_path))
            return 200, list_corrections(files, filters, limit, config.verdict_window_s, time.time(),
                                         config.max_scan_bytes, escalated, zone=timezone.utc)

    def get_metrics(self):
        server, metrics, journal = self.server, self.server.metrics, self.server.store.journal
        metrics.ring_ops.set(len(server.store))
        metrics.ring_bytes.set(server.store.ring.bytes)
        metrics.ready.set(int(server.unready_reason() is None))
        if journal is not None:
            metrics.journal_writable.set(int(journal.failure is None))
            try:
                free, size = disk_space(journal.path.parent)
            except OSError:
                pass  # the folder is gone for now: the last values stand, as the append will say
            else:
                metrics.journal_disk_free.set(free)
                metrics.journal_disk_size.set(size)
        return 200, Document(metrics.render().encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8", {})

    def get_errors(self):
        return 200, self.server.insights.clusters

    def get_playbooks(self):
        return 200, self.server.insights.playbooks

    def get_escalations(self):
        return 200, {"escalations": self.server.insights.escalations()}

    def post_review(self):
        body = self.read_body()  # empty (Content-Length: 0): no options
        with self.decoding(body):
            endpoint, source, last_n, use_llm = parse_review_request(parse_json_strict(body) if body.strip() else {})
        ops = [op for op in self.server.store.snapshot()
               if (endpoint is None or op["endpoint"] == endpoint) and (source is None or op["source"] == source)]
        ops = ops[-last_n:] if last_n else ops
        result = {"method": "heuristic", "ops_considered": len(ops), "reviews": review_ops(ops)}
        if use_llm:
            self.add_llm_review(result)
        return 200, result

    def add_llm_review(self, result: dict) -> None:
        """Ask the LLM backends in order until one answers; each failure is listed, not raised.

        Each call has its own outbound_timeout_s: a slow first backend still leaves the fall-back
        its full time, and the chain ends within that times the number of backends.
        """
        config, metrics = self.server.config, self.server.metrics
        errors = result["llm_errors"] = []
        backends = llm_backends(config)
        if not backends:
            errors.append({"backend": LLM_BACKENDS[0], "error": "no LLM backend is configured "
                           "(review_llm_url, review_fallback_url)"})
            return
        prompt = llm_prompt(result["reviews"])
        for backend in backends:
            try:
                text = ask_llm(backend, prompt, config.outbound_timeout_s)
            except OutboundError as exc:
                metrics.llm_requests.inc(backend.name, "failed")
                errors.append({"backend": backend.name, "error": str(exc)})
                log("WARN", "llm review failed", backend=backend.name, url=backend.url, error=exc)
                continue
            metrics.llm_requests.inc(backend.name, "answered")
            result.update(method="heuristic+llm", llm_backend=backend.name, llm_model=backend.model,
                          llm_review=text)
            return

    ROUTES = {
        # Where a person starts: a browser goes on to the page, curl reads the routes.
        "/": Route({"GET": get_index}, auth=False, answers_unready=True),
        "/observer": Route({"GET": get_index}, auth=False, answers_unready=True),
        "/observer/health": Route({"GET": get_health}, auth=False, answers_unready=True),
        "/observer/ready": Route({"GET": get_ready}, answers_unready=True),
        # The page holds no data: it loads in every state, and asks for the token itself.
        "/observer/ui": Route({"GET": get_ui}, auth=False, answers_unready=True),
        "/observer/stats": Route({"GET": get_stats}),
        "/observer/event": Route({"POST": post_event}, parses="op", stores=True),
        "/observer/events": Route({"POST": post_events}, parses="batch", stores=True),
        "/observer/errors": Route({"GET": get_errors}),
        "/observer/playbooks": Route({"GET": get_playbooks}),
        "/observer/escalations": Route({"GET": get_escalations}),
        "/observer/review": Route({"POST": post_review}, parses="review request"),
        "/observer/ops": Route({"GET": get_ops}, parses="query"),
        # It reads the files on disk, not the ring: whole while the ring is being restored.
        "/observer/history": Route({"GET": get_history}, parses="query", answers_unready=True),
        "/observer/runs": Route({"GET": get_runs}, parses="query", answers_unready=True),
        "/observer/compare": Route({"GET": get_compare}, parses="query", answers_unready=True),
        "/observer/corrections": Route({"GET": get_corrections}, parses="query", answers_unready=True),
        # What top and the page show, "restoring" included, so it answers before the ring is whole.
        "/observer/timeline": Route({"GET": get_timeline}, parses="query", answers_unready=True),
        "/metrics": Route({"GET": get_metrics}, answers_unready=True),
    }


def _refuse_overloaded(server, sock: socket.socket, remote: str) -> None:
    """Answer 503 without a thread; drain what the client sent so close is not a reset."""
    data, size = render_answer(OVERLOADED.status, OVERLOADED, close=True)
    if isinstance(sock, ssl.SSLSocket):
        size = 0  # no handshake yet, so nothing can be said in TLS: just close
    account(server, Exchange("-", "-", "unparsed", None, remote), OVERLOADED.status, OVERLOADED, size)
    if size:
        try:
            sock.setblocking(False)
            sock.send(data)
            sock.recv(65536)
        except OSError:
            pass


# The answer of / and /observer. Its Location is relative, so that behind a gateway serving
# observerd under a prefix it still leads to the page: from /v1/ and /v1/observer alike,
# observer/ui is /v1/observer/ui.
INDEX_DOCUMENT = Document(encode_json({
    "service": SERVICE, "version": VERSION, "page": "/observer/ui",
    "routes": [f"{method} {path}" for path, route in ObserverHandler.ROUTES.items()
               if route.methods.get("GET") is not ObserverHandler.get_index for method in route.methods],
}), "application/json", {"Location": "observer/ui"})


class ObserverServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a deep accept backlog, a connection cap and the store."""

    # The stdlib's backlog of 5 makes the kernel drop SYNs during a burst of connections,
    # and clients then wait whole seconds for retransmits.
    request_queue_size = 1024
    daemon_threads = True
    block_on_close = False

    def __init__(self, config: Config, store: OpStore, insights: Insights | None = None):
        self.config = config
        self.store = store
        self.insights = insights or Insights()
        self.started = time.monotonic()
        self.loop_turned = self.started  # when serve_forever last went round (service_actions)
        self.connections = ConnectionTracker(config.max_connections, config.request_timeout_s)
        self.large_parses = threading.BoundedSemaphore(LARGE_BODY_PARSES)
        self.history_reads = threading.BoundedSemaphore(HISTORY_READS)
        self.address_family = config.address_family
        super().__init__((config.host, config.port), ObserverHandler)
        if config.tls_cert is not None:
            try:
                self.socket = tls_context(config).wrap_socket(
                    self.socket, server_side=True, do_handshake_on_connect=False)
            except BaseException:
                self.server_close()
                raise

    @property
    def metrics(self) -> Metrics:
        return self.store.metrics

    def unready_reason(self) -> str | None:
        """Why a write would not be accepted now, or None: what GET /observer/ready says."""
        if self.connections.closing:
            return SHUTTING_DOWN
        return self.store.unready_reason()

    def service_actions(self):
        # serve_forever calls this at every turn, at least once a poll interval: the
        # supervisor's sign that the accept loop is alive.
        self.loop_turned = time.monotonic()

    def process_request(self, request, client_address):
        if not self.connections.admit(request):
            _refuse_overloaded(self, request, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log("INFO", "connection dropped", remote=client_address[0], error=type(exc).__name__)
        else:
            log("ERROR", "unhandled error in connection", remote=client_address[0],
                error=repr(exc), traceback=traceback.format_exc())


# =============================================================================
# [SECTION] Background loops: clusters, corrections and their verdicts, playbooks, escalation (one
# scheduler thread; serve runs the connection reaper on another)
# =============================================================================


@dataclass(slots=True)
class PeriodicTask:
    """A task the scheduler runs every interval_s, next at due (monotonic)."""

    interval_s: float
    due: float
    run: Callable[[], object]


class Scheduler:
    """Runs periodic tasks on one thread; stop() wakes it at once."""

    def __init__(self, name: str):
        self.name = name
        self._tasks: list[PeriodicTask] = []
        self._at_exit: list[Callable[[], object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def every(self, interval_s: float, task: Callable[[], object]) -> None:
        self._tasks.append(PeriodicTask(interval_s, time.monotonic() + interval_s, task))

    def at_exit(self, cleanup: Callable[[], object]) -> None:
        """Run cleanup on the loop's thread once it stops: never while a task runs."""
        self._at_exit.append(cleanup)

    def start(self) -> None:
        if self._tasks:
            self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for task in self._tasks:
                if task.due <= now:
                    task.due = now + task.interval_s
                    try:
                        task.run()
                    except Exception as exc:
                        log("ERROR", "background task failed", loop=self.name,
                            task=getattr(task.run, "__name__", repr(task.run)), error=repr(exc))
            next_due = min(task.due for task in self._tasks)
            self._stop.wait(max(0.0, next_due - time.monotonic()))
        for cleanup in self._at_exit:
            cleanup()


def corrections_position_path(persist_path: Path) -> Path:
    """The sidecar file where the corrections tailer keeps its read position."""
    return persist_path.with_name(persist_path.name + ".corrections-position")


class CorrectionsTailer:
    """Records each new complete line of the overseer's corrections JSONL as an op.

    A backlog is read and stored in chunks no bigger than one POST may be (max_ops lines,
    max_bytes bytes), so its size costs time, never memory; a line longer than max_bytes
    could not be one op and is skipped unread. The read position (inode, byte offset, line
    number) is kept in a sidecar file next to persist_path, written atomically after each
    chunk is stored. Each recorded op also carries its position, so a crash between storing
    a chunk and saving the sidecar is repaired at start from the journal itself: lines are
    neither skipped nor repeated.
    """

    def __init__(self, path: Path, store: OpStore, sidecar: Path | None, max_ops: int, max_bytes: int):
        self.path = path
        self.store = store
        self.sidecar = sidecar
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self.inode, self.offset, self.line = self._read_sidecar()
        self._followed: FollowedFile | None = None
        self._repair_position()

    @staticmethod
    def _position(value: object) -> tuple[int, int, int] | None:
        """(inode, offset, line) of a sidecar or correction_ref of the shape observerd writes."""
        if not isinstance(value, dict):
            return None
        position = tuple(value.get(key) for key in ("inode", "offset", "line"))
        return position if all(type(n) is int and n >= 0 for n in position) else None

    def _read_sidecar(self) -> tuple[int | None, int, int]:
        if self.sidecar is None or not self.sidecar.exists():
            return None, 0, 0
        try:
            position = self._position(parse_json_strict(self.sidecar.read_bytes(), "position"))
        except (OSError, InvalidOp) as exc:
            position = None
            log("WARN", "ignoring unreadable corrections position", path=self.sidecar, error=exc)
        else:
            if position is None:
                log("WARN", "ignoring corrections position of the wrong shape", path=self.sidecar)
        return position or (None, 0, 0)

    def _repair_position(self) -> None:
        """Move past the newest correction recorded after the sidecar was saved, if any.

        Only a ref observerd wrote may move the position, and clients are refused the field,
        but journals from before that rule may hold forged refs: so a ref counts only if its
        line in the corrections file really is the correction stored with it. Never raises.
        """
        try:
            f = open(self.path, "rb")
        except OSError:
            return  # nothing to check refs against; poll() reports nothing either
        ignored = 0
        with f:
            try:
                inode = os.fstat(f.fileno()).st_ino
                base = (self.offset, self.line) if inode == self.inode else (0, 0)
                for ring_op in reversed(self.store.snapshot()):
                    # Only ops this tailer wrote hold the key: decode nothing else.
                    if ring_op.source != CORRECTION_SOURCE or _CORRECTION_REF_KEY not in ring_op.line:
                        continue
                    op = ring_op.to_dict()
                    position = self._position(op.get(CORRECTION_REF))
                    if position is None:
                        ignored += 1
                        continue
                    if position[0] != inode:
                        continue  # recorded from a file since replaced
                    if position[1] <= base[0]:
                        break  # the sidecar is at least this far
                    if self._recorded_from(f, base, position, op):
                        self.inode, self.offset, self.line = position
                        break
                    ignored += 1
            except OSError as exc:
                log("WARN", "cannot check corrections position against the file", path=self.path, error=exc)
        if ignored:
            log("WARN", "ignored correction refs that match no line of the corrections file",
                path=self.path, count=ignored)

    def _recorded_from(self, f, base: tuple[int, int], position: tuple[int, int, int], op: dict) -> bool:
        """Whether op is what poll() records for the line ending at position, reading f from
        base (offset, line) in blocks: memory stays bounded however far the ref is."""
        inode, offset, line = position
        fd = f.fileno()
        if os.pread(fd, 1, offset - 1) != b"\n":
            return False
        # The line itself: the bytes before its newline, back to the one before it.
        start = complete_end(fd, offset - 1, max(0, offset - 2 - self.max_bytes))
        if offset - 1 - start > self.max_bytes:
            return False  # longer than any line poll() records
        try:
            expected = self._as_op(os.pread(fd, offset - 1 - start, start),
                                   {"inode": inode, "offset": offset, "line": line})
        except InvalidOp:
            return False
        # A line without a timestamp was stamped when it was recorded.
        if {**expected, "timestamp": op["timestamp"]} != op:
            return False
        newlines = sum(block.count(b"\n") for _, block in blocks(fd, base[0], offset))
        return newlines == line - base[1]

    @staticmethod
    def _as_op(raw: bytes, ref: dict) -> dict:
        """The op recorded for one corrections line at ref; raises InvalidOp."""
        doc = parse_json_strict(raw, "line")
        if isinstance(doc, dict):
            doc = {**doc, "source": CORRECTION_SOURCE, CORRECTION_REF: ref}
        return validate_op(doc)

    def _save_position(self) -> None:
        if self.sidecar is not None:
            position = {"path": str(self.path), "inode": self.inode, "offset": self.offset, "line": self.line}
            write_file_atomically(self.sidecar, json.dumps(position).encode())

    def poll(self) -> int:
        """Store the complete lines appended since the last poll, chunk by chunk; returns how
        many ops. Lines appended while it runs wait for the next poll. Once the path names
        another file, the one followed so far is read to its end first."""
        if self._followed is None:
            self._followed = FollowedFile.open(self.path)
            if self._followed is None:
                return 0
            if self._followed.ino != self.inode:
                self._start_over()
            self._followed.offset = self.offset
        stored = self._read_to_end()
        if self._followed.replaced():
            self._followed.close()
            self._followed = None
            stored += self.poll()
        return stored

    def _start_over(self) -> None:
        if self.inode is not None:
            log("INFO", "corrections file replaced or truncated; reading from its start", path=self.path)
        self.inode, self.offset, self.line = self._followed.ino, 0, 0

    def _read_to_end(self) -> int:
        followed, stored = self._followed, 0
        if followed.truncated():
            self._start_over()
        while True:
            ops, offset, line_no = self._read_chunk(followed)
            if offset == self.offset:
                return stored  # only a partial line left, if any: it waits until it is complete
            if ops:
                stored += len(ops) - self.store.submit_and_wait(ops).duplicates
            self.offset, self.line = offset, line_no
            followed.offset = offset
            self._save_position()

    def _read_chunk(self, followed: FollowedFile) -> tuple[list[dict], int, int]:
        """The ops of the next complete lines, at most max_ops of them and max_bytes of lines
        (or one line, if it alone is larger), and where they end: (ops, offset, line)."""
        ops, offset, line_no, taken = [], self.offset, self.line, 0
        for start, end, raw in followed.lines(self.max_bytes):
            if len(ops) == self.max_ops or (taken and raw is not None and taken + end - start > self.max_bytes):
                break  # it starts the next chunk
            offset, line_no = end, line_no + 1
            if raw is None:
                log("WARN", "skipped invalid corrections line", path=self.path, line=line_no,
                    reason=f"line is longer than max_body_bytes={self.max_bytes}")
                continue
            taken += end - start
            if not raw.strip():
                continue
            try:
                ops.append(self._as_op(raw, {"inode": self.inode, "offset": offset, "line": line_no}))
            except InvalidOp as exc:
                log("WARN", "skipped invalid corrections line", path=self.path, line=line_no, reason=exc)
        return ops, offset, line_no

    def close(self) -> None:
        if self._followed is not None:
            self._followed.close()
            self._followed = None


def escalation_retry_delay(failures: int, interval_s: float, cooldown_s: float) -> float:
    """Seconds to wait after the failures-th failed delivery in a row of one cluster: one
    analysis interval, doubled per failure, never more than the cooldown."""
    return min(cooldown_s, interval_s * 2.0 ** min(failures - 1, 64))


class EscalationHold(NamedTuple):
    """A cluster not to be sent before until (monotonic), after failures failed deliveries."""

    until: float
    failures: int


class Escalator:
    """Posts a failure cluster to the LLM team once it crosses the threshold in the window.

    A delivered cluster is not sent again for escalate_cooldown_s; a failed delivery is
    retried after escalation_retry_delay(), so a target that is down is not hit at every
    analysis.
    """

    def __init__(self, config: Config, insights: Insights, metrics: Metrics):
        self.config = config
        self.insights = insights
        self.metrics = metrics
        self._held: dict[tuple[str, str], EscalationHold] = {}  # by cluster
        self._held_corrections: dict[str, EscalationHold] = {}  # by correction_key

    def check(self, groups: dict[tuple[str, str], list[dict]]) -> None:
        now = time.monotonic()
        # Forget the clusters that are gone and free to go, or this would grow for ever.
        self._held = {key: hold for key, hold in self._held.items() if key in groups or hold.until > now}
        window_start = datetime.now(timezone.utc) - timedelta(seconds=self.config.escalate_window_s)
        for key, members in groups.items():
            recent = [op for op in members if op_time(op) >= window_start]
            if len(recent) < self.config.escalate_threshold:
                continue
            if self._held_back(self._held, key):
                continue
            if not self._escalate(self._held, key, key, recent, {}):
                # The target is down or slow: the other clusters wait for the next analysis
                # rather than hold the loop thread for outbound_timeout_s each.
                return

    def recent_cluster(self, endpoint: str, groups: dict[tuple[str, str], list[dict]]
                       ) -> tuple[tuple[str, str], list[dict]] | None:
        """The endpoint's largest failure cluster with failures in escalate_window_s, if any."""
        window_start = datetime.now(timezone.utc) - timedelta(seconds=self.config.escalate_window_s)
        found = [(key, [op for op in members if op_time(op) >= window_start])
                 for key, members in groups.items() if key[0] == endpoint]
        found = [(key, recent) for key, recent in found if recent]
        return max(found, key=lambda pair: len(pair[1]), default=None)

    def escalate_correction(self, judged: dict, cluster_key: tuple[str, str], members: list[dict]) -> bool:
        """Deliver a correction judged no change or hurt with its endpoint's failure cluster and
        its comparison, by the rules a cluster is delivered by; returns whether it was."""
        extra = {"correction": judged["correction"], "verdict": judged["verdict"],
                 "comparison": judged["comparison"]}
        holds, hold_key = self._held_corrections, judged["key"]
        return not self._held_back(holds, hold_key) and self._escalate(holds, hold_key, cluster_key, members, extra)

    def keep_corrections(self, keys: set[str]) -> None:
        """Forget the holds of corrections no longer judged, or this would grow for ever."""
        self._held_corrections = {key: hold for key, hold in self._held_corrections.items() if key in keys}

    @staticmethod
    def _held_back(holds: dict, hold_key: object) -> bool:
        hold = holds.get(hold_key)
        return hold is not None and time.monotonic() < hold.until

    def _escalate(self, holds: dict, hold_key: object, key: tuple[str, str], members: list[dict],
                  extra: dict) -> bool:
        """Deliver one cluster (and what extra adds to it); returns whether it was delivered.
        A failure holds hold_key back in holds for escalation_retry_delay()."""
        failures = holds[hold_key].failures if hold_key in holds else 0
        cluster = describe_cluster(key, members)
        payload = {"mode": "code_review", "source": SERVICE, "cluster": cluster,
                   "recent_failures": members[-5:], **extra}
        attempt = {"at": utc_now_rfc3339(), "endpoint": key[0], "signature": key[1],
                   "count": cluster["count"], "url": self.config.escalate_url}
        if extra:
            attempt.update(correction=extra["correction"].timestamp, verdict=extra["verdict"])
        try:
            call_json(self.config.escalate_url, self.config.outbound_timeout_s, payload,
                      self.config.escalate_token)
        except OutboundError as exc:
            failures += 1
            delay = escalation_retry_delay(failures, self.config.analyze_interval_s,
                                           self.config.escalate_cooldown_s)
            holds[hold_key] = EscalationHold(time.monotonic() + delay, failures)
            attempt.update(outcome="failed", error=str(exc))
            log("WARN", "escalation failed", endpoint=key[0], error=attempt["error"], retry_in_s=delay)
        else:
            holds[hold_key] = EscalationHold(time.monotonic() + self.config.escalate_cooldown_s, 0)
            attempt["outcome"] = "sent"
            log("INFO", "escalated correction" if extra else "escalated failure cluster", endpoint=key[0],
                count=cluster["count"], **({"verdict": extra["verdict"]} if extra else {}))
        self.insights.record_escalation(attempt)
        self.metrics.escalations.inc(attempt["outcome"])
        return attempt["outcome"] == "sent"


# The newest corrections each analysis judges (those of the last 2 × verdict_window_s).
VERDICT_CORRECTIONS = 100


class CorrectionVerdicts:
    """Judges the recent corrections at each analysis, publishes their verdicts, and escalates
    each judged no change or hurt while its endpoint still has a failure cluster: once, as the
    sidecar remembers across restarts. A verdict, once its after-window has passed (on a whole
    read), is kept rather than judged again each analysis (GET /observer/corrections judges
    afresh); all the scans of one analysis read about max_scan_bytes at most."""

    def __init__(self, config: Config, insights: Insights, escalator: Escalator | None):
        self.config, self.insights, self.escalator = config, insights, escalator
        self.escalated = EscalatedCorrections(escalated_corrections_path(config.persist_path))
        self._final: dict[str, dict] = {}

    def judge(self, groups: dict[tuple[str, str], list[dict]]) -> None:
        config, now = self.config, time.time()
        recent = OpFilter({"source": CORRECTION_SOURCE, "since": rfc3339_of(now - 2 * config.verdict_window_s)},
                          now)
        judged = []
        with JournalFiles(config.persist_path, config.keep_files) as files:
            page = read_history(files, recent, VERDICT_CORRECTIONS, None, config.max_scan_bytes)
            budget = config.max_scan_bytes - page.scanned_bytes  # for all the scans of one analysis
            for correction in page.ops:
                entry = self._final.get(correction_key(correction))
                if entry is None:
                    entry = judge_correction(files, correction, config.verdict_window_s, now, budget)
                    budget -= entry.pop("scanned_bytes")
                judged.append(entry)
        self._final = {entry["key"]: entry for entry in judged
                       if entry["verdict"] != PENDING and not entry["truncated"]}
        for entry in judged:
            entry["escalated"] = entry["key"] in self.escalated
        self.insights.publish_corrections(judged)
        if self.escalator is None:
            return
        self.escalator.keep_corrections({entry["key"] for entry in judged})
        for entry in reversed(judged):  # the oldest first
            if entry["verdict"] not in UNHELPFUL or entry["escalated"] or entry["truncated"]:
                continue  # a read cut short may have missed what would change the verdict
            cluster = self.escalator.recent_cluster(entry["correction"].endpoint, groups)
            if cluster is not None and self.escalator.escalate_correction(entry, *cluster):
                self.escalated.add(entry["key"])
                entry["escalated"] = True


def start_observer_loops(config: Config, store: OpStore, insights: Insights) -> Scheduler:
    """Schedule every loop whose setting is on, on one thread; returns it started."""
    loops = Scheduler("observer-loops")
    escalator = Escalator(config, insights, store.metrics) if config.escalate_url else None
    # Verdicts come from the journal: an ephemeral daemon has none to judge by.
    verdicts = CorrectionVerdicts(config, insights, escalator) if config.persist_path is not None else None

    def analyze_errors() -> None:
        groups = group_failures(store.snapshot())
        insights.publish_clusters(rank_clusters(groups))
        if escalator is not None:
            escalator.check(groups)
        if verdicts is not None:
            verdicts.judge(groups)

    def consolidate() -> None:
        published = insights.publish_playbooks(consolidate_playbooks(store.snapshot()))
        if config.playbooks_path is not None:
            write_file_atomically(config.playbooks_path, json.dumps(published, indent=1).encode())

    if config.analyze_interval_s:
        loops.every(config.analyze_interval_s, analyze_errors)
    if config.consolidate_interval_s:
        loops.every(config.consolidate_interval_s, consolidate)
    if config.corrections_path is not None and config.corrections_interval_s:
        sidecar = None
        if config.persist_path is not None:
            sidecar = corrections_position_path(config.persist_path)
        tailer = CorrectionsTailer(config.corrections_path, store, sidecar, config.max_batch,
                                   config.max_body_bytes)
        loops.every(config.corrections_interval_s, tailer.poll)
        loops.at_exit(tailer.close)
    loops.start()
    return loops


# =============================================================================
# [SECTION] Supervisor: systemd's notify protocol (READY, STATUS, STOPPING, WATCHDOG) over NOTIFY_SOCKET
# =============================================================================


class SystemdNotifier:
    """Tells systemd what the daemon is doing, as a Type=notify unit expects: READY=1 once the
    ring is restored, a STATUS= line `systemctl status` shows (restoring, ready, or why not),
    STOPPING=1 at shutdown, and WATCHDOG=1 every half WATCHDOG_USEC, sent only while the accept
    loop goes round and the committer is not held in one commit that long: a hung daemon is
    killed and restarted by systemd (WatchdogSec=), a slow one is not.

    One datagram per message on an AF_UNIX socket, as sd_notify sends them; an address starting
    with @ is in the abstract namespace. Without NOTIFY_SOCKET every call does nothing. A message
    that cannot be sent is logged, never raised: the daemon's work does not depend on it.
    """

    STATUS_INTERVAL_S = 1.0
    MIN_PING_INTERVAL_S = 0.05  # a WatchdogSec of a few ms would otherwise spin this thread

    def __init__(self, server: ObserverServer, environ=os.environ):
        self.server = server
        address = environ.get("NOTIFY_SOCKET", "")
        if address and address[0] not in "/@":
            log("WARN", "NOTIFY_SOCKET is neither a path nor an abstract address; not notifying systemd",
                notify_socket=address)
            address = ""
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        watched = environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        # Pinged at half the timeout, as systemd advises; a WATCHDOG_PID of another process
        # (a wrapper's) means the watchdog is not ours.
        self.ping_interval_s = int(usec) / 2e6 if usec.isascii() and usec.isdigit() and int(usec) and watched else None
        if self.ping_interval_s is not None and self.ping_interval_s < self.MIN_PING_INTERVAL_S:
            log("WARN", "WatchdogSec is too short to be kept; pinging as often as allowed",
                watchdog_usec=usec, ping_s=self.MIN_PING_INTERVAL_S)
            self.ping_interval_s = self.MIN_PING_INTERVAL_S
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if self.address else None
        self._status: str | None = None
        self._send_failed = False
        self._loop = Scheduler("supervisor")
        if self._socket is not None:
            log("INFO", "notifying systemd", notify_socket=address, watchdog_ping_s=self.ping_interval_s or "off")
            self._loop.every(self.STATUS_INTERVAL_S, self._show_status)
            if self.ping_interval_s is not None:
                self._loop.every(self.ping_interval_s, self._ping)
            self._loop.start()
        self._show_status()

    def ready(self) -> None:
        self._show_status(prefix="READY=1\n")

    def stopping(self) -> None:
        self._loop.stop()
        self._send("STOPPING=1\nSTATUS=shutting down")

    def _hung(self) -> str | None:
        """Why the daemon would not be alive now for the watchdog, or None."""
        held = self.ping_interval_s
        idle = time.monotonic() - self.server.loop_turned
        if idle > held:
            return f"the accept loop has not gone round for {idle:.1f} s"
        stuck = self.server.store.committer_stuck_s()
        if stuck > held:
            return f"the committer has held one commit for {stuck:.1f} s"
        return None

    def _show_status(self, prefix: str = "") -> None:
        hung = self._hung() if self.ping_interval_s is not None else None
        reason = self.server.unready_reason()
        status = (f"not pinging the watchdog: {hung}" if hung else
                  "ready" if reason is None else f"not ready: {reason}")
        if prefix or status != self._status:
            self._status = status
            self._send(f"{prefix}STATUS={status}")

    def _ping(self) -> None:
        if self._hung() is None:
            self._send("WATCHDOG=1")
        self._show_status()  # at once, not at the next status beat: the pings stopped or resumed

    def _send(self, message: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._send_failed:
                log("WARN", "cannot notify systemd", notify_socket=self.address.replace("\0", "@"),
                    error=exc.strerror or exc)
            self._send_failed = True
        else:
            self._send_failed = False


# =============================================================================
# [SECTION] Daemon: the one place that builds a running daemon from a config (journal, store,
# server, housekeeping, loops, systemd) and stops it; serve and the tests' server both use it
# =============================================================================

SHUTDOWN_GRACE_S = 1.5
JOURNAL_PROBE_INTERVAL_S = 1.0  # how often a journal that cannot be written is tried again


def _privileged_ports_end() -> int:
    """The first port an unprivileged user may listen on (Linux lowers it with a sysctl)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


_TCP_LISTEN = "0A"  # the st column of /proc/net/tcp for a listening socket


def port_holders(port: int) -> dict[int, str]:
    """The processes listening on a TCP port, pid -> name, as far as this user may see them:
    Linux's /proc, matching each listening socket's inode to the descriptors holding it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == _TCP_LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    holders = {}
    for pid in (name for name in os.listdir("/proc") if name.isdigit()) if inodes else ():
        try:
            with os.scandir(f"/proc/{pid}/fd") as descriptors:
                if any(os.readlink(fd.path) in inodes for fd in descriptors):
                    holders[int(pid)] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:  # another user's process, or one that just ended
            continue
    return holders


def port_in_use_problem(config: Config) -> str:
    """What check and serve say when another socket holds bind's port (but for the daemon of
    this journal: see bind_problem)."""
    holders = port_holders(config.port)
    by = ", ".join(f"pid {pid} ({name})" for pid, name in sorted(holders.items())) or "another process"
    return f"bind {config.bind}: port {config.port} is in use by {by}"


def listen_problem(config: Config, error: OSError) -> str:
    """Why serve cannot listen on bind, in the words check uses too."""
    if isinstance(error, socket.gaierror):
        return f"bind {config.bind}: host {config.host!r} does not resolve ({error.strerror})"
    if error.errno == errno.EADDRINUSE:
        return port_in_use_problem(config)
    if error.errno == errno.EACCES and 0 < config.port < _privileged_ports_end():
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = f"uid {os.geteuid()}"
        return (f"bind {config.bind}: port {config.port} is privileged (below {_privileged_ports_end()}) "
                f"and user {user} may not listen on it: grant CAP_NET_BIND_SERVICE or pick a higher port")
    if error.errno == errno.EADDRNOTAVAIL:
        return f"bind {config.bind}: {config.host} is not an address of this host"
    return f"bind {config.bind}: {error.strerror or error}"


def open_store(config: Config) -> OpStore:
    """Lock and open (and repair) the journal; the ring and the op_id window stay empty until
    the store's restore(). Raises JournalLocked, UntrustedJournal or OSError."""
    ring = Ring(config.ring_size, config.recent_scenarios, config.max_ring_bytes)
    metrics = Metrics(SOURCES, REJECTION_REASONS, LLM_BACKENDS)
    journal = None
    if config.persist_path is not None:
        record = None if config.runtime_dir is None else UnsyncedRecord.in_folder(config.runtime_dir,
                                                                                   config.persist_path)
        journal = Journal(config.persist_path, config.max_file_bytes, config.keep_files, metrics,
                          JournalLock(config.persist_path, record and record.path), record)
        journal.open()
    window = OpIdWindow(config.dedupe_window) if config.dedupe_window else None
    return OpStore(ring, journal, metrics, window)


def close_store(store: OpStore) -> int:
    """Close the store; 0, or 1 once an error closing the journal (an EIO) is logged."""
    try:
        store.close()
    except OSError as exc:  # the last appends' fate is the disk's to tell
        log("ERROR", "cannot close journal", path=exc.filename, error=exc.strerror or exc)
        return 1
    return 0


class DaemonNotStarted(Exception):
    """The daemon could not start; why is logged already."""


class RunningDaemon:
    """A daemon answering on its port: built from a config, restored, stopped.

    Answering comes before restoring: health and ready answer at once, however long the restore
    takes; the routes that serve or store ops answer 503 until it is done.
    """

    def __init__(self, config: Config, reap_every_s: float = 0.25, accept_poll_s: float = 0.1):
        """Open the journal and listen; raises DaemonNotStarted once the reason is logged."""
        self.config = config
        try:
            if config.playbooks_path is not None:
                make_dirs_durably(config.playbooks_path.parent)
            self.store = open_store(config)
        except JournalLocked as exc:
            log("ERROR", "journal in use by another observerd; not starting", path=config.persist_path,
                pid=exc.pid or "unknown", lock=lock_path(config.persist_path))
            raise DaemonNotStarted from None
        except UntrustedJournal as exc:
            log("ERROR", "journal not trusted; not starting", problem=exc)
            raise DaemonNotStarted from None
        except OSError as exc:  # the checks passed: the disk failed or changed under us
            log("ERROR", "cannot open files", path=exc.filename, error=exc.strerror or exc)
            raise DaemonNotStarted from None
        try:
            self.server = ObserverServer(config, self.store)
        except StartupError as exc:
            log("ERROR", "cannot serve TLS", problem=exc)
            close_store(self.store)
            raise DaemonNotStarted from None
        except OSError as exc:  # the check passed: another process took the port since
            log("ERROR", "cannot listen", bind=config.bind, problem=listen_problem(config, exc))
            close_store(self.store)
            raise DaemonNotStarted from None
        host, self.port = self.server.server_address[:2]
        log("INFO", "listening", addr=format_hostport(host, self.port), tls=config.tls_cert is not None)
        self.housekeeping = Scheduler("housekeeping")
        self.housekeeping.every(reap_every_s, self.server.connections.close_expired)
        if self.store.journal is not None:
            self.housekeeping.every(JOURNAL_PROBE_INTERVAL_S, self.store.journal.probe)
        self.housekeeping.start()
        threading.Thread(target=self.server.serve_forever, args=(accept_poll_s,), name="accept",
                         daemon=True).start()
        self.supervisor = SystemdNotifier(self.server)
        self.loops: Scheduler | None = None

    def restore(self, stopping: threading.Event | None = None) -> bool:
        """Restore the ring, then start the loops and tell systemd it is ready (unless stopping
        came first); False once a journal that cannot be read is logged."""
        try:
            self.store.restore(stopping)
        except OSError as exc:
            log("ERROR", "cannot restore from journal", path=exc.filename, error=exc.strerror or exc)
            return False
        if self.store.restored:
            # The tailer reads the restored ring.
            self.loops = start_observer_loops(self.config, self.store, self.server.insights)
            self.supervisor.ready()
        return True

    def reopen_journal(self) -> None:
        """What SIGHUP asks for: the journal's path opened again (after logrotate moved it)."""
        try:
            self.store.reopen_journal()
        except OSError as exc:
            log("ERROR", "cannot reopen journal; still appending to the old file", error=exc)

    def stop(self, status: int = 0, grace_s: float = SHUTDOWN_GRACE_S, **why: object) -> int:
        """Drain, stop every thread and close the journal; returns the exit status (status, or
        1 if closing the journal failed)."""
        server = self.server
        log("INFO", "shutting down", **why, open_connections=len(server.connections))
        self.supervisor.stopping()
        # Closing comes first, and the listener keeps answering while the drain runs: ready
        # says shutting down from the signal on, to every client that asks.
        left = server.connections.close_idle_and_drain(grace_s)
        if self.loops is not None:
            self.loops.stop(timeout_s=0.2)  # a loop blocked on a slow outbound call is a daemon thread
        server.shutdown()
        self.housekeeping.stop()
        server.server_close()
        status = status or close_store(self.store)
        log("INFO", "stopped", ops=len(self.store), abandoned_connections=left, status=status)
        return status


# =============================================================================
# [SECTION] CLI and main: serve, check, stats, top, ops, runs, compare, corrections
# =============================================================================

EXIT_STATUS = """
exit status: 0 ok; 1 runtime error (a file cannot be read, the daemon cannot be reached);
  2 usage or config error (a bad flag or setting, or anything that keeps the daemon from starting)
"""
EXAMPLES = """examples:
  python observerd.py --config lakehouse.toml        run the daemon (same as: serve --config ...)
  python observerd.py serve --bind 0.0.0.0:3219      override the bind address of the file
  python observerd.py check --config lakehouse.toml  validate the config, print the effective settings
  python observerd.py stats --config lakehouse.toml  the stats a restart from its journal would serve
  python observerd.py top --config lakehouse.toml    a live view of the daemon that config runs
  python observerd.py ops --since 10m --failed --count-by endpoint   what failed lately, and where
  python observerd.py compare 2h..1h 1h..now         did the last hour do better than the one before?
  OBSERVERD_TOKEN=s3cret python observerd.py         the token from the environment

Every subcommand takes --config (default: lakehouse.toml): the journal, the daemon's URL and its
token all come from it. 2.0 changed ops' order (see observerd.py ops --help, and CHANGES.md).
"""
SERVE_EXAMPLES = """examples:
  python observerd.py serve --config /etc/lakehouse/lakehouse.toml
  python observerd.py serve --bind 127.0.0.1:0 --persist-path ""   ephemeral, on a free port
"""
CHECK_EXAMPLES = """examples:
  python observerd.py check --config /etc/lakehouse/lakehouse.toml
  python observerd.py check --config lakehouse.toml > effective.toml   the settings, as TOML
"""
STATS_EXAMPLES = """examples:
  python observerd.py stats --config /etc/lakehouse/lakehouse.toml     from its persist_path
  python observerd.py stats ops.jsonl --ring-size 100 | jq .by_source
  python observerd.py stats --config lakehouse.toml --url http://127.0.0.1:3219   the running daemon's
"""
TOP_EXAMPLES = """examples:
  python observerd.py top --config /etc/lakehouse/lakehouse.toml   its bind, TLS and [auth] token
  OBSERVERD_TOKEN=s3cret python observerd.py top --url https://host-a:3219 --interval 2
  python observerd.py top --once | tee incident.txt       one plain-text snapshot

keys: q quits; s cycles the endpoints' sort (failures, failure rate, p95, ops); w switches the
endpoints between the --window and the whole ring
"""
OPS_EXAMPLES = """examples:
  python observerd.py ops --config lakehouse.toml --since 1h --failed   the last hour's failures
  python observerd.py ops --since 10m --failed --count-by endpoint     which endpoints fail, ranked
  python observerd.py ops --endpoint '/mcp/*' --failed -f              follow failures live (Ctrl-C ends)
  python observerd.py ops --since '2026-12-06 04:00' --until '2026-12-06 05:00' -n all | jq .error
  python observerd.py ops --since yesterday --endpoint /a --endpoint /b -r -n 20   newest first
  python observerd.py ops data/observer/ops.jsonl --field trace_id=4bf92f35 -o json
  python observerd.py ops --url http://host-a:3219 --since 1h --failed   a running daemon's journal

Changed in 2.0, as journalctl: ops print oldest first (-r: newest first), -n is also --lines,
-f starts with the newest 10, --grep is plain text (--regex takes a regex), and --endpoint and
--source may be repeated. Ctrl-C ending -f, and a pipe's reader that stops reading (| head),
are exit 0.
"""
RUNS_EXAMPLES = """examples:
  python observerd.py runs --since 24h                        the runs of the last day, newest first
  python observerd.py runs --endpoint '/mcp/*' --failed -o json   runs with failures on /mcp/ tools
"""
COMPARE_EXAMPLES = """examples:
  python observerd.py compare 2h..1h 1h..now                  the last hour against the one before
  python observerd.py compare run-41 run-42                   two runs (ops whose run_field names them)
  python observerd.py compare yesterday..today 1h..now --by model --source scenario
  python observerd.py compare 2026-12-06T03:00:00Z..2026-12-06T04:00:00Z 1h..now -o json | jq .verdict

A side is a time range SINCE..UNTIL when both ends read as --since does; anything else is a run id.
"""
CORRECTIONS_EXAMPLES = """examples:
  python observerd.py corrections                             the newest corrections and their verdicts
  python observerd.py corrections --endpoint /pay --since 7d -o json
"""
FOLLOW_POLL_S = 0.2
CLIENT_TIMEOUT_S = 3.0  # for one answer: past it the daemon counts as gone (top retries)
HISTORY_CLIENT_TIMEOUT_S = 60.0  # for one page of history: a scan of up to max_scan_bytes
OPS_DEFAULT_LINES = 50
FOLLOW_DEFAULT_LINES = 10  # as tail -f
TOP_MIN_INTERVAL_S, TOP_MAX_INTERVAL_S = 0.1, 3600.0


class Parser(argparse.ArgumentParser):
    """argparse with examples and the exit statuses in every --help, and a usage error in one
    line naming the problem (exit 2) instead of the usage text and then the problem."""

    def __init__(self, *args, examples: str = "", **kwargs):
        super().__init__(*args, formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=examples + EXIT_STATUS, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def add_setting_flag(parser: argparse.ArgumentParser, name: str, default=None) -> None:
    """--name-with-dashes: the setting given on the command line, over the file's value."""
    setting = SETTING[name]
    parser.add_argument(setting.flag, type=setting.kind, default=default,
                        help=f"{setting.doc}; overrides {setting.in_file} (default: {setting.default!r})")


def setting_flags(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as flags on the command line, by name, for load_config."""
    return {name: value for name, value in vars(args).items() if name in SETTING}


def daemon_url(text: str) -> str:
    """--url: an http:// or https:// base URL, without a trailing slash."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL like http://127.0.0.1:3219")
    try:
        parts.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text.rstrip("/")


def endpoints_window(text: str) -> str:
    """--window: a span, or ring."""
    try:
        window_seconds(text)
    except InvalidOp as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc.reason}") from None
    return text


def refresh_interval(text: str) -> float:
    """--interval: seconds between refreshes."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not TOP_MIN_INTERVAL_S <= value <= TOP_MAX_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds from {TOP_MIN_INTERVAL_S:g} to {TOP_MAX_INTERVAL_S:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    def add_config_flag(parser: argparse.ArgumentParser, default=None) -> None:
        parser.add_argument("--config", default=default,
                            help=f"TOML config file (default: {DEFAULT_CONFIG_PATH}, optional)")

    def add_serve_flags(parser: argparse.ArgumentParser, default=None) -> None:
        add_config_flag(parser, default)
        add_setting_flag(parser, "bind", default)
        add_setting_flag(parser, "persist_path", default)

    parser = Parser(
        prog="observerd.py", examples=EXAMPLES,
        description="observerd: the lakehouse's witness. Records ObservedOps durably to JSONL\n"
                    "and serves live stats over HTTP.")
    parser.add_argument("--version", action="version", version=f"{SERVICE} {VERSION}")
    add_serve_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="{serve,check,stats,top,ops,runs,compare,corrections}")
    # SUPPRESS: flags given before the subcommand are not reset by its own defaults.
    add_serve_flags(commands.add_parser("serve", help="run the daemon (the default)", examples=SERVE_EXAMPLES,
                                        description="Run the daemon until SIGTERM or SIGINT."),
                    argparse.SUPPRESS)
    check = commands.add_parser(
        "check", help="validate the config like nginx -t; exit 0 or 2", examples=CHECK_EXAMPLES,
        description="Run every check startup runs and list every problem (exit 2), or print the\n"
                    "effective settings as TOML (exit 0); the token only as set or not.")
    add_serve_flags(check, argparse.SUPPRESS)
    stats = commands.add_parser(
        "stats", help="print the stats a restart from a JSONL journal would serve", examples=STATS_EXAMPLES,
        description="Print the JSON GET /observer/stats would serve after a restart from FILE, with\n"
                    "the config's ring_size, max_ring_bytes and keep_files, and the flags over them;\n"
                    "with --url, what a running daemon's GET /observer/stats serves now.")
    stats.add_argument("file", nargs="?", help="the JSONL journal; rotated segments beside it are read too "
                       "(default: the config's persist_path)")
    add_config_flag(stats, argparse.SUPPRESS)
    add_daemon_flags(stats, optional=True)
    add_setting_flag(stats, "ring_size")
    add_setting_flag(stats, "recent_scenarios")
    top = commands.add_parser(
        "top", help="a live view of a running daemon, like htop", examples=TOP_EXAMPLES,
        description="A running daemon's events/s per source, failures, the endpoints failing most,\n"
                    "failure clusters, fsync p99, ring fill and escalations, from GET /observer/timeline,\n"
                    "full-screen. With --once, or when stdout is not a terminal: one plain-text snapshot.")
    add_config_flag(top, argparse.SUPPRESS)
    add_daemon_flags(top)
    top.add_argument("--window", type=endpoints_window, default=DEFAULT_ENDPOINTS_WINDOW, metavar="SPAN",
                     help="rank the endpoints over their ops of this span (90s, 15m, 1h) or the whole "
                          f"ring (ring); the w key switches (default: {DEFAULT_ENDPOINTS_WINDOW})")
    top.add_argument("--interval", type=refresh_interval, default=1.0, help="seconds between refreshes (default: 1)")
    top.add_argument("--once", action="store_true", help="print one plain-text snapshot and exit")
    add_ops_parser(commands, add_config_flag)
    add_comparison_parsers(commands, add_config_flag)
    parser.set_defaults(subcommands=commands.choices)
    return parser


def add_daemon_flags(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """--url and --token: a running daemon, by default the one --config runs."""
    parser.add_argument("--url", type=daemon_url, help=(
        "read a running daemon at this base URL instead of the files" if optional else
        "the daemon's base URL (default: from --config's bind, https with its tls_cert)"))
    parser.add_argument("--token", help="its bearer token (default: $OBSERVERD_TOKEN, which ps does not show, "
                        "else --config's [auth] token)")


def line_count(text: str) -> float:
    """-n/--lines: a whole number, or all."""
    if text == "all":
        return math.inf
    return non_negative_int(text)


def non_negative_int(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text[:40]!r}")
    return int(text)


def add_filter_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One flag per filter of FILTERS (or of those of names), named as its HTTP query parameter."""
    for spec in FILTERS if names is None else [FILTER[name] for name in names]:
        if spec.metavar is None:
            parser.add_argument(f"--{spec.name}", action="store_true", default=None, help=spec.help)
        else:  # each taken as often as given, so a filter given twice is named, as over HTTP
            parser.add_argument(f"--{spec.name}", metavar=spec.metavar, action="append", help=spec.help)


def add_ops_parser(commands, add_config_flag) -> None:
    ops = commands.add_parser(
        "ops", help="query the journal, on disk (the daemon running or not) or over --url; -f follows it",
        examples=OPS_EXAMPLES,
        description="The ops of the JSONL journal and its rotated segments that pass every filter\n"
                    "given: the newest -n, oldest first, as journalctl -n prints them; --since reads\n"
                    "only about that much of the file. With --count-by, one row per value instead.")
    ops.add_argument("file", nargs="?", help="the JSONL journal; every rotated segment beside it (.1, .2, …) "
                     "is read too, up to keep_files with --config (default: the config's persist_path)")
    add_config_flag(ops, argparse.SUPPRESS)
    add_daemon_flags(ops, optional=True)
    add_filter_flags(ops)
    ops.add_argument("-n", "--lines", type=line_count, metavar="N",
                     help=f"the newest N, or all (default {OPS_DEFAULT_LINES}; with -f {FOLLOW_DEFAULT_LINES}; "
                          "with --count-by, N rows, default all)")
    ops.add_argument("-r", "--reverse", action="store_true", help="newest first, as journalctl -r")
    ops.add_argument("--count-by", metavar="FIELD",
                     help="one row per value of FIELD (endpoint, source, signature: a failure's error "
                          "signature, or any op field): ops, failures, failure rate, p50/p95 duration, "
                          "the newest timestamp; most failures first. With --failed, the groups with "
                          "failures, each rate over all its ops")
    ops.add_argument("-o", "--output", choices=("table", "json", "ndjson"),
                     help="table on a terminal, else ndjson (one op a line); json: one array")
    ops.add_argument("-f", "--follow", action="store_true",
                     help=f"print the newest {FOLLOW_DEFAULT_LINES} (or -n), then ops as they are appended, "
                          "across rotations and SIGHUP reopens, until Ctrl-C; the files only, not --url")


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _creation_problem(folder: Path) -> str | None:
    """Why a file could not be created in folder (its missing parents made first), or None.

    Tries it, with a scratch file in the nearest existing folder that is removed at once:
    access() says yes to root in /proc, on some read-only mounts and through ACLs.
    """
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, scratch = tempfile.mkstemp(prefix=".observerd-check-", dir=existing)
    except OSError as exc:
        return f"cannot create files in {existing}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(scratch)
    return None


def files_of_settings(config: Config):
    """(setting, what, path) for every file a path setting names, and those observerd keeps
    beside them: the journal's rotated segments, scratch names and corrections position."""
    if config.persist_path is not None:
        journal = config.persist_path
        yield "persist_path", "persist_path", journal
        for segment in itertools.islice(segment_paths(journal, config.keep_files), 1, None):
            yield "persist_path", "persist_path's rotated segment", segment
        for scratch in rotation_scratch_paths(journal):
            yield "persist_path", "persist_path's rotation scratch file", scratch
        yield "persist_path", "persist_path's probe scratch file", probe_scratch_path(journal)
        yield "persist_path", "persist_path's lock file", lock_path(journal)
        position = corrections_position_path(journal)
        yield "persist_path", "persist_path's corrections position", position
        yield "persist_path", "persist_path's scratch file", scratch_path(position)
    if config.playbooks_path is not None:
        yield "playbooks_path", "playbooks_path", config.playbooks_path
        yield "playbooks_path", "playbooks_path's scratch file", scratch_path(config.playbooks_path)
    for name in ("corrections_path", "tls_cert", "tls_key"):
        if getattr(config, name) is not None:
            yield name, name, getattr(config, name)


def _file_problems(config: Config) -> list[str]:
    """Files that are not regular files, and two settings that name the same file.

    One file written as two (the journal as playbooks, its own corrections input) loses
    data or feeds itself for ever. Names are compared resolved, and files that exist by
    device and inode too, so neither a symlink nor a hard link hides a collision.
    """
    problems, first_named, reported = [], {}, set()
    for setting, what, path in files_of_settings(config):
        try:
            keys = [path.resolve()]
        except (OSError, RuntimeError):  # a symlink loop: the name alone
            keys = [path]
        try:
            status = os.stat(path)
        except OSError:
            status = None  # a missing file; any other reason is checked below, where it matters
        if status is not None:
            keys.append((status.st_dev, status.st_ino))
            if not stat.S_ISREG(status.st_mode) and not setting.startswith("tls_"):
                kind = "is a folder" if stat.S_ISDIR(status.st_mode) else "is not a regular file"
                problems.append(f"{what} {path}: {kind}")
        for key in keys:
            other_setting, other_what, other_path = first_named.setdefault(key, (setting, what, path))
            pair = frozenset((setting, other_setting))
            # A combined PEM file holding both the certificate and its key is one file, rightly.
            if len(pair) == 2 and pair != {"tls_cert", "tls_key"} and pair not in reported:
                reported.add(pair)
                problems.append(f"{what} {path} is the same file as {other_what} {other_path}")
    return problems


def _runtime_dir_problem(folder: Path) -> str | None:
    """Why runtime_dir cannot hold the journal's record, or None. Its default is under the
    world-writable /dev/shm: a folder another user made or can write in could plant a record
    that cuts the journal, or a symlink the record is written through."""
    try:
        status = os.lstat(folder)
    except FileNotFoundError:
        return _creation_problem(folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISDIR(status.st_mode):
        return "is not a folder"
    if status.st_uid != os.geteuid():
        return f"is owned by uid {status.st_uid}, not by uid {os.geteuid()} that observerd runs as"
    if status.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(status.st_mode):o}): chmod go-w it"
    return None


def bind_problem(config: Config) -> str | None:
    """Why serve could not listen on bind now, or None: found by binding a socket there as the
    server binds its own (SO_REUSEADDR, so a port a restart left in TIME_WAIT is free), then
    closing it before it ever listens.

    The one exception: the port held by the daemon that holds this journal's lock, the one a
    restart replaces (operators run check before systemctl restart). check notes it; serve
    then stops at the lock, naming that daemon."""
    try:
        with socket.socket(config.address_family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((config.host, config.port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and config.persist_path is not None:
            holder = journal_holder(config.persist_path)
            if holder and holder in port_holders(config.port):
                return None
        return listen_problem(config, exc)
    return None


def usability_problems(config: Config) -> list[str]:
    """Every reason startup would fail beyond the config's syntax: the address, files,
    folders, TLS.

    serve refuses to start on any of them and check lists them all, so the two agree. The
    checks change nothing on disk.
    """
    problems = [problem for problem in [bind_problem(config)] if problem] + _file_problems(config)
    paths = (("persist_path", config.persist_path), ("playbooks_path", config.playbooks_path),
             ("corrections_path", config.corrections_path))
    for name, path in paths:
        if path is None:
            continue
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            pass  # made at start, or read once it exists
        except OSError as exc:  # a symlink loop, a folder it may not search
            problems.append(f"{name} {path}: {exc.strerror or exc}")
            continue
        if path.exists() and not path.is_file():
            continue  # not a regular file: named above
        try:
            if name == "corrections_path":
                # Only read; a missing one is read once it exists.
                problem = None
                if path.exists():
                    os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            elif name == "persist_path" and path.exists():
                # Opened like Journal does: appended to, and read back for repair and restore.
                os.close(os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC))
                problem = _creation_problem(path.parent)  # rotation and the corrections sidecar
            else:
                problem = _creation_problem(path.parent)
        except OSError as exc:
            problem = exc.strerror or str(exc)
        if problem:
            problems.append(f"{name} {path}: {problem}")
    if config.persist_path is not None and config.runtime_dir is not None:
        problem = _runtime_dir_problem(config.runtime_dir)
        if problem:
            problems.append(f"runtime_dir {config.runtime_dir}: {problem}")
    missing_tls = False
    for name, path in (("tls_cert", config.tls_cert), ("tls_key", config.tls_key)):
        if path is not None and not path.is_file():
            problems.append(f"{name} {path}: file not found")
            missing_tls = True
    if config.tls_cert is not None and not missing_tls:
        try:
            tls_context(config)
        except StartupError as exc:
            problems.append(str(exc))
    return problems


def check(args: argparse.Namespace) -> int:
    """`check`: print every problem (exit 2), or warnings and the effective settings (exit 0)."""
    try:
        config = load_config(args.config, **setting_flags(args))
        problems, warnings = usability_problems(config), config.warnings
    except ConfigError as exc:
        config, problems, warnings = None, exc.problems, exc.warnings
    source = args.config or DEFAULT_CONFIG_PATH
    for warning in warnings:
        print(f"{source}: warning: {warning}", file=sys.stderr)
    holder = journal_holder(config.persist_path) if config is not None and config.persist_path else None
    if holder is not None:
        # Not a problem: run before a restart, check meets the daemon that restart replaces.
        port = " and its port" if holder and holder in port_holders(config.port) else ""
        print(f"{source}: note: journal {config.persist_path}{port} in use by a running observerd "
              f"(pid {holder or 'unknown'}): a restart frees them; a second one would not start beside it",
              file=sys.stderr)
    if problems:
        for problem in problems:
            print(f"{source}: {problem}", file=sys.stderr)
        print(f"{source}: {len(problems)} problem(s); observerd would not start", file=sys.stderr)
        return 2
    # Valid TOML, to diff or to start from; the comments say what is not a setting's value.
    print(f"# {source}: ok; the effective settings, flags and environment applied")
    table = None
    for setting in SETTINGS:
        if setting.table != table:
            print(f"[{setting.table}]" if table is None else f"\n[{setting.table}]")
            table = setting.table
        value = getattr(config, setting.name)
        if setting.secret:
            print(f"# {setting.name} is {'set' if value else 'not set'} (never shown)")
        elif setting.env and value:  # whether the variable holds a key, never the key
            state = "set" if getattr(config, setting.env_value) else "not set"
            print(f"{setting.name} = {toml_value(value)}  # {value} is {state}")
        else:
            print(f"{setting.name} = {toml_value(value)}")
    return 0


def toml_value(value: object) -> str:
    """A setting's value in TOML, whose strings, numbers and booleans JSON writes alike, but
    for DEL, which TOML wants escaped; None (a path setting left empty) is ""."""
    text = json.dumps("" if value is None else str(value) if isinstance(value, Path) else value,
                      ensure_ascii=False).replace("\x7f", "\\u007f")
    # A path's undecodable byte (from a flag) is a lone surrogate: no TOML holds it, nor UTF-8.
    return _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match[0]):04x}", text)


def offline_config(args: argparse.Namespace) -> Config | None:
    """The config a subcommand that reads the journal without serving uses (the file, the
    flags over it), or None once each problem is printed, one a line."""
    try:
        # It listens nowhere: the file's bind, and the token it may require, are not its concern.
        return load_config(args.config, **{**setting_flags(args), "bind": "127.0.0.1:0"})
    except ConfigError as exc:
        print_config_problems(exc)
        return None


def print_config_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(f"{exc.source}: {problem}", file=sys.stderr)


def journal_of(args: argparse.Namespace, command: str) -> tuple[Path, Config | None] | int:
    """The journal a read command reads (FILE, else --config's persist_path) and the config
    read, if any (a FILE named alone reads none, for ops); or the exit status once the problem
    is printed, in one line."""
    if args.file is not None and args.config is None and command == "ops":
        return Path(args.file), None
    config = offline_config(args)
    if config is None:
        return 2
    if args.file is not None:
        return Path(args.file), config
    if config.persist_path is None:
        print(f'{config.source}: persist_path is "" (observerd runs ephemeral): no journal to read; '
              f"name one as FILE, or read the daemon with --url", file=sys.stderr)
        return 2
    return config.persist_path, config


def no_journal(path: Path, args: argparse.Namespace, config: Config | None) -> str:
    """Why there is nothing to read at path, naming where that path came from."""
    problem = f"{path}: no journal there: file not found, nor rotated segments beside it"
    if args.file is not None:
        return problem
    if any(warning.startswith("config file not found") for warning in config.warnings):
        whence = f"the default persist_path ({config.source} was not found)"
    else:
        whence = f"the persist_path of {config.source}"
    return f"{problem}; it is {whence}: --config chooses another config, FILE another journal"


class DaemonAddress(NamedTuple):
    """A running daemon as a client command reaches it, and where its token came from."""

    url: str
    token: str
    token_source: str  # the flag, variable or setting the token was taken from, never its value
    tls: ssl.SSLContext | None  # None: https verified as by any client
    config_source: str | None  # the config read, if any


def daemon_address(args: argparse.Namespace, command: str) -> DaemonAddress | None:
    """The daemon --url names, else the one --config runs: its bind (a wildcard host is reached
    on loopback), https trusting the configured tls_cert when TLS is on; the token from
    --token, OBSERVERD_TOKEN, else the config's [auth] token. None once a problem is printed."""
    config = None
    if args.url is None or args.config is not None:
        try:
            # A bind beyond loopback whose token the daemon gets from its own environment (a
            # systemd EnvironmentFile) is the daemon's to check: a 401 here says what to pass.
            config = load_config(args.config, allow_unauthenticated=True)
        except ConfigError as exc:
            print_config_problems(exc)
            return None
    if args.token:
        token, token_source = args.token, "--token"
    elif os.environ.get("OBSERVERD_TOKEN"):
        token, token_source = os.environ["OBSERVERD_TOKEN"], "OBSERVERD_TOKEN"
    elif config is not None and config.token:
        token, token_source = config.token, f"[auth] token of {config.source}"
    else:
        token, token_source = "", ("no token (none in --token, OBSERVERD_TOKEN"
                                   + (f" or [auth] token of {config.source})" if config else ")"))
    if args.url is not None:
        return DaemonAddress(args.url, token, token_source, None, config and config.source)
    if config.port == 0:
        print(f"observerd.py {command}: {config.source}: bind {config.bind} is a port the system picks: "
              "name the daemon with --url", file=sys.stderr)
        return None
    host = config.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    tls = None
    if config.tls_cert is not None:
        # The certificate the daemon serves, trusted as itself: it need not name the loopback host.
        try:
            tls = ssl.create_default_context(cafile=config.tls_cert)
        except (OSError, ssl.SSLError) as exc:
            print(f"{config.source}: tls_cert {config.tls_cert}: cannot load: {exc}", file=sys.stderr)
            return None
        tls.check_hostname = False
        tls.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    scheme = "https" if tls is not None else "http"
    return DaemonAddress(f"{scheme}://{format_hostport(host, config.port)}", token, token_source, tls, config.source)


def daemon_problem(exc: OutboundError, address: DaemonAddress) -> str:
    """What went wrong asking the daemon, and for a 401 which token was tried and how to pass one."""
    problem = str(exc)
    if exc.status == 401:
        if address.token:
            problem += f"; the token from {address.token_source} was refused"
        else:
            problem += f"; the daemon wants a token and {address.token_source} was found"
        problem += ": set OBSERVERD_TOKEN, or [auth] token in the file --config names"
    return problem


def print_stats(args: argparse.Namespace) -> int:
    """`stats`: the JSON GET /observer/stats would serve after restoring from the file, or
    (--url) serves now.

    The ring's settings come from the config, as serve reads it, and the flags over it.
    """
    if args.url is not None:
        if args.file is not None:
            print("observerd.py stats: FILE and --url name two sources: give one (see observerd.py stats --help)",
                  file=sys.stderr)
            return 2
        address = daemon_address(args, "stats")
        if address is None:
            return 2
        try:
            answer = call_json(f"{address.url}/observer/stats", CLIENT_TIMEOUT_S, key=address.token, tls=address.tls)
        except OutboundError as exc:
            print(showable(f"observerd.py stats: {address.url}: {daemon_problem(exc, address)}"), file=sys.stderr)
            return 1
        print(json.dumps(answer, ensure_ascii=False, indent=2))
        return 0
    found = journal_of(args, "stats")
    if isinstance(found, int):
        return found
    path, config = found
    if not path.is_file():
        print(f"{path}: not a regular file" if path.exists() else no_journal(path, args, config), file=sys.stderr)
        return 2
    ring = Ring(config.ring_size, config.recent_scenarios, config.max_ring_bytes)
    try:
        ring_ops = restore_journal(path, config.ring_size, config.keep_files, config.max_ring_bytes,
                                   record=UnsyncedRecord.of_journal(path)).ops
    except OSError as exc:
        print(f"{exc.filename or path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    ring.refill(ring_ops)
    print(json.dumps(json.loads(encode_json(ring.stats())), ensure_ascii=False, indent=2))
    return 0


TOP_SECONDS = 60  # of per-second counts top asks for: one sparkline's worth
TOP_PLAIN_WIDTH = 120  # of a snapshot not written to a terminal: a whole sparkline fits
TOP_KEY_POLL_MS = 100  # how soon top sees a key or a resize
SPARKS = "▁▂▃▄▅▆▇█"
ENDPOINT_SORTS = (
    ("failures", lambda e: (-e["failures"], -e["ops"], e["endpoint"])),
    ("failure rate", lambda e: (-e["failure_rate"], -e["failures"], e["endpoint"])),
    ("p95", lambda e: (-(e["p95_ms"] or 0), e["endpoint"])),
    ("ops", lambda e: (-e["ops"], e["endpoint"])),
)


def fetch_timeline(address: DaemonAddress, window: str) -> dict:
    """The daemon's GET /observer/timeline for top; raises OutboundError."""
    answer = call_json(f"{address.url}/observer/timeline?{urlencode({'seconds': TOP_SECONDS, 'window': window})}",
                       CLIENT_TIMEOUT_S, key=address.token, tls=address.tls)
    try:
        top_lines(answer, address.url, TOP_PLAIN_WIDTH, 0)  # has every field top shows, of its kind
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError):
        # Another service at that URL, or an observerd of another version: say so, and retry.
        raise OutboundError("the answer is not a timeline this top can show") from None
    return answer


def screen_line(text: str, width: int) -> str:
    """A line as top shows it: showable, in at most width characters, an ellipsis marking a cut."""
    text = showable(text).rstrip()
    if len(text) <= width:
        return text
    return text[:width - 1] + "…" if width > 0 else ""


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            break
        count /= 1024
    return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"


def format_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1e6 else f"{value:.2g}"


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def clock(timestamp: str) -> str:
    """HH:MM:SS of an RFC 3339 timestamp, in the offset it was written with."""
    return timestamp[11:19]


def sparkline(values: list[int]) -> str:
    """One character per value, ▁ to █ as a share of the largest; a space for none."""
    peak = max(values, default=0)
    return "".join(SPARKS[(value * len(SPARKS) - 1) // peak] if value else " " for value in values)


def top_lines(timeline: dict, url: str, width: int, sort: int) -> list[str]:
    """What top shows, as lines of at most width characters: the same on its screen and in a
    --once snapshot. sort indexes ENDPOINT_SORTS."""
    seconds, ring, journal, totals = timeline["seconds"], timeline["ring"], timeline["journal"], timeline["totals"]
    ok, failed = sum(totals["ok"]), sum(totals["failed"])
    fsync_p99 = timeline["fsync_p99_ms"]
    lines = [
        f"observerd {timeline['version']} at {url} · up {format_duration(timeline['uptime_s'])} · "
        f"{'ready' if timeline['ready'] else 'NOT READY'} · {timeline['now']}",
        f"ring {ring['ops']:,}/{ring['capacity']:,} ops ({percent(ring['ops'], ring['capacity'])}, "
        f"{format_bytes(ring['bytes'])}) · journal "
        f"{format_bytes(journal['bytes']) if journal else 'none (ephemeral)'} · fsync p99 "
        f"{'-' if fsync_p99 is None else f'{fsync_p99:.2f} ms'}",
        f"last {seconds} s: {ok + failed:,} ops, {ok:,} ok, {failed:,} failed ({percent(failed, ok + failed)})",
        "",
    ]
    if not timeline["ready"]:
        lines.insert(1, f"NOT READY: {timeline.get('reason') or 'no reason given'}")  # an older daemon gives none
    head = f"{'SOURCE':<20} {'EV/S':>6} {'OK':>8} {'FAILED':>8} {'FAIL%':>6}  "
    spark_width = max(0, min(seconds, width - len(head)))
    lines.append(head + (f"LAST {spark_width} S" if spark_width else ""))
    for name, counts in [*timeline["sources"].items(), ("all", totals)]:
        per_second = [a + b for a, b in zip(counts["ok"], counts["failed"])]
        source_ok, source_failed = sum(counts["ok"]), sum(counts["failed"])
        lines.append(f"{name[:20]:<20} {per_second[-1]:>6,} {source_ok:>8,} {source_failed:>8,} "
                     f"{percent(source_failed, source_ok + source_failed):>6}  "
                     + (sparkline(per_second[-spark_width:]) if spark_width else ""))
    sort_name, sort_key = ENDPOINT_SORTS[sort]
    since = timeline["endpoints_since"]
    over = "IN THE RING" if since is None else f"OF THE LAST {timeline['endpoints_window']} (since {clock(since)})"
    lines += ["", f"ENDPOINTS {over}, by {sort_name}",
              f"{'OPS':>7} {'FAILED':>7} {'FAIL%':>6} {'P50 MS':>8} {'P95 MS':>8}  ENDPOINT"]
    for e in sorted(timeline["endpoints"], key=sort_key):
        lines.append(f"{e['ops']:>7,} {e['failures']:>7,} {percent(e['failures'], e['ops']):>6} "
                     f"{format_ms(e['p50_ms']):>8} {format_ms(e['p95_ms']):>8}  {e['endpoint']}")
    if not timeline["endpoints"]:
        lines.append("(no ops in the ring)" if since is None else "(no ops stamped in the window)")
    analyzed_at = timeline["clusters_analyzed_at"]
    lines += ["", "FAILURE CLUSTERS, largest first, " + (f"as analysed at {clock(analyzed_at)}" if analyzed_at
                                                         else "not analysed yet"),
              f"{'COUNT':>7} {'LAST':>8}  ENDPOINT: SIGNATURE"]
    for c in timeline["clusters"]:
        lines.append(f"{c['count']:>7,} {clock(c['last_seen']):>8}  {c['endpoint']}: {c['signature']}")
    if not timeline["clusters"]:
        lines.append("(none found by the last analysis)" if analyzed_at else "(none yet)")
    lines += ["", "ESCALATIONS, newest first"]
    for e in timeline["escalations"]:
        lines.append(f"{clock(e['at'])} {e['outcome']:<6} {e['count']:>5,}  {e['endpoint']}: {e['signature']}"
                     + (f"  ({e['error']})" if e.get("error") else ""))
    if not timeline["escalations"]:
        lines.append("(none)")
    window = format_duration(timeline["verdict_window_s"])
    lines += ["", f"CORRECTIONS, newest first: each endpoint {window} before against {window} after",
              f"{'TIME':>8} {'VERDICT':<11} {'FAIL% BEFORE → AFTER':>20}  ENDPOINT"]
    for c in timeline["corrections"]:
        change = f"{percent(c['before']['failures'], c['before']['ops'])} → {percent(c['after']['failures'], c['after']['ops'])}"
        lines.append(f"{clock(c['timestamp']):>8} {c['verdict']:<11} {change:>20}  {c['endpoint']}"
                     + ("  (escalated)" if c["escalated"] else ""))
    if not timeline["corrections"]:
        lines.append("(none judged)")
    return [screen_line(line, width) for line in lines]


def show_top(args: argparse.Namespace) -> int:
    """`top`: the full-screen view, or one plain-text snapshot (--once, or stdout not a terminal)."""
    address = daemon_address(args, "top")
    if address is None:
        return 2
    try:
        if args.once or not sys.stdout.isatty():
            return print_top_snapshot(address, args.window)
        return run_top_screen(address, args.interval, args.window)
    except KeyboardInterrupt:
        return 0  # Ctrl-C quits, like q


def print_top_snapshot(address: DaemonAddress, window: str) -> int:
    try:
        timeline = fetch_timeline(address, window)
    except OutboundError as exc:
        print(showable(f"observerd.py top: {address.url}: {daemon_problem(exc, address)}"), file=sys.stderr)
        return 1
    try:
        width = os.get_terminal_size().columns
    except OSError:
        width = TOP_PLAIN_WIDTH
    print("\n".join(top_lines(timeline, address.url, width, 0)))
    return 0


def run_top_screen(address: DaemonAddress, interval: float, window: str) -> int:
    try:
        import curses  # here, not above: a Python built without curses still runs the daemon
    except ImportError as exc:
        print(f"observerd.py top: this Python has no curses ({exc}); use --once", file=sys.stderr)
        return 1
    try:
        curses.wrapper(top_screen, address, interval, window)
    except curses.error as exc:  # a terminal curses cannot drive: TERM unset or unknown
        print(f"observerd.py top: cannot draw on this terminal ({exc}); use --once", file=sys.stderr)
        return 1
    return 0


def top_screen(screen, address: DaemonAddress, interval: float, window: str) -> None:
    """top's screen, inside curses.wrapper: asks the daemon every interval, redraws on an
    answer, a key or a resize, and shows why while the daemon does not answer. The w key
    switches the endpoints between window and the whole ring."""
    import curses
    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal that cannot hide its cursor shows it
    screen.timeout(TOP_KEY_POLL_MS)
    url = address.url
    windows = [window, "ring"] if window != "ring" else ["ring", DEFAULT_ENDPOINTS_WINDOW]
    sort, timeline, problem, answered_at = 0, None, None, None
    next_fetch, redraw = 0.0, True
    while True:
        if time.monotonic() >= next_fetch:
            try:
                timeline, problem = fetch_timeline(address, windows[0]), None
                answered_at = time.strftime("%H:%M:%SZ", time.gmtime())
            except OutboundError as exc:
                problem = daemon_problem(exc, address)
            next_fetch = time.monotonic() + interval
            redraw = True
        if redraw:
            rows, cols = screen.getmaxyx()
            retrying = f"disconnected, retrying every {interval:g} s: {problem}"
            if timeline is None:
                lines = [screen_line(line, cols - 1) for line in (
                    f"observerd top · {url}", retrying, "no answer yet")]
            elif problem is None:
                lines = top_lines(timeline, url, cols - 1, sort) + ["", "q quits · s sorts the endpoints"]
            else:  # the last numbers stay, to read while the daemon is away
                lines = [screen_line(f"STALE since {answered_at}, {retrying}", cols - 1),
                         *top_lines(timeline, url, cols - 1, sort)]
            screen.erase()
            for y, line in enumerate(lines[:rows]):
                try:
                    screen.addnstr(y, 0, line, cols - 1, curses.A_REVERSE if y == 0 else curses.A_NORMAL)
                except curses.error:
                    pass  # a terminal too small for this line: what fits is drawn
            screen.refresh()
            redraw = False
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
        if key in (ord("s"), ord("S")):
            sort = (sort + 1) % len(ENDPOINT_SORTS)
            redraw = True
        elif key in (ord("w"), ord("W")):
            windows.reverse()
            next_fetch = 0.0  # the other window's ranking, at once
        elif key == curses.KEY_RESIZE:
            redraw = True


TABLE_ENDPOINT_WIDTH = 60


class OpsWriter:
    """Writes `ops`' answer: a table (columns sized by the first ops written), one JSON array,
    or one op a line; each op as it is stored."""

    def __init__(self, output: str, stream, columns: int):
        self.output, self.stream, self.columns = output, stream, columns  # columns 0: no cut
        self.widths: tuple[int, ...] | None = None

    def write(self, ops: list[RingOp]) -> None:
        if self.output == "json":
            self.stream.write(b"[" + b",".join(b"\n" + op.line[:-1] for op in ops) + b"\n]\n")
        elif self.output == "ndjson":
            self.stream.write(b"".join(op.line for op in ops))
        else:
            rows = [self._cells(op) for op in ops]
            if self.widths is None:
                self.widths = tuple(max([len(title)] + [len(row[n]) for row in rows])
                                    for n, title in enumerate(("TIME", "SOURCE", "ENDPOINT", "OK", "DURATION")))
                self._write_row(("TIME", "SOURCE", "ENDPOINT", "OK", "DURATION", "ERROR"))
            for row in rows:
                self._write_row(row)
        self.stream.flush()

    @staticmethod
    def _cells(op: RingOp) -> tuple[str, ...]:
        endpoint = showable(op.endpoint)
        if len(endpoint) > TABLE_ENDPOINT_WIDTH:
            endpoint = endpoint[:TABLE_ENDPOINT_WIDTH - 1] + "…"
        return (op.timestamp, op.source, endpoint, "ok" if op.success else "FAIL",
                f"{op.duration_ms:.6g}ms", showable(op.error or ""))

    def _write_row(self, row: tuple[str, ...]) -> None:
        *cells, duration, error = row
        line = "".join(f"{cell:<{width}}  " for cell, width in zip(cells, self.widths))
        line += f"{duration:>{self.widths[-1]}}  "
        if self.columns and len(line) + len(error) > self.columns:
            room = max(0, self.columns - len(line))
            error = error[:room - 1] + "…" if room else ""
        self.stream.write((line + error).rstrip().encode("utf-8") + b"\n")


def print_ops(args: argparse.Namespace) -> int:
    """`ops`: the ops passing the filters, the newest -n printed oldest first (-r: newest
    first), from the journal's files or a daemon (--url); with -f, then those appended; with
    --count-by, one row per value."""
    def fail(problem: str, status: int) -> int:
        print(showable(problem), file=sys.stderr)
        return status

    try:
        op_filter = OpFilter.from_args(args, time.time())
        counter = None if args.count_by is None else GroupCounter(args.count_by)
    except InvalidOp as exc:
        flag = exc.field.replace("_", "-")
        return fail(f"observerd.py ops: --{flag} {exc.reason} (see observerd.py ops --help)", 2)
    output = args.output or ("table" if sys.stdout.isatty() else "ndjson")
    if args.follow and (output == "json" or args.reverse or args.count_by is not None):
        what = ("-o json: one array, which following never closes: use -o ndjson or table" if output == "json"
                else "-r: following prints oldest first, -r newest first: drop one" if args.reverse
                else "--count-by: a count is of what is there: drop -f")
        return fail(f"observerd.py ops: -f with {what} (see observerd.py ops --help)", 2)
    if args.url is not None:
        if args.file is not None:
            return fail("observerd.py ops: FILE and --url name two journals: give one (see observerd.py ops --help)", 2)
        return print_ops_of_daemon(args, op_filter, output)
    found = journal_of(args, "ops")
    if isinstance(found, int):
        return found
    path, config = found
    keep_files = SETTING["keep_files"].maximum if config is None else config.keep_files
    lines = args.lines if args.lines is not None else FOLLOW_DEFAULT_LINES if args.follow else OPS_DEFAULT_LINES
    writer = OpsWriter(output, sys.stdout.buffer, shutil.get_terminal_size((0, 0)).columns)
    skipped, follower = SkippedLines(), None
    try:
        record = UnsyncedRecord.of_journal(path)
        with JournalFiles(path, keep_files, record) as files:
            if not files.listed:
                if not args.follow:
                    return fail(no_journal(path, args, config), 2)
                print(f"{path}: no journal there yet; following it once there is", file=sys.stderr)
            if args.count_by is not None:
                scan_filter, failed_only = op_filter.counting()
                page = read_history(files, scan_filter, math.inf, skipped=skipped, into=counter)
                write_counts(args, output, counter.rows(failed_only),
                             CountedPage(page.scanned_bytes, page.truncated, skipped.count))
                return 0
            if args.follow:  # first: the read below lets go of each file it has read
                follower = JournalFollower(path, keep_files, op_filter, skipped, files.live(), record)
            ops = read_history(files, op_filter, lines, skipped=skipped).ops if lines else []
        if not args.reverse:
            ops.reverse()
        writer.write(ops)
        while follower is not None:
            time.sleep(FOLLOW_POLL_S)
            ops = follower.poll()
            if ops:
                writer.write(ops)
    except KeyboardInterrupt:  # how a follow ends
        return 0 if args.follow else 130
    except BrokenPipeError:
        raise  # the reader of the pipe is done (| head): main() ends quietly
    except OSError as exc:
        return fail(f"{exc.filename or path}: cannot read: {exc.strerror or exc}", 1)
    finally:
        if follower is not None:
            follower.close()
        if skipped.count:  # once, not a line each
            where, offset = skipped.first
            print(f"observerd.py ops: skipped {skipped.count} line(s) no read can serve (malformed or "
                  f"invalid; the first in {where} at byte {offset})", file=sys.stderr)
    return 0


class CountedPage(NamedTuple):
    """What a count's scan read, as write_counts reports it."""

    scanned_bytes: int
    truncated: bool
    skipped_lines: int


def write_counts(args: argparse.Namespace, output: str, groups: list[dict], page: CountedPage) -> None:
    """--count-by's rows: a table, one JSON object as GET /observer/history?count_by= answers,
    or one row a line."""
    if args.lines is not None:
        groups = groups[:args.lines] if args.lines != math.inf else groups
    out = sys.stdout
    if output == "json":
        out.write(json.dumps({"count_by": args.count_by, "groups": groups, "count": len(groups),
                              "scanned_bytes": page.scanned_bytes, "truncated": page.truncated,
                              "skipped_lines": page.skipped_lines}, ensure_ascii=False) + "\n")
    elif output == "ndjson":
        out.writelines(json.dumps(group, ensure_ascii=False) + "\n" for group in groups)
    else:
        out.write(f"{'FAILED':>7} {'OPS':>7} {'FAIL%':>6} {'P50 MS':>8} {'P95 MS':>8}  {'NEWEST':<27}  "
                  f"{showable(args.count_by).upper()}\n")
        for g in groups:
            value = "-" if g["value"] is None else showable(g["value"])
            out.write(f"{g['failures']:>7,} {g['ops']:>7,} {percent(g['failures'], g['ops']):>6} "
                      f"{format_ms(g['p50_ms']):>8} {format_ms(g['p95_ms']):>8}  {g['newest']:<27}  {value}\n")
        if not groups:
            out.write("(no ops" + (" failed" if args.failed else "") + " in what was read)\n")
    if page.truncated:
        print("observerd.py ops: the daemon's scan stopped at its max_scan_bytes: the counts are of the "
              "newest part of the window", file=sys.stderr)


def print_ops_of_daemon(args: argparse.Namespace, op_filter: OpFilter, output: str) -> int:
    """ops --url: the same query, paged from GET /observer/history (newest first), ordered here.
    Times are sent absolute, as this command line reads them; --regex stays here: the daemon
    takes only plain text."""
    def fail(problem: str, status: int) -> int:
        print(showable(problem), file=sys.stderr)
        return status

    if args.follow:
        return fail("observerd.py ops: -f follows the journal's files, not --url: run it where the journal "
                    "is, or watch the daemon with top (see observerd.py ops --help)", 2)
    if args.regex is not None:
        return fail("observerd.py ops: --regex is the command line's only: the daemon takes --grep, plain "
                    "text (see observerd.py ops --help)", 2)
    address = daemon_address(args, "ops")
    if address is None:
        return 2
    params = []
    for name, value in filter_args(args).items():
        if name in ("since", "until"):
            value = [datetime.fromtimestamp(getattr(op_filter, name), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")]
        params.extend((name, text) for text in ([value] if isinstance(value, str) else value))
    lines = args.lines if args.lines is not None else OPS_DEFAULT_LINES

    def history(extra: list[tuple[str, str]]) -> dict:
        query = urlencode(params + extra)
        return call_json(f"{address.url}/observer/history?{query}", HISTORY_CLIENT_TIMEOUT_S,
                         key=address.token, tls=address.tls)

    try:
        if args.count_by is not None:
            answer = history([("count_by", args.count_by)])
            write_counts(args, output, answer["groups"], CountedPage(
                answer["scanned_bytes"], answer["truncated"], answer["skipped_lines"]))
            return 0
        ops, cursor, skipped = [], None, 0
        while len(ops) < lines:
            answer = history([("limit", str(int(min(lines - len(ops), MAX_HISTORY_LIMIT))))]
                             + ([("cursor", cursor)] if cursor else []))
            ops.extend(RingOp(op) for op in answer["ops"])
            skipped += answer["skipped_lines"]
            if (cursor := answer["cursor"]) is None:
                break
    except OutboundError as exc:
        return fail(f"observerd.py ops: {address.url}: {daemon_problem(exc, address)}", 1)
    if not args.reverse:
        ops.reverse()
    OpsWriter(output, sys.stdout.buffer, shutil.get_terminal_size((0, 0)).columns).write(ops)
    if skipped:
        print(f"observerd.py ops: the daemon skipped {skipped} line(s) no read can serve", file=sys.stderr)
    return 0


def add_comparison_parsers(commands, add_config_flag) -> None:
    def add_journal_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", nargs="?", help="the JSONL journal, its rotated segments with it "
                            "(default: the config's persist_path)")
        add_config_flag(parser, argparse.SUPPRESS)
        parser.add_argument("-o", "--output", choices=("table", "json"),
                            help="table on a terminal, else json (what the HTTP route answers)")

    runs = commands.add_parser(
        "runs", help="the runs in the journal: ops, failures, durations, endpoints", examples=RUNS_EXAMPLES,
        description="The runs among the journal's ops passing every filter (an op is in the run its\n"
                    "run_field names), the last active first; what GET /observer/runs answers.")
    add_journal_flags(runs)
    add_filter_flags(runs)
    runs.add_argument("-n", type=non_negative_int, default=DEFAULT_LIMIT, metavar="N",
                      help=f"the N last active (default {DEFAULT_LIMIT})")
    runs.add_argument("--cursor", help="go on where a truncated answer stopped (its cursor)")
    compare = commands.add_parser(
        "compare", help="did it get better? two time ranges or runs compared, with significance",
        examples=COMPARE_EXAMPLES,
        description="Each endpoint's (or --by field's) failure rate and durations in BASELINE against\n"
                    "CANDIDATE, with Fisher's exact and the Mann-Whitney U tests, corrected for the many\n"
                    "rows compared; what GET /observer/compare answers.")
    compare.add_argument("baseline", metavar="BASELINE", help="SINCE..UNTIL (2h..1h, yesterday..today) or a run id")
    compare.add_argument("candidate", metavar="CANDIDATE", help="the same forms")
    add_journal_flags(compare)
    add_filter_flags(compare, COMPARE_FILTERS)
    compare.add_argument("--by", default="endpoint", metavar="FIELD", help="group rows by this field (default endpoint)")
    corrections = commands.add_parser(
        "corrections", help="the overseer's corrections, each with its verdict", examples=CORRECTIONS_EXAMPLES,
        description="The newest overseer corrections, each judged on its endpoint's ops verdict_window_s\n"
                    "before against as long after; what GET /observer/corrections answers.")
    add_journal_flags(corrections)
    add_filter_flags(corrections, ("since", "until", "endpoint"))
    corrections.add_argument("-n", type=non_negative_int, default=DEFAULT_CORRECTIONS, metavar="N",
                             help=f"the newest N (default {DEFAULT_CORRECTIONS}, at most {MAX_CORRECTIONS})")


def read_journal_answer(args: argparse.Namespace, answer: Callable[[JournalFiles, Config, SkippedLines], dict],
                        positionals: tuple[str, ...] = ()) -> dict | int:
    """What answer() computes from the journal the arguments name, or the exit status once the
    problem is printed: a usage problem naming the flag (2), a file that cannot be read (1)."""
    found = journal_of(args, args.command)
    if isinstance(found, int):
        return found
    path, config = found
    skipped = SkippedLines()
    try:
        with JournalFiles(path, config.keep_files, UnsyncedRecord.of_journal(path)) as files:
            if not files.listed:
                print(no_journal(path, args, config), file=sys.stderr)
                return 2
            return answer(files, config, skipped)
    except InvalidOp as exc:
        name = (exc.field if exc.field in positionals
                else ("-" if len(exc.field) == 1 else "--") + exc.field.replace("_", "-"))
        print(f"observerd.py {args.command}: {name} {exc.reason} (see observerd.py {args.command} --help)",
              file=sys.stderr)
        return 2
    except RotatedAway as exc:
        print(f"observerd.py {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{exc.filename or path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        if skipped.count:
            where, offset = skipped.first
            print(f"observerd.py {args.command}: skipped {skipped.count} line(s) no read can serve (malformed "
                  f"or invalid; the first in {where} at byte {offset})", file=sys.stderr)


def write_answer(args: argparse.Namespace, answer: dict, table: Callable[[dict], list[str]]) -> int:
    """The answer as JSON (what the HTTP route serves) or, on a terminal or with -o table, as text."""
    if (args.output or ("table" if sys.stdout.isatty() else "json")) == "json":
        print(json.dumps(json.loads(encode_json(answer)), ensure_ascii=False, indent=2))
    else:
        print("\n".join(showable(line) for line in table(answer)))
    return 0


def format_rate(summary: dict) -> str:
    if not summary["ops"]:
        return "-"
    return f"{summary['failure_rate']:.1%} ({summary['failures']:,}/{summary['ops']:,})"


def runs_table(answer: dict) -> list[str]:
    lines = [f"{'RUN':<24} {'FIRST':<27} {'LAST':<27} {'OPS':>7} {'FAILED':>7} {'FAIL%':>6} "
             f"{'P50 MS':>8} {'P95 MS':>8}  ENDPOINTS"]
    for run in answer["runs"]:
        endpoints = ", ".join(run["endpoints"][:3]) + (f" +{len(run['endpoints']) - 3}" if len(run["endpoints"]) > 3 else "")
        lines.append(f"{field_text(run['run'])[:24]:<24} {run['first']:<27} {run['last']:<27} {run['ops']:>7,} "
                     f"{run['failures']:>7,} {percent(run['failures'], run['ops']):>6} {format_ms(run['p50_ms']):>8} "
                     f"{format_ms(run['p95_ms']):>8}  {endpoints}")
    if not answer["runs"]:
        lines.append("(no ops with the run field in what was read)")
    if answer["truncated"]:
        lines.append(f"(max_scan_bytes read: older ops were not; --cursor {answer['cursor']} reads on)")
    return lines


COMPARE_FOOTNOTE = f"""
~        no significant change: the difference may well be noise. A test counts only when its q
         (its p adjusted for every test of this comparison, Benjamini–Hochberg) is at most
         {SIGNIFICANCE}, so fifty unchanged endpoints do not light up by chance.
too few  fewer than {MIN_COMPARED_OPS} ops (or ops with a duration) on a side: no test is run.
Failure rates: Fisher's exact test. Durations: the Mann–Whitney U test (is one side's typically
longer?); ops sent without a duration (stored as 0 ms) are left out of it. How many ops a
difference needs, for one test alone: 10% → 30% failures about 40 a side, 5% → 10% about 260;
durations that do not overlap at all, 5 a side. Compare more ops, not a lower bar."""


def _delta(old: float | None, new: float | None, unit: str) -> str:
    if old is None or new is None:
        return ""
    if unit == "pp":
        return f"{(new - old) * 100:+.1f}pp"
    return f"{(new - old) / old:+.0%}" if old else ""


def compare_table(answer: dict) -> list[str]:
    """benchstat's layout: old → new, delta, p (q), and ~ where nothing changed."""
    by = answer["by"]
    lines = [f"baseline {answer['baseline']} → candidate {answer['candidate']}, by {by}: {answer['verdict']}"]
    if answer["truncated"]:
        lines.append("(max_scan_bytes read before a side's range ended: it holds only the newest ops)")
    width = max([len(by)] + [len(field_text(row[by]) if row[by] is not None else "(none)") for row in answer["rows"]])
    width = min(width, TABLE_ENDPOINT_WIDTH)
    for title, metric, cell, unit in (
            ("FAILURE RATE", "failure_rate", format_rate, "pp"),
            ("P50 MS (P95)", "duration",
             lambda s: "-" if s["p50_ms"] is None else f"{format_ms(s['p50_ms'])} ({format_ms(s['p95_ms'])})", "%")):
        lines += ["", f"{by.upper()[:width]:<{width}}  {title + ' OLD':>22}  {'NEW':>22}  {'DELTA':>8}  P (Q)"]
        for row in answer["rows"]:
            old, new, test = row["baseline"], row["candidate"], row[metric]
            value = "failure_rate" if unit == "pp" else "p50_ms"
            verdict = test["verdict"]
            delta = {"~": "~", TOO_FEW: TOO_FEW}.get(verdict) or _delta(old[value], new[value], unit)
            tested = "" if test["p"] is None else f"p={test['p']:.3g} (q={test['q']:.3g})"
            name = "(none)" if row[by] is None else field_text(row[by])
            if len(name) > width:
                name = name[:width - 1] + "…"
            lines.append(f"{name:<{width}}  {cell(old):>22}  {cell(new):>22}  {delta:>8}  {tested}"
                         + (f"  {verdict}" if verdict in ("worse", "better") else ""))
    signatures = [(row, kind, s) for row in answer["rows"] for kind in ("new", "gone")
                  for s in row[f"{kind}_signatures"]]
    if signatures:
        lines += ["", "ERROR SIGNATURES new in the candidate (+) and gone from it (-)"]
        for row, kind, s in signatures:
            lines.append(f"{'+' if kind == 'new' else '-'}{s['count']:>6,}  {field_text(row[by]) if row[by] is not None else '(none)'}: {s['signature']}")
    return lines + COMPARE_FOOTNOTE.splitlines()


def corrections_table(answer: dict) -> list[str]:
    window = format_duration(answer["window_s"])
    lines = [f"{'TIME':<27} {'VERDICT':<11} {'FAIL% BEFORE → AFTER':>28} {'P50 MS BEFORE → AFTER':>23}  "
             f"ESC  ENDPOINT  (each: {window} before against {window} after)"]
    for entry in answer["corrections"]:
        row, correction = entry["comparison"], entry["correction"]
        before, after = row["baseline"], row["candidate"]
        lines.append(f"{correction.timestamp:<27} {entry['verdict']:<11} "
                     f"{format_rate(before) + ' → ' + format_rate(after):>28} "
                     f"{format_ms(before['p50_ms']) + ' → ' + format_ms(after['p50_ms']):>23}  "
                     f"{'yes' if entry['escalated'] else '':<3}  {correction.endpoint}")
    if not answer["corrections"]:
        lines.append("(no corrections in what was read)")
    return lines


def print_runs(args: argparse.Namespace) -> int:
    """`runs`: what GET /observer/runs answers, from the journal on disk."""
    def answer(files: JournalFiles, config: Config, skipped: SkippedLines) -> dict:
        op_filter = OpFilter.from_args(args, time.time())
        return {**list_runs(files, op_filter, config.run_field, args.n, args.cursor, config.max_scan_bytes, skipped),
                "skipped_lines": skipped.count}

    found = read_journal_answer(args, answer)
    return found if isinstance(found, int) else write_answer(args, found, runs_table)


def print_comparison(args: argparse.Namespace) -> int:
    """`compare`: what GET /observer/compare answers, from the journal on disk."""
    def answer(files: JournalFiles, config: Config, skipped: SkippedLines) -> dict:
        return compare_journal(files, args.baseline, args.candidate, filter_args(args), args.by,
                               config.run_field, time.time(), config.max_scan_bytes, skipped=skipped)

    found = read_journal_answer(args, answer, positionals=("baseline", "candidate"))
    return found if isinstance(found, int) else write_answer(args, found, compare_table)


def print_corrections(args: argparse.Namespace) -> int:
    """`corrections`: what GET /observer/corrections answers, from the journal on disk."""
    def answer(files: JournalFiles, config: Config, skipped: SkippedLines) -> dict:
        limit = check_positive_int(args.n, "n", MAX_CORRECTIONS)
        escalated = EscalatedCorrections(escalated_corrections_path(files.path))
        return list_corrections(files, filter_args(args), limit,
                                config.verdict_window_s, time.time(), config.max_scan_bytes, escalated, skipped)

    found = read_journal_answer(args, answer)
    return found if isinstance(found, int) else write_answer(args, found, corrections_table)


class ReceivedSignals:
    """The signals serve acts on, in the order they came, taken by sigwait on a thread of
    their own: startup goes on meanwhile, and a stop signal is seen at once by the restore,
    however long the journal it reads."""

    def __init__(self, signums: set[int]):
        self.stopping = threading.Event()  # a stop signal came
        self._signums = signums
        self._received: queue.SimpleQueue[int] = queue.SimpleQueue()
        threading.Thread(target=self._take, name="signals", daemon=True).start()

    def _take(self) -> None:
        while True:
            signum = signal.sigwait(self._signums)
            if signum != signal.SIGHUP:
                self.stopping.set()
            self._received.put(signum)

    def next(self) -> int:
        """The next signal, waiting for one."""
        return self._received.get()


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit status."""
    # Blocked first, in this thread and so in every thread it starts, then taken by sigwait
    # on a thread of its own: a signal during startup waits for the daemon to act on it
    # (SIGHUP reopens the journal once restored; SIGTERM stops cleanly, during the restore
    # too), and no handler ever runs in the middle of the code it interrupts (one that took a
    # lock that code held would hang the daemon for good).
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    received = ReceivedSignals(signals)
    log("INFO", "starting", version=VERSION, config=config.source,
        persist_path=config.persist_path or "(ephemeral)", auth=bool(config.token))
    for warning in config.warnings:
        log("WARN", warning, file=config.source)
    problems = usability_problems(config)
    if problems:
        log("ERROR", "invalid config", file=config.source, problem="; ".join(problems))
        return 2
    try:
        daemon = RunningDaemon(config)
    except DaemonNotStarted:
        return 2
    if not daemon.restore(received.stopping):
        return daemon.stop(status=2)
    while (signum := received.next()) == signal.SIGHUP:
        daemon.reopen_journal()
    return daemon.stop(signal=signal.Signals(signum).name, restored=daemon.store.restored)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand they were given to, whose --help lists its own
        args.subcommands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    command = {"check": check, "stats": print_stats, "top": show_top, "ops": print_ops, "runs": print_runs,
               "compare": print_comparison, "corrections": print_corrections}.get(args.command)
    if command is None:
        try:
            config = load_config(args.config, **setting_flags(args))
        except ConfigError as exc:
            for warning in exc.warnings:
                log("WARN", warning, file=exc.source)
            log("ERROR", "invalid config", file=exc.source, problem="; ".join(exc.problems))
            return 2
        return serve(config)
    # The others stop on a signal as any Unix tool does, Ctrl-C in one line (top and ops -f
    # take it as the way they end).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        status = command(args)
        sys.stdout.flush()  # a reader that left (`| head`) shows here, not in the flush at exit
    except KeyboardInterrupt:
        print(f"observerd.py {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # It took what it wanted: the rest goes nowhere, quietly, as with any Unix tool.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return status


# =============================================================================
# [SECTION] Browser page, the data at the end: GET /observer/ui, one HTML document with its style
# and script inline; it holds no ops, only fetches the API, and its Content-Security-Policy allows
# nothing else
# =============================================================================

UI_STYLE = """
:root{--bg:#fff;--fg:#1f2328;--mute:#59636e;--line:#d1d9e0;--card:#f6f8fa;--ok:#1a7f37;--bad:#cf222e;
--warn:#9a6700;--link:#0550ae;--c0:#0969da;--c1:#8250df;--c2:#b35900;--c3:#1a7f37;--c4:#6e7781;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--mute:#9198a1;--line:#3d444d;
--card:#151b23;--ok:#3fb950;--bad:#f85149;--warn:#d29922;--link:#4493f8;--c0:#4493f8;--c1:#ab7df8;
--c2:#e3b341;--c3:#3fb950;--c4:#9198a1}}
*{box-sizing:border-box}
[hidden]{display:none!important}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,sans-serif}
header{display:flex;flex-wrap:wrap;align-items:center;gap:6px 20px;padding:10px 16px;border-bottom:1px solid var(--line)}
h1{font-size:18px;margin:0}
h1 small{font-size:13px;font-weight:400;color:var(--mute)}
h2{font-size:15px;margin:0 0 8px}
dl{display:flex;flex-wrap:wrap;gap:4px 20px;margin:0}
dl div{display:flex;gap:6px;align-items:baseline}
dt{color:var(--mute);font-size:12px}
dd{margin:0;font-variant-numeric:tabular-nums}
#conn{margin:0 0 0 auto;padding:2px 10px;border-radius:12px;border:1px solid var(--line);font-size:13px}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
#auth{margin:12px 16px;padding:12px;border:2px solid var(--warn);border-radius:6px;display:flex;flex-wrap:wrap;gap:8px;align-items:center}
#auth p{flex-basis:100%;margin:0;font-weight:600}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,540px),1fr));gap:12px;padding:12px 16px}
section{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:10px 12px;min-width:0}
.wide{grid-column:1/-1}
.stale section{opacity:.55}
.note{color:var(--mute);font-size:12px;margin:4px 0}
.scroll{overflow-x:auto}
.tall{max-height:75vh;overflow-y:auto}
.tall th{position:sticky;top:0;background:var(--card)}
#by-source{display:flex;flex-wrap:wrap;gap:2px 14px;list-style:none;padding:0;margin:2px 0}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:3px 8px 3px 0;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--mute);white-space:nowrap}
.n{text-align:right}
td.t{white-space:nowrap}
td.x{max-width:36ch;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
td.w{min-width:12ch;overflow-wrap:anywhere}
tr.f td:nth-child(4){color:var(--bad);font-weight:600}
button,input,select{font:inherit;color:inherit}
input,select,button:not(.link):not(.sort){background:var(--bg);border:1px solid var(--line);border-radius:4px;padding:3px 8px}
button.link,button.sort{background:none;border:0;padding:0;cursor:pointer;text-align:left}
button.link{color:var(--link);text-decoration:underline;overflow-wrap:break-word}
button.sort{color:inherit;font-weight:600}
:focus-visible{outline:2px solid var(--link);outline-offset:1px}
#filters{display:flex;flex-wrap:wrap;gap:6px 14px;margin-bottom:6px}
#filters label{display:flex;gap:6px;align-items:center;font-size:13px}
#chart{display:block;width:100%}
#chart text{fill:var(--mute);font-size:11px}
#chart .axis{font-size:12px}
#chart .grid{stroke:var(--line)}
#chart polyline{fill:none;stroke-width:1.5;stroke-linejoin:round}
#legend{display:flex;flex-wrap:wrap;gap:4px 16px;list-style:none;padding:0;margin:6px 0 0;font-size:13px}
.sw{display:inline-block;width:14px;height:3px;margin-right:6px;vertical-align:middle}
.s0{stroke:var(--c0);background:var(--c0)}.s1{stroke:var(--c1);background:var(--c1)}
.s2{stroke:var(--c2);background:var(--c2)}.s3{stroke:var(--c3);background:var(--c3)}
.s4{stroke:var(--c4);background:var(--c4)}
#chart polyline.sf{stroke:var(--bad);stroke-width:2;stroke-dasharray:5 3}
.sf{background:var(--bad)}
@media (max-width:600px){header,main{padding-left:8px;padding-right:8px}#conn{margin-left:0}
/* A row is a card of labelled cells: six columns fit no phone, and a header scrolled out of sight is no header. */
table,tbody{display:block}thead{display:none}#endpoints thead{display:block}#endpoints thead tr{display:flex;flex-wrap:wrap;gap:0 14px}
#endpoints th{border:0;padding:0 0 4px}
tbody tr{display:flex;flex-wrap:wrap;gap:0 14px;padding:4px 0;border-bottom:1px solid var(--line)}
td{display:block;border:0;padding:0;text-align:left}td:first-child{flex-basis:100%}
td[data-label]:not(:first-child)::before{content:attr(data-label) " ";color:var(--mute);font-size:12px}
td.x{max-width:100%;white-space:normal;overflow-wrap:anywhere}td:empty{display:none}}
"""

UI_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "observerd.token", EVERY_MS = 2000, WINDOW_S = TIMELINE_SECONDS, HISTORY_PAGE = 50;
const ENDPOINTS_WINDOW = "DEFAULT_ENDPOINTS_WINDOW";
let endpointsWindow = ENDPOINTS_WINDOW;
const SOURCES = [...$("f-source").options].map((o) => o.value).filter(Boolean);
const SVG = $("chart").namespaceURI;
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let timer = 0, busy = false, again = false, needToken = false, ringCapacity = 0, updated = "";
let ops = [], endpoints = [], timeline = null, sortBy = {key: "failures", desc: true}, shown = null;
const drawn = new Map();  /* tbody -> the rows it shows, as JSON */

class HttpError extends Error {
  constructor(status, reason, path) {
    super(path ? "GET " + path + ": " + status + " " + reason : reason);
    this.status = status;
    this.reason = reason;
  }
}

async function api(path, accept = []) {
  const headers = token ? {Authorization: "Bearer " + token} : {};
  const resp = await fetch(path, {headers, cache: "no-store", signal: AbortSignal.timeout(8000)});
  const body = await resp.json().catch(() => null);
  if (resp.status === 401) throw new HttpError(401, "token refused");
  if (!resp.ok && !accept.includes(resp.status)) {
    throw new HttpError(resp.status, (body && body.error) || resp.statusText, path.split("?")[0]);
  }
  return body;
}

/* Elements are built with text nodes only: ops carry whatever strings their senders chose. */
function el(tag, cls, ...children) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  e.append(...children.map((c) => (c instanceof Node ? c : String(c ?? ""))));
  return e;
}

const nf = new Intl.NumberFormat("en");
const count = (n, unit) => (n == null ? "–" : nf.format(n) + (unit ? " " + unit : ""));
const ms = (n) => (n == null ? "–" : (n < 10 && !Number.isInteger(n) ? n.toFixed(1) : nf.format(Math.round(n))) + " ms");
const pct = (r) => (r == null ? "–" : (r * 100).toFixed(r > 0 && r < 0.1 ? 1 : 0) + " %");
/* Times as sent, without fractions; today's (by the server's clock) without their date. */
function when(ts) {
  const s = String(ts ?? "").replace("T", " ").replace(/\.\d+/, "");
  return timeline && s.startsWith(timeline.now.slice(0, 10)) ? s.slice(11) : s;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + units[i];
}

function uptime(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  if (d) return d + " d " + h + " h";
  if (h) return h + " h " + m + " min";
  return m ? m + " min " + Math.floor(s % 60) + " s" : Math.floor(s) + " s";
}

/* An endpoint as a history query: fnmatch brackets make *, ? and [ literal. */
const exact = (endpoint) => endpoint.replace(/[[*?]/g, "[$&]");

function endpointButton(endpoint, failedOnly = false) {
  const b = el("button", "link", endpoint);
  b.type = "button";
  b.title = "Open " + (failedOnly ? "its failed ops" : "its ops") + " from the journal";
  b.dataset.k = (failedOnly ? "F" : "A") + endpoint;
  b.addEventListener("click", () => openHistory(endpoint, failedOnly));
  return b;
}

/* Rows are rebuilt only when their data changed, and the focused button keeps focus. */
function fill(body, rows, cells, empty) {
  const key = JSON.stringify(rows);
  if (drawn.get(body) === key) return;
  drawn.set(body, key);
  const focused = body.contains(document.activeElement) ? document.activeElement.dataset.k : null;
  const labels = [...body.parentElement.tHead.rows[0].cells].map((th) => th.textContent);
  const trs = rows.map((row) => {
    const tr = el("tr", cells.rowClass ? cells.rowClass(row) : "");
    cells.columns.forEach(([cls, make], n) => {
      const td = tr.appendChild(el("td", cls, make(row)));
      td.dataset.label = labels[n];  /* what a narrow screen shows before it, in place of the header */
      if (cls === "x") td.title = td.textContent;  /* cut to fit: the whole text on hover */
    });
    return tr;
  });
  if (!trs.length) {
    const td = el("td", "note", empty);
    td.colSpan = cells.columns.length;
    trs.push(el("tr", "", td));
  }
  body.replaceChildren(...trs);
  if (focused != null) {
    for (const b of body.querySelectorAll("button")) if (b.dataset.k === focused) { b.focus(); break; }
  }
}

function setConn(text, cls) {
  const c = $("conn");
  c.textContent = text;
  c.className = cls;
  document.body.classList.toggle("stale", cls !== "ok");
}

function askToken(why) {
  needToken = true;
  $("auth-msg").textContent = why || (token
    ? "The token was refused (401 Unauthorized). Enter the right one."
    : "This observerd needs its bearer token to show data.");
  $("auth").hidden = false;
  $("token").focus();
  setConn("waiting for a token", "warn");
}

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const given = $("token").value.trim();
  $("token").value = "";
  /* observerd's tokens are printable ASCII; fetch could not even send another. */
  if (!/^[\x20-\x7e]+$/.test(given)) return askToken("That cannot be the token: tokens are printable ASCII.");
  token = given;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("auth").hidden = true;
  needToken = false;
  tick();
});

function opsPath() {
  const q = new URLSearchParams();
  if (ringCapacity) q.set("limit", Math.min(200, ringCapacity));
  if ($("f-source").value) q.set("source", $("f-source").value);
  if ($("f-failed").checked) q.set("failed", "true");
  return "ops?" + q;
}

/* Shows what answered (the timeline does while restoring, stats does not), then throws the
   first failure, a refused token before any other. */
async function refresh() {
  const settled = await Promise.allSettled(
    [api("timeline?seconds=" + WINDOW_S + "&window=" + endpointsWindow), api("stats"), api("playbooks"),
     api(opsPath())]);
  const [t, stats, playbooks, recent] = settled.map((r) => r.value);
  if (t) {
    const ready = t.ready ? null : await api("ready", [503]).catch((e) => ({reason: e.message}));
    showReady(t.ready, ready && ready.reason);
    ringCapacity = t.ring.capacity;
    timeline = t;
    showHeader(t);
    drawChart(t);
    endpoints = t.endpoints;
    showEndpoints();
    showClusters(t.clusters, t.clusters_analyzed_at);
    showEscalations(t.escalations);
    showCorrections(t.corrections);
  }
  if (stats) showStats(stats);
  if (playbooks) showPlaybooks(playbooks);
  if (recent) {
    ops = recent.ops;
    showOps();
  }
  const failures = settled.filter((r) => r.status === "rejected").map((r) => r.reason);
  if (failures.length) throw failures.find((e) => e.status === 401) || failures[0];
}

function showReady(ready, reason) {
  $("ready").textContent = ready ? "ready" : "not ready: " + (reason || "no reason given");
  $("ready").className = ready ? "ok" : "bad";
}

function showHeader(t) {
  $("version").textContent = "v" + t.version;
  $("uptime").textContent = uptime(t.uptime_s);
  $("journal").textContent = t.journal ? bytes(t.journal.bytes) : "none (ephemeral)";
  $("journal").title = t.journal ? t.journal.path : "";
  $("ring").textContent = count(t.ring.ops) + " / " + count(t.ring.capacity, "ops") + " (" +
    pct(t.ring.ops / t.ring.capacity) + ", " + bytes(t.ring.bytes) + ")";
  $("fsync").textContent = t.fsync_p99_ms == null ? "no fsync yet" : ms(t.fsync_p99_ms);
}

function showStats(stats) {
  $("stat-total").textContent = count(stats.total, "ops");
  $("stat-ok").textContent = count(stats.successes, "ok");
  $("stat-failed").textContent = count(stats.failures, "failed");
  const items = Object.entries(stats.by_source).sort().map(([source, n]) => {
    const li = el("li", "", el("span", "sw s" + sourceIndex(source)), source + ": ", el("b", "", count(n, "ops")));
    li.dataset.source = source;
    li.dataset.count = n;
    return li;
  });
  $("by-source").replaceChildren(...items);
}

const sourceIndex = (name) => { const i = SOURCES.indexOf(name); return i < 0 ? 4 : i; };

function niceStep(x) {
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  return [1, 2, 5, 10].map((m) => m * p).find((s) => s >= x);
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
}

function drawChart(t) {
  const chart = $("chart"), n = t.seconds;
  const w = Math.max(300, chart.clientWidth || 800), h = w < 600 ? 200 : 240;
  const L = 46, R = 12, T = 10, B = 38, pw = w - L - R, ph = h - T - B;
  const series = Object.keys(t.sources).sort().map((name) => ({
    name, cls: "s" + sourceIndex(name),
    values: t.sources[name].ok.map((ok, i) => ok + t.sources[name].failed[i]),
  }));
  series.push({name: "failures (all sources)", cls: "sf", values: t.totals.failed});
  /* Seconds are averaged in bins of at least 3 px, so a narrow chart stays readable. */
  const bin = [1, 2, 5, 10, 15, 30].find((b) => (pw * b) / n >= 3) || 30;
  const rebin = (values) => {
    const out = [];
    for (let end = values.length; end > 0; end -= bin) {
      const part = values.slice(Math.max(0, end - bin), end);
      out.unshift(part.reduce((a, b) => a + b, 0) / part.length);
    }
    return out;
  };
  const lines = series.map((s) => rebin(s.values));
  const max = Math.max(1, ...lines.flat());
  const step = Math.max(1, niceStep(max / 4)), top = Math.ceil(max / step) * step;
  const ago = (s) => L + pw * (1 - s / (n - 1 || 1)), y = (v) => T + ph - (ph * v) / top;
  const parts = [svg("title", {}, "Events per second by source, and failures per second, over the last " + n + " s")];
  for (let v = 0; v <= top; v += step) {
    parts.push(svg("line", {class: "grid", x1: L, x2: L + pw, y1: y(v), y2: y(v)}));
    parts.push(svg("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, nf.format(v)));
  }
  const every = [10, 30, 60, 120, 300].find((s) => (pw * s) / n >= 70) || n;
  const marks = [];
  for (let s = 0; s < n; s += every) marks.push(s);
  if (((n - 1 - marks[marks.length - 1]) * pw) / n >= 70) marks.push(n - 1);
  for (const s of marks) {
    parts.push(svg("line", {class: "grid", x1: ago(s), x2: ago(s), y1: T + ph, y2: T + ph + 4}));
    parts.push(svg("text", {x: ago(s), y: T + ph + 16, "text-anchor": s ? (s === n - 1 ? "start" : "middle") : "end"},
      s ? "−" + (s === n - 1 ? n : s) + " s" : "now"));
  }
  parts.push(svg("text", {class: "axis", x: L + pw / 2, y: h - 4, "text-anchor": "middle"},
    "seconds before " + String(t.now).slice(11, 19) + " UTC"));
  parts.push(svg("text", {class: "axis", x: 12, y: T + ph / 2, "text-anchor": "middle",
    transform: "rotate(-90 12 " + (T + ph / 2) + ")"}, bin > 1 ? "events/s (" + bin + " s averages)" : "events/s"));
  lines.forEach((values, k) => {
    const points = values.map((v, j) => ago((values.length - 1 - j) * bin).toFixed(1) + "," + y(v).toFixed(1));
    parts.push(svg("polyline", {class: series[k].cls, points: points.join(" ")}));
  });
  chart.setAttribute("viewBox", "0 0 " + w + " " + h);
  chart.setAttribute("height", h);
  chart.replaceChildren(...parts);
  $("legend").replaceChildren(...series.map((s) => {
    const total = s.values.reduce((a, b) => a + b, 0);
    return el("li", "", el("span", "sw " + s.cls), s.name + ": " + count(total, "ops") + " in " + n + " s, peak " +
      count(Math.max(...s.values), "ops/s"));
  }));
}

const COLUMNS = {
  endpoint: (e) => e.endpoint, ops: (e) => e.ops, failures: (e) => e.failures,
  failure_rate: (e) => e.failure_rate, p50_ms: (e) => e.p50_ms ?? -1, p95_ms: (e) => e.p95_ms ?? -1,
};

for (const b of $("endpoints").querySelectorAll("button.sort")) {
  b.addEventListener("click", () => {
    const key = b.dataset.sort;
    sortBy = {key, desc: sortBy.key === key ? !sortBy.desc : key !== "endpoint"};
    showEndpoints();
  });
}

/* The endpoints are ranked over the ops of the last 5 minutes, or of the whole ring. */
$("endpoints-window").addEventListener("click", () => {
  endpointsWindow = endpointsWindow === "ring" ? ENDPOINTS_WINDOW : "ring";
  $("endpoints-window").textContent = endpointsWindow === "ring" ? "rank over the last " + ENDPOINTS_WINDOW
                                                                 : "rank over the whole ring";
  tick();
});

function showEndpoints() {
  $("endpoints-over").textContent = !timeline ? "" : timeline.endpoints_since
    ? "Over the ops of the ring stamped since " + when(timeline.endpoints_since) : "Over the ops in the ring";
  const get = COLUMNS[sortBy.key], dir = sortBy.desc ? -1 : 1;
  const rows = [...endpoints].sort((a, b) => {
    const p = get(a), q = get(b);
    return (p < q ? -1 : p > q ? 1 : 0) * dir || (a.endpoint < b.endpoint ? -1 : 1);
  });
  for (const th of $("endpoints").querySelectorAll("th")) {
    const key = th.querySelector("button").dataset.sort;
    th.setAttribute("aria-sort", key === sortBy.key ? (sortBy.desc ? "descending" : "ascending") : "none");
  }
  fill($("endpoints-body"), rows, {columns: [
    ["", (e) => endpointButton(e.endpoint)], ["n", (e) => count(e.ops)], ["n", (e) => count(e.failures)],
    ["n", (e) => pct(e.failure_rate)], ["n", (e) => ms(e.p50_ms)], ["n", (e) => ms(e.p95_ms)],
  ]}, timeline && timeline.endpoints_since ? "no ops in the last " + ENDPOINTS_WINDOW : "no ops in the ring");
}

function showClusters(clusters, analyzedAt) {
  $("clusters-note").textContent = analyzedAt ? "As the analysis at " + when(analyzedAt) + " found them."
                                              : "Not analysed yet.";
  fill($("clusters-body"), clusters, {columns: [
    ["", (c) => endpointButton(c.endpoint, true)], ["n", (c) => count(c.count)],
    ["", (c) => Object.entries(c.sources).map(([s, n]) => s + " " + n).join(", ")],
    ["t", (c) => when(c.last_seen)], ["w", (c) => c.signature],  /* whole: it is what to read here */
  ]}, "no failure clusters");
}

function showEscalations(escalations) {
  fill($("escalations-body"), escalations, {rowClass: (e) => (e.outcome === "sent" ? "" : "bad"), columns: [
    ["t", (e) => when(e.at)], ["", (e) => endpointButton(e.endpoint, true)], ["n", (e) => count(e.count)],
    ["", (e) => e.outcome], ["x", (e) => e.error || e.signature],
  ]}, "no escalations");
}

function showCorrections(corrections) {
  const bad = {"hurt": "bad", "no change": "warn", "helped": "ok"};
  fill($("corrections-body"), corrections, {columns: [
    ["t", (c) => when(c.timestamp)], ["", (c) => endpointButton(c.endpoint)],
    ["", (c) => el("span", bad[c.verdict] || "", c.verdict)],
    ["n", (c) => pct(c.before.failure_rate) + " → " + pct(c.after.failure_rate)],
    ["n", (c) => ms(c.before.p50_ms) + " → " + ms(c.after.p50_ms)],
    ["", (c) => (c.escalated ? "escalated" : "")],
  ]}, "no corrections judged");
}

function showPlaybooks(p) {
  fill($("playbooks-body"), p.playbooks, {columns: [
    ["", (b) => endpointButton(b.endpoint)], ["n", (b) => count(b.runs)], ["n", (b) => pct(b.success_rate)],
    ["n", (b) => ms(b.p50_duration_ms)], ["n", (b) => ms(b.p95_duration_ms)], ["t", (b) => when(b.last_failure) || "–"],
  ]}, "no scenario runs in the ring");
}

const OP_COLUMNS = {rowClass: (o) => (o.success === true ? "" : "f"), columns: [
  ["t", (o) => when(o.timestamp)], ["", (o) => o.source], ["", (o) => endpointButton(o.endpoint)],
  ["", (o) => (o.success === true ? "ok" : "FAIL")], ["n", (o) => ms(o.duration_ms)],
  ["x", (o) => o.error || o.output_summary || o.input_summary || ""],
]};

function showOps() {
  const where = $("f-endpoint").value.toLowerCase(), text = $("f-text").value.toLowerCase();
  const rows = ops.filter((o) => o.endpoint.toLowerCase().includes(where) &&
    (!text || [o.error, o.input_summary, o.output_summary].some((s) => typeof s === "string" && s.toLowerCase().includes(text))));
  $("ops-note").textContent = count(rows.length, "ops") + " shown of the newest " + count(ops.length, "ops") +
    " in the ring that match source and outcome; click an endpoint for its ops from the journal.";
  fill($("ops-body"), rows, OP_COLUMNS, "no ops match");
}

$("f-endpoint").addEventListener("input", showOps);
$("f-text").addEventListener("input", showOps);
$("f-source").addEventListener("change", tick);
$("f-failed").addEventListener("change", tick);
$("filters").addEventListener("submit", (ev) => ev.preventDefault());

async function openHistory(endpoint, failedOnly) {
  shown = {endpoint, failedOnly, cursor: null, ops: []};
  $("history").hidden = false;
  $("history-title").textContent = (failedOnly ? "Failed ops of " : "Ops of ") + endpoint + ", from the journal";
  $("history-body").replaceChildren();
  drawn.delete($("history-body"));
  $("history-title").focus();
  await loadHistory();
}

async function loadHistory() {
  const h = shown, q = new URLSearchParams({endpoint: exact(h.endpoint), limit: HISTORY_PAGE});
  if (h.failedOnly) q.set("failed", "true");
  if (h.cursor) q.set("cursor", h.cursor);
  $("history-older").disabled = true;
  try {
    const r = await api("history?" + q);
    if (shown !== h) return;
    h.cursor = r.cursor;
    h.ops.push(...r.ops);
    fill($("history-body"), h.ops, OP_COLUMNS, "no ops in the journal");
    $("history-note").textContent = count(h.ops.length, "ops") + ", newest first; last page read " +
      bytes(r.scanned_bytes) + " of journal" + (r.truncated ? " and stopped at its scan limit" : "") +
      (r.cursor ? "." : "; no older ops.");
    $("history-older").hidden = !r.cursor;
  } catch (e) {
    if (e.status === 401) return askToken();
    $("history-note").textContent = e.status ? e.message : "disconnected — press older to retry";
  } finally {
    $("history-older").disabled = false;
  }
}

$("history-older").addEventListener("click", loadHistory);
$("history-close").addEventListener("click", () => { shown = null; $("history").hidden = true; });

async function tick() {
  clearTimeout(timer);
  if (busy) { again = true; return; }
  if (needToken || document.hidden) return;
  busy = true;
  try {
    await refresh();
    updated = new Date().toLocaleTimeString();
    setConn("live, refreshed every " + EVERY_MS / 1000 + " s", "ok");
    $("conn").title = "last refreshed " + updated;
  } catch (e) {
    if (e.status === 401) askToken();
    else if (e.status) setConn(e.message + " — retrying", "bad");
    else if (e instanceof TypeError || e.name === "TimeoutError" || e.name === "AbortError") {
      setConn("disconnected — retrying" + (updated ? " (data from " + updated + ")" : ""), "bad");
    } else setConn("page error: " + e.message, "bad");
  } finally {
    busy = false;
    if (!needToken && !document.hidden) timer = setTimeout(tick, again ? 0 : EVERY_MS);
    again = false;
  }
}

document.addEventListener("visibilitychange", tick);
window.addEventListener("resize", () => timeline && drawChart(timeline));
tick();
""".replace("TIMELINE_SECONDS", str(TIMELINE_SECONDS)).replace(  # the whole window the daemon keeps
    "DEFAULT_ENDPOINTS_WINDOW", DEFAULT_ENDPOINTS_WINDOW)


def _ui_html(style: str, script: str) -> str:
    sources = "".join(f"<option>{source}</option>" for source in SOURCES)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>observerd</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<header>
<h1>observerd <small id="version"></small></h1>
<dl>
<div><dt>state</dt><dd id="ready">…</dd></div>
<div><dt>uptime</dt><dd id="uptime">…</dd></div>
<div><dt>journal</dt><dd id="journal">…</dd></div>
<div><dt>ring</dt><dd id="ring">…</dd></div>
<div><dt>fsync p99</dt><dd id="fsync">…</dd></div>
</dl>
<p id="conn" role="status">loading…</p>
</header>
<form id="auth" hidden>
<p id="auth-msg" role="alert"></p>
<label for="token">Bearer token</label>
<input id="token" type="password" autocomplete="off" required>
<button>Use this token</button>
<span class="note">kept in this tab only (sessionStorage)</span>
</form>
<main>
<section class="wide" id="history" hidden aria-labelledby="history-title">
<h2 id="history-title" tabindex="-1"></h2>
<p class="note" id="history-note"></p>
<div class="scroll"><table>
<thead><tr><th>time (as sent)</th><th>source</th><th>endpoint</th><th>outcome</th><th class="n">duration</th><th>error or summary</th></tr></thead>
<tbody id="history-body"></tbody></table></div>
<p><button type="button" id="history-older">older</button> <button type="button" id="history-close">close</button></p>
</section>
<section class="wide">
<h2>Events per second, last 5 minutes</h2>
<svg id="chart" role="img" aria-label="events per second by source and failures per second"></svg>
<ul id="legend"></ul>
<p class="note">In the ring: <b id="stat-total">…</b>, <span id="stat-ok">…</span>, <span id="stat-failed">…</span>; by source:</p>
<ul id="by-source" class="note"></ul>
</section>
<section>
<h2>Endpoints with the most failures</h2>
<div class="scroll"><table id="endpoints">
<thead><tr><th><button class="sort" data-sort="endpoint">endpoint</button></th>
<th class="n"><button class="sort" data-sort="ops">ops</button></th>
<th class="n"><button class="sort" data-sort="failures">failures (ops)</button></th>
<th class="n"><button class="sort" data-sort="failure_rate">failure rate</button></th>
<th class="n"><button class="sort" data-sort="p50_ms">p50 duration</button></th>
<th class="n"><button class="sort" data-sort="p95_ms">p95 duration</button></th></tr></thead>
<tbody id="endpoints-body"></tbody></table></div>
<p class="note"><span id="endpoints-over">Over the ops in the ring</span>
(<button type="button" class="link" id="endpoints-window">rank over the whole ring</button>);
click a header to sort, an endpoint for its ops from the journal.</p>
</section>
<section>
<h2>Failure clusters</h2>
<div class="scroll"><table>
<thead><tr><th>endpoint</th><th class="n">failures (ops)</th><th>sources (ops)</th><th>last seen</th><th>error signature</th></tr></thead>
<tbody id="clusters-body"></tbody></table></div>
<p class="note" id="clusters-note"></p>
</section>
<section>
<h2>Recent escalations</h2>
<div class="scroll"><table>
<thead><tr><th>time (UTC)</th><th>endpoint</th><th class="n">failures (ops)</th><th>outcome</th><th>error or signature</th></tr></thead>
<tbody id="escalations-body"></tbody></table></div>
</section>
<section>
<h2>Correction verdicts</h2>
<div class="scroll"><table>
<thead><tr><th>time (UTC)</th><th>endpoint</th><th>verdict</th><th class="n">failure rate before → after</th><th class="n">p50 before → after</th><th></th></tr></thead>
<tbody id="corrections-body"></tbody></table></div>
</section>
<section>
<h2>Playbooks</h2>
<div class="scroll"><table>
<thead><tr><th>scenario endpoint</th><th class="n">runs</th><th class="n">success rate</th><th class="n">p50 duration</th><th class="n">p95 duration</th><th>last failure</th></tr></thead>
<tbody id="playbooks-body"></tbody></table></div>
</section>
<section class="wide">
<h2>Recent ops</h2>
<form id="filters" role="search">
<label>endpoint contains <input id="f-endpoint" type="search"></label>
<label>source <select id="f-source"><option value="">any</option>{sources}</select></label>
<label><input id="f-failed" type="checkbox"> failed only</label>
<label>text in error or summary <input id="f-text" type="search"></label>
</form>
<p class="note" id="ops-note"></p>
<div class="scroll tall"><table>
<thead><tr><th>time (as sent)</th><th>source</th><th>endpoint</th><th>outcome</th><th class="n">duration</th><th>error or summary</th></tr></thead>
<tbody id="ops-body"></tbody></table></div>
</section>
</main>
<script>{script}</script>
</body>
</html>
"""


def csp_hash(text: str) -> str:
    """A CSP source that allows exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


_UI_PAGE = _ui_html(UI_STYLE, UI_SCRIPT).encode("utf-8")
UI_DOCUMENT = Document(_UI_PAGE, "text/html; charset=utf-8", {
    # The page may run its own script and style, fetch this origin's API, and nothing else.
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {csp_hash(UI_SCRIPT)}; style-src {csp_hash(UI_STYLE)}; "
        "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new observerd serves a new page
    "ETag": '"' + hashlib.sha256(_UI_PAGE).hexdigest()[:32] + '"',
})


if __name__ == "__main__":
    sys.exit(main())
