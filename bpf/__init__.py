"""The eBPF C sources the daemon compiles with bcc at start (package data)."""
