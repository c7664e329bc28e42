//! containerd's registry host configuration (`hosts.toml`), as containerd users keep it:
//! `HOSTS_DIR/HOST[:PORT]/hosts.toml` (or `HOSTS_DIR/_default/hosts.toml`), usually
//! `/etc/containerd/certs.d`.
//!
//! Owns reading that file into what [`super::Options`] already knows: the `[host."URL"]`
//! entries that may `pull` become mirrors, in file order (plain `http://` or
//! `skip_verify = true`: no TLS verification), and a plain-`http://` `server` makes the
//! origin insecure. Per-host `ca`/`client` files, header blocks and `override_path` are not
//! read (certificates come from the `certs.d` directories as before); a host whose API root
//! is not `/v2` is skipped with a warning. It never makes a request.

use std::path::{Path, PathBuf};

use super::Mirror;

/// Errors of reading a `hosts.toml`.
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
}

/// What a `hosts.toml` says about one registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// Mirrors to read from before the origin, in order.
    pub mirrors: Vec<Mirror>,
    /// `server` is plain HTTP (or `skip_verify` at the top level).
    pub origin_insecure: bool,
}

/// The configuration for `registry` (`HOST[:PORT]`) under `hosts_dir`: its own directory's
/// `hosts.toml`, else `_default`'s, else nothing.
pub fn lookup(hosts_dir: &Path, registry: &str) -> Result<HostConfig, HostsError> {
    for dir in [registry, "_default"] {
        let path = hosts_dir.join(dir).join("hosts.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => return parse(&text).map_err(|message| HostsError::Parse { path, message }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(HostsError::Read { path, source }),
        }
    }
    Ok(HostConfig::default())
}

/// `scheme://host[:port][/v2]` → (`host[:port]`, plain HTTP). A longer path (an API root
/// elsewhere than `/v2`) is not supported.
fn location(url: &str) -> Result<(String, bool), String> {
    let (http, rest) = match url.split_once("://") {
        Some(("http", r)) => (true, r),
        Some(("https", r)) => (false, r),
        Some((s, _)) => return Err(format!("unsupported scheme {s} in {url}")),
        None => (false, url),
    };
    let rest = rest.trim_end_matches('/');
    let rest = rest.strip_suffix("/v2").unwrap_or(rest);
    if rest.is_empty() {
        return Err(format!("no host in {url}"));
    }
    if rest.contains('/') {
        return Err(format!(
            "{url}: an API root other than /v2 is not supported"
        ));
    }
    Ok((rest.to_string(), http))
}

/// Parses the text of a `hosts.toml`.
pub fn parse(text: &str) -> Result<HostConfig, String> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let flag = |t: &toml::Table, k: &str| t.get(k).and_then(toml::Value::as_bool).unwrap_or(false);
    let mut out = HostConfig {
        origin_insecure: flag(&doc, "skip_verify"),
        ..HostConfig::default()
    };
    if let Some(server) = doc.get("server") {
        let server = server.as_str().ok_or("`server` is not a string")?;
        out.origin_insecure |= location(server)?.1;
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
            let (loc, http) = match location(url) {
                Ok(l) => l,
                Err(e) => {
                    // The origin and the other mirrors still serve.
                    tracing::warn!(error = %e, "hosts.toml: mirror skipped");
                    continue;
                }
            };
            out.mirrors.push(Mirror {
                location: loc,
                insecure: http || flag(h, "skip_verify"),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_in_file_order_with_their_tls() {
        let c = parse(
            r#"
server = "http://registry.local:5000"

[host."https://zz-mirror.example/v2"]
  capabilities = ["pull", "resolve"]

[host."https://elsewhere.example/api"]

[host."http://127.0.0.1:5001"]
  capabilities = ["pull"]

[host."https://push-only.example"]
  capabilities = ["push"]

[host."https://self-signed.example"]
  skip_verify = true
"#,
        )
        .unwrap();
        assert!(c.origin_insecure);
        assert_eq!(
            c.mirrors,
            vec![
                Mirror {
                    location: "zz-mirror.example".into(),
                    insecure: false
                },
                Mirror {
                    location: "127.0.0.1:5001".into(),
                    insecure: true
                },
                Mirror {
                    location: "self-signed.example".into(),
                    insecure: true
                },
            ]
        );
        assert!(parse("server = 1").is_err());
        assert!(parse("[host.\"ftp://x\"]").unwrap().mirrors.is_empty());
        assert_eq!(parse("").unwrap(), HostConfig::default());
    }

    #[test]
    fn lookup_prefers_the_host_directory() {
        let d = tempfile::tempdir().unwrap();
        let write = |dir: &str, text: &str| {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
            std::fs::write(d.path().join(dir).join("hosts.toml"), text).unwrap();
        };
        assert_eq!(lookup(d.path(), "a:5000").unwrap(), HostConfig::default());
        write("_default", "[host.\"http://default-mirror\"]\n");
        write("a:5000", "[host.\"http://a-mirror\"]\n");
        assert_eq!(
            lookup(d.path(), "a:5000").unwrap().mirrors[0].location,
            "a-mirror"
        );
        assert_eq!(
            lookup(d.path(), "b").unwrap().mirrors[0].location,
            "default-mirror"
        );
        write("bad", "host = [");
        assert!(matches!(
            lookup(d.path(), "bad"),
            Err(HostsError::Parse { .. })
        ));
    }
}
