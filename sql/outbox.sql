-- The outbox table walship reads, with Debezium's column names (walship's defaults).
--
-- Write one row per event in the same transaction as the business change it describes.
-- walship publishes rows as they are committed; updates and deletes of outbox rows are ignored,
-- so you may delete rows right after inserting them (even in the same transaction) and the
-- table stays empty: the event still reaches Kafka, because walship reads the WAL, not the table.
CREATE TABLE IF NOT EXISTS outbox (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),  -- header "id": dedup key for consumers
    aggregatetype text        NOT NULL,                               -- topic: outbox.event.<aggregatetype>
    aggregateid   text        NOT NULL,                               -- record key: per-aggregate order
    type          text        NOT NULL,                               -- header "type"
    payload       jsonb,                                              -- record value; NULL = tombstone
    created_at    timestamptz NOT NULL DEFAULT now()
);
