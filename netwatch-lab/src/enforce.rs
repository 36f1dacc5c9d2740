//! The lab enforcer: NetworkPolicies (networking.k8s.io/v1) compiled into
//! one nftables ruleset per node, structured the way a CNI's policy agent
//! (Calico in nftables mode, kube-router) structures it.
//!
//! Written from the API's documented semantics, independently of
//! netwatch-agent's policy engine, so that the two check each other: what the
//! kernel drops here, the engine must explain as denied, and the other way
//! round.
//!
//! Per node, in `table inet netwatch_policy`:
//! - base chains on `forward` (pod to pod, pod to world, world to pod),
//!   `input` (pod to its own node: the pod's egress policy applies, as in
//!   Calico) and `output` (the node and its hostNetwork pods to local pods:
//!   not policed unless [`EnforceOptions::police_host_to_pod`]);
//! - `ct state established,related accept` first: policies are stateful;
//! - dispatch by interface: `iifname "caliX" jump egress/<ns>/<pod>` (leaving
//!   a local pod), `oifname "caliX" jump ingress/<ns>/<pod>` (entering it);
//!   on a bridge datapath by the pod's addresses instead ([`PodMatch`]);
//! - one chain per local pod and direction. A pod that no policy isolates in a
//!   direction has an empty chain (the jump returns). Otherwise one rule per
//!   (policy, rule, peer, port) that `return`s (allowed this way: go on to the
//!   other direction), then `counter drop` with [`drop_comment`];
//! - named sets of the addresses of the pods a selector peer selects
//!   (`peer<N>_v4`, `peer<N>_v6`), cluster-wide: pods on other nodes are
//!   addresses here, policed on their own node as a DaemonSet-based CNI does.
//!
//! The cluster policies of kubernetes-sigs/network-policy-api
//! ([`tiers`]: ClusterNetworkPolicy v1alpha2, AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy v1alpha1) go into the same per-pod chains, in
//! the order the API judges a direction in:
//! - the Admin tier first, one rule per (policy, rule, peer, port) by
//!   ascending priority: Accept/Allow `return`s (allowed this way), Deny
//!   `drop`s, Pass `goto`s the chain `<direction>/<ns>/<pod>/below-admin`,
//!   which is also where the chain ends when nothing matched;
//! - there (or inline when no Admin policy selects the pod): the
//!   NetworkPolicy rules and their drop when NetworkPolicies isolate the pod;
//!   otherwise the Baseline tier's rules (Accept and Pass `return`, Deny
//!   `drop`s), and the end of the chain allows.
//!
//! Calico's own policies ([`calico`]: projectcalico.org/v3 NetworkPolicy,
//! GlobalNetworkPolicy, Tier) replace that order when the manifests hold
//! any: the pod's chain goes to one chain per Calico tier that applies, in
//! tier order, the cluster policies in the kube-admin and kube-baseline
//! tiers and NetworkPolicies in the default tier.
//!
//! [`NodePolicy::judge`] runs a compiled chain on a packet without a kernel:
//! the conformance corpus and the random comparison with the engine check
//! the rules themselves that way.

pub mod calico;
mod first_match;
mod interpret;
mod tiers;

pub use first_match::{Action, FirstMatch, MatchRule, PodFirstMatch, compile_first_match};
pub use interpret::{CompiledCluster, Decision, Judgement, Packet};

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    net::IpAddr,
};

use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{
    Datapath, Lab, LabError,
    manifests::{Manifests, object_id},
};

/// The nftables table the enforcer owns on each node.
pub const POLICY_TABLE: &str = "netwatch_policy";

/// nftables keeps at most 128 bytes of a comment.
const COMMENT_MAX: usize = 127;

/// Errors compiling policies: the object, the field and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("NetworkPolicy {policy}: `{field}`: {detail}")]
    Policy {
        policy: String,
        field: String,
        detail: String,
    },
    #[error("{kind} {name}: `{field}`: {detail}")]
    ClusterPolicy {
        kind: String,
        name: String,
        field: String,
        detail: String,
    },
    #[error(
        "{kind} {name}: the lab's eBPF and Open vSwitch datapaths enforce NetworkPolicies and \
         the cluster tiers only; run Calico's policies on the routed or bridge datapath (nftables)"
    )]
    NotInThisDatapath { kind: String, name: String },
    #[error("Pod {pod}: `{field}`: {detail}")]
    Pod {
        pod: String,
        field: String,
        detail: String,
    },
}

/// Choices where CNIs differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnforceOptions {
    /// ipBlocks also match pod addresses (Calico does; some CNIs apply
    /// ipBlocks to cluster-external addresses only). Default true.
    pub ipblock_matches_pods: bool,
    /// Police traffic from the node itself (and its hostNetwork pods) to its
    /// local pods with their ingress policies. Default false: the API says an
    /// ingress-isolated pod still accepts connections from its node, and
    /// Calico allows host-to-local-workload traffic by default. netwatch's
    /// POLICY_NOT_ENFORCED verdict is tested on exactly this.
    pub police_host_to_pod: bool,
    /// How the firewall tells which local pod a packet leaves or enters. Set
    /// by [`Lab::enforce`] from the lab's datapath.
    pub pod_match: PodMatch,
}

impl Default for EnforceOptions {
    fn default() -> Self {
        EnforceOptions {
            ipblock_matches_pods: true,
            police_host_to_pod: false,
            pod_match: PodMatch::Interface,
        }
    }
}

/// How the node's base chains dispatch a packet to a local pod's chains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodMatch {
    /// By the pod's host interface (`iifname`/`oifname`): routed veths.
    #[default]
    Interface,
    /// By the pod's addresses (`ip saddr`/`ip daddr`): pods on a bridge seen
    /// through br_netfilter, where the IP hooks name the bridge, not the
    /// port, as the packet's interface.
    Address,
}

/// Direction of traffic relative to a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn field(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
    fn peers_field(self) -> &'static str {
        match self {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.field())
    }
}

/// The comment (and so the counter name for [`Lab::nft_counter`]) of the rule
/// that drops what no policy allows, e.g. `x/a ingress denied`.
pub fn drop_comment(pod: &str, direction: Direction) -> String {
    format!("{pod} {direction} denied")
}

/// Where the lab put a pod: what the compiler needs beyond the manifests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlacement {
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// Host side of the pod's veth on its node; empty for hostNetwork pods.
    pub host_if: String,
    /// The pod's addresses as built (a hostNetwork pod's are its node's).
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
}

/// Transport protocol of a policy port, container port or service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4 {
    Tcp,
    Udp,
    Sctp,
}

impl L4 {
    /// The API's spelling (`TCP`, `UDP`, `SCTP`); absent means TCP.
    pub fn from_api(protocol: Option<&str>) -> Result<L4, String> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Ok(L4::Tcp),
            "UDP" => Ok(L4::Udp),
            "SCTP" => Ok(L4::Sctp),
            other => Err(format!("protocol {other:?}: use TCP, UDP or SCTP")),
        }
    }
    /// nftables' name.
    pub fn nft(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
            L4::Sctp => "sctp",
        }
    }
}

/// A port number as the API writes it (an `int32`): 1-65535, or why not.
pub fn port_number(n: i32) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{n} is not a port (1-65535)"))
}

/// A container port, as named ports are resolved against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    /// Empty when unnamed.
    pub name: String,
    pub port: u16,
    pub protocol: L4,
}

/// A pod as the compiler sees it: manifest labels and ports, lab placement.
#[derive(Clone, Debug)]
pub struct ClusterPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The placement's addresses when the lab built the pod, else the
    /// manifest's `status.podIPs`.
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// `status.conditions` has Ready=True.
    pub ready: bool,
    pub ports: Vec<ContainerPort>,
    pub placement: Option<PodPlacement>,
}

