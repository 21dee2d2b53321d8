"""Persistence: accounts, keys, and the ledger behind one interface (store.base.Store)."""
