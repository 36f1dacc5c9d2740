//! The flow record: one per denied flow, in the shape of Hubble's flow
//! export so tools that read Hubble flow logs read netwatch's.
//!
//! Hubble's names are kept wherever the concept exists (`time`, `uuid`,
//! `verdict`, `drop_reason_desc`, `IP`, `l4`, `source`, `destination`,
//! `Type`, `node_name`, `event_type`, `traffic_direction`, `is_reply`,
//! `interface`, `Summary`, `*_allowed_by`, `*_denied_by`). netwatch's
//! additions are documented on each field below.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::identity::Endpoint;
pub use crate::record::PolicyRef;
use crate::record::policy::{deserialize_record_list, serialize_record_list};
use crate::record::shared::{SharedList, SharedStr};

/// What happened to a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// The node dropped its packets (`drop_reason_desc` says why).
    Dropped,
    /// netwatch: the handshake (TCP SYN, SCTP INIT, DNS query) was never
    /// answered, and the node did not drop it: dropped elsewhere, or the
    /// peer is gone.
    TimedOut,
    /// netwatch: the peer (or a firewall on the way) answered with a TCP RST,
    /// an ICMP unreachable or an SCTP ABORT.
    Refused,
    /// netwatch: a connection the NetworkPolicies deny was established: the
    /// CNI does not enforce them for this pair.
    PolicyNotEnforced,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Dropped => "DROPPED",
            Verdict::TimedOut => "TIMED_OUT",
            Verdict::Refused => "REFUSED",
            Verdict::PolicyNotEnforced => "POLICY_NOT_ENFORCED",
        }
    }

    pub const ALL: [Verdict; 4] = [
        Verdict::Dropped,
        Verdict::TimedOut,
        Verdict::Refused,
        Verdict::PolicyNotEnforced,
    ];
}

impl std::str::FromStr for Verdict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Verdict::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "unknown verdict {s:?}; valid: DROPPED, TIMED_OUT, REFUSED, POLICY_NOT_ENFORCED"
                )
            })
    }
}

/// Hubble's `IP` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpInfo {
    pub source: IpAddr,
    pub destination: IpAddr,
    #[serde(rename = "ipVersion")]
    pub ip_version: SharedStr,
}

/// TCP flags as Hubble spells them (only set flags appear).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub struct TcpFlags {
    #[serde(default, skip_serializing_if = "is_false")]
    pub fin: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub syn: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub rst: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub psh: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ack: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub urg: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ece: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub cwr: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl TcpFlags {
    pub fn from_bits(bits: u8) -> TcpFlags {
        use netwatch_common::tcp_flags as f;
        TcpFlags {
            fin: bits & f::FIN != 0,
            syn: bits & f::SYN != 0,
            rst: bits & f::RST != 0,
            psh: bits & f::PSH != 0,
            ack: bits & f::ACK != 0,
            urg: bits & f::URG != 0,
            ece: bits & f::ECE != 0,
            cwr: bits & f::CWR != 0,
        }
    }

    /// "SYN, ACK" as in Hubble's summary.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (set, name) in [
            (self.syn, "SYN"),
            (self.ack, "ACK"),
            (self.fin, "FIN"),
            (self.rst, "RST"),
            (self.psh, "PSH"),
            (self.urg, "URG"),
            (self.ece, "ECE"),
            (self.cwr, "CWR"),
        ] {
            if set {
                v.push(name);
            }
        }
        v
    }
}

/// Ports of TCP, UDP and SCTP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub source_port: u16,
    pub destination_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<TcpFlags>,
}

/// ICMP type and code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub icmp_type: u8,
    pub code: u8,
}

/// Hubble's `l4` object: exactly one protocol key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum L4 {
    #[serde(rename = "TCP")]
    Tcp(Ports),
    #[serde(rename = "UDP")]
    Udp(Ports),
    #[serde(rename = "SCTP")]
    Sctp(Ports),
    #[serde(rename = "ICMPv4")]
    Icmpv4(Icmp),
    #[serde(rename = "ICMPv6")]
    Icmpv6(Icmp),
    /// netwatch: an IP protocol netwatch does not parse.
    #[serde(rename = "other")]
    Other { protocol: u8 },
}

impl L4 {
    /// "TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6" or the protocol number.
    pub fn protocol_name(&self) -> String {
        match self {
            L4::Tcp(_) => "TCP".into(),
            L4::Udp(_) => "UDP".into(),
            L4::Sctp(_) => "SCTP".into(),
            L4::Icmpv4(_) => "ICMPv4".into(),
            L4::Icmpv6(_) => "ICMPv6".into(),
            L4::Other { protocol } => format!("proto-{protocol}"),
        }
    }