impl ClusterPod {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The numbers a named port resolves to on this pod for `protocol`
    /// (usually one; none when no container declares it).
    pub fn named_port(&self, name: &str, protocol: L4) -> Vec<u16> {
        let set: BTreeSet<u16> = self
            .ports
            .iter()
            .filter(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
            .collect();
        set.into_iter().collect()
    }

    /// A pod NetworkPolicy selectors can select: it has its own network
    /// (hostNetwork pods are node traffic, as in Calico) and an address.
    fn is_policy_pod(&self) -> bool {
        !self.host_network && !self.ips.is_empty()
    }

    /// Policed on `node`: a pod network pod the lab wired there.
    fn local_interface(&self, node: &str) -> Option<&str> {
        let p = self.placement.as_ref()?;
        (p.node == node && !self.host_network && !p.host_if.is_empty())
            .then_some(p.host_if.as_str())
    }
}

/// The cluster the lab enforces: manifests plus where the lab put the pods.
/// Independent of [`Lab`], so it can be built and compiled without root.
#[derive(Clone, Debug)]
pub struct LabCluster {
    pub manifests: Manifests,
    /// Pods of the manifests (not Succeeded/Failed). Lab pods without a
    /// manifest are not pods to the compiler (nor to the agent's engine):
    /// their addresses count as non-pod addresses.
    pub pods: Vec<ClusterPod>,
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl LabCluster {
    /// Join manifests and placements (from [`Lab::placements`]).
    pub fn new(
        manifests: Manifests,
        placements: Vec<PodPlacement>,
    ) -> Result<LabCluster, EnforceError> {
        let mut namespace_labels = BTreeMap::new();
        for ns in &manifests.namespaces {
            if let Some(name) = &ns.metadata.name {
                namespace_labels
                    .insert(name.clone(), ns.metadata.labels.clone().unwrap_or_default());
            }
        }
        let mut pods = Vec::new();
        for pod in &manifests.pods {
            let id = object_id(&pod.metadata);
            let err = |field: String, detail: String| EnforceError::Pod {
                pod: id.clone(),
                field,
                detail,
            };
            let status = pod.status.clone().unwrap_or_default();
            if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                continue;
            }
            let namespace = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = pod.metadata.name.clone().unwrap_or_default();
            let spec = pod.spec.clone().unwrap_or_default();
            let mut ports = Vec::new();
            for (c, container) in spec.containers.iter().enumerate() {
                for (k, p) in container.ports.iter().flatten().enumerate() {
                    let field = format!("spec.containers[{c}].ports[{k}]");
                    let port = port_number(p.container_port)
                        .map_err(|d| err(format!("{field}.containerPort"), d))?;
                    let protocol = L4::from_api(p.protocol.as_deref())
                        .map_err(|d| err(format!("{field}.protocol"), d))?;
                    ports.push(ContainerPort {
                        name: p.name.clone().unwrap_or_default(),
                        port,
                        protocol,
                    });
                }
            }
            let placement = placements
                .iter()
                .find(|p| p.namespace == namespace && p.name == name)
                .cloned();
            let ips = match &placement {
                Some(p) if !p.ips.is_empty() => p.ips.clone(),
                _ => {
                    let mut ips = Vec::new();
                    let listed = status
                        .pod_ips
                        .iter()
                        .flatten()
                        .map(|p| p.ip.clone())
                        .chain(status.pod_ip.clone());
                    for text in listed {
                        let ip: IpAddr = text.parse().map_err(|_| {
                            err(
                                "status.podIPs".into(),
                                format!("{text:?} is not an IP address"),
                            )
                        })?;
                        if !ips.contains(&ip) {
                            ips.push(ip);
                        }
                    }
                    ips
                }
            };
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            pods.push(ClusterPod {
                namespace,
                name,
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                ips,
                host_network: spec.host_network.unwrap_or(false),
                ready,
                ports,
                placement,
            });
        }
        Ok(LabCluster {
            manifests,
            pods,
            namespace_labels,
        })
    }

    /// A pod by `namespace/name`.
    pub fn pod(&self, id: &str) -> Option<&ClusterPod> {
        self.pods.iter().find(|p| p.id() == id)
    }

    /// A namespace's labels, with the implied `kubernetes.io/metadata.name`.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespace_labels
            .get(namespace)
            .cloned()
            .unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
        labels
    }
}

// ---------------------------------------------------------------------------
// Policies, validated and normalised.

/// A label selector; empty selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Selector {
    labels: Vec<(String, String)>,
    exprs: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    fn parse(
        sel: Option<&LabelSelector>,
        err: &dyn Fn(String, String) -> EnforceError,
        field: &str,
    ) -> Result<Selector, EnforceError> {
        let Some(sel) = sel else {
            return Ok(Selector::default());
        };
        let labels = sel
            .match_labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut exprs = Vec::new();
        for (i, r) in sel.match_expressions.iter().flatten().enumerate() {
            let values = r.values.clone().unwrap_or_default();
            let f = format!("{field}.matchExpressions[{i}]");
            let needs_values = |ok: bool, what: &str| {
                if ok {
                    Ok(())
                } else {
                    Err(err(
                        format!("{f}.values"),
                        format!("operator {} {what}", r.operator),
                    ))
                }
            };
            exprs.push(match r.operator.as_str() {
                "In" => {
                    needs_values(!values.is_empty(), "needs values")?;
                    Requirement::In(r.key.clone(), values)
                }
                "NotIn" => {
                    needs_values(!values.is_empty(), "needs values")?;
                    Requirement::NotIn(r.key.clone(), values)
                }
                "Exists" => {
                    needs_values(values.is_empty(), "takes no values")?;
                    Requirement::Exists(r.key.clone())
                }
                "DoesNotExist" => {
                    needs_values(values.is_empty(), "takes no values")?;
                    Requirement::DoesNotExist(r.key.clone())
                }
                other => {
                    return Err(err(
                        format!("{f}.operator"),
                        format!("{other:?}: use In, NotIn, Exists or DoesNotExist"),
                    ));
                }
            });
        }
        Ok(Selector { labels, exprs })
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|r| match r {
                Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Requirement::Exists(k) => labels.contains_key(k),
                Requirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.extend(self.exprs.iter().map(|r| match r {
            Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
            Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
            Requirement::Exists(k) => k.clone(),
            Requirement::DoesNotExist(k) => format!("!{k}"),
        }));
        if parts.is_empty() {
            f.write_str("all")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

/// An IPv4 or IPv6 prefix, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("{text:?} is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)");
        let (addr, len) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
        // Like the API server, accept host bits and ignore them.
        Ok(Cidr {
            addr: mask(addr, len),
            len,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    fn contains_cidr(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    fn nft_family(&self) -> &'static str {
        if self.addr.is_ipv4() { "ip" } else { "ip6" }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((u32::from(v4) & m).into())
        }
        IpAddr::V6(v6) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((u128::from(v6) & m).into())
        }
    }
}

#[derive(Clone, Debug)]
enum Peer {
    /// A rule without peers: every address.
    Any,
    /// Pods matching `pods` in the namespaces `namespaces` selects.
    Pods {
        namespaces: Namespaces,
        pods: Selector,
    },
    Block {
        cidr: Cidr,
        except: Vec<Cidr>,
    },
    /// A cluster policy's `networks` entry: pod addresses included, whatever
    /// [`EnforceOptions::ipblock_matches_pods`] says of ipBlocks.
    Network(Cidr),
    /// A cluster policy's `nodes`: the addresses in the selected Node
    /// objects' `status.addresses`.
    Nodes(Selector),
}

#[derive(Clone, Debug)]
enum Namespaces {
    /// The policy's own namespace (a podSelector-only peer).
    Own(String),
    Matching(Selector),
}

#[derive(Clone, Debug)]
enum PortMatch {
    /// A rule without ports: every protocol and port.
    Any,
    /// Every port of a protocol.
    Protocol(L4),
    Range(L4, u16, u16),
    /// Resolved against the destination pod's container ports.
    Named(L4, String),
}

#[derive(Clone, Debug)]
struct Rule {
    index: usize,
    /// (index in from/to, peer); `None` index: the rule has no peers.
    peers: Vec<(Option<usize>, Peer)>,
    /// (index in ports, port); `None` index: the rule has no ports.
    ports: Vec<(Option<usize>, PortMatch)>,
}

#[derive(Clone, Debug)]
struct Policy {
    id: String,
    namespace: String,
    selector: Selector,
    /// `None`: the policy does not apply in that direction (policyTypes).
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

impl Policy {
    fn rules(&self, d: Direction) -> Option<&[Rule]> {
        match d {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

fn parse_policy(np: &NetworkPolicy) -> Result<Policy, EnforceError> {
    let id = object_id(&np.metadata);
    let err = |field: String, detail: String| EnforceError::Policy {
        policy: id.clone(),
        field,
        detail,
    };
    let spec = np.spec.clone().unwrap_or_default();
    let selector = Selector::parse(spec.pod_selector.as_ref(), &err, "spec.podSelector")?;
    let (mut has_ingress, mut has_egress) =
        (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()));
    if let Some(types) = &spec.policy_types {
        (has_ingress, has_egress) = (false, false);
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => has_ingress = true,
                "Egress" => has_egress = true,
                other => {
                    return Err(err(
                        format!("spec.policyTypes[{i}]"),
                        format!("{other:?}: use Ingress or Egress"),
                    ));
                }
            }
        }
    }
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let ingress = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            parse_rule(
                &namespace,
                Direction::Ingress,
                i,
                r.from.as_deref(),
                r.ports.as_deref(),
                &err,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let egress = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            parse_rule(
                &namespace,
                Direction::Egress,
                i,
                r.to.as_deref(),
                r.ports.as_deref(),
                &err,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Policy {
        id: id.clone(),
        namespace,
        selector,
        ingress: has_ingress.then_some(ingress),
        egress: has_egress.then_some(egress),
    })
}

fn parse_rule(
    namespace: &str,
    d: Direction,
    index: usize,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    err: &dyn Fn(String, String) -> EnforceError,
) -> Result<Rule, EnforceError> {
    let base = format!("spec.{}[{index}]", d.field());
    // Missing and empty peers (ports) are the same: every peer (port).
    let peers = match peers.unwrap_or_default() {
        [] => vec![(None, Peer::Any)],
        list => list
            .iter()
            .enumerate()
            .map(|(j, p)| {
                parse_peer(
                    namespace,
                    p,
                    &format!("{base}.{}[{j}]", d.peers_field()),
                    err,
                )
                .map(|p| (Some(j), p))
            })
            .collect::<Result<_, _>>()?,
    };
    let ports = match ports.unwrap_or_default() {
        [] => vec![(None, PortMatch::Any)],
        list => list
            .iter()
            .enumerate()
            .map(|(k, p)| parse_port(p, &format!("{base}.ports[{k}]"), err).map(|p| (Some(k), p)))
            .collect::<Result<_, _>>()?,
    };
    Ok(Rule {
        index,
        peers,
        ports,
    })
}

fn parse_peer(
    namespace: &str,
    p: &NetworkPolicyPeer,
    field: &str,
    err: &dyn Fn(String, String) -> EnforceError,
) -> Result<Peer, EnforceError> {
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (Some(block), None, None) => parse_block(block, &format!("{field}.ipBlock"), err),
        (None, None, None) => Err(err(field.into(), "a peer needs podSelector, namespaceSelector or ipBlock".into())),
        (Some(_), _, _) => Err(err(field.into(), "ipBlock cannot be combined with podSelector or namespaceSelector in one peer: make them separate peers".into())),
        (None, pods, namespaces) => Ok(Peer::Pods {
            pods: Selector::parse(pods.as_ref(), err, &format!("{field}.podSelector"))?,
            namespaces: match namespaces {
                None => Namespaces::Own(namespace.into()),
                Some(sel) => Namespaces::Matching(Selector::parse(Some(sel), err, &format!("{field}.namespaceSelector"))?),
            },
        }),
    }
}

fn parse_block(
    block: &IPBlock,
    field: &str,
    err: &dyn Fn(String, String) -> EnforceError,
) -> Result<Peer, EnforceError> {
    let cidr = Cidr::parse(&block.cidr).map_err(|d| err(format!("{field}.cidr"), d))?;
    let mut except = Vec::new();
    for (i, e) in block.except.iter().flatten().enumerate() {
        let f = format!("{field}.except[{i}]");
        let c = Cidr::parse(e).map_err(|d| err(f.clone(), d))?;
        if !cidr.contains_cidr(&c) {
            return Err(err(
                f,
                format!("{c} is not inside cidr {cidr}: except must lie within cidr"),
            ));
        }
        except.push(c);
    }
    Ok(Peer::Block { cidr, except })
}

fn parse_port(
    p: &NetworkPolicyPort,
    field: &str,
    err: &dyn Fn(String, String) -> EnforceError,
) -> Result<PortMatch, EnforceError> {
    let l4 =
        L4::from_api(p.protocol.as_deref()).map_err(|d| err(format!("{field}.protocol"), d))?;
    let number = |n: i32, f: &str| port_number(n).map_err(|d| err(format!("{field}.{f}"), d));
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortMatch::Protocol(l4)),
        (None, Some(_)) => Err(err(
            format!("{field}.endPort"),
            "endPort needs a numeric port".into(),
        )),
        (Some(IntOrString::Int(n)), end) => {
            let start = number(*n, "port")?;
            let end = match end {
                None => start,
                Some(e) => {
                    let e = number(e, "endPort")?;
                    if e < start {
                        return Err(err(
                            format!("{field}.endPort"),
                            format!("{e} is below port {start}"),
                        ));
                    }
                    e
                }
            };
            Ok(PortMatch::Range(l4, start, end))
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(err(
                    format!("{field}.endPort"),
                    "endPort needs a numeric port, not a named one".into(),
                ));
            }
            if name.is_empty() || name.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(
                    format!("{field}.port"),
                    format!(
                        "{name:?}: a port number is written without quotes; a port name has letters"
                    ),
                ));
            }
            Ok(PortMatch::Named(l4, name.clone()))
        }
    }
}

