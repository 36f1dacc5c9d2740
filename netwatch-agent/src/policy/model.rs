//! The compiled model: validated NetworkPolicies and the pods and namespaces
//! they are judged against, built once from a [`ClusterSnapshot`].
//!
//! Validation follows the API server's own rules for networking.k8s.io/v1, so
//! a manifest the API server would refuse is refused here too, with the field
//! that is wrong and how to fix it.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::selector::{CompiledSelector, Labels};
use crate::cluster::{ClusterSnapshot, LabelSet, PodRecord};

/// The label the API server sets on every namespace to its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Namespaces every cluster has, whether or not the manifests list them.
pub const BUILT_IN_NAMESPACES: [&str; 4] =
    ["default", "kube-node-lease", "kube-public", "kube-system"];

/// What is wrong with one field of an object, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    /// Path of the field in the object, e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl FieldProblem {
    pub(crate) fn new(field: String, problem: String, fix: String) -> Self {
        Self {
            field,
            problem,
            fix,
        }
    }
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "field {}: {}; fix: {}",
            self.field, self.problem, self.fix
        )
    }
}

pub use crate::record::{Direction, Protocol, UnknownProtocol};

pub use crate::record::PolicyRef;

impl PolicyRef {
    /// The reference to a manifest's NetworkPolicy: a missing namespace is
    /// `default`, as `kubectl apply` would make it.
    pub fn of(policy: &NetworkPolicy) -> PolicyRef {
        PolicyRef::network_policy(
            policy
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            policy.metadata.name.clone().unwrap_or_default(),
        )
    }
}

/// `ipBlock`: a CIDR minus its exceptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpBlockMatcher {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
    /// `10.0.0.0/8 except 10.1.0.0/16`, made once for explanations.
    text: String,
}

impl IpBlockMatcher {
    /// A block of `cidr` minus `except`.
    pub fn new(cidr: IpNet, except: Vec<IpNet>) -> Self {
        let mut text = cidr.to_string();
        if !except.is_empty() {
            let listed: Vec<String> = except.iter().map(ToString::to_string).collect();
            text = format!("{text} except {}", listed.join(", "));
        }
        Self { cidr, except, text }
    }

    /// Whether `ip` is in the CIDR and in none of the exceptions.
    #[inline]
    pub fn matches(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }

    /// The exception that removes `ip`, if any.
    pub fn excepted_by(&self, ip: IpAddr) -> Option<&IpNet> {
        self.except.iter().find(|e| e.contains(&ip))
    }
}

impl fmt::Display for IpBlockMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Which namespaces a selector peer looks in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceScope {
    /// `podSelector` alone: the policy's own namespace.
    PolicyNamespace,
    /// `namespaceSelector` (alone or with `podSelector`).
    Selector(CompiledSelector),
}

/// One entry of `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMatcher {
    /// Pods chosen by namespace and pod selectors (an absent podSelector is
    /// every pod of the chosen namespaces).
    Pods {
        namespaces: NamespaceScope,
        pods: CompiledSelector,
        pod_selector_given: bool,
    },
    /// Addresses in an `ipBlock`.
    IpBlock(IpBlockMatcher),
}

impl fmt::Display for PeerMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerMatcher::Pods {
                namespaces: NamespaceScope::PolicyNamespace,
                pods,
                ..
            } => {
                write!(f, "podSelector {pods}")
            }
            PeerMatcher::Pods {
                namespaces: NamespaceScope::Selector(ns),
                pods,
                pod_selector_given,
            } => {
                write!(f, "namespaceSelector {ns}")?;
                if *pod_selector_given {
                    write!(f, " + podSelector {pods}")?;
                }
                Ok(())
            }
            PeerMatcher::IpBlock(block) => write!(f, "ipBlock {block}"),
        }
    }
}

/// What a port entry accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// No `port`: every port of the protocol.
    Any,
    /// `port`, or `port`..=`endPort`.
    Range { start: u16, end: u16 },
    /// A named port, resolved against the destination pod's container ports.
    Named(String),
}

/// One entry of `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMatcher {
    pub protocol: Protocol,
    pub port: PortSpec,
}

