-- walship's outbox kit, range-partitioned by created_at into daily (UTC) partitions: an
-- alternative to sql/outbox.sql for keeping events in the table for a while and dropping whole
-- old days, which is far cheaper than DELETE plus VACUUM on a busy table.
--
--   psql -v ON_ERROR_STOP=1 -d app -f sql/outbox_partitioned.sql
--
-- Plain SQL, safe to run again; `walship init-sql --partitioned --schema NAME --publication NAME`
-- prints it for another schema or publication. Use this file or sql/outbox.sql, not both: both
-- create the table "outbox", and this one refuses to run over an unpartitioned one.
--
-- What it creates:
--   outbox                               the partitioned parent; the application and walship only
--                                        ever name this table
--   outbox_default                       catches rows no daily partition covers, so an insert never
--                                        fails because a partition is missing
--   outbox_pYYYYMMDD                     one partition per UTC day
--   outbox_create_partitions(first_day, days)   creates daily partitions ahead of time
--   outbox_drop_partitions_older_than(max_age)  retention: drops whole old daily partitions
--   outbox_emit(...)                     writes an event (same function as in sql/outbox.sql)
--   outbox_emit_message(...)             emits an event as a logical message (as in sql/outbox.sql)
--   the publication "walship_outbox", with publish_via_partition_root = true (see below)
--
-- Run both helpers daily, e.g. with pg_cron:
--   SELECT cron.schedule('walship-outbox', '0 3 * * *',
--     $$SELECT "public".outbox_create_partitions(); SELECT "public".outbox_drop_partitions_older_than('7 days')$$);
--
-- As with the plain table: walship reads inserts from the WAL, not the table, so dropping a
-- partition (or deleting rows) never affects what is published, and updates and deletes of
-- outbox rows are ignored by walship.

-- CREATE TABLE IF NOT EXISTS would silently keep an unpartitioned outbox and the partition
-- statements below would then fail with a less helpful message.
DO $walship$
BEGIN
    IF EXISTS (
        SELECT 1
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relname = 'outbox' AND c.relkind <> 'p'
    ) THEN
        RAISE EXCEPTION 'table %.outbox already exists and is not partitioned, so the partitioned outbox kit cannot be installed over it',
            quote_ident('public')
            USING HINT = 'keep using sql/outbox.sql (walship init-sql without --partitioned), or rename the table, run this again and copy the rows over';
    END IF;
END
$walship$;

-- A primary key (any unique constraint) of a partitioned table must include the partition key,
-- so it is (id, created_at); id alone stays unique in practice (gen_random_uuid) and remains
-- the consumers' dedup key.
CREATE TABLE IF NOT EXISTS "public".outbox (
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),  -- header "id": dedup key for consumers
    aggregatetype text        NOT NULL,                            -- topic: outbox.event.<aggregatetype>
    aggregateid   text        NOT NULL,                            -- record key: per-aggregate order
    type          text        NOT NULL,                            -- header "type"
    payload       jsonb,                                           -- record value; NULL = tombstone
    created_at    timestamptz NOT NULL DEFAULT now(),              -- partition key
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

-- Without a default partition, an insert for a day whose partition was not created yet fails,
-- and with it the application's business transaction. Creating partitions ahead keeps it empty;
-- rows that land here are published like any other but are never dropped by the retention
-- helper, and they make creating a partition for their day fail until they are moved.
CREATE TABLE IF NOT EXISTS "public".outbox_default PARTITION OF "public".outbox DEFAULT;

-- Creates the daily partitions first_day .. first_day + days - 1 (UTC days) that do not exist yet
-- and returns their names. The defaults cover today and the next 7 days; run it daily.
CREATE OR REPLACE FUNCTION "public".outbox_create_partitions(
    first_day date    DEFAULT (now() AT TIME ZONE 'UTC')::date,
    days      integer DEFAULT 8
) RETURNS SETOF text
LANGUAGE plpgsql
AS $walship$
DECLARE
    schema_name constant name := 'public';
    part_day  date;
    part_name name;
