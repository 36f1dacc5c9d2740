//! kube-proxy emulation for the lab: Services of type ClusterIP (and the
//! ClusterIP of NodePort/LoadBalancer Services) as nftables rules, the same
//! on every node, in `table inet netwatch_services`:
//! - `nat` chains on `prerouting` (traffic from pods) and `output` (from the
//!   node and its hostNetwork pods) DNAT `clusterIP:port` to a ready endpoint,
//!   picked with `numgen random` when there are several;
//! - `filter` chains on `forward` and `output`, ahead of the policy table,
//!   REJECT traffic to a service port without ready endpoints with ICMP port
//!   unreachable (what kube-proxy's iptables mode does; its nftables mode
//!   does the same), so a client sees "connection refused" at once.
//!
//! Endpoints come from the service's EndpointSlices (`conditions.ready`
//! absent counts as ready, as the API says); a service without any
//! EndpointSlice falls back to the pods its selector matches that have a
//! Ready=True condition, with `targetPort` (number or name) resolved per pod.
//!
//! Not emulated: session affinity, external and node ports, topology, and
//! hairpin (a pod reaching itself through its service needs masquerading).

use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::util::intstr::IntOrString};

use super::{
    Lab, LabError,
    enforce::{L4, LabCluster, port_number},
    manifests::object_id,
};

/// The nftables table the kube-proxy emulation owns on each node.
pub const SERVICE_TABLE: &str = "netwatch_services";

/// Errors reading Services and EndpointSlices: object, field, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("Service {service}: `{field}`: {detail}")]
    Service {
        service: String,
        field: String,
        detail: String,
    },
    #[error("EndpointSlice {slice}: `{field}`: {detail}")]
    EndpointSlice {
        slice: String,
        field: String,
        detail: String,
    },
}

/// One service port on one cluster IP, and where its traffic goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name` of the Service.
    pub service: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: L4,
    /// Ready endpoints (address, port) of the cluster IP's family; empty:
    /// traffic is rejected.
    pub endpoints: Vec<(IpAddr, u16)>,
}

impl Frontend {
    /// `prod/api 10.96.0.20:80/TCP`: the comment (and counter name) of the
    /// frontend's DNAT or REJECT rule.
    pub fn comment(&self) -> String {
        let ip = match self.ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        format!(
            "{} {ip}:{}/{}",
            self.service,
            self.port,
            self.protocol.nft().to_uppercase()
        )
    }
}

/// Every frontend of the cluster's Services.
pub fn frontends(cluster: &LabCluster) -> Result<Vec<Frontend>, ServiceError> {
    let mut out = Vec::new();
    for svc in &cluster.manifests.services {
        out.extend(service_frontends(cluster, svc)?);
    }
    Ok(out)
}

