//! containerd's registry host configuration (`hosts.toml`), as containerd users keep it:
//! `HOSTS_DIR/HOST[:PORT]/hosts.toml` (or `HOSTS_DIR/_default/hosts.toml`), usually
//! `/etc/containerd/certs.d`.
//!
//! Owns reading that file into what [`super::Options`] and the remote backend use:
//!
//! - the `[host."URL"]` entries that may `pull` become mirrors, in file order (plain
//!   `http://` or `skip_verify = true`: no TLS verification). The URL's path is the API
//!   root as containerd takes it: none is `/v2`, a path not ending in `/v2` gets `/v2`
//!   appended, and `override_path = true` takes the path as it is;
//! - per host, `ca` (a file or a list of files: PEM CA certificates trusted besides the
//!   system roots and the host's `certs.d` directory), `client` (a file holding certificate
//!   and key, a list of such files, or a list of `[cert, key]` pairs; the first is presented,
//!   the others are checked but unused, as reqwest sends one identity), and `[...header]`
//!   (a value or a list of values per name, sent on every request to that host; never to a
//!   token realm). A relative file name is relative to the directory of the `hosts.toml`,
//!   as in containerd. A header block cannot set `Authorization` or `Range`: fanfill sets
//!   those itself, and such keys are dropped with a warning;
//! - the top-level keys `ca`, `client`, `header` and `skip_verify` are those of the origin
//!   (the `server`); a plain-`http://` `server` makes the origin plain HTTP. The `server`'s
//!   host and path are not read: the origin is the registry the reference names.
//!
//! A `hosts.toml` that does not parse, and a `ca` or `client` file that cannot be read or
//! holds no usable certificate, are errors naming the file ([`HostsError`]); a host entry
//! with a scheme other than `http`/`https` is skipped with a warning naming it. Parsing
//! never makes a request.

use std::path::{Path, PathBuf};

use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::Mirror;
use super::tls::{self, Trust};

/// Errors of reading a `hosts.toml` and the files it names.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or not shaped like a `hosts.toml`.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A `ca` or `client` file it names could not be read or parsed.
    #[error("certificate file {} (named in {})", path.display(), hosts_file.display())]
    CertFile {
        /// The certificate or key file.
        path: PathBuf,
        /// The `hosts.toml` that names it.
        hosts_file: PathBuf,
        /// The read or parse error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A client certificate of a `client` key: `cert` holds the certificate (chain), and the
/// key too when `key` is `None`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientPair {
    /// The PEM certificate file.
    pub cert: PathBuf,
    /// The PEM key file, if apart from the certificate.
    pub key: Option<PathBuf>,
}

/// The per-host keys of a `hosts.toml` (for a `[host."URL"]` entry, or the top level for
/// the origin). File names are absolute (made so against the file's directory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    /// `ca`: PEM CA certificate files trusted besides the system roots.
    pub ca: Vec<PathBuf>,
    /// `client`: client certificates; the first is presented.
    pub client: Vec<ClientPair>,
    /// `header`: sent on every request to the host (never `Authorization` or `Range`).
    pub headers: HeaderMap,
}

/// A mirror from a `[host."URL"]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMirror {
    /// Its `HOST[:PORT]` and TLS setting.
    pub mirror: Mirror,
    /// The API root: `/v2`, or another path (`/api/v2`, or anything with
    /// `override_path`); the repository's requests go below it.
    pub api_root: String,
    /// Its `ca`, `client` and header settings.
    pub settings: HostSettings,
}

/// What a `hosts.toml` says about one registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// The file read (`None`: there was none).
    pub file: Option<PathBuf>,
    /// Mirrors to read from before the origin, in order.
    pub mirrors: Vec<HostMirror>,
    /// `server` is plain HTTP (or `skip_verify` at the top level).
    pub origin_insecure: bool,
    /// The top-level `ca`, `client` and header settings, for the origin.
    pub origin: HostSettings,
}

