//! The client side of the configuration: how clients authenticate (none, users, kmsauth,
//! certificates), client TLS, and the session cache.

use std::sync::Arc;
use std::time::Duration;

use super::{Cli, ClientAuthMode, ConfigError};
use crate::auth::aws_chain::sdk_config;
use crate::auth::client::{ClientAuth, UserStore};
use crate::auth::kmsauth::{KmsAuthSettings, KmsAuthValidator};
use crate::auth::sessions::{SessionCache, MAX_SESSIONS};

const CREDENTIALS_FILE_FLAG: &str =
    "--client-credentials-file (or KEYSPACES_PROXY_CLIENT_CREDENTIALS_FILE, or client-credentials-file in --config)";
const CLIENT_USER_FLAG: &str =
    "--client-user (or KEYSPACES_PROXY_CLIENT_USER, or client-user in --config)";

/// `--client-user` values are split at commas, and argon2 hashes have commas in them
/// (`m=19456,t=2,p=1`): a piece without a `:` continues the entry before it.
pub(super) fn rejoin_phc(values: &[String]) -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for v in values.iter().filter(|v| !v.is_empty()) {
        match entries.last_mut() {
            Some(last) if !v.contains(':') => {
                last.push(',');
                last.push_str(v);
            }
            _ => entries.push(v.clone()),
        }
    }
    entries
}

impl Cli {
    /// An empty cache of authenticated clients' sessions (`--auth-session-ttl`).
    pub fn session_cache(&self) -> SessionCache {
        SessionCache::new(Duration::from_secs(self.auth_session_ttl), MAX_SESSIONS)
    }

