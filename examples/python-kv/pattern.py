"""A Trellis KeyValue pattern in Python: an in-memory store, written from
docs/pattern-protocol.md alone. Run it through ./trellis-python-kv, which
generates the gRPC stubs and then execs this file.

The protocol, in the order this file follows it:
  1. read TRELLIS_PATTERN_LISTEN and bind it (unix:/path by default under
     the proxy); take TRELLIS_PATTERN_SECRET out of the environment and
     refuse every call that does not carry it (UNAUTHENTICATED);
  2. write the handshake line on stdout, log only to stderr;
  3. serve Lifecycle, grpc.health.v1.Health and trellis.data.v1.KeyValue;
  4. NOT_SERVING until Start, SERVING after, NOT_SERVING once stopping;
  5. on Stop, SIGTERM or SIGINT: drain within the grace period, exit 0.
"""

import base64
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from concurrent import futures

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from trellis.data.v1 import keyvalue_pb2, keyvalue_pb2_grpc
from trellis.pattern.v1 import lifecycle_pb2, lifecycle_pb2_grpc

IMPLEMENTATION = "python-kv"
VERSION = "0.1.0"
PROTOCOL = 1
KEY_VALUE = "trellis.data.v1.KeyValue"

# The limits every KeyValue pattern enforces (docs/pattern-protocol.md,
# "Validation a pattern owns"): the proxy forwards requests unchecked.
MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_PAGE_BYTES = 3 * 1024 * 1024  # a page must fit a 4 MiB gRPC message
MAX_TTL_SECONDS = 315_576_000_000  # the range of google.protobuf.Duration
DEFAULT_GRACE = 5.0  # seconds to drain on SIGTERM/SIGINT

log = logging.getLogger(IMPLEMENTATION)


class Lines(logging.Formatter):
    """One line per record. As JSON (TRELLIS_LOG_FORMAT=json) the proxy reads
    `level` (ERROR, WARN, INFO, DEBUG, TRACE) and `fields.message`, and shows
    the other `fields` beside it."""

    def __init__(self, as_json):
        super().__init__()
        self.as_json = as_json

    def format(self, record):
        fields = getattr(record, "fields", {})
        level = "WARN" if record.levelname == "WARNING" else record.levelname
        if self.as_json:
            return json.dumps({"timestamp": self.formatTime(record), "level": level,
                               "target": IMPLEMENTATION,
                               "fields": {"message": record.getMessage(), **fields}})
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        return f"{self.formatTime(record)} {level} {record.getMessage()}{extra}"


def setup_logging():
    handler = logging.StreamHandler(sys.stderr)  # stdout is the proxy's
    handler.setFormatter(Lines(os.environ.get("TRELLIS_LOG_FORMAT") == "json"))
    logging.basicConfig(level=os.environ.get("PYTHON_KV_LOG_LEVEL", "INFO"), handlers=[handler])