impl HostConfig {
    /// Reads the `ca` and `client` files of `settings` (one of this file's): `None` when
    /// it names none. Every file must be readable and hold a usable certificate (or key);
    /// errors name the file and this `hosts.toml`.
    pub(crate) fn load_tls(&self, settings: &HostSettings) -> Result<Option<Trust>, HostsError> {
        if settings.ca.is_empty() && settings.client.is_empty() {
            return Ok(None);
        }
        let hosts_file = self
            .file
            .clone()
            .unwrap_or_else(|| PathBuf::from("hosts.toml"));
        let named = |e: tls::FileError| HostsError::CertFile {
            path: e.path,
            hosts_file: hosts_file.clone(),
            source: e.source,
        };
        let mut roots = Vec::new();
        for ca in &settings.ca {
            roots.extend(tls::read_cas(ca).map_err(named)?);
        }
        let mut identity = None;
        for pair in &settings.client {
            let id = tls::read_identity(&pair.cert, pair.key.as_deref()).map_err(named)?;
            identity.get_or_insert(id);
        }
        if settings.client.len() > 1 {
            tracing::warn!(
                file = %hosts_file.display(),
                "hosts.toml: several client certificates, only the first is presented"
            );
        }
        Ok(Some(Trust { roots, identity }))
    }
}

/// The configuration for `registry` (`HOST[:PORT]`) under `hosts_dir`: its own directory's
/// `hosts.toml`, else `_default`'s, else nothing.
pub fn lookup(hosts_dir: &Path, registry: &str) -> Result<HostConfig, HostsError> {
    for dir in [registry, "_default"] {
        let dir = hosts_dir.join(dir);
        let path = dir.join("hosts.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                return match parse(&text, &dir) {
                    Ok(config) => Ok(HostConfig {
                        file: Some(path),
                        ..config
                    }),
                    Err(message) => Err(HostsError::Parse { path, message }),
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(HostsError::Read { path, source }),
        }
    }
    Ok(HostConfig::default())
}

/// `[scheme://]host[:port][/path]` → (`host[:port]`, plain HTTP, API root), the API root as
/// containerd makes it (see the module doc).
fn location(url: &str, override_path: bool) -> Result<(String, bool, String), String> {
    let (http, rest) = match url.split_once("://") {
        Some(("http", r)) => (true, r),
        Some(("https", r)) => (false, r),
        Some((s, _)) => return Err(format!("unsupported scheme {s} in {url}")),
        None => (false, url),
    };
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, p),
        None => (rest, ""),
    };
    if host.is_empty() {
        return Err(format!("no host in {url}"));
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(format!("{url}: . or .. in the path"));
    }
    let mut api_root = String::new();
    for s in &segments {
        api_root.push('/');
        api_root.push_str(s);
    }
    if !override_path && !api_root.ends_with("/v2") {
        api_root.push_str("/v2");
    }
    Ok((host.to_string(), http, api_root))
}

/// `value` as one string or a list of strings.
fn strings<'a>(value: &'a toml::Value, what: &str) -> Result<Vec<&'a str>, String> {
    match value {
        toml::Value::String(s) => Ok(vec![s.as_str()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("{what}: a {} in the list, not a string", v.type_str()))
            })
            .collect(),
        other => Err(format!(
            "{what}: a {}, neither a string nor a list",
            other.type_str()
        )),
    }
}

