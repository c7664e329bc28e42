//! The remote registry backend: the distribution HTTP API over `reqwest`.
//!
//! Owns the HTTP side: endpoints (mirrors first, then the origin), the auth handshake and
//! token cache, retries with backoff, byte counting, range reads, resumable blob streams,
//! blob and manifest uploads, and referrers (the OCI 1.1 API with the `sha256-HEX` tag
//! fallback). Reads go to mirrors before the origin; pushes and referrer listings go to the
//! origin only (an artifact we pushed lives there).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use oci_spec::image::{Descriptor, Digest, ImageIndex};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Client, Method, StatusCode, Url};
use serde_json::json;

use super::auth::{self, Challenge, Credentials};
use super::hosts;
use super::tls::{self, Trust};
use super::{
    Artifact, BlobStream, Error, MAX_MANIFEST_SIZE, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, Options, RangeRead, RawManifest, Result, RetryPolicy,
    Stats, StreamSource, Verifier, add_index_entry, parse_json, sha256_digest, sniff_media_type,
    verify,
};
use crate::reference::{RegistryRef, valid_digest};

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// A registry repository, reached through its mirrors and origin.
#[derive(Clone)]
pub struct RemoteStore {
    inner: Arc<Inner>,
}

struct Inner {
    origin: RegistryRef,
    /// Mirrors in order, then the origin (always last).
    endpoints: Vec<Endpoint>,
    retry: RetryPolicy,
    stats: Arc<Stats>,
    /// Bearer tokens by (host, scope).
    tokens: Mutex<HashMap<(String, String), Token>>,
    /// Hosts that asked for Basic auth: send it up front from then on.
    basic_hosts: Mutex<HashSet<String>>,
    /// The endpoint that last served a blob, tried first next time.
    preferred: Mutex<HashMap<String, usize>>,
}

struct Endpoint {
    /// `scheme://host[:port]/`.
    base: Url,
    /// `host[:port]`, for auth and logs.
    host: String,
    /// The repository path on this endpoint (mirror prefix included).
    repository: String,
    creds: Option<Credentials>,
    client: Client,
    /// The certificate directory the client trusts (for error messages).
    cert_dir: Option<PathBuf>,
    /// The `hosts.toml` CA files the client trusts (for error messages).
    ca_files: Vec<PathBuf>,
    /// The API root below `base`, without a leading `/`, with a trailing one unless empty:
    /// `v2/` (or another root from a `hosts.toml`).
    api: String,
    /// Sent on every request to this endpoint (a `hosts.toml` header block); never
    /// `Authorization` or `Range`.
    headers: HeaderMap,
    is_origin: bool,
    /// Milliseconds since `epoch` until which this mirror is skipped (0: in service).
    resting_until_ms: AtomicU64,
    epoch: Instant,
    /// How this endpoint answered its last request carrying `Range:` ([`RANGES_UNKNOWN`],
    /// [`RANGES_SERVED`] or [`RANGES_IGNORED`]).
    ranges: AtomicU8,
}

/// [`Endpoint::ranges`]: no request with `Range:` answered yet.
const RANGES_UNKNOWN: u8 = 0;
/// [`Endpoint::ranges`]: the last request with `Range:` was answered `206`.
const RANGES_SERVED: u8 = 1;
/// [`Endpoint::ranges`]: the last request with `Range:` was answered with the whole blob.
const RANGES_IGNORED: u8 = 2;

/// How long a mirror that failed with a transient error is skipped.
const MIRROR_REST: Duration = Duration::from_secs(30);

