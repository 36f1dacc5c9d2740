//! A node's compiled chains run on one packet without a kernel: the rule
//! text read as nftables reads it, for the expressions the compiler writes
//! (`ip`/`ip6` `saddr`/`daddr` [`!=`] address, prefix, `{ list }` or
//! `@set`; `meta l4proto` [`!=`] name or number; `meta nfproto`; `th
//! dport` [`!=`] number or range; `icmp`/`icmpv6` `type`/`code` (never an
//! ICMP packet here); `counter`; the
//! verdicts `return`, `drop`, `accept`, `jump`, `goto`). What the kernel
//! would do with the same text, as long as the compiler writes nothing else:
//! anything else is an error, not a guess.

use std::net::IpAddr;

use super::{Cidr, L4, NodePolicy};

/// The packet opening a connection (policies are stateful: replies follow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub protocol: L4,
    pub dport: u16,
    /// `None`: unknown, as the policy engine takes it without one (`th
    /// sport` ranges match nothing, `th sport !=` excludes nothing).
    pub sport: Option<u16>,
}

/// How a chain ended for a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// The chain returned: allowed this way, on to the next check. `by` is
    /// the comment of the rule that returned; `None` when no rule matched.
    Allowed { by: Option<String> },
    /// Dropped by the rule with this comment.
    Dropped { by: String },
}

impl Judgement {
    pub fn allowed(&self) -> bool {
        matches!(self, Judgement::Allowed { .. })
    }
}

impl NodePolicy {
    /// Run `chain` on `packet`.
    pub fn judge(&self, chain: &str, packet: &Packet) -> Result<Judgement, String> {
        self.run(chain, packet, 0)
    }

    fn run(&self, chain: &str, packet: &Packet, depth: usize) -> Result<Judgement, String> {
        if depth > 16 {
            return Err(format!("chain {chain}: jumps nest too deep"));
        }
        let c = self
            .chains
            .iter()
            .find(|c| c.name == chain)
            .ok_or_else(|| format!("no chain {chain}"))?;
        for rule in &c.rules {
            let (matched, verdict, comment) = self
                .rule_matches(rule, packet)
                .map_err(|e| format!("chain {chain}, rule {rule:?}: {e}"))?;
            if !matched {
                continue;
            }
            match verdict {
                Verdict::Return => return Ok(Judgement::Allowed { by: comment }),
                Verdict::Drop => {
                    return Ok(Judgement::Dropped {
                        by: comment.unwrap_or_default(),
                    });
                }
                Verdict::Goto(target) => return self.run(&target, packet, depth + 1),
                Verdict::Jump(target) => match self.run(&target, packet, depth + 1)? {
                    Judgement::Allowed { .. } => continue,
                    dropped => return Ok(dropped),
                },
                Verdict::None => continue,
            }
        }
        Ok(Judgement::Allowed { by: None })
    }

    /// Whether `rule` matches, its verdict and comment.
    fn rule_matches(
        &self,
        rule: &str,
        packet: &Packet,
    ) -> Result<(bool, Verdict, Option<String>), String> {
        let (body, comment) = match rule.find(" comment \"") {
            Some(i) => (
                &rule[..i],
                Some(rule[i + 10..].trim_end_matches('"').to_string()),
            ),
            None if rule.starts_with("comment \"") => ("", None),
            None => (rule, None),
        };
        let tokens = tokenize(body)?;
        let mut matched = true;
        let mut verdict = Verdict::None;
        let mut i = 0;
        let next = |i: usize| -> Result<&str, String> {
            tokens
                .get(i)
                .map(String::as_str)
                .ok_or_else(|| "rule ends early".to_string())
        };
        while i < tokens.len() {
            match tokens[i].as_str() {
                family @ ("ip" | "ip6") => {
                    let field = next(i + 1)?;
                    let address = match field {
                        "saddr" => packet.saddr,
                        "daddr" => packet.daddr,
                        other => return Err(format!("{family} {other}")),
                    };
                    let negated = next(i + 2)? == "!=";
                    let operand = next(i + 2 + usize::from(negated))?;
                    i += 3 + usize::from(negated);
                    // `ip ...` implies an IPv4 packet, `ip6 ...` an IPv6 one.
                    if address.is_ipv4() != (family == "ip") {
                        matched = false;
                        continue;
                    }
                    let inside = self.contains(operand, address)?;
                    matched &= inside != negated;
                }
                "meta" => {
                    let negated = next(i + 2)? == "!=";
                    let value = next(i + 2 + usize::from(negated))?;
                    let is = match next(i + 1)? {
                        // Names for TCP, UDP and SCTP, numbers for the rest
                        // (which a packet here never is).
                        "l4proto" => value == packet.protocol.nft(),
                        "nfproto" => {
                            value
                                == if packet.daddr.is_ipv4() {
                                    "ipv4"
                                } else {
                                    "ipv6"
                                }
                        }
                        other => return Err(format!("meta {other}")),
                    };
                    matched &= is != negated;
                    i += 3 + usize::from(negated);
                }
                "th" => {
                    let port = match next(i + 1)? {
                        "dport" => Some(packet.dport),
                        "sport" => packet.sport,
                        other => return Err(format!("th {other}")),
                    };
                    let negated = next(i + 2)? == "!=";
                    let ports = next(i + 2 + usize::from(negated))?;
                    let (a, b) = ports.split_once('-').unwrap_or((ports, ports));
                    let (a, b): (u16, u16) = (
                        a.parse().map_err(|_| format!("port {ports}"))?,
                        b.parse().map_err(|_| format!("port {ports}"))?,
                    );
                    matched &= port.is_some_and(|p| (a..=b).contains(&p)) != negated;
                    i += 3 + usize::from(negated);
                }
                "icmp" | "icmpv6" => {
                    if !matches!(next(i + 1)?, "type" | "code") {
                        return Err(format!("{} {}", tokens[i], next(i + 1)?));
                    }
                    next(i + 2)?;
                    // The packets judged here are TCP, UDP or SCTP.
                    matched = false;
                    i += 3;
                }
                "counter" => i += 1,
                "return" => {
                    verdict = Verdict::Return;
                    i += 1;
                }
                "drop" => {
                    verdict = Verdict::Drop;
                    i += 1;
                }
                "goto" => {
                    verdict = Verdict::Goto(next(i + 1)?.to_string());
                    i += 2;
                }
                "jump" => {
                    verdict = Verdict::Jump(next(i + 1)?.to_string());
                    i += 2;
                }
                other => return Err(format!("unknown expression {other:?}")),
            }
        }
        Ok((matched, verdict, comment))
    }