impl fmt::Display for PortMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortSpec::Any => write!(f, "any/{}", self.protocol),
            PortSpec::Range { start, end } if start == end => {
                write!(f, "{start}/{}", self.protocol)
            }
            PortSpec::Range { start, end } => write!(f, "{start}-{end}/{}", self.protocol),
            PortSpec::Named(name) => write!(f, "{name}/{}", self.protocol),
        }
    }
}

/// One ingress or egress rule: any peer AND any port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRule {
    /// Empty: every peer (a missing `from`/`to` and an empty one alike).
    pub peers: Vec<PeerMatcher>,
    /// Empty: every port.
    pub ports: Vec<PortMatcher>,
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    pub reference: PolicyRef,
    pub pod_selector: CompiledSelector,
    /// `Some` when Ingress is in the effective policyTypes.
    pub ingress: Option<Vec<PolicyRule>>,
    /// `Some` when Egress is in the effective policyTypes.
    pub egress: Option<Vec<PolicyRule>>,
    /// Rules written in a direction the policyTypes leave out (they do nothing).
    pub ignored_ingress_rules: usize,
    pub ignored_egress_rules: usize,
}

impl CompiledPolicy {
    /// The rules of `direction`, if the policy covers it.
    pub fn rules(&self, direction: Direction) -> Option<&[PolicyRule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Whether the IP of a peer can matter to this policy.
    pub fn has_ip_blocks(&self) -> bool {
        self.ingress
            .iter()
            .chain(self.egress.iter())
            .flatten()
            .flat_map(|r| &r.peers)
            .any(|p| matches!(p, PeerMatcher::IpBlock(_)))
    }

    /// Whether this policy names ports.
    pub fn has_named_ports(&self) -> bool {
        self.ingress
            .iter()
            .chain(self.egress.iter())
            .flatten()
            .flat_map(|r| &r.ports)
            .any(|p| matches!(p.port, PortSpec::Named(_)))
    }
}

/// Validates and compiles one NetworkPolicy. Errors name the field the way
/// `kubectl explain` does (`spec.ingress[0].from[1].ipBlock.cidr`).
pub fn compile_policy(policy: &NetworkPolicy) -> Result<CompiledPolicy, FieldProblem> {
    let reference = PolicyRef::of(policy);
    if reference.name.is_empty() {
        return Err(FieldProblem::new(
            "metadata.name".into(),
            "the NetworkPolicy has no name".into(),
            "give it `metadata.name`".into(),
        ));
    }
    let spec = policy.spec.clone().unwrap_or_default();
    let pod_selector = match &spec.pod_selector {
        Some(sel) => CompiledSelector::compile(sel, "spec.podSelector")?,
        None => CompiledSelector::everything(),
    };

    // policyTypes defaulting as the API server does it: an empty or missing
    // list means Ingress, plus Egress when there are egress rules.
    let written_ingress = spec.ingress.as_ref().map_or(0, Vec::len);
    let written_egress = spec.egress.as_ref().map_or(0, Vec::len);
    let types = spec.policy_types.clone().unwrap_or_default();
    let (has_ingress, has_egress) = if types.is_empty() {
        (true, written_egress > 0)
    } else {
        let mut ingress = false;
        let mut egress = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => ingress = true,
                "Egress" => egress = true,
                other => {
                    return Err(FieldProblem::new(
                        format!("spec.policyTypes[{i}]"),
                        format!("unknown policy type {other:?}"),
                        "use Ingress and/or Egress (case-sensitive)".into(),
                    ));
                }
            }
        }
        (ingress, egress)
    };

    let mut ingress_rules = Vec::with_capacity(written_ingress);
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress_rules.push(compile_rule(
            rule.from.as_deref(),
            rule.ports.as_deref(),
            &path,
            "from",
        )?);
    }
    let mut egress_rules = Vec::with_capacity(written_egress);
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress_rules.push(compile_rule(
            rule.to.as_deref(),
            rule.ports.as_deref(),
            &path,
            "to",
        )?);
    }

    Ok(CompiledPolicy {
        reference,
        pod_selector,
        ignored_ingress_rules: if has_ingress { 0 } else { written_ingress },
        ignored_egress_rules: if has_egress { 0 } else { written_egress },
        ingress: has_ingress.then_some(ingress_rules),
        egress: has_egress.then_some(egress_rules),
    })
}