// ---------------------------------------------------------------------------
// Compiling one node.

/// A named set of pod addresses: the pods a selector peer selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressSet {
    pub name: String,
    pub comment: String,
    pub elements: Vec<IpAddr>,
    pub ipv6: bool,
}

/// One pod's chain for one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyChain {
    /// `ingress/<ns>/<pod>` or `egress/<ns>/<pod>`.
    pub name: String,
    pub pod: String,
    pub host_if: String,
    /// The pod's addresses (dispatch by [`PodMatch::Address`]).
    pub ips: Vec<IpAddr>,
    pub direction: Direction,
    /// NetworkPolicies selecting the pod in this direction; empty: not
    /// isolated by NetworkPolicy.
    pub isolated_by: Vec<String>,
    /// Cluster policies with rules for the pod in this direction, in
    /// evaluation order (`ClusterNetworkPolicy deny-db (Admin)`).
    pub cluster_policies: Vec<String>,
    /// Jumped to from the base chains; false for a `below-admin` chain,
    /// reached by `goto` from its pod's chain.
    pub entry: bool,
    /// nftables rules: the Admin tier's, then the allowing `return`s and the
    /// counted drop of NetworkPolicy, or the Baseline tier's.
    pub rules: Vec<String>,
}

/// A node's compiled policy: render it with [`NodePolicy::to_nft`].
#[derive(Clone, Debug)]
pub struct NodePolicy {
    pub node: String,
    pub options: EnforceOptions,
    pub sets: Vec<AddressSet>,
    pub chains: Vec<PolicyChain>,
}

/// The nftables ruleset (`nft -f` syntax) enforcing `cluster`'s policies on
/// `node`. Loading it replaces an earlier one atomically.
pub fn compile(
    cluster: &LabCluster,
    node: &str,
    options: &EnforceOptions,
) -> Result<String, EnforceError> {
    Ok(compile_node(cluster, node, options)?.to_nft())
}

/// [`compile`], before rendering.
pub fn compile_node(
    cluster: &LabCluster,
    node: &str,
    options: &EnforceOptions,
) -> Result<NodePolicy, EnforceError> {
    // Every policy is validated, also those that select no pod here: an error
    // must not depend on where pods happen to run.
    let policies = cluster
        .manifests
        .network_policies
        .iter()
        .map(parse_policy)
        .collect::<Result<Vec<_>, _>>()?;
    let cluster_policies = tiers::parse_all(&cluster.manifests.tier_policies)?;
    let calico = calico::CalicoTiers::parse(&cluster.manifests, &policies)?;
    let mut c = Compiler {
        cluster,
        options,
        sets: Vec::new(),
        set_keys: BTreeMap::new(),
        all_pods_needed: false,
    };
    let mut local: Vec<(&ClusterPod, &str)> = cluster
        .pods
        .iter()
        .filter_map(|p| Some((p, p.local_interface(node)?)))
        .collect();
    local.sort_by_key(|(p, _)| p.id());
    let mut chains = Vec::new();
    for (pod, host_if) in local {
        for d in [Direction::Egress, Direction::Ingress] {
            match &calico {
                Some(calico) => chains.extend(c.calico_chains(
                    pod,
                    host_if,
                    d,
                    &policies,
                    &cluster_policies,
                    calico,
                )),
                None => chains.extend(c.pod_chains(pod, host_if, d, &policies, &cluster_policies)),
            }
        }
    }
    if c.all_pods_needed {
        for ipv6 in [false, true] {
            let elements = cluster
                .pods
                .iter()
                .filter(|p| p.is_policy_pod())
                .flat_map(|p| p.ips.iter().copied())
                .filter(|ip| ip.is_ipv6() == ipv6)
                .collect();
            c.sets.push(AddressSet {
                name: all_pods_set(ipv6).into(),
                comment: "every pod address (ipBlocks exclude them)".into(),
                elements,
                ipv6,
            });
        }
    }
    Ok(NodePolicy {
        node: node.into(),
        options: options.clone(),
        sets: c.sets,
        chains,
    })
}

/// What one allowing (policy, rule, peer, port) admits, as concrete
/// prefixes and a port range: the form an eBPF datapath compiles into
/// compares ([`super::datapath::ebpf`]). Same evaluation as the nftables
/// rules, so both enforcers enforce the same policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    /// The peer's addresses: (prefix, length). Pods are /32 and /128.
    pub peers: Vec<(IpAddr, u8)>,
    /// Prefixes inside `peers` that are not allowed (ipBlock except, and
    /// pod addresses when ipBlocks do not match pods).
    pub except: Vec<(IpAddr, u8)>,
    /// `None`: every protocol and port.
    pub ports: Option<(L4, u16, u16)>,
}

impl Compiler<'_> {
    /// [`Compiler::matches`] as [`Allow`]s.
    fn allows(&self, pod: &ClusterPod, d: Direction, peer: &Peer, port: &PortMatch) -> Vec<Allow> {
        let hosts = |ips: &[IpAddr]| -> Vec<(IpAddr, u8)> {
            ips.iter()
                .map(|ip| (*ip, if ip.is_ipv4() { 32 } else { 128 }))
                .collect()
        };
        if let (Direction::Egress, PortMatch::Named(l4, name)) = (d, port) {
            let mut out = Vec::new();
            for dest in self.peer_pods(peer) {
                for n in dest.named_port(name, *l4) {
                    out.push(Allow {
                        peers: hosts(&dest.ips),
                        except: Vec::new(),
                        ports: Some((*l4, n, n)),
                    });
                }
            }
            return out;
        }
        let (peers, except) = match peer {
            Peer::Any => (
                vec![
                    (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
                    (IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0),
                ],
                Vec::new(),
            ),
            Peer::Block { cidr, except } => {
                let mut ex: Vec<(IpAddr, u8)> = except.iter().map(|e| (e.addr, e.len)).collect();
                if !self.options.ipblock_matches_pods {
                    let all: Vec<IpAddr> = self
                        .cluster
                        .pods
                        .iter()
                        .filter(|p| p.is_policy_pod())
                        .flat_map(|p| p.ips.iter().copied())
                        .collect();
                    ex.extend(hosts(&all));
                }
                (vec![(cidr.addr, cidr.len)], ex)
            }
            Peer::Pods { namespaces, pods } => {
                let ips: Vec<IpAddr> = self
                    .selected_pods(namespaces, pods)
                    .into_iter()
                    .flat_map(|p| p.ips.iter().copied())
                    .collect();
                (hosts(&ips), Vec::new())
            }
            // Cluster policies' peers (NetworkPolicy never has them).
            Peer::Network(cidr) => (vec![(cidr.addr, cidr.len)], Vec::new()),
            Peer::Nodes(sel) => (hosts(&self.node_addresses(sel)), Vec::new()),
        };
        if peers.is_empty() {
            return Vec::new();
        }
        let ports: Vec<Option<(L4, u16, u16)>> = match port {
            PortMatch::Any => vec![None],
            PortMatch::Protocol(l4) => vec![Some((*l4, 0, u16::MAX))],
            PortMatch::Range(l4, a, b) => vec![Some((*l4, *a, *b))],
            PortMatch::Named(l4, name) => pod
                .named_port(name, *l4)
                .into_iter()
                .map(|n| Some((*l4, n, n)))
                .collect(),
        };
        ports
            .into_iter()
            .map(|ports| Allow {
                peers: peers.clone(),
                except: except.clone(),
                ports,
            })
            .collect()
    }
}

