"""The edge agent: plans, executor, durable state, providers (hypervisor adapters)."""
