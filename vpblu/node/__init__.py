"""Daemon-side actors: each owns one kernel resource of the node."""