class Invalid(Exception):
    """A request or config field is wrong: INVALID_ARGUMENT naming it."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")


class Store:
    """Namespace -> key -> (value, expires_at or None). Expired keys are
    treated as absent and dropped when met."""

    def __init__(self, max_keys):
        self.max_keys = max_keys
        self.data = {}
        self.lock = threading.Lock()

    def _live(self, ns, key, now):
        entry = self.data.get(ns, {}).get(key)
        if entry is not None and entry[1] is not None and entry[1] <= now:
            del self.data[ns][key]
            return None
        return entry

    def get(self, ns, key):
        with self.lock:
            entry = self._live(ns, key, time.monotonic())
            return None if entry is None else entry[0]

    def put(self, ns, key, value, ttl):
        now = time.monotonic()
        with self.lock:
            keys = self.data.setdefault(ns, {})
            if self._live(ns, key, now) is None and self.max_keys is not None:
                if self._count() >= self.max_keys:
                    self._drop_expired(now)  # full: expired keys make room
                    if self._count() >= self.max_keys:
                        return False
            keys[key] = (value, None if ttl is None else now + ttl)
            return True

    def _count(self):
        return sum(len(keys) for keys in self.data.values())

    def _drop_expired(self, now):
        for keys in self.data.values():
            for key in [k for k, (_, expires) in keys.items() if expires and expires <= now]:
                del keys[key]

    def delete(self, ns, key):
        with self.lock:
            if self._live(ns, key, time.monotonic()) is None:
                return False
            del self.data[ns][key]
            return True

    def list(self, ns, prefix, after, page_size):
        """Keys > `after` starting with `prefix`, ascending. Python orders
        str by code point, which is the UTF-8 byte order the contract asks."""
        now = time.monotonic()
        with self.lock:
            keys = sorted(k for k in list(self.data.get(ns, {})) if k.startswith(prefix)
                          and (after is None or k > after) and self._live(ns, k, now))
            entries, size = [], 0
            for key in keys:
                value = self.data[ns][key][0]
                if len(entries) == page_size or (
                        entries and size + len(key.encode()) + len(value) > MAX_PAGE_BYTES):
                    return entries, True
                size += len(key.encode()) + len(value)
                entries.append((key, value))
            return entries, False


# Page tokens: the last key returned and the prefix, so a token is opaque to
# the caller, resumes after that key (keys added meanwhile are not skipped)
# and cannot be replayed against another prefix.
def make_token(prefix, last_key):
    raw = json.dumps({"p": prefix, "k": last_key}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def read_token(token, prefix):
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()).decode())
        if decoded["p"] == prefix and isinstance(decoded["k"], str):
            return decoded["k"]
    except (ValueError, KeyError, TypeError):
        pass
    raise Invalid("page_token", "is not a token this pattern returned for this prefix; pass "
                  "next_page_token from the previous page, or empty for the first page")


def check_key(ns, key):
    if not ns:
        raise Invalid("namespace", "must not be empty")
    if not key:
        raise Invalid("key", "must not be empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise Invalid("key", f"is {len(key.encode())} bytes, the limit is {MAX_KEY_BYTES}")
    if "\0" in key:
        raise Invalid("key", "contains a NUL character; remove it")


def check_ttl(request):
    """Absent or zero: never expires (None); otherwise seconds as a float."""
    if not request.HasField("ttl"):
        return None
    total_nanos = request.ttl.seconds * 1_000_000_000 + request.ttl.nanos
    if total_nanos < 0:
        raise Invalid("ttl", "must not be negative; omit it, or send 0, for no expiry")
    if request.ttl.seconds > MAX_TTL_SECONDS:
        raise Invalid("ttl", f"is longer than the limit of {MAX_TTL_SECONDS}s")
    return total_nanos / 1e9 if total_nanos else None


class Pattern:
    """Where the pattern is in its life: waiting -> initialized -> started
    -> stopping. Data calls are served only while started."""

    def __init__(self, name):
        self.name = name
        self.phase = "waiting"
        self.store = None
        self.health = health.HealthServicer()
        for service in ("", KEY_VALUE):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.stop_requested = threading.Event()
        self.grace = DEFAULT_GRACE

    def request_stop(self, grace, why):
        if not self.stop_requested.is_set():
            log.info("shutting down", extra={"fields": {"reason": why, "grace_s": grace}})
            self.grace = grace
            self.stop_requested.set()

    def serving(self, context):
        if self.phase != "started":
            what = "is shutting down" if self.phase == "stopping" else "is not started yet"
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"pattern {self.name!r} {what}; retry shortly")
        return self.store


def read_config(config):
    """The `config:` block. Numbers arrive as doubles (YAML `3` is 3.0)."""
    unknown = set(config) - {"max_keys"}
    if unknown:
        raise Invalid(f"config.{sorted(unknown)[0]}", "is not a setting of python-kv; "
                      "the only one is max_keys")
    max_keys = config.get("max_keys")
    if max_keys is not None and (not isinstance(max_keys, float) or max_keys != int(max_keys)
                                 or max_keys < 1):
        raise Invalid("config.max_keys", f"must be a whole number of at least 1, got {max_keys!r}")
    return None if max_keys is None else int(max_keys)


class Lifecycle(lifecycle_pb2_grpc.LifecycleServicer):
    def __init__(self, pattern):
        self.p = pattern

    def Initialize(self, request, context):
        p = self.p
        if request.protocol_version != PROTOCOL:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the proxy speaks pattern protocol {request.protocol_version}, "
                          f"python-kv speaks {PROTOCOL}")
        if p.phase != "waiting":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "Initialize was already called; restart the pattern to reconfigure")
        try:
            max_keys = read_config(json_format.MessageToDict(request.config))
        except Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        p.name = request.name or p.name
        p.store = Store(max_keys)
        p.phase = "initialized"
        log.info("initialized", extra={"fields": {"pattern": p.name, "max_keys": max_keys}})
        # Its data lives in this process: replicas of it would not share it.
        return lifecycle_pb2.InitializeResponse(name=IMPLEMENTATION, version=VERSION,
                                                interfaces=[KEY_VALUE], stateful=True)

    def Start(self, request, context):
        p = self.p
        if p.phase not in ("initialized", "started"):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"Start in phase {p.phase}; call Initialize first")
        p.phase = "started"
        for service in ("", KEY_VALUE):
            p.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("started; health SERVING")
        return lifecycle_pb2.StartResponse()

    def Stop(self, request, context):
        # Reply first, then drain: the proxy waits for the exit after this.
        grace = DEFAULT_GRACE
        if request.HasField("grace"):
            grace = max(0.0, request.grace.seconds + request.grace.nanos / 1e9)
        self.p.request_stop(grace, "Lifecycle/Stop")
        return lifecycle_pb2.StopResponse()

    def Metrics(self, request, context):
        # Optional; UNIMPLEMENTED means "no metrics", which is no error.
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "python-kv exports no metrics")


class KeyValue(keyvalue_pb2_grpc.KeyValueServicer):
    def __init__(self, pattern):
        self.p = pattern

    def _call(self, context, op):
        store = self.p.serving(context)
        try:
            return op(store)
        except Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def Get(self, request, context):
        def op(store):
            check_key(request.namespace, request.key)
            value = store.get(request.namespace, request.key)
            if value is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"key {request.key!r} not found "
                              f"in namespace {request.namespace!r}")
            return keyvalue_pb2.GetResponse(value=value)
        return self._call(context, op)

    def Put(self, request, context):
        def op(store):
            check_key(request.namespace, request.key)
            if len(request.value) > MAX_VALUE_BYTES:
                raise Invalid("value", f"is {len(request.value)} bytes, the limit is "
                              f"{MAX_VALUE_BYTES} (1 MiB)")
            ttl = check_ttl(request)
            if not store.put(request.namespace, request.key, request.value, ttl):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the store holds its max_keys ({store.max_keys}) keys; "
                              "delete some or raise config.max_keys")
            return keyvalue_pb2.PutResponse()
        return self._call(context, op)

    def Delete(self, request, context):
        def op(store):
            check_key(request.namespace, request.key)
            return keyvalue_pb2.DeleteResponse(deleted=store.delete(request.namespace,
                                                                    request.key))
        return self._call(context, op)

    def List(self, request, context):
        def op(store):
            if not request.namespace:
                raise Invalid("namespace", "must not be empty")
            if request.page_size < 0:
                raise Invalid("page_size", f"must not be negative (got {request.page_size}); "
                              f"send 0 for the default of {DEFAULT_PAGE_SIZE}")
            size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            after = read_token(request.page_token, request.prefix) if request.page_token else None
            entries, more = store.list(request.namespace, request.prefix, after, size)
            token = make_token(request.prefix, entries[-1][0]) if more else ""
            return keyvalue_pb2.ListResponse(
                entries=[keyvalue_pb2.Entry(key=k, value=v) for k, v in entries],
                next_page_token=token)
        return self._call(context, op)


def remove_stale_socket(path):
    """A socket file nobody listens on is left from an earlier run: remove
    it. A live socket, or a file that is not a socket, is left alone (the
    bind then fails and says so)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)


