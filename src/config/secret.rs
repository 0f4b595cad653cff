//! Secrets that come from an environment variable or a file, never inline.

use std::path::Path;

use secrecy::SecretString;

use super::ConfigError;

/// Reads a secret from a file, trimming the trailing newline. The error never contains
/// the content.
pub fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(SecretString::from(s.trim().to_string())),
        Ok(_) => Err(format!("file {} is empty", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Reads a secret from `env` or `file` (exactly one set); `key` names the config key.
pub fn read_secret(
    key: &str,
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<SecretString, ConfigError> {
    match (env, file) {
        (Some(var), None) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(SecretString::from(v.trim().to_string())),
            _ => Err(ConfigError::invalid(
                format!("{key}_env"),
                format!("environment variable {var} is not set or empty"),
            )),
        },
        (None, Some(path)) => {
            read_secret_file(path).map_err(|m| ConfigError::invalid(format!("{key}_file"), m))
        }
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            format!("{key}_env"),
            format!("set only one of {key}_env and {key}_file"),
        )),
        (None, None) => Err(ConfigError::invalid(
            format!("{key}_env"),
            format!("set {key}_env or {key}_file"),
        )),
    }
}