fn all_pods_set(ipv6: bool) -> &'static str {
    if ipv6 { "pods_v6" } else { "pods_v4" }
}

struct Compiler<'a> {
    cluster: &'a LabCluster,
    options: &'a EnforceOptions,
    sets: Vec<AddressSet>,
    /// Selector peer (rendered) -> set number: peers that select alike share.
    set_keys: BTreeMap<String, usize>,
    all_pods_needed: bool,
}

impl Compiler<'_> {
    /// The pod's chain for `d`, and its `below-admin` chain when an Admin
    /// tier policy selects it.
    fn pod_chains(
        &mut self,
        pod: &ClusterPod,
        host_if: &str,
        d: Direction,
        policies: &[Policy],
        cluster_policies: &[tiers::ClusterPolicy],
    ) -> Vec<PolicyChain> {
        let id = pod.id();
        let name = format!("{}/{id}", d.field());
        let namespace_labels = self.cluster.namespace_labels(&pod.namespace);
        let acting: Vec<&tiers::ClusterPolicy> = cluster_policies
            .iter()
            .filter(|p| {
                !p.rules(d).is_empty()
                    && p.subject.namespaces.matches(&namespace_labels)
                    && p.subject.pods.matches(&pod.labels)
            })
            .collect();
        let (admin, baseline): (Vec<&tiers::ClusterPolicy>, Vec<_>) = acting
            .iter()
            .copied()
            .partition(|p| p.tier == tiers::Tier::Admin);
        let (isolated_by, mut below) = self.network_policy_rules(pod, d, policies);
        if isolated_by.is_empty() {
            for p in &baseline {
                self.tier_rules(pod, d, p, None, &mut below);
            }
        }
        let chain = |name: String, entry: bool, rules: Vec<String>| PolicyChain {
            name,
            pod: id.clone(),
            host_if: host_if.to_string(),
            ips: pod.ips.clone(),
            direction: d,
            isolated_by: isolated_by.clone(),
            cluster_policies: acting.iter().map(|p| p.label()).collect(),
            entry,
            rules,
        };
        if admin.is_empty() {
            return vec![chain(name, true, below)];
        }
        let below_name = format!("{name}/below-admin");
        let mut rules = Vec::new();
        for p in &admin {
            self.tier_rules(pod, d, p, Some(&below_name), &mut rules);
        }
        rules.push(format!("goto {below_name}"));
        vec![chain(name, true, rules), chain(below_name, false, below)]
    }

    /// One cluster policy's rules for `pod` in `d`, in written order. Pass
    /// goes to `pass_to` (the rest of the Admin tier skipped) or, in the
    /// Baseline tier, allows.
    fn tier_rules(
        &mut self,
        pod: &ClusterPod,
        d: Direction,
        policy: &tiers::ClusterPolicy,
        pass_to: Option<&str>,
        out: &mut Vec<String>,
    ) {
        let id = pod.id();
        for rule in policy.rules(d) {
            let verdict = match (rule.action, pass_to) {
                (tiers::Action::Accept, _) | (tiers::Action::Pass, None) => "return".to_string(),
                (tiers::Action::Deny, _) => "drop".to_string(),
                (tiers::Action::Pass, Some(chain)) => format!("goto {chain}"),
            };
            let mut label = format!("{} {}[{}]", policy.label(), d.field(), rule.index);
            if let Some(n) = &rule.name {
                let _ = write!(label, " {n}");
            }
            let comment = comment(&format!("{label} {id}"));
            for peer in &rule.peers {
                for port in &rule.ports {
                    for m in self.matches(pod, d, peer, port) {
                        let sep = if m.is_empty() { "" } else { " " };
                        out.push(format!("{m}{sep}counter {verdict} comment \"{comment}\""));
                    }
                }
            }
        }
    }

    /// The NetworkPolicies isolating `pod` in `d`, and their rules: the
    /// allowing `return`s, then the counted drop (none when not isolated).
    fn network_policy_rules(
        &mut self,
        pod: &ClusterPod,
        d: Direction,
        policies: &[Policy],
    ) -> (Vec<String>, Vec<String>) {
        let id = pod.id();
        let selecting: Vec<&Policy> = policies
            .iter()
            .filter(|p| {
                p.namespace == pod.namespace
                    && p.selector.matches(&pod.labels)
                    && p.rules(d).is_some()
            })
            .collect();
        let mut rules = Vec::new();
        for policy in &selecting {
            self.network_policy_allows(pod, d, policy, &mut rules);
        }
        if !selecting.is_empty() {
            rules.push(format!(
                "counter drop comment \"{}\"",
                comment(&drop_comment(&id, d))
            ));
        }
        (selecting.iter().map(|p| p.id.clone()).collect(), rules)
    }

    /// One NetworkPolicy's allowing `return`s for `pod` in `d`.
    fn network_policy_allows(
        &mut self,
        pod: &ClusterPod,
        d: Direction,
        policy: &Policy,
        out: &mut Vec<String>,
    ) {
        let id = pod.id();
        for rule in policy.rules(d).unwrap_or_default() {
            for (j, peer) in &rule.peers {
                for (k, port) in &rule.ports {
                    let mut where_ = format!("{} {}[{}]", policy.id, d.field(), rule.index);
                    if let Some(j) = j {
                        let _ = write!(where_, ".{}[{j}]", d.peers_field());
                    }
                    if let Some(k) = k {
                        let _ = write!(where_, ".ports[{k}]");
                    }
                    let comment = comment(&format!("{where_} {id}"));
                    for m in self.matches(pod, d, peer, port) {
                        let sep = if m.is_empty() { "" } else { " " };
                        out.push(format!("{m}{sep}counter return comment \"{comment}\""));
                    }
                }
            }
        }
    }

    /// nft match expressions (each one rule) for traffic of `pod` in
    /// direction `d` with `peer` on `port`. Empty list: nothing can match.
    fn matches(
        &mut self,
        pod: &ClusterPod,
        d: Direction,
        peer: &Peer,
        port: &PortMatch,
    ) -> Vec<String> {
        let field = match d {
            Direction::Ingress => "saddr",
            Direction::Egress => "daddr",
        };
        if let (Direction::Egress, PortMatch::Named(l4, name)) = (d, port) {
            // The destination is the peer: resolve the name per destination
            // pod, grouping pods whose name means the same number.
            let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
            for dest in self.peer_pods(peer) {
                for n in dest.named_port(name, *l4) {
                    by_port
                        .entry(n)
                        .or_default()
                        .extend(dest.ips.iter().copied());
                }
            }
            let mut out = Vec::new();
            for (n, ips) in by_port {
                for (family, ips) in split_families(&ips) {
                    out.push(format!(
                        "{family} {field} {{ {} }} meta l4proto {} th dport {n}",
                        join(&ips),
                        l4.nft()
                    ));
                }
            }
            return out;
        }
        let addrs = self.peer_addresses(peer, field);
        let ports: Vec<String> = match port {
            PortMatch::Any => vec![String::new()],
            PortMatch::Protocol(l4) => vec![format!("meta l4proto {}", l4.nft())],
            PortMatch::Range(l4, a, b) if a == b => {
                vec![format!("meta l4proto {} th dport {a}", l4.nft())]
            }
            PortMatch::Range(l4, a, b) => {
                vec![format!("meta l4proto {} th dport {a}-{b}", l4.nft())]
            }
            // Ingress: the destination is this pod.
            PortMatch::Named(l4, name) => pod
                .named_port(name, *l4)
                .into_iter()
                .map(|n| format!("meta l4proto {} th dport {n}", l4.nft()))
                .collect(),
        };
        let mut out = Vec::new();
        for a in &addrs {
            for p in &ports {
                out.push(
                    [a.as_str(), p.as_str()]
                        .iter()
                        .filter(|s| !s.is_empty())
                        .copied()
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
        }
        out
    }

    /// Address matches for a peer, one per rule to emit.
    fn peer_addresses(&mut self, peer: &Peer, field: &str) -> Vec<String> {
        match peer {
            Peer::Any => vec![String::new()],
            Peer::Block { cidr, except } => {
                let f = cidr.nft_family();
                let mut m = format!("{f} {field} {cidr}");
                if !except.is_empty() {
                    let list: Vec<String> = except.iter().map(ToString::to_string).collect();
                    let _ = write!(m, " {f} {field} != {{ {} }}", list.join(", "));
                }
                if !self.options.ipblock_matches_pods {
                    self.all_pods_needed = true;
                    let _ = write!(m, " {f} {field} != @{}", all_pods_set(f == "ip6"));
                }
                vec![m]
            }
            Peer::Network(cidr) => vec![format!("{} {field} {cidr}", cidr.nft_family())],
            Peer::Nodes(sel) => split_families(&self.node_addresses(sel))
                .into_iter()
                .map(|(family, ips)| format!("{family} {field} {{ {} }}", join(&ips)))
                .collect(),
            Peer::Pods { namespaces, pods } => {
                let n = self.selector_set(namespaces, pods);
                let mut out = Vec::new();
                for ipv6 in [false, true] {
                    let name = format!("peer{n}_{}", if ipv6 { "v6" } else { "v4" });
                    if self.sets.iter().any(|s| s.name == name) {
                        out.push(format!(
                            "{} {field} @{name}",
                            if ipv6 { "ip6" } else { "ip" }
                        ));
                    }
                }
                out
            }
        }
    }

    /// The set number for a selector peer, creating its sets (one per
    /// address family that has members) on first use.
    fn selector_set(&mut self, namespaces: &Namespaces, pods: &Selector) -> usize {
        let scope = match namespaces {
            Namespaces::Own(ns) => format!("namespace {ns}"),
            Namespaces::Matching(sel) => format!("namespaces {sel}"),
        };
        let key = format!("pods {pods} in {scope}");
        if let Some(n) = self.set_keys.get(&key) {
            return *n;
        }
        let n = self.set_keys.len();
        self.set_keys.insert(key.clone(), n);
        let members: Vec<IpAddr> = self
            .selected_pods(namespaces, pods)
            .into_iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for ipv6 in [false, true] {
            let elements: Vec<IpAddr> = members
                .iter()
                .copied()
                .filter(|ip| ip.is_ipv6() == ipv6)
                .collect();
            if !elements.is_empty() {
                let name = format!("peer{n}_{}", if ipv6 { "v6" } else { "v4" });
                self.sets.push(AddressSet {
                    name,
                    comment: comment(&key),
                    elements,
                    ipv6,
                });
            }
        }
        n
    }

    fn selected_pods(&self, namespaces: &Namespaces, pods: &Selector) -> Vec<&ClusterPod> {
        self.cluster
            .pods
            .iter()
            .filter(|p| p.is_policy_pod() && pods.matches(&p.labels))
            .filter(|p| match namespaces {
                Namespaces::Own(ns) => &p.namespace == ns,
                Namespaces::Matching(sel) => {
                    sel.matches(&self.cluster.namespace_labels(&p.namespace))
                }
            })
            .collect()
    }

    /// The pods a peer matches, each with the addresses the peer covers
    /// (for named ports, which only pods have).
    fn peer_pods(&self, peer: &Peer) -> Vec<ClusterPod> {
        let policy_pods = || self.cluster.pods.iter().filter(|p| p.is_policy_pod());
        match peer {
            Peer::Any => policy_pods().cloned().collect(),
            Peer::Pods { namespaces, pods } => self
                .selected_pods(namespaces, pods)
                .into_iter()
                .cloned()
                .collect(),
            Peer::Block { cidr, except } if self.options.ipblock_matches_pods => policy_pods()
                .map(|p| {
                    let mut p = p.clone();
                    p.ips
                        .retain(|ip| cidr.contains(*ip) && !except.iter().any(|e| e.contains(*ip)));
                    p
                })
                .filter(|p| !p.ips.is_empty())
                .collect(),
            Peer::Block { .. } => Vec::new(),
            Peer::Network(cidr) => policy_pods()
                .map(|p| {
                    let mut p = p.clone();
                    p.ips.retain(|ip| cidr.contains(*ip));
                    p
                })
                .filter(|p| !p.ips.is_empty())
                .collect(),
            // Node addresses have no container ports.
            Peer::Nodes(_) => Vec::new(),
        }
    }

    /// The addresses of the Node objects `sel` selects.
    fn node_addresses(&self, sel: &Selector) -> Vec<IpAddr> {
        self.cluster
            .manifests
            .nodes
            .iter()
            .filter(|n| sel.matches(&n.metadata.labels.clone().unwrap_or_default()))
            .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
            .filter_map(|a| a.address.trim().parse().ok())
            .collect()
    }
}

fn split_families(ips: &[IpAddr]) -> Vec<(&'static str, Vec<IpAddr>)> {
    let set: BTreeSet<IpAddr> = ips.iter().copied().collect();
    let v4: Vec<IpAddr> = set.iter().copied().filter(IpAddr::is_ipv4).collect();
    let v6: Vec<IpAddr> = set.iter().copied().filter(IpAddr::is_ipv6).collect();
    [("ip", v4), ("ip6", v6)]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A comment nftables accepts: no quotes, at most 127 bytes.
fn comment(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c == '"' || c.is_control() { '\'' } else { c })
        .collect();
    if s.len() > COMMENT_MAX {
        let mut cut = COMMENT_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// ICMPv6 a pod and its node exchange to keep the link up (neighbour and
/// router discovery, MLD): never policed, as in Calico.
const ICMPV6_LINK: &str = "icmpv6 type { mld-listener-query, mld-listener-report, mld-listener-done, nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report } accept";

impl NodePolicy {
    /// The ruleset in `nft -f` syntax. It starts by deleting the table, so
    /// loading it again replaces the policy in one transaction.
    pub fn to_nft(&self) -> String {
        let mut out = String::new();
        let t = POLICY_TABLE;
        let _ = writeln!(
            out,
            "table inet {t}\ndelete table inet {t}\ntable inet {t} {{"
        );
        let _ = writeln!(
            out,
            "  comment \"{}\"",
            comment(&format!(
                "Policies of node {}, compiled by the netwatch lab",
                self.node
            ))
        );
        for s in &self.sets {
            let ty = if s.ipv6 { "ipv6_addr" } else { "ipv4_addr" };
            let _ = write!(
                out,
                "  set {} {{ type {ty}; comment \"{}\";",
                s.name, s.comment
            );
            if !s.elements.is_empty() {
                let _ = write!(out, " elements = {{ {} }};", join(&s.elements));
            }
            let _ = writeln!(out, " }}");
        }
        let egress: Vec<&PolicyChain> = self
            .chains
            .iter()
            .filter(|c| c.entry && c.direction == Direction::Egress)
            .collect();
        let ingress: Vec<&PolicyChain> = self
            .chains
            .iter()
            .filter(|c| c.entry && c.direction == Direction::Ingress)
            .collect();

        // Pods' traffic crossing the node: the source's egress, then the
        // destination's ingress (each on the node the pod lives on).
        let _ = writeln!(
            out,
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
        );
        let _ = writeln!(out, "    ct state established,related accept");
        for c in &egress {
            self.dispatch(&mut out, c);
        }
        for c in &ingress {
            self.dispatch(&mut out, c);
        }
        let _ = writeln!(out, "  }}");

        // Pods' traffic to their own node: their egress policy applies.
        let _ = writeln!(
            out,
            "  chain input {{\n    type filter hook input priority filter; policy accept;"
        );
        let _ = writeln!(
            out,
            "    ct state established,related accept\n    {ICMPV6_LINK}"
        );
        for c in &egress {
            self.dispatch(&mut out, c);
        }
        let _ = writeln!(out, "  }}");

        // The node (and hostNetwork pods) to local pods.
        let _ = writeln!(
            out,
            "  chain output {{\n    type filter hook output priority filter; policy accept;"
        );
        let _ = writeln!(
            out,
            "    ct state established,related accept\n    {ICMPV6_LINK}"
        );
        if self.options.police_host_to_pod {
            for c in &ingress {
                self.dispatch(&mut out, c);
            }
        } else if !ingress.is_empty() {
            for m in self.entering_any(&ingress) {
                let _ = writeln!(
                    out,
                    "    {m} counter accept comment \"host to local pods: not policed (police_host_to_pod: false)\""
                );
            }
        }
        let _ = writeln!(out, "  }}");

        for c in &self.chains {
            let mut why = if c.isolated_by.is_empty() {
                format!("{} {}: not isolated", c.pod, c.direction)
            } else {
                format!(
                    "{} {}: isolated by {}",
                    c.pod,
                    c.direction,
                    c.isolated_by.join(", ")
                )
            };
            if !c.cluster_policies.is_empty() {
                let _ = write!(why, "; tiers: {}", c.cluster_policies.join(", "));
            }
            let _ = writeln!(
                out,
                "  chain {} {{\n    comment \"{}\"",
                c.name,
                comment(&why)
            );
            for r in &c.rules {
                let _ = writeln!(out, "    {r}");
            }
            let _ = writeln!(out, "  }}");
        }
        out.push_str("}\n");
        out
    }
}

impl NodePolicy {
    /// The jump(s) to `c` from a base chain: on the interface or addresses
    /// the packet leaves (egress) or enters (ingress) the pod by.
    fn dispatch(&self, out: &mut String, c: &PolicyChain) {
        let (meta, field) = match c.direction {
            Direction::Egress => ("iifname", "saddr"),
            Direction::Ingress => ("oifname", "daddr"),
        };
        match self.options.pod_match {
            PodMatch::Interface => {
                let _ = writeln!(out, "    {meta} \"{}\" jump {}", c.host_if, c.name);
            }
            PodMatch::Address => {
                for (family, ips) in split_families(&c.ips) {
                    let _ = writeln!(
                        out,
                        "    {family} {field} {{ {} }} jump {}",
                        join(&ips),
                        c.name
                    );
                }
            }
        }
    }

    /// Matches (one rule each) for traffic entering any pod of `chains`.
    fn entering_any(&self, chains: &[&PolicyChain]) -> Vec<String> {
        match self.options.pod_match {
            PodMatch::Interface => {
                let ifs: Vec<String> = chains
                    .iter()
                    .map(|c| format!("\"{}\"", c.host_if))
                    .collect();
                vec![format!("oifname {{ {} }}", ifs.join(", "))]
            }
            PodMatch::Address => {
                let ips: Vec<IpAddr> = chains.iter().flat_map(|c| c.ips.clone()).collect();
                split_families(&ips)
                    .into_iter()
                    .map(|(family, ips)| format!("{family} daddr {{ {} }}", join(&ips)))
                    .collect()
            }
        }
    }
}

impl Lab {
    /// Where every lab pod is: node, host interface, addresses.
    pub fn placements(&self) -> Vec<PodPlacement> {
        self.pods
            .iter()
            .map(|p| {
                let ips = if p.spec.host_network {
                    self.node(&p.spec.node)
                        .map(|n| vec![IpAddr::V4(n.ip), IpAddr::V6(n.uplink_v6)])
                        .unwrap_or_default()
                } else {
                    std::iter::once(IpAddr::V4(p.spec.ip))
                        .chain(p.spec.ipv6.map(IpAddr::V6))
                        .collect()
                };
                PodPlacement {
                    namespace: p.spec.namespace.clone(),
                    name: p.spec.name.clone(),
                    node: p.spec.node.clone(),
                    host_if: p.host_if.clone(),
                    ips,
                    host_network: p.spec.host_network,
                }
            })
            .collect()
    }

    /// Compile `cluster`'s NetworkPolicies for every node and load them,
    /// replacing what an earlier call loaded (and so zeroing its counters).
    /// Every node is compiled before any is loaded, so bad policies change
    /// nothing. Connections already established stay allowed (conntrack).
    pub fn enforce(&self, cluster: &LabCluster, options: &EnforceOptions) -> Result<(), LabError> {
        match self.datapath {
            Datapath::Ebpf => self.ebpf_enforce(cluster, options),
            Datapath::Ovs => self.ovs_enforce(cluster, options),
            Datapath::Routed | Datapath::Bridge => self.nft_enforce(cluster, options),
        }
    }

    /// Stop enforcing on `node`, as when its CNI's policy agent is not
    /// running: the datapath stays, every pod is reachable.
    pub fn stop_enforcing(&self, node: &str) -> Result<(), LabError> {
        match self.datapath {
            Datapath::Ebpf => self.ebpf_stop_enforcing(node),
            Datapath::Ovs => self.ovs_stop_enforcing(node),
            Datapath::Routed | Datapath::Bridge => {
                self.nft(node, &format!("delete table inet {POLICY_TABLE}\n"))
            }
        }
    }

    /// [`Lab::enforce`] with nftables (the routed datapath).
    fn nft_enforce(&self, cluster: &LabCluster, options: &EnforceOptions) -> Result<(), LabError> {
        let options = &EnforceOptions {
            pod_match: self.pod_match(),
            ..options.clone()
        };
        let rulesets = self
            .nodes
            .iter()
            .map(|n| compile(cluster, &n.name, options).map(|r| (n.name.clone(), r)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LabError::Spec(e.to_string()))?;
        for (node, rules) in rulesets {
            self.nft(&node, &rules)?;
        }
        Ok(())
    }

    /// Packets the enforcer dropped for `pod` (`namespace/name`) in
    /// `direction`, on the pod's node.
    pub fn policy_drops(&self, pod: &str, direction: Direction) -> Result<u64, LabError> {
        let p = self.pod(pod)?;
        self.nft_counter(&p.spec.node, &drop_comment(&p.spec.id(), direction))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: x, labels: { ns: x } }
---
apiVersion: v1
kind: Namespace
metadata: { name: y, labels: { ns: y } }
---
apiVersion: v1
kind: Pod
metadata: { name: a, namespace: x, labels: { pod: a } }
spec: { nodeName: node-1, containers: [ { name: c, ports: [ { name: http, containerPort: 80 } ] } ] }
status: { podIPs: [ { ip: 10.244.1.2 }, { ip: "fd00:1::2" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: b, namespace: x, labels: { pod: b } }
spec: { nodeName: node-2, containers: [ { name: c, ports: [ { name: http, containerPort: 8080 }, { name: dns, containerPort: 53, protocol: UDP } ] } ] }
status: { podIP: 10.244.2.2 }
---
apiVersion: v1
kind: Pod
metadata: { name: a, namespace: y, labels: { pod: a } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIP: 10.244.1.3 }
---
apiVersion: v1
kind: Pod
metadata: { name: host, namespace: y, labels: { pod: a } }
spec: { nodeName: node-1, hostNetwork: true, containers: [ { name: c, ports: [ { name: http, containerPort: 9000 } ] } ] }
status: { podIP: 100.64.1.2 }
"#;

    fn cluster(policies: &str) -> LabCluster {
        let m = Manifests::parse("test.yaml", &format!("{PODS}\n---\n{policies}")).unwrap();
        let placements = [
            ("x", "a", "node-1", "cali00000000001"),
            ("x", "b", "node-2", "cali00000000002"),
            ("y", "a", "node-1", "cali00000000003"),
            ("y", "host", "node-1", ""),
        ]
        .iter()
        .map(|(ns, name, node, host_if)| PodPlacement {
            namespace: ns.to_string(),
            name: name.to_string(),
            node: node.to_string(),
            host_if: host_if.to_string(),
            ips: Vec::new(),
            host_network: host_if.is_empty(),
        })
        .collect();
        LabCluster::new(m, placements).unwrap()
    }

    fn node(policies: &str, node: &str) -> NodePolicy {
        compile_node(&cluster(policies), node, &EnforceOptions::default()).unwrap()
    }

    fn chain<'a>(n: &'a NodePolicy, name: &str) -> &'a PolicyChain {
        n.chains
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no chain {name} in {:#?}", n.chains))
    }

    fn set<'a>(n: &'a NodePolicy, rule: &str) -> &'a AddressSet {
        let name = rule
            .split('@')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no set in {rule}"));
        n.sets.iter().find(|s| s.name == name).unwrap()
    }

    const DENY_INGRESS_X: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: deny, namespace: x }\nspec: { podSelector: {} }\n";

    #[test]
    fn first_match_lists_refuse_calico_policies_instead_of_ignoring_them() {
        let gnp = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\n\
                   metadata: { name: deny-all }\nspec:\n  selector: all()\n  types: [Ingress]\n";
        let e = compile_first_match(&cluster(gnp), "node-1", &EnforceOptions::default())
            .expect_err("the eBPF and OVS lists do not compile Calico's tiers");
        let text = e.to_string();
        assert!(text.contains("GlobalNetworkPolicy"), "{text}");
        assert!(text.contains("deny-all"), "{text}");
        let anp = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\n\
                   metadata: { name: deny-x }\nspec:\n  priority: 10\n  subject: { namespaces: {} }\n  \
                   ingress: [ { action: Deny, from: [ { namespaces: {} } ] } ]\n";
        assert!(
            compile_first_match(&cluster(anp), "node-1", &EnforceOptions::default()).is_ok()
        );
    }

    #[test]
    fn a_node_gets_chains_for_its_own_pod_network_pods_only() {
        let n = node(DENY_INGRESS_X, "node-1");
        let names: Vec<&str> = n.chains.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["egress/x/a", "ingress/x/a", "egress/y/a", "ingress/y/a"],
            "x/b runs on node-2; y/host is hostNetwork"
        );
        let ingress = chain(&n, "ingress/x/a");
        assert_eq!(ingress.isolated_by, ["x/deny"]);
        assert_eq!(
            ingress.rules,
            ["counter drop comment \"x/a ingress denied\""]
        );
        assert!(
            chain(&n, "egress/x/a").rules.is_empty(),
            "no Egress in policyTypes: not isolated"
        );
        assert!(
            chain(&n, "ingress/y/a").rules.is_empty(),
            "another namespace's policy does not select y/a"
        );
        let text = n.to_nft();
        assert!(
            text.contains("iifname \"cali00000000001\" jump egress/x/a"),
            "{text}"
        );
        assert!(
            text.contains("oifname \"cali00000000001\" jump ingress/x/a"),
            "{text}"
        );
        assert!(!text.contains("cali00000000002"), "{text}");
        let n2 = node(DENY_INGRESS_X, "node-2");
        assert_eq!(chain(&n2, "ingress/x/b").rules.len(), 1);
    }

    #[test]
    fn pods_on_a_bridge_are_dispatched_by_address_not_interface() {
        let mut c = cluster(DENY_INGRESS_X);
        for p in &mut c.pods {
            if let Some(pl) = &mut p.placement
                && !pl.host_network
            {
                pl.host_if = format!("veth{}", &pl.name);
            }
        }
        let options = EnforceOptions {
            pod_match: PodMatch::Address,
            ..EnforceOptions::default()
        };
        let text = compile(&c, "node-1", &options).unwrap();
        // br_netfilter shows the bridge as the interface: no port names.
        assert!(!text.contains("iifname"), "{text}");
        assert!(!text.contains("oifname"), "{text}");
        for rule in [
            "ip saddr { 10.244.1.2 } jump egress/x/a",
            "ip6 saddr { fd00:1::2 } jump egress/x/a",
            "ip daddr { 10.244.1.2 } jump ingress/x/a",
            "ip saddr { 10.244.1.3 } jump egress/y/a",
            // The node to its pods: let through unpoliced, by address too.
            "ip daddr { 10.244.1.2, 10.244.1.3 } counter accept",
            "ip6 daddr { fd00:1::2 } counter accept",
        ] {
            assert!(text.contains(rule), "{rule}:\n{text}");
        }
        assert!(
            !text.contains("10.244.2.2 } jump"),
            "x/b lives on node-2: {text}"
        );
    }

    #[test]
    fn selector_peers_become_sets_of_pod_addresses_on_every_node() {
        let p = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: from-pod-a-anywhere, namespace: x }
spec:
  podSelector: { matchLabels: { pod: b } }
  ingress: [ { from: [ { namespaceSelector: {}, podSelector: { matchLabels: { pod: a } } } ] } ]
"#;
        let n = node(p, "node-2");
        let rules = &chain(&n, "ingress/x/b").rules;
        assert_eq!(rules.len(), 3, "v4 set, v6 set, drop: {rules:#?}");
        assert!(rules[0].starts_with("ip saddr @peer0_v4 counter return comment \"x/from-pod-a-anywhere ingress[0].from[0] x/b\""), "{}", rules[0]);
        let v4: Vec<String> = set(&n, &rules[0])
            .elements
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            v4,
            ["10.244.1.2", "10.244.1.3"],
            "pods on node-1 are in node-2's sets; hostNetwork y/host is not"
        );
        assert!(rules[1].starts_with("ip6 saddr @peer0_v6"), "{}", rules[1]);
        assert_eq!(
            set(&n, &rules[1]).elements,
            ["fd00:1::2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(rules[2], "counter drop comment \"x/b ingress denied\"");
    }

    #[test]
    fn pod_and_namespace_selectors_in_one_peer_are_and_in_two_peers_or() {
        let p = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: and, namespace: x }
spec:
  podSelector: { matchLabels: { pod: b } }
  ingress: [ { from: [ { namespaceSelector: { matchLabels: { ns: y } }, podSelector: { matchLabels: { pod: b } } } ] } ]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: or, namespace: x }