    /// Whether `address` is in an operand: `@set`, `{ a, b/n }`, `a` or `a/n`.
    fn contains(&self, operand: &str, address: IpAddr) -> Result<bool, String> {
        if let Some(name) = operand.strip_prefix('@') {
            let set = self
                .sets
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| format!("no set {name}"))?;
            return Ok(set.elements.contains(&address));
        }
        let list = operand
            .strip_prefix('{')
            .and_then(|o| o.strip_suffix('}'))
            .unwrap_or(operand);
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let prefix = if item.contains('/') {
                Cidr::parse(item)?
            } else {
                let ip: IpAddr = item.parse().map_err(|_| format!("address {item:?}"))?;
                Cidr::parse(&format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 }))?
            };
            if prefix.contains(address) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

enum Verdict {
    None,
    Return,
    Drop,
    Goto(String),
    Jump(String),
}

/// Words, with `{ ... }` as one word.
fn tokenize(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if rest.starts_with('{') {
            let end = rest.find('}').ok_or("unclosed {")?;
            out.push(rest[..=end].to_string());
            rest = rest[end + 1..].trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            rest = rest[end..].trim_start();
        }
    }
    Ok(out)
}

/// Every node's compiled policy: the lab's verdict on a connection, as the
/// kernels loaded with them would reach it.
#[derive(Clone, Debug)]
pub struct CompiledCluster {
    pub nodes: Vec<NodePolicy>,
    cluster: super::LabCluster,
}

/// The two checks a connection passes: the source pod's egress chain on its
/// node, the destination pod's ingress chain on its node. `None` where the
/// end is no policed pod (hostNetwork, not a pod, not placed on a node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub egress: Option<Judgement>,
    pub ingress: Option<Judgement>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .all(Judgement::allowed)
    }
}

impl CompiledCluster {
    /// Compile every node that has a placed pod.
    pub fn new(
        cluster: &super::LabCluster,
        options: &super::EnforceOptions,
    ) -> Result<CompiledCluster, super::EnforceError> {
        let nodes: std::collections::BTreeSet<&str> = cluster
            .pods
            .iter()
            .filter_map(|p| p.placement.as_ref().map(|pl| pl.node.as_str()))
            .collect();
        Ok(CompiledCluster {
            nodes: nodes
                .into_iter()
                .map(|n| super::compile_node(cluster, n, options))
                .collect::<Result<_, _>>()?,
            cluster: cluster.clone(),
        })
    }

    /// Pod `from` (`namespace/name`) opening a connection to `to`:`port`,
    /// from its address of `to`'s family, from an unknown source port.
    pub fn decide(
        &self,
        from: &str,
        to: IpAddr,
        protocol: L4,
        port: u16,
    ) -> Result<Decision, String> {
        self.decide_from_port(from, None, to, protocol, port)
    }

    /// Like [`CompiledCluster::decide`], from source port `sport`.
    pub fn decide_from_port(
        &self,
        from: &str,
        sport: Option<u16>,
        to: IpAddr,
        protocol: L4,
        port: u16,
    ) -> Result<Decision, String> {
        let source = self
            .cluster
            .pod(from)
            .ok_or_else(|| format!("no pod {from}"))?;
        let saddr = source
            .ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == to.is_ipv4())
            .ok_or_else(|| format!("{from} has no address of {to}'s family"))?;
        let packet = Packet {
            saddr,
            daddr: to,
            protocol,
            dport: port,
            sport,
        };
        let chain_of = |pod: &super::ClusterPod, d: super::Direction| {
            let node = &pod.placement.as_ref()?.node;
            pod.local_interface(node)?;
            let n = self.nodes.iter().find(|n| &n.node == node)?;
            Some(n.judge(&format!("{}/{}", d.field(), pod.id()), &packet))
        };
        let egress = chain_of(source, super::Direction::Egress).transpose()?;
        let destination = self
            .cluster
            .pods
            .iter()
            .find(|p| p.is_policy_pod() && p.ips.contains(&to));
        let ingress = destination
            .and_then(|d| chain_of(d, super::Direction::Ingress))
            .transpose()?;
        Ok(Decision { egress, ingress })
    }
}
