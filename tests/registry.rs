//! Registry and layout blob access against a real `docker-registry` and real `skopeo`.

mod common;

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::{
    BuiltImage, Fault, FaultyProxy, TestRegistry, TokenServer, build_index, build_oci_layout,
    noise, push_layout, push_layout_tls, run_async, write_image,
};
use fanfill::reference::Reference;
use fanfill::registry::{BlobStore, Credentials, Error, Mirror, Options, Platform, RetryPolicy};
use futures::TryStreamExt as _;
use oci_spec::image::Digest;

const TAG: &str = "v1";
const REPO: &str = "fanfill/test";

/// Two layers: a big poorly compressible file (so ranges span many gzip blocks), and a
/// small text layer.
fn sample_layers() -> Vec<Vec<(&'static str, Vec<u8>)>> {
    vec![
        vec![
            ("usr/lib/big.bin", noise(700_000, 1)),
            ("etc/hostname", b"fanfill\n".to_vec()),
        ],
        vec![("app/README", b"hello from layer two\n".repeat(100))],
    ]
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        max_elapsed: Duration::from_secs(20),
    }
}

fn insecure() -> Options {
    Options {
        insecure: true,
        retry: fast_retry(),
        ..Options::default()
    }
}

fn digest(s: &str) -> Digest {
    s.parse().unwrap()
}

/// A registry holding the sample image as `fanfill/test:v1`, and the layout it came from.
fn registry_with_image() -> (TestRegistry, tempfile::TempDir, BuiltImage) {
    let reg = TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let image = build_oci_layout(dir.path(), TAG, &sample_layers());
    push_layout(dir.path(), TAG, &reg.host(), REPO, &[]);
    (reg, dir, image)
}

async fn open(reference: &str, options: &Options) -> BlobStore {
    let r: Reference = reference.parse().unwrap();
    BlobStore::open(&r, options).await.unwrap()
}

fn layout_ref(dir: &Path, tag: Option<&str>) -> String {
    match tag {
        Some(t) => format!("oci:{}:{t}", dir.display()),
        None => format!("oci:{}", dir.display()),
    }
}

#[test]
fn resolve_and_read_ranges() {
    common::init_tracing();
    let (reg, _dir, image) = registry_with_image();
    run_async(120, async {
        let store = open(
            &format!("docker://{}/{REPO}:{TAG}", reg.host()),
            &insecure(),
        )
        .await;
        let resolved = store.resolve(None).await.unwrap();
        assert_eq!(resolved.manifest_digest.to_string(), image.manifest_digest);
        assert_eq!(resolved.manifest_bytes.as_ref(), image.manifest.as_slice());
        assert_eq!(resolved.config_bytes.as_ref(), image.config.as_slice());
        assert_eq!(
            resolved.manifest_media_type,
            fanfill::registry::MEDIA_OCI_MANIFEST
        );
        assert_eq!(resolved.index_digest, None);
        assert_eq!(resolved.manifest.layers().len(), 2);
        assert_eq!(resolved.config.rootfs().diff_ids().len(), 2);

        let layer = &image.layers[0];
        let d = digest(&layer.digest);
        let size = layer.blob.len() as u64;
        for (offset, len) in [
            (0, 1),
            (0, 4096),
            (12_345, 100_000),
            (size - 10, 10),
            (size / 2, 1),
        ] {
            let got = store.read_range(&d, offset, len).await.unwrap();
            assert_eq!(
                got.as_ref(),
                &layer.blob[offset as usize..(offset + len) as usize],
                "range {offset}+{len}"
            );
        }
        assert!(store.read_range(&d, 5, 0).await.unwrap().is_empty());
        // Past the end: an error, never a short buffer.
        let err = store.read_range(&d, size - 10, 20).await.unwrap_err();
        assert!(matches!(err, Error::RangeBeyondEnd { .. }), "{err}");
        assert!(err.to_string().contains(&layer.digest), "{err}");
        let err = store.read_range(&d, size + 100, 10).await.unwrap_err();
        assert!(matches!(err, Error::Status { status: 416, .. }), "{err}");
        assert!(err.to_string().contains(&layer.digest), "{err}");

        // By digest, too.
        let by_digest = open(
            &format!("docker://{}/{REPO}@{}", reg.host(), image.manifest_digest),
            &insecure(),
        )
        .await;
        let again = by_digest.resolve(None).await.unwrap();
        assert_eq!(again.manifest_digest, resolved.manifest_digest);

        let stats = store.stats();
        assert!(
            stats.bytes_fetched() >= 4096 + 100_000,
            "{}",
            stats.bytes_fetched()
        );
        assert!(stats.requests() >= 8);
        assert_eq!(stats.retries(), 0);
    });
}

#[test]
fn stream_fetch_and_verify() {
    let (reg, _dir, image) = registry_with_image();
    run_async(120, async {
        let store = open(
            &format!("docker://{}/{REPO}:{TAG}", reg.host()),
            &insecure(),
        )
        .await;
        let layer = &image.layers[0];
        let d = digest(&layer.digest);

        let chunks: Vec<Bytes> = store
            .open_stream(&d)
            .await
            .unwrap()
            .into_stream()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(chunks.concat(), layer.blob);

        let small = &image.layers[1];
        assert_eq!(
            store
                .fetch_blob(&digest(&small.digest), small.blob.len() as u64)
                .await
                .unwrap()
                .as_ref(),
            small.blob.as_slice()
        );

        // One-pass tar reading on a blocking thread, the way the indexer does it.
        let stream = store.open_stream(&d).await.unwrap();
        let reader = stream.into_blocking_reader();
        let big = tokio::task::spawn_blocking(move || {
            let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
            let mut found = None;
            for entry in archive.entries().unwrap() {
                let mut entry = entry.unwrap();
                if entry.path().unwrap().to_str() == Some("usr/lib/big.bin") {
                    let mut buf = Vec::new();
                    entry.read_to_end(&mut buf).unwrap();
                    found = Some(buf);
                }
            }
            found
        })
        .await
        .unwrap();
        assert_eq!(big.unwrap(), noise(700_000, 1));
    });
}

