//! The per-node agent (pools, overlay devices, local API, warm connections). Not built yet: see the overlay/cluster issue.
