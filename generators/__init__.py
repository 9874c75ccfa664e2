"""The hands: one file per generator backend, registered by (task, name)."""