#[test]
fn missing_and_corrupt_blobs_are_errors() {
    let (reg, _dir, image) = registry_with_image();
    let layer = image.layers[1].clone();
    run_async(120, async {
        let store = open(
            &format!("docker://{}/{REPO}:{TAG}", reg.host()),
            &insecure(),
        )
        .await;
        let absent = digest(&common::sha256(b"not there"));
        let err = store.fetch_blob(&absent, 9).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(
            store
                .read_range(&absent, 0, 10)
                .await
                .unwrap_err()
                .is_not_found()
        );
        let err = open(&format!("docker://{}/{REPO}:nope", reg.host()), &insecure())
            .await
            .resolve(None)
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains("manifests/nope"), "{err}");

        // Corrupt the registry's copy of a blob (same length): whole reads must notice.
        let path = reg.blob_data_path(&layer.digest);
        let mut bad = std::fs::read(&path).unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let d = digest(&layer.digest);
        let err = store
            .fetch_blob(&d, layer.blob.len() as u64)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&layer.digest), "{err}");
        let mut stream = store.open_stream(&d).await.unwrap();
        let mut got = 0;
        let err = loop {
            match stream.chunk().await {
                Ok(Some(c)) => got += c.len(),
                Ok(None) => panic!("corrupt stream verified"),
                Err(e) => break e,
            }
        };
        assert_eq!(got, bad.len());
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        // Asking again does not turn the failure into a clean end.
        assert!(matches!(
            stream.chunk().await,
            Err(Error::DigestMismatch { .. })
        ));
        // A range read cannot verify; it returns the bytes as served.
        assert_eq!(
            store.read_range(&d, last as u64, 1).await.unwrap()[0],
            bad[last]
        );
    });
}

/// A registry that answers `/v2/` and then, for every other request, a `200` whose chunked
/// body never ends: what a hostile or broken registry can send for a config or any blob read
/// whole. Returns its `host:port`.
fn endless_registry() -> String {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut out = conn;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    while reader
                        .read_line(&mut line)
                        .is_ok_and(|n| n > 0 && !line.ends_with("\r\n\r\n"))
                    {}
                    if path == "/v2/" {
                        let _ = out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                        continue;
                    }
                    let _ = out.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
                    let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "x".repeat(64 << 10));
                    // Until the client goes away.
                    while out.write_all(chunk.as_bytes()).is_ok() {}
                    return;
                }
            });
        }
    });
    host
}

/// A blob read whole stops at the size its descriptor declares: a registry streaming more
/// (without end, here) gets an error naming the blob after about that many bytes, not the
/// daemon's memory; a layout file longer than declared is refused the same way.
#[test]
fn blobs_read_whole_stop_at_their_declared_size() {
    common::init_tracing();
    let host = endless_registry();
    let (_reg, dir, image) = registry_with_image();
    run_async(60, async {
        let store = open(&format!("docker://{host}/{REPO}:{TAG}"), &insecure()).await;
        let d = digest(&image.layers[1].digest);
        let err = store.fetch_blob(&d, 100_000).await.unwrap_err();
        assert!(
            matches!(err, Error::BodyTooLong { max: 100_000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&image.layers[1].digest), "{err}");
        // The bound, plus at most the chunk that crossed it.
        let read = store.bytes_fetched();
        assert!(
            (100_000..100_000 + (64 << 10) + 1).contains(&read),
            "{read}"
        );

        // A layout's file: the same size check, whatever the file holds.
        let layout = open(&layout_ref(dir.path(), Some(TAG)), &Options::default()).await;
        let small = &image.layers[1];
        let declared = small.blob.len() as u64;
        let d = digest(&small.digest);
        assert_eq!(
            layout.fetch_blob(&d, declared).await.unwrap().as_ref(),
            small.blob.as_slice()
        );
        let err = layout.fetch_blob(&d, declared - 1).await.unwrap_err();
        assert!(
            matches!(err, Error::BodyTooLong { max, .. } if max == declared - 1),
            "{err}"
        );
    });
}

#[test]
fn layout_backend_matches_registry() {
    let (reg, dir, image) = registry_with_image();
    run_async(120, async {
        let remote = open(
            &format!("docker://{}/{REPO}:{TAG}", reg.host()),
            &insecure(),
        )
        .await;
        let tagged = open(&layout_ref(dir.path(), Some(TAG)), &Options::default()).await;
        let untagged = open(&layout_ref(dir.path(), None), &Options::default()).await;
        let r = remote.resolve(None).await.unwrap();
        for layout in [&tagged, &untagged] {
            let l = layout.resolve(None).await.unwrap();
            assert_eq!(l.manifest_digest, r.manifest_digest);
            assert_eq!(l.manifest_bytes, r.manifest_bytes);
            assert_eq!(l.config_bytes, r.config_bytes);
            assert_eq!(l.manifest_media_type, r.manifest_media_type);
        }
        let d = digest(&image.layers[0].digest);
        for (offset, len) in [
            (0, 10),
            (1000, 65_536),
            (image.layers[0].blob.len() as u64 - 1, 1),
        ] {
            assert_eq!(
                tagged.read_range(&d, offset, len).await.unwrap(),
                remote.read_range(&d, offset, len).await.unwrap()
            );
        }
        let err = tagged
            .read_range(&d, image.layers[0].blob.len() as u64 - 1, 2)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::RangeBeyondEnd { .. }), "{err}");
        let streamed: Vec<Bytes> = tagged
            .open_stream(&d)
            .await
            .unwrap()
            .into_stream()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(streamed.concat(), image.layers[0].blob);
        assert!(tagged.bytes_fetched() > image.layers[0].blob.len() as u64);

        // Referrers in a layout: stored as unnamed index.json entries with an artifactType.
        const T: &str = "application/vnd.fanfill.layer-index.v1";
        assert!(
            untagged
                .find_referrer(&r.manifest_digest, T)
                .await
                .unwrap()
                .is_none()
        );
        let blob = Bytes::from(noise(5000, 3));
        let first = tagged
            .push_artifact(
                &r.manifest_digest,
                T,
                vec![("application/octet-stream".into(), blob.clone())],
            )
            .await
            .unwrap();
        let second = tagged
            .push_artifact(&r.manifest_digest, T, Vec::new())
            .await
            .unwrap();
        tagged
            .push_artifact(&r.manifest_digest, "application/x-other", Vec::new())
            .await
            .unwrap();
        let found = untagged
            .find_referrer(&r.manifest_digest, T)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.digest, second);
        assert_eq!(
            untagged
                .list_referrers(&r.manifest_digest, Some(T))
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            untagged
                .list_referrers(&r.manifest_digest, None)
                .await
                .unwrap()
                .len(),
            3
        );
        let first_manifest = untagged.fetch_manifest(Some(first.as_ref())).await.unwrap();
        let first_manifest: oci_spec::image::ImageManifest =
            serde_json::from_slice(&first_manifest.bytes).unwrap();
        assert_eq!(
            untagged
                .fetch_blob(
                    first_manifest.layers()[0].digest(),
                    first_manifest.layers()[0].size(),
                )
                .await
                .unwrap(),
            blob
        );
        // The image is still the only one to pick, for us and for skopeo.
        assert_eq!(
            untagged.resolve(None).await.unwrap().manifest_digest,
            r.manifest_digest
        );
        let err = open(&layout_ref(dir.path(), Some("other")), &Options::default())
            .await
            .resolve(None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LayoutTag { .. }), "{err}");
        assert!(err.to_string().contains("v1"), "{err}");
    });
    push_layout(dir.path(), TAG, &reg.host(), "copied/again", &[]);
    // A second image makes the untagged form ambiguous.
    build_oci_layout(dir.path(), "v2", &[vec![("x", b"x".to_vec())]]);
    run_async(30, async {
        let err = open(&layout_ref(dir.path(), None), &Options::default())
            .await
            .resolve(None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::LayoutAmbiguous { count: 2, .. }),
            "{err}"
        );
        let missing: Reference = "oci:/nonexistent/layout".parse().unwrap();
        let err = BlobStore::open(&missing, &Options::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/layout/oci-layout"),
            "{err}"
        );
    });
}