fn compile_rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    path: &str,
    peers_field: &str,
) -> Result<PolicyRule, FieldProblem> {
    let mut compiled_peers = Vec::new();
    for (j, peer) in peers.unwrap_or_default().iter().enumerate() {
        compiled_peers.push(compile_peer(peer, &format!("{path}.{peers_field}[{j}]"))?);
    }
    let mut compiled_ports = Vec::new();
    for (j, port) in ports.unwrap_or_default().iter().enumerate() {
        compiled_ports.push(compile_port(port, &format!("{path}.ports[{j}]"))?);
    }
    Ok(PolicyRule {
        peers: compiled_peers,
        ports: compiled_ports,
    })
}

fn compile_peer(peer: &NetworkPolicyPeer, path: &str) -> Result<PeerMatcher, FieldProblem> {
    let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match (&peer.ip_block, selectors) {
        (Some(_), true) => Err(FieldProblem::new(
            path.to_string(),
            "a peer may have ipBlock or selectors, not both".into(),
            "split it into two peers: one with ipBlock, one with podSelector/namespaceSelector".into(),
        )),
        (None, false) => Err(FieldProblem::new(
            path.to_string(),
            "the peer is empty".into(),
            "give it a podSelector, a namespaceSelector or an ipBlock; to allow every peer, remove the whole from/to list".into(),
        )),
        (Some(block), false) => Ok(PeerMatcher::IpBlock(compile_ip_block(block, &format!("{path}.ipBlock"))?)),
        (None, true) => {
            let pods = match &peer.pod_selector {
                Some(sel) => CompiledSelector::compile(sel, &format!("{path}.podSelector"))?,
                None => CompiledSelector::everything(),
            };
            let namespaces = match &peer.namespace_selector {
                Some(sel) => NamespaceScope::Selector(CompiledSelector::compile(sel, &format!("{path}.namespaceSelector"))?),
                None => NamespaceScope::PolicyNamespace,
            };
            Ok(PeerMatcher::Pods { namespaces, pods, pod_selector_given: peer.pod_selector.is_some() })
        }
    }
}

/// Parses a CIDR as the API does: `10.0.0.0/8`, `fd00::/64`; host bits set
/// after the prefix are dropped (`10.0.0.1/8` is `10.0.0.0/8`).
pub fn parse_cidr(text: &str, field: &str) -> Result<IpNet, FieldProblem> {
    match IpNet::from_str(text.trim()) {
        Ok(net) => Ok(net.trunc()),
        Err(_) => {
            let fix = if IpAddr::from_str(text.trim()).is_ok() {
                let len = if text.contains(':') { 128 } else { 32 };
                format!("write it with a prefix length, e.g. {}/{len}", text.trim())
            } else {
                "write an IPv4 or IPv6 CIDR such as 10.0.0.0/8 or fd00::/64".into()
            };
            Err(FieldProblem::new(
                field.to_string(),
                format!("invalid CIDR {text:?}"),
                fix,
            ))
        }
    }
}

fn compile_ip_block(block: &IPBlock, path: &str) -> Result<IpBlockMatcher, FieldProblem> {
    let cidr = parse_cidr(&block.cidr, &format!("{path}.cidr"))?;
    let mut except = Vec::new();
    for (k, text) in block.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{k}]");
        let net = parse_cidr(text, &field)?;
        // The API server demands a strict subset of the same family.
        let strict_subset = cidr.contains(&net) && net.prefix_len() > cidr.prefix_len();
        if !strict_subset {
            return Err(FieldProblem::new(
                field,
                format!("except {net} is not a strict subset of cidr {cidr}"),
                format!("list only ranges inside {cidr} and smaller than it, or widen the cidr"),
            ));
        }
        except.push(net);
    }
    Ok(IpBlockMatcher::new(cidr, except))
}

