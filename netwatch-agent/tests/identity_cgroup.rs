//! A socket's cgroup names its pod and container, including hostNetwork pods
//! whose IP only names the node: a cgroup tree laid out as the kubelet and
//! containerd lay it out (plain directories under a temporary root, real
//! inode numbers as cgroup ids), resolved through the identity cache.

use std::{fs, net::IpAddr, os::unix::fs::MetadataExt, time::SystemTime};

use k8s_openapi::api::core::v1::{Node, Pod};
use netwatch::{
    cluster::ClusterSnapshot,
    identity::{CgroupIndex, ContainerRuntime, IdentityCache, IdentityConfig, ReservedIdentity},
};
use serde_json::json;

const UID: &str = "5f0c2a4e-8d3b-4e61-9a7c-2b1d0e9f8a76";
const CONTAINER: &str = "8c1e0b7a9d6f5e4c3b2a19087f6e5d4c3b2a19087f6e5d4c3b2a19087f6e5d4c";

#[test]
fn host_network_pod_resolves_by_cgroup_while_its_ip_names_the_node() {
    let root = tempfile::tempdir().unwrap();
    let scope = root
        .path()
        .join("kubepods.slice/kubepods-burstable.slice")
        .join(format!(
            "kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        ))
        .join(format!("cri-containerd-{CONTAINER}.scope"));
    fs::create_dir_all(&scope).unwrap();
    let cgroup_id = fs::metadata(&scope).unwrap().ino();

    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "node-exporter-x2", "namespace": "monitoring", "uid": UID,
            "labels": {"app": "node-exporter"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "node-exporter", "uid": "d", "controller": true}]},
        "spec": {"nodeName": "node-a", "hostNetwork": true,
                 "containers": [{"name": "exporter", "ports": [{"name": "metrics", "containerPort": 9100}]}]},
        "status": {"phase": "Running", "podIP": "192.168.10.4", "podIPs": [{"ip": "192.168.10.4"}],
                   "containerStatuses": [{"name": "exporter", "containerID": format!("containerd://{CONTAINER}"),
                                          "ready": true, "restartCount": 0, "image": "x", "imageID": "y"}]}
    }))
    .unwrap();
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.10.4"}]}
    }))
    .unwrap();
    let mut cache = IdentityCache::new(IdentityConfig {
        node_name: Some("node-a".into()),
        ..IdentityConfig::default()
    });
    let snapshot = ClusterSnapshot {
        pods: vec![pod.into()],
        nodes: vec![node],
        ..ClusterSnapshot::default()
    };
    let now = SystemTime::now();
    cache.update(&snapshot, now);

    // The IP is the node's: host.
    let ip: IpAddr = "192.168.10.4".parse().unwrap();
    let by_ip = cache.endpoint(ip, Some(9100), now);
    assert_eq!(by_ip.reserved_identity(), Some(ReservedIdentity::Host));
    assert_eq!(by_ip.pod_name, "");

    // The socket's cgroup is the pod's container.
    let mut index = CgroupIndex::new(root.path());
    index.scan().unwrap();
    let cgroup = index
        .resolve(cgroup_id)
        .unwrap()
        .expect("container cgroup indexed")
        .clone();
    assert_eq!(cgroup.pod_uid, UID);
    assert_eq!(cgroup.runtime, Some(ContainerRuntime::Containerd));
    let pod = cache.pod_by_uid(&cgroup.pod_uid).expect("pod by uid");
    assert_eq!(
        pod.container_name(cgroup.container_id.as_deref().unwrap()),
        Some("exporter")
    );
    let endpoint = pod.endpoint(Some(ip), Some(9100));
    assert_eq!(
        (
            endpoint.namespace.as_str(),
            endpoint.pod_name.as_str(),
            endpoint.node_name.as_str()
        ),
        ("monitoring", "node-exporter-x2", "node-a")
    );
    assert_eq!(endpoint.workloads[0].kind, "DaemonSet");
}
