//! Identity: IP and cgroup -> pod, workload, service, node.
