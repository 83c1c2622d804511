"""nkudo control plane: tenants, sites, enrollment, agent mTLS API, plans and executions."""
