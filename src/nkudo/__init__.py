"""nkudo: edge host agent and control plane for Cloud Hypervisor microVMs."""

__version__ = "0.1.0"
