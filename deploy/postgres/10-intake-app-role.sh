#!/usr/bin/env bash
# Create the role that web, worker and beat connect as (docker-compose.yml mounts this folder
# into /docker-entrypoint-initdb.d, so it runs once, when PostgreSQL initialises an empty
# volume). The role owns nothing: the migrate service connects as the owner (POSTGRES_USER)
# and, with INTAKE_DATABASE_APP_ROLE set, grants this role its privileges after every upgrade
# (see "Database roles" in docs/operations.md). On an existing volume, run the same SQL by hand.
set -euo pipefail
: "${POSTGRES_USER:?}" "${POSTGRES_DB:?}"
: "${POSTGRES_APP_PASSWORD:?set POSTGRES_APP_PASSWORD in .env}"
app_user=${POSTGRES_APP_USER:-intake_app}

# psql quotes the values itself (:"identifier", :'literal'), so any password is safe here.
psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set=app_user="$app_user" --set=app_password="$POSTGRES_APP_PASSWORD" \
  --set=db="$POSTGRES_DB" <<'SQL'
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password'
  NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
-- Only the owner and the app role may connect; nobody but the owner may create in public.
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO :"app_user";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
