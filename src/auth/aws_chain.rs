//! The AWS credential chain the proxy signs with: the SDK's default chain for a profile,
//! optionally a role assumed on top, built so that it can be built again.

use aws_credential_types::provider::SharedCredentialsProvider;

use super::credentials::CredentialsError;

/// Where a chain provider came from, so it can be built again. The chain's file providers
/// parse the shared config and credentials files once: asking the same provider again after
/// the file was rotated returns the keys it replaced (aws-config 1.x).
#[derive(Debug, Clone)]
pub struct ChainSource {
    pub profile: Option<String>,
    pub role_arn: Option<String>,
    pub region: Option<String>,
}

/// What a chain gives the credential cache.
#[derive(Debug, Clone)]
pub struct Providers {
    /// The chain's own credentials, before `--role-arn` (the same as `provider` without one).
    pub base: SharedCredentialsProvider,
    /// What the cache asks.
    pub provider: SharedCredentialsProvider,
}

/// An error and its sources as one line of their messages, without the SDK's Debug dump
/// (`DisplayErrorContext` appends one, a page long for a provider chain).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    without_process_output(out)
}

/// A failing `credential_process` has its stderr quoted in the SDK's error, and a helper may
/// print anything there, keys included: the proxy's log keeps only what comes before it.
fn without_process_output(mut text: String) -> String {
    if let Some(at) = text.find("Stderr:") {
        text.truncate(at);
        text.push_str("Stderr: (not logged)");
    }
    text
}

/// The AWS SDK configuration from the standard chain, for a profile, region and endpoint
/// override (a VPC endpoint, or a local emulator in tests) when given.
pub async fn sdk_config(
    profile: Option<&str>,
    region: Option<&str>,
    endpoint_url: Option<&str>,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(p) = profile {
        loader = loader.profile_name(p);
    }
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// Builds the chain for `source`: its own provider (`base`), the one to ask (`base`, or a role
/// assumed with it) and the chain's region.
pub(crate) async fn providers(
    source: &ChainSource,
) -> Result<(Providers, Option<String>), CredentialsError> {
    let sdk = sdk_config(source.profile.as_deref(), source.region.as_deref(), None).await;
    let region = sdk.region().map(|r| r.as_ref().to_owned());
    let base = sdk
        .credentials_provider()
        .ok_or_else(|| CredentialsError("no credentials provider in the AWS chain".into()))?;
    let provider = match source.role_arn.as_deref() {
        None => base.clone(),
        Some(arn) => {
            let role = aws_config::sts::AssumeRoleProvider::builder(arn)
                .session_name("keyspaces-proxy")
                .configure(&sdk)
                .build_from_provider(base.clone())
                .await;
            SharedCredentialsProvider::new(role)
        }
    };
    Ok((Providers { base, provider }, region))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_credential_helpers_output_is_not_kept() {
        let text =
            "external process exited with code exit status: 3. Stderr: SecretAccessKey=s3cr3t";
        let kept = super::without_process_output(text.into());
        assert!(!kept.contains("s3cr3t"), "{kept}");
        assert!(kept.starts_with("external process exited with code exit status: 3."));
    }
}
