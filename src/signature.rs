//! cosign key signatures of manifests: what the `signed` index policy checks before it
//! takes file digests from an index artifact.
//!
//! Owns the format, in the shape `cosign sign --key` writes it and `cosign verify --key`
//! checks it: the signature of a manifest `sha256:HEX` is an image manifest tagged
//! `sha256-HEX.sig` in the same repository whose layers are "simple signing" payloads
//! (`application/vnd.dev.cosign.simplesigning.v1+json`: JSON naming the signed manifest's
//! digest under `critical.image.docker-manifest-digest`), each with its signature in the
//! annotation `dev.cosignproject.cosign/signature` (base64 of an ASN.1 DER ECDSA P-256
//! SHA-256 signature over the payload's bytes). Keys are PEM files: a `PUBLIC KEY` (SPKI,
//! as `cosign.pub`) to verify, a `PRIVATE KEY` (PKCS#8) or `EC PRIVATE KEY` (SEC1) to sign
//! (cosign's own encrypted key files are not read: `cosign` signs with those). Only ECDSA
//! P-256 keys, cosign's default, are taken; keyless (Fulcio certificate) signatures and
//! transparency-log entries are not checked. The payload's `docker-reference` is not
//! compared either: a mirror or a copy to another registry changes it, while the digest it
//! signs does not. It never makes a request; the registry side is
//! [`crate::image`]'s.

use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair, ParsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::Digest as _;
use std::sync::Arc;

/// Media type of a cosign simple-signing payload layer.
pub const PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Annotation of a payload layer carrying its signature (base64).
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The payload's `critical.type`.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";

/// Errors of reading keys and checking signatures.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// A key file could not be read.
    #[error("reading key {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key file holds no usable key.
    #[error("{path}: {message}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The signature is not one of this key over this payload.
    #[error("signature does not verify with key {key}")]
    Mismatch {
        /// The key's file and fingerprint.
        key: String,
    },
    /// The signature or payload is not in cosign's format.
    #[error("malformed signature: {0}")]
    Malformed(String),
    /// The payload signs another manifest.
    #[error("the signature is for {signed}, not {wanted}")]
    OtherDigest {
        /// The digest the payload names.
        signed: String,
        /// The digest looked for.
        wanted: String,
    },
}

/// The tag under which cosign stores the signatures of manifest `digest` (`sha256:HEX`).
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// The body of the first PEM block labelled one of `labels`, decoded; and its label.
fn pem_block<'a>(text: &str, labels: &[&'a str]) -> Option<(&'a str, Vec<u8>)> {
    for label in labels {
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        let Some(start) = text.find(&begin) else {
            continue;
        };
        let body = &text[start + begin.len()..];
        let stop = body.find(&end)?;
        let b64: String = body[..stop].split_whitespace().collect();
        return BASE64.decode(b64).ok().map(|der| (*label, der));
    }
    None
}

