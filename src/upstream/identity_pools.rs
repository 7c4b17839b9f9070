//! One upstream pool per mapped client identity, each signed with credentials of that
//! identity's own IAM role (assumed through STS), so identities never share a connection.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use aws_credential_types::provider::SharedCredentialsProvider;

use super::pool::{Pool, PoolSettings};
use super::{UpstreamAuth, UpstreamTarget};
use crate::auth::credentials::CredentialCache;
use crate::auth::identity_roles::{session_name, IdentityRoles, RoleSpec};

pub struct IdentityPools {
    /// Address and TLS of Keyspaces; its credentials are replaced per identity.
    base: UpstreamTarget,
    region: String,
    settings: PoolSettings,
    /// Region, STS endpoint and the proxy's own credentials, which assume the roles.
    sdk: aws_config::SdkConfig,
    roles: ArcSwap<IdentityRoles>,
    pools: tokio::sync::Mutex<HashMap<String, (RoleSpec, Arc<Pool>)>>,
    /// Refuse identities the mapping does not name (`--unmapped-identities deny`).
    /// Re-read on SIGHUP with the roles.
    deny_unmapped: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for IdentityPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityPools")
            .field("roles", &self.roles.load().len())
            .finish_non_exhaustive()
    }
}

impl IdentityPools {
    pub fn new(
        base: UpstreamTarget,
        region: String,
        settings: PoolSettings,
        sdk: aws_config::SdkConfig,
        roles: IdentityRoles,
        deny_unmapped: bool,
    ) -> IdentityPools {
        IdentityPools {
            deny_unmapped: std::sync::atomic::AtomicBool::new(deny_unmapped),
            base,
            region,
            settings,
            sdk,
            roles: ArcSwap::from_pointee(roles),
            pools: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// New mapping (SIGHUP): connections already open keep their pool; new ones follow it.
    pub async fn replace_roles(&self, roles: IdentityRoles) {
        let mut pools = self.pools.lock().await;
        pools.retain(|id, (spec, _)| roles.role_for(id) == Some(spec));
        self.roles.store(Arc::new(roles));
    }

    /// Whether an identity without a role must be refused rather than use the proxy's own.
    pub fn denies_unmapped(&self) -> bool {
        self.deny_unmapped
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// `--unmapped-identities`, as a reload re-read it.
    pub fn set_denies_unmapped(&self, deny: bool) {
        self.deny_unmapped
            .store(deny, std::sync::atomic::Ordering::Release);
    }

    /// The pool for `identity`, created on first use; `None` if it has no role of its own.
    pub async fn pool_for(&self, identity: &str) -> Option<Arc<Pool>> {
        let spec = self.roles.load().role_for(identity)?.clone();
        let mut pools = self.pools.lock().await;
        if let Some((s, p)) = pools.get(identity) {
            if *s == spec {
                return Some(p.clone());
            }
        }
        let mut role = aws_config::sts::AssumeRoleProvider::builder(&spec.role_arn)
            .session_name(session_name(identity))
            .configure(&self.sdk);
        if let Some(x) = &spec.external_id {
            role = role.external_id(x);
        }
        let credentials = CredentialCache::new(SharedCredentialsProvider::new(role.build().await));
        let mut target = self.base.clone();
        target.auth = UpstreamAuth::SigV4 {
            credentials,
            region: self.region.clone(),
        };
        tracing::info!(identity, role = %spec.role_arn, "upstream pool for a client identity");
        let pool = Pool::new(target, self.settings.clone());
        pools.insert(identity.to_owned(), (spec, pool.clone()));
        Some(pool)
    }
}
