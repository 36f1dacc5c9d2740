//! Calico's tiered evaluation of one direction of a flow, over compiled
//! Calico policies and Kubernetes NetworkPolicies (policies of the
//! `default` tier at order 1000, as Calico runs them).
//!
//! For the subject (the source for egress, the destination for ingress):
//!
//! 1. Tiers by `order` (absent = last), then name. `kube-admin` (1000,
//!    default action Pass), `default` (1,000,000, Deny) and `kube-baseline`
//!    (10,000,000, Pass) exist without a Tier object; other tiers deny at
//!    their end unless their `defaultAction` is Pass.
//! 2. A tier applies when one of its policies selects the subject for the
//!    direction (`selector`, and for a GlobalNetworkPolicy
//!    `namespaceSelector`; a NetworkPolicy only selects pods of its
//!    namespace; `serviceAccountSelector`; `types` includes the direction).
//!    A tier that does not apply is skipped.
//! 3. Its policies by `order` (absent = last), then name; their rules in
//!    order. The first Allow or Deny rule that matches decides; Pass goes
//!    to the next tier; Log is recorded and the next rule is tried.
//! 4. No rule decided: the tier's default action (end-of-tier deny).
//! 5. After the last tier (or no tier applied): the namespace profile,
//!    which allows.
//!
//! `types` defaults (Calico's defaulting) to Ingress when the policy has
//! no egress rules, Egress when it has egress rules but no ingress rules,
//! and both when it has both. The cluster policies of kube-admin /
//! kube-baseline are the engine's Admin and Baseline tiers, walked in
//! their place by [`super::engine`]. A rule's `services` matches the pods
//! backing the Service (by its selector, or its EndpointSlices), and as a
//! destination only on the ports each pod serves the Service on. Source
//! `ports`/`notPorts` match the flow's source port (named ones against the
//! source pod's container ports); when the source port is not known
//! (explain without `--source-port`, the matrix, lint), source `ports`
//! match nothing and source `notPorts` exclude nothing. Not evaluated
//! (documented gaps): host endpoints (`preDNAT`
//! and `doNotTrack` policies act on host endpoints only, never on pods,
//! so they are parsed and ignored; `applyOnForward` alone changes nothing
//! for pods).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::selector::{CalicoSelector, Expr, SelectorError};
use super::types::{
    Action, CalicoNetworkPolicy, EntityRule, GlobalNetworkPolicy, PolicyType, PortSpec,
    ProtocolSpec, Rule, StagedAction, StagedGlobalNetworkPolicy, StagedKubernetesNetworkPolicy,
    StagedNetworkPolicy, Tier,
};
use crate::policy::Labels;

/// Labels Calico gives every workload endpoint.
pub const NAMESPACE_LABEL: &str = "projectcalico.org/namespace";
pub const ORCHESTRATOR_LABEL: &str = "projectcalico.org/orchestrator";
pub const SERVICE_ACCOUNT_LABEL: &str = "projectcalico.org/serviceaccount";
/// The label Calico gives every namespace: its name.
pub const NAMESPACE_NAME_LABEL: &str = "projectcalico.org/name";

/// The order of the `default` tier, and of Kubernetes NetworkPolicies in it.
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;
pub const KUBERNETES_POLICY_ORDER: f64 = 1000.0;

/// A Calico policy set that cannot be compiled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalicoError {
    #[error("{kind} {name}: {field}: {source}")]
    Selector {
        kind: CalicoKind,
        name: String,
        field: String,
        #[source]
        source: Box<SelectorError>,
    },
    #[error("{kind} {name}: {field}: {problem}")]
    Field {
        kind: CalicoKind,
        name: String,
        field: String,
        problem: String,
    },
}

/// The kinds of policy Calico evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CalicoKind {
    /// projectcalico.org/v3 NetworkPolicy.
    CalicoNetworkPolicy,
    /// projectcalico.org/v3 GlobalNetworkPolicy.
    CalicoGlobalNetworkPolicy,
    /// networking.k8s.io/v1 NetworkPolicy, in the default tier.
    KubernetesNetworkPolicy,
    /// The staged kinds: previewed as if enforced (what-if only).
    StagedNetworkPolicy,
    StagedGlobalNetworkPolicy,
    StagedKubernetesNetworkPolicy,
}

impl CalicoKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CalicoKind::CalicoNetworkPolicy => "CalicoNetworkPolicy",
            CalicoKind::CalicoGlobalNetworkPolicy => "CalicoGlobalNetworkPolicy",
            CalicoKind::KubernetesNetworkPolicy => "NetworkPolicy",
            CalicoKind::StagedNetworkPolicy => "StagedNetworkPolicy",
            CalicoKind::StagedGlobalNetworkPolicy => "StagedGlobalNetworkPolicy",
            CalicoKind::StagedKubernetesNetworkPolicy => "StagedKubernetesNetworkPolicy",
        }
    }

    /// The enforced kind a staged kind previews (itself for enforced kinds).
    pub fn enforced(self) -> CalicoKind {
        match self {
            CalicoKind::StagedNetworkPolicy => CalicoKind::CalicoNetworkPolicy,
            CalicoKind::StagedGlobalNetworkPolicy => CalicoKind::CalicoGlobalNetworkPolicy,
            CalicoKind::StagedKubernetesNetworkPolicy => CalicoKind::KubernetesNetworkPolicy,
            other => other,
        }
    }
}

impl std::fmt::Display for CalicoKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Calico policy and, when one decided, its rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CalicoPolicyRef {
    pub kind: CalicoKind,
    pub tier: String,
    pub namespace: Option<String>,
    pub name: String,
    /// Index in `spec.ingress` / `spec.egress`, from 0.
    pub rule: Option<usize>,
}

impl std::fmt::Display for CalicoPolicyRef {
    /// `CalicoGlobalNetworkPolicy default-deny (tier default) rule 2`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ", self.kind)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{} (tier {})", self.name, self.tier)?;
        match self.rule {
            Some(i) => write!(f, " rule {}", i + 1),
            None => Ok(()),
        }
    }
}

/// Which side of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

/// One end of a flow as Calico sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CalicoEndpoint {
    /// `None` for addresses no pod has (not endpoints: only nets match).
    pub namespace: Option<String>,
    pub labels: Labels,
    pub namespace_labels: Labels,
    pub service_account: Option<String>,
    pub service_account_labels: Labels,
    pub ip: Option<IpAddr>,
    /// Container ports: (name, protocol number, port).
    pub named_ports: Vec<(String, u8, u16)>,
    /// The Services this endpoint backs (rule `services`).
    pub services: Vec<ServiceBacking>,
}

/// A Service an endpoint backs, and the ports it serves it on (the
/// Service's target ports on this pod): what a rule's `services` matches.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceBacking {
    pub namespace: String,
    pub name: String,
    /// (protocol number, port).
    pub ports: Vec<(u8, u16)>,
}

impl CalicoEndpoint {
    /// A pod: its labels with the ones Calico adds.
    pub fn pod(namespace: &str, labels: Labels, namespace_labels: Labels) -> Self {
        Self {
            namespace: Some(namespace.to_string()),
            labels,
            namespace_labels,
            ..Self::default()
        }
    }

    /// An address outside the pod network.
    pub fn external(ip: IpAddr) -> Self {
        Self {
            ip: Some(ip),
            ..Self::default()
        }
    }

    fn is_workload(&self) -> bool {
        self.namespace.is_some()
    }

    /// The labels selectors see: the pod's plus Calico's own.
    fn selector_labels(&self) -> Labels {
        let mut labels = self.labels.clone();
        if let Some(ns) = &self.namespace {
            labels.insert(NAMESPACE_LABEL.into(), ns.clone());
            labels.insert(ORCHESTRATOR_LABEL.into(), "k8s".into());
        }
        if let Some(sa) = &self.service_account {
            labels.insert(SERVICE_ACCOUNT_LABEL.into(), sa.clone());
        }
        labels
    }