fn read_key(path: &Path) -> Result<String, SignatureError> {
    std::fs::read_to_string(path).map_err(|source| SignatureError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A public key that index artifacts must be signed with (`--index-key`).
#[derive(Debug, Clone)]
pub struct VerifyKey {
    key: Arc<ParsedPublicKey>,
    /// The file and the sha256 of the key, for messages.
    name: String,
}

impl VerifyKey {
    /// Reads a PEM `PUBLIC KEY` (an ECDSA P-256 SubjectPublicKeyInfo, as `cosign.pub`).
    pub fn from_pem_file(path: &Path) -> Result<VerifyKey, SignatureError> {
        let text = read_key(path)?;
        let bad = |message: &str| SignatureError::BadKey {
            path: path.to_path_buf(),
            message: message.to_string(),
        };
        let (_, spki) = pem_block(&text, &["PUBLIC KEY"])
            .ok_or_else(|| bad("no PEM \"PUBLIC KEY\" block (cosign.pub's format)"))?;
        let key = ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &spki)
            .map_err(|_| bad("not an ECDSA P-256 public key (cosign's default key type)"))?;
        let fingerprint = hex::encode(sha2::Sha256::digest(&spki));
        Ok(VerifyKey {
            key: Arc::new(key),
            name: format!("{} (sha256:{})", path.display(), &fingerprint[..16]),
        })
    }

    /// The key's file and fingerprint.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks that `signature_b64` (cosign's annotation) signs `payload` with this key, and
    /// that `payload` is a simple-signing payload for manifest `digest`.
    pub fn verify(
        &self,
        payload: &[u8],
        signature_b64: &str,
        digest: &str,
    ) -> Result<(), SignatureError> {
        let signature = BASE64
            .decode(signature_b64.trim())
            .map_err(|e| SignatureError::Malformed(format!("signature is not base64: {e}")))?;
        self.key
            .verify_sig(payload, &signature)
            .map_err(|_| SignatureError::Mismatch {
                key: self.name.clone(),
            })?;
        check_payload(payload, digest)
    }
}

/// Checks that `payload` is a cosign simple-signing payload for manifest `digest`.
pub fn check_payload(payload: &[u8], digest: &str) -> Result<(), SignatureError> {
    let v: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| SignatureError::Malformed(format!("payload is not JSON: {e}")))?;
    let critical = &v["critical"];
    if critical["type"].as_str() != Some(PAYLOAD_TYPE) {
        return Err(SignatureError::Malformed(format!(
            "payload type is {}, not {PAYLOAD_TYPE:?}",
            critical["type"]
        )));
    }
    let signed = critical["image"]["docker-manifest-digest"]
        .as_str()
        .ok_or_else(|| SignatureError::Malformed("payload names no manifest digest".into()))?;
    if signed != digest {
        return Err(SignatureError::OtherDigest {
            signed: signed.to_string(),
            wanted: digest.to_string(),
        });
    }
    Ok(())
}

/// The simple-signing payload cosign writes for manifest `digest` of `repository`
/// (`HOST/PATH`).
pub fn payload(repository: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": null,
    }))
    .expect("JSON value serializes")
}

/// The manifest cosign stores under [`signature_tag`] for one signature: an OCI image
/// manifest whose one layer is `payload` with `signature_b64` in its annotation, and the
/// blobs to store first (config, payload).
pub fn signature_manifest(
    payload: &[u8],
    signature_b64: &str,
) -> (bytes::Bytes, Vec<(oci_spec::image::Digest, bytes::Bytes)>) {
    let payload_digest = crate::registry::sha256_digest(payload);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": [payload_digest.to_string()]},
    }))
    .expect("JSON value serializes");
    let config_digest = crate::registry::sha256_digest(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "size": config.len(),
            "digest": config_digest.to_string(),
        },
        "layers": [{
            "mediaType": PAYLOAD_MEDIA_TYPE,
            "size": payload.len(),
            "digest": payload_digest.to_string(),
            "annotations": {SIGNATURE_ANNOTATION: signature_b64},
        }],
    }))
    .expect("JSON value serializes");
    (
        bytes::Bytes::from(manifest),
        vec![
            (config_digest, bytes::Bytes::from(config)),
            (payload_digest, bytes::Bytes::copy_from_slice(payload)),
        ],
    )
}

/// A private key to sign index artifacts with (`fanfill index --push --sign-key`).
#[derive(Debug)]
pub struct SignKey {
    pair: EcdsaKeyPair,
}