#[test]
fn docker_schema2_and_multi_arch() {
    let reg = TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let amd = write_image(dir.path(), "amd64", &[vec![("arch", b"amd64".to_vec())]]);
    let arm = write_image(dir.path(), "arm64", &[vec![("arch", b"arm64".to_vec())]]);
    let index_digest = build_index(dir.path(), "multi", &[("amd64", &amd), ("arm64", &arm)]);
    build_oci_layout(dir.path(), "single", &sample_layers());
    push_layout(dir.path(), "multi", &reg.host(), "multi", &["--all"]);
    push_layout(
        dir.path(),
        "single",
        &reg.host(),
        "docker",
        &["--format", "v2s2"],
    );
    push_layout(
        dir.path(),
        "multi",
        &reg.host(),
        "dockerlist",
        &["--all", "--format", "v2s2"],
    );
    let host_is_amd64 = common::host_arch() == "amd64";
    run_async(120, async {
        let arm64: Platform = "linux/arm64".parse().unwrap();
        let amd64: Platform = "linux/amd64".parse().unwrap();
        for reference in [
            format!("docker://{}/multi:multi", reg.host()),
            layout_ref(dir.path(), Some("multi")),
        ] {
            let store = open(&reference, &insecure()).await;
            let a = store.resolve(Some(&amd64)).await.unwrap();
            assert_eq!(
                a.manifest_digest.to_string(),
                amd.manifest_digest,
                "{reference}"
            );
            assert_eq!(
                a.index_digest.as_ref().map(|d| d.to_string()),
                Some(index_digest.clone())
            );
            assert_eq!(a.config.architecture().to_string(), "amd64");
            let b = store.resolve(Some(&arm64)).await.unwrap();
            assert_eq!(b.manifest_digest.to_string(), arm.manifest_digest);
            if host_is_amd64 {
                assert_eq!(
                    store.resolve(None).await.unwrap().manifest_digest,
                    a.manifest_digest
                );
            }
            let err = store
                .resolve(Some(&"linux/s390x".parse().unwrap()))
                .await
                .unwrap_err();
            assert!(matches!(err, Error::NoPlatform { .. }), "{err}");
            assert!(err.to_string().contains("linux/arm64"), "{err}");
        }

        let docker = open(
            &format!("docker://{}/docker:single", reg.host()),
            &insecure(),
        )
        .await;
        let d = docker.resolve(None).await.unwrap();
        assert_eq!(
            d.manifest_media_type,
            fanfill::registry::MEDIA_DOCKER_MANIFEST
        );
        assert_eq!(d.manifest.layers().len(), 2);
        assert_eq!(
            d.manifest.layers()[0].media_type().to_string(),
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );

        let list = open(
            &format!("docker://{}/dockerlist:multi", reg.host()),
            &insecure(),
        )
        .await;
        let raw = list.fetch_manifest(None).await.unwrap();
        assert_eq!(raw.media_type, fanfill::registry::MEDIA_DOCKER_LIST);
        let l = list.resolve(Some(&arm64)).await.unwrap();
        assert_eq!(
            l.manifest_media_type,
            fanfill::registry::MEDIA_DOCKER_MANIFEST
        );
        assert_eq!(l.config.architecture().to_string(), "arm64");
    });
}

