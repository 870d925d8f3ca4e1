# Trellis — the two commands a newcomer needs are `make run` and `make test`.
# Only cargo is required: protos are compiled by protox (no system protoc).

CARGO ?= cargo

.PHONY: all build run setup test fuzz-http lint fmt clean bench bench-supervisor bench-gateway bench-backends bench-peers bench-soak bench-chaos

all: build

## build: compile every crate and binary (trellis, trellis-memstore, …)
build:
	$(CARGO) build --workspace --bins

## run: start the proxy on its embedded default config (gRPC on 127.0.0.1:8980)
run: build
	./target/debug/trellis

## setup: find or install the servers the tests start privately
## (redis-server, nats-server, PostgreSQL, Prometheus); says exactly what is missing
setup:
	./scripts/setup-backends.sh

## test: unit tests and end-to-end tests against the real binaries
test: setup build
	$(CARGO) test --workspace --no-fail-fast

## fuzz-http: Schemathesis against the HTTP API with a random seed and more
## examples per operation than `make test` (which uses seed 1), so new cases
## keep being found; the seed is printed, and TRELLIS_SCHEMATHESIS_SEED=<it>
## replays a failing run
fuzz-http: setup build
	TRELLIS_SCHEMATHESIS_SEED=$${TRELLIS_SCHEMATHESIS_SEED:-random} \
	TRELLIS_SCHEMATHESIS_EXAMPLES=$${TRELLIS_SCHEMATHESIS_EXAMPLES:-300} \
	$(CARGO) test -p trellis-tests --test schemathesis

## bench: every benchmark (release build); prints figures beside same-run baselines
bench: bench-supervisor bench-gateway bench-backends bench-peers bench-soak bench-chaos

## bench-supervisor: crash detection, restart-to-serving, cold start, idle cost
bench-supervisor:
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p trellis-tests --bench supervisor

## bench-gateway: the same KV workload over HTTP/JSON and gRPC, side by side
bench-gateway:
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p trellis-tests --bench gateway

## lint: formatting and clippy, as CI would want them
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

## bench-backends: KV Get/Put straight to Redis/PostgreSQL vs through proxy → pattern
bench-backends:
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p trellis-tests --bench backends

## bench-peers: trellis as a gRPC hop beside nginx and HAProxy (installs h2load,
## nginx, haproxy via scripts/setup-peers.sh); Get latency and req/s vs direct
bench-peers:
	./scripts/setup-peers.sh
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p trellis-tests --bench peers

## bench-soak: leak and soak proof: 1,000,000 mixed calls (SOAK_CALLS=n for
## another count, SOAK_IN_FLIGHT=n for other than 32 in flight); prints the
## RSS/fds/tasks curve, PASS or FAIL (exit 1)
bench-soak:
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p trellis-tests --bench soak

## bench-chaos: random SIGKILLs of patterns and of private Redis/PostgreSQL/NATS
## under mixed load with policies on (CHAOS_SECS=120, CHAOS_SEED=n to replay,
## CHAOS_REDIS_REPLICAS=3 to run the redis pattern as three replicas);
## prints kills, outcomes by code and reason, lost writes, PASS or FAIL (exit 1);
## needs the servers `make setup` finds
bench-chaos:
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p trellis-tests --bench chaos