spec:
  podSelector: { matchLabels: { pod: b } }
  ingress: [ { from: [ { namespaceSelector: { matchLabels: { ns: y } } }, { podSelector: { matchLabels: { pod: a } } } ] } ]
"#;
        let n = node(p, "node-2");
        let rules = &chain(&n, "ingress/x/b").rules;
        assert!(
            !rules.iter().any(|r| r.contains("x/and")),
            "AND selects no pod: no rule: {rules:#?}"
        );
        let or: Vec<&String> = rules.iter().filter(|r| r.contains("x/or")).collect();
        let y: Vec<String> = set(&n, or[0])
            .elements
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(y, ["10.244.1.3"], "namespaceSelector alone: all pods of y");
        assert!(
            or[0].contains("from[0]") && or[1].contains("from[1]"),
            "{or:#?}"
        );
        let x: Vec<String> = set(&n, or[1])
            .elements
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            x,
            ["10.244.1.2"],
            "podSelector alone: the policy's namespace"
        );
    }

    #[test]
    fn ip_blocks_ports_and_ranges() {
        let p = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: blocks, namespace: x }
spec:
  podSelector: { matchLabels: { pod: a } }
  policyTypes: [ Egress ]
  egress:
    - to: [ { ipBlock: { cidr: 10.0.0.1/8, except: [ 10.1.0.0/16, 10.2.0.0/16 ] } }, { ipBlock: { cidr: "fd00::/8" } } ]
      ports: [ { port: 80, endPort: 90 }, { protocol: UDP, port: 53 }, { protocol: SCTP } ]
