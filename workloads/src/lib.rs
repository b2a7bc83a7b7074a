//! Real jobs on Particle (video pipeline, all-to-all exchange). Not built yet: see the workload issue.
