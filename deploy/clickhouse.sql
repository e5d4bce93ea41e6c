-- The table deploy/vector.toml fills: one row per journal line, from every host.
-- UNTESTED here: no ClickHouse on the machines this was written on (see docs/scaling-out.md).
CREATE DATABASE IF NOT EXISTS observerd;

CREATE TABLE IF NOT EXISTS observerd.ops
(
    host        LowCardinality(String),
    timestamp   DateTime64(6, 'UTC'),
    op_id       String DEFAULT '',      -- '' when the client sent none
    endpoint    LowCardinality(String),
    source      LowCardinality(String),
    success     Bool,
    duration_ms Float64,
    error       String DEFAULT '',
    line        String CODEC(ZSTD(3))   -- the op as observerd stored it, every field
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (endpoint, timestamp)
TTL toDateTime(timestamp) + INTERVAL 180 DAY;
