//! The one masking rule for text that leaves the process (log fields, error messages,
//! webhook bodies, `check-config` lines): anything shaped like a secret is replaced,
//! whoever built the text. Messages are built without secrets in the first place; this
//! is the backstop for what a server, an SDK or serde echoes back.
//!
//! Secret-shaped, in a word (a run of `A-Z a-z 0-9 _ - .`):
//!
//! - an OpenAI key: `sk-` and at least 8 key characters (`A-Z a-z 0-9 _ -`) at the
//!   start of a word → `sk-[REDACTED]` (so `sk-proj-…`, `sk-svcacct-…`, `sk-admin-…`;
//!   the API's own redacted form `sk-...abcd` stays, as do `task-…` words);
//! - a Vault / OpenBao token: `hvs.`, `hvb.` or `hvr.` and at least 8 token characters
//!   → `hvs.[REDACTED]` (prefix kept); a legacy `s.` token, 24 or more alphanumerics
//!   → `s.[REDACTED]`;
//! - any other run of 32 or more ASCII letters and digits with at least one of each →
//!   `[REDACTED]` (tokens of unknown issuers; ids such as `key_8b94…` have 24).

use secrecy::{ExposeSecret, SecretString};

/// What replaces a secret (after the kept prefix).
pub const REDACTED: &str = "[REDACTED]";

/// Key characters after `sk-` or a Vault token prefix.
fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Characters of a word: where a secret may start or end.
fn is_word_char(c: char) -> bool {
    is_key_char(c) || c == '.'
}

/// `text` with every secret-shaped value masked (see the module docs).
pub fn secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(is_word_char) {
        out.push_str(&rest[..start]);
        let word_len = rest[start..]
            .find(|c: char| !is_word_char(c))
            .unwrap_or(rest.len() - start);
        mask_word(&rest[start..start + word_len], &mut out);
        rest = &rest[start + word_len..];
    }
    out.push_str(rest);
    out
}

/// `text` with every occurrence of `secret` replaced, then [`secrets`] applied: for
/// messages built from a response to a request that carried `secret`.
pub fn known(text: &str, secret: &SecretString) -> String {
    let s = secret.expose_secret();
    if s.is_empty() {
        secrets(text)
    } else {
        secrets(&text.replace(s, REDACTED))
    }
}

/// Length of the leading run of `s` whose characters satisfy `f`.
fn run(s: &str, f: impl Fn(char) -> bool) -> usize {
    s.find(|c: char| !f(c)).unwrap_or(s.len())
}

/// A secret's prefix, the least length of what follows it, and that part's alphabet.
type Prefixed = (&'static str, usize, fn(char) -> bool);

/// Masks the secrets in one word; what follows a masked prefix-secret (a sentence's
/// full stop, another token after a `.`) is masked as a word of its own.
fn mask_word(word: &str, out: &mut String) {
    let prefixed: [Prefixed; 5] = [
        ("sk-", 8, is_key_char),
        ("hvs.", 8, is_key_char),
        ("hvb.", 8, is_key_char),
        ("hvr.", 8, is_key_char),
        ("s.", 24, |c| c.is_ascii_alphanumeric()),
    ];
    for (prefix, min, body) in prefixed {
        if let Some(after) = word.strip_prefix(prefix) {
            let n = run(after, body);
            if n >= min {
                out.push_str(prefix);
                out.push_str(REDACTED);
                let tail = &after[n..];
                if !tail.is_empty() {
                    // The tail starts with a word character other than the body's.
                    let (head, more) = tail.split_at(1);
                    out.push_str(head);
                    mask_word(more, out);
                }
                return;
            }
        }
    }
    // Long alphanumeric runs anywhere in the word.
    let mut rest = word;
    while !rest.is_empty() {
        let n = run(rest, |c| c.is_ascii_alphanumeric());
        if n == 0 {
            let sep = rest.chars().next().map_or(1, char::len_utf8);
            out.push_str(&rest[..sep]);
            rest = &rest[sep..];
            continue;
        }
        let chunk = &rest[..n];
        let mixed = chunk.bytes().any(|b| b.is_ascii_digit())
            && chunk.bytes().any(|b| b.is_ascii_alphabetic());
        if n >= 32 && mixed {
            out.push_str(REDACTED);
        } else {
            out.push_str(chunk);
        }
        rest = &rest[n..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_keys() {
        assert_eq!(
            secrets("bad key sk-proj-abcdefgh12 here"),
            "bad key sk-[REDACTED] here"
        );
        assert_eq!(
            secrets("\"sk-svcacct-AbC_12-xyz\",sk-admin-0123456789"),
            "\"sk-[REDACTED]\",sk-[REDACTED]"
        );
        assert_eq!(
            secrets("bad key sk-svcacct-abcdefghijklmnopqrstuvwxyz0123 here, sk-...abcd ok"),
            "bad key sk-[REDACTED] here, sk-...abcd ok"
        );
        // End of a sentence, or of a URL-ish word: the punctuation stays.
        assert_eq!(
            secrets("key sk-admin-0123456789. next"),
            "key sk-[REDACTED]. next"
        );
        assert_eq!(secrets("Bearer=sk-abcdefgh"), "Bearer=sk-[REDACTED]");
        // Too short, inside a longer word, or not a key at all: left alone.
        assert_eq!(
            secrets("sk-short task-abcdefghijk disk-0123456789"),
            "sk-short task-abcdefghijk disk-0123456789"
        );
        assert_eq!(
            secrets("no secrets, ünïcode sk- ✓"),
            "no secrets, ünïcode sk- ✓"
        );
    }

    #[test]
    fn vault_tokens() {
        assert_eq!(
            secrets("token hvs.CAESIJ-abc_0123456789 refused"),
            "token hvs.[REDACTED] refused"
        );
        assert_eq!(
            secrets("hvb.AAAAAQJxyz012345 hvr.abcdefghijk"),
            "hvb.[REDACTED] hvr.[REDACTED]"
        );
        assert_eq!(
            secrets("legacy s.AbCdEfGhIjKlMnOpQrStUvWx."),
            "legacy s.[REDACTED]."
        );
        // A short `s.` word, a file name, a dotted word: left alone.
        assert_eq!(
            secrets("s.short logs.txt hvs.short a.s.b"),
            "s.short logs.txt hvs.short a.s.b"
        );
    }

    #[test]
    fn long_base62_runs() {
        let token = "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE";
        assert_eq!(token.len(), 32);
        assert_eq!(secrets(&format!("x={token};")), "x=[REDACTED];");
        assert_eq!(
            secrets(&format!("prefix_{token}_suffix")),
            "prefix_[REDACTED]_suffix"
        );
        // Ids, UUIDs, short hashes, long words without digits: left alone.
        for kept in [
            "key_8b94e50c7cdaa8968598a051",
            "proj_a47bbef2ffabbc6e5af1fc44",
            "3f2b8c1e-9d4a-4e6b-8f0c-1a2b3c4d5e6f",
            "ba7816bf8f01",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1d",
        ] {
            assert_eq!(secrets(kept), kept);
        }
    }

    #[test]
    fn known_values_go_whatever_their_shape() {
        let secret = SecretString::from("hunter2-but-longer");
        assert_eq!(
            known("echo: hunter2-but-longer and sk-abcdefgh12", &secret),
            "echo: [REDACTED] and sk-[REDACTED]"
        );
        assert_eq!(
            known("nothing", &SecretString::from(String::new())),
            "nothing"
        );
    }
}