BEGIN
    IF first_day IS NULL OR days IS NULL OR days < 0 THEN
        RAISE EXCEPTION 'outbox_create_partitions(first_day => %, days => %): first_day must be a date and days zero or more',
            first_day, days;
    END IF;
    FOR i IN 0 .. days - 1 LOOP
        part_day := first_day + i;
        part_name := 'outbox_p' || to_char(part_day, 'YYYYMMDD');
        CONTINUE WHEN EXISTS (
            SELECT 1
            FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = schema_name AND c.relname = part_name
        );
        BEGIN
            -- UTC day boundaries, so the partitioning does not depend on the session's TimeZone.
            EXECUTE format(
                'CREATE TABLE %I.%I PARTITION OF %I.outbox FOR VALUES FROM (%L) TO (%L)',
                schema_name, part_name, schema_name,
                part_day::timestamp AT TIME ZONE 'UTC',
                (part_day + 1)::timestamp AT TIME ZONE 'UTC');
        EXCEPTION WHEN check_violation THEN
            -- Re-inserting the rows through the parent would publish those events again, out of
            -- order; building the partition beside the table and attaching it publishes nothing.
            RAISE EXCEPTION 'cannot create partition %.% for % (UTC): outbox_default holds rows of that day',
                quote_ident(schema_name), quote_ident(part_name), part_day
                USING HINT = format(
                    'move them into the new partition without publishing them again: '
                    'BEGIN; CREATE TABLE %1$I.%2$I (LIKE %1$I.outbox INCLUDING ALL); '
                    'INSERT INTO %1$I.%2$I SELECT * FROM %1$I.outbox_default WHERE created_at >= %3$L AND created_at < %4$L; '
                    'DELETE FROM %1$I.outbox_default WHERE created_at >= %3$L AND created_at < %4$L; '
                    'ALTER TABLE %1$I.outbox ATTACH PARTITION %1$I.%2$I FOR VALUES FROM (%3$L) TO (%4$L); COMMIT;',
                    schema_name, part_name,
                    part_day::timestamp AT TIME ZONE 'UTC',
                    (part_day + 1)::timestamp AT TIME ZONE 'UTC');
        END;
        RETURN NEXT format('%I.%I', schema_name, part_name);
    END LOOP;
END
$walship$;

-- Retention: drops the partitions of outbox that hold only rows older than max_age, that is whose
-- upper bound is at or before now() - max_age, oldest first, and returns their names. A partition
-- that reaches past the cutoff is kept whole, so nothing younger than max_age is ever dropped;
-- the default partition is never dropped. Dropping a partition briefly locks the parent table
-- (ACCESS EXCLUSIVE), so writers wait for it: run it when traffic is low.
CREATE OR REPLACE FUNCTION "public".outbox_drop_partitions_older_than(max_age interval)
RETURNS SETOF text
LANGUAGE plpgsql
AS $walship$
DECLARE
    schema_name constant name := 'public';
    cutoff constant timestamptz := now() - max_age;
    part record;
BEGIN
    IF max_age IS NULL OR max_age < interval '0' THEN
        RAISE EXCEPTION 'outbox_drop_partitions_older_than(%): max_age must be zero or more, e.g. interval ''7 days''',
            coalesce(max_age::text, 'NULL');
    END IF;
    FOR part IN
        SELECT pn.nspname AS part_schema, c.relname AS part_name
        FROM pg_inherits i
        JOIN pg_class parent ON parent.oid = i.inhparent
        JOIN pg_namespace n ON n.oid = parent.relnamespace
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_namespace pn ON pn.oid = c.relnamespace
        -- The upper bound from the partition's definition; NULL for DEFAULT and MAXVALUE, which
        -- are therefore never dropped.
        CROSS JOIN LATERAL (
            SELECT (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper_bound
        ) b
        WHERE n.nspname = schema_name AND parent.relname = 'outbox' AND b.upper_bound <= cutoff
        ORDER BY b.upper_bound
    LOOP
        EXECUTE format('DROP TABLE %I.%I', part.part_schema, part.part_name);
        RETURN NEXT format('%I.%I', part.part_schema, part.part_name);
    END LOOP;
END
$walship$;

-- The publication walship streams from (walship's postgres.publication), inserts only.
-- publish_via_partition_root = true is required: without it, rows are published as rows of the
-- partition they landed in (outbox_p20250101, ...), which walship does not recognise as the
-- outbox, so every event would be silently skipped. With it, they are published as rows of the
-- parent "outbox", and new partitions need no publication change.
DO $walship$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'walship_outbox') THEN
        CREATE PUBLICATION "walship_outbox" FOR TABLE "public".outbox
            WITH (publish = 'insert', publish_via_partition_root = true);
    ELSE
        IF NOT EXISTS (
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
        IF NOT (SELECT pubviaroot FROM pg_publication WHERE pubname = 'walship_outbox') THEN
            ALTER PUBLICATION "walship_outbox" SET (publish_via_partition_root = true);
        END IF;
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

-- Today and the next 7 days, so events written right after installation land in a daily
-- partition rather than the default one.
DO $walship$
BEGIN
    PERFORM "public".outbox_create_partitions();
END
$walship$;
