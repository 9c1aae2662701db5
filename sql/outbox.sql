-- walship's outbox kit: the outbox table, the publication walship streams from,
-- outbox_emit(), which writes an event in the caller's transaction from any language, and
-- outbox_emit_message(), which emits one as a logical decoding message instead (no table row).
--
--   psql -v ON_ERROR_STOP=1 -d app -f sql/outbox.sql
--
-- Plain SQL, safe to run again. `walship init-sql --schema NAME --publication NAME` prints this
-- file for another schema or publication; `walship init-sql --partitioned` prints the
-- range-partitioned variant (sql/outbox_partitioned.sql), for keeping events and dropping old
-- days instead of deleting rows.
--
-- Write one outbox row per event in the same transaction as the business change it describes.
-- walship does not read this table: it decodes committed inserts from the WAL through a logical
-- replication slot and the publication below. Two consequences:
--   * Updates and deletes of outbox rows are ignored by walship (the publication does not even
--     publish them), so rows can be cleaned up at any time without effect on Kafka.
--   * A row deleted right after its insert, even in the same transaction, is still published:
--     the insert is in the WAL. That is the insert-then-delete pattern (outbox_emit's
--     delete_after): the table stays empty and needs no cleanup job.
-- The slot only sees transactions that commit after it exists: start walship once (it creates
-- the slot) before the application writes events.

CREATE TABLE IF NOT EXISTS "public".outbox (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),  -- header "id": dedup key for consumers
    aggregatetype text        NOT NULL,                               -- topic: outbox.event.<aggregatetype>
    aggregateid   text        NOT NULL,                               -- record key: per-aggregate order
    type          text        NOT NULL,                               -- header "type"
    payload       jsonb,                                              -- record value; NULL = tombstone
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- The publication walship streams from (walship's postgres.publication). Inserts only: walship
-- ignores updates and deletes, so publishing them would only make the walsender decode and send
-- changes that are thrown away. CREATE PUBLICATION has no IF NOT EXISTS; the block makes re-runs
-- harmless and adds the table to a publication that exists without it.
DO $walship$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'walship_outbox') THEN
        CREATE PUBLICATION "walship_outbox" FOR TABLE "public".outbox WITH (publish = 'insert');
    ELSIF NOT EXISTS (
        SELECT 1
        FROM pg_publication p
        WHERE p.pubname = 'walship_outbox'
          AND (p.puballtables OR EXISTS (
                SELECT 1
                FROM pg_publication_rel r
                JOIN pg_class c ON c.oid = r.prrelid
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE r.prpubid = p.oid AND n.nspname = 'public' AND c.relname = 'outbox'))
    ) THEN
        ALTER PUBLICATION "walship_outbox" ADD TABLE "public".outbox;
    END IF;
END
$walship$;

-- Writes one event in the caller's transaction and returns its id (the Kafka header "id").
-- A function rather than an INSERT so applications in any language, and triggers, write events
-- the same way without knowing the table's layout:
--
--   BEGIN;
--   UPDATE orders SET status = 'paid' WHERE id = 42;
--   SELECT "public".outbox_emit('order', '42', 'OrderPaid', '{"id": 42, "status": "paid"}');
--   COMMIT;
--
-- delete_after => true deletes the row again at once (insert-then-delete): the event is still
-- published, because walship reads the insert from the WAL, and the table stays empty.
-- The caller needs INSERT on the table (and DELETE for delete_after): the function runs with the
-- caller's rights, so it grants nothing the caller did not have.
CREATE OR REPLACE FUNCTION "public".outbox_emit(
    aggregatetype text,
    aggregateid   text,
    type          text,
    payload       jsonb,
    delete_after  boolean DEFAULT false
) RETURNS uuid
LANGUAGE plpgsql
AS $walship$
DECLARE
    event_id   uuid;
    event_time timestamptz;
BEGIN
    -- Parameters share the columns' names (so callers can use named notation with the column
    -- names); qualifying them with the function name keeps them apart from the columns.
    INSERT INTO "public".outbox (aggregatetype, aggregateid, type, payload)
    VALUES (outbox_emit.aggregatetype, outbox_emit.aggregateid, outbox_emit.type, outbox_emit.payload)
    RETURNING id, created_at INTO event_id, event_time;
    IF delete_after THEN
        -- created_at lets a partitioned outbox prune to the one partition holding the row.
        DELETE FROM "public".outbox WHERE id = event_id AND created_at = event_time;
    END IF;
    RETURN event_id;
END
$walship$;

COMMENT ON FUNCTION "public".outbox_emit(text, text, text, jsonb, boolean) IS
    'Writes one outbox event in the current transaction and returns its id; delete_after deletes the row at once (walship still publishes it: it reads the WAL).';

-- Emits one event as a transactional logical decoding message instead of a row, and returns its
-- id (the Kafka header "id"): the table-free outbox. walship publishes it when its prefix is in
-- walship's outbox.message_prefixes (e.g. message_prefixes = ["outbox"]), with the same
-- guarantees as a row: only if the transaction commits, in WAL order with the transaction's
-- rows, keyed by aggregateid. Nothing is stored in a table, so there is nothing to clean up;
-- the event exists only in the WAL until walship's slot has passed it.
--
--   BEGIN;
--   UPDATE orders SET status = 'paid' WHERE id = 42;
--   SELECT "public".outbox_emit_message('order', '42', 'OrderPaid', '{"id": 42, "status": "paid"}');
--   COMMIT;
--
-- The content is a JSON object with the outbox table's column names as fields (walship reads
-- them under the names configured for the columns); a NULL payload is a tombstone. Any role may
-- call pg_logical_emit_message (PostgreSQL grants it to PUBLIC), and the function runs with
-- the caller's rights.
CREATE OR REPLACE FUNCTION "public".outbox_emit_message(
    aggregatetype text,
    aggregateid   text,
    type          text,
    payload       jsonb,
    id            uuid DEFAULT gen_random_uuid(),
    prefix        text DEFAULT 'outbox'
) RETURNS uuid
LANGUAGE plpgsql
AS $walship$
BEGIN
    -- true: transactional. A non-transactional message would be sent even if the transaction
    -- rolled back; walship refuses those (outbox.on_bad_row).
    PERFORM pg_logical_emit_message(true, outbox_emit_message.prefix, jsonb_build_object(
        'id', outbox_emit_message.id,
        'aggregatetype', outbox_emit_message.aggregatetype,
        'aggregateid', outbox_emit_message.aggregateid,
        'type', outbox_emit_message.type,
        'payload', outbox_emit_message.payload)::text);
    RETURN outbox_emit_message.id;
END
$walship$;

COMMENT ON FUNCTION "public".outbox_emit_message(text, text, text, jsonb, uuid, text) IS
    'Emits one outbox event as a transactional logical decoding message (no table row) and returns its id; walship publishes it when the prefix is in outbox.message_prefixes.';