fn compile_port(port: &NetworkPolicyPort, path: &str) -> Result<PortMatcher, FieldProblem> {
    let protocol = match &port.protocol {
        None => Protocol::Tcp,
        Some(p) => Protocol::from_api(p).ok_or_else(|| {
            FieldProblem::new(
                format!("{path}.protocol"),
                format!("unknown protocol {p:?}"),
                "use TCP, UDP or SCTP (upper case); leave it out for TCP".into(),
            )
        })?,
    };
    let spec = match (&port.port, port.end_port) {
        (None, None) => PortSpec::Any,
        (None, Some(_)) => {
            return Err(FieldProblem::new(
                format!("{path}.endPort"),
                "endPort needs port".into(),
                "set `port` to the first port of the range".into(),
            ));
        }
        (Some(IntOrString::Int(n)), end) => {
            let start = port_number(*n, &format!("{path}.port"))?;
            let end = match end {
                None => start,
                Some(e) => {
                    let end = port_number(e, &format!("{path}.endPort"))?;
                    if end < start {
                        return Err(FieldProblem::new(
                            format!("{path}.endPort"),
                            format!("endPort {end} is below port {start}"),
                            "make endPort greater than or equal to port".into(),
                        ));
                    }
                    end
                }
            };
            PortSpec::Range { start, end }
        }
        (Some(IntOrString::String(s)), end) => {
            // YAML writes `port: "80"` sometimes; the API reads it as a name,
            // and a name must contain a letter, so say so.
            if end.is_some() {
                return Err(FieldProblem::new(
                    format!("{path}.endPort"),
                    format!("endPort cannot follow the named port {s:?}"),
                    "use a port number with endPort, or drop endPort".into(),
                ));
            }
            validate_port_name(s, &format!("{path}.port"))?;
            PortSpec::Named(s.clone())
        }
    };
    Ok(PortMatcher {
        protocol,
        port: spec,
    })
}

fn port_number(n: i32, field: &str) -> Result<u16, FieldProblem> {
    u16::try_from(n).ok().filter(|p| *p >= 1).ok_or_else(|| {
        FieldProblem::new(
            field.to_string(),
            format!("port {n} is out of range"),
            "use a port from 1 to 65535".into(),
        )
    })
}

/// IANA service name rules, as the API applies them to named ports.
pub(crate) fn validate_port_name(name: &str, field: &str) -> Result<(), FieldProblem> {
    let fix = "a port name is 1 to 15 characters of a-z, 0-9 and `-`, with at least one letter, no `--` and no `-` at either end; write a number without quotes for a port number";
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(FieldProblem::new(
            field.to_string(),
            format!("invalid port name {name:?}"),
            fix.into(),
        ))
    }
}

/// A namespace as policies see it: its name and labels (with the
/// `kubernetes.io/metadata.name` label the API server always sets).
#[derive(Clone, Debug)]
pub struct NamespaceModel {
    pub name: String,
    pub labels: Labels,
    /// false for a namespace the manifests name (a pod's, a peer's) but do
    /// not define: it is taken to have only its name label (lint's
    /// `MISSING_NAMESPACE_RULE`).
    pub defined: bool,
}

impl NamespaceModel {
    /// A namespace with only its implied name label.
    pub fn implicit(name: &str) -> Self {
        let mut labels = Labels::new();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        Self {
            name: name.to_string(),
            labels,
            defined: false,
        }
    }

    pub(crate) fn from_object(ns: &Namespace) -> Option<Self> {
        let name = ns.metadata.name.clone()?;
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
        Some(Self {
            name,
            labels,
            defined: true,
        })
    }
}

/// A container port: the target of named ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerPortModel {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
}

/// A pod as policies see it.
#[derive(Clone, Debug)]
pub struct PodModel {
    pub namespace: u32,
    pub name: String,
    /// The pod record's set, shared with the identity cache.
    pub labels: LabelSet,
    /// `status.podIP` first, then the other `status.podIPs`.
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPortModel>,
    pub host_network: bool,
    /// Index of the pod's identity (namespace + labels) in the engine.
    pub identity: u32,
}

impl PodModel {
    /// The pod's address of the same family as `like`, else its first.
    pub fn ip_like(&self, like: Option<IpAddr>) -> Option<IpAddr> {
        match like {
            Some(l) => self
                .ips
                .iter()
                .copied()
                .find(|ip| ip.is_ipv4() == l.is_ipv4()),
            None => self.ips.first().copied(),
        }
    }

    /// The number a named port resolves to on this pod (name and protocol).
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }
}

/// A pod's container ports as policies see them.
pub(crate) fn pod_ports(pod: &PodRecord) -> Vec<ContainerPortModel> {
    pod.ports()
        .iter()
        .map(|p| ContainerPortModel {
            name: p.name.clone(),
            protocol: p.protocol,
            port: p.port,
        })
        .collect()
}