    pub fn ports(&self) -> Option<&Ports> {
        match self {
            L4::Tcp(p) | L4::Udp(p) | L4::Sctp(p) => Some(p),
            _ => None,
        }
    }
}

/// Where a client sent a flow before the node translated its destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginalDestination {
    pub ip: IpAddr,
    pub port: u16,
}

/// The outer header of an encapsulated pod packet: the nodes' addresses and
/// the tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OuterHeader {
    pub source: IpAddr,
    pub destination: IpAddr,
    /// `UDP` (VXLAN, Geneve) or `IPIP` (IP in IP, IPv6 in IP).
    pub protocol: String,
    /// The tunnel's UDP destination port (absent for IPIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub encapsulation: Encapsulation,
}

/// The tunnel protocol of an [`OuterHeader`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encapsulation {
    Vxlan,
    Geneve,
    Ipip,
}

/// Hubble's `event_type`: 1 is a drop (sub_type: the drop reason), 4 a trace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventType {
    #[serde(rename = "type")]
    pub kind: i32,
    #[serde(default)]
    pub sub_type: i32,
}

/// Hubble's `interface`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub index: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// Where in its life a flow record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Lifecycle {
    /// The first record of this flow (`uuid`), out within 100 ms of the first drop.
    New,
    /// Counts or details changed; rate-limited per flow.
    Update,
    /// The flow went quiet: final counts.
    Final,
}

/// One denied flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// When this record was written (the flow's last signal).
    pub time: DateTime<Utc>,
    /// Stable for all records of one flow.
    pub uuid: String,
    pub verdict: Verdict,
    /// The kernel's drop reason name (`NETFILTER_DROP`, ...), for DROPPED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<SharedStr>,
    #[serde(rename = "IP")]
    pub ip: IpInfo,
    pub l4: L4,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// netwatch: the address and port the client connected to, when the node
    /// translated it (a service's cluster IP before DNAT); `IP.destination`
    /// and `l4` then hold the backend the packets went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_destination: Option<OriginalDestination>,
    /// netwatch: the tunnel between nodes the packets were in where they
    /// were dropped (a node firewall dropping VXLAN, Geneve or IPIP); `IP`
    /// and `l4` then hold the pod flow inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer: Option<OuterHeader>,
    #[serde(rename = "Type")]
    pub flow_type: SharedStr,
    pub node_name: SharedStr,
    pub event_type: EventType,
    /// INGRESS or EGRESS relative to the pod whose policy applies; unknown
    /// until attribution says which side denies.
    pub traffic_direction: SharedStr,
    pub is_reply: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<Interface>,
    #[serde(rename = "Summary")]
    pub summary: SharedStr,
    /// Hubble's `Policy` list; netwatch adds `tier` and `rule` for the
    /// cluster-scoped kinds (see [`PolicyRef`]).
    #[serde(
        default,
        skip_serializing_if = "SharedList::is_empty",
        serialize_with = "serialize_record_list",
        deserialize_with = "deserialize_record_list"
    )]
    pub egress_allowed_by: SharedList<PolicyRef>,
    #[serde(
        default,
        skip_serializing_if = "SharedList::is_empty",
        serialize_with = "serialize_record_list",
        deserialize_with = "deserialize_record_list"
    )]
    pub ingress_allowed_by: SharedList<PolicyRef>,
    #[serde(
        default,
        skip_serializing_if = "SharedList::is_empty",
        serialize_with = "serialize_record_list",
        deserialize_with = "deserialize_record_list"
    )]
    pub egress_denied_by: SharedList<PolicyRef>,
    #[serde(
        default,
        skip_serializing_if = "SharedList::is_empty",
        serialize_with = "serialize_record_list",
        deserialize_with = "deserialize_record_list"
    )]
    pub ingress_denied_by: SharedList<PolicyRef>,

    // ---- netwatch additions ----
    /// netwatch: NEW, UPDATE or FINAL (see [`Lifecycle`]).
    pub lifecycle: Lifecycle,
    /// netwatch: packets of this flow: dropped (DROPPED, exact, counted in
    /// the kernel) or handshake attempts such as SYNs (TIMED_OUT, REFUSED).
    pub packets: u64,
    /// netwatch: bytes of those packets (IP length).
    pub bytes: u64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// netwatch: every kernel drop reason seen for this flow, when more than one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop_reasons: Vec<String>,
    /// netwatch: how the flow was refused (TCP_RESET, ICMP_PORT_UNREACHABLE,
    /// ICMP_ADMIN_PROHIBITED, SCTP_ABORT, ...), for REFUSED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// netwatch: the handshake also went unanswered for the connect timeout
    /// (a DROPPED flow whose client gave up or is still retrying).
    #[serde(default, skip_serializing_if = "is_false")]
    pub timed_out: bool,
    /// netwatch: a DNS query (UDP or TCP port 53).
    #[serde(default, skip_serializing_if = "is_false")]
    pub is_dns: bool,
    /// netwatch: the kernel hooks that saw it: `kfree_skb`, `tc`, `sock_ops`.
    pub observation_points: SharedList<String>,
    /// netwatch: cgroup v2 id of the connecting process (from sock_ops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// netwatch: one sentence on why: which policy isolates which pod, or
    /// that NetworkPolicy does not explain it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<SharedStr>,
    /// netwatch: rules that almost allowed the flow, and what did not match.
    #[serde(default, skip_serializing_if = "SharedList::is_empty")]
    pub near_misses: SharedList<String>,
    /// netwatch: identity did not arrive within the enrichment deadline.
    #[serde(default, skip_serializing_if = "is_false")]
    pub unenriched: bool,
    /// netwatch: this record summarises many flows the kernel could not
    /// track one by one (its per-flow drop table was full: a flood): all
    /// drops from `IP.source` to `IP.destination` and the destination port,
    /// with one reason, whatever their source port (`source_port` is 0).
    /// `packets` and `bytes` count all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<Aggregate>,
    /// netwatch: Calico's staged policies (never enforced), when enforcing
    /// them would change this flow's policy decision: the verdict they
    /// would give and the policies that would decide (see [`StagedWhatIf`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedWhatIf>,
}