"#;
        let n = node(p, "node-1");
        let rules = &chain(&n, "egress/x/a").rules;
        assert_eq!(
            rules[0],
            "ip daddr 10.0.0.0/8 ip daddr != { 10.1.0.0/16, 10.2.0.0/16 } meta l4proto tcp th dport 80-90 counter return comment \"x/blocks egress[0].to[0].ports[0] x/a\""
        );
        assert!(rules[1].starts_with("ip daddr 10.0.0.0/8 ip daddr != { 10.1.0.0/16, 10.2.0.0/16 } meta l4proto udp th dport 53 counter"), "{}", rules[1]);
        assert!(rules[2].starts_with("ip daddr 10.0.0.0/8 ip daddr != { 10.1.0.0/16, 10.2.0.0/16 } meta l4proto sctp counter"), "{}", rules[2]);
        assert!(
            rules[3].starts_with("ip6 daddr fd00::/8 meta l4proto tcp th dport 80-90 counter"),
            "{}",
            rules[3]
        );
        assert_eq!(rules.len(), 7);
        assert!(
            chain(&n, "ingress/x/a").rules.is_empty(),
            "explicit policyTypes [Egress]: ingress not isolated"
        );

        let strict = compile_node(
            &cluster(p),
            "node-1",
            &EnforceOptions {
                ipblock_matches_pods: false,
                ..EnforceOptions::default()
            },
        )
        .unwrap();
        let rules = &chain(&strict, "egress/x/a").rules;
        assert!(
            rules[0].contains("ip daddr != { 10.1.0.0/16, 10.2.0.0/16 } ip daddr != @pods_v4 meta"),
            "{}",
            rules[0]
        );
        let pods_v4: Vec<String> = strict
            .sets
            .iter()
            .find(|s| s.name == "pods_v4")
            .unwrap()
            .elements
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            pods_v4,
            ["10.244.1.2", "10.244.2.2", "10.244.1.3"],
            "every pod-network pod, not hostNetwork"
        );
    }

    #[test]
    fn named_ports_resolve_per_destination_pod() {
        let p = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: http-out, namespace: x }
