//! Secrets at rest: signing keys and webhook secrets are stored sealed with XChaCha20-Poly1305, each bound to
//! its row (the row's identity is the associated data, so a sealed value moved to another row does not open),
//! with the id of the key that sealed it beside it: `g2w1:KEY_ID:base64(nonce || ciphertext)`.
//!
//! Keys come from a keyring, newest first: `--secrets-keys ID:BASE64,...`, or beside a SQLite database, a key
//! file made on first start. Values sealed with an older key open as long as it is in the keyring;
//! `g2w-webhooks secrets rekey` seals them again with the newest.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::error::{Error, Result};

/// What every sealed value starts with.
const PREFIX: &str = "g2w1:";

/// The keys that seal and open secrets, newest first. Never printed: its `Debug` shows the ids only.
pub struct Keyring {
    keys: Vec<(String, XChaCha20Poly1305)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

impl Keyring {
    /// A keyring with no key, for commands that never read secrets: sealing or opening fails.
    pub fn none() -> Self {
        Self { keys: Vec::new() }
    }

    /// `ID:BASE64,ID:BASE64,...`, newest first; each key is 32 bytes.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut keys = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, b64) = item
                .split_once(':')
                .ok_or_else(|| Error::Config("secrets keys: each is ID:BASE64 (32 bytes)".into()))?;
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(Error::Config(format!(
                    "secrets keys: `{id}` is not a key id (letters, digits, - and _)"
                )));
            }
            let bytes = STANDARD
                .decode(b64)
                .map_err(|_| Error::Config(format!("secrets key {id}: not base64")))?;
            let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
                .map_err(|_| Error::Config(format!("secrets key {id}: {} bytes, not 32", bytes.len())))?;
            if keys.iter().any(|(known, _)| known == id) {
                return Err(Error::Config(format!("secrets keys: id {id} twice")));
            }
            keys.push((id.to_string(), cipher));
        }
        if keys.is_empty() {
            return Err(Error::Config("secrets keys: none given".into()));
        }
        Ok(Self { keys })
    }

    /// A new key, as `--secrets-keys` takes it.
    pub fn generate(id: &str) -> String {
        let key: [u8; 32] = rand::random();
        format!("{id}:{}", STANDARD.encode(key))
    }

    /// The keyring in the key file at `path`, made (mode 0600) with one new key if there is none.
    pub fn from_file(path: &Path) -> Result<Self> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())));
        if !path.exists() {
            let line = Self::generate(&format!("k{}", chrono::Utc::now().format("%Y%m%d")));
            write_private(path, &format!("{line}\n"))?;
            tracing::info!(path = %path.display(), "created the secrets key file: back it up with the database");
        }
        Self::parse(&read(path)?.replace('\n', ","))
    }

    /// Whether the keyring holds the key `id`.
    pub fn has(&self, id: &str) -> bool {
        self.keys.iter().any(|(k, _)| k == id)
    }

    /// The id of the key new values are sealed with.
    pub fn newest_id(&self) -> Option<&str> {
        self.keys.first().map(|(id, _)| id.as_str())
    }

    /// Seals `plain` for the row `aad` names, with the newest key.
    pub fn seal(&self, aad: &str, plain: &str) -> Result<String> {
        let (id, cipher) = self
            .keys
            .first()
            .ok_or_else(|| Error::Config("no secrets key: start the server with --secrets-keys".into()))?;
        let nonce: [u8; 24] = rand::random();
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| Error::Internal("sealing a secret failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{PREFIX}{id}:{}", STANDARD.encode(out)))
    }

    /// Opens a value stored for the row `aad` names. A value from before sealing (no prefix) is returned as it is
    /// (start-up seals every such value; see `Store::seal_secrets`).
    pub fn open(&self, aad: &str, stored: &str) -> Result<String> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_string());
        };
        let (id, b64) = rest
            .split_once(':')
            .ok_or_else(|| Error::Internal(format!("a sealed secret of {aad} is malformed")))?;
        let (_, cipher) = self.keys.iter().find(|(k, _)| k == id).ok_or_else(|| {
            Error::Config(format!(
                "a secret of {aad} was sealed with key {id}, which is not in the keyring (--secrets-keys)"
            ))
        })?;
        let bytes = STANDARD
            .decode(b64)
            .map_err(|_| Error::Internal(format!("a sealed secret of {aad} is malformed")))?;
        if bytes.len() < 24 {
            return Err(Error::Internal(format!("a sealed secret of {aad} is malformed")));
        }
        let (nonce, sealed) = bytes.split_at(24);
        let plain = cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| Error::Internal(format!("the secret stored for {aad} does not open: not sealed for it")))?;
        String::from_utf8(plain).map_err(|_| Error::Internal(format!("the secret of {aad} is not text")))
    }

    /// The key id a stored value was sealed with (`None`: stored before sealing).
    pub fn sealed_with(stored: &str) -> Option<&str> {
        stored.strip_prefix(PREFIX)?.split_once(':').map(|(id, _)| id)
    }
}

