//! Kubernetes manifests (YAML files and directories) as typed objects.