fn service_frontends(cluster: &LabCluster, svc: &Service) -> Result<Vec<Frontend>, ServiceError> {
    let id = object_id(&svc.metadata);
    let err = |field: String, detail: String| ServiceError::Service {
        service: id.clone(),
        field,
        detail,
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = spec
        .cluster_ips
        .iter()
        .flatten()
        .cloned()
        .enumerate()
        .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip));
    for (field, text) in listed.chain(
        spec.cluster_ip
            .clone()
            .map(|ip| ("spec.clusterIP".to_string(), ip)),
    ) {
        // Headless and not-yet-allocated services have nothing to proxy.
        if text == "None" || text.is_empty() {
            continue;
        }
        let ip = text
            .parse()
            .map_err(|_| err(field, format!("{text:?} is not an IP address")))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone().unwrap_or_default();
    let slices: Vec<_> = cluster
        .manifests
        .endpoint_slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref().unwrap_or("default") == namespace
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    == Some(&name)
        })
        .collect();
    let mut out = Vec::new();
    for (k, sp) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{k}]");
        let port = port_number(sp.port).map_err(|d| err(format!("{field}.port"), d))?;
        let protocol = L4::from_api(sp.protocol.as_deref())
            .map_err(|d| err(format!("{field}.protocol"), d))?;
        let port_name = sp.name.clone().unwrap_or_default();
        let mut endpoints: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
        if !slices.is_empty() {
            for slice in &slices {
                let sid = object_id(&slice.metadata);
                let serr = |field: String, detail: String| ServiceError::EndpointSlice {
                    slice: sid.clone(),
                    field,
                    detail,
                };
                let Some((j, ep_port)) = slice.ports.iter().flatten().enumerate().find(|(_, p)| {
                    p.name.clone().unwrap_or_default() == port_name
                        && L4::from_api(p.protocol.as_deref()) == Ok(protocol)
                }) else {
                    continue;
                };
                let Some(number) = ep_port.port else { continue };
                let number =
                    port_number(number).map_err(|d| serr(format!("ports[{j}].port"), d))?;
                for (e, ep) in slice.endpoints.iter().enumerate() {
                    // `ready` unset means ready (the API: "interpret as ready").
                    if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    // kube-proxy uses an endpoint's first address.
                    let Some(text) = ep.addresses.first() else {
                        continue;
                    };
                    if slice.address_type == "FQDN" {
                        continue;
                    }
                    let ip: IpAddr = text.parse().map_err(|_| {
                        serr(
                            format!("endpoints[{e}].addresses[0]"),
                            format!("{text:?} is not an IP address"),
                        )
                    })?;
                    endpoints.insert((ip, number));
                }
            }
        } else if let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
            for pod in &cluster.pods {
                let selected = pod.namespace == namespace
                    && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v));
                if !selected || !pod.ready {
                    continue;
                }
                let target = match &sp.target_port {
                    None => vec![port],
                    Some(IntOrString::Int(n)) => {
                        vec![port_number(*n).map_err(|d| err(format!("{field}.targetPort"), d))?]
                    }
                    // A name the pod does not declare: not an endpoint.
                    Some(IntOrString::String(name)) => {
                        pod.named_port(name, protocol).into_iter().take(1).collect()
                    }
                };
                for t in target {
                    for ip in &pod.ips {
                        endpoints.insert((*ip, t));
                    }
                }
            }
        }
        for ip in &ips {
            out.push(Frontend {
                service: id.clone(),
                ip: *ip,
                port,
                protocol,
                endpoints: endpoints
                    .iter()
                    .copied()
                    .filter(|(e, _)| e.is_ipv4() == ip.is_ipv4())
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// The kube-proxy emulation's ruleset (`nft -f` syntax), the same for every
/// node. Loading it again replaces it in one transaction.
pub fn compile(cluster: &LabCluster) -> Result<String, ServiceError> {
    Ok(render(&frontends(cluster)?))
}

fn render(frontends: &[Frontend]) -> String {
    let t = SERVICE_TABLE;
    let mut out = format!("table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n");
    out.push_str("  comment \"kube-proxy emulation by the netwatch lab\"\n");
    out.push_str("  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n");
    out.push_str("  chain output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n");
    // Ahead of the policy table (priority filter), as kube-proxy's filter
    // rules come before a CNI's policy rules.
    out.push_str("  chain filter_forward {\n    type filter hook forward priority filter - 10; policy accept;\n    jump no_endpoints\n  }\n");
    out.push_str("  chain filter_output {\n    type filter hook output priority filter - 10; policy accept;\n    jump no_endpoints\n  }\n");
    let mut dnat = String::new();
    let mut reject = String::new();
    for f in frontends {
        let (family, l4) = (if f.ip.is_ipv4() { "ip" } else { "ip6" }, f.protocol.nft());
        let matched = format!("{family} daddr {} {l4} dport {}", f.ip, f.port);
        let comment = f.comment();
        match f.endpoints.as_slice() {
            [] => {
                let _ = writeln!(
                    reject,
                    "    {matched} counter reject with icmpx type port-unreachable comment \"{comment}\""
                );
            }
            [(ip, port)] => {
                let _ = writeln!(
                    dnat,
                    "    {matched} counter dnat {family} to {} comment \"{comment}\"",
                    socket(*ip, *port)
                );
            }
            many => {
                let map: Vec<String> = many
                    .iter()
                    .enumerate()
                    .map(|(i, (ip, port))| format!("{i} : {ip} . {port}"))
                    .collect();
                let _ = writeln!(
                    dnat,
                    "    {matched} counter dnat {family} addr . port to numgen random mod {} map {{ {} }} comment \"{comment}\"",
                    many.len(),
                    map.join(", ")
                );
            }
        }
    }
    let _ = write!(
        out,
        "  chain services {{\n{dnat}  }}\n  chain no_endpoints {{\n{reject}  }}\n}}\n"
    );
    out
}

fn socket(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

impl Lab {
    /// Load the kube-proxy emulation for `cluster`'s Services into every
    /// node, replacing what an earlier call loaded.
    pub fn proxy_services(&self, cluster: &LabCluster) -> Result<(), LabError> {
        let rules = compile(cluster).map_err(|e| LabError::Spec(e.to_string()))?;
        for n in &self.nodes {
            self.nft(&n.name, &rules)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::Manifests;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: { name: api-1, namespace: prod, labels: { app: api } }
spec: { containers: [ { name: c, ports: [ { name: http, containerPort: 8080 } ] } ] }
status: { podIPs: [ { ip: 10.244.1.3 }, { ip: "fd00::3" } ], conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: api-2, namespace: prod, labels: { app: api } }
spec: { containers: [ { name: c, ports: [ { name: http, containerPort: 9090 } ] } ] }
status: { podIP: 10.244.2.3, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: api-3, namespace: prod, labels: { app: api } }
spec: { containers: [ { name: c, ports: [ { name: http, containerPort: 8080 } ] } ] }
status: { podIP: 10.244.2.4, conditions: [ { type: Ready, status: "False" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: api-other-ns, namespace: dev, labels: { app: api } }
spec: { containers: [ { name: c, ports: [ { name: http, containerPort: 8080 } ] } ] }
status: { podIP: 10.244.2.5, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Service
metadata: { name: api, namespace: prod }
spec:
  clusterIPs: [ 10.96.0.20, "fd96::20" ]
  selector: { app: api }
  ports: [ { name: web, port: 80, targetPort: http }, { name: raw, port: 81, targetPort: 7000, protocol: UDP } ]
---
apiVersion: v1
kind: Service
metadata: { name: dns, namespace: kube-system }
spec: { clusterIP: 10.96.0.10, ports: [ { name: dns, port: 53, protocol: UDP } ] }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: dns-abc, namespace: kube-system, labels: { kubernetes.io/service-name: dns } }
addressType: IPv4
ports: [ { name: dns, port: 5353, protocol: UDP } ]
endpoints:
  - { addresses: [ 10.244.9.9 ] }
  - { addresses: [ 10.244.9.8 ], conditions: { ready: false } }
---
apiVersion: v1
kind: Service
metadata: { name: payment, namespace: prod }
spec: { clusterIP: 10.96.0.30, selector: { app: payment }, ports: [ { port: 80 } ] }
---
apiVersion: v1
kind: Service
metadata: { name: headless, namespace: prod }
spec: { clusterIP: None, selector: { app: api }, ports: [ { port: 80 } ] }
"#;

    fn cluster(text: &str) -> LabCluster {
        LabCluster::new(Manifests::parse("t.yaml", text).unwrap(), Vec::new()).unwrap()
    }

    fn ep(list: &[(&str, u16)]) -> Vec<(IpAddr, u16)> {
        list.iter()
            .map(|(ip, p)| (ip.parse().unwrap(), *p))
            .collect()
    }

    #[test]
    fn ready_pods_and_ready_slice_endpoints_are_the_backends() {
        let f = frontends(&cluster(CLUSTER)).unwrap();
        let find = |ip: &str, port: u16| {
            f.iter()
                .find(|f| f.ip.to_string() == ip && f.port == port)
                .unwrap_or_else(|| panic!("{ip}:{port} in {f:#?}"))
        };
        assert_eq!(
            find("10.96.0.20", 80).endpoints,
            ep(&[("10.244.1.3", 8080), ("10.244.2.3", 9090)]),
            "named targetPort per pod; not-ready and other-namespace pods left out"
        );
        assert_eq!(
            find("fd96::20", 80).endpoints,
            ep(&[("fd00::3", 8080)]),
            "IPv6 cluster IP: IPv6 endpoints"
        );
        assert_eq!(find("10.96.0.20", 81).protocol, L4::Udp);
        assert_eq!(
            find("10.96.0.20", 81).endpoints,
            ep(&[("10.244.1.3", 7000), ("10.244.2.3", 7000)])
        );
        assert_eq!(
            find("10.96.0.10", 53).endpoints,
            ep(&[("10.244.9.9", 5353)]),
            "slice: ready unset is ready, ready: false is not"
        );
        assert!(find("10.96.0.30", 80).endpoints.is_empty());
        assert!(
            !f.iter().any(|f| f.service == "prod/headless"),
            "headless services are not proxied"
        );
    }

    #[test]
    fn the_ruleset_dnats_to_endpoints_and_rejects_without() {
        let text = compile(&cluster(CLUSTER)).unwrap();
        assert!(
            text.starts_with("table inet netwatch_services\ndelete table inet netwatch_services\n"),
            "reloadable"
        );
        assert!(text.contains("ip daddr 10.96.0.20 tcp dport 80 counter dnat ip addr . port to numgen random mod 2 map { 0 : 10.244.1.3 . 8080, 1 : 10.244.2.3 . 9090 } comment \"prod/api 10.96.0.20:80/TCP\""), "{text}");
        assert!(text.contains("ip6 daddr fd96::20 tcp dport 80 counter dnat ip6 to [fd00::3]:8080 comment \"prod/api [fd96::20]:80/TCP\""), "{text}");
        assert!(
            text.contains("ip daddr 10.96.0.10 udp dport 53 counter dnat ip to 10.244.9.9:5353"),
            "{text}"
        );
        let reject = text.split("chain no_endpoints").nth(1).unwrap();
        assert!(reject.contains("ip daddr 10.96.0.30 tcp dport 80 counter reject with icmpx type port-unreachable comment \"prod/payment 10.96.0.30:80/TCP\""), "{text}");
        assert!(
            !text.contains("10.96.0.30 tcp dport 80 counter dnat"),
            "{text}"
        );
    }

    #[test]
    fn bad_services_are_refused_naming_the_field() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: { name: s, namespace: n }\nspec: { clusterIP: 10.96.0.300, ports: [ { port: 80 } ] }\n";
        let e = compile(&cluster(text)).unwrap_err().to_string();
        assert!(
            e.starts_with("Service n/s: `spec.clusterIP`: \"10.96.0.300\" is not an IP address"),
            "{e}"
        );
        let text = "apiVersion: v1\nkind: Service\nmetadata: { name: s, namespace: n }\nspec: { clusterIP: 10.96.0.3, ports: [ { port: 80, protocol: ICMP } ] }\n";
        let e = compile(&cluster(text)).unwrap_err().to_string();
        assert!(
            e.contains("`spec.ports[0].protocol`") && e.contains("TCP, UDP or SCTP"),
            "{e}"
        );
    }
}