/// A what-if of Calico's staged policies (StagedNetworkPolicy,
/// StagedGlobalNetworkPolicy, StagedKubernetesNetworkPolicy) for one flow:
/// present on a record only when enforcing them would change the verdict
/// or the policies that decide it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagedWhatIf {
    /// `ALLOWED` or `DENIED`: the policy verdict with the staged policies
    /// enforced.
    pub verdict: String,
    /// The policies allow this flow today and the staged ones would deny
    /// it ("would deny if enforced").
    pub would_deny_if_enforced: bool,
    /// The deciding policies with the staged ones enforced (kind, tier,
    /// rule as in `*_denied_by`; staged kinds are `Staged*.projectcalico.org`).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_record_list",
        deserialize_with = "deserialize_record_list"
    )]
    pub egress_denied_by: Vec<PolicyRef>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_record_list",
        deserialize_with = "deserialize_record_list"
    )]
    pub ingress_denied_by: Vec<PolicyRef>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_record_list",
        deserialize_with = "deserialize_record_list"
    )]
    pub egress_allowed_by: Vec<PolicyRef>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_record_list",
        deserialize_with = "deserialize_record_list"
    )]
    pub ingress_allowed_by: Vec<PolicyRef>,
}

impl StagedWhatIf {
    /// `kind tier/policy rule N [side]` for each deciding staged policy,
    /// for one-line outputs.
    pub fn labels(&self) -> Vec<String> {
        let label = |p: &PolicyRef, side: &str| format!("{p} [{side}]");
        self.egress_denied_by
            .iter()
            .map(|p| label(p, "egress"))
            .chain(self.ingress_denied_by.iter().map(|p| label(p, "ingress")))
            .collect()
    }
}

/// What an aggregated record stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Distinct flows (source ports) summarised, each counted once.
    pub flows: u64,
}

impl FlowRecord {
    /// The denying policies as `namespace/name [egress|ingress]` (cluster
    /// policies as `Kind name rule N [egress]`), egress
    /// first (the order a CNI checks them in).
    pub fn denied_by_labels(&self) -> Vec<String> {
        let label = |p: &PolicyRef, side: &str| format!("{p} [{side}]");
        self.egress_denied_by
            .iter()
            .map(|p| label(p, "egress"))
            .chain(self.ingress_denied_by.iter().map(|p| label(p, "ingress")))
            .collect()
    }
}

/// One line of the flow log: `{"flow": {...}, "node_name": ..., "time": ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowLogLine {
    pub flow: FlowRecord,
    pub node_name: String,
    pub time: DateTime<Utc>,
}

impl FlowLogLine {
    pub fn new(flow: FlowRecord) -> FlowLogLine {
        FlowLogLine {
            node_name: flow.node_name.to_string(),
            time: flow.time,
            flow,
        }
    }
}
