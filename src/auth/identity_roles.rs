//! Which IAM role each client identity acts as upstream (`--identity-roles FILE`), for a shared
//! proxy serving several applications: their requests reach Keyspaces signed as their own role,
//! never as each other's or as the proxy's.
//!
//! ```toml
//! [identities."2/service/orders"]
//! role_arn = "arn:aws:iam::111122223333:role/orders-keyspaces"
//!
//! [identities.billing]
//! role_arn = "arn:aws:iam::111122223333:role/billing-keyspaces"
//! external_id = "billing-7f3a"
//! ```
//!
//! Identities are the authenticated client names (password users, kmsauth usernames). Clients
//! without a mapping use the proxy's own credentials.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    pub role_arn: String,
    #[serde(default)]
    pub external_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityRoles {
    roles: HashMap<String, RoleSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityRolesError {
    #[error("cannot read identity roles file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("identity roles: {0}")]
    Syntax(String),
    #[error("identity roles: {identity:?} has an invalid role ARN {arn:?}")]
    Arn { identity: String, arn: String },
    #[error(
        "identity roles: {identity:?} is not how kmsauth identities are named: write {canonical:?}"
    )]
    NotCanonical { identity: String, canonical: String },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    identities: HashMap<String, RoleSpec>,
}

/// `arn:<partition>:iam::<12 digits>:role/<path/name>`.
pub fn is_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    matches!(parts.as_slice(),
        ["arn", partition, "iam", "", account, resource]
            if partition.starts_with("aws")
                && account.len() == 12
                && account.bytes().all(|b| b.is_ascii_digit())
                && resource.strip_prefix("role/").is_some_and(|n| !n.is_empty()))
}

/// STS session names allow `[\w+=,.@-]{2,64}`: identities like `2/service/orders` are mapped
/// into that set, so CloudTrail shows which client a request was made for.
pub fn session_name(identity: &str) -> String {
    let mut s: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    while s.len() < 2 {
        s.push('-');
    }
    s
}

impl IdentityRoles {
    pub fn parse(text: &str) -> Result<IdentityRoles, IdentityRolesError> {
        let file: File =
            toml::from_str(text).map_err(|e| IdentityRolesError::Syntax(e.to_string()))?;
        for (identity, spec) in &file.identities {
            if !is_role_arn(&spec.role_arn) {
                return Err(IdentityRolesError::Arn {
                    identity: identity.clone(),
                    arn: spec.role_arn.clone(),
                });
            }
        }
        Ok(IdentityRoles {
            roles: file.identities,
        })
    }

    pub fn load(path: &Path) -> Result<IdentityRoles, IdentityRolesError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityRolesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        IdentityRoles::parse(&text)
    }

    /// Under `--client-auth kmsauth` identities are canonical (`2/service/orders`,
    /// `1/service/orders` for v1's `orders`): a key spelled otherwise would never match, and
    /// that identity would be refused or run as the proxy.
    pub fn check_kmsauth_names(&self) -> Result<(), IdentityRolesError> {
        for identity in self.roles.keys() {
            let canonical = crate::auth::kmsauth::parse_username(identity)
                .map(|u| u.canonical())
                .unwrap_or_else(|_| "<version>/<service|user>/<name>".to_owned());
            if canonical != *identity {
                return Err(IdentityRolesError::NotCanonical {
                    identity: identity.clone(),
                    canonical,
                });
            }
        }
        Ok(())
    }

    pub fn role_for(&self, identity: &str) -> Option<&RoleSpec> {
        self.roles.get(identity)
    }

    pub fn len(&self) -> usize {
        self.roles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_mapping() {
        let r = IdentityRoles::parse(
            r#"
            [identities."2/service/orders"]
            role_arn = "arn:aws:iam::111122223333:role/orders-keyspaces"

            [identities.billing]
            role_arn = "arn:aws-cn:iam::111122223333:role/team/billing"
            external_id = "b-7f3a"
            "#,
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r.role_for("billing").unwrap().external_id.as_deref(),
            Some("b-7f3a")
        );
        assert!(r.role_for("2/service/orders").is_some());
        assert!(r.role_for("someone").is_none());
        assert!(IdentityRoles::parse("").unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_files() {
        for bad in [
            "[identities.x]\nrole_arn = \"arn:aws:iam::12:role/r\"",
            "[identities.x]\nrole_arn = \"arn:aws:iam::111122223333:user/u\"",
            "[identities.x]\nrole_arn = \"arn:aws:iam::111122223333:role/r\"\nrole = 1",
            "[people.x]\nrole_arn = \"arn:aws:iam::111122223333:role/r\"",
            "not toml [",
        ] {
            assert!(IdentityRoles::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn session_names_are_valid_for_sts() {
        assert_eq!(session_name("2/service/orders"), "2-service-orders");
        assert_eq!(session_name("a"), "a-");
        assert_eq!(session_name(&"x".repeat(100)).len(), 64);
        assert_eq!(session_name("ü@x"), "-@x");
    }

    #[test]
    fn kmsauth_names_must_be_canonical() {
        let roles = |key: &str| {
            IdentityRoles::parse(&format!(
                "[identities.{key:?}]\nrole_arn = \"arn:aws:iam::111122223333:role/r\"\n"
            ))
            .unwrap()
        };
        assert!(roles("2/service/orders").check_kmsauth_names().is_ok());
        assert!(roles("1/service/billing").check_kmsauth_names().is_ok());
        for bad in ["orders", "02/service/orders", "2/robot/x"] {
            assert!(roles(bad).check_kmsauth_names().is_err(), "{bad}");
        }
        let e = roles("orders")
            .check_kmsauth_names()
            .unwrap_err()
            .to_string();
        assert!(e.contains("write \"1/service/orders\""), "{e}");
    }
}