#[test]
fn referrers_push_and_find() {
    let (reg, _dir, image) = registry_with_image();
    run_async(120, async {
        let store = open(
            &format!("docker://{}/{REPO}:{TAG}", reg.host()),
            &insecure(),
        )
        .await;
        let subject = store.resolve(None).await.unwrap().manifest_digest;
        const INDEX: &str = "application/vnd.fanfill.layer-index.v1";
        assert!(
            store
                .find_referrer(&subject, INDEX)
                .await
                .unwrap()
                .is_none()
        );

        let blobs = vec![
            (
                "application/vnd.fanfill.layer-index.v1+json".to_owned(),
                Bytes::from_static(b"{\"layer\":0}"),
            ),
            (
                "application/vnd.fanfill.checkpoints.v1".to_owned(),
                Bytes::from(noise(10_000, 7)),
            ),
        ];
        let first = store
            .push_artifact(&subject, INDEX, blobs.clone())
            .await
            .unwrap();
        let found = store
            .find_referrer(&subject, INDEX)
            .await
            .unwrap()
            .expect("referrer");
        assert_eq!(found.digest, first);
        assert_eq!(
            found.manifest.artifact_type().as_ref().unwrap().to_string(),
            INDEX
        );
        assert_eq!(
            found.manifest.subject().as_ref().unwrap().digest(),
            &subject
        );
        assert_eq!(found.manifest.layers().len(), 2);
        for (layer, (media_type, data)) in found.manifest.layers().iter().zip(&blobs) {
            assert_eq!(&layer.media_type().to_string(), media_type);
            assert_eq!(
                &store
                    .fetch_blob(layer.digest(), layer.size())
                    .await
                    .unwrap(),
                data
            );
        }

        // A second artifact of the same type is found instead; another type is kept apart.
        let second = store
            .push_artifact(
                &subject,
                INDEX,
                vec![(
                    "application/octet-stream".to_owned(),
                    Bytes::from_static(b"v2"),
                )],
            )
            .await
            .unwrap();
        store
            .push_artifact(&subject, "application/vnd.other", Vec::new())
            .await
            .unwrap();
        assert_eq!(
            store
                .find_referrer(&subject, INDEX)
                .await
                .unwrap()
                .unwrap()
                .digest,
            second
        );
        assert_eq!(
            store
                .list_referrers(&subject, Some(INDEX))
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(store.list_referrers(&subject, None).await.unwrap().len(), 3);
        // Pushing the same content again makes a newer artifact (its creation time differs).
        let third = store.push_artifact(&subject, INDEX, blobs).await.unwrap();
        assert_ne!(third, first);
        assert_eq!(
            store
                .find_referrer(&subject, INDEX)
                .await
                .unwrap()
                .unwrap()
                .digest,
            third
        );

        // Another image's subject has none; a fresh store (no cache) sees the same.
        let other = digest(&image.config_digest);
        assert!(store.list_referrers(&other, None).await.unwrap().is_empty());
        let fresh = open(
            &format!("docker://{}/{REPO}:{TAG}", reg.host()),
            &insecure(),
        )
        .await;
        assert_eq!(
            fresh
                .find_referrer(&subject, INDEX)
                .await
                .unwrap()
                .unwrap()
                .digest,
            third
        );
    });
}

#[test]
fn basic_auth_from_creds_and_authfile() {
    let reg = TestRegistry::start_with_basic_auth("alice", "s3cret");
    let dir = tempfile::tempdir().unwrap();
    let image = build_oci_layout(dir.path(), TAG, &sample_layers());
    push_layout(
        dir.path(),
        TAG,
        &reg.host(),
        REPO,
        &["--dest-creds", "alice:s3cret"],
    );
    let authfile = dir.path().join("auth.json");
    std::fs::write(
        &authfile,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "YWxpY2U6czNjcmV0"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let empty_authfile = dir.path().join("empty.json");
    std::fs::write(&empty_authfile, r#"{"auths": {}}"#).unwrap();
    let reference = format!("docker://{}/{REPO}:{TAG}", reg.host());
    run_async(120, async {
        let anonymous = Options {
            authfile: Some(empty_authfile.clone()),
            ..insecure()
        };
        let err = open(&reference, &anonymous)
            .await
            .resolve(None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unauthorized {
                    had_credentials: false,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&reg.host()), "{err}");

        let wrong = Options {
            creds: Some("alice:wrong".parse().unwrap()),
            ..anonymous.clone()
        };
        let err = open(&reference, &wrong)
            .await
            .resolve(None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unauthorized {
                    had_credentials: true,
                    ..
                }
            ),
            "{err}"
        );

        let with_creds = Options {
            creds: Some(Credentials {
                username: "alice".into(),
                password: "s3cret".into(),
            }),
            ..anonymous.clone()
        };
        let with_file = Options {
            authfile: Some(authfile.clone()),
            ..insecure()
        };
        for options in [with_creds, with_file] {
            let store = open(&reference, &options).await;
            let r = store.resolve(None).await.unwrap();
            assert_eq!(r.manifest_digest.to_string(), image.manifest_digest);
            let d = digest(&image.layers[0].digest);
            assert_eq!(
                store.read_range(&d, 100, 50).await.unwrap().as_ref(),
                &image.layers[0].blob[100..150]
            );
            // Pushing needs the same credentials.
            store
                .push_artifact(&r.manifest_digest, "application/x-test", Vec::new())
                .await
                .unwrap();
            assert!(
                store
                    .find_referrer(&r.manifest_digest, "application/x-test")
                    .await
                    .unwrap()
                    .is_some()
            );
        }
    });
}

#[test]
fn dropped_connections_are_retried() {
    common::init_tracing();
    let (reg, _dir, image) = registry_with_image();
    let proxy = FaultyProxy::start(reg.addr, Fault::DropConnections(2));
    run_async(120, async {
        let store = open(
            &format!("docker://{}/{REPO}:{TAG}", proxy.host()),
            &insecure(),
        )
        .await;
        let r = store.resolve(None).await.unwrap();
        assert_eq!(r.manifest_digest.to_string(), image.manifest_digest);
        assert!(
            store.stats().retries() >= 2,
            "retries {}",
            store.stats().retries()
        );

        // More failures than the policy allows: the error comes through.
        proxy.set_fault(Fault::DropConnections(100));
        let fresh = open(
            &format!("docker://{}/{REPO}:{TAG}", proxy.host()),
            &insecure(),
        )
        .await;
        let err = fresh.resolve(None).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert_eq!(
            fresh.stats().retries(),
            u64::from(fast_retry().max_attempts - 1)
        );
    });
}

#[test]
fn truncated_bodies_are_retried_or_reported() {
    common::init_tracing();
    let (reg, _dir, image) = registry_with_image();
    let proxy = FaultyProxy::start(reg.addr, Fault::None);
    let layer = image.layers[0].clone();
    let d = digest(&layer.digest);
    run_async(120, async {
        let reference = format!("docker://{}/{REPO}:{TAG}", proxy.host());

        // A range read cut short once is retried and comes back whole.
        proxy.set_fault(Fault::TruncateBody {
            connections: 1,
            body_bytes: 1000,
        });
        let store = open(&reference, &insecure()).await;
        let got = store.read_range(&d, 10, 200_000).await.unwrap();
        assert_eq!(got.as_ref(), &layer.blob[10..200_010]);
        assert!(store.stats().retries() >= 1);

        // A stream cut short resumes at its offset.
        proxy.set_fault(Fault::TruncateBody {
            connections: 1,
            body_bytes: 150_000,
        });
        let store = open(&reference, &insecure()).await;
        let chunks: Vec<Bytes> = store
            .open_stream(&d)
            .await
            .unwrap()
            .into_stream()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(chunks.concat(), layer.blob);
        assert!(store.stats().retries() >= 1);

        // Always cut short: an error after the retries, never a short buffer.
        proxy.set_fault(Fault::TruncateBody {
            connections: 1000,
            body_bytes: 1000,
        });
        let store = open(&reference, &insecure()).await;
        let err = store.read_range(&d, 0, 50_000).await.unwrap_err();
        assert!(
            matches!(err, Error::Body { .. } | Error::ShortRead { .. }),
            "{err}"
        );
        assert_eq!(
            store.stats().retries(),
            u64::from(fast_retry().max_attempts - 1)
        );
    });
}

#[test]
fn server_ignoring_range_is_sliced() {
    let (reg, _dir, image) = registry_with_image();
    let proxy = FaultyProxy::start(reg.addr, Fault::StripRange);
    let layer = image.layers[0].clone();
    run_async(120, async {
        let store = open(
            &format!("docker://{}/{REPO}:{TAG}", proxy.host()),
            &insecure(),
        )
        .await;
        let d = digest(&layer.digest);
        let got = store.read_range(&d, 300_000, 1234).await.unwrap();
        assert_eq!(got.as_ref(), &layer.blob[300_000..301_234]);
        // The whole prefix had to come over the wire.
        assert!(
            store.bytes_fetched() >= 301_234,
            "{}",
            store.bytes_fetched()
        );
        let err = store
            .read_range(&d, layer.blob.len() as u64 - 5, 10)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::RangeBeyondEnd { .. }), "{err}");
        assert_eq!(store.stats().retries(), 0);
    });
}