    fn namespace_selector_labels(&self) -> Labels {
        let mut labels = self.namespace_labels.clone();
        if let Some(ns) = &self.namespace {
            labels.insert(NAMESPACE_NAME_LABEL.into(), ns.clone());
        }
        labels
    }
}

/// A flow: source, destination, IP protocol number, destination port (or
/// ICMP type and code), and the source port when it is known.
#[derive(Clone, Debug)]
pub struct CalicoFlow {
    pub source: CalicoEndpoint,
    pub destination: CalicoEndpoint,
    pub protocol: u8,
    pub port: u16,
    pub icmp: Option<(u8, u8)>,
    /// `None`: unknown; source `ports` then match nothing and source
    /// `notPorts` exclude nothing.
    pub source_port: Option<u16>,
}

#[derive(Clone, Debug)]
enum PortMatch {
    Range(u16, u16),
    Named(String),
}

#[derive(Clone, Debug, Default)]
struct Entity {
    nets: Option<Vec<IpNet>>,
    not_nets: Vec<IpNet>,
    selector: Option<CalicoSelector>,
    not_selector: Option<CalicoSelector>,
    namespace_selector: Option<CalicoSelector>,
    ports: Option<Vec<PortMatch>>,
    not_ports: Vec<PortMatch>,
    service_account_names: Option<Vec<String>>,
    service_account_selector: Option<CalicoSelector>,
    /// `services`: (namespace, name); no namespace means the policy's.
    services: Option<(Option<String>, String)>,
}

impl Entity {
    fn selects_endpoints(&self) -> bool {
        self.selector.is_some()
            || self.namespace_selector.is_some()
            || self.service_account_names.is_some()
            || self.service_account_selector.is_some()
    }
}

#[derive(Clone, Debug)]
struct CompiledRule {
    action: Action,
    protocol: Option<u8>,
    not_protocol: Option<u8>,
    icmp: Option<(Option<u8>, Option<u8>)>,
    not_icmp: Option<(Option<u8>, Option<u8>)>,
    ip_version: Option<u8>,
    source: Entity,
    destination: Entity,
}

#[derive(Clone, Debug)]
struct CompiledPolicy {
    reference: CalicoPolicyRef,
    order: Option<f64>,
    selector: CalicoSelector,
    namespace_selector: Option<CalicoSelector>,
    service_account_selector: Option<CalicoSelector>,
    ingress: Option<Vec<CompiledRule>>,
    egress: Option<Vec<CompiledRule>>,
    /// Host endpoints only: never selects a pod.
    host_only: bool,
}

impl CompiledPolicy {
    fn rules(&self, direction: Direction) -> Option<&[CompiledRule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    fn selects(&self, subject: &CalicoEndpoint, direction: Direction) -> bool {
        self.rules(direction).is_some() && self.selects_endpoint(subject)
    }

    /// Whether the policy applies to the endpoint in some direction.
    fn selects_endpoint(&self, subject: &CalicoEndpoint) -> bool {
        if self.host_only || !subject.is_workload() {
            return false;
        }
        if let Some(ns) = &self.reference.namespace
            && subject.namespace.as_ref() != Some(ns)
        {
            return false;
        }
        if let Some(sel) = &self.namespace_selector
            && !sel.matches(&subject.namespace_selector_labels())
        {
            return false;
        }
        if let Some(sel) = &self.service_account_selector
            && !sel.matches(&subject.service_account_labels)
        {
            return false;
        }
        self.selector.matches(&subject.selector_labels())
    }
}

#[derive(Clone, Debug)]
struct CompiledTier {
    name: String,
    order: Option<f64>,
    pass_at_end: bool,
    policies: Vec<CompiledPolicy>,
}

/// What one tier said about one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CalicoOutcome {
    Allow(CalicoPolicyRef),
    Deny(CalicoPolicyRef),
    Pass(CalicoPolicyRef),
    /// No rule decided and the tier's default action denied; the policies
    /// of the tier that selected the endpoint.
    EndOfTierDeny(Vec<CalicoPolicyRef>),
    /// No rule decided and the tier's default action is Pass.
    EndOfTierPass(Vec<CalicoPolicyRef>),
}

/// One tier of the walkthrough.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalicoTierStep {
    pub tier: String,
    /// Log rules that matched on the way.
    pub logged: Vec<CalicoPolicyRef>,
    pub outcome: CalicoOutcome,
}

impl CalicoTierStep {
    /// `tier security: DENY by CalicoGlobalNetworkPolicy deny-db (tier security) rule 1`.
    pub fn describe(&self) -> String {
        let list = |refs: &[CalicoPolicyRef]| {
            refs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let what = match &self.outcome {
            CalicoOutcome::Allow(r) => format!("ALLOW by {r}"),
            CalicoOutcome::Deny(r) => format!("DENY by {r}"),
            CalicoOutcome::Pass(r) => format!("PASS by {r}"),
            CalicoOutcome::EndOfTierDeny(r) => {
                format!(
                    "selected by {}, no rule decided -> end-of-tier DENY",
                    list(r)
                )
            }
            CalicoOutcome::EndOfTierPass(r) => {
                format!(
                    "selected by {}, no rule decided -> default action PASS",
                    list(r)
                )
            }
        };
        format!("tier {}: {what}", self.tier)
    }
}

/// The verdict on one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalicoDirectionVerdict {
    pub allowed: bool,
    /// Tiers that applied, in order, up to the one that decided.
    pub tiers: Vec<CalicoTierStep>,
}

impl CalicoDirectionVerdict {
    /// The policies that denied (with the rule, for a Deny rule; every
    /// selecting policy of the tier, for an end-of-tier deny).
    pub fn denied_by(&self) -> Vec<CalicoPolicyRef> {
        match self.tiers.last().map(|s| &s.outcome) {
            Some(CalicoOutcome::Deny(r)) => vec![r.clone()],
            Some(CalicoOutcome::EndOfTierDeny(r)) => r.clone(),
            _ => Vec::new(),
        }
    }

    /// The policy and rule that allowed, when a rule did (not the profile).
    pub fn allowed_by(&self) -> Option<&CalicoPolicyRef> {
        match self.tiers.last().map(|s| &s.outcome) {
            Some(CalicoOutcome::Allow(r)) => Some(r),
            _ => None,
        }
    }
}

/// Staged policies, for [`CalicoPolicies::build_staged`].
#[derive(Clone, Debug, Default)]
pub struct StagedObjects<'a> {
    pub network_policies: &'a [StagedNetworkPolicy],
    pub global_network_policies: &'a [StagedGlobalNetworkPolicy],
    pub kubernetes_network_policies: &'a [StagedKubernetesNetworkPolicy],
}

/// One staged policy: kind, namespace, name, action, and (for Set) the
/// policy compiled.
type StagedPolicy = (
    CalicoKind,
    Option<String>,
    String,
    StagedAction,
    Option<CompiledPolicy>,
);

impl StagedObjects<'_> {
    fn compile(&self) -> Result<Vec<StagedPolicy>, CalicoError> {
        let mut out = Vec::new();
        for p in self.network_policies {
            let namespace = p
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = p.metadata.name.clone().unwrap_or_default();
            let compiled = compile_policy(
                CalicoKind::CalicoNetworkPolicy,
                Some(namespace.clone()),
                name.clone(),
                &p.spec.spec,
            )?;
            out.push((
                CalicoKind::StagedNetworkPolicy,
                Some(namespace),
                name,
                p.spec.staged_action,
                Some(compiled),
            ));
        }
        for p in self.global_network_policies {
            let name = p.metadata.name.clone().unwrap_or_default();
            let compiled = compile_policy(
                CalicoKind::CalicoGlobalNetworkPolicy,
                None,
                name.clone(),
                &p.spec.spec,
            )?;
            out.push((
                CalicoKind::StagedGlobalNetworkPolicy,
                None,
                name,
                p.spec.staged_action,
                Some(compiled),
            ));
        }
        for p in self.kubernetes_network_policies {
            let policy = NetworkPolicy {
                metadata: p.metadata.clone(),
                spec: Some(p.spec.spec.clone()),
            };
            let compiled = compile_kubernetes_policy(&policy)?;
            out.push((
                CalicoKind::StagedKubernetesNetworkPolicy,
                compiled.reference.namespace.clone(),
                compiled.reference.name.clone(),
                p.spec.staged_action,
                Some(compiled),
            ));
        }
        Ok(out)
    }
}

