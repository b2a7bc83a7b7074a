//! The control plane (nodes, tenants, address blocks, placement, burst launch API). Not built yet: see the overlay/cluster issue.
