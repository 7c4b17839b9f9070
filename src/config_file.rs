//! The TOML configuration file (`--config`): the same names as the flags, with the precedence
//! flag > environment > file > defaults file (`--defaults`, an image's own) > built-in default,
//! and unknown keys refused.
//!
//! Rather than a second configuration model, file entries become command-line arguments for
//! every option the command line and environment left at its default, and clap parses the
//! whole again: one set of names, one set of validations.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigFileError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: unknown key `{key}`{suggestion}")]
    UnknownKey {
        path: String,
        key: String,
        suggestion: String,
    },
    #[error("config file {path}: key `{key}` has an unsupported value type")]
    BadValue { path: String, key: String },
}

/// Keys a config file may not set: they steer reading the configuration itself.
const NOT_IN_FILE: &[&str] = &["config", "defaults", "print-config", "help", "version"];

/// The known key nearest to a misspelt one, when it is near enough to be a typo.
fn closest_key(cmd: &Command, key: &str) -> Option<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|long| !NOT_IN_FILE.contains(long))
        .map(|long| (strsim::damerau_levenshtein(key, long), long))
        .filter(|(distance, long)| *distance <= 3.max(long.len() / 4))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, long)| long.to_owned())
}

fn as_arg(key: &str, v: &toml::Value) -> Option<Vec<String>> {
    let one = |s: String| vec![format!("--{key}={s}")];
    Some(match v {
        toml::Value::String(s) => one(s.clone()),
        toml::Value::Integer(i) => one(i.to_string()),
        toml::Value::Float(f) => one(f.to_string()),
        toml::Value::Boolean(true) => vec![format!("--{key}")],
        toml::Value::Boolean(false) => vec![],
        toml::Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                out.extend(as_arg(key, item)?);
            }
            out
        }
        _ => return None,
    })
}

/// Arguments for the entries of `text` whose options were not set on the command line or in
/// the environment.
pub(crate) fn file_args(
    cmd: &Command,
    matches: &ArgMatches,
    text: &str,
    path: &Path,
) -> Result<Vec<String>, ConfigFileError> {
    let path_s = path.display().to_string();
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigFileError::Read {
            path: path_s.clone(),
            reason: e.to_string(),
        })?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && !NOT_IN_FILE.contains(&long.as_str()))
            .ok_or_else(|| ConfigFileError::UnknownKey {
                path: path_s.clone(),
                key: key.clone(),
                suggestion: closest_key(cmd, &long.to_ascii_lowercase())
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default(),
            })?;
        let id = arg.get_id().as_str();
        if matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        out.extend(
            as_arg(&long, value).ok_or_else(|| ConfigFileError::BadValue {
                path: path_s.clone(),
                key: key.clone(),
            })?,
        );
    }
    Ok(out)
}

/// `argv` with the entries of the config file and then of the defaults file inserted right
/// after the program name. The config file goes first: what it sets then counts as set when
/// the defaults file is read.
pub(crate) fn merge(
    cmd: Command,
    mut argv: Vec<OsString>,
) -> Result<Vec<OsString>, Box<dyn std::error::Error>> {
    for file in ["config", "defaults"] {
        let matches = cmd.clone().try_get_matches_from(argv.clone())?;
        let Some(path) = matches.get_one::<std::path::PathBuf>(file).cloned() else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigFileError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let extra = file_args(&cmd, &matches, &text, &path)?;
        let mut out = Vec::with_capacity(argv.len() + extra.len());
        let mut it = argv.into_iter();
        out.extend(it.next());
        out.extend(extra.into_iter().map(OsString::from));
        out.extend(it);
        argv = out;
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;

    fn write(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn parse(args: &[&str]) -> Result<Cli, Box<dyn std::error::Error>> {
        Cli::parse_with_config(args.iter().map(OsString::from).collect())
    }

    #[test]
    fn file_fills_defaults_and_flags_win() {
        let f = write("region = \"eu-west-1\"\nlisten = \"127.0.0.1:19999\"\nmax_rate_per_connection = 700\nconsistency-guard = true\nclient-user = [\"a:b\", \"c:d\"]\n");
        let p = f.path().to_str().unwrap();
        let cli = parse(&[
            "keyspaces-proxy",
            "--config",
            p,
            "--listen",
            "127.0.0.1:18888",
        ])
        .unwrap();
        assert_eq!(cli.region.as_deref(), Some("eu-west-1"));
        assert_eq!(cli.listen.port(), 18888, "the flag wins over the file");
        assert_eq!(cli.max_rate_per_connection, 700);
        assert!(cli.consistency_guard);
        assert_eq!(cli.client_users.len(), 2);
    }

    /// An image's defaults file is below everything the operator sets: the config file wins
    /// over it, and flags over both.
    #[test]
    fn the_defaults_file_is_below_the_config_file() {
        let defaults = write(
            "metrics-listen = \"0.0.0.0:9464\"\nlog-format = \"json\"\nregion = \"us-east-1\"\n",
        );
        let config = write("metrics-listen = \"127.0.0.1:19464\"\n");
        let (d, c) = (
            defaults.path().to_str().unwrap(),
            config.path().to_str().unwrap(),
        );
        let cli = parse(&["keyspaces-proxy", "--defaults", d, "--config", c]).unwrap();
        assert_eq!(cli.metrics_listen.to_string(), "127.0.0.1:19464");
        assert_eq!(
            cli.log_format,
            crate::config::LogFormat::Json,
            "unset elsewhere"
        );
        let cli = parse(&["keyspaces-proxy", "--defaults", d, "--region", "eu-west-1"]).unwrap();
        assert_eq!(cli.region.as_deref(), Some("eu-west-1"));
        assert_eq!(cli.metrics_listen.to_string(), "0.0.0.0:9464");
        let nested = write("defaults = \"/etc/other.toml\"\n");
        assert!(parse(&[
            "keyspaces-proxy",
            "--config",
            nested.path().to_str().unwrap()
        ])
        .is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let f = write("regoin = \"eu-west-1\"\n");
        let err = parse(&["keyspaces-proxy", "--config", f.path().to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown key `regoin` (did you mean `region`?)"),
            "{err}"
        );
        let f = write("max_rate_per_conection = 5\n");
        let err = parse(&["keyspaces-proxy", "--config", f.path().to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string()
                .contains("(did you mean `max-rate-per-connection`?)"),
            "{err}"
        );
        let f = write("completely_unrelated = 5\n");
        let err = parse(&["keyspaces-proxy", "--config", f.path().to_str().unwrap()]).unwrap_err();
        assert!(!err.to_string().contains("did you mean"), "{err}");
    }
}