/// A flow judged by the enforced policies and by the staged preview.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedPreview {
    pub enforced_allowed: bool,
    pub staged_allowed: bool,
    /// The staged set's verdicts per direction.
    pub egress: CalicoDirectionVerdict,
    pub ingress: CalicoDirectionVerdict,
}

impl StagedPreview {
    /// Allowed today, denied once the staged policies are enforced.
    pub fn would_deny(&self) -> bool {
        self.enforced_allowed && !self.staged_allowed
    }

    /// Denied today, allowed once the staged policies are enforced.
    pub fn would_allow(&self) -> bool {
        !self.enforced_allowed && self.staged_allowed
    }
}

/// The enforced policies and the same with the staged ones applied.
#[derive(Clone, Debug)]
pub struct CalicoWhatIf {
    pub enforced: CalicoPolicies,
    pub staged: CalicoPolicies,
}

impl CalicoWhatIf {
    pub fn build(
        objects: CalicoObjects<'_>,
        staged: &StagedObjects<'_>,
    ) -> Result<Self, CalicoError> {
        Ok(Self {
            enforced: CalicoPolicies::build(objects.clone())?,
            staged: CalicoPolicies::build_staged(objects, staged)?,
        })
    }

    /// "Would deny if enforced": both verdicts of one flow.
    pub fn preview(&self, flow: &CalicoFlow) -> StagedPreview {
        let (enforced_allowed, _, _) = self.enforced.judge_flow(flow);
        let (staged_allowed, egress, ingress) = self.staged.judge_flow(flow);
        StagedPreview {
            enforced_allowed,
            staged_allowed,
            egress,
            ingress,
        }
    }
}

/// A selector that picks no endpoint (lint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmptySelection {
    pub policy: CalicoPolicyRef,
    /// `spec.selector`, `spec.ingress[0].source`, ...
    pub field: String,
    pub selector: String,
}

/// One changed policy of Calico's tiers, as it is now (`None`: deleted).
#[derive(Clone, Copy, Debug)]
pub enum CalicoPolicyChange<'a> {
    NetworkPolicy {
        namespace: &'a str,
        name: &'a str,
        now: Option<&'a CalicoNetworkPolicy>,
    },
    GlobalNetworkPolicy {
        name: &'a str,
        now: Option<&'a GlobalNetworkPolicy>,
    },
    /// A Kubernetes NetworkPolicy (in Calico's default tier).
    Kubernetes {
        namespace: &'a str,
        name: &'a str,
        now: Option<&'a NetworkPolicy>,
    },
}

/// Changed policies compiled by [`CalicoPolicies::prepare`]: (kind,
/// namespace, name, the policy now).
#[derive(Debug)]
pub struct PreparedPolicies(Vec<(CalicoKind, Option<String>, String, Option<CompiledPolicy>)>);

/// Compiled Calico tiers, ready to judge flows.
#[derive(Clone, Debug, Default)]
pub struct CalicoPolicies {
    tiers: Vec<CompiledTier>,
}

/// The objects a [`CalicoPolicies`] is built from.
#[derive(Clone, Debug, Default)]
pub struct CalicoObjects<'a> {
    pub tiers: &'a [Tier],
    pub network_policies: &'a [CalicoNetworkPolicy],
    pub global_network_policies: &'a [GlobalNetworkPolicy],
    pub kubernetes_network_policies: &'a [NetworkPolicy],
}

impl CalicoPolicies {
    /// Compiles every policy; fails on the first the Calico API server
    /// would refuse, naming it and the field.
    pub fn build(objects: CalicoObjects<'_>) -> Result<Self, CalicoError> {
        Self::build_with(objects, &StagedObjects::default())
    }

    /// The policies as they would be with the staged ones applied: `Set`
    /// replaces (or adds) the enforced policy of the same kind, namespace
    /// and name, `Delete` removes it. Staged policies keep their staged
    /// kind, so verdicts name them.
    pub fn build_staged(
        objects: CalicoObjects<'_>,
        staged: &StagedObjects<'_>,
    ) -> Result<Self, CalicoError> {
        Self::build_with(objects, staged)
    }

    fn build_with(
        objects: CalicoObjects<'_>,
        staged: &StagedObjects<'_>,
    ) -> Result<Self, CalicoError> {
        let mut tiers: BTreeMap<String, CompiledTier> = BTreeMap::new();
        for (name, order, pass) in [
            ("kube-admin", Some(1000.0), true),
            ("default", Some(DEFAULT_TIER_ORDER), false),
            ("kube-baseline", Some(10_000_000.0), true),
        ] {
            tiers.insert(
                name.into(),
                CompiledTier {
                    name: name.into(),
                    order,
                    pass_at_end: pass,
                    policies: Vec::new(),
                },
            );
        }
        for tier in objects.tiers {
            let name = tier.metadata.name.clone().unwrap_or_default();
            let pass_at_end = match tier.spec.default_action {
                None | Some(Action::Deny) => false,
                Some(Action::Pass) => true,
                Some(other) => {
                    return Err(CalicoError::Field {
                        kind: CalicoKind::CalicoGlobalNetworkPolicy,
                        name: format!("Tier {name}"),
                        field: "spec.defaultAction".into(),
                        problem: format!("{} is not allowed: use Deny or Pass", other.as_str()),
                    });
                }
            };
            let entry = tiers.entry(name.clone()).or_insert_with(|| CompiledTier {
                name,
                order: None,
                pass_at_end,
                policies: Vec::new(),
            });
            entry.order = tier.spec.order;
            entry.pass_at_end = pass_at_end;
        }
        let mut policies = Vec::new();
        for p in objects.network_policies {
            let namespace = p
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            policies.push(compile_policy(
                CalicoKind::CalicoNetworkPolicy,
                Some(namespace),
                p.metadata.name.clone().unwrap_or_default(),
                &p.spec,
            )?);
        }
        for p in objects.global_network_policies {
            policies.push(compile_policy(
                CalicoKind::CalicoGlobalNetworkPolicy,
                None,
                p.metadata.name.clone().unwrap_or_default(),
                &p.spec,
            )?);
        }
        for p in objects.kubernetes_network_policies {
            policies.push(compile_kubernetes_policy(p)?);
        }
        for (kind, namespace, name, action, compiled) in staged.compile()? {
            let enforced = kind.enforced();
            policies.retain(|p: &CompiledPolicy| {
                !(p.reference.kind == enforced
                    && p.reference.namespace == namespace
                    && p.reference.name == name)
            });
            if let (StagedAction::Set, Some(mut policy)) = (action, compiled) {
                policy.reference.kind = kind;
                policies.push(policy);
            }
        }
        for policy in policies {
            let Some(tier) = tiers.get_mut(&policy.reference.tier) else {
                return Err(missing_tier(&policy));
            };
            tier.policies.push(policy);
        }
        let mut tiers: Vec<CompiledTier> = tiers.into_values().collect();
        tiers.sort_by(|a, b| order_key(a.order, &a.name).cmp(&order_key(b.order, &b.name)));
        for tier in &mut tiers {
            tier.policies.sort_by(policy_order);
        }
        Ok(Self { tiers })
    }

