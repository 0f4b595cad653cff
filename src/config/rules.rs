//! Rules as the engine uses them: compiled globs, the path template and its variables.

use std::fmt;
use std::time::Duration;

use globset::{Glob, GlobMatcher};

use super::Strategy;

/// A validated rule: globs compiled, overrides resolved.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub project: Pattern,
    pub service_account: Pattern,
    pub stores: Vec<String>,
    pub path: String,
    pub max_age: Duration,
    pub grace_period: Duration,
    pub verify: bool,
    pub scopes: Vec<String>,
    pub strategy: Strategy,
}

impl Rule {
    /// Whether the rule covers this project (by id or name) and service account (by name).
    pub fn matches(&self, project_id: &str, project_name: &str, sa_name: &str) -> bool {
        self.covers_project(project_id, project_name) && self.service_account.is_match(sa_name)
    }

    /// Whether the rule's `project` glob matches the project's id or name.
    pub fn covers_project(&self, project_id: &str, project_name: &str) -> bool {
        self.project.is_match(project_id) || self.project.is_match(project_name)
    }

    /// Renders the path template for one slot.
    pub fn render_path(&self, vars: &PathVars<'_>) -> String {
        render_template(&self.path, vars)
    }
}

/// The variables a rule's `path` may use.
#[derive(Clone, Copy, Debug)]
pub struct PathVars<'a> {
    pub project_id: &'a str,
    pub project_name: &'a str,
    pub service_account_id: &'a str,
    pub service_account_name: &'a str,
}

pub const PATH_VARS: [&str; 4] = [
    "project_id",
    "project_name",
    "service_account_id",
    "service_account_name",
];

/// One pass over the template: a value that itself contains `{project_id}` (names are
/// free text) is copied as it is, never substituted again.
pub(super) fn render_template(template: &str, v: &PathVars<'_>) -> String {
    let mut out = String::with_capacity(template.len() + 48);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after.find('}').and_then(|close| {
            let value = match &after[..close] {
                "project_id" => v.project_id,
                "project_name" => v.project_name,
                "service_account_id" => v.service_account_id,
                "service_account_name" => v.service_account_name,
                _ => return None,
            };
            Some((value, close))
        });
        match value {
            Some((value, close)) => {
                out.push_str(value);
                rest = &after[close + 1..];
            }
            // Not a variable (validation rejects these in configs): kept literally.
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A compiled glob. The shapes rules use most (`*`, `prod-*`, `*-batch`, a literal)
/// are answered by string comparison; anything else goes to `globset`, whose answer
/// the fast paths match exactly (same syntax, `*` also matching `/`).
#[derive(Clone)]
pub struct Pattern {
    glob: GlobMatcher,
    fast: Fast,
}

#[derive(Clone)]
enum Fast {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Glob,
}

impl Pattern {
    pub fn new(pattern: &str) -> Result<Pattern, globset::Error> {
        let glob = Glob::new(pattern)?.compile_matcher();
        let literal = |s: &str| !s.contains(['*', '?', '[', ']', '{', '}', '\\']);
        let fast = if pattern == "*" {
            Fast::Any
        } else if literal(pattern) {
            Fast::Exact(pattern.into())
        } else if let Some(prefix) = pattern.strip_suffix('*').filter(|p| literal(p)) {
            Fast::Prefix(prefix.into())
        } else if let Some(suffix) = pattern.strip_prefix('*').filter(|p| literal(p)) {
            Fast::Suffix(suffix.into())
        } else {
            Fast::Glob
        };
        Ok(Pattern { glob, fast })
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        self.glob.glob().glob()
    }

    pub fn is_match(&self, s: &str) -> bool {
        match &self.fast {
            Fast::Any => true,
            Fast::Exact(x) => s == &**x,
            Fast::Prefix(p) => s.starts_with(&**p),
            Fast::Suffix(p) => s.ends_with(&**p),
            Fast::Glob => self.glob.is_match(s),
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.as_str())
    }
}

pub(crate) fn compile_glob(pattern: &str) -> Result<Pattern, String> {
    if pattern.is_empty() {
        return Err("empty glob (use \"*\" to match everything)".into());
    }
    Pattern::new(pattern).map_err(|e| format!("bad glob {pattern:?}: {}", e.kind()))
}

pub(crate) fn match_nothing() -> Pattern {
    Pattern::new("\u{0}never\u{0}").unwrap_or_else(|_| unreachable!())
}

pub(crate) fn validate_path_template(path: &str) -> Result<(), String> {
    if path.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let reserved = crate::store::STATE_PREFIX
        .split('/')
        .next()
        .unwrap_or_default();
    if path.split('/').next() == Some(reserved) {
        return Err(format!(
            "{path:?} starts with {reserved:?}, where keyrotd keeps slot state records"
        ));
    }
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {path:?}"))?;
        let var = &after[..close];
        if !PATH_VARS.contains(&var) {
            return Err(format!(
                "unknown variable {{{var}}} in {path:?} (known: {})",
                PATH_VARS.map(|v| format!("{{{v}}}")).join(", ")
            ));
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("stray '}}' in {path:?}"));
    }
    if path.starts_with('/') || path.split('/').any(|seg| seg == "..") {
        return Err(format!(
            "{path:?} must be relative and must not contain '..'"
        ));
    }
    Ok(())
}
