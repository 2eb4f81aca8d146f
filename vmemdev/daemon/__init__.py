"""The Trio shell: sockets, fds, tasks, signals and systemd (see ARCHITECTURE.md)."""