    /// Compiles changed policies (tiers unchanged, no staged policies),
    /// ready for [`CalicoPolicies::apply`]; fails, changing nothing, on one
    /// the Calico API server would refuse or whose tier does not exist.
    pub fn prepare(
        &self,
        changes: &[CalicoPolicyChange<'_>],
    ) -> Result<PreparedPolicies, CalicoError> {
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            let (kind, namespace, name, compiled) = match *change {
                CalicoPolicyChange::NetworkPolicy {
                    namespace,
                    name,
                    now,
                } => (
                    CalicoKind::CalicoNetworkPolicy,
                    Some(namespace),
                    name,
                    now.map(|p| {
                        compile_policy(
                            CalicoKind::CalicoNetworkPolicy,
                            Some(namespace.to_owned()),
                            name.to_owned(),
                            &p.spec,
                        )
                    })
                    .transpose()?,
                ),
                CalicoPolicyChange::GlobalNetworkPolicy { name, now } => (
                    CalicoKind::CalicoGlobalNetworkPolicy,
                    None,
                    name,
                    now.map(|p| {
                        compile_policy(
                            CalicoKind::CalicoGlobalNetworkPolicy,
                            None,
                            name.to_owned(),
                            &p.spec,
                        )
                    })
                    .transpose()?,
                ),
                CalicoPolicyChange::Kubernetes {
                    namespace,
                    name,
                    now,
                } => (
                    CalicoKind::KubernetesNetworkPolicy,
                    Some(namespace),
                    name,
                    now.map(compile_kubernetes_policy).transpose()?,
                ),
            };
            if let Some(policy) = &compiled
                && !self.tiers.iter().any(|t| t.name == policy.reference.tier)
            {
                return Err(missing_tier(policy));
            }
            out.push((
                kind,
                namespace.map(str::to_owned),
                name.to_owned(),
                compiled,
            ));
        }
        Ok(PreparedPolicies(out))
    }

    /// Puts prepared policies in place of the ones of the same kind,
    /// namespace and name (adding or removing), where a full build would
    /// have them: the same tiers, in the same order.
    pub fn apply(&mut self, prepared: PreparedPolicies) {
        for (kind, namespace, name, compiled) in prepared.0 {
            for tier in &mut self.tiers {
                tier.policies.retain(|p| {
                    !(p.reference.kind == kind
                        && p.reference.namespace == namespace
                        && p.reference.name == name)
                });
            }
            let Some(policy) = compiled else {
                continue;
            };
            // `prepare` found the tier.
            if let Some(tier) = self
                .tiers
                .iter_mut()
                .find(|t| t.name == policy.reference.tier)
            {
                let at = tier
                    .policies
                    .partition_point(|p| policy_order(p, &policy).is_lt());
                tier.policies.insert(at, policy);
            }
        }
    }

    /// Judges one direction of a flow.
    pub fn judge(&self, direction: Direction, flow: &CalicoFlow) -> CalicoDirectionVerdict {
        let mut steps = Vec::new();
        for index in 0..self.tiers.len() {
            let Some(step) = self.judge_tier(index, direction, flow) else {
                continue;
            };
            let outcome = step.outcome.clone();
            steps.push(step);
            match outcome {
                CalicoOutcome::Allow(_) => {
                    return CalicoDirectionVerdict {
                        allowed: true,
                        tiers: steps,
                    };
                }
                CalicoOutcome::Deny(_) | CalicoOutcome::EndOfTierDeny(_) => {
                    return CalicoDirectionVerdict {
                        allowed: false,
                        tiers: steps,
                    };
                }
                CalicoOutcome::Pass(_) | CalicoOutcome::EndOfTierPass(_) => {}
            }
        }
        // The namespace profile allows.
        CalicoDirectionVerdict {
            allowed: true,
            tiers: steps,
        }
    }

    /// The tiers, in evaluation order: (name, order, whether any policy
    /// is in it).
    pub fn tiers(&self) -> Vec<(&str, Option<f64>, bool)> {
        self.tiers
            .iter()
            .map(|t| (t.name.as_str(), t.order, !t.policies.is_empty()))
            .collect()
    }

    /// Whether no Calico policy (of any tier) exists.
    pub fn is_empty(&self) -> bool {
        self.tiers.iter().all(|t| t.policies.is_empty())
    }

    /// The policies of a tier in evaluation order, with their order.
    pub fn tier_policies(&self, index: usize) -> Vec<(&CalicoPolicyRef, Option<f64>)> {
        self.tiers
            .get(index)
            .map(|t| t.policies.iter().map(|p| (&p.reference, p.order)).collect())
            .unwrap_or_default()
    }

    /// Whether a policy selects the endpoint for the direction.
    pub fn policy_selects(
        &self,
        policy: &CalicoPolicyRef,
        subject: &CalicoEndpoint,
        direction: Direction,
    ) -> bool {
        self.tiers
            .iter()
            .flat_map(|t| &t.policies)
            .find(|p| {
                p.reference.kind == policy.kind
                    && p.reference.namespace == policy.namespace
                    && p.reference.name == policy.name
            })
            .is_some_and(|p| p.selects(subject, direction))
    }

