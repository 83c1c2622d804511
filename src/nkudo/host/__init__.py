"""Host probes: KVM, syscalls, preflight checks and host facts (read-only)."""