/// Pods and namespaces, indexed for lookups by name and by IP.
#[derive(Clone, Debug, Default)]
pub struct ClusterModel {
    pub namespaces: Vec<NamespaceModel>,
    pub namespace_index: HashMap<String, u32>,
    pub pods: Vec<PodModel>,
    /// namespace -> pod name -> index into `pods`.
    pub pod_index: HashMap<String, HashMap<String, u32>>,
    /// Pod IP -> every current pod claiming it (host-network pods share
    /// their node's IP and are left out); see [`ClusterModel::pod_at`].
    pub ip_claims: HashMap<IpAddr, Vec<u32>>,
}

impl ClusterModel {
    /// The pod an address names: only one that a single pod claims (two
    /// claiming it is a transient of the API, naming neither).
    pub fn pod_at(&self, ip: &IpAddr) -> Option<u32> {
        match self.ip_claims.get(ip).map(Vec::as_slice) {
            Some(&[slot]) => Some(slot),
            _ => None,
        }
    }

    /// Builds the model. Namespaces that pods or policies refer to but the
    /// snapshot does not list exist implicitly, as do the built-in ones.
    pub fn build(snapshot: &ClusterSnapshot) -> Self {
        let mut model = ClusterModel::default();
        for ns in &snapshot.namespaces {
            if let Some(ns) = NamespaceModel::from_object(ns) {
                match model.namespace_index.get(&ns.name) {
                    Some(&i) => model.namespaces[i as usize] = ns,
                    None => {
                        model
                            .namespace_index
                            .insert(ns.name.clone(), model.namespaces.len() as u32);
                        model.namespaces.push(ns);
                    }
                }
            }
        }
        for name in BUILT_IN_NAMESPACES {
            model.namespace_id(name);
        }
        for policy in &snapshot.network_policies {
            model.namespace_id(policy.metadata.namespace.as_deref().unwrap_or("default"));
        }
        let mut ip_owners: HashMap<IpAddr, Vec<u32>> = HashMap::new();
        for pod in &snapshot.pods {
            let Some(name) = pod.name().map(str::to_owned) else {
                continue;
            };
            let namespace = model.namespace_id(pod.namespace());
            let ips = pod.ips().to_vec();
            let ports = pod_ports(pod);
            let host_network = pod.host_network();
            let idx = model.pods.len() as u32;
            let ns_name = model.namespaces[namespace as usize].name.clone();
            let by_name = model.pod_index.entry(ns_name).or_default();
            if let Some(&previous) = by_name.get(&name) {
                tracing::warn!("pod {name} appears twice in one namespace; the last one wins");
                let _ = previous;
            }
            by_name.insert(name.clone(), idx);
            if !host_network {
                for ip in &ips {
                    ip_owners.entry(*ip).or_default().push(idx);
                }
            }
            model.pods.push(PodModel {
                namespace,
                name,
                labels: pod.label_set().clone(),
                ips,
                ports,
                host_network,
                identity: 0,
            });
        }
        // Drop pods replaced by a later one of the same name.
        let live: std::collections::HashSet<u32> = model
            .pod_index
            .values()
            .flat_map(|m| m.values().copied())
            .collect();
        for (ip, owners) in ip_owners {
            let owners: Vec<u32> = owners.into_iter().filter(|o| live.contains(o)).collect();
            if !owners.is_empty() {
                model.ip_claims.insert(ip, owners);
            }
        }
        model
    }

    /// Index of namespace `name`, creating an implicit one if needed.
    pub fn namespace_id(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.namespace_index.get(name) {
            return i;
        }
        let i = self.namespaces.len() as u32;
        self.namespaces.push(NamespaceModel::implicit(name));
        self.namespace_index.insert(name.to_string(), i);
        i
    }

    /// The namespace named `name`, if known.
    pub fn namespace(&self, name: &str) -> Option<&NamespaceModel> {
        self.namespace_index
            .get(name)
            .map(|&i| &self.namespaces[i as usize])
    }