    /// Lint: every rule of the tier's policies selecting the subject that
    /// matches the flow, in evaluation order, with its action.
    pub fn matching_rules(
        &self,
        index: usize,
        direction: Direction,
        flow: &CalicoFlow,
    ) -> Vec<(CalicoPolicyRef, Action)> {
        let Some(tier) = self.tiers.get(index) else {
            return Vec::new();
        };
        let (subject, _) = sides(direction, flow);
        let mut out = Vec::new();
        for policy in tier
            .policies
            .iter()
            .filter(|p| p.selects(subject, direction))
        {
            for (i, rule) in policy
                .rules(direction)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                if rule_matches(policy, rule, direction, flow) {
                    out.push((
                        CalicoPolicyRef {
                            rule: Some(i),
                            ..policy.reference.clone()
                        },
                        rule.action,
                    ));
                }
            }
        }
        out
    }

    /// Lint: the ports worth probing (both ends of every destination port
    /// range of every rule).
    pub fn probe_ports(&self) -> std::collections::BTreeSet<u16> {
        let mut ports = std::collections::BTreeSet::new();
        for policy in self.tiers.iter().flat_map(|t| &t.policies) {
            for rule in [&policy.ingress, &policy.egress]
                .into_iter()
                .flatten()
                .flatten()
            {
                for p in rule.destination.ports.iter().flatten() {
                    if let PortMatch::Range(a, b) = p {
                        ports.insert(*a);
                        ports.insert(*b);
                    }
                }
            }
        }
        ports
    }

    /// Whether any rule matches source ports (`source.ports` or
    /// `source.notPorts`): only then does a verdict depend on one.
    pub fn uses_source_ports(&self) -> bool {
        self.rules()
            .any(|r| r.source.ports.is_some() || !r.source.not_ports.is_empty())
    }

    /// Lint: the source ports worth probing besides an unknown one (both
    /// ends of every source port range of every rule).
    pub fn probe_source_ports(&self) -> std::collections::BTreeSet<u16> {
        let mut ports = std::collections::BTreeSet::new();
        for rule in self.rules() {
            for p in rule
                .source
                .ports
                .iter()
                .flatten()
                .chain(&rule.source.not_ports)
            {
                if let PortMatch::Range(a, b) = p {
                    ports.insert(*a);
                    ports.insert(*b);
                }
            }
        }
        ports
    }

    fn rules(&self) -> impl Iterator<Item = &CompiledRule> {
        self.tiers
            .iter()
            .flat_map(|t| &t.policies)
            .flat_map(|p| [&p.ingress, &p.egress])
            .flatten()
            .flatten()
    }

    /// Lint: the ICMP probes worth making, `(protocol, type, code)`: every
    /// type and code a rule of an ICMP protocol names (a type alone probed
    /// with code 0), a type other than each named one (what a `notICMP`
    /// or a narrower rule leaves), and echo requests.
    pub fn probe_icmp(&self) -> std::collections::BTreeSet<(u8, u8, u8)> {
        let mut probes = std::collections::BTreeSet::new();
        for policy in self.tiers.iter().flat_map(|t| &t.policies) {
            for rule in [&policy.ingress, &policy.egress]
                .into_iter()
                .flatten()
                .flatten()
            {
                let Some(protocol @ (1 | 58)) = rule.protocol else {
                    continue;
                };
                let echo = if protocol == 1 { 8 } else { 128 };
                probes.insert((protocol, echo, 0));
                for (t, c) in [rule.icmp, rule.not_icmp].into_iter().flatten() {
                    if let Some(t) = t {
                        probes.insert((protocol, t, c.unwrap_or(0)));
                        // Another code of the type, and another type.
                        probes.insert((protocol, t, c.map_or(1, |c| c.wrapping_add(1))));
                        probes.insert((protocol, t.wrapping_add(1) % 255, 0));
                    }
                }
            }
        }
        probes
    }

    /// Lint: the policies of the tier that select `subject` for the direction.
    pub fn selecting(
        &self,
        index: usize,
        subject: &CalicoEndpoint,
        direction: Direction,
    ) -> Vec<&CalicoPolicyRef> {
        self.tiers
            .get(index)
            .map(|t| {
                t.policies
                    .iter()
                    .filter(|p| p.selects(subject, direction))
                    .map(|p| &p.reference)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One tier's answer for one direction; `None` when no policy of the
    /// tier selects the subject for it (the tier does not apply).
    pub fn judge_tier(
        &self,
        index: usize,
        direction: Direction,
        flow: &CalicoFlow,
    ) -> Option<CalicoTierStep> {
        let tier = self.tiers.get(index)?;
        let (subject, _) = sides(direction, flow);
        let selecting: Vec<&CompiledPolicy> = tier
            .policies
            .iter()
            .filter(|p| p.selects(subject, direction))
            .collect();
        if selecting.is_empty() {
            return None;
        }
        let mut logged = Vec::new();
        for policy in &selecting {
            let rules = policy.rules(direction).unwrap_or_default();
            for (i, rule) in rules.iter().enumerate() {
                if !rule_matches(policy, rule, direction, flow) {
                    continue;
                }
                let by = CalicoPolicyRef {
                    rule: Some(i),
                    ..policy.reference.clone()
                };
                let outcome = match rule.action {
                    Action::Log => {
                        logged.push(by);
                        continue;
                    }
                    Action::Allow => CalicoOutcome::Allow(by),
                    Action::Deny => CalicoOutcome::Deny(by),
                    Action::Pass => CalicoOutcome::Pass(by),
                };
                return Some(CalicoTierStep {
                    tier: tier.name.clone(),
                    logged,
                    outcome,
                });
            }
        }
        let refs = selecting.iter().map(|p| p.reference.clone()).collect();
        Some(CalicoTierStep {
            tier: tier.name.clone(),
            logged,
            outcome: if tier.pass_at_end {
                CalicoOutcome::EndOfTierPass(refs)
            } else {
                CalicoOutcome::EndOfTierDeny(refs)
            },
        })
    }

    /// Lint: the policy selectors and rule peer selectors (selector,
    /// namespaceSelector, serviceAccounts) that pick none of `endpoints`.
    /// Policies acting on host endpoints only are left out.
    pub fn selectors_matching_nothing(&self, endpoints: &[CalicoEndpoint]) -> Vec<EmptySelection> {
        let mut found = Vec::new();
        for policy in self.tiers.iter().flat_map(|t| &t.policies) {
            if policy.host_only {
                continue;
            }
            if !endpoints.iter().any(|e| policy.selects_endpoint(e)) {
                found.push(EmptySelection {
                    policy: policy.reference.clone(),
                    field: "spec.selector".into(),
                    selector: policy.selector.source().to_string(),
                });
            }
            // A NetworkPolicy's rules are split per peer and port: their
            // indexes are not the manifest's, so only Calico kinds here.
            if policy.reference.kind.enforced() == CalicoKind::KubernetesNetworkPolicy {
                continue;
            }
            let namespace = policy.reference.namespace.as_deref();
            for (direction, name) in [
                (Direction::Ingress, "ingress"),
                (Direction::Egress, "egress"),
            ] {
                for (i, rule) in policy
                    .rules(direction)
                    .unwrap_or_default()
                    .iter()
                    .enumerate()
                {
                    for (side, entity) in
                        [("source", &rule.source), ("destination", &rule.destination)]
                    {
                        if let Some((service_namespace, service)) = &entity.services {
                            let service_namespace = service_namespace
                                .as_deref()
                                .or(namespace)
                                .unwrap_or_default();
                            let backed = endpoints.iter().any(|e| {
                                e.services
                                    .iter()
                                    .any(|s| s.namespace == service_namespace && s.name == *service)
                            });
                            if !backed {
                                found.push(EmptySelection {
                                    policy: CalicoPolicyRef {
                                        rule: Some(i),
                                        ..policy.reference.clone()
                                    },
                                    field: format!("spec.{name}[{i}].{side}.services"),
                                    selector: format!("{service_namespace}/{service}"),
                                });
                            }
                            continue;
                        }
                        if !entity.selects_endpoints() {
                            continue;
                        }
                        let any = endpoints
                            .iter()
                            .any(|e| entity_selects(entity, namespace, e, &e.selector_labels()));
                        if !any {
                            let text = [&entity.namespace_selector, &entity.selector]
                                .into_iter()
                                .flatten()
                                .map(|s| s.source().to_string())
                                .collect::<Vec<_>>()
                                .join(" / ");
                            found.push(EmptySelection {
                                policy: CalicoPolicyRef {
                                    rule: Some(i),
                                    ..policy.reference.clone()
                                },
                                field: format!("spec.{name}[{i}].{side}"),
                                selector: text,
                            });
                        }
                    }
                }
            }
        }
        found
    }

    /// Both directions: (allowed, egress, ingress).
    pub fn judge_flow(
        &self,
        flow: &CalicoFlow,
    ) -> (bool, CalicoDirectionVerdict, CalicoDirectionVerdict) {
        let egress = if flow.source.is_workload() {
            self.judge(Direction::Egress, flow)
        } else {
            CalicoDirectionVerdict {
                allowed: true,
                tiers: Vec::new(),
            }
        };
        let ingress = if flow.destination.is_workload() {
            self.judge(Direction::Ingress, flow)
        } else {
            CalicoDirectionVerdict {
                allowed: true,
                tiers: Vec::new(),
            }
        };
        (egress.allowed && ingress.allowed, egress, ingress)
    }
}

/// Checks one Calico NetworkPolicy or GlobalNetworkPolicy (or the policy
/// a staged one previews) as the Calico API server would: the error names
/// the field.
pub fn check_policy(
    kind: CalicoKind,
    namespace: Option<&str>,
    name: &str,
    spec: &super::types::PolicySpec,
) -> Result<(), CalicoError> {
    compile_policy(
        kind.enforced(),
        namespace.map(str::to_string),
        name.to_string(),
        spec,
    )
    .map(|_| ())
}

/// Checks a Tier's spec.
pub fn check_tier(tier: &Tier) -> Result<(), CalicoError> {
    CalicoPolicies::build(CalicoObjects {
        tiers: std::slice::from_ref(tier),
        ..CalicoObjects::default()
    })
    .map(|_| ())
}

impl CalicoError {
    /// The field the error is about (`spec.ingress[0].source.selector`).
    pub fn field(&self) -> &str {
        match self {
            CalicoError::Selector { field, .. } | CalicoError::Field { field, .. } => field,
        }
    }

    /// What is wrong, without the policy's name.
    pub fn problem(&self) -> String {
        match self {
            CalicoError::Selector { source, .. } => source.to_string(),
            CalicoError::Field { problem, .. } => problem.clone(),
        }
    }
}

/// The name Felix sorts policies of equal order by (libcalico-go's v1
/// policy name): `namespace/name` for namespaced policies, with
/// Kubernetes NetworkPolicies named `knp.default.<name>`; the plain name
/// for global ones.
fn felix_name(r: &CalicoPolicyRef) -> String {
    let name = match r.kind.enforced() {
        CalicoKind::KubernetesNetworkPolicy => format!("knp.default.{}", r.name),
        _ => r.name.clone(),
    };
    match &r.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name,
    }
}

/// Felix's order of the policies of one tier: by order, then name.
fn policy_order(a: &CompiledPolicy, b: &CompiledPolicy) -> std::cmp::Ordering {
    let (na, nb) = (felix_name(&a.reference), felix_name(&b.reference));
    order_key(a.order, &na)
        .cmp(&order_key(b.order, &nb))
        .then_with(|| a.reference.cmp(&b.reference))
}

fn missing_tier(policy: &CompiledPolicy) -> CalicoError {
    CalicoError::Field {
        kind: policy.reference.kind,
        name: policy.reference.name.clone(),
        field: "spec.tier".into(),
        problem: format!(
            "tier {:?} does not exist: add a projectcalico.org/v3 Tier",
            policy.reference.tier
        ),
    }
}

/// Absent orders sort after every number; NaN is refused at compile time.
fn order_key(order: Option<f64>, name: &str) -> (bool, OrderedF64, &str) {
    (order.is_none(), OrderedF64(order.unwrap_or(0.0)), name)
}

#[derive(Clone, Copy)]
struct OrderedF64(f64);
impl PartialEq for OrderedF64 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrderedF64 {}
impl PartialOrd for OrderedF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderedF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn sides(direction: Direction, flow: &CalicoFlow) -> (&CalicoEndpoint, &CalicoEndpoint) {
    match direction {
        Direction::Ingress => (&flow.destination, &flow.source),
        Direction::Egress => (&flow.source, &flow.destination),
    }
}

fn rule_matches(
    policy: &CompiledPolicy,
    rule: &CompiledRule,
    _direction: Direction,
    flow: &CalicoFlow,
) -> bool {
    if rule.protocol.is_some_and(|p| p != flow.protocol)
        || rule.not_protocol.is_some_and(|p| p == flow.protocol)
    {
        return false;
    }
    if let Some(v) = rule.ip_version {
        let family = flow.destination.ip.or(flow.source.ip).map(|ip| match ip {
            IpAddr::V4(_) => 4,
            IpAddr::V6(_) => 6,
        });
        if family.is_some_and(|f| f != v) {
            return false;
        }
    }
    let icmp_matches = |(t, c): (Option<u8>, Option<u8>)| match flow.icmp {
        Some((ft, fc)) => t.is_none_or(|t| t == ft) && c.is_none_or(|c| c == fc),
        None => false,
    };
    if rule.icmp.is_some_and(|m| !icmp_matches(m)) || rule.not_icmp.is_some_and(icmp_matches) {
        return false;
    }
    let namespace = policy.reference.namespace.as_deref();
    entity_matches(
        &rule.source,
        namespace,
        &flow.source,
        flow,
        flow.source_port,
        false,
    ) && entity_matches(
        &rule.destination,
        namespace,
        &flow.destination,
        flow,
        Some(flow.port),
        true,
    )
}

fn entity_matches(
    entity: &Entity,
    policy_namespace: Option<&str>,
    endpoint: &CalicoEndpoint,
    flow: &CalicoFlow,
    port: Option<u16>,
    is_destination: bool,
) -> bool {
    if let Some(nets) = &entity.nets
        && !endpoint
            .ip
            .is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
    {
        return false;
    }
    if let Some(ip) = endpoint.ip
        && entity.not_nets.iter().any(|n| n.contains(&ip))
    {
        return false;
    }
    let labels = endpoint.selector_labels();
    // Endpoint selection: selector, namespaceSelector and serviceAccounts
    // pick workload endpoints; in a namespaced policy without
    // namespaceSelector, only those of the policy's namespace.
    if entity.selects_endpoints() && !entity_selects(entity, policy_namespace, endpoint, &labels) {
        return false;
    }
    if let Some(sel) = &entity.not_selector
        && endpoint.is_workload()
        && sel.matches(&labels)
    {
        return false;
    }
    // `services`: the Service's endpoints; as a destination, only on the
    // ports each endpoint serves the Service on.
    if let Some((namespace, name)) = &entity.services {
        let namespace = namespace.as_deref().or(policy_namespace);
        let Some(backing) = endpoint
            .services
            .iter()
            .find(|s| Some(s.namespace.as_str()) == namespace && s.name == *name)
        else {
            return false;
        };
        if is_destination
            && let Some(port) = port
            && !backing
                .ports
                .iter()
                .any(|&(protocol, p)| protocol == flow.protocol && p == port)
        {
            return false;
        }
    }
    // Named ports are the container ports of this side's own endpoint.
    let port_in = |ports: &[PortMatch], port: u16| {
        ports.iter().any(|p| match p {
            PortMatch::Range(a, b) => (*a..=*b).contains(&port),
            PortMatch::Named(name) => endpoint
                .named_ports
                .iter()
                .any(|(n, proto, num)| n == name && *proto == flow.protocol && *num == port),
        })
    };
    if let Some(ports) = &entity.ports {
        match port {
            Some(port) if port_in(ports, port) => {}
            _ => return false,
        }
    }
    if let Some(port) = port
        && port_in(&entity.not_ports, port)
    {
        return false;
    }
    true
}

/// Whether the endpoint-selecting part of an entity (selector,
/// namespaceSelector, serviceAccounts) picks `endpoint`; in a namespaced
/// policy without namespaceSelector, only endpoints of its namespace.
fn entity_selects(
    entity: &Entity,
    policy_namespace: Option<&str>,
    endpoint: &CalicoEndpoint,
    labels: &Labels,
) -> bool {
    if !endpoint.is_workload() {
        return false;
    }
    match &entity.namespace_selector {
        Some(ns) => {
            // global() here means non-namespaced endpoints: never a pod.
            if ns.expr() == &Expr::Global {
                return false;
            }
            if !ns.matches(&endpoint.namespace_selector_labels()) {
                return false;
            }
        }
        None => {
            if let Some(ns) = policy_namespace
                && endpoint.namespace.as_deref() != Some(ns)
            {
                return false;
            }
        }
    }
    if let Some(sel) = &entity.selector
        && !sel.matches(labels)
    {
        return false;
    }
    if let Some(names) = &entity.service_account_names
        && !endpoint
            .service_account
            .as_ref()
            .is_some_and(|sa| names.contains(sa))
    {
        return false;
    }
    if let Some(sel) = &entity.service_account_selector
        && !sel.matches(&endpoint.service_account_labels)
    {
        return false;
    }
    true
}

struct Context<'a> {
    kind: CalicoKind,
    name: &'a str,
}

