"""Hypervisor adapters implementing :class:`nkudo.agent.provider.Provider`."""