/// Reads `ca`, `client` and `header` of one host table (or the top level), file names made
/// absolute against `base`.
fn settings(t: &toml::Table, base: &Path, what: &str) -> Result<HostSettings, String> {
    let mut out = HostSettings::default();
    if let Some(ca) = t.get("ca") {
        out.ca = strings(ca, &format!("ca of {what}"))?
            .into_iter()
            .map(|p| base.join(p))
            .collect();
    }
    if let Some(client) = t.get("client") {
        let key = format!("client of {what}");
        let items = match client {
            toml::Value::Array(items) => items.as_slice(),
            single => std::slice::from_ref(single),
        };
        for item in items {
            let pair = match item {
                toml::Value::String(cert) => ClientPair {
                    cert: base.join(cert),
                    key: None,
                },
                toml::Value::Array(_) => match strings(item, &key)?.as_slice() {
                    [cert, k] => ClientPair {
                        cert: base.join(cert),
                        key: Some(base.join(k)),
                    },
                    other => {
                        return Err(format!(
                            "{key}: a list of {}, not a [cert, key] pair",
                            other.len()
                        ));
                    }
                },
                other => {
                    return Err(format!(
                        "{key}: a {}, neither a file nor a [cert, key] pair",
                        other.type_str()
                    ));
                }
            };
            out.client.push(pair);
        }
    }
    if let Some(header) = t.get("header") {
        let header = header
            .as_table()
            .ok_or_else(|| format!("header of {what} is not a table"))?;
        for (name, value) in header {
            let what = format!("header {name} of {what}");
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{what}: not a valid header name"))?;
            if name == header::AUTHORIZATION || name == header::RANGE {
                // fanfill sets these per request; a fixed one would break auth or reads.
                tracing::warn!("hosts.toml: {what} dropped, fanfill sets it");
                continue;
            }
            for v in strings(value, &what)? {
                let v = HeaderValue::from_str(v)
                    .map_err(|_| format!("{what}: not a valid header value"))?;
                out.headers.append(name.clone(), v);
            }
        }
    }
    Ok(out)
}