impl Context<'_> {
    fn field(&self, field: impl Into<String>, problem: impl Into<String>) -> CalicoError {
        CalicoError::Field {
            kind: self.kind,
            name: self.name.to_string(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn selector(&self, field: &str, text: &str) -> Result<CalicoSelector, CalicoError> {
        CalicoSelector::parse(text).map_err(|source| CalicoError::Selector {
            kind: self.kind,
            name: self.name.to_string(),
            field: field.to_string(),
            source: Box::new(source),
        })
    }

    fn optional_selector(
        &self,
        field: &str,
        text: Option<&str>,
    ) -> Result<Option<CalicoSelector>, CalicoError> {
        text.map(|t| self.selector(field, t)).transpose()
    }
}

fn protocol_number(cx: &Context<'_>, field: &str, spec: &ProtocolSpec) -> Result<u8, CalicoError> {
    match spec {
        ProtocolSpec::Number(0) => Err(cx.field(field, "protocol numbers are 1-255")),
        ProtocolSpec::Number(n) => Ok(*n),
        ProtocolSpec::Name(name) => match name.to_ascii_lowercase().as_str() {
            "tcp" => Ok(6),
            "udp" => Ok(17),
            "icmp" => Ok(1),
            "icmpv6" => Ok(58),
            "sctp" => Ok(132),
            "udplite" => Ok(136),
            _ => name
                .parse::<u8>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    cx.field(
                        field,
                        format!("unknown protocol {name:?}: use TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 1-255"),
                    )
                }),
        },
    }
}