    /// TLS for the client port, if configured (read again on SIGHUP).
    pub fn client_tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        let (Some(cert), Some(key)) = (&self.client_tls_cert, &self.client_tls_key) else {
            return Ok(None);
        };
        let files = crate::client_tls::ClientTlsFiles {
            cert,
            key,
            client_ca: self.client_ca.as_deref(),
        };
        Ok(Some(crate::client_tls::server_config(files)?))
    }

    pub async fn client_auth(&self) -> Result<ClientAuth, ConfigError> {
        self.users_need_password_auth()?;
        match self.client_auth {
            ClientAuthMode::Kmsauth => Ok(ClientAuth::KmsAuth(Arc::new(self.kmsauth().await?))),
            ClientAuthMode::None => Ok(ClientAuth::None),
            ClientAuthMode::Mtls => {
                if self.client_ca.is_none() {
                    return Err(ConfigError::ClientTlsOptions(
                        "--client-auth mtls needs --client-ca (the roots client certificates \
                         must chain to), --client-tls-cert and --client-tls-key",
                    ));
                }
                Ok(ClientAuth::Certificate(self.client_cert_identity.clone()))
            }
            ClientAuthMode::Password => {
                let mut users = match &self.client_credentials_file {
                    Some(p) => UserStore::load(p)?,
                    None => UserStore::default(),
                };
                // An empty entry (an empty KEYSPACES_PROXY_CLIENT_USER) adds no one.
                for entry in rejoin_phc(&self.client_users) {
                    users.add_entry(&entry)?;
                }
                if users.is_empty() {
                    return Err(ConfigError::NoClientUsers);
                }
                Ok(ClientAuth::Password(users))
            }
        }
    }

    /// Users given without `--client-auth password` would be ignored and every client let in
    /// without a password: a trap, so it is refused.
    pub(crate) fn users_need_password_auth(&self) -> Result<(), ConfigError> {
        let flag = if self.client_credentials_file.is_some() {
            CREDENTIALS_FILE_FLAG
        } else if self.client_users.iter().any(|u| !u.is_empty()) {
            CLIENT_USER_FLAG
        } else {
            return Ok(());
        };
        match self.client_auth {
            ClientAuthMode::Password => Ok(()),
            ClientAuthMode::None => Err(ConfigError::UsersWithoutPasswordAuth { flag }),
            ClientAuthMode::Kmsauth => Err(ConfigError::UsersUnusedByKmsauth { flag }),
            ClientAuthMode::Mtls => Err(ConfigError::UsersUnusedByMtls { flag }),
        }
    }

    /// The kmsauth settings (pure, so the checks are unit-tested).
    pub fn kmsauth_settings(&self) -> Result<KmsAuthSettings, ConfigError> {
        let bad = |m: &str| ConfigError::Kmsauth(m.to_owned());
        let to = self
            .kmsauth_to
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("--kmsauth-to (this proxy's name in tokens) is required"))?;
        if self.kmsauth_service_keys.is_empty() && self.kmsauth_user_keys.is_empty() {
            return Err(bad("give --kmsauth-service-key and/or --kmsauth-user-key"));
        }
        let mut extra_context = Vec::new();
        for entry in &self.kmsauth_context {
            let (k, v) = entry
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| bad(&format!("--kmsauth-context {entry:?}: expected KEY=VALUE")))?;
            if ["to", "from", "user_type"].contains(&k) {
                return Err(bad(&format!("--kmsauth-context cannot set {k:?}")));
            }
            extra_context.push((k.to_owned(), v.to_owned()));
        }
        if !(1..=2).contains(&self.kmsauth_min_version) {
            return Err(bad("--kmsauth-min-version is 1 or 2"));
        }
        Ok(KmsAuthSettings {
            to,
            service_keys: self.kmsauth_service_keys.clone(),
            user_keys: self.kmsauth_user_keys.clone(),
            extra_context,
            max_lifetime: Duration::from_secs(self.kmsauth_max_lifetime.max(1) * 60),
            min_version: self.kmsauth_min_version,
            max_version: 2,
            max_kms_calls_per_second: self.kmsauth_max_kms_calls_per_second,
        })
    }

    async fn kmsauth(&self) -> Result<KmsAuthValidator, ConfigError> {
        let settings = self.kmsauth_settings()?;
        let region = self.region.as_deref().map(str::to_ascii_lowercase);
        let sdk = sdk_config(
            self.profile.as_deref(),
            region.as_deref(),
            self.kms_endpoint.as_deref(),
        )
        .await;
        Ok(KmsAuthValidator::new(
            settings,
            aws_sdk_kms::Client::new(&sdk),
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn argon2_hashes_survive_the_comma_split() {
        let split: Vec<String> = "a:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA,b:pw"
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(
            rejoin_phc(&split),
            vec!["a:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA", "b:pw"]
        );
    }

    #[test]
    fn kmsauth_settings_are_checked() {
        let base = ["keyspaces-proxy", "--client-auth", "kmsauth"];
        let cli = |extra: &[&str]| Cli::parse_from(base.iter().chain(extra));
        assert!(
            cli(&[]).kmsauth_settings().is_err(),
            "--kmsauth-to is required"
        );
        assert!(
            cli(&["--kmsauth-to", "p"]).kmsauth_settings().is_err(),
            "keys are required"
        );
        let ok = cli(&[
            "--kmsauth-to",
            "p",
            "--kmsauth-service-key",
            "alias/a,alias/b",
            "--kmsauth-context",
            "env=prod",
        ])
        .kmsauth_settings()
        .unwrap();
        assert_eq!(ok.service_keys, ["alias/a", "alias/b"]);
        assert_eq!(ok.extra_context, [("env".into(), "prod".into())]);
        assert_eq!(ok.max_lifetime, Duration::from_secs(3600));
        for bad in ["to=x", "novalue", "=x"] {
            let c = cli(&[
                "--kmsauth-to",
                "p",
                "--kmsauth-user-key",
                "k",
                "--kmsauth-context",
                bad,
            ]);
            assert!(c.kmsauth_settings().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn password_mode_needs_users() {
        let cli = Cli::parse_from(["keyspaces-proxy", "--client-auth", "password"]);
        assert!(matches!(
            cli.client_auth().await,
            Err(ConfigError::NoClientUsers)
        ));
        // An empty entry (an empty KEYSPACES_PROXY_CLIENT_USER) is no user.
        let cli = Cli::parse_from(["keyspaces-proxy", "--client-user", ""]);
        assert!(matches!(cli.client_auth().await, Ok(ClientAuth::None)));
        let cli = Cli::parse_from([
            "keyspaces-proxy",
            "--client-auth",
            "password",
            "--client-user",
            "a:b",
        ]);
        assert!(matches!(
            cli.client_auth().await,
            Ok(ClientAuth::Password(_))
        ));
    }

    #[tokio::test]
    async fn users_without_password_auth_are_refused() {
        for (mode, extra) in [
            ("none", ["--client-user", "a:b"]),
            ("kmsauth", ["--client-credentials-file", "/nonexistent"]),
        ] {
            let cli = Cli::parse_from(
                ["keyspaces-proxy", "--client-auth", mode]
                    .into_iter()
                    .chain(extra),
            );
            match (mode, cli.client_auth().await) {
                ("none", Err(ConfigError::UsersWithoutPasswordAuth { flag }))
                | ("kmsauth", Err(ConfigError::UsersUnusedByKmsauth { flag })) => {
                    assert!(flag.starts_with(extra[0]), "{flag}");
                }
                (_, other) => panic!("{mode}: {:?}", other.map(|_| ())),
            }
        }
    }
}
