//! Registry credentials and `WWW-Authenticate` challenges.
//!
//! Finds credentials the way podman and docker do (`--creds`, `--authfile`, then the files
//! listed by [`auth_files`]) and parses challenges. Credential helpers (`credsStore`,
//! `credHelpers`) are not run. Pure logic: the HTTP token exchange and the
//! token cache live in [`super::remote`].

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use super::Error;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl FromStr for Credentials {
    type Err = Error;

    /// Parses `USER[:PASS]` as `--creds` takes it (a missing password is empty).
    fn from_str(s: &str) -> Result<Self, Error> {
        let (username, password) = s.split_once(':').unwrap_or((s, ""));
        if username.is_empty() {
            return Err(Error::Creds);
        }
        Ok(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        })
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", BASE64.encode(raw))
    }
}

/// The auth files to search, most important first, from the given environment lookup and
/// user id: `$REGISTRY_AUTH_FILE`; `${XDG_RUNTIME_DIR}/containers/auth.json` (podman's
/// default; `/run/containers/UID/auth.json` when `XDG_RUNTIME_DIR` is unset, which is where
/// `podman login` writes as root); `${XDG_CONFIG_HOME:-~/.config}/containers/auth.json`;
/// `$DOCKER_CONFIG/config.json`; `~/.docker/config.json`.
///
/// `authfile` (`--authfile`) replaces the whole list, as in podman.
pub fn auth_files(
    authfile: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
    uid: u32,
) -> Vec<PathBuf> {
    if let Some(file) = authfile {
        return vec![file.to_owned()];
    }
    let env = |k: &str| env(k).filter(|s| !s.is_empty());
    let home = env("HOME");
    let mut files = Vec::new();
    if let Some(f) = env("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    match env("XDG_RUNTIME_DIR") {
        Some(dir) => files.push(Path::new(&dir).join("containers/auth.json")),
        None => files.push(PathBuf::from(format!("/run/containers/{uid}/auth.json"))),
    }
    match (env("XDG_CONFIG_HOME"), &home) {
        (Some(dir), _) => files.push(Path::new(&dir).join("containers/auth.json")),
        (None, Some(home)) => files.push(Path::new(home).join(".config/containers/auth.json")),
        (None, None) => {}
    }
    if let Some(dir) = env("DOCKER_CONFIG") {
        files.push(Path::new(&dir).join("config.json"));
    }
    if let Some(home) = &home {
        files.push(Path::new(home).join(".docker/config.json"));
    }
    files
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Looks `registry` (`host[:port]`) and `repository` up in `files`, in order; the first file
/// with a matching entry wins. Keys may be `host`, `host:port`, `https://host/v1/` or
/// `host/namespace/repo` (the longest matching path wins). Missing files are skipped; an
/// unreadable or malformed file is an error naming it.
pub fn lookup(
    files: &[PathBuf],
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>, Error> {
    for file in files {
        let text = match std::fs::read(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(Error::AuthFile {
                    path: file.clone(),
                    source: Box::new(source),
                });
            }
        };
        let parsed: AuthFile = serde_json::from_slice(&text).map_err(|source| Error::AuthFile {
            path: file.clone(),
            source: Box::new(source),
        })?;
        if let Some(creds) = lookup_in(&parsed, registry, repository, file)? {
            tracing::debug!(file = %file.display(), registry, "credentials from auth file");
            return Ok(Some(creds));
        }
    }
    Ok(None)
}

fn normalize_key(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let key = key.strip_suffix("/v1/").unwrap_or(key);
    let key = key.strip_suffix("/v2/").unwrap_or(key);
    key.trim_end_matches('/')
}

fn lookup_in(
    file: &AuthFile,
    registry: &str,
    repository: &str,
    path: &Path,
) -> Result<Option<Credentials>, Error> {
    let hub = matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    );
    let full = format!("{registry}/{repository}");
    let mut best: Option<(usize, &AuthEntry)> = None;
    for (key, entry) in &file.auths {
        let key = normalize_key(key);
        let (key_host, key_path) = key.split_once('/').unwrap_or((key, ""));
        let host_match = key_host == registry
            || (hub
                && matches!(
                    key_host,
                    "docker.io" | "index.docker.io" | "registry-1.docker.io"
                ));
        if !host_match {
            continue;
        }
        // A namespaced key must be a path prefix of the repository.
        let score = if key_path.is_empty() {
            1
        } else {
            let want = format!("{registry}/{key_path}");
            let is_prefix = full == want || full.starts_with(&format!("{want}/"));
            if !is_prefix {
                continue;
            }
            1 + key_path.len()
        };
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, entry));
        }
    }
    let Some((_, entry)) = best else {
        return Ok(None);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let bad = || Error::AuthEntry {
            path: path.to_owned(),
            registry: registry.to_owned(),
        };
        let raw = BASE64.decode(auth.trim()).map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let (user, pass) = raw.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials {
            username: user.to_owned(),
            password: pass.to_owned(),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=...`: send the credentials with every request.
    Basic,
    /// `Bearer realm=...,service=...,scope=...`: get a token from `realm`.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` parameter to pass along, if given.
        service: Option<String>,
        /// The `scope` the server asked for, if given.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header value; `None` for unknown schemes or malformed values.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(rest);
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `key=value` and `key="quoted, value"` pairs separated by commas; keys lowercased.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next().is_none() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, json: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, json).unwrap();
        path
    }

    fn creds(u: &str, p: &str) -> Option<Credentials> {
        Some(Credentials {
            username: u.into(),
            password: p.into(),
        })
    }

    #[test]
    fn creds_flag() {
        assert_eq!(
            "u:p:q".parse::<Credentials>().unwrap(),
            creds("u", "p:q").unwrap()
        );
        assert_eq!("u".parse::<Credentials>().unwrap(), creds("u", "").unwrap());
        assert!(":p".parse::<Credentials>().is_err());
        assert_eq!(creds("u", "p").unwrap().basic_header(), "Basic dTpw");
        assert!(!format!("{:?}", creds("u", "secret")).contains("secret"));
    }

    #[test]
    fn file_order_from_env() {
        let env = |k: &str| match k {
            "REGISTRY_AUTH_FILE" => Some("/a.json".to_owned()),
            "XDG_RUNTIME_DIR" => Some("/run/user/1000".to_owned()),
            "XDG_CONFIG_HOME" => Some("/cfg".to_owned()),
            "DOCKER_CONFIG" => Some("/dc".to_owned()),
            "HOME" => Some("/home/u".to_owned()),
            _ => None,
        };
        assert_eq!(
            auth_files(None, env, 1000),
            [
                "/a.json",
                "/run/user/1000/containers/auth.json",
                "/cfg/containers/auth.json",
                "/dc/config.json",
                "/home/u/.docker/config.json"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            auth_files(Some(Path::new("/x.json")), env, 0),
            vec![PathBuf::from("/x.json")]
        );
        // Root with a bare environment (a daemon started by systemd).
        assert_eq!(
            auth_files(None, |k| (k == "HOME").then(|| "/root".to_owned()), 0),
            [
                "/run/containers/0/auth.json",
                "/root/.config/containers/auth.json",
                "/root/.docker/config.json"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            auth_files(None, |k| (k == "XDG_RUNTIME_DIR").then(String::new), 5),
            vec![PathBuf::from("/run/containers/5/auth.json")]
        );
    }

    #[test]
    fn lookup_by_host_port_and_namespace() {
        let dir = tempfile::tempdir().unwrap();
        // "alice:pw1", "bob:pw2", "carol:pw3"
        let first = write(
            dir.path(),
            "auth.json",
            r#"{"auths": {
                "127.0.0.1:5000": {"auth": "YWxpY2U6cHcx"},
                "127.0.0.1:5000/team": {"auth": "Ym9iOnB3Mg=="},
                "https://index.docker.io/v1/": {"auth": "Y2Fyb2w6cHcz"}
            }}"#,
        );
        let second = write(
            dir.path(),
            "config.json",
            r#"{"auths": {"quay.io": {"username": "dave", "password": "pw4"},
                          "127.0.0.1:5001": {"auth": "ZXZlOnB3NQ=="}},
                "credsStore": "desktop"}"#,
        );
        let missing = dir.path().join("missing.json");
        let files = vec![missing, first, second];
        let l = |reg: &str, repo: &str| lookup(&files, reg, repo).unwrap();
        assert_eq!(l("127.0.0.1:5000", "x/y"), creds("alice", "pw1"));
        assert_eq!(l("127.0.0.1:5000", "team/app"), creds("bob", "pw2"));
        assert_eq!(l("127.0.0.1:5000", "teamster/app"), creds("alice", "pw1"));
        assert_eq!(l("127.0.0.1:5001", "x"), creds("eve", "pw5"));
        assert_eq!(l("docker.io", "library/debian"), creds("carol", "pw3"));
        assert_eq!(l("quay.io", "a/b"), creds("dave", "pw4"));
        assert_eq!(l("127.0.0.1", "x"), None);
        assert_eq!(l("example.com", "x"), None);
    }

    #[test]
    fn lookup_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = write(dir.path(), "bad.json", "{not json");
        let err = lookup(std::slice::from_ref(&bad), "r", "x").unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
        let bad = write(dir.path(), "b64.json", r#"{"auths":{"r":{"auth":"!!"}}}"#);
        let err = lookup(&[bad], "r", "x").unwrap_err();
        assert!(err.to_string().contains("b64.json"), "{err}");
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/debian:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm="http://h/t", scope="a:b:pull,push""#),
            Some(Challenge::Bearer {
                realm: "http://h/t".into(),
                service: None,
                scope: Some("a:b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Basic"), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }
}
