"""Durable state: the sqlite file (state_file), its records (records), and
the queries and transactions over them (store)."""
