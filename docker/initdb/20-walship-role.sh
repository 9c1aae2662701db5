#!/usr/bin/env bash
# PostgreSQL container init script (docker-entrypoint-initdb.d; runs once, on an empty data
# directory, after 10-outbox.sql). Creates walship's login role with only what walship needs, as
# `walship init-sql --role walship` prints it: REPLICATION; SELECT on the outbox (for `walship
# check`; streaming needs none); and the slot history table, which walship could not create
# itself (PostgreSQL 15+ gives no role CREATE on public), with the rights to record its slot in
# it, so a dropped slot is refused rather than silently re-created (G6). The SQL kit already
# created the publication as the table owner. The password comes from WALSHIP_PG_PASSWORD, never
# a file, and reaches psql through \getenv rather than its command line, which any process can
# read.
#
# The entrypoint sources or executes this file depending on its mode, so it changes no shell
# options and does not exit; a failing psql still aborts initialisation (ON_ERROR_STOP and the
# entrypoint's own `set -e`).
: "${WALSHIP_PG_PASSWORD:?must be set: it becomes the password of the walship role}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v role="${WALSHIP_PG_USER:-walship}" <<'SQL'
\getenv password WALSHIP_PG_PASSWORD
SELECT format(
    CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role')
         THEN 'ALTER ROLE %I LOGIN REPLICATION PASSWORD %L'
         ELSE 'CREATE ROLE %I LOGIN REPLICATION PASSWORD %L' END,
    :'role', :'password') \gexec
GRANT SELECT ON public.outbox TO :"role";
CREATE TABLE IF NOT EXISTS public.walship_slots (slot_name text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(), created_lsn pg_lsn);
GRANT SELECT, INSERT, UPDATE ON public.walship_slots TO :"role";
SQL