#[test]
fn mirrors_are_tried_first_and_fall_back() {
    let (origin, dir, image) = registry_with_image();
    let mirror = TestRegistry::start();
    // The mirror holds the image under a prefix.
    push_layout(
        dir.path(),
        TAG,
        &mirror.host(),
        &format!("cache/{REPO}"),
        &[],
    );
    let mirror_proxy = FaultyProxy::start(mirror.addr, Fault::None);
    let origin_proxy = FaultyProxy::start(origin.addr, Fault::None);
    let dead = format!("127.0.0.1:{}", common::free_port());
    let d = digest(&image.layers[0].digest);
    run_async(120, async {
        let reference = format!("docker://{}/{REPO}:{TAG}", origin_proxy.host());
        let options = Options {
            mirrors: vec![
                Mirror {
                    location: dead.clone(),
                    insecure: true,
                },
                Mirror {
                    location: format!("{}/cache", mirror_proxy.host()),
                    insecure: true,
                },
            ],
            ..insecure()
        };
        let store = open(&reference, &options).await;
        let r = store.resolve(None).await.unwrap();
        assert_eq!(r.manifest_digest.to_string(), image.manifest_digest);
        // The dead mirror cost one round of retries, then rests.
        let retries = store.stats().retries();
        assert_eq!(retries, u64::from(fast_retry().max_attempts - 1));
        assert_eq!(
            store.read_range(&d, 5, 5).await.unwrap().as_ref(),
            &image.layers[0].blob[5..10]
        );
        let small = digest(&image.layers[1].digest);
        assert_eq!(
            store
                .fetch_blob(&small, image.layers[1].blob.len() as u64)
                .await
                .unwrap()
                .as_ref(),
            image.layers[1].blob.as_slice()
        );
        assert_eq!(store.stats().retries(), retries);
        assert!(mirror_proxy.connections() > 0);
        assert_eq!(
            origin_proxy.connections(),
            0,
            "origin used although the mirror had it"
        );

        // A blob only the origin has (the artifact) falls back to it.
        let artifact = store
            .push_artifact(
                &r.manifest_digest,
                "application/x-test",
                vec![(
                    "application/octet-stream".into(),
                    Bytes::from_static(b"only at origin"),
                )],
            )
            .await
            .unwrap();
        let found = store
            .find_referrer(&r.manifest_digest, "application/x-test")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.digest, artifact);
        let blob = store
            .fetch_blob(
                found.manifest.layers()[0].digest(),
                found.manifest.layers()[0].size(),
            )
            .await
            .unwrap();
        assert_eq!(blob.as_ref(), b"only at origin");
    });
}

#[test]
fn unreachable_registry_is_a_clear_error() {
    let host = format!("127.0.0.1:{}", common::free_port());
    run_async(60, async {
        let store = open(&format!("docker://{host}/a/b:c"), &insecure()).await;
        let err = store.resolve(None).await.unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&host), "{err}");
        // TLS is the default: a plain-HTTP registry is not spoken to in clear.
        let reg = TestRegistry::start();
        let store = open(
            &format!("docker://{}/a/b:c", reg.host()),
            &Options {
                retry: fast_retry(),
                ..Options::default()
            },
        )
        .await;
        let err = store.resolve(None).await.unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
    });
}

#[test]
fn bearer_token_auth_and_cache() {
    common::init_tracing();
    let tokens = TokenServer::start("alice", "s3cret");
    let reg = TestRegistry::start_with_token_auth(&tokens);
    let dir = tempfile::tempdir().unwrap();
    let image = build_oci_layout(dir.path(), TAG, &sample_layers());
    push_layout(
        dir.path(),
        TAG,
        &reg.host(),
        REPO,
        &["--dest-creds", "alice:s3cret"],
    );
    let empty_authfile = dir.path().join("empty.json");
    std::fs::write(&empty_authfile, r#"{"auths": {}}"#).unwrap();
    let reference = format!("docker://{}/{REPO}:{TAG}", reg.host());
    run_async(120, async {
        let anonymous = Options {
            authfile: Some(empty_authfile.clone()),
            ..insecure()
        };
        let err = open(&reference, &anonymous)
            .await
            .resolve(None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unauthorized {
                    had_credentials: false,
                    ..
                }
            ),
            "{err}"
        );

        let options = Options {
            creds: Some("alice:s3cret".parse().unwrap()),
            ..anonymous
        };
        let store = open(&reference, &options).await;
        let before = tokens.issued();
        let r = store.resolve(None).await.unwrap();
        assert_eq!(r.manifest_digest.to_string(), image.manifest_digest);
        let d = digest(&image.layers[0].digest);
        for offset in [0u64, 1000, 50_000] {
            let got = store.read_range(&d, offset, 100).await.unwrap();
            assert_eq!(
                got.as_ref(),
                &image.layers[0].blob[offset as usize..offset as usize + 100]
            );
        }
        // One pull token served the manifest, config and every range read.
        assert_eq!(tokens.issued() - before, 1);
        // Pushing needs a pull,push token: one more.
        store
            .push_artifact(&r.manifest_digest, "application/x-test", Vec::new())
            .await
            .unwrap();
        assert_eq!(tokens.issued() - before, 2);
        assert!(
            store
                .find_referrer(&r.manifest_digest, "application/x-test")
                .await
                .unwrap()
                .is_some()
        );
    });
}