class RequireSecret(grpc.ServerInterceptor):
    """Refuses every call (lifecycle, health and data alike) whose
    trellis-pattern-secret metadata is not the secret the proxy gave this
    process, with UNAUTHENTICATED. hmac.compare_digest compares in constant
    time, so response times tell nothing about the secret."""

    HEADER = "trellis-pattern-secret"

    def __init__(self, secret):
        self._secret = secret.encode()

        def refuse(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "this pattern answers only the proxy that started it")

        self._refuse = {
            (False, False): grpc.unary_unary_rpc_method_handler(refuse),
            (False, True): grpc.unary_stream_rpc_method_handler(refuse),
            (True, False): grpc.stream_unary_rpc_method_handler(refuse),
            (True, True): grpc.stream_stream_rpc_method_handler(refuse),
        }

    def intercept_service(self, continuation, details):
        presented = dict(details.invocation_metadata).get(self.HEADER, "")
        if isinstance(presented, str):
            presented = presented.encode()
        handler = continuation(details)
        if hmac.compare_digest(presented, self._secret):
            return handler
        if handler is None:  # an unknown method: refused all the same
            return self._refuse[(False, False)]
        return self._refuse[(handler.request_streaming, handler.response_streaming)]


def take_secret():
    """TRELLIS_PATTERN_SECRET, removed from the environment so that no
    child process this pattern starts inherits it."""
    return os.environ.pop("TRELLIS_PATTERN_SECRET", "") or None