fn ports(cx: &Context<'_>, field: &str, ports: &[PortSpec]) -> Result<Vec<PortMatch>, CalicoError> {
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let field = format!("{field}[{i}]");
            let number = |s: &str| {
                s.parse::<u16>()
                    .map_err(|_| cx.field(&field, format!("{s:?} is not a port number")))
            };
            match p {
                PortSpec::Number(n) => Ok(PortMatch::Range(*n, *n)),
                PortSpec::Text(t) => match t.split_once(':') {
                    Some((a, b)) => {
                        let (a, b) = (number(a)?, number(b)?);
                        if a > b {
                            return Err(
                                cx.field(&field, format!("range {t:?} ends before it starts"))
                            );
                        }
                        Ok(PortMatch::Range(a, b))
                    }
                    None if t.chars().all(|c| c.is_ascii_digit()) => {
                        let n = number(t)?;
                        Ok(PortMatch::Range(n, n))
                    }
                    None => Ok(PortMatch::Named(t.clone())),
                },
            }
        })
        .collect()
}

fn entity(cx: &Context<'_>, field: &str, e: &EntityRule) -> Result<Entity, CalicoError> {
    let nets =
        |list: &Option<Vec<String>>, name: &str| -> Result<Option<Vec<IpNet>>, CalicoError> {
            list.as_ref()
                .map(|l| {
                    l.iter()
                        .enumerate()
                        .map(|(i, n)| {
                            n.parse::<IpNet>()
                                .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                                .map_err(|_| {
                                    cx.field(
                                        format!("{field}.{name}[{i}]"),
                                        format!("{n:?} is not a CIDR"),
                                    )
                                })
                        })
                        .collect()
                })
                .transpose()
        };
    let sa = e.service_accounts.as_ref();
    Ok(Entity {
        nets: nets(&e.nets, "nets")?,
        not_nets: nets(&e.not_nets, "notNets")?.unwrap_or_default(),
        selector: cx.optional_selector(&format!("{field}.selector"), e.selector.as_deref())?,
        not_selector: cx
            .optional_selector(&format!("{field}.notSelector"), e.not_selector.as_deref())?,
        namespace_selector: cx.optional_selector(
            &format!("{field}.namespaceSelector"),
            e.namespace_selector.as_deref(),
        )?,
        ports: e
            .ports
            .as_deref()
            .map(|p| ports(cx, &format!("{field}.ports"), p))
            .transpose()?,
        not_ports: ports(
            cx,
            &format!("{field}.notPorts"),
            e.not_ports.as_deref().unwrap_or_default(),
        )?,
        service_account_names: sa.and_then(|s| s.names.clone()),
        service_account_selector: cx.optional_selector(
            &format!("{field}.serviceAccounts.selector"),
            sa.and_then(|s| s.selector.as_deref()),
        )?,
        services: match &e.services {
            None => None,
            Some(m) => {
                let combined = [
                    ("selector", e.selector.is_some()),
                    ("notSelector", e.not_selector.is_some()),
                    ("namespaceSelector", e.namespace_selector.is_some()),
                    ("nets", e.nets.is_some()),
                    ("notNets", e.not_nets.is_some()),
                    ("serviceAccounts", e.service_accounts.is_some()),
                ];
                if let Some((other, _)) = combined.iter().find(|(_, set)| *set) {
                    return Err(cx.field(
                        format!("{field}.services"),
                        format!("services cannot be combined with {other} in one rule side"),
                    ));
                }
                let Some(name) = m.name.clone().filter(|n| !n.is_empty()) else {
                    return Err(
                        cx.field(format!("{field}.services.name"), "a Service name is needed")
                    );
                };
                let namespace = m.namespace.clone().filter(|n| !n.is_empty());
                // A GlobalNetworkPolicy has no namespace to default to.
                if namespace.is_none()
                    && cx.kind.enforced() == CalicoKind::CalicoGlobalNetworkPolicy
                {
                    return Err(cx.field(
                        format!("{field}.services.namespace"),
                        "a GlobalNetworkPolicy must name the Service's namespace",
                    ));
                }
                Some((namespace, name))
            }
        },
    })
}

fn rule(cx: &Context<'_>, field: &str, r: &Rule) -> Result<CompiledRule, CalicoError> {
    let protocol = r
        .protocol
        .as_ref()
        .map(|p| protocol_number(cx, &format!("{field}.protocol"), p))
        .transpose()?;
    let has_ports = |e: &EntityRule| e.ports.is_some() || e.not_ports.is_some();
    if (has_ports(&r.source) || has_ports(&r.destination))
        && !matches!(protocol, Some(6 | 17 | 132 | 136))
    {
        return Err(cx.field(
            format!("{field}.protocol"),
            "ports need protocol TCP, UDP, SCTP or UDPLite",
        ));
    }
    // Calico refuses these (its dataplanes cannot match them).
    for (name, fields) in [("icmp", &r.icmp), ("notICMP", &r.not_icmp)] {
        let Some(fields) = fields else {
            continue;
        };
        if !matches!(protocol, Some(1 | 58)) {
            return Err(cx.field(
                format!("{field}.{name}"),
                "ICMP type and code need protocol ICMP or ICMPv6",
            ));
        }
        if fields.code.is_some() && fields.icmp_type.is_none() {
            return Err(cx.field(format!("{field}.{name}.code"), "an ICMP code needs a type"));
        }
        if fields.icmp_type == Some(255) {
            return Err(cx.field(
                format!("{field}.{name}.type"),
                "ICMP type 255 is reserved: use 0-254",
            ));
        }
    }
    let icmp = |f: &Option<super::types::IcmpFields>| f.as_ref().map(|i| (i.icmp_type, i.code));
    Ok(CompiledRule {
        action: r.action,
        protocol,
        not_protocol: r
            .not_protocol
            .as_ref()
            .map(|p| protocol_number(cx, &format!("{field}.notProtocol"), p))
            .transpose()?,
        icmp: icmp(&r.icmp),
        not_icmp: icmp(&r.not_icmp),
        ip_version: r.ip_version,
        source: entity(cx, &format!("{field}.source"), &r.source)?,
        destination: entity(cx, &format!("{field}.destination"), &r.destination)?,
    })
}

