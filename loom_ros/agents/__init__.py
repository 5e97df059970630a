"""Agents: stateful actors with a mailbox, persisted state and a pluggable behavior."""