#[test]
fn server_errors_and_throttling_are_retried() {
    let (reg, _dir, image) = registry_with_image();
    let proxy = FaultyProxy::start(
        reg.addr,
        Fault::Status {
            connections: 2,
            status: 503,
        },
    );
    let layer = image.layers[1].clone();
    run_async(120, async {
        let reference = format!("docker://{}/{REPO}:{TAG}", proxy.host());
        let store = open(&reference, &insecure()).await;
        let d = digest(&layer.digest);
        assert_eq!(
            store
                .fetch_blob(&d, layer.blob.len() as u64)
                .await
                .unwrap()
                .as_ref(),
            layer.blob.as_slice()
        );
        assert_eq!(store.stats().retries(), 2);

        // 429 with Retry-After: 1 s is honoured up to the policy's longest wait.
        proxy.set_fault(Fault::Status {
            connections: 1,
            status: 429,
        });
        let patient = Options {
            retry: RetryPolicy {
                max_backoff: Duration::from_secs(2),
                ..fast_retry()
            },
            ..insecure()
        };
        let store = open(&reference, &patient).await;
        let started = std::time::Instant::now();
        assert_eq!(
            store.read_range(&d, 1, 10).await.unwrap().as_ref(),
            &layer.blob[1..11]
        );
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(store.stats().retries(), 1);

        // A status that is not transient is not retried.
        proxy.set_fault(Fault::Status {
            connections: 1,
            status: 403,
        });
        let store = open(&reference, &insecure()).await;
        let err = store
            .fetch_blob(&d, layer.blob.len() as u64)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Status { status: 403, .. }), "{err}");
        assert_eq!(store.stats().retries(), 0);
    });
}

/// A TLS registry with a private CA and Basic auth, holding the sample image (pushed by
/// skopeo with `--dest-cert-dir`, certificates verified), and the layout it came from.
fn tls_registry_with_image(client_cert: bool) -> (TestRegistry, tempfile::TempDir, BuiltImage) {
    let reg = if client_cert {
        TestRegistry::start_tls_with_client_cert("alice", "s3cret")
    } else {
        TestRegistry::start_tls_with_basic_auth("alice", "s3cret")
    };
    let dir = tempfile::tempdir().unwrap();
    let image = build_oci_layout(dir.path(), TAG, &sample_layers());
    push_layout_tls(
        dir.path(),
        TAG,
        &reg.host(),
        REPO,
        &reg.cert_dir(),
        "alice:s3cret",
    );
    (reg, dir, image)
}