def main():
    setup_logging()
    secret = take_secret()
    if os.environ.get("TRELLIS_PATTERN_PROTOCOL", str(PROTOCOL)) != str(PROTOCOL):
        log.warning("the proxy speaks another pattern protocol; it will likely reject this one")
    listen = os.environ.get("TRELLIS_PATTERN_LISTEN", "127.0.0.1:0")
    pattern = Pattern(os.environ.get("TRELLIS_PATTERN_NAME", IMPLEMENTATION))

    # Installed before the handshake, so a signal right after it drains cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: pattern.request_stop(
            DEFAULT_GRACE, signal.Signals(signum).name))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         interceptors=[RequireSecret(secret)] if secret else [])
    lifecycle_pb2_grpc.add_LifecycleServicer_to_server(Lifecycle(pattern), server)
    health_pb2_grpc.add_HealthServicer_to_server(pattern.health, server)
    keyvalue_pb2_grpc.add_KeyValueServicer_to_server(KeyValue(pattern), server)

    socket_path = listen[len("unix:"):] if listen.startswith("unix:") else None
    if not socket_path:
        try:  # the handshake must name an IP: no host names
            ipaddress.ip_address(listen.rsplit(":", 1)[0].strip("[]"))
        except ValueError:
            log.error(f"TRELLIS_PATTERN_LISTEN={listen!r} is not IP:port nor unix:/path")
            return 1
    if socket_path:
        socket_path = os.path.abspath(socket_path)
        remove_stale_socket(socket_path)
    try:
        port, why = server.add_insecure_port(f"unix:{socket_path}" if socket_path else listen), ""
    except RuntimeError as e:  # grpcio raises when the address cannot be bound
        port, why = None, f": {e}"
    if port is None or (not socket_path and port == 0):
        log.error(f"cannot listen on TRELLIS_PATTERN_LISTEN={listen!r}{why}; "
                  "use an IP:port (127.0.0.1:0 lets the kernel pick) or unix:/path")
        return 1
    server.start()

    if socket_path:
        handshake = f"TRELLIS|{PROTOCOL}|unix|{socket_path}|grpc"
    else:
        host = listen.rsplit(":", 1)[0]  # an IP literal; IPv6 keeps its [brackets]
        handshake = f"TRELLIS|{PROTOCOL}|tcp|{host}:{port}|grpc"
    sys.stdout.write(handshake + "\n")
    sys.stdout.flush()
    log.info("listening", extra={"fields": {"pattern": pattern.name, "endpoint": handshake}})

    # The main thread only waits; signals are handled here, between waits.
    while not pattern.stop_requested.wait(timeout=1.0):
        pass
    pattern.phase = "stopping"
    pattern.health.enter_graceful_shutdown()  # NOT_SERVING for good
    server.stop(pattern.grace).wait()  # in-flight calls get the grace period
    if socket_path and os.path.exists(socket_path):
        os.unlink(socket_path)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