struct Token {
    header: String,
    expires: Instant,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteStore")
            .field("origin", &self.inner.origin.to_string())
            .field(
                "endpoints",
                &self
                    .inner
                    .endpoints
                    .iter()
                    .map(|e| e.base.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// How one endpoint is reached: its client and what that trusts, its API root and headers.
struct Route {
    client: Client,
    cert_dir: Option<PathBuf>,
    ca_files: Vec<PathBuf>,
    /// `/v2`, or another API root.
    api_root: String,
    headers: HeaderMap,
}

impl Endpoint {
    async fn new(
        route: Route,
        insecure: bool,
        host: &str,
        repository: String,
        creds: Option<Credentials>,
        is_origin: bool,
    ) -> Result<Self> {
        let base = if insecure {
            insecure_base(&route.client, host).await
        } else {
            Url::parse(&format!("https://{host}/")).map_err(|_| Error::Mirror(host.to_owned()))?
        };
        let root = route.api_root.trim_matches('/');
        let api = if root.is_empty() {
            String::new()
        } else {
            format!("{root}/")
        };
        Ok(Endpoint {
            base,
            host: host.to_owned(),
            repository,
            creds,
            client: route.client,
            cert_dir: route.cert_dir,
            ca_files: route.ca_files,
            api,
            headers: route.headers,
            is_origin,
            resting_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            ranges: AtomicU8::new(RANGES_UNKNOWN),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn rest(&self) {
        let until = self.now_ms() + MIRROR_REST.as_millis() as u64;
        self.resting_until_ms.store(until, Ordering::Relaxed);
    }

    fn resting(&self) -> bool {
        self.resting_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Records how the endpoint answered a successful request carrying `Range:`: the last
    /// answer wins (a pull-through cache that ignored ranges while cold serves them warm).
    fn note_ranges(&self, status: StatusCode) {
        let seen = if status == StatusCode::PARTIAL_CONTENT {
            RANGES_SERVED
        } else {
            RANGES_IGNORED
        };
        self.ranges.store(seen, Ordering::Relaxed);
    }

    fn url(&self, path: &str) -> Url {
        let url = format!("{}{}{}/{path}", self.base, self.api, self.repository);
        Url::parse(&url).expect("host, API root and repository were validated")
    }

    /// A request to this endpoint: its configured headers, then `headers` (which replace
    /// configured ones of the same name), then `auth` as `Authorization`.
    fn request(
        &self,
        method: Method,
        url: &Url,
        headers: &HeaderMap,
        auth: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .request(method, url.clone())
            .headers(self.headers.clone())
            .headers(headers.clone());
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        req
    }

    /// A request that got no response: [`Error::Certificate`] when the server's certificate
    /// was rejected (not worth a retry), else [`Error::Connect`].
    fn transport_error(&self, method: &Method, url: &Url, source: reqwest::Error) -> Error {
        if is_certificate_error(&source) {
            Error::Certificate {
                method: method.to_string(),
                url: url.to_string(),
                registry: self.host.clone(),
                cert_dir: self.cert_dir.clone(),
                ca_files: self.ca_files.clone().into(),
                source,
            }
        } else {
            Error::Connect {
                method: method.to_string(),
                url: url.to_string(),
                source,
            }
        }
    }
}

/// Whether a transport error is rustls rejecting the server's certificate. reqwest does not
/// expose the rustls error type, so this looks for its message (`invalid peer certificate:
/// UnknownIssuer`, `... NotValidForName`, ...) along the chain, including the error an
/// `io::Error` wraps (which its `source()` skips).
fn is_certificate_error(err: &reqwest::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if e.to_string().contains("invalid peer certificate") {
            return true;
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if inner.to_string().contains("invalid peer certificate") {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// Picks https or http for an insecure endpoint: https (no certificate check) if it
/// answers, else plain http.
async fn insecure_base(client: &Client, host: &str) -> Url {
    let https = Url::parse(&format!("https://{host}/")).expect("validated host");
    match client
        .get(https.join("v2/").expect("static path"))
        .send()
        .await
    {
        Ok(_) => https,
        Err(e) => {
            tracing::debug!(host, error = %e, "no TLS, using plain http");
            Url::parse(&format!("http://{host}/")).expect("validated host")
        }
    }
}

/// A client for one trust setting: with `insecure`, no certificate check at all; else the
/// system roots plus the directory's CAs. The directory's client certificate is sent either
/// way, as podman does.
fn build_client(options: &Options, insecure: bool, trust: Option<&Trust>) -> Result<Client> {
    let mut builder = Client::builder()
        .connect_timeout(options.connect_timeout)
        .read_timeout(options.read_timeout)
        .danger_accept_invalid_certs(insecure)
        .user_agent(concat!("fanfill/", env!("CARGO_PKG_VERSION")));
    if let Some(trust) = trust {
        if !insecure {
            builder = builder.tls_certs_merge(trust.roots.iter().cloned());
        }
        if let Some(identity) = &trust.identity {
            builder = builder.identity(identity.clone());
        }
    }
    builder.build().map_err(Error::Client)
}

fn parse_mirror(location: &str) -> Result<(&str, &str)> {
    let location = location.trim_end_matches('/');
    let (host, prefix) = location.split_once('/').unwrap_or((location, ""));
    let probe = format!("docker://{host}/x");
    match probe.parse::<crate::reference::Reference>() {
        Ok(crate::reference::Reference::Registry(r)) if r.registry == host => Ok((host, prefix)),
        _ => Err(Error::Mirror(location.to_owned())),
    }
}

fn status_error(
    method: &Method,
    url: &Url,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Error {
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<Code>,
    }
    #[derive(serde::Deserialize)]
    struct Code {
        code: String,
    }
    let code = serde_json::from_slice::<Body>(body)
        .ok()
        .and_then(|b| b.errors.into_iter().next())
        .map(|c| c.code);
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Error::Status {
        method: method.to_string(),
        url: url.to_string(),
        status: status.as_u16(),
        code,
        retry_after,
    }
}

/// The `sha256-HEX` tag of the referrers fallback scheme.
pub fn referrers_tag(subject: &Digest) -> String {
    format!("{}-{}", subject.algorithm().as_ref(), subject.digest())
}

impl RemoteStore {
    /// Opens a registry repository. Finds credentials and certificate directories (see
    /// [`Options::cert_dir`]); for insecure endpoints, probes whether they speak TLS. Sends
    /// nothing to a secure origin.
    pub async fn open(reference: &RegistryRef, options: &Options) -> Result<Self> {
        let cert_roots = options
            .cert_roots
            .clone()
            .unwrap_or_else(|| tls::cert_roots(|k| std::env::var(k).ok()));
        let hosts = match &options.hosts_dir {
            Some(dir) => hosts::lookup(dir, &reference.registry)?,
            None => hosts::HostConfig::default(),
        };
        // One client per trust setting (insecure, certificate directory, hosts.toml `ca`
        // and `client` files): endpoints that trust the same things share connections.
        type Key = (bool, Option<PathBuf>, Vec<PathBuf>, Vec<hosts::ClientPair>);
        let mut clients: HashMap<Key, Client> = HashMap::new();
        let mut route_for = |insecure: bool,
                             registry: &str,
                             api_root: &str,
                             settings: &hosts::HostSettings|
         -> Result<Route> {
            let dir = options
                .cert_dir
                .clone()
                .or_else(|| tls::find_cert_dir(&cert_roots, registry));
            let key = (
                insecure,
                dir.clone(),
                settings.ca.clone(),
                settings.client.clone(),
            );
            let client = match clients.get(&key) {
                Some(client) => client.clone(),
                None => {
                    let mut trust = dir.as_deref().map(Trust::load).transpose()?;
                    if let Some(extra) = hosts.load_tls(settings)? {
                        let t = trust.get_or_insert_with(|| Trust {
                            roots: Vec::new(),
                            identity: None,
                        });
                        t.roots.extend(extra.roots);
                        // The hosts.toml's own client certificate wins.
                        if extra.identity.is_some() {
                            t.identity = extra.identity;
                        }
                    }
                    let client = build_client(options, insecure, trust.as_ref())?;
                    clients.insert(key, client.clone());
                    client
                }
            };
            Ok(Route {
                client,
                cert_dir: dir,
                ca_files: settings.ca.clone(),
                api_root: api_root.to_owned(),
                headers: settings.headers.clone(),
            })
        };
        let files = auth::auth_files(
            options.authfile.as_deref(),
            |k| std::env::var(k).ok(),
            nix::unistd::geteuid().as_raw(),
        );
        let origin_insecure = options.insecure || hosts.origin_insecure;
        let plain = hosts::HostSettings::default();
        let mirrors = options.mirrors.iter().map(|m| (m, "/v2", &plain)).chain(
            hosts
                .mirrors
                .iter()
                .map(|m| (&m.mirror, m.api_root.as_str(), &m.settings)),
        );
        let mut endpoints = Vec::new();
        for (mirror, api_root, settings) in mirrors {
            let (host, prefix) = parse_mirror(&mirror.location)?;
            let repository = if prefix.is_empty() {
                reference.repository.clone()
            } else {
                format!("{prefix}/{}", reference.repository)
            };
            let creds = auth::lookup(&files, host, &repository)?;
            endpoints.push(
                Endpoint::new(
                    route_for(mirror.insecure, host, api_root, settings)?,
                    mirror.insecure,
                    host,
                    repository,
                    creds,
                    false,
                )
                .await?,
            );
        }
        let creds = match &options.creds {
            Some(c) => Some(c.clone()),
            None => auth::lookup(&files, &reference.registry, &reference.repository)?,
        };
        endpoints.push(
            Endpoint::new(
                route_for(origin_insecure, &reference.registry, "/v2", &hosts.origin)?,
                origin_insecure,
                reference.api_host(),
                reference.repository.clone(),
                creds,
                true,
            )
            .await?,
        );
        Ok(RemoteStore {
            inner: Arc::new(Inner {
                origin: reference.clone(),
                endpoints,
                retry: options.retry.clone(),
                stats: Arc::default(),
                tokens: Mutex::default(),
                basic_hosts: Mutex::default(),
                preferred: Mutex::default(),
            }),
        })
    }

    /// The reference this store was opened for.
    pub fn reference(&self) -> &RegistryRef {
        &self.inner.origin
    }

    /// The store's counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    pub(super) async fn fetch_manifest(&self, reference: Option<&str>) -> Result<RawManifest> {
        let reference = reference.unwrap_or(self.inner.origin.reference());
        let key = valid_digest(reference).then_some(reference);
        self.inner
            .on_endpoints(key, |ep| self.inner.get_manifest(ep, reference))
            .await
    }

    pub(super) async fn fetch_blob(&self, digest: &Digest, size: u64) -> Result<Bytes> {
        let inner = &self.inner;
        let limit = usize::try_from(size).unwrap_or(usize::MAX);
        inner
            .on_endpoints(Some(digest.as_ref()), move |ep| async move {
                let url = ep.url(&format!("blobs/{digest}"));
                let resp = inner.get(ep, &url, HeaderMap::new()).await?;
                let bytes = inner.read_body(resp, &url, Some(limit)).await?;
                verify(digest, &bytes)?;
                Ok(bytes)
            })
            .await
    }

    pub(super) async fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        match self.read_range_or_whole(digest, offset, len, None).await? {
            RangeRead::Range(bytes) => Ok(bytes),
            RangeRead::Whole(stream) => stream.into_slice(offset, len).await,
        }
    }

    pub(super) async fn read_range_or_whole(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        seen: Option<super::RangeSeen<'_>>,
    ) -> Result<RangeRead> {
        let inner = &self.inner;
        let got = inner
            .on_endpoints(Some(digest.as_ref()), move |ep| async move {
                let url = ep.url(&format!("blobs/{digest}"));
                let mut headers = HeaderMap::new();
                let range = format!("bytes={}-{}", offset, offset + len - 1);
                headers.insert(header::RANGE, HeaderValue::from_str(&range).expect("ascii"));
                let resp = inner.get(ep, &url, headers).await?;
                ep.note_ranges(resp.status());
                let size = match resp.status() {
                    StatusCode::PARTIAL_CONTENT => check_content_range(&resp, &url, offset)?,
                    _ => resp.content_length(),
                };
                if let Some(size) = size.filter(|size| offset + len > *size) {
                    return Err(Error::RangeBeyondEnd {
                        digest: digest.to_string(),
                        offset,
                        len,
                        size,
                    });
                }
                if resp.status() == StatusCode::PARTIAL_CONTENT {
                    return Ok(Ok(inner.read_slice(resp, &url, 0, len, seen).await?));
                }
                tracing::debug!(url = %url, offset, len, "server ignored Range: it sends the whole blob");
                Ok(Err(resp))
            })
            .await?;
        Ok(match got {
            Ok(bytes) => RangeRead::Range(bytes),
            Err(response) => RangeRead::Whole(Box::new(self.stream_of(digest, response)?)),
        })
    }

    /// A verified stream of the whole blob `digest` over `response` (a GET from byte 0).
    fn stream_of(&self, digest: &Digest, response: reqwest::Response) -> Result<BlobStream> {
        Ok(BlobStream {
            digest: digest.clone(),
            position: 0,
            verifier: Some(Verifier::new(digest)?),
            mismatch: None,
            source: StreamSource::Remote(StreamState {
                store: self.clone(),
                response: Some(response),
                skip: 0,
                failures: 0,
            }),
            stats: self.inner.stats.clone(),
        })
    }

    /// Whether the endpoint a request for `digest` goes to first answers range reads:
    /// `None` until it answered one (see [`Endpoint::note_ranges`]).
    pub(super) fn serves_ranges(&self, digest: &Digest) -> Option<bool> {
        let ep = self.inner.first_endpoint(digest.as_ref());
        match ep.ranges.load(Ordering::Relaxed) {
            RANGES_SERVED => Some(true),
            RANGES_IGNORED => Some(false),
            _ => None,
        }
    }

    pub(super) async fn open_stream(&self, digest: &Digest) -> Result<BlobStream> {
        Verifier::new(digest)?;
        let (response, skip) = self.open_blob_at(digest, 0).await?;
        debug_assert_eq!(skip, 0, "a GET from byte 0 skips nothing");
        self.stream_of(digest, response)
    }

    /// A GET of a blob from byte `from` on; returns the response and how many leading body
    /// bytes to drop (when the server ignored `Range:`).
    async fn open_blob_at(&self, digest: &Digest, from: u64) -> Result<(reqwest::Response, u64)> {
        let inner = &self.inner;
        inner
            .on_endpoints(Some(digest.as_ref()), move |ep| async move {
                let url = ep.url(&format!("blobs/{digest}"));
                let mut headers = HeaderMap::new();
                if from > 0 {
                    let range = format!("bytes={from}-");
                    headers.insert(header::RANGE, HeaderValue::from_str(&range).expect("ascii"));
                }
                let resp = inner.get(ep, &url, headers).await?;
                if from > 0 {
                    ep.note_ranges(resp.status());
                }
                if resp.status() == StatusCode::PARTIAL_CONTENT {
                    check_content_range(&resp, &url, from)?;
                    Ok((resp, 0))
                } else {
                    Ok((resp, from))
                }
            })
            .await
    }

    pub(super) async fn list_referrers(
        &self,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let inner = &self.inner;
        let ep = inner.origin();
        let mut url = ep.url(&format!("referrers/{subject}"));
        if let Some(t) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", t);
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(MEDIA_OCI_INDEX));
        let (url, headers) = (&url, &headers);
        let api = inner.retrying(move || async move {
            let resp = inner.get(ep, url, headers.clone()).await?;
            let is_index = content_type(&resp).as_deref() == Some(MEDIA_OCI_INDEX);
            let bytes = inner.read_body(resp, url, Some(MAX_MANIFEST_SIZE)).await?;
            Ok(is_index.then_some(bytes))
        });
        // The fallback tag is read beside the API, not after it: a registry without the API
        // (`docker-registry` 2.x) costs one round trip instead of two before the artifact is
        // known. Its answer is used only when the API is missing, and dropped (the request
        // cancelled) as soon as the API answers with an index.
        let tag = referrers_tag(subject);
        let fallback = inner.retrying(|| inner.get_manifest(ep, &tag));
        futures::pin_mut!(api, fallback);
        let (api, tagged) = match futures::future::select(api, fallback.as_mut()).await {
            futures::future::Either::Left((api, _)) => (api, None),
            futures::future::Either::Right((tagged, api)) => (api.await, Some(tagged)),
        };
        let index_bytes = match api {
            Ok(Some(bytes)) => Some(bytes),
            Ok(None) => None,
            Err(Error::NotFound { .. }) => None,
            Err(Error::Status {
                status: 400 | 405 | 501,
                ..
            }) => None,
            Err(e) => return Err(e),
        };
        let index_bytes = match index_bytes {
            Some(b) => b,
            None => {
                tracing::debug!(subject = %subject, tag, "no referrers API, reading the fallback tag");
                let tagged = match tagged {
                    Some(tagged) => tagged,
                    None => fallback.await,
                };
                match tagged {
                    Ok(raw) => raw.bytes,
                    Err(Error::NotFound { .. }) => return Ok(Vec::new()),
                    Err(e) => return Err(e),
                }
            }
        };
        let index: ImageIndex = parse_json(&index_bytes, &format!("referrers of {subject}"))?;
        Ok(index
            .manifests()
            .iter()
            .filter(|d| {
                artifact_type.is_none_or(|want| {
                    d.artifact_type().as_ref().map(|t| t.to_string()).as_deref() == Some(want)
                })
            })
            .cloned()
            .collect())
    }

    pub(super) async fn push_artifact(&self, subject: &Digest, artifact: Artifact) -> Result<()> {
        let inner = &self.inner;
        let ep = inner.origin();
        for (digest, data) in artifact.blobs {
            inner.push_blob(ep, &digest, data).await?;
        }
        let digest = artifact.digest;
        let headers = inner
            .put_manifest(ep, digest.as_ref(), MEDIA_OCI_MANIFEST, artifact.manifest)
            .await?;
        if headers.contains_key("oci-subject") {
            tracing::debug!(artifact = %digest, "registry indexed the subject itself");
            return Ok(());
        }
        // Referrers tag fallback: add our descriptor to the index at `sha256-HEX`.
        let tag = referrers_tag(subject);
        let mut index = match inner.retrying(|| inner.get_manifest(ep, &tag)).await {
            Ok(raw) => parse_json::<serde_json::Value>(&raw.bytes, &format!("tag {tag}"))?,
            Err(Error::NotFound { .. }) => {
                json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []})
            }
            Err(e) => return Err(e),
        };
        add_index_entry(&mut index, artifact.entry, &tag)?;
        let index_bytes = Bytes::from(serde_json::to_vec(&index).expect("JSON value serializes"));
        inner
            .put_manifest(ep, &tag, MEDIA_OCI_INDEX, index_bytes)
            .await?;
        tracing::debug!(artifact = %digest, tag, "referrers tag updated");
        Ok(())
    }
}

impl RemoteStore {
    pub(super) async fn push_tagged(
        &self,
        tag: &str,
        manifest: Bytes,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Result<()> {
        let inner = &self.inner;
        let ep = inner.origin();
        for (digest, data) in blobs {
            inner.push_blob(ep, &digest, data).await?;
        }
        inner
            .put_manifest(ep, tag, MEDIA_OCI_MANIFEST, manifest)
            .await?;
        Ok(())
    }
}

fn content_type(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
}

/// Checks that a 206 answer starts where we asked; returns the blob size if the server
/// said (`Content-Range: bytes START-END/SIZE`).
fn check_content_range(resp: &reqwest::Response, url: &Url, offset: u64) -> Result<Option<u64>> {
    let value = resp
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.strip_prefix("bytes "));
    let start = value
        .and_then(|s| s.split('-').next())
        .and_then(|s| s.parse::<u64>().ok());
    let size = value
        .and_then(|s| s.rsplit_once('/'))
        .and_then(|(_, size)| size.parse::<u64>().ok());
    match start {
        Some(s) if s == offset => Ok(size),
        _ => Err(Error::Protocol {
            url: url.to_string(),
            problem: "Content-Range does not start where asked",
        }),
    }
}

impl Inner {
    fn origin(&self) -> &Endpoint {
        self.endpoints.last().expect("the origin is always there")
    }

    /// The endpoint [`Inner::on_endpoints`] tries first for `key`.
    fn first_endpoint(&self, key: &str) -> &Endpoint {
        let preferred = self.preferred.lock().expect("lock").get(key).copied();
        preferred
            .into_iter()
            .chain(0..self.endpoints.len())
            .map(|i| &self.endpoints[i])
            .find(|ep| ep.is_origin || !ep.resting())
            .unwrap_or_else(|| self.origin())
    }

    /// Runs `op` on each endpoint in turn (the one that last served `key` first) until one
    /// succeeds; each with retries. A mirror's failure moves on (a transient one also rests
    /// the mirror for [`MIRROR_REST`]); the origin's is returned.
    async fn on_endpoints<'a, T, Fut>(
        &'a self,
        key: Option<&str>,
        op: impl Fn(&'a Endpoint) -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        let preferred = key.and_then(|k| self.preferred.lock().expect("lock").get(k).copied());
        let order = preferred
            .into_iter()
            .chain((0..self.endpoints.len()).filter(|i| Some(*i) != preferred));
        for i in order {
            let ep = &self.endpoints[i];
            if !ep.is_origin && ep.resting() {
                continue;
            }
            match self.retrying(|| op(ep)).await {
                Ok(v) => {
                    if let Some(k) = key {
                        if self.endpoints.len() > 1 && preferred != Some(i) {
                            self.preferred.lock().expect("lock").insert(k.to_owned(), i);
                        }
                    }
                    return Ok(v);
                }
                Err(e) if !ep.is_origin => {
                    if e.is_transient() {
                        // Unreachable or failing: skip it for a while rather than spend
                        // the retry budget on it for every blob.
                        ep.rest();
                    }
                    tracing::warn!(mirror = %ep.host, error = %e, "mirror failed, trying the next source");
                }
                Err(e) => {
                    if preferred == Some(i) {
                        // Went straight to the origin and it failed: next time, mirrors first.
                        if let Some(k) = key {
                            self.preferred.lock().expect("lock").remove(k);
                        }
                    }
                    return Err(e);
                }
            }
        }
        unreachable!("the origin is always the last endpoint")
    }

    /// Runs `op` until it succeeds, fails for good, or the retry budget is spent.
    async fn retrying<T, Fut>(&self, mut op: impl FnMut() -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut delay = self.retry.initial_backoff;
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < self.retry.max_attempts => {
                    let asked = match &e {
                        Error::Status {
                            retry_after: Some(d),
                            ..
                        } => *d,
                        _ => Duration::ZERO,
                    };
                    let wait = delay.max(asked).min(self.retry.max_backoff);
                    if start.elapsed() + wait > self.retry.max_elapsed {
                        return Err(e);
                    }
                    tracing::warn!(attempt, wait_ms = wait.as_millis() as u64, error = %e, "transient failure, retrying");
                    self.stats.add_retry();
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The auth header we already know for this endpoint and scope.
    fn cached_auth(&self, ep: &Endpoint, scope: &str) -> Option<String> {
        let key = (ep.host.clone(), scope.to_owned());
        if let Some(t) = self.tokens.lock().expect("lock").get(&key) {
            if t.expires > Instant::now() {
                return Some(t.header.clone());
            }
        }
        if self.basic_hosts.lock().expect("lock").contains(&ep.host) {
            return ep.creds.as_ref().map(Credentials::basic_header);
        }
        None
    }

    /// Sends one request, answering one auth challenge. Any status but 401 is returned.
    async fn send(
        &self,
        ep: &Endpoint,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Option<Bytes>,
        push: bool,
    ) -> Result<reqwest::Response> {
        let scope = format!(
            "repository:{}:{}",
            ep.repository,
            if push { "pull,push" } else { "pull" }
        );
        let mut auth = self.cached_auth(ep, &scope);
        let mut answered = false;
        loop {
            let mut req = ep.request(method.clone(), url, &headers, auth.as_deref());
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            self.stats.add_request();
            let sent = std::time::Instant::now();
            let resp = req
                .send()
                .await
                .map_err(|source| ep.transport_error(&method, url, source))?;
            tracing::trace!(
                %method,
                path = url.path(),
                range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
                status = resp.status().as_u16(),
                us = sent.elapsed().as_micros() as u64,
                "registry answered"
            );
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let unauthorized = || Error::Unauthorized {
                registry: ep.host.clone(),
                repository: ep.repository.clone(),
                had_credentials: ep.creds.is_some(),
            };
            if answered {
                return Err(unauthorized());
            }
            answered = true;
            tracing::debug!(%method, %url, had_auth = auth.is_some(), "authentication challenge");
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(auth::parse_challenge);
            auth = match challenge {
                Some(Challenge::Basic) => {
                    let creds = ep.creds.as_ref().ok_or_else(unauthorized)?;
                    self.basic_hosts
                        .lock()
                        .expect("lock")
                        .insert(ep.host.clone());
                    Some(creds.basic_header())
                }
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: asked,
                }) => {
                    // Ask for what this operation needs (a HEAD before an upload is
                    // challenged for `pull` only) and for what the server named.
                    let mut scopes = vec![scope.as_str()];
                    scopes.extend(asked.as_deref().filter(|a| *a != scope));
                    Some(
                        self.fetch_token(ep, &realm, service.as_deref(), &scopes, &scope)
                            .await?,
                    )
                }
                None => return Err(unauthorized()),
            };
        }
    }

    /// Gets a Bearer token for `scopes` from `realm` and caches it under (host, `cache_scope`).
    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scopes: &[&str],
        cache_scope: &str,
    ) -> Result<String> {
        let token_err = |source: Box<dyn std::error::Error + Send + Sync>| Error::Token {
            registry: ep.host.clone(),
            realm: realm.to_owned(),
            source,
        };
        let mut url = Url::parse(realm).map_err(|e| token_err(Box::new(e)))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for scope in scopes {
                q.append_pair("scope", scope);
            }
        }
        let mut req = ep.client.get(url);
        if let Some(c) = &ep.creds {
            req = req.header(header::AUTHORIZATION, c.basic_header());
        }
        self.stats.add_request();
        let resp = req.send().await.map_err(|e| token_err(Box::new(e)))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| token_err(Box::new(e)))?;
        self.stats.add_bytes(body.len());
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Error::Unauthorized {
                registry: ep.host.clone(),
                repository: ep.repository.clone(),
                had_credentials: ep.creds.is_some(),
            });
        }
        if !status.is_success() {
            return Err(token_err(format!("HTTP {status}").into()));
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| token_err(Box::new(e)))?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| token_err("no token in the answer".into()))?;
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(60).max(60));
        let header = format!("Bearer {token}");
        self.tokens.lock().expect("lock").insert(
            (ep.host.clone(), cache_scope.to_owned()),
            Token {
                header: header.clone(),
                expires: Instant::now() + lifetime - Duration::from_secs(10),
            },
        );
        tracing::debug!(registry = %ep.host, ?scopes, "got a bearer token");
        Ok(header)
    }

    /// Turns a non-success status into an error (404 → [`Error::NotFound`]).
    async fn check(
        &self,
        method: &Method,
        url: &Url,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                what: url.path().trim_start_matches("/v2/").to_owned(),
            });
        }
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap_or_default();
        Err(status_error(method, url, status, &headers, &body))
    }

    /// A GET whose status is checked.
    async fn get(&self, ep: &Endpoint, url: &Url, headers: HeaderMap) -> Result<reqwest::Response> {
        let resp = self
            .send(ep, Method::GET, url, headers, None, false)
            .await?;
        self.check(&Method::GET, url, resp).await
    }

    /// Reads a whole body (at most `limit` bytes), counting it.
    async fn read_body(
        &self,
        mut resp: reqwest::Response,
        url: &Url,
        limit: Option<usize>,
    ) -> Result<Bytes> {
        let expected = resp.content_length();
        let too_long = |max: usize| Error::BodyTooLong {
            what: url.to_string(),
            max: max as u64,
        };
        // A declared length past the limit is refused before any body byte is read.
        if let (Some(max), Some(want)) = (limit, expected) {
            if want > max as u64 {
                return Err(too_long(max));
            }
        }
        let mut out = BytesMut::with_capacity(expected.unwrap_or(0).min(1 << 24) as usize);
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    self.stats.add_bytes(chunk.len());
                    out.extend_from_slice(&chunk);
                    if let Some(max) = limit.filter(|&max| out.len() > max) {
                        return Err(too_long(max));
                    }
                }
                Ok(None) => break,
                Err(source) => {
                    return Err(Error::Body {
                        url: url.to_string(),
                        source,
                    });
                }
            }
        }
        if let Some(want) = expected {
            if (out.len() as u64) < want {
                return Err(Error::ShortRead {
                    what: url.to_string(),
                    got: out.len() as u64,
                    want,
                });
            }
        }
        Ok(out.freeze())
    }

    /// Drops `skip` body bytes, then reads exactly `len`.
    async fn read_slice(
        &self,
        mut resp: reqwest::Response,
        url: &Url,
        mut skip: u64,
        len: u64,
        seen: Option<super::RangeSeen<'_>>,
    ) -> Result<Bytes> {
        let mut out = BytesMut::with_capacity(len as usize);
        while (out.len() as u64) < len {
            match resp.chunk().await {
                Ok(Some(mut chunk)) => {
                    self.stats.add_bytes(chunk.len());
                    if skip > 0 {
                        let n = skip.min(chunk.len() as u64);
                        let _ = chunk.split_to(n as usize);
                        skip -= n;
                    }
                    let take = (len - out.len() as u64).min(chunk.len() as u64) as usize;
                    out.extend_from_slice(&chunk[..take]);
                    if let Some(seen) = seen {
                        seen(&out);
                    }
                }
                Ok(None) => {
                    return Err(Error::ShortRead {
                        what: url.to_string(),
                        got: out.len() as u64,
                        want: len,
                    });
                }
                Err(source) => {
                    return Err(Error::Body {
                        url: url.to_string(),
                        source,
                    });
                }
            }
        }
        Ok(out.freeze())
    }

    async fn get_manifest(&self, ep: &Endpoint, reference: &str) -> Result<RawManifest> {
        let url = ep.url(&format!("manifests/{reference}"));
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let resp = self.get(ep, &url, headers).await?;
        let content_type = content_type(&resp).unwrap_or_default();
        let bytes = self.read_body(resp, &url, Some(MAX_MANIFEST_SIZE)).await?;
        let digest = if valid_digest(reference) {
            let digest: Digest = reference.parse().expect("valid digest");
            verify(&digest, &bytes)?;
            digest
        } else {
            sha256_digest(&bytes)
        };
        let known = [
            MEDIA_OCI_MANIFEST,
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_MANIFEST,
            MEDIA_DOCKER_LIST,
        ];
        let media_type = if known.contains(&content_type.as_str())
            || content_type.starts_with("application/vnd.docker.distribution.manifest.v1")
        {
            content_type
        } else {
            sniff_media_type(&bytes)
        };
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Uploads a blob unless the repository has it (monolithic POST + PUT).
    async fn push_blob(&self, ep: &Endpoint, digest: &Digest, data: Bytes) -> Result<()> {
        let blob_url = ep.url(&format!("blobs/{digest}"));
        let blob_url = &blob_url;
        let exists = self
            .retrying(move || async move {
                let resp = self
                    .send(ep, Method::HEAD, blob_url, HeaderMap::new(), None, true)
                    .await?;
                match self.check(&Method::HEAD, blob_url, resp).await {
                    Ok(_) => Ok(true),
                    Err(Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if exists {
            return Ok(());
        }
        let start_url = &ep.url("blobs/uploads/");
        let data_ref = &data;
        self.retrying(move || async move {
            let resp = self
                .send(
                    ep,
                    Method::POST,
                    start_url,
                    HeaderMap::new(),
                    Some(Bytes::new()),
                    true,
                )
                .await?;
            let resp = self.check(&Method::POST, start_url, resp).await?;
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| start_url.join(l).ok())
                .ok_or_else(|| Error::Protocol {
                    url: start_url.to_string(),
                    problem: "upload started without a Location",
                })?;
            let mut put_url = location;
            put_url
                .query_pairs_mut()
                .append_pair("digest", digest.as_ref());
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let resp = self
                .send(
                    ep,
                    Method::PUT,
                    &put_url,
                    headers,
                    Some(data_ref.clone()),
                    true,
                )
                .await?;
            self.check(&Method::PUT, &put_url, resp).await?;
            Ok(())
        })
        .await?;
        tracing::debug!(digest = %digest, size = data.len(), repository = %ep.repository, "blob pushed");
        Ok(())
    }

    /// PUTs a manifest under `reference`; returns the response headers.
    async fn put_manifest(
        &self,
        ep: &Endpoint,
        reference: &str,
        media_type: &'static str,
        bytes: Bytes,
    ) -> Result<HeaderMap> {
        let url = &ep.url(&format!("manifests/{reference}"));
        let bytes = &bytes;
        self.retrying(move || async move {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
            let resp = self
                .send(ep, Method::PUT, url, headers, Some(bytes.clone()), true)
                .await?;
            let resp = self.check(&Method::PUT, url, resp).await?;
            Ok(resp.headers().clone())
        })
        .await
    }
}

/// The network side of a remote [`BlobStream`]: resumes at the current offset after a
/// broken body.
pub(super) struct StreamState {
    store: RemoteStore,
    response: Option<reqwest::Response>,
    /// Leading bytes of `response` to drop (a resume answered with 200).
    skip: u64,
    /// Consecutive failures without progress.
    failures: u32,
}

impl StreamState {
    pub(super) async fn next(&mut self, digest: &Digest, position: u64) -> Result<Option<Bytes>> {
        let inner = &self.store.inner;
        loop {
            let resp = match &mut self.response {
                Some(r) => r,
                None => {
                    let (r, skip) = self.store.open_blob_at(digest, position).await?;
                    self.skip = skip;
                    self.response.insert(r)
                }
            };
            match resp.chunk().await {
                Ok(Some(mut chunk)) => {
                    self.failures = 0;
                    if self.skip > 0 {
                        let n = self.skip.min(chunk.len() as u64);
                        inner.stats.add_bytes(n as usize);
                        let _ = chunk.split_to(n as usize);
                        self.skip -= n;
                    }
                    if !chunk.is_empty() {
                        return Ok(Some(chunk));
                    }
                }
                Ok(None) if self.skip > 0 => {
                    return Err(Error::ShortRead {
                        what: format!("blob {digest}"),
                        got: 0,
                        want: self.skip,
                    });
                }
                Ok(None) => return Ok(None),
                Err(source) => {
                    self.failures += 1;
                    let err = Error::Body {
                        url: resp.url().to_string(),
                        source,
                    };
                    if self.failures >= inner.retry.max_attempts {
                        return Err(err);
                    }
                    let wait = (inner.retry.initial_backoff * 2u32.pow(self.failures - 1))
                        .min(inner.retry.max_backoff);
                    tracing::warn!(digest = %digest, position, error = %err, "blob stream broke off, resuming");
                    inner.stats.add_retry();
                    self.response = None;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secure endpoint as `open` makes it from a `hosts.toml` entry (no network).
    async fn endpoint(api_root: &str, toml_headers: &str) -> Endpoint {
        let config = hosts::parse(
            &format!(
                "[host.\"https://m.example{api_root}\"]\noverride_path = true\n{toml_headers}"
            ),
            std::path::Path::new("/nowhere"),
        )
        .unwrap();
        let m = &config.mirrors[0];
        let route = Route {
            client: build_client(&Options::default(), false, None).unwrap(),
            cert_dir: None,
            ca_files: Vec::new(),
            api_root: m.api_root.clone(),
            headers: m.settings.headers.clone(),
        };
        Endpoint::new(route, false, "m.example", "lib/app".into(), None, false)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn requests_carry_the_host_headers_and_api_root() {
        let ep = endpoint(
            "",
            "[host.\"https://m.example\".header]\nx-token = \"t\"\nx-multi = [\"a\", \"b\"]\n\
             accept = \"text/plain\"\nauthorization = \"Basic c25lYWt5\"\nRange = \"bytes=0-0\"",
        )
        .await;
        let url = ep.url("blobs/sha256:00");
        // override_path with no path: the repository sits at the root.
        assert_eq!(url.as_str(), "https://m.example/lib/app/blobs/sha256:00");
        let mut own = HeaderMap::new();
        own.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        own.insert(header::RANGE, HeaderValue::from_static("bytes=5-9"));
        let req = ep
            .request(Method::GET, &url, &own, Some("Bearer ours"))
            .build()
            .unwrap();
        let h = req.headers();
        assert_eq!(h["x-token"], "t");
        let multi: Vec<_> = h.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        // fanfill's own headers win; Authorization and Range are never the file's.
        let one = |name| h.get_all(name).iter().collect::<Vec<_>>();
        assert_eq!(one(header::ACCEPT), [MANIFEST_ACCEPT]);
        assert_eq!(one(header::RANGE), ["bytes=5-9"]);
        assert_eq!(one(header::AUTHORIZATION), ["Bearer ours"]);
        // Without its own Range or auth, a request has none at all.
        let req = ep
            .request(Method::GET, &url, &HeaderMap::new(), None)
            .build()
            .unwrap();
        assert!(!req.headers().contains_key(header::RANGE));
        assert!(!req.headers().contains_key(header::AUTHORIZATION));
        assert_eq!(req.headers()["accept"], "text/plain");

        let ep = endpoint("/api/v2/", "").await;
        assert_eq!(
            ep.url("manifests/v1").as_str(),
            "https://m.example/api/v2/lib/app/manifests/v1"
        );
        assert!(
            ep.request(Method::GET, &url, &HeaderMap::new(), None)
                .build()
                .unwrap()
                .headers()
                .is_empty()
        );
    }
}