/// Secure options for the TLS tests: Alice's credentials, no auth file and no certs.d
/// lookup from this machine.
fn tls_options(dir: &Path) -> Options {
    let authfile = dir.join("empty-auth.json");
    std::fs::write(&authfile, r#"{"auths": {}}"#).unwrap();
    Options {
        creds: Some("alice:s3cret".parse().unwrap()),
        authfile: Some(authfile),
        cert_roots: Some(Vec::new()),
        retry: fast_retry(),
        ..Options::default()
    }
}

/// Resolves `reference` and checks a range read and a whole-blob read against `image`.
async fn check_image(reference: &str, options: &Options, image: &BuiltImage) -> BlobStore {
    let store = open(reference, options).await;
    let resolved = store.resolve(None).await.unwrap();
    assert_eq!(resolved.manifest_digest.to_string(), image.manifest_digest);
    let layer = &image.layers[0];
    let d = digest(&layer.digest);
    assert_eq!(
        store.read_range(&d, 12_345, 70_000).await.unwrap().as_ref(),
        &layer.blob[12_345..82_345]
    );
    let small = &image.layers[1];
    assert_eq!(
        store
            .fetch_blob(&digest(&small.digest), small.blob.len() as u64)
            .await
            .unwrap()
            .as_ref(),
        small.blob.as_slice()
    );
    store
}

#[test]
fn tls_with_private_ca_from_cert_dir_and_certs_d() {
    common::init_tracing();
    let (reg, dir, image) = tls_registry_with_image(false);
    let port = reg.addr.port();
    run_async(120, async {
        // --cert-dir: the CA is trusted besides the system roots.
        let options = Options {
            cert_dir: Some(reg.cert_dir()),
            ..tls_options(dir.path())
        };
        let reference = format!("docker://{}/{REPO}:{TAG}", reg.host());
        let store = check_image(&reference, &options, &image).await;
        assert_eq!(store.stats().retries(), 0);
        // Pushing goes over the same trusted TLS.
        let subject = digest(&image.manifest_digest);
        store
            .push_artifact(&subject, "application/x-test", Vec::new())
            .await
            .unwrap();
        assert!(
            store
                .find_referrer(&subject, "application/x-test")
                .await
                .unwrap()
                .is_some()
        );

        // certs.d: ROOT/HOST:PORT, found for the name the reference uses (IP or DNS name,
        // both in the server certificate), the first root that has it winning.
        let roots = tempfile::tempdir().unwrap();
        let containers = roots.path().join("containers/certs.d");
        let docker = roots.path().join("docker/certs.d");
        for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            std::fs::create_dir_all(docker.join(&host)).unwrap();
            std::fs::copy(
                reg.cert_dir().join("ca.crt"),
                docker.join(&host).join("ca.crt"),
            )
            .unwrap();
        }
        // A HOST directory without the port is not used for HOST:PORT.
        std::fs::create_dir_all(containers.join("127.0.0.1")).unwrap();
        std::fs::write(containers.join("127.0.0.1/broken.crt"), b"junk").unwrap();
        let options = Options {
            cert_roots: Some(vec![containers.clone(), docker.clone()]),
            ..tls_options(dir.path())
        };
        for host in ["127.0.0.1", "localhost"] {
            let reference = format!("docker://{host}:{port}/{REPO}:{TAG}");
            check_image(&reference, &options, &image).await;
        }

        // A bad CA file in the directory that applies fails the open, naming the file.
        let broken = containers.join(format!("127.0.0.1:{port}"));
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(
            broken.join("ca.crt"),
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let r: Reference = reference.parse().unwrap();
        let err = BlobStore::open(&r, &options).await.unwrap_err();
        assert!(matches!(err, Error::CertFile { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&broken.join("ca.crt").display().to_string()),
            "{err}"
        );
    });
}

#[test]
fn tls_untrusted_ca_is_a_certificate_error_without_fallback() {
    let (reg, dir, image) = tls_registry_with_image(false);
    // The proxy counts plain-HTTP connections; TLS passes through uncounted.
    let proxy = FaultyProxy::start(reg.addr, Fault::None);
    let other = TestRegistry::start_tls_with_basic_auth("bob", "x");
    run_async(120, async {
        let reference = format!("docker://{}/{REPO}:{TAG}", proxy.host());
        // System roots only, then a certificate directory with another CA.
        for cert_dir in [None, Some(other.cert_dir())] {
            let options = Options {
                cert_dir: cert_dir.clone(),
                ..tls_options(dir.path())
            };
            let store = open(&reference, &options).await;
            let err = store.resolve(None).await.unwrap_err();
            assert!(matches!(err, Error::Certificate { .. }), "{err}");
            assert!(!err.is_transient());
            let message = err.to_string();
            assert!(message.contains(&proxy.host()), "{message}");
            assert!(message.contains("https://"), "{message}");
            assert!(message.contains("not trusted"), "{message}");
            match &cert_dir {
                Some(d) => assert!(message.contains(&d.display().to_string()), "{message}"),
                None => assert!(message.contains("certs.d"), "{message}"),
            }
            // The cause is in the chain.
            let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            assert!(chain.contains("certificate"), "{chain}");
            // Not retried, and never retried in clear.
            assert_eq!(store.stats().requests(), 1);
            assert_eq!(store.stats().retries(), 0);
            let err = store
                .read_range(&digest(&image.layers[0].digest), 0, 10)
                .await
                .unwrap_err();
            assert!(matches!(err, Error::Certificate { .. }), "{err}");
        }
        assert_eq!(proxy.connections(), 0);
    });
}

#[test]
fn tls_insecure_needs_no_ca() {
    let (reg, dir, image) = tls_registry_with_image(false);
    let proxy = FaultyProxy::start(reg.addr, Fault::None);
    run_async(120, async {
        let options = Options {
            insecure: true,
            ..tls_options(dir.path())
        };
        let reference = format!("docker://{}/{REPO}:{TAG}", proxy.host());
        check_image(&reference, &options, &image).await;
        // It spoke TLS (unverified), not plain HTTP.
        assert_eq!(proxy.connections(), 0);
        // A certificate directory with a wrong CA does not matter either.
        let other = TestRegistry::start_tls_with_basic_auth("bob", "x");
        let options = Options {
            cert_dir: Some(other.cert_dir()),
            ..options
        };
        check_image(&reference, &options, &image).await;
        assert_eq!(proxy.connections(), 0);
    });
}

#[test]
fn tls_client_certificate_from_cert_dir() {
    let (reg, dir, image) = tls_registry_with_image(true);
    run_async(120, async {
        let reference = format!("docker://{}/{REPO}:{TAG}", reg.host());
        let options = Options {
            cert_dir: Some(reg.cert_dir()),
            ..tls_options(dir.path())
        };
        check_image(&reference, &options, &image).await;

        // The CA alone: the server turns us away.
        let ca_only = tempfile::tempdir().unwrap();
        std::fs::copy(reg.cert_dir().join("ca.crt"), ca_only.path().join("ca.crt")).unwrap();
        let options = Options {
            cert_dir: Some(ca_only.path().to_owned()),
            ..options
        };
        let err = open(&reference, &options)
            .await
            .resolve(None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Connect { .. } | Error::Body { .. }),
            "{err}"
        );
    });
}

/// `HOSTS_DIR/ORIGIN/hosts.toml` with `text`, and `files` (name, content) beside it;
/// returns the hosts dir.
fn hosts_dir(origin: &str, text: &str, files: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join(origin);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hosts.toml"), text).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(name), content).unwrap();
    }
    d
}