/// Parses the text of a `hosts.toml` found in the directory `base` (relative `ca` and
/// `client` file names are relative to it). [`HostConfig::file`] is left `None`.
pub fn parse(text: &str, base: &Path) -> Result<HostConfig, String> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let flag = |t: &toml::Table, k: &str| t.get(k).and_then(toml::Value::as_bool).unwrap_or(false);
    let mut out = HostConfig {
        origin_insecure: flag(&doc, "skip_verify"),
        origin: settings(&doc, base, "the server")?,
        ..HostConfig::default()
    };
    if let Some(server) = doc.get("server") {
        let server = server.as_str().ok_or("`server` is not a string")?;
        out.origin_insecure |= location(server, true)?.1;
    }
    if let Some(hosts) = doc.get("host") {
        let hosts = hosts.as_table().ok_or("`host` is not a table")?;
        for (url, h) in hosts {
            let h = h
                .as_table()
                .ok_or_else(|| format!("host {url} is not a table"))?;
            let pulls = match h.get("capabilities") {
                None => true,
                Some(c) => c
                    .as_array()
                    .ok_or_else(|| format!("capabilities of {url} is not a list"))?
                    .iter()
                    .any(|c| c.as_str() == Some("pull")),
            };
            if !pulls {
                continue;
            }
            let (loc, http, api_root) = match location(url, flag(h, "override_path")) {
                Ok(l) => l,
                Err(e) => {
                    // The origin and the other mirrors still serve.
                    tracing::warn!(host = %url, error = %e, "hosts.toml: mirror skipped");
                    continue;
                }
            };
            out.mirrors.push(HostMirror {
                mirror: Mirror {
                    location: loc,
                    insecure: http || flag(h, "skip_verify"),
                },
                api_root,
                settings: settings(h, base, &format!("host {url}"))?,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(location: &str, insecure: bool, api_root: &str) -> HostMirror {
        HostMirror {
            mirror: Mirror {
                location: location.into(),
                insecure,
            },
            api_root: api_root.into(),
            settings: HostSettings::default(),
        }
    }

    #[test]
    fn mirrors_in_file_order_with_their_tls_and_api_root() {
        let base = Path::new("/etc/containerd/certs.d/registry.local:5000");
        let c = parse(
            r#"
server = "http://registry.local:5000"

[host."https://zz-mirror.example/v2"]
  capabilities = ["pull", "resolve"]

[host."https://elsewhere.example/api/"]

[host."https://override.example/api/"]
  override_path = true

[host."http://127.0.0.1:5001"]
  capabilities = ["pull"]

[host."https://push-only.example"]
  capabilities = ["push"]

[host."https://self-signed.example"]
  skip_verify = true

[host."ftp://skipped.example"]
"#,
            base,
        )
        .unwrap();
        assert!(c.origin_insecure);
        assert_eq!(
            c.mirrors,
            vec![
                mirror("zz-mirror.example", false, "/v2"),
                mirror("elsewhere.example", false, "/api/v2"),
                mirror("override.example", false, "/api"),
                mirror("127.0.0.1:5001", true, "/v2"),
                mirror("self-signed.example", true, "/v2"),
            ]
        );
        assert!(parse("server = 1", base).is_err());
        assert!(
            parse("[host.\"https://x/a/../b\"]", base)
                .unwrap()
                .mirrors
                .is_empty()
        );
        assert_eq!(parse("", base).unwrap(), HostConfig::default());
    }

    #[test]
    fn ca_client_and_header_in_every_shape() {
        let base = Path::new("/certs.d/reg.example");
        let text = |extra: &str| {
            format!(
                r#"
server = "https://reg.example"
ca = "origin-ca.pem"
client = "/abs/origin-client.pem"
skip_verify = false
[header]
  x-origin = "o"

[host."https://m1.example"]
  ca = ["a.crt", "/abs/b.crt", "sub/c.crt"]
  client = ["both1.pem", "/abs/both2.pem"]
  [host."https://m1.example".header]
    X-Custom = "one"
    x-multi = ["a", "b"]
    Authorization = "Bearer sneaky"
    range = "bytes=0-1"

[host."https://m2.example"]
  client = [["m2.cert", "m2.key"], ["/abs/c.cert", "../k.key"]]
{extra}"#
            )
        };
        // A pair of one is an error.
        let err = parse(
            &text("\n[host.\"https://m3.example\"]\n  client = [[\"single.pem\"]]\n"),
            base,
        )
        .unwrap_err();
        assert!(err.contains("m3.example") && err.contains("pair"), "{err}");

        let c = parse(&text(""), base).unwrap();
        assert!(!c.origin_insecure);
        assert_eq!(c.origin.ca, [base.join("origin-ca.pem")]);
        assert_eq!(
            c.origin.client,
            [ClientPair {
                cert: "/abs/origin-client.pem".into(),
                key: None
            }]
        );
        assert_eq!(c.origin.headers["x-origin"], "o");

        let m1 = &c.mirrors[0].settings;
        assert_eq!(
            m1.ca,
            [
                base.join("a.crt"),
                PathBuf::from("/abs/b.crt"),
                base.join("sub/c.crt")
            ]
        );
        assert_eq!(
            m1.client,
            [
                ClientPair {
                    cert: base.join("both1.pem"),
                    key: None
                },
                ClientPair {
                    cert: "/abs/both2.pem".into(),
                    key: None
                }
            ]
        );
        assert_eq!(m1.headers["x-custom"], "one");
        let multi: Vec<_> = m1.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        // Never Authorization or Range.
        assert_eq!(m1.headers.len(), 3);
        assert!(!m1.headers.contains_key(header::AUTHORIZATION));
        assert!(!m1.headers.contains_key(header::RANGE));

        let m2 = &c.mirrors[1].settings;
        assert_eq!(
            m2.client,
            [
                ClientPair {
                    cert: base.join("m2.cert"),
                    key: Some(base.join("m2.key"))
                },
                ClientPair {
                    cert: "/abs/c.cert".into(),
                    key: Some(base.join("../k.key"))
                }
            ]
        );
        assert!(m2.ca.is_empty() && m2.headers.is_empty());

        // Wrong shapes are errors naming the host and key.
        for (extra, words) in [
            (
                "[host.\"https://m3\"]\nca = 1",
                ["ca of host https://m3", ""],
            ),
            (
                "[host.\"https://m3\"]\nca = [1]",
                ["ca of host https://m3", ""],
            ),
            (
                "[host.\"https://m3\"]\nclient = 1",
                ["client of host https://m3", ""],
            ),
            (
                "[host.\"https://m3\"]\nclient = [[\"a\", \"b\", \"c\"]]",
                ["client of host https://m3", "pair"],
            ),
            (
                "[host.\"https://m3\"]\nheader = \"x\"",
                ["header of host https://m3", ""],
            ),
            (
                "[host.\"https://m3\".header]\nx = 1",
                ["header x of host https://m3", ""],
            ),
            (
                "[host.\"https://m3\".header]\nx = \"a\\nb\"",
                ["header x of host https://m3", "value"],
            ),
            (
                "[host.\"https://m3\".header]\n\"bad name\" = \"v\"",
                ["header bad name of host https://m3", "name"],
            ),
        ] {
            let err = parse(&text(extra), base).unwrap_err();
            for w in words {
                assert!(err.contains(w), "{extra}: {err}");
            }
        }
    }

    #[test]
    fn lookup_prefers_the_host_directory() {
        let d = tempfile::tempdir().unwrap();
        let write = |dir: &str, text: &str| {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
            std::fs::write(d.path().join(dir).join("hosts.toml"), text).unwrap();
        };
        assert_eq!(lookup(d.path(), "a:5000").unwrap(), HostConfig::default());
        write(
            "_default",
            "[host.\"http://default-mirror\"]\nca = \"ca.pem\"\n",
        );
        write("a:5000", "[host.\"http://a-mirror\"]\nca = \"ca.pem\"\n");
        let a = lookup(d.path(), "a:5000").unwrap();
        assert_eq!(a.mirrors[0].mirror.location, "a-mirror");
        assert_eq!(a.file, Some(d.path().join("a:5000/hosts.toml")));
        // Relative to the directory of the file read.
        assert_eq!(a.mirrors[0].settings.ca, [d.path().join("a:5000/ca.pem")]);
        let b = lookup(d.path(), "b").unwrap();
        assert_eq!(b.mirrors[0].mirror.location, "default-mirror");
        assert_eq!(b.mirrors[0].settings.ca, [d.path().join("_default/ca.pem")]);
        write("bad", "host = [");
        let err = lookup(d.path(), "bad").unwrap_err();
        assert!(matches!(err, HostsError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("bad/hosts.toml"), "{err}");
    }

    #[test]
    fn unreadable_or_bad_files_are_errors_naming_them() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("reg.example");
        std::fs::create_dir_all(&dir).unwrap();
        let hosts_file = dir.join("hosts.toml");
        let load = |text: &str| {
            std::fs::write(&hosts_file, text).unwrap();
            let c = lookup(d.path(), "reg.example").unwrap();
            let mut out = vec![c.load_tls(&c.origin)];
            out.extend(c.mirrors.iter().map(|m| c.load_tls(&m.settings)));
            out.into_iter().collect::<Result<Vec<_>, _>>()
        };
        // Nothing named, nothing read.
        assert!(load("").unwrap()[0].is_none());
        let cases = [
            ("ca = \"missing.crt\"", "missing.crt"),
            ("[host.\"https://m\"]\nca = [\"junk.crt\"]", "junk.crt"),
            ("client = \"missing.pem\"", "missing.pem"),
            (
                "[host.\"https://m\"]\nclient = [[\"junk.crt\", \"missing.key\"]]",
                "missing.key",
            ),
            ("client = [[\"junk.crt\", \"junk.crt\"]]", "junk.crt"),
        ];
        std::fs::write(dir.join("junk.crt"), b"not a certificate").unwrap();
        for (text, file) in cases {
            let err = load(text).unwrap_err();
            let HostsError::CertFile {
                path,
                hosts_file: named_in,
                ..
            } = &err
            else {
                panic!("{text}: {err}");
            };
            assert_eq!(*path, dir.join(file), "{text}");
            assert_eq!(*named_in, hosts_file, "{text}");
            let message = err.to_string();
            assert!(
                message.contains(&dir.join(file).display().to_string()),
                "{message}"
            );
            assert!(
                message.contains(&hosts_file.display().to_string()),
                "{message}"
            );
        }
    }
}