fn compile_policy(
    kind: CalicoKind,
    namespace: Option<String>,
    name: String,
    spec: &super::types::PolicySpec,
) -> Result<CompiledPolicy, CalicoError> {
    let cx = Context { kind, name: &name };
    if kind == CalicoKind::CalicoNetworkPolicy {
        for (field, set) in [
            ("spec.namespaceSelector", spec.namespace_selector.is_some()),
            ("spec.doNotTrack", spec.do_not_track.is_some()),
            ("spec.preDNAT", spec.pre_dnat.is_some()),
            ("spec.applyOnForward", spec.apply_on_forward.is_some()),
        ] {
            if set {
                return Err(cx.field(field, "only a GlobalNetworkPolicy has this field"));
            }
        }
    }
    if spec.order.is_some_and(f64::is_nan) {
        return Err(cx.field("spec.order", "not a number"));
    }
    let compile_rules = |rules: &Option<Vec<Rule>>, field: &str| {
        rules
            .as_ref()
            .map(|rs| {
                rs.iter()
                    .enumerate()
                    .map(|(i, r)| rule(&cx, &format!("spec.{field}[{i}]"), r))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
    };
    let ingress = compile_rules(&spec.ingress, "ingress")?;
    let egress = compile_rules(&spec.egress, "egress")?;
    // types: explicit wins; else (Calico's defaulting) Ingress when there
    // are no egress rules, Egress when there are egress rules but no
    // ingress rules, both when there are both.
    let types = spec.types.clone().unwrap_or_else(|| {
        let has = |r: &Option<Vec<Rule>>| r.as_ref().is_some_and(|r| !r.is_empty());
        match (has(&spec.ingress), has(&spec.egress)) {
            (_, false) => vec![PolicyType::Ingress],
            (false, true) => vec![PolicyType::Egress],
            (true, true) => vec![PolicyType::Ingress, PolicyType::Egress],
        }
    });
    let pick = |rules: Option<Vec<CompiledRule>>, t: PolicyType| {
        types.contains(&t).then(|| rules.unwrap_or_default())
    };
    let tier = spec.tier.clone().unwrap_or_else(|| "default".into());
    Ok(CompiledPolicy {
        reference: CalicoPolicyRef {
            kind,
            tier,
            namespace,
            name: name.clone(),
            rule: None,
        },
        order: spec.order,
        selector: cx.selector("spec.selector", spec.selector.as_deref().unwrap_or(""))?,
        namespace_selector: cx
            .optional_selector("spec.namespaceSelector", spec.namespace_selector.as_deref())?,
        service_account_selector: cx.optional_selector(
            "spec.serviceAccountSelector",
            spec.service_account_selector.as_deref(),
        )?,
        ingress: pick(ingress, PolicyType::Ingress),
        egress: pick(egress, PolicyType::Egress),
        // Felix renders untracked and pre-DNAT policies for host endpoints
        // only; `applyOnForward` alone changes nothing for pods.
        host_only: spec.do_not_track == Some(true) || spec.pre_dnat == Some(true),
    })
}

/// A Kubernetes label selector as a Calico expression.
fn label_selector(selector: &LabelSelector) -> Expr {
    let mut terms = Vec::new();
    for (k, v) in selector.match_labels.iter().flatten() {
        terms.push(Expr::Eq(k.clone(), v.clone()));
    }
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        terms.push(match e.operator.as_str() {
            "In" => Expr::In(e.key.clone(), values),
            "NotIn" => Expr::NotIn(e.key.clone(), values),
            "Exists" => Expr::Has(e.key.clone()),
            _ => Expr::Not(Box::new(Expr::Has(e.key.clone()))),
        });
    }
    match terms.len() {
        0 => Expr::All,
        1 => terms.remove(0),
        _ => Expr::And(terms),
    }
}

fn parsed(expr: Expr) -> CalicoSelector {
    // The canonical text of an expression always parses back to it.
    CalicoSelector::parse(&expr.to_string()).unwrap_or_else(|_| {
        CalicoSelector::parse("all()").unwrap_or_else(|_| unreachable!("all() parses"))
    })
}

/// The peers and ports of one NetworkPolicy rule.
type KubernetesRule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// A NetworkPolicy as Calico runs it: a policy of the default tier at
/// order 1000 whose rules (one per peer and protocol) all Allow.
fn compile_kubernetes_policy(policy: &NetworkPolicy) -> Result<CompiledPolicy, CalicoError> {
    let name = policy.metadata.name.clone().unwrap_or_default();
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let cx = Context {
        kind: CalicoKind::KubernetesNetworkPolicy,
        name: &name,
    };
    let spec = policy.spec.clone().unwrap_or_default();
    // The API server's defaulting: a missing or empty list is Ingress,
    // plus Egress when there are egress rules.
    let types = match spec.policy_types.clone() {
        Some(t) if !t.is_empty() => t,
        _ => {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".into());
            }
            t
        }
    };
    let peers_to_entities =
        |peers: Option<&Vec<NetworkPolicyPeer>>| -> Result<Vec<Entity>, CalicoError> {
            let Some(peers) = peers.filter(|p| !p.is_empty()) else {
                return Ok(vec![Entity::default()]);
            };
            peers
                .iter()
                .map(|peer| {
                    let mut e = Entity::default();
                    if let Some(block) = &peer.ip_block {
                        let net = block.cidr.parse::<IpNet>().map_err(|_| {
                            cx.field("ipBlock.cidr", format!("{:?} is not a CIDR", block.cidr))
                        })?;
                        e.nets = Some(vec![net]);
                        e.not_nets = block
                            .except
                            .iter()
                            .flatten()
                            .filter_map(|n| n.parse().ok())
                            .collect();
                        return Ok(e);
                    }
                    e.selector = Some(parsed(
                        peer.pod_selector
                            .as_ref()
                            .map(label_selector)
                            .unwrap_or(Expr::All),
                    ));
                    if let Some(ns) = &peer.namespace_selector {
                        e.namespace_selector = Some(parsed(label_selector(ns)));
                    }
                    Ok(e)
                })
                .collect()
        };
    let port_groups =
        |ports: Option<&Vec<NetworkPolicyPort>>| -> Vec<(Option<u8>, Option<Vec<PortMatch>>)> {
            let Some(ports) = ports.filter(|p| !p.is_empty()) else {
                return vec![(None, None)];
            };
            ports
                .iter()
                .map(|p| {
                    let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                        "UDP" => 17,
                        "SCTP" => 132,
                        _ => 6,
                    };
                    let matcher = p.port.as_ref().map(|port| match port {
                        IntOrString::Int(n) => {
                            let start = *n as u16;
                            vec![PortMatch::Range(
                                start,
                                p.end_port.map_or(start, |e| e as u16),
                            )]
                        }
                        IntOrString::String(s) => vec![PortMatch::Named(s.clone())],
                    });
                    (Some(proto), matcher)
                })
                .collect()
        };
    let build = |direction: &str,
                 rules: Vec<KubernetesRule<'_>>|
     -> Result<Option<Vec<CompiledRule>>, CalicoError> {
        if !types.iter().any(|t| t == direction) {
            return Ok(None);
        }
        let mut out = Vec::new();
        for (peers, ports) in rules {
            for peer in peers_to_entities(peers)? {
                for (protocol, port_match) in port_groups(ports) {
                    let mut destination = Entity {
                        ports: port_match,
                        ..Entity::default()
                    };
                    let mut source = Entity::default();
                    if direction == "Ingress" {
                        source = peer.clone();
                    } else {
                        let ports = destination.ports.take();
                        destination = Entity {
                            ports,
                            ..peer.clone()
                        };
                    }
                    out.push(CompiledRule {
                        action: Action::Allow,
                        protocol,
                        not_protocol: None,
                        icmp: None,
                        not_icmp: None,
                        ip_version: None,
                        source,
                        destination,
                    });
                }
            }
        }
        Ok(Some(out))
    };
    let ingress = build(
        "Ingress",
        spec.ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_ref(), r.ports.as_ref()))
            .collect(),
    )?;
    let egress = build(
        "Egress",
        spec.egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_ref(), r.ports.as_ref()))
            .collect(),
    )?;
    Ok(CompiledPolicy {
        reference: CalicoPolicyRef {
            kind: CalicoKind::KubernetesNetworkPolicy,
            tier: "default".into(),
            namespace: Some(namespace),
            name,
            rule: None,
        },
        order: Some(KUBERNETES_POLICY_ORDER),
        selector: parsed(label_selector(&spec.pod_selector.unwrap_or_default())),
        namespace_selector: None,
        service_account_selector: None,
        ingress,
        egress,
        host_only: false,
    })
}