impl SignKey {
    /// Reads a PEM `PRIVATE KEY` (PKCS#8) or `EC PRIVATE KEY` (SEC1) on P-256, unencrypted
    /// (for example `openssl ecparam -name prime256v1 -genkey -noout`).
    pub fn from_pem_file(path: &Path) -> Result<SignKey, SignatureError> {
        let text = read_key(path)?;
        let bad = |message: String| SignatureError::BadKey {
            path: path.to_path_buf(),
            message,
        };
        let (_, der) = pem_block(&text, &["PRIVATE KEY", "EC PRIVATE KEY"]).ok_or_else(|| {
            bad("no PEM \"PRIVATE KEY\" or \"EC PRIVATE KEY\" block (an encrypted cosign key is not read: sign with cosign)".into())
        })?;
        let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, &der)
            .map_err(|e| bad(format!("not an ECDSA P-256 private key: {e}")))?;
        Ok(SignKey { pair })
    }

    /// The base64 signature of `payload`, as cosign's annotation carries it.
    pub fn sign(&self, payload: &[u8]) -> String {
        let sig = self
            .pair
            .sign(&SystemRandom::new(), payload)
            .expect("ECDSA signing with a parsed key");
        BASE64.encode(sig.as_ref())
    }

    /// The public half, as a PEM `PUBLIC KEY` (what `--index-key` reads).
    pub fn public_pem(&self) -> String {
        use aws_lc_rs::encoding::AsDer;
        let der = self
            .pair
            .public_key()
            .as_der()
            .expect("a P-256 public key encodes");
        let b64 = BASE64.encode(der.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh key pair: the private key as PKCS#8 PEM read back by [`SignKey`], the public
    /// half written by [`SignKey::public_pem`] and read by [`VerifyKey`].
    fn key_pair(dir: &Path) -> (SignKey, VerifyKey) {
        let doc = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .unwrap()
            .to_pkcs8v1()
            .unwrap();
        let private = dir.join("k.pem");
        std::fs::write(
            &private,
            format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                BASE64.encode(doc.as_ref())
            ),
        )
        .unwrap();
        let sign = SignKey::from_pem_file(&private).unwrap();
        let public = dir.join("k.pub");
        std::fs::write(&public, sign.public_pem()).unwrap();
        (sign, VerifyKey::from_pem_file(&public).unwrap())
    }

    #[test]
    fn signatures_bind_key_payload_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (sign, verify) = key_pair(dir.path());
        let digest = format!("sha256:{}", "ab".repeat(32));
        let payload = payload("r.example/app", &digest);
        let sig = sign.sign(&payload);
        verify.verify(&payload, &sig, &digest).unwrap();
        // Another manifest's digest, another key, a changed payload, junk: all refused.
        let other = format!("sha256:{}", "cd".repeat(32));
        assert!(matches!(
            verify.verify(&payload, &sig, &other),
            Err(SignatureError::OtherDigest { .. })
        ));
        let d2 = tempfile::tempdir().unwrap();
        let (sign2, _) = key_pair(d2.path());
        assert!(matches!(
            verify.verify(&payload, &sign2.sign(&payload), &digest),
            Err(SignatureError::Mismatch { .. })
        ));
        let mut changed = payload.clone();
        changed[10] ^= 1;
        assert!(verify.verify(&changed, &sig, &digest).is_err());
        assert!(matches!(
            verify.verify(&payload, "not base64!", &digest),
            Err(SignatureError::Malformed(_))
        ));
        assert_eq!(
            signature_tag(&digest),
            format!("sha256-{}.sig", "ab".repeat(32))
        );
    }

    #[test]
    fn keys_that_are_not_p256_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let rsa = dir.path().join("rsa.pem");
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&rsa)
            .output()
            .expect("openssl");
        assert!(out.status.success());
        let e = SignKey::from_pem_file(&rsa).unwrap_err().to_string();
        assert!(e.contains("rsa.pem") && e.contains("P-256"), "{e}");
        let public = dir.path().join("rsa.pub");
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&rsa)
            .arg("-out")
            .arg(&public)
            .output()
            .unwrap();
        assert!(out.status.success());
        let e = VerifyKey::from_pem_file(&public).unwrap_err().to_string();
        assert!(e.contains("rsa.pub") && e.contains("P-256"), "{e}");
        let missing = VerifyKey::from_pem_file(&dir.path().join("none.pub")).unwrap_err();
        assert!(missing.to_string().contains("none.pub"), "{missing}");
    }
}