/// Resolving `reference` with `options` fails to connect (no source it may use answers).
async fn cannot_connect(reference: &str, options: &Options) {
    let err = open(reference, options)
        .await
        .resolve(None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
}

/// [`tls_options`] reading `hosts`, with Alice's credentials for `mirror` in the auth file
/// (`creds` only serve the origin).
fn mirror_options(dir: &Path, hosts: &Path, mirror: &str) -> Options {
    use base64::Engine as _;
    let authfile = dir.join("mirror-auth.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(
        &authfile,
        format!(r#"{{"auths": {{"{mirror}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    Options {
        authfile: Some(authfile),
        hosts_dir: Some(hosts.to_owned()),
        ..tls_options(dir)
    }
}

/// A TLS mirror whose private CA only a `hosts.toml` `ca` names (relative to the file) is
/// trusted; so is the origin's, from the top-level `ca`; a `ca` file that is not there fails
/// the open, naming it and the `hosts.toml`.
#[test]
fn hosts_toml_ca_for_a_mirror_and_the_origin() {
    common::init_tracing();
    let (reg, dir, image) = tls_registry_with_image(false);
    let ca = std::fs::read(reg.cert_dir().join("ca.crt")).unwrap();
    // The origin is not there: everything comes from the mirror.
    let origin = format!("127.0.0.1:{}", common::free_port());
    let reference = format!("docker://{origin}/{REPO}:{TAG}");
    run_async(120, async {
        let mirror_entry = format!(
            "server = \"http://{origin}\"\n[host.\"https://{}\"]\n",
            reg.host()
        );
        let with_ca = hosts_dir(
            &origin,
            &format!("{mirror_entry}  ca = \"mirror-ca.crt\"\n"),
            &[("mirror-ca.crt", ca.clone())],
        );
        let options = mirror_options(dir.path(), with_ca.path(), &reg.host());
        let store = check_image(&reference, &options, &image).await;
        assert_eq!(store.stats().retries(), 0);

        // Without the `ca`, the mirror's certificate is not trusted and the origin is down.
        let without = hosts_dir(&origin, &mirror_entry, &[]);
        let options = mirror_options(dir.path(), without.path(), &reg.host());
        cannot_connect(&reference, &options).await;

        // The origin's own CA from the top level (an array of one, absolute).
        let ca_path = reg.cert_dir().join("ca.crt");
        let origin_ca = hosts_dir(
            &reg.host(),
            &format!("ca = [\"{}\"]\n", ca_path.display()),
            &[],
        );
        let options = Options {
            hosts_dir: Some(origin_ca.path().to_owned()),
            ..tls_options(dir.path())
        };
        check_image(
            &format!("docker://{}/{REPO}:{TAG}", reg.host()),
            &options,
            &image,
        )
        .await;

        // A `ca` file that is not there.
        let missing = hosts_dir(
            &origin,
            &format!("{mirror_entry}  ca = \"gone.crt\"\n"),
            &[],
        );
        let options = mirror_options(dir.path(), missing.path(), &reg.host());
        let r: Reference = reference.parse().unwrap();
        let err = BlobStore::open(&r, &options).await.unwrap_err();
        assert!(matches!(err, Error::Hosts(_)), "{err}");
        let message = err.to_string();
        let hosts_file = missing.path().join(&origin).join("hosts.toml");
        assert!(
            message.contains(
                &missing
                    .path()
                    .join(&origin)
                    .join("gone.crt")
                    .display()
                    .to_string()
            ),
            "{message}"
        );
        assert!(
            message.contains(&hosts_file.display().to_string()),
            "{message}"
        );
    });
}

/// A mirror that demands a client certificate is reached with a `hosts.toml` `client`: a
/// `[cert, key]` pair, or one file holding both; without it the mirror turns us away.
#[test]
fn hosts_toml_client_certificate_for_a_mirror() {
    common::init_tracing();
    let (reg, dir, image) = tls_registry_with_image(true);
    let read = |name: &str| std::fs::read(reg.cert_dir().join(name)).unwrap();
    let (ca, cert, key) = (read("ca.crt"), read("client.cert"), read("client.key"));
    let both = [cert.clone(), b"\n".to_vec(), key.clone()].concat();
    let origin = format!("127.0.0.1:{}", common::free_port());
    let reference = format!("docker://{origin}/{REPO}:{TAG}");
    run_async(120, async {
        let entry = format!(
            "server = \"http://{origin}\"\n[host.\"https://{}\"]\n  ca = \"ca.crt\"\n",
            reg.host()
        );
        let files = [
            ("ca.crt", ca),
            ("client.cert", cert),
            ("client.key", key),
            ("both.pem", both),
        ];
        for client in ["[[\"client.cert\", \"client.key\"]]", "\"both.pem\""] {
            let hosts = hosts_dir(&origin, &format!("{entry}  client = {client}\n"), &files);
            let options = mirror_options(dir.path(), hosts.path(), &reg.host());
            check_image(&reference, &options, &image).await;
        }
        let hosts = hosts_dir(&origin, &entry, &files);
        let options = mirror_options(dir.path(), hosts.path(), &reg.host());
        cannot_connect(&reference, &options).await;
    });
}

/// A `hosts.toml` header block reaches the mirror on every request (a value and a list of
/// values), never its `Authorization` or `Range`; the mirror's API root may be elsewhere
/// than `/v2` only with `override_path`, so `/v2` written out works the same.
#[test]
fn hosts_toml_headers_reach_the_mirror() {
    common::init_tracing();
    let (mirror, _dir, image) = registry_with_image();
    let proxy = FaultyProxy::start(mirror.addr, Fault::RecordHeads);
    let origin = format!("127.0.0.1:{}", common::free_port());
    let hosts = hosts_dir(
        &origin,
        &format!(
            "server = \"http://{origin}\"\n[host.\"http://{}/v2\"]\n\
             [host.\"http://{}/v2\".header]\n  X-Fanfill-Test = \"yes\"\n  x-multi = [\"a\", \"b\"]\n\
             \x20 authorization = \"Basic c25lYWt5\"\n  range = \"bytes=0-0\"\n",
            proxy.host(),
            proxy.host()
        ),
        &[],
    );
    run_async(120, async {
        let options = Options {
            hosts_dir: Some(hosts.path().to_owned()),
            ..insecure()
        };
        let store = open(&format!("docker://{origin}/{REPO}:{TAG}"), &options).await;
        let resolved = store.resolve(None).await.unwrap();
        assert_eq!(resolved.manifest_digest.to_string(), image.manifest_digest);
        let layer = &image.layers[0];
        assert_eq!(
            store
                .read_range(&digest(&layer.digest), 100, 50)
                .await
                .unwrap()
                .as_ref(),
            &layer.blob[100..150]
        );
        let heads = proxy.request_heads();
        let api: Vec<String> = heads
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .filter(|h| h.contains(&format!(" /v2/{REPO}/")))
            .collect();
        assert!(api.len() >= 3, "{heads:?}");
        for head in &api {
            assert!(head.contains("\r\nx-fanfill-test: yes\r\n"), "{head}");
            assert!(head.contains("\r\nx-multi: a\r\n"), "{head}");
            assert!(head.contains("\r\nx-multi: b\r\n"), "{head}");
            assert!(!head.contains("authorization:"), "{head}");
            assert!(!head.contains("bytes=0-0"), "{head}");
        }
        // The range read sent its own Range, once.
        let ranged: Vec<_> = api.iter().filter(|h| h.contains("\r\nrange: ")).collect();
        assert_eq!(ranged.len(), 1, "{api:?}");
        assert!(
            ranged[0].contains("\r\nrange: bytes=100-149\r\n"),
            "{}",
            ranged[0]
        );
    });
}