/// What a secret key row is bound to.
pub fn secret_key_row(id: i64) -> String {
    format!("secret_keys/{id}")
}

/// What a webhook's own secret is bound to.
pub fn webhook_row(webhook_key: &str) -> String {
    format!("webhooks/{webhook_key}")
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| Error::Config(format!("creating the secrets key file {}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::Config(format!("writing the secrets key file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_for_its_row_only() {
        let ring = Keyring::parse(&Keyring::generate("a")).expect("keyring");
        let sealed = ring.seal("webhooks/1", "s3cret").expect("sealed");
        assert!(sealed.starts_with("g2w1:a:") && !sealed.contains("s3cret"), "{sealed}");
        assert_eq!(ring.open("webhooks/1", &sealed).expect("opens"), "s3cret");
        assert!(
            ring.open("webhooks/2", &sealed).is_err(),
            "moved to another row, it does not open"
        );
        assert_ne!(
            sealed,
            ring.seal("webhooks/1", "s3cret").expect("sealed"),
            "a fresh nonce each time"
        );
        assert_eq!(ring.open("webhooks/1", "legacy-plain").expect("plain"), "legacy-plain");
    }

    #[test]
    fn older_keys_open_and_unknown_ones_are_named() {
        let (old, new) = (Keyring::generate("old"), Keyring::generate("new"));
        let sealed_old = Keyring::parse(&old).expect("old").seal("r", "v").expect("sealed");
        let ring = Keyring::parse(&format!("{new},{old}")).expect("both");
        assert_eq!(ring.newest_id(), Some("new"));
        assert_eq!(ring.open("r", &sealed_old).expect("opens"), "v");
        assert_eq!(Keyring::sealed_with(&sealed_old), Some("old"));
        let err = Keyring::parse(&new)
            .expect("new")
            .open("r", &sealed_old)
            .expect_err("unknown key");
        assert!(err.to_string().contains("key old"), "{err}");
        assert!(
            !format!("{ring:?}").contains(old.split(':').nth(1).expect("b64")),
            "Debug shows ids only"
        );
    }

    #[test]
    fn bad_keyrings_are_refused_with_the_reason() {
        for (spec, why) in [
            ("", "none given"),
            ("nokey", "ID:BASE64"),
            ("a:!!!", "not base64"),
            ("a:AAAA", "not 32"),
            ("a b:AAAA", "not a key id"),
        ] {
            let err = Keyring::parse(spec).expect_err(spec);
            assert!(err.to_string().contains(why), "{spec}: {err}");
        }
        let k = Keyring::generate("a");
        assert!(Keyring::parse(&format!("{k},{k}")).is_err(), "an id twice");
    }

    #[test]
    fn the_key_file_is_made_once_and_private() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.secrets");
        let first = Keyring::from_file(&path).expect("made");
        let sealed = first.seal("r", "v").expect("sealed");
        let again = Keyring::from_file(&path).expect("read");
        assert_eq!(again.open("r", &sealed).expect("opens"), "v");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