spec:
  podSelector: {}
  policyTypes: [ Ingress, Egress ]
  ingress: [ { ports: [ { port: http } ] } ]
  egress: [ { to: [ { podSelector: {} } ], ports: [ { port: http }, { port: dns, protocol: UDP }, { port: nope } ] } ]
"#;
        let n = node(p, "node-1");
        let egress = &chain(&n, "egress/x/a").rules;
        let http: Vec<&String> = egress.iter().filter(|r| r.contains("ports[0]")).collect();
        assert_eq!(http.len(), 3, "{egress:#?}");
        assert!(
            http[0].starts_with("ip daddr { 10.244.1.2 } meta l4proto tcp th dport 80 counter"),
            "{}",
            http[0]
        );
        assert!(
            http[1].starts_with("ip6 daddr { fd00:1::2 } meta l4proto tcp th dport 80 counter"),
            "{}",
            http[1]
        );
        assert!(
            http[2].starts_with("ip daddr { 10.244.2.2 } meta l4proto tcp th dport 8080 counter"),
            "{}",
            http[2]
        );
        let dns: Vec<&String> = egress.iter().filter(|r| r.contains("ports[1]")).collect();
        assert_eq!(dns.len(), 1);
        assert!(
            dns[0].starts_with("ip daddr { 10.244.2.2 } meta l4proto udp th dport 53"),
            "UDP name, UDP port: {}",
            dns[0]
        );
        assert!(
            !egress.iter().any(|r| r.contains("ports[2]")),
            "a name no pod declares matches nothing"
        );
        assert_eq!(
            egress.last().unwrap(),
            "counter drop comment \"x/a egress denied\""
        );
        // Ingress: the destination is the chain's own pod.
        assert!(
            chain(&n, "ingress/x/a").rules[0]
                .starts_with("meta l4proto tcp th dport 80 counter return")
        );
        let n2 = node(p, "node-2");
        assert!(
            chain(&n2, "ingress/x/b").rules[0]
                .starts_with("meta l4proto tcp th dport 8080 counter return")
        );
    }

    #[test]
    fn policy_types_default_from_the_rules() {
        let p = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: egress-rules, namespace: x }