    /// The pod `namespace/name`, if known.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<(u32, &PodModel)> {
        let idx = *self.pod_index.get(namespace)?.get(name)?;
        Some((idx, &self.pods[idx as usize]))
    }

    /// Pods that are current (not replaced by a later duplicate), sorted by
    /// namespace then name.
    pub fn sorted_pods(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .pod_index
            .values()
            .flat_map(|m| m.values().copied())
            .collect();
        ids.sort_by(|a, b| {
            let (pa, pb) = (&self.pods[*a as usize], &self.pods[*b as usize]);
            let (na, nb) = (
                &self.namespaces[pa.namespace as usize].name,
                &self.namespaces[pb.namespace as usize].name,
            );
            na.cmp(nb).then_with(|| pa.name.cmp(&pb.name))
        });
        ids
    }

    /// Names of the namespaces matching `selector`, sorted.
    pub fn namespaces_matching(&self, selector: &CompiledSelector) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .namespaces
            .iter()
            .filter(|ns| selector.matches(&ns.labels))
            .map(|ns| ns.name.as_str())
            .collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> NetworkPolicy {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn compile(yaml: &str) -> Result<CompiledPolicy, FieldProblem> {
        compile_policy(&policy(yaml))
    }

    const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n";

    #[test]
    fn policy_types_default_to_ingress_and_to_egress_only_with_egress_rules() {
        let p = compile(&format!("{HEAD}spec: {{podSelector: {{}}}}")).unwrap();
        assert!(p.ingress.is_some() && p.egress.is_none());
        let p = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, egress: [{{}}]}}"
        ))
        .unwrap();
        assert!(p.ingress.is_some() && p.egress.is_some());
        // An empty egress list is no egress rule: Egress is not implied.
        let p = compile(&format!("{HEAD}spec: {{podSelector: {{}}, egress: []}}")).unwrap();
        assert!(p.egress.is_none());
        // An explicit empty list is the same as none.
        let p = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, policyTypes: [], egress: [{{}}]}}"
        ))
        .unwrap();
        assert!(p.ingress.is_some() && p.egress.is_some());
    }

    #[test]
    fn explicit_policy_types_win_and_leftover_rules_are_counted() {
        let p = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, policyTypes: [Egress], ingress: [{{}}]}}"
        ))
        .unwrap();
        assert!(p.ingress.is_none());
        assert_eq!(p.egress.as_deref(), Some(&[][..]));
        assert_eq!(p.ignored_ingress_rules, 1);
        let err = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, policyTypes: [ingress]}}"
        ))
        .unwrap_err();
        assert_eq!(err.field, "spec.policyTypes[0]");
    }

    #[test]
    fn missing_and_empty_peer_and_port_lists_match_everything() {
        let p = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [], ports: []}}, {{}}]}}"
        ))
        .unwrap();
        let rules = p.ingress.unwrap();
        assert_eq!(rules.len(), 2);
        assert!(
            rules
                .iter()
                .all(|r| r.peers.is_empty() && r.ports.is_empty())
        );
    }

    #[test]
    fn ports_default_to_tcp_and_accept_ranges_and_names() {
        let p = compile(&format!(
            "{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n  - ports:\n    - port: 80\n    - {{port: 8000, endPort: 8080, protocol: UDP}}\n    - {{port: http, protocol: SCTP}}\n    - {{protocol: UDP}}\n"
        ))
        .unwrap();
        let ports = &p.ingress.unwrap()[0].ports;
        assert_eq!(
            ports[0],
            PortMatcher {
                protocol: Protocol::Tcp,
                port: PortSpec::Range { start: 80, end: 80 }
            }
        );
        assert_eq!(
            ports[1],
            PortMatcher {
                protocol: Protocol::Udp,
                port: PortSpec::Range {
                    start: 8000,
                    end: 8080
                }
            }
        );
        assert_eq!(
            ports[2],
            PortMatcher {
                protocol: Protocol::Sctp,
                port: PortSpec::Named("http".into())
            }
        );
        assert_eq!(
            ports[3],
            PortMatcher {
                protocol: Protocol::Udp,
                port: PortSpec::Any
            }
        );
        assert_eq!(ports[1].to_string(), "8000-8080/UDP");
    }

    #[test]
    fn invalid_ports_name_the_field() {
        let cases = [
            (
                "{port: 80, endPort: 79}",
                "spec.ingress[0].ports[0].endPort",
            ),
            ("{endPort: 90}", "spec.ingress[0].ports[0].endPort"),
            (
                "{port: http, endPort: 90}",
                "spec.ingress[0].ports[0].endPort",
            ),
            ("{port: 70000}", "spec.ingress[0].ports[0].port"),
            ("{port: 0}", "spec.ingress[0].ports[0].port"),
            ("{port: \"80\"}", "spec.ingress[0].ports[0].port"),
            (
                "{port: 80, protocol: tcp}",
                "spec.ingress[0].ports[0].protocol",
            ),
            (
                "{port: 80, protocol: ICMP}",
                "spec.ingress[0].ports[0].protocol",
            ),
        ];
        for (port, field) in cases {
            let err = compile(&format!(
                "{HEAD}spec: {{podSelector: {{}}, ingress: [{{ports: [{port}]}}]}}"
            ))
            .unwrap_err();
            assert_eq!(err.field, field, "{port}");
        }
    }

    #[test]
    fn ip_blocks_are_validated_like_the_api_server() {
        let ok = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, egress: [{{to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}}}]}}]}}"
        ))
        .unwrap();
        let PeerMatcher::IpBlock(block) = &ok.egress.unwrap()[0].peers[0] else {
            panic!()
        };
        assert!(block.matches("10.2.0.1".parse().unwrap()));
        assert!(!block.matches("10.1.0.1".parse().unwrap()));
        assert!(!block.matches("11.0.0.1".parse().unwrap()));
        assert!(!block.matches("::1".parse().unwrap()));
        let bad = [
            ("{cidr: 10.0.0.0/33}", "spec.egress[0].to[0].ipBlock.cidr"),
            ("{cidr: 10.0.0.1}", "spec.egress[0].to[0].ipBlock.cidr"),
            ("{cidr: nonsense}", "spec.egress[0].to[0].ipBlock.cidr"),
            (
                "{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}",
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                "{cidr: 10.0.0.0/8, except: [10.0.0.0/8]}",
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                "{cidr: 10.0.0.0/8, except: ['fd00::/64']}",
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
        ];
        for (block, field) in bad {
            let err = compile(&format!(
                "{HEAD}spec: {{podSelector: {{}}, egress: [{{to: [{{ipBlock: {block}}}]}}]}}"
            ))
            .unwrap_err();
            assert_eq!(err.field, field, "{block}");
        }
        let err = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, egress: [{{to: [{{ipBlock: {{cidr: 10.0.0.1}}}}]}}]}}"
        ))
        .unwrap_err();
        assert!(err.fix.contains("10.0.0.1/32"), "{}", err.fix);
    }

    #[test]
    fn ipv6_blocks_match_ipv6_only() {
        let p = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [{{ipBlock: {{cidr: 'fd00::/64', except: ['fd00::/80']}}}}]}}]}}"
        ))
        .unwrap();
        let PeerMatcher::IpBlock(block) = &p.ingress.unwrap()[0].peers[0] else {
            panic!()
        };
        assert!(block.matches("fd00::1:0:0:1".parse().unwrap()));
        assert!(!block.matches("fd00::1".parse().unwrap()));
        assert!(!block.matches("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn peers_need_exactly_ip_block_or_selectors() {
        let err = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [{{podSelector: {{}}, ipBlock: {{cidr: 10.0.0.0/8}}}}]}}]}}"
        ))
        .unwrap_err();
        assert_eq!(err.field, "spec.ingress[0].from[0]");
        let err = compile(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [{{}}]}}]}}"
        ))
        .unwrap_err();
        assert_eq!(err.field, "spec.ingress[0].from[0]");
    }

    #[test]
    fn protocol_parses_any_case_for_the_cli_and_exact_case_for_the_api() {
        assert_eq!("tcp".parse::<Protocol>().unwrap(), Protocol::Tcp);
        assert_eq!("SCTP".parse::<Protocol>().unwrap(), Protocol::Sctp);
        assert!("icmp".parse::<Protocol>().is_err());
        assert_eq!(Protocol::from_api("udp"), None);
        assert_eq!(Protocol::Udp.to_string(), "UDP");
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_number(p.number()), Some(p));
        }
        assert_eq!(Protocol::from_number(1), None);
    }
}
