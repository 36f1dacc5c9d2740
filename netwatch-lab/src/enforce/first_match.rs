//! Every policy of a pod in one direction as one ordered, first-match list
//! of (peers, ports, action): the form datapaths without nftables' chains
//! compile into compares (the eBPF datapath's TC programs) or flow
//! priorities (the Open vSwitch datapath). Same evaluation as the chains
//! of [`super::Compiler::pod_chains`], flattened:
//!
//! - `admin`: the Admin tier's rules by ascending priority, in written
//!   order: Allow and Deny decide, Pass skips to `below`;
//! - `below`: the NetworkPolicies' allows when they isolate the pod (then
//!   `otherwise` is Deny), else the Baseline tier's rules (Pass allows, as
//!   the end of the tiers does; `otherwise` is Allow).

use std::collections::BTreeMap;

use super::{
    Allow, ClusterPod, Compiler, Direction, EnforceError, EnforceOptions, LabCluster, Policy,
    parse_policy, tiers,
};

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Admin tier only: on to the pod's `below` rules.
    Pass,
}

/// One rule of a first-match list: what it matches and what it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchRule {
    pub matches: Allow,
    pub action: Action,
}

/// A pod's policy in one direction; the first matching rule decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirstMatch {
    pub admin: Vec<MatchRule>,
    /// Allow or Deny only.
    pub below: Vec<MatchRule>,
    /// When nothing matched (or an Admin rule passed and nothing below
    /// matched): Deny when NetworkPolicies isolate the pod.
    pub otherwise: Action,
}

/// One local pod's lists; `None` where nothing polices that direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFirstMatch {
    pub pod: String,
    pub host_if: String,
    pub ips: Vec<std::net::IpAddr>,
    pub ingress: Option<FirstMatch>,
    pub egress: Option<FirstMatch>,
}

/// The first-match lists of every pod wired on `node`: NetworkPolicies and
/// the cluster tiers.
pub fn compile_first_match(
    cluster: &LabCluster,
    node: &str,
    options: &EnforceOptions,
) -> Result<Vec<PodFirstMatch>, EnforceError> {
    // Calico's tiers (Log, Pass across tiers, end-of-tier denies) are not
    // in these lists: refused rather than left unenforced.
    if let Some(p) = cluster.manifests.calico_policies.first() {
        return Err(EnforceError::NotInThisDatapath {
            kind: format!("{} ({})", p.kind, crate::manifests::CALICO_API_VERSION),
            name: crate::manifests::object_id(&p.metadata),
        });
    }
    let policies = cluster
        .manifests
        .network_policies
        .iter()
        .map(parse_policy)
        .collect::<Result<Vec<_>, _>>()?;
    let cluster_policies = tiers::parse_all(&cluster.manifests.tier_policies)?;
    let c = Compiler {
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
    Ok(local
        .into_iter()
        .map(|(pod, host_if)| PodFirstMatch {
            pod: pod.id(),
            host_if: host_if.into(),
            ips: pod.ips.clone(),
            ingress: c.first_match(pod, Direction::Ingress, &policies, &cluster_policies),
            egress: c.first_match(pod, Direction::Egress, &policies, &cluster_policies),
        })
        .collect())
}

impl Compiler<'_> {
    fn first_match(
        &self,
        pod: &ClusterPod,
        d: Direction,
        policies: &[Policy],
        cluster_policies: &[tiers::ClusterPolicy],
    ) -> Option<FirstMatch> {
        let namespace_labels = self.cluster.namespace_labels(&pod.namespace);
        let acting = cluster_policies.iter().filter(|p| {
            !p.rules(d).is_empty()
                && p.subject.namespaces.matches(&namespace_labels)
                && p.subject.pods.matches(&pod.labels)
        });
        let mut admin = Vec::new();
        let mut baseline = Vec::new();
        for p in acting {
            let (out, in_admin) = match p.tier {
                tiers::Tier::Admin => (&mut admin, true),
                tiers::Tier::Baseline => (&mut baseline, false),
            };
            for rule in p.rules(d) {
                let action = match rule.action {
                    tiers::Action::Accept => Action::Allow,
                    tiers::Action::Deny => Action::Deny,
                    tiers::Action::Pass if in_admin => Action::Pass,
                    tiers::Action::Pass => Action::Allow,
                };
                for peer in &rule.peers {
                    for port in &rule.ports {
                        out.extend(
                            self.allows(pod, d, peer, port)
                                .into_iter()
                                .map(|matches| MatchRule { matches, action }),
                        );
                    }
                }
            }
        }
        let selecting: Vec<&Policy> = policies
            .iter()
            .filter(|p| {
                p.namespace == pod.namespace
                    && p.selector.matches(&pod.labels)
                    && p.rules(d).is_some()
            })
            .collect();
        let (below, otherwise) = if selecting.is_empty() {
            (baseline, Action::Allow)
        } else {
            let mut allows = Vec::new();
            for policy in selecting {
                for rule in policy.rules(d).unwrap_or_default() {
                    for (_, peer) in &rule.peers {
                        for (_, port) in &rule.ports {
                            allows.extend(self.allows(pod, d, peer, port).into_iter().map(
                                |matches| MatchRule {
                                    matches,
                                    action: Action::Allow,
                                },
                            ));
                        }
                    }
                }
            }
            (allows, Action::Deny)
        };
        let policed = !admin.is_empty() || !below.is_empty() || otherwise == Action::Deny;
        policed.then_some(FirstMatch {
            admin,
            below,
            otherwise,
        })
    }
}