spec: { podSelector: { matchLabels: { pod: a } }, egress: [ { ports: [ { port: 53, protocol: UDP } ] } ] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: empty-egress, namespace: y }
spec: { podSelector: {}, egress: [], ingress: [] }
"#;
        let n = node(p, "node-1");
        assert_eq!(
            chain(&n, "ingress/x/a").isolated_by,
            ["x/egress-rules"],
            "Ingress always"
        );
        assert_eq!(
            chain(&n, "egress/x/a").isolated_by,
            ["x/egress-rules"],
            "Egress: it has egress rules"
        );
        assert_eq!(chain(&n, "egress/x/a").rules.len(), 2);
        assert_eq!(
            chain(&n, "ingress/y/a").rules,
            ["counter drop comment \"y/a ingress denied\""],
            "an empty list allows nothing"
        );
        assert!(
            chain(&n, "egress/y/a").isolated_by.is_empty(),
            "egress: [] without policyTypes does not isolate"
        );
    }

    #[test]
    fn host_to_pod_traffic_is_policed_only_when_asked() {
        let c = cluster(DENY_INGRESS_X);
        let default = compile(&c, "node-1", &EnforceOptions::default()).unwrap();
        let output = default
            .split("chain output")
            .nth(1)
            .unwrap()
            .split("chain ")
            .next()
            .unwrap();
        assert!(
            output.contains("oifname { \"cali00000000001\", \"cali00000000003\" } counter accept"),
            "{output}"
        );
        assert!(!output.contains("jump"), "{output}");
        let policed = compile(
            &c,
            "node-1",
            &EnforceOptions {
                police_host_to_pod: true,
                ..EnforceOptions::default()
            },
        )
        .unwrap();
        let output = policed
            .split("chain output")
            .nth(1)
            .unwrap()
            .split("chain ")
            .next()
            .unwrap();
        assert!(
            output.contains("oifname \"cali00000000001\" jump ingress/x/a"),
            "{output}"
        );
        let input = policed
            .split("chain input")
            .nth(1)
            .unwrap()
            .split("chain ")
            .next()
            .unwrap();
        assert!(
            input.contains("iifname \"cali00000000001\" jump egress/x/a"),
            "a pod's egress to its node is policed: {input}"
        );
        assert!(
            policed.starts_with("table inet netwatch_policy\ndelete table inet netwatch_policy\n"),
            "reloadable"
        );
    }

    #[test]
    fn label_selector_operators() {
        let err = |f: String, d: String| EnforceError::Policy {
            policy: "t".into(),
            field: f,
            detail: d,
        };
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": { "app": "web" },
            "matchExpressions": [
                { "key": "tier", "operator": "In", "values": ["a", "b"] },
                { "key": "env", "operator": "NotIn", "values": ["prod"] },
                { "key": "team", "operator": "Exists" },
                { "key": "legacy", "operator": "DoesNotExist" }
            ]
        }))
        .unwrap();
        let s = Selector::parse(Some(&sel), &err, "f").unwrap();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(
            s.matches(&labels(&[("app", "web"), ("tier", "a"), ("team", "t")])),
            "NotIn matches an absent key"
        );
        assert!(s.matches(&labels(&[
            ("app", "web"),
            ("tier", "b"),
            ("team", "t"),
            ("env", "dev")
        ])));
        assert!(
            !s.matches(&labels(&[("app", "web"), ("tier", "c"), ("team", "t")])),
            "In"
        );
        assert!(
            !s.matches(&labels(&[
                ("app", "web"),
                ("tier", "a"),
                ("team", "t"),
                ("env", "prod")
            ])),
            "NotIn"
        );
        assert!(
            !s.matches(&labels(&[("app", "web"), ("tier", "a")])),
            "Exists"
        );
        assert!(
            !s.matches(&labels(&[
                ("app", "web"),
                ("tier", "a"),
                ("team", "t"),
                ("legacy", "")
            ])),
            "DoesNotExist"
        );
        assert!(
            !s.matches(&labels(&[("tier", "a"), ("team", "t")])),
            "matchLabels"
        );
        assert_eq!(
            s.to_string(),
            "app=web,tier in (a,b),env notin (prod),team,!legacy"
        );
        assert!(
            Selector::default().matches(&BTreeMap::new()),
            "an empty selector selects everything"
        );
    }

    #[test]
    fn bad_policies_are_refused_naming_policy_and_field() {
        let cases = [
            (
                "podSelector: { matchExpressions: [ { key: a, operator: Like, values: [b] } ] }",
                "spec.podSelector.matchExpressions[0].operator",
                "In, NotIn, Exists or DoesNotExist",
            ),
            (
                "podSelector: { matchExpressions: [ { key: a, operator: In } ] }",
                "spec.podSelector.matchExpressions[0].values",
                "needs values",
            ),
            (
                "podSelector: {}\n  ingress: [ { ports: [ { port: http, endPort: 90 } ] } ]",
                "spec.ingress[0].ports[0].endPort",
                "numeric port",
            ),
            (
                "podSelector: {}\n  ingress: [ { ports: [ { port: 90, endPort: 80 } ] } ]",
                "spec.ingress[0].ports[0].endPort",
                "below port 90",
            ),
            (
                "podSelector: {}\n  ingress: [ { ports: [ { port: 70000 } ] } ]",
                "spec.ingress[0].ports[0].port",
                "not a port",
            ),
            (
                "podSelector: {}\n  ingress: [ { ports: [ { port: \"80\" } ] } ]",
                "spec.ingress[0].ports[0].port",
                "without quotes",
            ),
            (
                "podSelector: {}\n  ingress: [ { ports: [ { protocol: tcp } ] } ]",
                "spec.ingress[0].ports[0].protocol",
                "TCP, UDP or SCTP",
            ),
            (
                "podSelector: {}\n  egress: [ { to: [ { ipBlock: { cidr: 10.0.0.0/8, except: [ 11.0.0.0/16 ] } } ] } ]",
                "spec.egress[0].to[0].ipBlock.except[0]",
                "within cidr",
            ),
            (
                "podSelector: {}\n  egress: [ { to: [ { ipBlock: { cidr: 10.0.0.0/33 } } ] } ]",
                "spec.egress[0].to[0].ipBlock.cidr",
                "not a CIDR",
            ),
            (
                "podSelector: {}\n  ingress: [ { from: [ { ipBlock: { cidr: 10.0.0.0/8 }, podSelector: {} } ] } ]",
                "spec.ingress[0].from[0]",
                "separate peers",
            ),
            (
                "podSelector: {}\n  ingress: [ { from: [ {} ] } ]",
                "spec.ingress[0].from[0]",
                "needs podSelector",
            ),
            (
                "podSelector: {}\n  policyTypes: [ ingress ]",
                "spec.policyTypes[0]",
                "Ingress or Egress",
            ),
        ];
        for (spec, field, detail) in cases {
            let p = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{ name: bad, namespace: y }}\nspec:\n  {spec}\n"
            );
            // A policy for a namespace without pods on node-2 is still checked there.
            let e = compile(&cluster(&p), "node-2", &EnforceOptions::default())
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("NetworkPolicy y/bad: `{field}`: ")) && e.contains(detail),
                "{spec}\n=> {e}"
            );
        }
    }

    #[test]
    fn cluster_tiers_wrap_the_network_policy_rules() {
        let p = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: { name: admin }
spec:
  tier: Admin
  priority: 5
  subject: { namespaces: { matchLabels: { ns: x } } }
  ingress:
    - { name: pass-y, action: Pass, from: [ { namespaces: { matchLabels: { ns: y } } } ] }
    - { name: deny-all, action: Deny, from: [ { namespaces: {} } ] }
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: { name: default }
spec:
  subject: { namespaces: {} }
  egress: [ { name: no-dns, action: Deny, to: [ { networks: [ 10.0.0.0/8 ] } ], ports: [ { portNumber: { protocol: UDP, port: 53 } } ] } ]
"#;
        let n = node(&format!("{DENY_INGRESS_X}---\n{p}"), "node-1");
        let admin = chain(&n, "ingress/x/a");
        assert_eq!(
            admin.cluster_policies,
            ["ClusterNetworkPolicy admin (Admin)"]
        );
        assert!(
            admin.rules[0].starts_with("ip saddr @peer0_v4 counter goto ingress/x/a/below-admin comment \"ClusterNetworkPolicy admin (Admin) ingress[0] pass-y x/a\""),
            "{:#?}",
            admin.rules
        );
        assert!(admin.rules.iter().any(|r| r.contains(
            "counter drop comment \"ClusterNetworkPolicy admin (Admin) ingress[1] deny-all x/a\""
        )));
        assert_eq!(admin.rules.last().unwrap(), "goto ingress/x/a/below-admin");
        let below = chain(&n, "ingress/x/a/below-admin");
        assert!(!below.entry);
        assert_eq!(
            below.rules,
            ["counter drop comment \"x/a ingress denied\""],
            "NetworkPolicy isolates x/a: the Baseline tier is not reached"
        );
        let egress = chain(&n, "egress/y/a");
        assert_eq!(
            egress.rules,
            [
                "ip daddr 10.0.0.0/8 meta l4proto udp th dport 53 counter drop comment \"BaselineAdminNetworkPolicy default (Baseline) egress[0] no-dns y/a\""
            ],
            "not isolated by NetworkPolicy: the Baseline tier inline"
        );
        let text = n.to_nft();
        assert!(!text.contains("jump ingress/x/a/below-admin"), "{text}");
        let packet = |saddr: &str| Packet {
            saddr: saddr.parse().unwrap(),
            daddr: "10.244.1.2".parse().unwrap(),
            protocol: L4::Tcp,
            dport: 80,
            sport: None,
        };
        assert_eq!(
            n.judge("ingress/x/a", &packet("10.244.1.3")).unwrap(),
            Judgement::Dropped {
                by: "x/a ingress denied".into()
            },
            "y/a: passed to NetworkPolicy, which denies"
        );
        assert!(matches!(
            n.judge("ingress/x/a", &packet("10.244.2.2")).unwrap(),
            Judgement::Dropped { by } if by.contains("deny-all")
        ));
    }

    #[test]
    fn bad_cluster_policies_are_refused_naming_kind_and_field() {
        let cases = [
            (
                "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: { name: other }\nspec: { subject: { namespaces: {} } }",
                "BaselineAdminNetworkPolicy other: `metadata.name`",
            ),
            (
                "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: { name: c }\nspec: { tier: admin, priority: 1, subject: { namespaces: {} } }",
                "ClusterNetworkPolicy c: `spec.tier`",
            ),
            (
                "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: { name: a }\nspec: { priority: 1, subject: { namespaces: {} }, ingress: [ { action: Accept, from: [ { namespaces: {} } ] } ] }",
                "AdminNetworkPolicy a: `spec.ingress[0].action`",
            ),
            (
                "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: { name: c }\nspec: { tier: Admin, priority: 1, subject: { namespaces: {} }, egress: [ { action: Deny, to: [ { networks: [ 10.0.0.0/8 ] } ], protocols: [ { destinationNamedPort: http } ] } ] }",
                "ClusterNetworkPolicy c: `spec.egress[0]`",
            ),
        ];
        for (p, want) in cases {
            let e = compile(&cluster(p), "node-1", &EnforceOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{p}\n=> {e}");
        }
    }

    #[test]
    fn comments_fit_nftables() {
        let long = "x".repeat(300);
        assert_eq!(comment(&long).len(), COMMENT_MAX);
        assert_eq!(comment("say \"hi\""), "say 'hi'");
        assert_eq!(
            comment(&"é".repeat(100)).len(),
            126,
            "cut on a character boundary"
        );
    }
}
